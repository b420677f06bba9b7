"""The two-step path: export portable ONNX on one machine (--onnx-only), build the runtime target from it on another
(`sora-build ONNX_DIR -o ENGINE_DIR --backend B`, target/build.py), without torch. The GPU target's build is
covered in tests/test_ort_io.py (needs a GPU); here the CPU target exercises the same file handling."""

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from soraedge.cli.build_cmd import main as build_main
from soraedge.cli.export_cmd import main as export_main
from soraedge.target.choose import ORT_CPU_DIT
from soraedge.runtime.backends import openvino as ov_backend
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline

BUILD_WITHOUT_TORCH = textwrap.dedent("""
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, BlockTorch())
    from soraedge.cli.build_cmd import main
    main(sys.argv[1:])
""")


def _cli(*args):
    return subprocess.run([sys.executable, "-c", BUILD_WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def _assert_same_onnx(built, src):
    """The same ONNX, byte for byte, plus ONNX Runtime's CPU graph of the DiT where the build measured it faster."""
    assert {k: built.data["files"][k] for k in src.data["files"]} == src.data["files"]
    assert set(built.data["files"]) - set(src.data["files"]) <= {ORT_CPU_DIT}


def test_onnx_only_then_build_the_target_elsewhere(tiny_model, tmp_path):
    onnx = tmp_path / "onnx"
    result = CliRunner().invoke(export_main, [str(tiny_model("tiny-a")), "-o", str(onnx), "--onnx-only",
                                              "--height", "32", "--width", "48", "--frames", "5"])
    assert result.exit_code == 0, result.output
    src = load_manifest(onnx)
    assert src.runtime == {"backend": "ort", "precision": "fp32", "onnx_only": True} and src.data["gpu"] is None
    assert "DiT step" not in result.output  # no target was timed

    engines = tmp_path / "engines"
    proc = _cli(onnx, "-o", engines, "--backend", "ort", "--threads", "2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    built = load_manifest(engines)
    assert built.data["built_from"] == {"path": str(onnx.resolve()), "cache_key": src.data["cache_key"]}
    _assert_same_onnx(built, src)
    assert built.runtime["backend"] == "ort" and "ort-fp32" in built.runtime["timings"]
    assert built.data["precision"] == src.data["precision"] and built.data["pipeline"] == src.data["pipeline"]
    a = Pipeline.load(onnx)("a red fox", steps=2, seed=0).frames
    b = Pipeline.load(engines)("a red fox", steps=2, seed=0).frames
    if "ort_cpu_file" in built.data["engines"]["transformer"]:  # MultiHeadAttention sums in another order
        assert np.abs(a - b).max() <= 1e-4
    else:
        np.testing.assert_array_equal(a, b)

    again = _cli(onnx, "-o", engines, "--backend", "ort", "--threads", "2")
    assert again.returncode == 0 and "already built from these engines" in again.stdout

    in_place = _cli(engines, "-o", engines, "--backend", "ort", "--threads", "2", "--overwrite")
    assert in_place.returncode == 0, in_place.stderr + in_place.stdout
    _assert_same_onnx(load_manifest(engines), src)

    fixed = CliRunner().invoke(export_main, [str(onnx), "-o", str(tmp_path / "x"), "--max-frames", "9",
                                             "--frames", "9"])
    assert fixed.exit_code == 2 and "is an engine directory, already exported: build its runtime target with " \
        "sora-build" in fixed.output and "Traceback" not in fixed.output
    graphs = CliRunner().invoke(build_main, [str(onnx), "-o", str(tmp_path / "x"), "--precision", "fp16"])
    assert graphs.exit_code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in graphs.output
    assert "Traceback" not in graphs.output
    assert not (tmp_path / "x").exists()

    broken = tmp_path / "broken"
    shutil.copytree(onnx, broken)
    with open(broken / "transformer.onnx", "r+b") as f:
        f.truncate(100)
    before = sorted(p.name for p in tmp_path.iterdir())
    bad = _cli(broken, "-o", tmp_path / "y", "--backend", "ort")
    assert bad.returncode == 2 and "does not match its manifest hash" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temp dir


def test_onnx_only_refuses_a_target(tiny_model, tmp_path):
    result = CliRunner().invoke(export_main, [str(tiny_model("tiny-a")), "-o", str(tmp_path / "e"), "--onnx-only",
                                              "--backend", "openvino"])
    assert result.exit_code == 2 and "--onnx-only builds no runtime target" in result.output
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(not (ov_backend.available() and ov_backend.cpu_info()["bf16"]),
                    reason="needs OpenVINO on a CPU with bf16")
def test_the_target_step_gates_bf16_against_its_fp32_source_without_torch(engine_copy, tmp_path):
    """bf16 execution is an execution precision: the target step gates it against the source's fp32 engines, with
    torch blocked. Graph precisions are fixed there. (A private copy: the build hard-links the source's files, and
    onnx.load refuses external data with several links, which would break later tests reading the shared engines.)"""
    out = tmp_path / "bf16"
    proc = _cli(engine_copy, "-o", out, "--backend", "openvino", "--precision", "bf16", "--threads", "2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "quality gate of openvino bf16 against fp32" in proc.stdout
    runtime = load_manifest(out).runtime
    assert (runtime["backend"], runtime["precision"]) == ("openvino", "bf16")
    assert runtime["quality_gate"]["passed"] and runtime["quality_gate"]["execution_precision"] == "bf16"
    refused = _cli(engine_copy, "-o", tmp_path / "x", "--precision", "int8")
    assert refused.returncode == 2 and "'int8' is not one of 'auto', 'fp32', 'bf16'" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()
