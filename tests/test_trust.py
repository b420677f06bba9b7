"""Trust and safety, tried as an attacker and as an unlucky user would: an engine directory or checkpoint from
elsewhere reads and writes nothing outside its folder; `--overwrite` replaces only what is recognisably ours; no bad
number ends in a silent black video; temp files never follow a planted symlink and never outlive a failure. Each case
asserts the one-line error, the exit code, that nothing outside the folder changed (hashes before and after) and
that the user's files are intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import fails_one_line, run_args

from soraedge.cli.build_cmd import main as build_main
from soraedge.cli.export_cmd import main as export_main
from soraedge.cli.run_cmd import main as run_main
from soraedge.cli.triton_cmd import main as triton_main
from soraedge.target.staging import commit
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import MANIFEST, load_manifest, staged
from soraedge.runtime.pipeline import Pipeline
from soraedge.runtime.prompt_cache import PromptCache
from soraedge.runtime.user_cache import cache_home




def _tree(d: Path) -> dict[str, str]:
    """sha256 of every file under d (symlinks as their target's name), less the hash record in `.cache/`, which
    any load may refresh (runtime/verified_files.py)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if rel.startswith(".cache/"):
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))


@pytest.fixture
def world(tmp_path, engine_copy):
    """An attacker's engine directory EVIL (a copy of tiny-a's engines) and a victim folder beside it whose content
    must never change."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("the user's file")
    return engine_copy, victim


# -- paths a manifest names ----------------------------------------------------------------------------------------
def _traversing_file(evil: Path, victim: Path, how: str) -> str:
    """Make the manifest list an attacker file whose path leaves the folder: by '..' or through a symlink."""
    (evil / "payload").write_text("attacker's bytes")
    digest = {"sha256": hashlib.sha256(b"attacker's bytes").hexdigest(), "bytes": 16}
    if how == "dotdot":
        rel = "deep/" + "../" * (len(evil.parts) + 2) + str(victim / "precious.txt").lstrip("/")
    else:
        (evil / "deep").mkdir()
        (evil / "deep" / "link").symlink_to(victim)
        rel = "deep/link/precious.txt"
    _edit_manifest(evil, lambda d: d["files"].update({rel: digest}))
    return rel


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_target_build_from_a_traversing_manifest_writes_nothing_outside(world, tmp_path, how):
    evil, victim = world
    before = _tree(victim)
    _traversing_file(evil, victim, how)
    fails_one_line(build_main, [evil, "-o", tmp_path / "out", "--backend", "ort"], "refusing it")
    assert _tree(victim) == before
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("key,value,expect", [
    ("tokenizer", "../victim/precious.txt", "leaves the directory"),
    ("scheduler", "/etc/hostname", "leaves the directory"),
])
def test_triton_repo_from_a_traversing_pipeline_path_writes_nothing_outside(world, tmp_path, key, value, expect):
    evil, victim = world
    before = _tree(victim)
    _edit_manifest(evil, lambda d: d["pipeline"].update({key: value}))
    fails_one_line(triton_main, [evil, "-o", tmp_path / "repo"], expect)
    assert _tree(victim) == before and not (tmp_path / "repo").exists()


def test_triton_prefix_follows_model_name_rules(tiny_engines, tmp_path):
    repo = tmp_path / "a" / "repo"
    fails_one_line(triton_main, [tiny_engines("tiny-a"), "-o", repo, "--prefix", "../../x"], "not a valid model name")
    assert not (tmp_path / "a").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("edit,expect", [
    (lambda d: d["engines"]["transformer"].update(file=str(Path("/etc/hostname"))), "leaves the directory"),
    (lambda d: d["pipeline"].update(scheduler="../outside.json"), "leaves the directory"),
    (lambda d: d["engines"]["transformer"].update(plan="transformer.plan"), "not listed (so not hash-checked)"),
    (lambda d: d.update(files=list(d["files"])), "'files' is not a mapping"),
    (lambda d: d["files"]["transformer.onnx"].pop("sha256"), "needs a sha256"),
    (lambda d: d["pipeline"].pop("defaults"), "pipeline.defaults lacks"),
    (lambda d: d["engines"]["transformer"].update(spec={"name": "x"}), "spec is invalid"),
    (lambda d: d.update(schema="something else"), "not a soraedge engine manifest"),
])
def test_malformed_or_traversing_manifest_is_refused_at_load(engine_copy, tmp_path, edit, expect):
    _edit_manifest(engine_copy, edit)
    fails_one_line(run_main, run_args(engine_copy, tmp_path), expect)
    assert not (tmp_path / "v.npy").exists()


def test_compiled_models_live_in_the_users_cache_never_in_the_engine_dir(engine_copy, tmp_path):
    """A shipped `.cache/` holds no compiled model the runtime would load: OpenVINO compiles into this user's cache,
    keyed by the engines' content."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (no wheel for this platform)")
    planted = engine_copy / ".cache" / "openvino"
    planted.mkdir(parents=True)
    (planted / "model.blob").write_bytes(b"attacker's compiled model")
    before = _tree(planted)
    pipe = Pipeline.load(engine_copy, backend="openvino", precision="fp32")
    frames = pipe("a cat", steps=1, seed=0).frames
    assert np.isfinite(frames).all()
    assert _tree(planted) == before
    key = pipe.manifest.content_key("transformer")
    assert (cache_home() / "compiled" / "openvino" / f"transformer-{key}-fp32").is_dir()


