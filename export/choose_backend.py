"""Pick the CPU backend by measurement at export.

`choose_runtime` times one DiT step (CFG batch of 2 at the engine's tuning shape, capped near 2K tokens) on each
available backend and records the timings, the CPU and the winner in the manifest's `runtime` section. Reduced
precision (bf16 execution, fp16/int8 graphs) is then checked by export/quality_gate.py on the chosen backend.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.backends import openvino as ov_backend
from ..runtime.errors import SoraError
from ..runtime.pipeline import Pipeline

MAX_TIMING_TOKENS = 2048


def _timing_sizes(spec, patch) -> dict[str, int]:
    sizes = spec.sizes("opt")
    while sizes["f"] * sizes["h"] * sizes["w"] // (patch[1] * patch[2]) > MAX_TIMING_TOKENS:
        if sizes["f"] > 1:
            sizes["f"] = (sizes["f"] + 1) // 2
        else:
            sizes["h"] = max(patch[1], sizes["h"] // 2 // patch[1] * patch[1])
            sizes["w"] = max(patch[2], sizes["w"] // 2 // patch[2] * patch[2])
    return sizes


def time_dit_step(engine_dir: Path, backend: str, precision: str, threads: int | None, repeats: int = 3) -> dict:
    """Median seconds of one DiT call (CFG batch of 2) after one warm-up, plus the load time."""
    t0 = time.perf_counter()
    pipe = Pipeline.load(engine_dir, threads=threads, verify=False, backend=backend, precision=precision)
    denoiser = pipe.denoiser  # opens (and on OpenVINO compiles) the DiT engine
    load_s = time.perf_counter() - t0
    spec = denoiser.engine.spec
    sizes = _timing_sizes(spec, pipe.config["patch_size"])
    feeds = spec.sample_inputs(seed=0, **sizes)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        denoiser(feeds["hidden_states"], feeds["timestep"], feeds["encoder_hidden_states"])
        if i:
            times.append(time.perf_counter() - t0)
    tokens = sizes["f"] * sizes["h"] * sizes["w"] // (pipe.config["patch_size"][1] * pipe.config["patch_size"][2])
    return {"step_s": float(np.median(times)), "load_s": load_s, "sizes": sizes, "tokens": tokens}


def check_request(backend: str, precision: str, openvino_unsupported: str | None = None) -> list[tuple[str, str]]:
    """Refuse an impossible backend/precision request (before any export work); returns the (backend, precision)
    pairs worth timing."""
    if precision == "bf16" and backend == "ort":
        raise SoraError("bf16 runs on OpenVINO here; ONNX Runtime engines are fp32: drop --backend ort or use fp32")
    if openvino_unsupported and (backend == "openvino" or precision == "bf16"):
        raise SoraError(f"these engines cannot run on OpenVINO: {openvino_unsupported}")
    candidates = [("ort", "fp32")]
    if ov_backend.available() and not openvino_unsupported:
        candidates.append(("openvino", "fp32"))
        if precision == "bf16":
            candidates.append(("openvino", "bf16"))
    elif backend == "openvino" or precision == "bf16":
        raise SoraError("--backend openvino / --precision bf16 need OpenVINO: pip install 'soraedge[openvino]'")
    return candidates


def choose_runtime(engine_dir: Path, backend: str, precision: str, threads: int | None,
                   log: Callable[[str], None], openvino_unsupported: str | None = None) -> dict:
    """Measure and decide; returns the manifest's `runtime` section. `openvino_unsupported` says why the engines
    cannot run on OpenVINO (e.g. ONNX Runtime contrib ops), which takes it out of the running."""
    candidates = check_request(backend, precision, openvino_unsupported)
    timings = {}
    for b, p in candidates:
        timings[f"{b}-{p}"] = time_dit_step(engine_dir, b, p, threads)
        log(f"  DiT step on {b} {p}: {timings[f'{b}-{p}']['step_s'] * 1000:.0f} ms "
            f"({timings[f'{b}-{p}']['tokens']} tokens, CFG batch 2)")
    runtime = {"timings": timings, "threads": threads, "machine": platform.machine(), "cpu": platform.processor()}
    if openvino_unsupported:
        runtime["openvino_skipped"] = openvino_unsupported
    if ov_backend.available():
        info = ov_backend.cpu_info()
        runtime["cpu"], runtime["openvino"] = info["cpu"], info["openvino"]
    if precision == "bf16":
        chosen = ("openvino", "bf16")
    elif backend == "auto":
        chosen = min((c for c in candidates if c[1] == "fp32"), key=lambda c: timings[f"{c[0]}-{c[1]}"]["step_s"])
    else:
        chosen = (backend, "fp32")
    runtime["backend"], runtime["precision"] = chosen
    why = "asked for" if precision == "bf16" or backend != "auto" else "fastest measured"
    log(f"  runtime: {chosen[0]} {chosen[1]} ({why})")
    return runtime
