"""Native TensorRT engines beneath the same engine interface as every other backend (`engine(**feeds)`), without
torch: device memory and streams come from cuda-python.

- Deserialize a plan (`engine_host_code_allowed` for version-compatible plans), one execution context per engine
  with user-managed activation memory.
- Activation memory is shared: the engines of a pipeline run one after another, so one device buffer sized to the
  largest engine's need serves them all (`ActivationPool`); a larger engine grows it and re-points every context,
  dropping the CUDA graphs captured against the old buffer.
- Per input shape, a slot holds the input and output buffers (output shapes from the engine spec), and every
  tensor address is set once, when the slot is made. A call copies the inputs in, runs `execute_async_v3` (or
  replays the CUDA graph captured for that slot, for the DiT), and copies the outputs back.

API references: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
(set_device_memory(memory, size) since 10.1; before it the `device_memory` attribute),
.../Core/Engine.html (create_execution_context(strategy), device_memory_size_v2 since 10.1),
and the CUDA-graph section of the TensorRT developer guide (run enqueueV3 once before capturing); LoRAs at load:
.../Core/Refitter.html (set_named_weights, get_missing_weights, refit_cuda_engine) and the guide's "Refitting an
Engine" (the ONNX parser names weights after the initializers).
Not run by this project: TensorRT cannot be installed on its machines (docs/verification.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SoraError
from ..experts import HIGH
from ..spec import EngineSpec


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise SoraError("the tensorrt backend needs cuda-python for device memory: pip install cuda-python") \
                from None
    return cudart


def _check(result):
    """cuda-python returns (error, value...); raise on an error, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise SoraError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class ActivationPool:
    """One device buffer for the activations of every engine of a process, grown to the largest need.

    Growing frees the old buffer, so every attached engine is told the new address (`point_at`): its context is
    re-pointed, and any CUDA graph it captured, which holds the old address, is destroyed and captured again on the
    next call. `alloc`/`free` are cudaMalloc/cudaFree unless given."""

    def __init__(self, alloc=None, free=None):
        self.ptr, self.size, self.owners = 0, 0, []
        self._alloc = alloc or (lambda n: _check(_cudart().cudaMalloc(n)))
        self._free = free or (lambda ptr: _check(_cudart().cudaFree(ptr)))

    def attach(self, owner, need: int) -> None:
        """`owner.point_at(ptr, size)` is called now and whenever the buffer moves."""
        if need > self.size:
            if self.ptr:
                self._free(self.ptr)
            self.ptr, self.size = self._alloc(need), need
            for o in self.owners:
                o.point_at(self.ptr, self.size)
        self.owners.append(owner)
        owner.point_at(self.ptr, self.size)

    def detach(self, owner) -> None:
        self.owners = [o for o in self.owners if o is not owner]


def _set_device_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


def activation_bytes(engine) -> int:
    """What the engine's context needs for its activations at any profile: `device_memory_size_v2` (TensorRT >=
    10.1; 0 is a valid answer), else the older `device_memory_size`."""
    if hasattr(engine, "device_memory_size_v2"):
        return engine.device_memory_size_v2
    return engine.device_memory_size


POOL = ActivationPool()


def refittable(manifest) -> bool:
    """Whether the engine directory's TensorRT DiT plan was built to take new weights (--trt-refittable)."""
    entry = manifest.data["engines"].get(HIGH, {})
    return "REFIT" in entry.get("trt_build", {}).get("builder", {}).get("builder_flags", [])


def refit(trt, engine, weights: dict[str, np.ndarray], logger, name: str) -> None:
    """Replace the named weights of a refittable engine: the ONNX parser names each after its graph initializer,
    so the names and values are those the CPU backends take (`weights` in the graph's dtype and layout). TensorRT
    may have folded a weight into another at build time; it then names the others it needs (get_missing_weights),
    which is refused in one line rather than refitted half-way."""
    if not engine.refittable:
        raise SoraError(f"the TensorRT plan {name} was built without --trt-refittable: rebuild it with that flag to "
                        f"apply LoRAs at load")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}  # alive until the refit is done
    for key, values in arrays.items():
        if key not in known or not refitter.set_named_weights(key, trt.Weights(values)):
            raise SoraError(f"the TensorRT plan {name} does not take new weights for {key} "
                            f"{list(values.shape)} {values.dtype}: export with --lora to fuse the LoRAs")
    missing = refitter.get_missing_weights()
    if missing:
        raise SoraError(f"the TensorRT plan {name} folded {len(missing)} weight(s) the LoRAs change into others "
                        f"({', '.join(missing[:3])}): export with --lora to fuse them")
    if not refitter.refit_cuda_engine():
        raise SoraError(f"TensorRT could not refit {name} with the LoRAs' weights")


