"""This machine's dense fp32 matrix-multiply peak, measured with the same libraries the engines use.

Square MatMuls (1024^3 and 2048^3; the best counts) as one-node ONNX models on ONNX Runtime and on OpenVINO (fp32,
and bf16 where the CPU has it), with B an input and with B a constant weight (packed once at load, like the DiT's
linear layers), and as `torch.matmul` (MKL / oneDNN, fp32 and bf16) where PyTorch is installed; median of repeats
after warm-up. The DiT step's achieved FLOP/s is reported as a fraction of the best of these per precision, so a
kernel faster than the engines' own (oneDNN's bf16 GEMM on some CPUs) raises the bar rather than hiding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .harness import time_calls


def _matmul_model(path: Path, n: int, weight: np.ndarray | None = None) -> None:
    """c = a @ b, b an input, or a constant (initializer) when `weight` is given: a linear layer, whose weight the
    libraries pack once at load, as the DiT's are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    inputs, inits = ([a], [numpy_helper.from_array(weight, "b")]) if weight is not None else ([a, b], [])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", inputs, [c], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _time(fn, repeats: int) -> float:
    return time_calls(fn, repeats)[0]["median_s"]


def matmul_peak(threads: int, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10) -> dict[str, float]:
    """Best GFLOP/s over square MatMul sizes, per library (and OpenVINO bf16 where available)."""
    best: dict[str, float] = {}
    for n in sizes:
        for k, v in _matmul_peak_at(threads, n, repeats).items():
            best[k] = max(best.get(k, 0.0), v)
    return best


def _matmul_peak_at(threads: int, n: int, repeats: int) -> dict[str, float]:
    import onnxruntime as ort

    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    out: dict[str, float] = {}

    def keep_best(key: str, gflops: float) -> None:
        out[key] = max(out.get(key, 0.0), gflops)

    try:
        import openvino as ov
        core = ov.Core()
    except ImportError:
        core = None
    has_bf16 = core is not None and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with tempfile.TemporaryDirectory() as tmp:
        for constant in (False, True):
            path = Path(tmp) / f"mm-{constant}.onnx"
            _matmul_model(path, n, feeds["b"] if constant else None)
            run_feeds = {"a": feeds["a"]} if constant else feeds
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            keep_best("ort_fp32", flops / _time(lambda: sess.run(None, run_feeds), repeats) / 1e9)
            if core is None:
                continue
            for prec, hint in (("fp32", "f32"), ("bf16", "bf16")):
                if prec == "bf16" and not has_bf16:
                    continue
                cm = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                           "INFERENCE_NUM_THREADS": threads})
                req = cm.create_infer_request()
                keep_best(f"openvino_{prec}", flops / _time(lambda: req.infer(run_feeds), repeats) / 1e9)
    out.update(_torch_peak_at(threads, feeds, flops, repeats, has_bf16))
    return out


def _torch_peak_at(threads: int, feeds: dict[str, np.ndarray], flops: float, repeats: int,
                   bf16: bool) -> dict[str, float]:
    """torch.matmul of the same operands, fp32 and, where OpenVINO reports the CPU has it, bf16; nothing without
    PyTorch."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    out = {}
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:2 if bf16 else 1]:
        a, b = (torch.from_numpy(feeds[k]).to(dtype) for k in ("a", "b"))
        out[f"torch_{prec}"] = flops / _time(lambda: torch.matmul(a, b), repeats) / 1e9
    return out


def best_peak(peak: dict[str, float], precision: str) -> float | None:
    """The best measured GFLOP/s of a precision ("fp32", "bf16") over the libraries, None where none measured it."""
    values = [v for k, v in peak.items() if k.endswith(precision)]
    return max(values) if values else None
