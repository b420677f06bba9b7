"""The vocabulary of the backend/precision decision, in one place: backends, execution precisions, graph precisions,
and the (backend, execution) pair a target build chooses.

Members are strings (`Backend.ORT == "ort"`), so manifests, CLI choices and JSON results read and write them as
plain text; code compares and builds with the members. export/, precision/, target/, cli/ and bench/ import these
names from here; the rule that picks among them is `target/choose.py`'s `choose`.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class _Name(str, enum.Enum):
    """A string-valued member that prints as its value (as enum.StrEnum does from Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Backend(_Name):
    ORT = "ort"  # ONNX Runtime, CPU
    OPENVINO = "openvino"  # CPU
    ORT_CUDA = "ort-cuda"  # ONNX Runtime's CUDA provider with IO binding and CUDA graphs
    ORT_TRT = "ort-trt"  # ONNX Runtime's TensorRT provider
    TENSORRT = "tensorrt"  # native TensorRT plans

    @property
    def gpu(self) -> bool:
        return self in GPU_BACKENDS


class Execution(_Name):
    """How a backend executes fp32 graphs: as stored, or in bf16 (OpenVINO on a CPU with bf16)."""

    FP32 = "fp32"
    BF16 = "bf16"


class Graph(_Name):
    """The precision a component's ONNX graph carries (precision/convert.py says which component offers which)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # Q/DQ (the DiT, calibrated) or weight-only (the text encoder)
    INT8_DYNAMIC = "int8-dynamic"  # DiT weights int8, activations quantized at run time (CPU)
    INT4 = "int4"  # weight-only (the text encoder)


AUTO = "auto"  # a request that leaves the choice to the target build

BACKENDS = tuple(Backend)
GPU_BACKENDS = (Backend.ORT_CUDA, Backend.ORT_TRT, Backend.TENSORRT)
CPU_BACKENDS = (Backend.ORT, Backend.OPENVINO)
LORA_BACKENDS = (*CPU_BACKENDS, Backend.TENSORRT)  # LoRAs applied at load (TensorRT: plans built refittable)
EXECUTIONS = tuple(Execution)
# what --precision takes: a graph precision for every component, or an execution precision over fp32 graphs
PRECISION_REQUESTS = (AUTO, Graph.FP32, Execution.BF16, Graph.FP16, Graph.INT8, Graph.INT8_DYNAMIC)


class Target(NamedTuple):
    """What a target build runs: a backend and its execution precision (a candidate, or the choice). A frozen pair:
    `backend, precision = target`."""

    backend: Backend
    precision: Execution

    @classmethod
    def of(cls, backend: str, precision: str) -> Target:
        return cls(Backend(backend), Execution(precision))

    @property
    def key(self) -> str:
        """Its name in the manifest's timings ("openvino-bf16")."""
        return f"{self.backend}-{self.precision}"

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"
