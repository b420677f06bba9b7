"""Weight-only INT8/INT4 for the text encoder, converted one tensor at a time.

The text encoder is the largest model a user carries (umT5-XXL: 5.7B parameters, 22.8 GB in fp32, more than the
1.3B DiT four times over) and runs once per prompt, so its weights matter more than its speed. Activations stay fp32:

- each MatMul whose weight is a constant [K, N] becomes ONNX Runtime's `MatMulNBits` (com.microsoft): the weight
  transposed to [N, K], cut along K into blocks of `block_size` values with one fp32 scale each, symmetric (the
  op's default zero point, 2^(bits-1)), codes packed low nibble first for int4;
- the token-embedding table (a Gather from a constant table of at least `MIN_TABLE_ROWS` rows: 1.05B of umT5-XXL's
  parameters) becomes int8 rows with one scale per row, gathered and scaled with standard ops
  (Gather -> Cast -> Mul by the gathered scale), int8 whatever `bits` is: a token's vector is read once per prompt.

The pass streams (precision/tensor_files.py): the graph is loaded without its weights and each weight is read from
the external data by a positioned read, quantized and appended to the output, so its memory is one weight (the
embedding table in slices of rows), never the model (measured: 0.76 GB for umT5-XXL). The quality check is the
cosine of the embeddings against the fp32 encoder (precision/quality_gate.py). `MatMulNBits` runs on ONNX Runtime
(CPU, CUDA) and on OpenVINO from 2026.4 (target/choose.py's OPENVINO_READS_MATMULNBITS), not on TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .tensor_files import StreamedGraph

BITS = {"int8": 8, "int4": 4}
MIN_TABLE_ROWS = 1000  # a token vocabulary; T5's relative-position bias tables (32 buckets) stay fp32
ROWS_PER_SLICE = 4096  # embedding rows quantized at a time


def quantize_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (`MatMulNBits`' B: uint8 [N, ceil(K / block_size), block_size * bits / 8], scales float32
    [N, blocks]): symmetric per block, dequantized as (code - 2^(bits-1)) * scale."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)  # K padded with zeros to whole blocks
    wt[:, :k] = np.asarray(w, np.float32).T
    wt = wt.reshape(n, blocks, block_size)
    top = 2 ** (bits - 1) - 1
    scale = np.abs(wt).max(axis=-1) / np.float32(top)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero block stays zero
    codes = (np.clip(np.rint(wt / scale[..., None]), -top - 1, top) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale


def quantize_rows(graph: StreamedGraph, table: str) -> tuple[str, str]:
    """The [V, D] table `table` as int8 rows and a float32 [V, 1] scale per row, symmetric, written ROWS_PER_SLICE
    rows at a time. Returns the two initializers' names."""
    v, d = graph.shape(table)
    scale = np.empty((v, 1), np.float32)

    def slices():
        for i in range(0, v, ROWS_PER_SLICE):
            rows = graph.rows(table, i, i + ROWS_PER_SLICE)
            s = np.abs(rows).max(axis=1, keepdims=True) / np.float32(127.0)
            scale[i:i + len(rows)] = s = np.where(s > 0, s, np.float32(1.0))
            yield np.clip(np.rint(rows / s), -127, 127).astype(np.int8)

    codes = graph.add_slices(f"{table}_int8", np.int8, (v, d), slices())
    return codes, graph.add(f"{table}_row_scales", scale)


def quantize_weights(src: Path, dst: Path, precision: str, block_size: int = 32) -> dict:
    """Write `dst` (+ dst.data): `src` with its linear weights as MatMulNBits and its token table int8, one weight
    in memory at a time. Returns a summary for the manifest."""
    bits = BITS[precision]
    with StreamedGraph(src, dst) as graph:
        nodes, matmuls, quantized, tables = [], 0, 0, 0
        for node in graph.model.graph.node:
            matmuls += node.op_type == "MatMul"
            if node.op_type == "MatMul" and graph.constant(node.input[1], rank=2):
                w = node.input[1]
                k, n = graph.shape(w)
                if f"{w}_q{bits}" not in graph.added:
                    codes, scales = quantize_blocks(graph.array(w), bits, block_size)
                    graph.add(f"{w}_q{bits}", codes), graph.add(f"{w}_scales", scales)
                nodes.append(_like(node, "MatMulNBits", [node.input[0], f"{w}_q{bits}", f"{w}_scales"], node.output,
                                   domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size))
                quantized += 1
            elif (node.op_type == "Gather" and graph.constant(node.input[0], rank=2)
                  and graph.shape(node.input[0])[0] >= MIN_TABLE_ROWS
                  and all(a.i == 0 for a in node.attribute if a.name == "axis")):
                ids, out = node.input[1], node.output[0]
                codes, scales = quantize_rows(graph, node.input[0])
                nodes += [_like(node, "Gather", [codes, ids], [f"{out}_int8"], "_int8"),
                          _like(node, "Cast", [f"{out}_int8"], [f"{out}_float"], "_float", to=TensorProto.FLOAT),
                          _like(node, "Gather", [scales, ids], [f"{out}_scale"], "_scale"),
                          _like(node, "Mul", [f"{out}_float", f"{out}_scale"], [out])]
                tables += 1
            else:
                nodes.append(node)
        del graph.model.graph.node[:]
        graph.model.graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in graph.model.opset_import):
            graph.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        size = graph.save()
    return {"bits": bits, "block_size": block_size, "matmuls": matmuls, "quantized": quantized,
            "embedding_tables_int8": tables, "weight_bytes": size}


def _like(node: onnx.NodeProto, op: str, inputs, outputs, suffix: str = "", **attrs) -> onnx.NodeProto:
    """A node replacing `node` (or part of it): its name + suffix, its module scope (metadata)."""
    new = helper.make_node(op, list(inputs), list(outputs), name=node.name + suffix, **attrs)
    new.metadata_props.extend(node.metadata_props)
    return new
