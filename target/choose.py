"""Build the runtime target of an engine directory: pick the CPU backend by measurement, or record the GPU.

`build_runtime` returns the manifest with its `runtime` and `gpu` sections (and the files the target adds). On a CPU target, `choose_runtime` times one
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
from ..runtime.choices import AUTO, GPU_BACKENDS, Backend, Execution, Graph, Target
from ..runtime.errors import SoraError
from ..runtime.machine import cpu_name
from ..runtime.manifest import Manifest
from ..runtime.memory import available_bytes
from ..precision.convert import RUN_FRACTION, runs_in
from .timing import time_dit_step

BF16_MIN_SPEEDUP = 1.1  # `auto`: what bf16 execution must gain over the fastest fp32 step to be chosen
ORT_CPU_SUFFIX = ".ort-cpu.onnx"  # the DiT graph ONNX Runtime's CPU provider runs, where faster: one per expert
ORT_CPU_DIT = "transformer" + ORT_CPU_SUFFIX
DIT_EXPERTS = ("transformer", "transformer_2")  # Wan2.2 A14B's second expert, where there is one


# OpenVINO reads ONNX Runtime's MatMulNBits (the weight-only text encoder) since before 2026.4: checked with 2026.4
# on the tiny export (embedding cosine against fp32: int8 0.99981, int4 0.98705; ONNX Runtime: 0.99995, 0.98775).
# Older versions are not checked and not trusted with it.
OPENVINO_READS_MATMULNBITS = (2026, 4)

# The peak host memory of OpenVINO compiling the DiT, per byte of its weights: measured inside sora-export on the
# real Wan2.1-T2V-1.3B layout's 5.7 GB DiT (bench/results/real_export_*: 18.6 GB in fp32, 22.8 GB in bf16).
# ONNX Runtime maps the weights and needs about their size; it is always timed.
OPENVINO_COMPILE_MEMORY = {Execution.FP32: 3.3, Execution.BF16: 4.0}


def openvino_unsupported(precision: dict[str, str]) -> str | None:
    """Why engines at this per-component precision cannot run on this machine's OpenVINO, or None."""
    if precision.get("text_encoder") in (Graph.INT8, Graph.INT4) and ov_backend.available():
        version = ov_backend.version()
        if version < OPENVINO_READS_MATMULNBITS:
            return (f"the weight-only text encoder (ONNX Runtime's MatMulNBits) is checked on OpenVINO "
                    f"{'.'.join(map(str, OPENVINO_READS_MATMULNBITS))} and later, this is "
                    f"{'.'.join(map(str, version))}")
    return None


def cpu_only(precision: dict[str, str]) -> str | None:
    """Why engines at this per-component precision are for a CPU target only, or None."""
    if precision.get("transformer") == Graph.INT8_DYNAMIC:
        return ("the int8-dynamic DiT is a CPU precision (OpenVINO's CPU plugin quantizes its activations at run "
                "time); for a GPU use --dit-precision int8 (Q/DQ) or fp16")
    return None


def require_gpu(backend: str) -> None:
    """Refuse a GPU target on a machine that cannot build it, before any export work."""
    if backend == Backend.TENSORRT:
        from .trt_target import require_tensorrt

        require_tensorrt()
        return
    why = gpu_target.missing(gpu_target.target(), backend)
    if why:
        raise SoraError(f"--backend {backend} builds engines for this machine's GPU, but {why}; export portable ONNX "
                        f"here with --onnx-only, then on the GPU machine: sora-build ONNX_DIR -o ENGINE_DIR "
                        f"--backend {backend}")


def gpu_runtime(manifest: Manifest, backend: str, threads: int | None, log: Callable[[str], None]) -> Manifest:
    """`manifest` for a GPU target: the GPU record, and the DiT step with and without CUDA graphs."""
    require_gpu(backend)
    gpu = {"backend": backend, **gpu_target.target()}
    manifest = manifest.updated(gpu=gpu)  # the timing pipeline checks the record like sora-run will
    timings = {}
    for graph in (False, True):
        key = f"{backend}{'-cuda-graph' if graph else ''}"
        timings[key] = time_dit_step(manifest, backend, Execution.FP32, threads, cuda_graph=graph)
        log(f"  DiT step on {gpu['name']}{' with a CUDA graph' if graph else ''}: "
            f"{timings[key]['step_s'] * 1000:.1f} ms ({timings[key]['tokens']} tokens, CFG batch 2, peak device "
            f"memory {timings[key]['device_peak_mb'] or 0:.0f} MB)")
    log(f"  runtime: {backend} on {gpu['name']} (compute capability {gpu['compute_capability']}, onnxruntime "
        f"{gpu['onnxruntime']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}, driver {gpu['driver']})")
    return manifest.updated(runtime={"backend": backend, "precision": Execution.FP32, "timings": timings,
                                     "threads": threads})


