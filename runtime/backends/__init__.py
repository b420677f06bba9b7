"""Backends: each runs one engine format beneath the sampler's small interfaces.

An engine is a callable `engine(**inputs) -> first output` with a `.spec` (its EngineSpec); `open_engine` picks the
implementation by backend name: `ort` (ONNX Runtime on the CPU), `openvino` (CPU), `ort-cuda` (ONNX Runtime's CUDA
provider with IO binding and, for the DiT, CUDA graphs: backends/ort_io.py), `ort-trt` (ONNX Runtime's TensorRT
provider, its engine and timing caches in this user's cache) and `tensorrt` (native plans: backends/trt.py).
`EngineDenoiser` adapts any DiT engine to the sampler's Denoiser interface, so there is one sampler loop whatever
runs beneath it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..choices import BACKENDS, LORA_BACKENDS, Backend, Execution
from ..errors import SoraError
from ..spec import EngineSpec


def open_engine(backend: str, path: Path, spec: EngineSpec, threads: int | None = None,
                precision: str = Execution.FP32, cache_dir: Path | None = None, arena: bool = True, cuda_graph: bool = False,
                static_shapes: int = 0, initializers: dict[str, np.ndarray] | None = None):
    """`arena=False` lets ONNX Runtime return large buffers instead of keeping its CPU arena (the VAE decoder).
    `static_shapes=N` has OpenVINO compile per input shape, keeping N (backends/openvino.py says why).
    `cuda_graph` captures and replays the engine per shape on `ort-cuda` (the DiT: same shape every step).
    `initializers` replace the graph's weights of those names (LoRAs applied at load: the CPU backends, and
    TensorRT plans built refittable)."""
    if initializers and backend not in LORA_BACKENDS:
        raise SoraError(f"weights replaced at load (LoRAs) run on {', '.join(LORA_BACKENDS)}, not {backend}")
    if backend != Backend.OPENVINO and precision != Execution.FP32:
        raise SoraError(f"the {backend} backend runs the graphs at the precision they carry; execution precision "
                        f"{precision} is OpenVINO's (fp16/int8 are chosen at export)")
    if backend == Backend.ORT:
        from .ort import OrtEngine

        return OrtEngine(path, spec, threads, arena=arena, initializers=initializers)
    if backend == Backend.ORT_CUDA:
        from .ort_io import OrtIoEngine

        return OrtIoEngine(path, spec, "cuda", threads=threads, cuda_graph=cuda_graph, arena=arena)
    if backend == Backend.ORT_TRT:
        from .ort_io import OrtIoEngine, tensorrt_provider

        return OrtIoEngine(path, spec, "cuda", threads=threads, arena=arena, cuda_graph=cuda_graph,
                           provider=tensorrt_provider(cache_dir, spec, cuda_graph=cuda_graph))
    if backend == Backend.TENSORRT:
        from .trt import TrtEngine

        return TrtEngine(path, spec, cuda_graph=cuda_graph, initializers=initializers)
    if backend == Backend.OPENVINO:
        from .openvino import OvEngine

        return OvEngine(path, spec, threads, precision, cache_dir, static_shapes=static_shapes,
                        initializers=initializers)
    raise SoraError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")


class EngineDenoiser:
    """The sampler's Denoiser over a transformer engine of any backend. `observe(feeds, output)`, when given, sees
    every call (calibration records the trajectory through it; the quality gate compares steps with it)."""

    def __init__(self, engine, observe: Callable[[dict, np.ndarray], None] | None = None, cfg_batch: bool = True):
        self.engine = engine
        self.observe = observe
        # cfg_batch=False runs the two guidance branches as two calls (half the activation memory at batch 1)
        self.max_batch = engine.spec.dim_map["b"].max if cfg_batch else 1

    def __call__(self, latents: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        # latents [B, C, F, H, W] float32, timestep [B] float32, context [B, S, D] float32
        feeds = {"hidden_states": latents, "timestep": timestep, "encoder_hidden_states": context}
        out = self.engine(**feeds)
        if self.observe:
            self.observe(feeds, out)
        return out
