"""The one DiT-step timer: what the target choice, the TensorRT build and the benches measure a backend by.

A step is one DiT call with the CFG batch of 2 at the engine's tuning shape, capped near MAX_TIMING_TOKENS tokens,
timed after two warm-ups (a CUDA graph is captured in them) at least `repeats` times and until MIN_TIMING_S of
steps were measured (at most MAX_REPEATS): a small model's 1-2 ms step is decided by its median over many calls,
not by three samples of scheduler noise. Torch-free.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..runtime.manifest import Manifest, load_manifest
from ..runtime.memory import PeakDevice
from ..runtime.pipeline import Pipeline

MAX_TIMING_TOKENS = 2048
MIN_TIMING_S = 0.2
MAX_REPEATS = 200


def _timing_sizes(spec, patch) -> dict[str, int]:
    sizes = spec.sizes("opt")
    while sizes["f"] * sizes["h"] * sizes["w"] // (patch[1] * patch[2]) > MAX_TIMING_TOKENS:
        if sizes["f"] > 1:
            sizes["f"] = (sizes["f"] + 1) // 2
        else:
            sizes["h"] = max(patch[1], sizes["h"] // 2 // patch[1] * patch[1])
            sizes["w"] = max(patch[2], sizes["w"] // 2 // patch[2] * patch[2])
    return sizes


def time_dit_step(engine_dir: Path | Manifest, backend: str, precision: str, threads: int | None, repeats: int = 3,
                  cuda_graph: bool = False) -> dict:
    """Median seconds of one DiT call (CFG batch of 2) after two warm-ups (a CUDA graph is captured in them), over
    at least `repeats` calls and MIN_TIMING_S of them; the load time, and the peak GPU memory where a GPU backend
    runs."""
    t0 = time.perf_counter()
    manifest = engine_dir if isinstance(engine_dir, Manifest) else load_manifest(engine_dir, verify=False)
    with PeakDevice() as dev:
        pipe = Pipeline(manifest, threads=threads, backend=backend, precision=precision, cuda_graph=cuda_graph)
        denoiser = pipe.dit()  # opens (and on OpenVINO compiles) the DiT engine
        load_s = time.perf_counter() - t0
        spec = denoiser.engine.spec
        sizes = _timing_sizes(spec, pipe.config["patch_size"])
        feeds = spec.sample_inputs(seed=0, **sizes)
        times = []
        for i in range(MAX_REPEATS + 2):
            if len(times) >= repeats and sum(times) >= MIN_TIMING_S:
                break
            t0 = time.perf_counter()
            denoiser(feeds["hidden_states"], feeds["timestep"], feeds["encoder_hidden_states"])
            if i >= 2:
                times.append(time.perf_counter() - t0)
    tokens = sizes["f"] * sizes["h"] * sizes["w"] // (pipe.config["patch_size"][1] * pipe.config["patch_size"][2])
    return {"step_s": float(np.median(times)), "repeats": len(times), "load_s": load_s, "sizes": sizes,
            "tokens": tokens, "device_peak_mb": dev.peak_mb}