def build_runtime(manifest: Manifest, backend: str, precision: str, threads: int | None, log: Callable[[str], None],
                  openvino_unsupported: str | None = None, trt=None) -> Manifest:
    """`manifest` (an engine directory being built) with the runtime and gpu sections for `backend` (a GPU target,
    or the CPU backend chosen here) and what the target adds to its engines (TensorRT's plan files, ONNX Runtime's
    CPU graph of the DiT), hashed. `trt`: target/trt_target.TrtOptions."""
    if backend == Backend.TENSORRT:
        from .trt_target import TrtOptions, trt_runtime

        return trt_runtime(manifest, trt or TrtOptions(), threads, log)
    if backend in GPU_BACKENDS:
        return gpu_runtime(manifest, backend, threads, log)
    return choose_runtime(manifest, backend, precision, threads, log, openvino_unsupported)


def check_request(backend: str, precision: str, openvino_unsupported: str | None = None,
                  cpu_only: str | None = None) -> list[Target]:
    """Refuse an impossible backend/precision request (before any export work); returns the targets worth timing.
    `cpu_only`: why the engines are for a CPU target only (see `cpu_only`)."""
    if backend in GPU_BACKENDS:
        if cpu_only:
            raise SoraError(f"--backend {backend}: {cpu_only}")
        if precision not in (Execution.FP32, AUTO):  # a GPU target runs the precision its graphs carry
            raise SoraError(f"{precision} execution is OpenVINO's on the CPU; --backend {backend} runs the precision "
                            f"the graphs carry (--precision fp16 or int8)")
        require_gpu(backend)
        return [Target.of(backend, Execution.FP32)]
    if precision == Execution.BF16 and backend == Backend.ORT:
        raise SoraError("bf16 runs on OpenVINO here; ONNX Runtime engines are fp32: drop --backend ort or use fp32")
    if openvino_unsupported and (backend == Backend.OPENVINO or precision == Execution.BF16):
        raise SoraError(f"these engines cannot run on OpenVINO: {openvino_unsupported}")
    candidates = [Target(Backend.ORT, Execution.FP32)]
    if ov_backend.available() and not openvino_unsupported:
        candidates.append(Target(Backend.OPENVINO, Execution.FP32))
        has_bf16 = ov_backend.cpu_info()["bf16"]
        if precision == Execution.BF16 and not has_bf16:
            raise SoraError("this CPU has no bf16 support: use --precision fp32 or auto")
        if precision == Execution.BF16 or (precision == AUTO and backend != Backend.ORT and has_bf16):
            candidates.append(Target(Backend.OPENVINO, Execution.BF16))
    elif backend == Backend.OPENVINO or precision == Execution.BF16:
        raise SoraError("--backend openvino / --precision bf16 need OpenVINO: pip install openvino")
    return candidates


def choose_runtime(manifest: Manifest, backend: str, precision: str, threads: int | None,
                   log: Callable[[str], None], openvino_unsupported: str | None = None) -> Manifest:
    """Measure and decide; returns `manifest` with its `runtime` section (and ONNX Runtime's CPU graph of the DiT,
    where it was faster). `openvino_unsupported` says why the engines cannot run on OpenVINO, which takes it out of
    the running."""
    candidates, too_large = fit_candidates(check_request(backend, precision, openvino_unsupported),
                                           dit_weight_bytes(manifest), available_bytes())
    def requested(c: Target) -> bool:  # what the request leaves open
        return backend in (AUTO, c.backend) and precision in (AUTO, c.precision)

    asked = [c for c in too_large if requested(c)]
    if asked and not any(requested(c) for c in candidates):
        raise SoraError(f"{asked[0]}: {too_large[asked[0]]}")
    for c, why in too_large.items():
        log(f"  {c} is not timed: {why}")
    timings, ort_attention = {}, None
    for c in candidates:
        timings[c.key] = time_dit_step(manifest, c.backend, c.precision, threads)
        log(f"  DiT step on {c}: {_ms(timings[c.key]['step_s'])} ({timings[c.key]['tokens']} tokens, CFG batch 2)")
        if c.backend == Backend.ORT:
            manifest, ort_attention = ort_cpu_graph(manifest, threads, timings, log)
    runtime = {"timings": timings, "threads": threads, "machine": platform.machine(), "cpu": cpu_name(),
               "ort_attention": ort_attention}
    if openvino_unsupported:
        runtime["openvino_skipped"] = openvino_unsupported
    if too_large:
        runtime["not_timed"] = {c.key: why for c, why in too_large.items()}
    if ov_backend.available():
        info = ov_backend.cpu_info()
        runtime["cpu"], runtime["openvino"] = info["cpu"], info["openvino"]
    # what the request leaves open (backend auto, precision auto), decided by the timings
    left = [c for c in candidates if requested(c)]
    runtime["candidates"] = [[c.backend, c.precision] for c in left]
    runtime["asked"] = {"backend": backend, "precision": precision}
    if precision == AUTO:
        runtime["bf16_min_speedup"] = BF16_MIN_SPEEDUP
    chosen = choose(left, steps_of(runtime))
    runtime["backend"], runtime["precision"] = chosen.backend, chosen.precision
    why = ("fastest measured" if len(left) > 1 else
           "the only candidate whose compile fits this machine's memory" if too_large else "asked for")
    if chosen.precision == Execution.BF16 and precision == AUTO:
        why = f"at least {BF16_MIN_SPEEDUP}x the fastest fp32 step"
    log(f"  runtime: {chosen} ({why})")
    return manifest.updated(runtime=runtime)


