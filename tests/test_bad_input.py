"""Bad input: one line `error: ...`, exit code 2, no traceback, and nothing already built is touched."""

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

from soraedge.cli.export_cmd import main as export_main
from soraedge.cli.run_cmd import main as run_main
from soraedge.runtime.manifest import CACHE_DIR, load_manifest




def _snapshot(d: Path) -> dict:
    """The directory's content: every file but its cache folder (compile caches and the hash record, which a load
    may add)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).parts[0] != CACHE_DIR}


# -- sora-export ---------------------------------------------------------------------------------------------------
def test_export_model_missing(tmp_path):
    fails_one_line(export_main, [str(tmp_path / "nope"), "-o", str(tmp_path / "e")], "neither a directory nor a built-in")


def test_export_not_a_pipeline(tmp_path):
    (tmp_path / "m").mkdir()
    fails_one_line(export_main, [str(tmp_path / "m"), "-o", str(tmp_path / "e")], "model_index.json is missing")


@pytest.mark.parametrize("damage,expect", [
    (lambda d: shutil.rmtree(d / "vae"), "missing components ['vae']"),
    (lambda d: _edit(d / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"]), "Wan2.2"),
    (lambda d: _edit(d / "model_index.json", boundary_ratio=0.875), "Wan2.2"),
    (lambda d: _edit(d / "model_index.json", image_encoder=["transformers", "CLIPVisionModel"]), "image-to-video"),
    (lambda d: _edit(d / "scheduler" / "scheduler_config.json", _class_name="DDIMScheduler"), "DDIMScheduler"),
    (lambda d: _edit(d / "scheduler" / "scheduler_config.json", use_karras_sigmas=True), "use_karras_sigmas"),
    (lambda d: [p.rename(p.with_suffix(".bin")) for p in (d / "vae").glob("*.safetensors")], "pickled"),
    (lambda d: _edit(d / "vae" / "config.json", scale_factor_temporal=2), "scale_factor_temporal is 2, but its "
                                                                           "blocks compress by 4"),
    (lambda d: _edit(d / "vae" / "config.json", latents_std=[1.0] * 3), "latents_std has 3 values for"),
])
def test_export_refuses_unsupported(tiny_model, tmp_path, damage, expect):
    d = tmp_path / "model"
    shutil.copytree(tiny_model("tiny-a"), d)
    damage(d)
    fails_one_line(export_main, [str(d), "-o", str(tmp_path / "e")], expect)
    assert not (tmp_path / "e").exists()


def _edit(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("args,expect", [
    (["--frames", "6"], "frames=6 is not of the form 4k+1 (nearest valid: 5 or 9)"),
    (["--height", "100"], "height=100 is not a multiple of 16 (nearest valid: 96 or 112)"),
])
def test_export_bad_sizes(tiny_model, tmp_path, args, expect):
    fails_one_line(export_main, [str(tiny_model("tiny-a")), "-o", str(tmp_path / "e"), *args], expect)
    assert not (tmp_path / "e").exists()


def test_export_refuses_to_replace_a_different_engine_dir(tiny_model, engine_copy):
    before = _snapshot(engine_copy)
    fails_one_line(export_main, [str(tiny_model("tiny-b")), "-o", str(engine_copy)], "--overwrite")
    assert _snapshot(engine_copy) == before


def test_export_refuses_non_engine_dir(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    fails_one_line(export_main, ["demo", "-o", str(out)], "not an engine directory")
    assert (out / "notes.txt").read_text() == "keep me"


def test_ctrl_c_during_export_leaves_old_engines_intact(tiny_model, engine_copy):
    """SIGINT mid-export (with --overwrite): exit 130, old directory intact and verifying, no temp dirs left."""
    before = _snapshot(engine_copy)
    proc = subprocess.Popen([sys.executable, "-m", "soraedge.cli.export_cmd", str(tiny_model("tiny-b")), "-o",
                             str(engine_copy), "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(engine_copy.parent.glob(".engines.build-*/engine")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert _snapshot(engine_copy) == before
    load_manifest(engine_copy)
    assert not list(engine_copy.parent.glob(".engines.build-*"))


def test_a_swallowed_ctrl_c_still_stops_the_commit(tmp_path):
    """A KeyboardInterrupt raised where Python ignores exceptions (a __del__ here, importlib's lock callback in the
    wild) is printed and lost; the build must still not rename its result into place."""
    from soraedge.target.staging import commit
    from soraedge.runtime.interrupts import remembered_interrupts

    class InterruptedWhileDeleted:
        def __del__(self):
            # what CPython does on SIGINT: call the installed handler in the main thread, here inside __del__ (a real
            # os.kill reaches every library thread pool of this test process too, and crashed it once)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir()
    with remembered_interrupts():
        InterruptedWhileDeleted()  # deleted at once; the interrupt raised inside __del__ is ignored
        with pytest.raises(KeyboardInterrupt):
            commit(stage, out, tmp_path, "key", "inputs", False)
    assert stage.is_dir() and not out.exists()


# -- sora-run ------------------------------------------------------------------------------------------------------


def test_run_engine_dir_missing(tmp_path):
    fails_one_line(run_main, run_args(tmp_path / "none", tmp_path), "does not exist")


def test_run_manifest_missing(engine_copy, tmp_path):
    (engine_copy / "manifest.json").unlink()
    fails_one_line(run_main, run_args(engine_copy, tmp_path), "no manifest.json")


def test_run_manifest_unreadable(engine_copy, tmp_path):
    (engine_copy / "manifest.json").write_text("{ not json")
    fails_one_line(run_main, run_args(engine_copy, tmp_path), "unreadable or malformed")


@pytest.mark.parametrize("how", ["truncate", "replace"])
def test_run_hash_mismatch(engine_copy, tmp_path, how):
    data = engine_copy / "transformer.onnx.data"
    if how == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    else:
        blob = bytearray(data.read_bytes())
        blob[10] ^= 0xFF
        data.write_bytes(bytes(blob))
    fails_one_line(run_main, run_args(engine_copy, tmp_path), "does not match its manifest hash")


@pytest.mark.parametrize("args,expect", [
    (["--height", "40"], "height=40 is not a multiple of 16 (nearest valid: 32 or 48)"),
    (["--width", "50"], "width=50 is not a multiple of 16 (nearest valid: 48 or 64)"),
    (["--frames", "6"], "frames=6 is not of the form 4k+1 (nearest valid: 5 or 9)"),
    (["--frames", "89"], "outside the exported range: f=23"),
    (["--steps", "0"], "need at least 1 step"),
    (["--guidance", "-1"], "guidance must be >= 0"),
    (["--guidance", "inf"], "guidance=inf: guidance must be >= 0 and <= 100"),
    (["--guidance", "nan"], "guidance=nan"),
    (["--guidance", "101"], "<= 100"),
    (["--steps", "100000"], "at most 1000"),
    (["--seed", "-1"], "seed=-1"),
    (["--height", "0"], "height=0 is not a multiple of 16"),
    (["--frames", "0"], "frames=0 is not of the form 4k+1"),
    (["--threads", "0"], "threads=0: need at least 1"),
])
def test_run_bad_arguments(tiny_engines, tmp_path, args, expect):
    """Refused before any compute, nothing written (0 is an error, never "the default")."""
    fails_one_line(run_main, run_args(tiny_engines("tiny-a"), tmp_path, *args), expect)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("latents,expect", [
    (np.zeros((1, 16, 2, 4, 5), np.float32), "shape (1, 16, 2, 4, 6)"),
    (np.zeros((1, 16, 2, 4, 6), np.float64), "got float64"),
])
def test_run_bad_latents(tiny_engines, tmp_path, latents, expect):
    np.save(tmp_path / "noise.npy", latents)
    fails_one_line(run_main, run_args(tiny_engines("tiny-a"), tmp_path, "--latents", str(tmp_path / "noise.npy")), expect)


def test_run_bad_output_paths(tiny_engines, tmp_path):
    eng = tiny_engines("tiny-a")
    fails_one_line(run_main, run_args(eng, tmp_path, out="v.avi"), "unknown extension")
    fails_one_line(run_main, run_args(eng, tmp_path, out="missing/v.mp4"), "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to any folder, so an unwritable folder cannot be made")
def test_run_output_folder_not_writable(tiny_engines, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    fails_one_line(run_main, run_args(tiny_engines("tiny-a"), ro), "not writable")


def test_overlong_prompt_is_truncated_with_a_warning(tiny_engines, tmp_path):
    result = CliRunner().invoke(run_main, ["--engines", str(tiny_engines("tiny-a")), "--prompt", "cat " * 600,
                                           "--steps", "1", "-o", str(tmp_path / "v.npy")])
    assert result.exit_code == 0, result.output
    assert "truncated to the model's limit of 512" in result.output