class TrtEngine:
    def __init__(self, path: Path, spec: EngineSpec, cuda_graph: bool = False, pool: ActivationPool = POOL,
                 initializers: dict[str, np.ndarray] | None = None):
        import tensorrt as trt

        self.cudart = _cudart()
        self.spec, self.cuda_graph, self.pool = spec, cuda_graph, pool
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.runtime.engine_host_code_allowed = True  # version-compatible plans embed their lean runtime
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise SoraError(f"TensorRT could not load {Path(path).name}: built by another TensorRT version or GPU? "
                            f"rebuild it with sora-export")
        if initializers:  # LoRAs applied at load, before any context exists
            refit(trt, self.engine, initializers, logger, Path(path).name)
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.slots: dict[tuple, dict] = {}  # input shapes -> {"buffers": {name: (ptr, shape, dtype)}, "graph"}
        self._bound = None  # the slot the context's shapes and addresses point at
        pool.attach(self, activation_bytes(self.engine))

    def point_at(self, ptr: int, size: int) -> None:
        """The activation buffer moved (ActivationPool): re-point the context; captured graphs hold the old address,
        so they are destroyed and captured again on their next call."""
        _set_device_memory(self.context, ptr, size)
        for slot in self.slots.values():
            if slot["graph"] is not None:
                self.cudart.cudaGraphExecDestroy(slot["graph"])
                slot["graph"] = None

    def _slot(self, feeds: dict[str, np.ndarray]) -> dict:
        key = tuple(feeds[n].shape for n in self.spec.input_names)
        if key in self.slots:
            return self.slots[key]
        sizes = self.spec.bind(feeds)
        shapes = {**{n: feeds[n].shape for n in self.spec.input_names}, **self.spec.output_shapes(sizes)}
        dtypes = {t.name: t.np_dtype for t in (*self.spec.inputs, *self.spec.outputs)}
        buffers = {n: (_check(self.cudart.cudaMalloc(max(int(np.prod(s)) * dtypes[n].itemsize, 1))), s, dtypes[n])
                   for n, s in shapes.items()}
        slot = {"buffers": buffers, "graph": None}
        self.slots[key] = slot
        return slot

    def _bind(self, slot: dict) -> None:
        """Point the context at this slot's shapes and buffers (once per slot switch, not per call)."""
        for name, (ptr, shape, _) in slot["buffers"].items():
            if name in self.spec.input_names and not self.context.set_input_shape(name, shape):
                raise SoraError(f"TensorRT refused shape {tuple(shape)} for {self.spec.name}.{name}: outside the "
                                f"plan's optimization profile? rebuild it with sora-export for this size")
            if not self.context.set_tensor_address(name, ptr):
                raise SoraError(f"TensorRT refused the address of {self.spec.name}.{name}")

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        self.spec.bind(feeds)
        slot = self._slot(feeds)
        if self._bound is not slot:
            self._bind(slot)
            self._bound = slot
        rt, h2d, d2h = self.cudart, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, \
            self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.spec.input_names:
            arr = np.ascontiguousarray(feeds[name])
            _check(rt.cudaMemcpyAsync(slot["buffers"][name][0], arr.ctypes.data, arr.nbytes, h2d, self.stream))
        if self.cuda_graph and slot["graph"] is not None:
            _check(rt.cudaGraphLaunch(slot["graph"], self.stream))
        else:
            if not self.context.execute_async_v3(self.stream):
                raise SoraError(f"TensorRT failed to run {self.spec.name}")
            if self.cuda_graph:  # captured after one ordinary run, as the developer guide asks
                slot["graph"] = self._capture()
        outputs = []
        for name in self.spec.output_names:
            ptr, shape, dtype = slot["buffers"][name]
            out = np.empty(shape, dtype)
            _check(rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self.stream))
            outputs.append(out)
        _check(rt.cudaStreamSynchronize(self.stream))
        return outputs

    def _capture(self):
        """One enqueue captured into a CUDA graph and instantiated; a capture that failed is an error, never a graph
        that silently leaves the outputs as they were."""
        rt = self.cudart
        _check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = self.context.execute_async_v3(self.stream)
        graph = _check(rt.cudaStreamEndCapture(self.stream))  # always end the capture, even after a failure
        try:
            if not ok:
                raise SoraError(f"TensorRT failed to run {self.spec.name} while capturing its CUDA graph; run with "
                                f"--no-cuda-graph")
            return _check(rt.cudaGraphInstantiate(graph, 0))
        finally:
            rt.cudaGraphDestroy(graph)  # the executable graph keeps what it needs

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.run(**feeds)[0]

    def __del__(self):
        try:
            self.pool.detach(self)
            for slot in self.slots.values():
                if slot["graph"] is not None:
                    self.cudart.cudaGraphExecDestroy(slot["graph"])
                for ptr, _, _ in slot["buffers"].values():
                    self.cudart.cudaFree(ptr)
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
