"""Build the runtime target of an engine directory: pick the CPU backend by measurement, or record the GPU.

`build_runtime` returns the manifest's `runtime` and `gpu` sections. On a CPU target, `choose_runtime` times one
DiT step (CFG batch of 2 at the engine's tuning shape, capped near 2K tokens) on each available backend and records
the timings, the CPU and the winner; for ONNX Runtime it also times the DiT rewritten with ONNX Runtime's
MultiHeadAttention (its CPU flash attention) and keeps that graph beside the portable one when faster. On
`ort-cuda`, `gpu_runtime` records this machine's GPU and library versions (runtime/gpu_target.py) and times the DiT
step with and without CUDA graphs. With execution precision `auto` (the default), OpenVINO's bf16 execution is a
candidate too where the CPU has bf16, chosen when its step is at least BF16_MIN_SPEEDUP times faster than the
fastest fp32 candidate's (timing noise is not worth bf16's error). Reduced precision (bf16 execution,
fp16/int8 graphs) is then checked by the quality gate on the chosen target (target/gated_choice.py), which falls
back to the fastest fp32 candidate when an `auto` choice of bf16 fails it. Torch-free: it also runs in the second
step of the two-step path (target/build.py), on the device.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

from ..runtime import gpu_target
from ..runtime.backends import openvino as ov_backend
from ..runtime.errors import SoraError
from ..runtime.machine import cpu_name
from ..runtime.manifest import load_manifest
from .timing import time_dit_step

CPU_BACKENDS = ("auto", "ort", "openvino")

BF16_MIN_SPEEDUP = 1.1  # `auto`: what bf16 execution must gain over the fastest fp32 step to be chosen
ORT_CPU_DIT = "transformer.ort-cpu.onnx"  # the DiT graph ONNX Runtime's CPU provider runs, where faster


# OpenVINO reads ONNX Runtime's MatMulNBits (the weight-only text encoder) since before 2026.4: checked with 2026.4
# on the tiny export (embedding cosine against fp32: int8 0.99981, int4 0.98705; ONNX Runtime: 0.99995, 0.98775).
# Older versions are not checked and not trusted with it.
OPENVINO_READS_MATMULNBITS = (2026, 4)


def openvino_unsupported(precision: dict[str, str]) -> str | None:
    """Why engines at this per-component precision cannot run on this machine's OpenVINO, or None."""
    if precision.get("text_encoder") in ("int8", "int4") and ov_backend.available():
        version = ov_backend.version()
        if version < OPENVINO_READS_MATMULNBITS:
            return (f"the weight-only text encoder (ONNX Runtime's MatMulNBits) is checked on OpenVINO "
                    f"{'.'.join(map(str, OPENVINO_READS_MATMULNBITS))} and later, this is "
                    f"{'.'.join(map(str, version))}")
    return None


def cpu_only(precision: dict[str, str]) -> str | None:
    """Why engines at this per-component precision are for a CPU target only, or None."""
    if precision.get("transformer") == "int8-dynamic":
        return ("the int8-dynamic DiT is a CPU precision (OpenVINO's CPU plugin quantizes its activations at run "
                "time); for a GPU use --dit-precision int8 (Q/DQ) or fp16")
    return None


def require_gpu(backend: str) -> None:
    """Refuse a GPU target on a machine that cannot build it, before any export work."""
    if backend == "tensorrt":
        from .trt_target import require_tensorrt

        require_tensorrt()
        return
    why = gpu_target.missing(gpu_target.target(), backend)
    if why:
        raise SoraError(f"--backend {backend} builds engines for this machine's GPU, but {why}; export portable ONNX "
                        f"here with --onnx-only, then on the GPU machine: sora-build ONNX_DIR -o ENGINE_DIR "
                        f"--backend {backend}")


def gpu_runtime(engine_dir: Path, backend: str, threads: int | None, log: Callable[[str], None]) -> tuple[dict, dict]:
    """(runtime, gpu) sections for a GPU target: the GPU record, and the DiT step with and without CUDA graphs."""
    require_gpu(backend)
    gpu = {"backend": backend, **gpu_target.target()}
    manifest = load_manifest(engine_dir, verify=False)
    manifest.data["gpu"] = gpu  # in memory: the timing pipeline checks the record like sora-run will
    timings = {}
    for graph in (False, True):
        key = f"{backend}{'-cuda-graph' if graph else ''}"
        timings[key] = time_dit_step(manifest, backend, "fp32", threads, cuda_graph=graph)
        log(f"  DiT step on {gpu['name']}{' with a CUDA graph' if graph else ''}: "
            f"{timings[key]['step_s'] * 1000:.1f} ms ({timings[key]['tokens']} tokens, CFG batch 2, peak device "
            f"memory {timings[key]['device_peak_mb'] or 0:.0f} MB)")
    log(f"  runtime: {backend} on {gpu['name']} (compute capability {gpu['compute_capability']}, onnxruntime "
        f"{gpu['onnxruntime']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}, driver {gpu['driver']})")
    return {"backend": backend, "precision": "fp32", "timings": timings, "threads": threads}, gpu


