"""Explicit Q/DQ INT8 for the DiT with ONNX Runtime's static quantizer, pinned to settings that were checked.

What is quantized: MatMuls with a constant weight (the linear layers) and, in the decomposed-attention export,
the attention products Q·Kᵀ and P·V. Weights: int8, symmetric, per output channel. Activations: per tensor.
Outputs of MatMuls are left in float (`OpTypesToExcludeOutputQuantization`), so ONNX Runtime's CPU provider
fuses DQ→MatMul into `MatMulIntegerToFloat` (integer GEMM, float output) instead of a QLinearMatMul followed by
a DequantizeLinear. Measured while choosing these settings (hidden 384, 6 layers, 1280 tokens, CFG batch 2, 2
threads, random calibration inputs, one run each; the committed comparison is bench/results/precision_bench-384-*):

    u8 activations, float MatMul outputs:  all 63 linears -> MatMulIntegerToFloat, 1.70x the fp32 step
    u8 activations, quantized outputs:     QLinearMatMul + DequantizeLinear,       1.36x
    s8 activations (symmetric):            the 30 linears that share an input (q/k/v, cross-attention k/v)
                                           stay float MatMul behind DequantizeLinear, 1.37x

so u8 (asymmetric) is the CPU default and s8 (symmetric, zero point 0: what TensorRT requires) is an option.
Only "MatMul" is in the op types: with default op types, onnxruntime 1.32's quantize_dynamic was reported (in the
precision issue) to take the opset-23 `Attention` node for the contrib op of that name and write an invalid model;
restricting the op types keeps the quantizer away from it (not re-checked for quantize_static with defaults).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx

from .config import CalibConfig

QUANTIZED_OPS = ("MatMul",)


class _SampleReader:
    """CalibrationDataReader over recorded DiT inputs; `set_range` lets ORT collect statistics one sample at a
    time (CalibStridedMinMax), so memory does not grow with the number of samples."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self.samples = samples
        self._it = iter(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.samples[start_index:end_index])

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.samples)


def quantize_qdq(src: Path, dst: Path, samples: list[dict[str, np.ndarray]], cfg: CalibConfig,
                 exclude: list[str]) -> dict:
    """Write `dst` (+ .data): `src` with Q/DQ around every MatMul not in `exclude`. Returns a summary."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.method]
    symmetric = cfg.activations == "s8"
    extra = {"WeightSymmetric": True, "ActivationSymmetric": symmetric,
             "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
             "CalibStridedMinMax": 1, "CalibPercentile": cfg.percentile, "CalibTensorRangeSymmetric": symmetric}
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "consider pre-processing" advice on every call
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(src), str(dst), _SampleReader(samples), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                            use_external_data_format=True, calibrate_method=method, extra_options=extra)
    finally:
        quiet.setLevel(level)
    return qdq_summary(onnx.load(str(dst), load_external_data=False))


def qdq_summary(model: onnx.ModelProto) -> dict:
    """Which MatMuls read dequantized inputs (are quantized) and which stay float."""
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized, float_ = [], []
    for n in model.graph.node:
        if n.op_type == "MatMul":
            dq = all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)
            (quantized if dq else float_).append(n.name)
    return {"quantized_matmuls": len(quantized), "float_matmuls": len(float_),
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node)}
