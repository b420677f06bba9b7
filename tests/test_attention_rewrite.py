"""The Attention -> contrib MultiHeadAttention rewrite (target/attention_rewrite.py) on a real exported DiT.

Every attention layer (self and cross, in every block) is replaced, and ONNX Runtime's output on the rewritten
graph stays within fp32 tolerance of the original on inputs drawn from the engine spec at a non-export size. The
export times it as ONNX Runtime's CPU graph of the DiT and keeps it where faster; the pipeline then runs it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from soraedge.target.attention_rewrite import rewrite_file
from soraedge.target.choose import ORT_CPU_DIT
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline
from soraedge.runtime.spec import EngineSpec


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("heads_from", ["config", "graph"])
def test_every_attention_layer_is_replaced_and_output_is_unchanged(tiny_model, engine_copy, heads_from):
    cfg = json.loads((tiny_model("tiny-a") / "transformer" / "config.json").read_text())
    layers = 2 * cfg["num_layers"]  # self- and cross-attention per block
    report = rewrite_file(engine_copy / "transformer.onnx", engine_copy / "transformer_mha.onnx",
                          cfg["num_attention_heads"] if heads_from == "config" else None)
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


def test_export_records_the_ort_attention_choice(tiny_engines):
    """Both DiT graphs were timed on ONNX Runtime; the faster one's file is the one the manifest names."""
    m = load_manifest(tiny_engines("tiny-a"))
    record = m.runtime["ort_attention"]
    assert record["onnx_attention_step_s"] > 0 and record["multihead_attention_step_s"] > 0
    kept = m.data["engines"]["transformer"].get("ort_cpu_file")
    assert (record["graph"] == "MultiHeadAttention") == bool(kept)
    assert m.runtime["timings"]["ort-fp32"]["step_s"] == min(record["onnx_attention_step_s"],
                                                             record["multihead_attention_step_s"])
    if kept:
        assert kept == ORT_CPU_DIT and kept in m.data["files"]
    assert m.path_for("transformer", "openvino") == m.engine_path("transformer")  # other backends: portable


def test_pipeline_runs_the_ort_cpu_graph(engine_copy):
    """With the CPU graph named in the manifest, ONNX Runtime runs it, and the frames match the portable graph's."""
    rewrite_file(engine_copy / "transformer.onnx", engine_copy / ORT_CPU_DIT)
    frames = {}
    for graph in ("portable", "multihead"):
        manifest = load_manifest(engine_copy, verify=False)
        entry = manifest.data["engines"]["transformer"]
        entry.pop("ort_cpu_file", None)
        if graph == "multihead":
            entry["ort_cpu_file"] = ORT_CPU_DIT
        assert (manifest.path_for("transformer", "ort").name == ORT_CPU_DIT) == (graph == "multihead")
        pipe = Pipeline(manifest, backend="ort")
        frames[graph] = pipe("a red fox", steps=3, seed=0).frames
    assert np.abs(frames["portable"] - frames["multihead"]).max() <= 1e-4
