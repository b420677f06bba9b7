"""FP16 graphs with fp32 islands: the precision lives in the ONNX file, so ONNX Runtime and TensorRT run the same one.

onnxruntime's `transformers.float16` converter turns initializers and ops to fp16 and inserts Casts at the
boundaries of the nodes it is told to keep (it does not clamp weights to 1e4 as onnxconverter-common's default
does). Inputs and outputs stay fp32 (`keep_io_types`), so the runtime, the engine spec and the VAE's cache slots do
not change with precision. Which nodes stay fp32 is per component (`FP16_ISLANDS` in precision/convert.py): op
types where overflow or cancellation lives (normalisations, softmax, sin/cos) and module prefixes (timestep
embedding, RoPE, final projection).

The converter runs on the graph alone: an initializer stored outside the graph only has its type changed, and its
values are then converted and written one tensor at a time (`write_fp16`), exactly as the converter converts those
it holds. So a conversion needs the graph plus one weight in memory, whether the fp32 weights come from an exported
file (`convert_fp16`) or straight from a checkpoint as the export streams them (export/onnx_export.py), which never
writes the fp32 form of a model too large for it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph_scopes import nodes_in_modules
from .tensor_files import DataFile, ExternalWeights

CONVERT_SLICE = 1 << 22  # elements converted at a time (the converter's masks take a few copies of what it converts)


def convert_fp16(src: Path, dst: Path, keep_ops: tuple[str, ...], keep_modules: tuple[str, ...]) -> dict:
    """Write `dst` (+ dst.data): `src` in fp16 except `keep_ops` and nodes of `keep_modules`, one weight in memory
    at a time. Returns a summary."""
    model = onnx.load(str(src), load_external_data=False)
    stored = ExternalWeights(src, copy.deepcopy(model))  # the fp32 weights where src keeps them
    return write_fp16(model, stored.array, dst, keep_ops, keep_modules)


def write_fp16(model: onnx.ModelProto, weight: Callable[[str], np.ndarray], dst: Path, keep_ops: tuple[str, ...],
               keep_modules: tuple[str, ...]) -> dict:
    """Convert the graph `model`, whose external initializers are fp32 values that `weight(name)` reads, and write
    it as `dst` (+ dst.data), each weight read, converted where the converter made it fp16, and written in turn."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep_ops = tuple(dict.fromkeys((*keep_ops, *DEFAULT_OP_BLOCK_LIST)))  # + ops without fp16 kernels (Range, ...)
    kept = set(nodes_in_modules(model, keep_modules)) | {n.name for n in model.graph.node if n.op_type in keep_ops}
    total = len(model.graph.node)
    # The converter reads a converted initializer's values only for its shape (make_value_info_from_tensor): the
    # shape is in the graph, so it runs on the graph alone.
    by_values = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                         node_block_list=sorted(kept), disable_shape_infer=True)
    finally:
        float16.make_value_info_from_tensor = by_values
    data = DataFile(dst)
    try:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                values = weight(t.name)
                if t.data_type == TensorProto.FLOAT16:
                    values = to_float16(values)
                t.CopyFrom(data.write(t.name, values.dtype, values.shape, [np.ascontiguousarray(values).data]))
        size = data.save(model)
    finally:
        data.close()
    return {"nodes": total, "nodes_kept_fp32": len(kept), "keep_modules": list(keep_modules), "weight_bytes": size}


def to_float16(values: np.ndarray) -> np.ndarray:
    """`values` in fp16 as the converter converts a weight it holds (tiny magnitudes kept nonzero, large ones clamped
    to fp16's largest finite value), a slice at a time."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    flat = values.reshape(-1)
    out = np.empty(flat.shape, np.float16)
    for i in range(0, flat.size, CONVERT_SLICE):
        out[i:i + CONVERT_SLICE] = convert_np_to_float16(flat[i:i + CONVERT_SLICE])
    return out.reshape(values.shape)


def save_with_external_data(model: onnx.ModelProto, dst: Path) -> None:
    """Save `model` as dst + dst.data (one weights file beside the graph, as every engine in a directory)."""
    dst = Path(dst)
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external-data file
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
