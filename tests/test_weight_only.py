"""Weight-only INT8/INT4 of the text encoder, converted one tensor at a time (precision/weight_only.py).

The layout ONNX Runtime reads (`MatMulNBits`' blocks, packing and default zero point; the int8 token table) is
checked against a dequantization written here from the op's definition: the quantized graph must compute exactly
the float graph with the dequantized weights. A control changes one code and must be seen.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from soraedge.precision.fp16 import save_with_external_data
from soraedge.precision.tensor_files import load_model
from soraedge.precision.weight_only import quantize_weights
from soraedge.runtime.errors import SoraError

K, N, VOCAB, D = 80, 24, 1500, 80  # K not a multiple of the block: the last block is padded


def _float_graph(path, rng):
    """ids [b, s] -> Gather(table) -> MatMul(w) -> y, with both weights in external data."""
    table = rng.standard_normal((VOCAB, D)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed_tokens/Gather"),
             helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    save_with_external_data(model, path)
    return table, w


def _dequantized(path, bits, block):
    """The weights the quantized graph at `path` holds, dequantized as MatMulNBits' definition says."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    codes, scales = inits[f"w_q{bits}"], inits["w_scales"].reshape(N, -1)
    if bits == 4:  # two codes per byte, low nibble first
        codes = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:2], -1)
    w = ((codes.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(N, -1)[:, :K].T
    table = inits["table_int8"].astype(np.float32) * inits["table_row_scales"]
    return table, w


def _run(path, ids):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


@pytest.mark.parametrize("precision,bits,rel", [("int8", 8, 0.02), ("int4", 4, 0.2)])
def test_quantized_graph_computes_the_dequantized_weights(tmp_path, precision, bits, rel):
    rng = np.random.default_rng(0)
    table, w = _float_graph(tmp_path / "f.onnx", rng)
    detail = quantize_weights(tmp_path / "f.onnx", tmp_path / "q.onnx", precision)
    assert detail["quantized"] == detail["matmuls"] == 1 and detail["embedding_tables_int8"] == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).graph.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops
    ids = rng.integers(0, VOCAB, (2, 7))
    table_q, w_q = _dequantized(tmp_path / "q.onnx", bits, detail["block_size"])
    expected = table_q[ids] @ w_q
    got = _run(tmp_path / "q.onnx", ids)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # and the quantization itself is close to the float weights, by the precision's bound
    assert np.abs(w_q - w).max() <= rel * np.abs(w).max()
    assert np.abs(table_q - table).max() <= 0.01 * np.abs(table).max()
    assert np.abs(got - _run(tmp_path / "f.onnx", ids)).max() <= rel * np.abs(expected).max()


def test_the_control_a_changed_code_is_seen(tmp_path):
    rng = np.random.default_rng(1)
    _float_graph(tmp_path / "f.onnx", rng)
    detail = quantize_weights(tmp_path / "f.onnx", tmp_path / "q.onnx", "int8")
    model = onnx.load(str(tmp_path / "q.onnx"))
    for t in model.graph.initializer:
        if t.name == "w_q8":
            codes = numpy_helper.to_array(t).copy()
            codes[3, 0, 0] ^= 0x40
            t.CopyFrom(numpy_helper.from_array(codes, t.name))
    save_with_external_data(model, tmp_path / "changed.onnx")
    ids = rng.integers(0, VOCAB, (1, 5))
    table_q, w_q = _dequantized(tmp_path / "q.onnx", 8, detail["block_size"])
    expected = table_q[ids] @ w_q
    assert np.abs(_run(tmp_path / "changed.onnx", ids) - expected).max() > 1e-5 * np.abs(expected).max()


def test_external_data_outside_the_folder_or_truncated_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    _float_graph(tmp_path / "f.onnx", rng)
    data = tmp_path / "f.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(SoraError, match="truncated"):
        quantize_weights(tmp_path / "f.onnx", tmp_path / "q.onnx", "int8")
    model = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../f.onnx.data"
    onnx.save_model(model, str(tmp_path / "g.onnx"))
    with pytest.raises(SoraError, match="leaves the directory"):
        quantize_weights(tmp_path / "g.onnx", tmp_path / "q2.onnx", "int8")


def test_hard_linked_weights_are_read(tmp_path):
    """Engine folders hard-link their files (the Triton repository, the target build, the trace cache); onnx.load
    refuses such external data, the project's reader reads it (with its folder and size checks)."""
    import os

    rng = np.random.default_rng(3)
    table, w = _float_graph(tmp_path / "f.onnx", rng)
    os.link(tmp_path / "f.onnx.data", tmp_path / "elsewhere.data")
    with pytest.raises(Exception, match="hard link"):
        onnx.load(str(tmp_path / "f.onnx"))
    model = load_model(tmp_path / "f.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(inits["table"], table) and np.array_equal(inits["w"], w)
    quantize_weights(tmp_path / "f.onnx", tmp_path / "q.onnx", "int8")
