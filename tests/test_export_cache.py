"""The export cache is keyed by content and options: the same export is reused, a changed one is not."""

import pytest

from conftest import TEST_SIZE
from soraedge.export.build import ExportConfig, run_export
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest


def test_same_content_and_options_is_reused(tiny_model, tiny_engines):
    size = TEST_SIZE["tiny-a"]
    before = load_manifest(tiny_engines("tiny-a")).data["cache_key"]
    report = run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=tiny_engines("tiny-a"),
                                     frames=size["frames"], height=size["height"], width=size["width"],
                                     precision="fp32"))
    assert report.reused
    assert load_manifest(tiny_engines("tiny-a")).data["cache_key"] == before


def test_renamed_copy_with_same_content_is_reused_but_different_options_are_not(tiny_model, engine_copy):
    size = TEST_SIZE["tiny-a"]
    same = ExportConfig(model=str(tiny_model("tiny-a")), out=engine_copy, frames=size["frames"],
                        height=size["height"], width=size["width"], precision="fp32")
    assert run_export(same).reused  # a copy under another name: same content, same key
    other = ExportConfig(model=str(tiny_model("tiny-a")), out=engine_copy, frames=9, height=size["height"],
                         width=size["width"], precision="fp32")
    with pytest.raises(SoraError, match="--overwrite"):
        run_export(other)


def test_changed_exporter_code_rebuilds_without_overwrite(tiny_model, engine_copy, monkeypatch):
    """The key covers the exporter's own source: an export written by older code from the same model and options is
    rebuilt, not reused, and not refused as a different directory either (only other inputs need --overwrite)."""
    import soraedge.export.build as build

    size = TEST_SIZE["tiny-a"]
    same = ExportConfig(model=str(tiny_model("tiny-a")), out=engine_copy, frames=size["frames"],
                        height=size["height"], width=size["width"], check_parity=False,
                        precision="fp32")
    old = load_manifest(engine_copy).data
    assert old["versions"]["soraedge_source"] == build._source_digest()
    monkeypatch.setattr(build, "_source_digest", lambda: "0" * 16)
    logged = []
    assert not run_export(same, log=logged.append).reused
    assert any("by other tool versions: rebuilding" in line for line in logged)
    new = load_manifest(engine_copy).data
    assert new["versions"]["soraedge_source"] == "0" * 16
    assert new["inputs_key"] == old["inputs_key"] and new["cache_key"] != old["cache_key"]


def test_traced_graphs_are_reused_by_content_and_a_changed_entry_is_traced_again(tiny_model, tiny_engines, tmp_path):
    """Another export of the same checkpoint (other precision, other folder) reuses the graphs the fixture's export
    traced (export/trace_cache.py): the same files, and parity is still checked. A cache entry whose file no longer
    hashes as recorded is not used: that component is traced again."""
    from soraedge.export import trace_cache
    from soraedge.runtime.manifest import sha256_file

    size = TEST_SIZE["tiny-a"]
    reference = tiny_engines("tiny-a")
    cfg = dict(model=str(tiny_model("tiny-a")), frames=size["frames"], height=size["height"], width=size["width"],
               max_sequence_length=512, backend="ort", precision="fp32")
    logged = []
    report = run_export(ExportConfig(out=tmp_path / "a", **cfg), log=logged.append)
    reused = [line.split(":")[0] for line in logged if "traced from the same weights by an earlier export" in line]
    assert sorted(reused) == sorted(load_manifest(reference).data["engines"])
    assert sum(report.seconds[f"export_{n}"] for n in reused) < 5
    assert all("max abs error vs PyTorch" in line for line in logged if line.startswith("  ") and "rel" in line)
    for name in ("transformer.onnx", "transformer.onnx.data"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(reference / name)

    # an entry changed on disk (replaced, so the fixture's hard-linked files stay as they are)
    entries = [e for e in (trace_cache.cache_home() / "traces").iterdir() if (e / "dit_probe.onnx").exists()]
    for e in entries:
        data = (e / "dit_probe.onnx.data").read_bytes()
        (e / "dit_probe.onnx.data").unlink()
        (e / "dit_probe.onnx.data").write_bytes(data[:-4] + b"\0\0\0\0")
    logged.clear()
    run_export(ExportConfig(out=tmp_path / "b", **cfg), log=logged.append)
    assert "exporting dit_probe ..." in logged
    assert sha256_file(tmp_path / "b" / "dit_probe.onnx.data") == sha256_file(reference / "dit_probe.onnx.data")


def test_a_cache_size_that_is_not_one_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    from soraedge.cli.export_cmd import main as export_main

    from conftest import fails_one_line

    for variable, value in (("SORAEDGE_TRACE_CACHE_GB", "lots"), ("SORAEDGE_COMPILED_CACHE_GB", "-1")):
        monkeypatch.setenv(variable, value)
        fails_one_line(export_main, [tiny_model("tiny-a"), "-o", tmp_path / "e"], f"{variable}='{value}'",
                       "expected a size in GB")
        assert not (tmp_path / "e").exists()
        monkeypatch.delenv(variable)


def test_the_caches_drop_their_least_recently_used_entries_beyond_their_size(tmp_path, monkeypatch):
    """Three compiled-model entries of 1 MiB within a 2.5 MiB cache: opening a fourth drops the oldest two; the one
    just used stays even when it alone is over the size. 0 turns the cache off."""
    import os

    from soraedge.runtime import user_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("SORAEDGE_COMPILED_CACHE_GB", str(2.5 / 1024))
    folders = [user_cache.compiled_cache("openvino", "transformer", f"key{i}", "fp32") for i in range(4)]
    for i, f in enumerate(folders):
        f.mkdir(parents=True)
        (f / "blob").write_bytes(b"\0" * (1 << 20))
        os.utime(f, (1000 + i, 1000 + i))
    user_cache.compiled_used(folders[3])
    assert [f.exists() for f in folders] == [False, False, True, True]
    monkeypatch.setenv("SORAEDGE_COMPILED_CACHE_GB", "0.0001")
    user_cache.compiled_used(folders[2])
    assert [f.exists() for f in folders] == [False, False, True, False]
    monkeypatch.setenv("SORAEDGE_COMPILED_CACHE_GB", "0")
    assert user_cache.compiled_cache("openvino", "transformer", "key9", "fp32") is None
