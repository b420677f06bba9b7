"""ONNX Runtime with IO binding: an engine's inputs and outputs live in buffers on the execution device.

The `ort-cuda` backend runs every engine through this class. It also runs on the CPU provider, which is how CI tests
the same code path without a GPU (tests/test_ort_io.py).

- One *slot* per concrete input shape holds an IO binding, the input buffers and the output buffers. The output
  shapes come from the engine's spec (`EngineSpec.output_shapes`), so nothing is allocated during a run.
- Every call copies its inputs into the slot's buffers in place (`OrtValue.update_inplace`), so the addresses stay
  the same from call to call. CUDA graph capture needs that: with `cuda_graph=True` each slot gets its own graph id,
  ONNX Runtime captures it on an early run and replays it after that.
- An input passed again as the same *read-only* array is not copied again. The sampler marks the text embeddings
  read-only, so they are uploaded once per generation, not once per step. A writeable array is always copied, because
  its owner may have changed it in place.
- Only the outputs come back to the host, as numpy copies.

Not for: choosing a provider or checking the GPU (backends/__init__.py and runtime/gpu_target.py do that).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import SoraError
from ..spec import EngineSpec
from .ort import OrtEngine

MAX_SLOTS = 4  # shapes kept bound at once without CUDA graphs (least recently used goes first)


@dataclass
class _Slot:
    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]
    outputs: dict[str, ort.OrtValue]
    run_options: ort.RunOptions
    last: dict[str, np.ndarray] = field(default_factory=dict)  # read-only arrays whose contents are on the device


def cuda_provider(device_id: int = 0, cuda_graph: bool = False) -> tuple[str, dict]:
    """The CUDA execution provider's options for our engines."""
    return ("CUDAExecutionProvider", {
        "device_id": str(device_id),
        "enable_cuda_graph": "1" if cuda_graph else "0",
        # The arena grows by what is asked for instead of doubling, so the peak device memory of a generation is
        # close to what it needs (the edge-memory budget); the sizes are the same every step anyway.
        "arena_extend_strategy": "kSameAsRequested",
        # TF32 is on by default for fp32 MatMul/Conv: an fp32 graph runs in fp32 (reduced precision is in the graph)
        "use_tf32": "0",
    })


def tensorrt_provider(cache_dir: Path, spec: EngineSpec, device_id: int = 0, cuda_graph: bool = False
                      ) -> tuple[str, dict]:
    """ONNX Runtime's TensorRT provider with its engine and timing caches in `cache_dir` (this user's cache, named by
    the ONNX file's content hash, so a changed model never meets a stale engine: runtime/user_cache.py), and one
    optimization profile over the spec's min/opt/max shapes, so a new size within them reuses the engine instead of
    rebuilding it for minutes. No trt_fp16_enable / trt_int8_enable: precision is in the graph (casts, Q/DQ).
    Option names: https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html#configurations"""
    cache_dir.mkdir(parents=True, exist_ok=True)
    profile = spec.trt_profile()

    def shapes(i: int) -> str:  # "name:1x16x21x60x104,other:..."
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[i])}" for name, dims in profile.items())

    return ("TensorrtExecutionProvider", {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir),
        "trt_cuda_graph_enable": "True" if cuda_graph else "False",
        "trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1), "trt_profile_max_shapes": shapes(2),
    })


class OrtIoEngine(OrtEngine):
    """`engine(**feeds)` returns the first output, `.run(**feeds)` returns every output in spec order; the feeds are
    host arrays, checked against the spec. `device` is "cpu" or "cuda"; `provider` puts another GPU provider (the
    TensorRT one) in front of CUDA's, which then runs what it does not take. With `cuda_graph`, CUDA's provider
    captures one graph per input shape (by graph id); the TensorRT provider captures one per session, so a second
    shape is refused there, and no slot is ever evicted while its buffers' addresses live in a graph."""

    def __init__(self, path: Path, spec: EngineSpec, device: str = "cpu", device_id: int = 0,
                 threads: int | None = None, cuda_graph: bool = False, arena: bool = True,
                 provider: tuple[str, dict] | None = None):
        if device == "cuda":
            providers = [*([provider] if provider else []), cuda_provider(device_id, cuda_graph and not provider),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
            cuda_graph = False  # a CPU-provider feature does not exist
        super().__init__(path, spec, threads, providers, arena)
        self.device, self.device_id, self.cuda_graph = device, device_id, cuda_graph
        self.one_graph = cuda_graph and provider is not None
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self.uploads = 0  # input copies made (a test checks that read-only inputs are not copied again)

    def _slot(self, sizes: dict[str, int], feeds: dict[str, np.ndarray]) -> _Slot:
        key = tuple(feeds[n].shape for n in self.spec.input_names)
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        if self.one_graph and self._slots:
            raise SoraError(f"{self.spec.name}: ONNX Runtime's TensorRT provider captured its one CUDA graph for "
                            f"shape {next(iter(self._slots))}; shape {key} needs a new session (--no-cuda-graph "
                            f"runs every shape)")
        binding = self.session.io_binding()
        inputs = {t.name: ort.OrtValue.ortvalue_from_shape_and_type(feeds[t.name].shape, t.np_dtype, self.device,
                                                                     self.device_id) for t in self.spec.inputs}
        shapes = self.spec.output_shapes(sizes)
        outputs = {t.name: ort.OrtValue.ortvalue_from_shape_and_type(shapes[t.name], t.np_dtype, self.device,
                                                                      self.device_id) for t in self.spec.outputs}
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        options = ort.RunOptions()
        if self.cuda_graph and not self.one_graph:
            # One captured graph per shape: ids are 1, 2, ... (onnxruntime_test_python_cudagraph.py uses the same
            # "gpu_graph_id" run option; graph ids need onnxruntime >= 1.17).
            options.add_run_config_entry("gpu_graph_id", str(len(self._slots) + 1))
        elif not self.cuda_graph and len(self._slots) >= MAX_SLOTS:
            self._slots.popitem(last=False)
        slot = _Slot(binding, inputs, outputs, options)
        self._slots[key] = slot
        return slot

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        sizes = self.spec.bind(feeds)
        slot = self._slot(sizes, feeds)
        for name, value in slot.inputs.items():
            arr = feeds[name]
            if slot.last.get(name) is arr and not arr.flags.writeable:
                continue
            value.update_inplace(np.ascontiguousarray(arr))
            self.uploads += 1
            if arr.flags.writeable:
                slot.last.pop(name, None)
            else:
                slot.last[name] = arr
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        out = [slot.outputs[n].numpy() for n in self.spec.output_names]  # from a device: copies to the host
        # On the CPU the array aliases the bound buffer, which the next call overwrites: copy it.
        return [a.copy() for a in out] if self.device == "cpu" else out

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.run(**feeds)[0]
