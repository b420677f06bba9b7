"""Weight-only INT8/INT4 for the text encoder: ONNX Runtime's `MatMulNBits` (block-wise symmetric weights).

The text encoder is the largest model a user carries (umT5-XXL: ~11 GB in bf16, more than the 1.3B DiT) and runs
once per prompt, so its weights matter more than its speed. Activations stay fp32; each MatMul's weight becomes
blocks of `block_size` values with one fp32 scale each. The quality check is the cosine of the embeddings against
the fp32 encoder (precision/quality_gate.py). `MatMulNBits` is an ONNX Runtime contrib op: these graphs run on ONNX
Runtime (CPU, CUDA) and on OpenVINO from 2026.4 (target/choose.py's OPENVINO_READS_MATMULNBITS), not on TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .fp16 import save_with_external_data

BITS = {"int8": 8, "int4": 4}


def quantize_weights(src: Path, dst: Path, precision: str, block_size: int = 32) -> dict:
    """Write `dst`: every MatMul with a constant weight in `src` as MatMulNBits. Returns a summary."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # Importing it calls logging.basicConfig(level=INFO), which would print every later INFO line of onnxscript and
    # onnx_ir: undo that, and mute its own line per node.
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=BITS[precision],
                                          op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[precision], block_size=block_size, is_symmetric=True,
                                     algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    after = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    save_with_external_data(out, dst)
    return {"bits": BITS[precision], "block_size": block_size, "matmuls": before, "quantized": after}
