"""The "built for this GPU" contract (runtime/gpu_target.py): what counts as a mismatch, and the refusals users see
from sora-run and sora-export on a machine that cannot run or build the GPU target (this one: no GPU)."""

import json

import pytest
from click.testing import CliRunner

from soraedge.cli.export_cmd import main as export_main
from soraedge.cli.run_cmd import main as run_main
from soraedge.runtime.errors import SoraError
from soraedge.runtime.gpu_target import check_target, mismatches, target

H100 = {"backend": "ort-cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_mb": 81559,
        "driver": "580.65.06", "driver_cuda": "13.0", "cuda_provider": True, "onnxruntime": "1.31.0", "cuda": "13.0",
        "cudnn": "9.13"}


def here(**changes):
    return {**H100, **changes}


@pytest.mark.parametrize("changes, expect", [
    ({}, None),
    ({"name": "NVIDIA H100 PCIe", "memory_mb": 81000}, None),  # same architecture, another board: allowed
    ({"onnxruntime": "1.31.2", "driver": "590.1"}, None),  # patch releases and a newer driver: allowed
    ({"name": "NVIDIA L4", "compute_capability": "8.9"}, "this GPU is NVIDIA L4 (compute capability 8.9)"),
    ({"onnxruntime": "1.32.0"}, "onnxruntime here is 1.32.0, built with 1.31.0"),
    ({"cuda": "12.8", "driver_cuda": "12.8"}, "CUDA 12.8, built with 13.0"),
    ({"cudnn": "8.9"}, "cuDNN 8.9, built with 9.13"),
    ({"driver_cuda": "12.9"}, "the driver supports CUDA up to 12.9, onnxruntime needs 13.0"),
    ({"cuda": "13.1", "driver_cuda": "13.0"}, None),  # CUDA minor-version compatibility (a 13.1 wheel, 13.0 driver)
    ({"name": None, "compute_capability": None}, "no CUDA GPU is visible here"),
    ({"cuda_provider": False}, "has no CUDA provider"),
])
def test_mismatches(changes, expect):
    got = mismatches(H100, here(**changes))
    if expect is None:
        assert got == []
    else:
        assert len(got) == 1 and expect in got[0], got


def test_refusal_names_the_build_and_the_rebuild_command():
    with pytest.raises(SoraError) as e:
        check_target(H100, "ort-cuda", "engines/wan", current=here(name="NVIDIA L4", compute_capability="8.9"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0, onnxruntime 1.31.0, CUDA 13.0)" in msg
    assert "rebuild it here with: sora-build engines/wan -o engines/wan --backend ort-cuda --overwrite" in msg
    assert "--backend ort" in msg  # the CPU way out
    check_target(H100, "ort-cuda", "engines/wan", current=here())  # the same machine passes


def test_portable_directory_is_not_a_gpu_build():
    with pytest.raises(SoraError, match="is portable ONNX, not built for ort-cuda: build it with: sora-build e -o e "
                                        "--backend ort-cuda --overwrite"):
        check_target(None, "ort-cuda", "e", current=here())


def _run_fails(args, *expect):
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, result.output
    for e in expect:
        assert e in line[0], line[0]


@pytest.mark.skipif(target()["name"] is not None, reason="checks the refusal on a machine without a GPU")
def test_sora_run_refuses_a_gpu_build_here_and_the_cpu_still_runs_it(engine_copy, tmp_path):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["runtime"] = {"backend": "ort-cuda", "precision": "fp32"}
    manifest["gpu"] = H100
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))  # not a hashed file: still a valid directory
    out = tmp_path / "v.npy"
    _run_fails(["--engines", str(engine_copy), "--prompt", "a cat", "-o", str(out)],
               "was built for NVIDIA H100 80GB HBM3", "no CUDA GPU is visible here", "--backend ort")
    assert not out.exists()
    result = CliRunner().invoke(run_main, ["--engines", str(engine_copy), "--prompt", "a cat", "--steps", "2",
                                           "--backend", "ort", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


@pytest.mark.skipif(target()["name"] is not None, reason="checks the refusal on a machine without a GPU")
def test_tensorrt_plans_are_refused_here_with_the_reason(engine_copy, tmp_path):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["runtime"] = {"backend": "tensorrt", "precision": "fp32"}
    manifest["gpu"] = {**H100, "backend": "tensorrt", "tensorrt": "10.14.1"}
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    _run_fails(["--engines", str(engine_copy), "--prompt", "a cat", "-o", str(tmp_path / "v.npy")],
               "(compute capability 9.0, TensorRT 10.14.1)", "no CUDA GPU is visible here", "--backend ort")


@pytest.mark.skipif(target()["name"] is not None, reason="checks the refusal on a machine without a GPU")
def test_ort_cuda_on_portable_engines_is_refused(engine_copy, tmp_path):
    _run_fails(["--engines", str(engine_copy), "--prompt", "a cat", "--backend", "ort-cuda", "-o",
                str(tmp_path / "v.npy")], "is portable ONNX, not built for ort-cuda", "no CUDA GPU")


@pytest.mark.skipif(target()["name"] is not None, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt", "tensorrt"])
def test_export_for_a_gpu_without_one_is_refused_before_any_work(tiny_model, tmp_path, backend):
    result = CliRunner().invoke(export_main, [str(tiny_model("tiny-a")), "-o", str(tmp_path / "e"), "--backend",
                                              backend])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU is visible here" in result.output and "--onnx-only" in result.output
    assert not (tmp_path / "e").exists() and [p.name for p in tmp_path.iterdir()] == []
