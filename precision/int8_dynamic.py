"""The DiT's `int8-dynamic` precision: int8 linear weights in the graph, activations quantized at run time.

Every MatMul whose weight is a constant 2-D float initializer [K, N] (the linear layers), outside the modules kept
in fp32 (`keep_modules`: the FP16 pass's islands, the timestep embedding and the output projection), becomes

    DequantizeLinear(weight int8 [K, N], scale float32 [N], axis=1) -> MatMul

symmetric per output channel: scale = max|w| / 127 over the column, zero point 0. Nothing about the activations is
in the graph, so there is no calibration (PyTorch's "dynamic quantization" of Linear layers is the same scheme).
OpenVINO's CPU plugin reads the pattern as a linear layer with compressed weights: it keeps the weights int8 in
memory and, with dynamic quantization on (runtime/backends/openvino.py), quantizes each token's activations per
group of input channels at run time and multiplies on the CPU's integer dot-product instructions. ONNX Runtime fuses
the pattern into its 8-bit `MatMulNBits` with int8 compute, measured no faster than its fp32 step at bench-384's
width and 1.15x at the 1.3B layers' (bench/results/dit_step_*, the int8-dynamic rows). GPU targets refuse it
(target/choose.py: `cpu_only`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .fp16 import save_with_external_data
from .graph_scopes import in_modules, node_module
from .tensor_files import load_model


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] float -> (int8 [K, N], float32 scale [N]) with w ~ q * scale, symmetric per column."""
    scale = np.abs(w).max(axis=0).astype(np.float32) / np.float32(127.0)  # [N]
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero column stays zero
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_linear_weights(src: Path, dst: Path, keep_modules: tuple[str, ...]) -> dict:
    """Write `dst`: `src` with its linear layers' weights int8 behind DequantizeLinear. Returns a summary."""
    model = load_model(src)
    inits = {t.name: t for t in model.graph.initializer}
    dequantized: dict[str, str] = {}  # fp32 weight name -> its DequantizeLinear output (a weight may be shared)
    nodes, quantized, kept, bytes_before, bytes_after = [], 0, 0, 0, 0
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        if in_modules(node_module(node), keep_modules):
            kept += 1
            nodes.append(node)
            continue
        name = weight.name
        if name not in dequantized:
            q, scale = quantize_columns(numpy_helper.to_array(weight))
            model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                            numpy_helper.from_array(scale, f"{name}_scale")])
            dq = helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [f"{name}_dequantized"],
                                  name=f"{node.name}_weight_dequantize", axis=1)
            dq.metadata_props.extend(node.metadata_props)  # the same module scope as its MatMul
            nodes.append(dq)
            dequantized[name] = dq.output[0]
            bytes_before, bytes_after = bytes_before + q.size * 4, bytes_after + q.size + scale.size * 4
        node.input[1] = dequantized[name]
        nodes.append(node)
        quantized += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    save_with_external_data(model, dst)
    return {"scheme": "int8 weights, symmetric per output channel; activations quantized at run time",
            "quantized_matmuls": quantized, "float_matmuls": kept, "kept_float_modules": list(keep_modules),
            "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after}
