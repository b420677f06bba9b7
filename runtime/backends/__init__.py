"""Backends: each runs one engine format beneath the sampler's small interfaces.

An engine is a callable `engine(**inputs) -> first output` with a `.spec` (its EngineSpec); `open_engine` picks the
implementation by backend name. `EngineDenoiser` adapts any DiT engine to the sampler's Denoiser interface, so
there is one sampler loop whatever runs beneath it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SoraError
from ..spec import EngineSpec

BACKENDS = ("ort", "openvino")
PRECISIONS = ("fp32", "bf16")


def open_engine(backend: str, path: Path, spec: EngineSpec, threads: int | None = None, precision: str = "fp32",
                cache_dir: Path | None = None, arena: bool = True):
    """`arena=False` lets ONNX Runtime return large buffers instead of keeping its CPU arena (the VAE decoder)."""
    if backend == "ort":
        if precision != "fp32":
            raise SoraError(f"the ort backend runs these engines in fp32 only (asked for {precision})")
        from .ort import OrtEngine

        return OrtEngine(path, spec, threads, arena=arena)
    if backend == "openvino":
        from .openvino import OvEngine

        return OvEngine(path, spec, threads, precision, cache_dir)
    raise SoraError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")


class EngineDenoiser:
    """The sampler's Denoiser over a transformer engine of any backend. `observe(feeds, output)`, when given, sees
    every call (calibration records the trajectory through it; the quality gate compares steps with it)."""

    def __init__(self, engine, observe: Callable[[dict, np.ndarray], None] | None = None):
        self.engine = engine
        self.observe = observe
        self.max_batch = engine.spec.dim_map["b"].max

    def __call__(self, latents: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        # latents [B, C, F, H, W] float32, timestep [B] float32, context [B, S, D] float32
        feeds = {"hidden_states": latents, "timestep": timestep, "encoder_hidden_states": context}
        out = self.engine(**feeds)
        if self.observe:
            self.observe(feeds, out)
        return out
