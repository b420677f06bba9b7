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