def build_runtime(engine_dir: Path, backend: str, precision: str, threads: int | None, log: Callable[[str], None],
                  openvino_unsupported: str | None = None, trt=None) -> tuple[dict, dict | None, dict]:
    """The manifest's (runtime, gpu) sections for `backend` (a GPU target, or the CPU backend chosen here) and the
    additions to its engine entries (TensorRT's plan files, ONNX Runtime's CPU graph of the DiT). `trt`:
    target/trt_target.TrtOptions."""
    if backend == "tensorrt":
        from .trt_target import TrtOptions, trt_runtime

        return trt_runtime(engine_dir, trt or TrtOptions(), threads, log)
    if backend in gpu_target.GPU_BACKENDS:
        return (*gpu_runtime(engine_dir, backend, threads, log), {})
    runtime, added = choose_runtime(engine_dir, backend, precision, threads, log, openvino_unsupported)
    return runtime, None, added


def check_request(backend: str, precision: str, openvino_unsupported: str | None = None,
                  cpu_only: str | None = None) -> list[tuple[str, str]]:
    """Refuse an impossible backend/precision request (before any export work); returns the (backend, precision)
    pairs worth timing. `cpu_only`: why the engines are for a CPU target only (see `cpu_only`)."""
    if backend in gpu_target.GPU_BACKENDS:
        if cpu_only:
            raise SoraError(f"--backend {backend}: {cpu_only}")
        if precision not in ("fp32", "auto"):  # a GPU target runs the precision its graphs carry
            raise SoraError(f"{precision} execution is OpenVINO's on the CPU; --backend {backend} runs the precision "
                            f"the graphs carry (--precision fp16 or int8)")
        require_gpu(backend)
        return [(backend, "fp32")]
    if precision == "bf16" and backend == "ort":
        raise SoraError("bf16 runs on OpenVINO here; ONNX Runtime engines are fp32: drop --backend ort or use fp32")
    if openvino_unsupported and (backend == "openvino" or precision == "bf16"):
        raise SoraError(f"these engines cannot run on OpenVINO: {openvino_unsupported}")
    candidates = [("ort", "fp32")]
    if ov_backend.available() and not openvino_unsupported:
        candidates.append(("openvino", "fp32"))
        has_bf16 = ov_backend.cpu_info()["bf16"]
        if precision == "bf16" and not has_bf16:
            raise SoraError("this CPU has no bf16 support: use --precision fp32 or auto")
        if precision == "bf16" or (precision == "auto" and backend != "ort" and has_bf16):
            candidates.append(("openvino", "bf16"))
    elif backend == "openvino" or precision == "bf16":
        raise SoraError("--backend openvino / --precision bf16 need OpenVINO: pip install openvino")
    return candidates


def choose_runtime(engine_dir: Path, backend: str, precision: str, threads: int | None,
                   log: Callable[[str], None], openvino_unsupported: str | None = None) -> tuple[dict, dict]:
    """Measure and decide; returns the manifest's `runtime` section and the additions to its engine entries (ONNX
    Runtime's CPU graph of the DiT, where it was faster). `openvino_unsupported` says why the engines cannot run on
    OpenVINO, which takes it out of the running."""
    candidates = check_request(backend, precision, openvino_unsupported)
    timings, added, ort_attention = {}, {}, None
    for b, p in candidates:
        timings[f"{b}-{p}"] = time_dit_step(engine_dir, b, p, threads)
        log(f"  DiT step on {b} {p}: {_ms(timings[f'{b}-{p}']['step_s'])} "
            f"({timings[f'{b}-{p}']['tokens']} tokens, CFG batch 2)")
        if b == "ort":
            added, ort_attention = ort_cpu_graph(engine_dir, threads, timings, log)
    runtime = {"timings": timings, "threads": threads, "machine": platform.machine(), "cpu": cpu_name(),
               "ort_attention": ort_attention}
    if openvino_unsupported:
        runtime["openvino_skipped"] = openvino_unsupported
    if ov_backend.available():
        info = ov_backend.cpu_info()
        runtime["cpu"], runtime["openvino"] = info["cpu"], info["openvino"]
    # what the request leaves open (backend auto, precision auto), decided by the timings
    runtime["candidates"] = [list(c) for c in candidates if backend in ("auto", c[0]) and precision in ("auto", c[1])]
    runtime["asked"] = {"backend": backend, "precision": precision}
    if precision == "auto":
        runtime["bf16_min_speedup"] = BF16_MIN_SPEEDUP
    runtime["backend"], runtime["precision"] = choose([tuple(c) for c in runtime["candidates"]], steps_of(runtime))
    why = "fastest measured" if len(runtime["candidates"]) > 1 else "asked for"
    if runtime["precision"] == "bf16" and precision == "auto":
        why = f"at least {BF16_MIN_SPEEDUP}x the fastest fp32 step"
    log(f"  runtime: {runtime['backend']} {runtime['precision']} ({why})")
    return runtime, added


