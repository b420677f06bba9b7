"""Shared fixtures: tiny Wan pipelines written with save_pretrained, and their exported engine directories.

Built once per test session (export is the slow part: ~30 s per configuration on 2 cores).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# sora-run caches prompt embeddings (and export its traced graphs) under $XDG_CACHE_HOME: keep the tests' cache out
# of the user's home, and remove it when the session ends.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="soraedge-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

# Test sizes: small enough for CI, different from the export samples (b=2, f=2, h=2p, w=3p).
TEST_SIZE = {"tiny-a": dict(height=32, width=48, frames=5), "tiny-b": dict(height=48, width=32, frames=9)}
TEST_SIZE.update({"tiny-a14b-a": TEST_SIZE["tiny-a"], "tiny-a14b-b": TEST_SIZE["tiny-b"]})  # tiny-a/b + an expert


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """name -> diffusers WanPipeline directory (built lazily, once)."""
    from soraedge.export.tiny_wan import build_tiny_wan

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_tiny_wan(tmp_path_factory.mktemp(name) / "model", name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory, tiny_model):
    """name -> engine directory exported from tiny_model(name) with that config's test frame count."""
    from soraedge.export.build import ExportConfig, run_export

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            size = TEST_SIZE[name]
            out = tmp_path_factory.mktemp(f"{name}-eng") / "engines"
            # fp32 execution, whatever is fastest here: the parity tests check these against PyTorch
            run_export(ExportConfig(model=str(tiny_model(name)), out=out, frames=size["frames"],
                                    height=size["height"], width=size["width"], max_sequence_length=512,
                                    precision="fp32"))
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="session")
def experts_engines(tiny_model, tiny_engines, tmp_path_factory):
    """name -> the engines of a Wan2.2 A14B test configuration (tests/test_experts.py, tests/test_triton_repo.py).
    Each is a Wan2.1 test model plus a low-noise expert: exported after that model, every graph but the new
    expert's is the one traced for it (the trace cache is keyed by component)."""
    from soraedge.export.build import ExportConfig, run_export

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            tiny_engines(name.replace("a14b-", ""))
            out = tmp_path_factory.mktemp(name) / "engines"
            logged = []
            run_export(ExportConfig(model=str(tiny_model(name)), out=out, **TEST_SIZE[name], max_sequence_length=512,
                                    precision="fp32", backend="ort"), log=logged.append)
            traced = {line.split()[1] for line in logged if line.startswith("exporting ")}
            reused = any("traced from the same weights by an earlier export" in line for line in logged)
            # (a cache on another file system than the engines keeps nothing: hard links only)
            assert traced == {"transformer_2", "dit_probe_2"} if reused else "transformer_2" in traced, traced
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="session")
def dynamic_engines(tmp_path_factory, tiny_model):
    """tiny-a exported with the int8-dynamic DiT (tests/test_int8_dynamic.py, tests/test_auto_precision.py)."""
    from soraedge.export.build import ExportConfig, run_export

    out = tmp_path_factory.mktemp("tiny-a-int8-dynamic") / "engines"
    run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=out, **TEST_SIZE["tiny-a"],
                            precision="int8-dynamic", backend="auto", check_parity=False))
    return out


@pytest.fixture
def engine_copy(tiny_engines, tmp_path):
    """A private copy of tiny-a's engines that a test may damage."""
    dst = tmp_path / "engines"
    shutil.copytree(tiny_engines("tiny-a"), dst)
    return dst


def fails_one_line(cli, args, *expect) -> str:
    """Invoke a CLI that must refuse: exit 2, no traceback, exactly one `error:` line holding every `expect`."""
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [str(a) for a in args])
    out = result.output.strip()
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def run_args(engines, tmp_path, *extra, out="v.npy") -> list:
    """sora-run's arguments for one quick generation into tmp_path/out."""
    return ["--engines", engines, "--prompt", "a cat", "--steps", "1", "-o", tmp_path / out, *extra]
