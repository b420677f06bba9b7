"""OpenVINO backend (installed with soraedge where OpenVINO has wheels): compiles the exported ONNX files for the CPU.

fp32 or bf16 execution (bf16 only where the CPU reports it; whether bf16 ships is decided by the quality gate at
export). Compiled models are cached under the engine directory in a folder named by the ONNX file's content hash
and the precision, so a changed model never meets a stale blob.

Linear layers whose weights the graph stores as int8 (the `int8-dynamic` DiT: precision/int8_dynamic.py) stay int8 in
memory, and OpenVINO quantizes their activations at run time per group of `ACTIVATION_GROUP` input channels of each
token, then multiplies on the CPU's integer dot-product instructions. The setting does nothing to float weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..choices import Execution
from ..errors import SoraError
from ..spec import EngineSpec

_HINT = {Execution.FP32: "f32", Execution.BF16: "bf16"}
# Input channels per activation scale in OpenVINO's dynamic quantization (its default: 32). Measured on the int8-dynamic
# DiT, 2 threads, 1280 tokens, CFG batch 2, fp32 execution, step seconds for group 32/64/128/256: 1.217/1.114/1.069/
# 1.096 at Wan2.1-1.3B's layer shape (4 layers), 0.223/0.210/0.210 (32/64/128) at bench-384; single-step PSNR
# against the fp32 graph 62.8 (32) and 61.6 dB (128).
ACTIVATION_GROUP = 128


def _core():
    try:
        import openvino as ov
    except ImportError:
        raise SoraError("the openvino backend needs OpenVINO: pip install openvino") from None
    return ov.Core()


def cpu_info() -> dict:
    """OpenVINO version, CPU name and whether it has bf16, as recorded in the manifest."""
    import openvino as ov

    core = _core()
    return {"openvino": ov.__version__, "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "bf16": "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def version() -> tuple[int, ...]:
    """OpenVINO's (year, release), e.g. (2026, 4)."""
    import openvino as ov

    return tuple(int(x) for x in ov.__version__.split("-")[0].split(".")[:2])


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OvEngine:
    """`static_shapes=N` compiles the model once per concrete input shape (reshaped before compiling), keeping the N
    most recently used, instead of once with dynamic dims (`static_shapes=0`).
    - The VAE decoder needs it: OpenVINO 2026.4 segfaults (in a memcpy) running the dynamic `vae_decoder_step` graph
      in bf16 at 256x256 and larger, while the same graph reshaped to the input's shape runs (reproduced with the
      real Wan2.1 VAE configuration on this project's CPU machine).
    - The DiT is faster with it: every step of a generation has the same shape, and the static compile ran the step
      9-12% faster (bench-384, 1280 tokens, 2 threads: fp32 0.336 s against 0.378 s, bf16 0.202 s against 0.220 s,
      the INT8 QDQ graph 0.205 s against 0.225 s) for 0.5-0.8 s of compile per shape. The DiT keeps one shape: a
      second compiled copy of its weights would double its memory."""

    def __init__(self, path: Path, spec: EngineSpec, threads: int | None = None, precision: str = Execution.FP32,
                 cache_dir: Path | None = None, static_shapes: int = 0,
                 initializers: dict[str, np.ndarray] | None = None):
        if precision not in _HINT:
            raise SoraError(f"openvino precision {precision!r} is not supported (use fp32 or bf16)")
        core = _core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise SoraError("this CPU has no bf16 support: use --precision fp32")
        config = {"INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
        if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in core.get_property("CPU", "SUPPORTED_PROPERTIES"):
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = ACTIVATION_GROUP
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        self.core, self.path, self.config, self.spec = core, Path(path), config, spec
        self.static_shapes = static_shapes
        self.initializers = initializers or {}  # weights in place of the graph's (LoRAs applied at load)
        self._by_shape: dict[tuple, tuple] = {}  # input shapes -> (compiled model, infer request)
        if not static_shapes:
            self.compiled = self._compile(None)
            self.request = self.compiled.create_infer_request()

    def _compile(self, shapes: dict[str, tuple] | None):
        import openvino as ov

        try:
            if shapes is None and not self.initializers:
                return self.core.compile_model(str(self.path), "CPU", self.config)
            model = self._replace_weights(self.core.read_model(str(self.path)))
            if shapes is None:
                return self.core.compile_model(model, "CPU", self.config)
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
            return self.core.compile_model(model, "CPU", self.config)
        except RuntimeError as e:
            raise SoraError(f"OpenVINO could not compile {self.path.name}: {str(e).splitlines()[0]}") from None

    def _replace_weights(self, model):
        """`model` with each of `initializers` in place of the constant OpenVINO read from the ONNX initializer of
        that name (its ONNX frontend keeps initializer names as the constants' names)."""
        from openvino import op

        if not self.initializers:
            return model
        constants = {o.get_friendly_name(): o for o in model.get_ops() if o.get_type_name() == "Constant"}
        for name, values in self.initializers.items():
            old = constants.get(name)
            if old is None or tuple(old.get_output_shape(0)) != values.shape:
                raise SoraError(f"{self.path.name}: OpenVINO holds no weight {name} of shape {list(values.shape)} "
                                f"to replace")
            old.output(0).replace(op.Constant(np.ascontiguousarray(values)).output(0))
        return model

    def compiled_for(self, feeds: dict[str, np.ndarray]):
        """(compiled model, infer request) that runs `feeds`: compiled for their shapes on first use when
        `static_shapes`."""
        if not self.static_shapes:
            return self.compiled, self.request
        key = tuple(feeds[n].shape for n in self.spec.input_names)
        if key not in self._by_shape:
            while len(self._by_shape) >= self.static_shapes:  # least recently used first, before compiling
                self._by_shape.pop(next(iter(self._by_shape)))
            compiled = self._compile(dict(zip(self.spec.input_names, key)))
            self._by_shape[key] = (compiled, compiled.create_infer_request())
        else:
            self._by_shape[key] = self._by_shape.pop(key)  # most recently used last
        return self._by_shape[key]

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.run(**feeds)[0]

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        """Every output, in spec order (copied: the request's buffers are reused by the next call)."""
        self.spec.bind(feeds)
        compiled, request = self.compiled_for(feeds)
        out = request.infer(feeds)
        return [np.array(out[compiled.output(name)], copy=True) for name in self.spec.output_names]
