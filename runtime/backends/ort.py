"""ONNX Runtime backend: one session per engine, inputs validated against the engine's spec before running."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import SoraError
from ..spec import EngineSpec


class OrtEngine:
    """A session over one ONNX model. Call with keyword inputs: `engine(...)` the first output, `.run` all."""

    def __init__(self, path: Path, spec: EngineSpec, threads: int | None = None,
                 providers: list[str] | None = None, arena: bool = True):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # The CPU arena keeps every block it ever grew to; without it large buffers go back to the allocator.
        # For the VAE decoder that is 29% less peak RSS at the same speed (real Wan VAE, 416x240, 9 frames:
        # 4951 MB against 6964 MB, 59.7 s against 62.7 s).
        so.enable_cpu_mem_arena = arena
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise SoraError(f"ONNX Runtime could not load {path.name}: {str(e).splitlines()[0]}") from None
        self.spec = spec

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        self.spec.bind(feeds)
        return self.session.run([self.spec.output_names[0]], feeds)[0]

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        """Every output, in spec order."""
        self.spec.bind(feeds)
        return self.session.run(self.spec.output_names, feeds)