def graph_bytes(path: Path) -> int:
    """An ONNX graph and its external data, in bytes: about what a session of it holds."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())


def dit_weight_bytes(manifest: Manifest) -> int:
    """The DiT's ONNX graph and its external data, in bytes."""
    return graph_bytes(manifest.engine_path("transformer"))


def fit_candidates(candidates: list[Target], weight_bytes: int,
                   available: int | None) -> tuple[list[Target], dict[Target, str]]:
    """The candidates whose DiT compiles within `available` bytes (None: unknown, all of them), by the rule every
    component runs by (precision/convert.py's `runs_in`), and why each other one does not (OPENVINO_COMPILE_MEMORY)."""
    kept, too_large = [], {}
    for c in candidates:
        need = OPENVINO_COMPILE_MEMORY[c.precision] * weight_bytes if c.backend == Backend.OPENVINO else 0
        if not runs_in(need, available):
            too_large[c] = (f"compiling its {weight_bytes / 2**30:.1f} GiB DiT needs about {need / 2**30:.1f} GiB, "
                            f"more than {RUN_FRACTION:.0%} of the {available / 2**30:.1f} GiB available")
        else:
            kept.append(c)
    return kept, too_large


def choose(candidates: list[Target], step_s: dict[Target, float], rejected: frozenset[Target] = frozenset()) -> Target:
    """The rule, in one place: among the candidates the quality gate has not rejected, the fastest fp32 one, unless
    a bf16 one's DiT step is at least BF16_MIN_SPEEDUP times faster (timing noise is not worth bf16's error) or bf16
    is all there is. `step_s`: each candidate's measured step. Pure: the target build measures, this decides, the
    gate's rejection decides again (target/gated_choice.py)."""
    left = [c for c in candidates if c not in rejected]
    if not left:
        raise SoraError(f"every candidate was rejected: {', '.join(map(str, candidates))}")
    exact = [c for c in left if c.precision == Execution.FP32]
    bf16 = [c for c in left if c.precision == Execution.BF16]
    if not exact:
        return min(bf16, key=step_s.__getitem__)
    best = min(exact, key=step_s.__getitem__)
    if bf16:
        quick = min(bf16, key=step_s.__getitem__)
        if step_s[quick] * BF16_MIN_SPEEDUP <= step_s[best]:
            return quick
    return best


def candidates_of(runtime: dict) -> list[Target]:
    """The candidates a manifest runtime section records."""
    return [Target.of(*c) for c in runtime["candidates"]]


def steps_of(runtime: dict) -> dict[Target, float]:
    """{candidate: DiT step seconds} from a manifest runtime section's timings."""
    return {c: runtime["timings"][c.key]["step_s"] for c in candidates_of(runtime)}


def _ms(seconds: float) -> str:
    """A step time for the log: whole milliseconds, two decimals below 10 ms (a tiny model's step is under 1 ms)."""
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms"


def ort_cpu_graph(manifest: Manifest, threads: int | None, timings: dict,
                  log: Callable[[str], None]) -> tuple[Manifest, dict]:
    """Write ONNX Runtime's CPU graph of the DiT (the attentions as MultiHeadAttention, which runs MLAS's flash
    attention: target/attention_rewrite.py) beside the portable one, sharing its weights (each expert's, for Wan2.2
    A14B: same architecture, timed on the first), and keep them if the step is faster than timings["ort-fp32"]
    (which then becomes its time). Returns the manifest with them where kept (else `manifest`, and the files are
    removed) and the record of both timings for the manifest."""
    from .attention_rewrite import rewrite_file

    record = {"onnx_attention_step_s": timings["ort-fp32"]["step_s"]}
    written = {}
    for name in (n for n in DIT_EXPERTS if n in manifest.engine_names):
        src = manifest.engine_path(name)
        written[name] = dst = src.with_name(name + ORT_CPU_SUFFIX)
        if not rewrite_file(src, dst).replaced:
            for dst in written.values():
                dst.unlink(missing_ok=True)
            return manifest, {**record, "graph": "Attention", "why": "no attention matched the rewrite"}
    with_mha = manifest.updated(engines={n: {"ort_cpu_file": dst.name} for n, dst in written.items()})
    mha = time_dit_step(with_mha, Backend.ORT, Execution.FP32, threads)
    record["multihead_attention_step_s"] = mha["step_s"]
    log(f"  DiT step on ort fp32 with MultiHeadAttention: {_ms(mha['step_s'])}")
    if mha["step_s"] >= timings["ort-fp32"]["step_s"]:
        for dst in written.values():
            dst.unlink()
        return manifest, {**record, "graph": "Attention"}
    timings["ort-fp32"] = mha
    return with_mha, {**record, "graph": "MultiHeadAttention"}