def test_an_engine_swapped_after_load_is_checked_when_opened(engine_copy):
    pipe = Pipeline.load(engine_copy)  # verified; the DiT opens lazily, at the first step
    # the weights of whichever DiT graph this backend runs (ONNX Runtime's CPU graph shares the portable one's)
    data = engine_copy / (pipe.manifest.data["engines"]["transformer"]["file"] + ".data")
    blob = bytearray(data.read_bytes())
    blob[10] ^= 0xFF
    data.unlink()  # a new file (new inode) with other bytes, as a swap would make
    data.write_bytes(bytes(blob))
    with pytest.raises(SoraError, match="does not match its manifest hash"):
        pipe("a cat", steps=1, seed=0)


def test_the_shared_weights_of_the_ort_cpu_graph_are_checked_when_it_opens(engine_copy):
    """ONNX Runtime's CPU graph of the DiT (transformer.ort-cpu.onnx) reads the portable graph's weights file: a
    swap of that file after load is caught when this graph opens, not only when the portable one does."""
    from soraedge.target.attention_rewrite import rewrite_file
    from soraedge.target.choose import ORT_CPU_DIT

    rewrite_file(engine_copy / "transformer.onnx", engine_copy / ORT_CPU_DIT)

    def point_at_ort_graph(d):
        d["engines"]["transformer"]["ort_cpu_file"] = ORT_CPU_DIT
        d["files"][ORT_CPU_DIT] = {"sha256": hashlib.sha256((engine_copy / ORT_CPU_DIT).read_bytes()).hexdigest(),
                                   "bytes": (engine_copy / ORT_CPU_DIT).stat().st_size}

    _edit_manifest(engine_copy, point_at_ort_graph)
    m = load_manifest(engine_copy)
    data = engine_copy / "transformer.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[10] ^= 0xFF
    data.unlink()
    data.write_bytes(bytes(blob))
    with pytest.raises(SoraError, match="transformer.onnx.data does not match its manifest hash"):
        m.path_for("transformer", "ort")


# -- ownership before deletion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest_text", ['{"name": "my web app", "icons": []}', "{ not json"])
def test_overwrite_never_replaces_a_users_folder_with_a_manifest(tiny_model, tmp_path, manifest_text):
    app = tmp_path / "app"
    app.mkdir()
    (app / MANIFEST).write_text(manifest_text)
    (app / "index.html").write_text("<html>mine</html>")
    before = _tree(app)
    fails_one_line(export_main, [tiny_model("tiny-a"), "-o", app, "--overwrite"], "is not an engine directory",
           "index.html")
    assert _tree(app) == before


def test_rebuilding_an_engine_dir_never_deletes_a_users_renders_inside_it(engine_copy, tmp_path):
    (engine_copy / "renders").mkdir()
    (engine_copy / "renders" / "clip.mp4").write_bytes(b"a render")
    before = _tree(engine_copy)
    fails_one_line(build_main, [engine_copy, "-o", engine_copy, "--backend", "ort", "--overwrite"],
           "not part of its engines (renders/clip.mp4)")
    assert _tree(engine_copy) == before


def test_the_output_never_holds_the_source(engine_copy, tiny_model, tmp_path):
    shutil.copytree(tiny_model("tiny-a"), engine_copy / "model")
    before = _tree(engine_copy)
    fails_one_line(export_main, [engine_copy / "model", "-o", engine_copy, "--overwrite"], "holds the source")
    assert _tree(engine_copy) == before


@pytest.mark.parametrize("what", ["engine_dir", "file", "user_dir"])
def test_triton_overwrite_replaces_only_its_own_repositories(tiny_engines, engine_copy, tmp_path, what):
    target = {"engine_dir": engine_copy, "file": tmp_path / "notes.txt", "user_dir": tmp_path / "mine"}[what]
    if what == "file":
        target.write_text("notes")
    elif what == "user_dir":
        target.mkdir()
        (target / "a.txt").write_text("mine")
    before = _tree(tmp_path)
    fails_one_line(triton_main, [tiny_engines("tiny-a"), "-o", target, "--overwrite"])
    assert _tree(tmp_path) == before  # nothing changed, no hidden `.notes.txt.old` either