def choose(candidates: list[tuple[str, str]], step_s: dict[tuple[str, str], float],
           rejected: frozenset[tuple[str, str]] = frozenset()) -> tuple[str, str]:
    """The rule, in one place: among the (backend, execution precision) candidates the quality gate has not
    rejected, the fastest fp32 one, unless a bf16 one's DiT step is at least BF16_MIN_SPEEDUP times faster (timing
    noise is not worth bf16's error) or bf16 is all there is. `step_s`: each candidate's measured step. Pure: the
    target build measures, this decides, the gate's rejection decides again (target/gated_choice.py)."""
    left = [c for c in candidates if c not in rejected]
    if not left:
        raise SoraError(f"every candidate was rejected: {', '.join(f'{b} {p}' for b, p in candidates)}")
    exact = [c for c in left if c[1] == "fp32"]
    bf16 = [c for c in left if c[1] == "bf16"]
    if not exact:
        return min(bf16, key=step_s.__getitem__)
    best = min(exact, key=step_s.__getitem__)
    if bf16:
        quick = min(bf16, key=step_s.__getitem__)
        if step_s[quick] * BF16_MIN_SPEEDUP <= step_s[best]:
            return quick
    return best


def steps_of(runtime: dict) -> dict[tuple[str, str], float]:
    """{(backend, precision): DiT step seconds} from a manifest runtime section's timings."""
    return {tuple(c): runtime["timings"][f"{c[0]}-{c[1]}"]["step_s"] for c in runtime["candidates"]}


def _ms(seconds: float) -> str:
    """A step time for the log: whole milliseconds, two decimals below 10 ms (a tiny model's step is under 1 ms)."""
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms"


def ort_cpu_graph(engine_dir: Path, threads: int | None, timings: dict,
                  log: Callable[[str], None]) -> tuple[dict, dict]:
    """Write ONNX Runtime's CPU graph of the DiT (the attentions as MultiHeadAttention, which runs MLAS's flash
    attention: target/attention_rewrite.py) beside the portable one, sharing its weights, and keep it if its step is
    faster than timings["ort-fp32"] (which then becomes its time). Returns the engine entry additions ({} when not
    kept; the file is then removed) and the record of both timings for the manifest."""
    from .attention_rewrite import rewrite_file

    manifest = load_manifest(engine_dir, verify=False)
    src = manifest.engine_path("transformer")
    dst = src.with_name(ORT_CPU_DIT)
    record = {"onnx_attention_step_s": timings["ort-fp32"]["step_s"]}
    if not rewrite_file(src, dst).replaced:
        dst.unlink(missing_ok=True)
        return {}, {**record, "graph": "Attention", "why": "no attention matched the rewrite"}
    manifest.data["engines"]["transformer"]["ort_cpu_file"] = dst.name  # in memory: the timing pipeline opens it
    mha = time_dit_step(manifest, "ort", "fp32", threads)
    record["multihead_attention_step_s"] = mha["step_s"]
    log(f"  DiT step on ort fp32 with MultiHeadAttention: {_ms(mha['step_s'])}")
    if mha["step_s"] >= timings["ort-fp32"]["step_s"]:
        dst.unlink()
        return {}, {**record, "graph": "Attention"}
    timings["ort-fp32"] = mha
    return {"transformer": {"ort_cpu_file": dst.name}}, {**record, "graph": "MultiHeadAttention"}
