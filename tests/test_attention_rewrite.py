"""The Attention -> contrib MultiHeadAttention rewrite (export/attention_rewrite.py) on a real exported DiT.

Every attention layer (self and cross, in every block) is replaced, and ONNX Runtime's output on the rewritten
graph stays within fp32 tolerance of the original on inputs drawn from the engine spec at a non-export size.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from soraedge.export.attention_rewrite import rewrite_file
from soraedge.runtime.spec import EngineSpec


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_every_attention_layer_is_replaced_and_output_is_unchanged(tiny_model, engine_copy):
    cfg = json.loads((tiny_model("tiny-a") / "transformer" / "config.json").read_text())
    layers = 2 * cfg["num_layers"]  # self- and cross-attention per block
    report = rewrite_file(engine_copy / "transformer.onnx", engine_copy / "transformer_mha.onnx",
                          cfg["num_attention_heads"])
    assert (report.attention_nodes, report.replaced) == (layers, layers)

    graph = onnx.load(str(engine_copy / "transformer_mha.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == layers and "Attention" not in ops

    manifest = json.loads((engine_copy / "manifest.json").read_text())
    spec = EngineSpec.from_dict(manifest["engines"]["transformer"]["spec"])
    feeds = spec.sample_inputs(seed=3, b=2, f=2, h=6, w=4)  # not the export sample's size
    ref = _session(engine_copy / "transformer.onnx").run(None, feeds)[0]
    got = _session(engine_copy / "transformer_mha.onnx").run(None, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_graph_without_the_pattern_is_left_alone(engine_copy):
    """The text encoder has no ONNX Attention node: nothing is replaced and no contrib domain is added."""
    report = rewrite_file(engine_copy / "text_encoder.onnx", engine_copy / "text_encoder_mha.onnx", 2)
    assert report.replaced == 0
    model = onnx.load(str(engine_copy / "text_encoder_mha.onnx"), load_external_data=False)
    assert all(op.domain != "com.microsoft" for op in model.opset_import)