def test_a_concurrent_different_build_is_not_replaced_without_overwrite(tiny_engines, tmp_path):
    """The destination check is repeated under the output's lock just before the swap: a different build that
    landed meanwhile is kept (refused without --overwrite); an identical one is kept and ours discarded."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()

    def stage(name: str, key: str) -> Path:
        d = work / name
        shutil.copytree(tiny_engines("tiny-a"), d)
        body = json.loads((d / MANIFEST).read_text())
        files = body.pop("files")
        staged(d, {**body, "cache_key": key, "inputs_key": key, "source": name}, files).write()
        return d

    assert commit(stage("first", "k1"), out, work, "k1", "k1", overwrite=False)
    with pytest.raises(SoraError, match="holds a different engine directory"):
        commit(stage("second", "k2"), out, work, "k2", "k2", overwrite=False)
    assert not commit(stage("same", "k1"), out, work, "k1", "k1", overwrite=False)
    assert load_manifest(out).data["source"] == "first"


def test_two_concurrent_exports_with_different_options_never_both_write(tiny_engines, tmp_path):
    """Two real target builds to one folder at once (ONNX Runtime and OpenVINO): one writes, the other is refused
    in one line, whichever finishes first."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "soraedge.cli.build_cmd", str(tiny_engines("tiny-a")), "-o",
                               str(out), "--backend", b, "--precision", "fp32", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in ("ort", "openvino")]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[2] == 2)
    assert "holds a different engine directory; pass --overwrite" in refused[1] and "Traceback" not in refused[1]
    load_manifest(out)


# -- numbers -------------------------------------------------------------------------------------------------------


def test_run_refuses_non_finite_latents(tiny_engines, tmp_path):
    noise = np.zeros((1, 16, 2, 4, 6), np.float32)
    noise[0, 0, 0, 0, 0] = np.nan
    np.save(tmp_path / "noise.npy", noise)
    fails_one_line(run_main, run_args(tiny_engines("tiny-a"), tmp_path, "--latents", tmp_path / "noise.npy"),
                   "NaN or inf")
    assert not (tmp_path / "v.npy").exists()


def test_run_refuses_a_prompt_that_is_not_utf8(tiny_engines, tmp_path):
    # what click hands over for the bytes b"\xff" on a UTF-8 system (surrogateescape)
    args = run_args(tiny_engines("tiny-a"), tmp_path)
    args[3] = "a cat \udcff"
    fails_one_line(run_main, args, "prompt is not valid UTF-8")
    assert not (tmp_path / "v.npy").exists()


def test_a_nan_prompt_cache_entry_is_ignored_not_used(tiny_engines, tmp_path):
    eng = tiny_engines("tiny-a")
    cache = tmp_path / "cache"
    pipe = Pipeline.load(eng, prompt_cache=cache)
    want = pipe("a cat", steps=1, seed=0, guidance=1.0).frames
    (entry,) = list(pipe.prompt_cache.dir.glob("*.npy"))
    np.save(entry, np.full(pipe.prompt_cache.shape, np.nan, np.float32))
    got = Pipeline.load(eng, prompt_cache=cache)("a cat", steps=1, seed=0, guidance=1.0).frames
    np.testing.assert_array_equal(got, want)


def _with_scheduler(engine_copy: Path, **changes) -> None:
    path = engine_copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    body = json.loads((engine_copy / MANIFEST).read_text())
    for k in ("schema", "format_version", "files"):
        body.pop(k)
    staged(engine_copy, body).write()  # re-hashed: the directory is consistent, only the value is bad


