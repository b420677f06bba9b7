"""FP16 graphs with fp32 islands: the precision lives in the ONNX file, so ONNX Runtime and TensorRT run the same one.

onnxruntime's `transformers.float16` converter turns initializers and ops to fp16 and inserts Casts at the
boundaries of the nodes it is told to keep (it does not clamp weights to 1e4 as onnxconverter-common's default
does). Inputs and outputs stay fp32 (`keep_io_types`), so the runtime, the engine spec and the VAE's cache slots do
not change with precision. Which nodes stay fp32 is per component (`FP16_ISLANDS` in precision/convert.py): op
types where overflow or cancellation lives (normalisations, softmax, sin/cos) and module prefixes (timestep
embedding, RoPE, final projection).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .graph_scopes import nodes_in_modules
from .tensor_files import load_model


def convert_fp16(src: Path, dst: Path, keep_ops: tuple[str, ...], keep_modules: tuple[str, ...]) -> dict:
    """Write `dst` (+ dst.data): `src` in fp16 except `keep_ops` and nodes of `keep_modules`. Returns a summary."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = load_model(src)  # with its weights
    keep_ops = tuple(dict.fromkeys((*keep_ops, *DEFAULT_OP_BLOCK_LIST)))  # + ops without fp16 kernels (Range, ...)
    kept = set(nodes_in_modules(model, keep_modules)) | {n.name for n in model.graph.node if n.op_type in keep_ops}
    total = len(model.graph.node)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                     node_block_list=sorted(kept), disable_shape_infer=True)
    save_with_external_data(model, dst)
    return {"nodes": total, "nodes_kept_fp32": len(kept), "keep_modules": list(keep_modules)}


def save_with_external_data(model: onnx.ModelProto, dst: Path) -> None:
    """Save `model` as dst + dst.data (one weights file beside the graph, as every engine in a directory)."""
    dst = Path(dst)
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external-data file
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