@pytest.mark.parametrize("changes,expect", [
    ({"flow_shift": 0}, "flow_shift=0 is invalid"),
    ({"flow_shift": -1}, "flow_shift=-1 is invalid"),
    ({"flow_shift": float("nan")}, "flow_shift=nan is invalid"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0 is invalid"),
])
def test_scheduler_values_are_validated_atrun_args(engine_copy, tmp_path, changes, expect):
    _with_scheduler(engine_copy, **changes)
    fails_one_line(run_main, run_args(engine_copy, tmp_path), expect)
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.parametrize("changes,expect", [
    ({"flow_shift": 0}, "flow_shift=0 is invalid"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0 is invalid"),
])
def test_scheduler_values_are_validated_at_export(tiny_model, tmp_path, changes, expect):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("tiny-a"), model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    fails_one_line(export_main, [model, "-o", tmp_path / "e"], expect)
    assert not (tmp_path / "e").exists()


# -- checkpoints from elsewhere ------------------------------------------------------------------------------------
def _model_copy(tiny_model, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model("tiny-a"), model)
    return model


@pytest.mark.parametrize("damage,expect", [
    (lambda m: (m / "model_index.json").write_text("[1, 2]"), "is not a JSON object"),
    (lambda m: (m / "model_index.json").write_text("{ broken"), "is not valid JSON"),
    (lambda m: _json_edit(m / "model_index.json", vae="AutoencoderKLWan"), "not a [library, class] pair"),
    (lambda m: _truncate(next((m / "vae").glob("*.safetensors"))), "truncated"),
    (lambda m: next((m / "vae").glob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx"),
     "header is not JSON"),
    (lambda m: _json_edit(m / "transformer" / "config.json", num_layers=3000),
     "the config does not belong to these weights"),
    (lambda m: _json_edit(m / "transformer" / "config.json", num_attention_heads=3), "makes it"),
    (lambda m: (m / "tokenizer" / "tokenizer.json").write_text("{}"), "not a valid tokenizer.json"),
])
def test_a_malformed_checkpoint_is_one_line_before_any_allocation(tiny_model, tmp_path, damage, expect):
    model = _model_copy(tiny_model, tmp_path)
    damage(model)
    fails_one_line(export_main, [model, "-o", tmp_path / "e"], expect)
    assert not (tmp_path / "e").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _json_edit(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-64])


# -- temp files and the file system --------------------------------------------------------------------------------
def test_a_planted_symlink_at_the_old_temp_name_is_never_followed(tiny_engines, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for pid in {os.getpid(), os.getppid()}:
        (shared / f".clip.tmp{pid}.npy").symlink_to(victim)
    result = CliRunner().invoke(run_main, [str(a) for a in run_args(tiny_engines("tiny-a"), shared, out="clip.npy")])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "keep"
    assert np.load(shared / "clip.npy").shape[-1] == 3
    assert {p.name for p in shared.iterdir()} == {"clip.npy"} | {f".clip.tmp{p}.npy" for p in {os.getpid(),
                                                                                               os.getppid()}}


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root and a kernel that allows it here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_and_leaves_no_temp_file(tiny_engines, small_fs, tmp_path):
    # 5 frames of 32x48 float32 are 92 KB: more than the 64 KiB file system holds
    fails_one_line(run_main, run_args(tiny_engines("tiny-a"), small_fs), "No space left on device")
    assert not list(small_fs.iterdir())


def test_a_read_only_file_system_is_one_line(tiny_engines, tiny_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs needs root and a kernel that allows it here")
    try:
        fails_one_line(run_main, run_args(tiny_engines("tiny-a"), ro), "is not writable")
        fails_one_line(export_main, [tiny_model("tiny-a"), "-o", ro / "e"], "Read-only file system")
        assert not list(ro.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_output_over_a_bind_mount_is_one_line(tiny_engines, tmp_path):
    out = tmp_path / "v.npy"
    out.write_bytes(b"busy")
    src = tmp_path / "src"
    src.write_bytes(b"bound")
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(src), str(out)], capture_output=True).returncode:
        pytest.skip("bind mounts need root and a kernel that allows them here")
    try:
        fails_one_line(run_main, run_args(tiny_engines("tiny-a"), tmp_path), "Device or resource busy")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "v.npy"]
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_prompt_cache_temp_files_never_leak_and_count_for_eviction(small_fs, tmp_path):
    cache = PromptCache(small_fs, "k", (512, 64))  # 128 KB an entry: more than the file system holds
    cache.put("a cat", np.ones((512, 64), np.float32))
    assert cache.get("a cat") is None and not list(cache.dir.iterdir())
    roomy = PromptCache(tmp_path / "cache", "k", (2, 2), max_bytes=10_000)
    roomy.dir.mkdir(parents=True)
    stale = roomy.dir / ".left-by-a-killed-run.tmp.npy"
    stale.write_bytes(b"x" * 20_000)
    os.utime(stale, (time.time() - 7200,) * 2)
    roomy.put("a cat", np.ones((2, 2), np.float32))
    assert not stale.exists() and roomy.get("a cat") is not None


def test_sigterm_during_a_run_removes_the_temp_file(tiny_engines, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "soraedge.cli.run_cmd", "--engines", str(tiny_engines("tiny-a")),
                             "--prompt", "a cat", "--steps", "1000", "--no-prompt-cache", "-o",
                             str(tmp_path / "v.mp4")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".v.mp4.*")):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted: nothing was written" in err
    assert not list(tmp_path.iterdir())
