"""The int8-dynamic DiT (precision/int8_dynamic.py) against the fp32 engines, themselves checked against PyTorch: every
linear layer outside the fp32 islands reads an int8 weight through DequantizeLinear that reproduces the fp32 weight
to half a quantization step; the engines pass the quality gate without calibration and generate within bounds of the
fp32 engines on ONNX Runtime and OpenVINO; OpenVINO keeps those weights int8 with its run-time activation
quantization set; GPU targets refuse the precision before any work."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from soraedge.export.build import ExportConfig, run_export
from soraedge.target.build import TargetConfig, build_from_engines
from soraedge.precision.graph_scopes import in_modules, node_module
from soraedge.precision.convert import FP16_ISLANDS, plan_precision
from soraedge.precision.quality_gate import psnr
from soraedge.precision.tensor_files import load_model
from soraedge.runtime.backends.openvino import ACTIVATION_GROUP
from soraedge.runtime.backends.openvino import available as openvino_available
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline

from conftest import TEST_SIZE

SIZE = TEST_SIZE["tiny-a"]
KEEP = FP16_ISLANDS["transformer"][1]


def _frames(engine_dir, backend=None):
    pipe = Pipeline.load(engine_dir, backend=backend)
    noise = np.random.default_rng(5).standard_normal(pipe.latent_shape(SIZE["height"], SIZE["width"],
                                                                       SIZE["frames"]), dtype=np.float32)
    return pipe("a red fox runs in the snow", **SIZE, steps=6, latents=noise).frames


def test_plan():
    plan, notes = plan_precision("int8-dynamic", {})
    assert plan == {"transformer": "int8-dynamic", "text_encoder": "fp32", "vae": "fp32"}
    assert set(notes) == {"text_encoder", "vae"}
    assert plan_precision("bf16", {"transformer": "int8-dynamic"})[0]["transformer"] == "int8-dynamic"
    with pytest.raises(SoraError, match="vae cannot be int8-dynamic"):
        plan_precision("fp32", {"vae": "int8-dynamic"})


def test_linear_weights_are_int8_outside_the_islands(dynamic_engines, tiny_engines):
    m = load_manifest(dynamic_engines)
    model = load_model(m.root / m.data["engines"]["transformer"]["file"])
    ref = load_model(tiny_engines("tiny-a") / m.data["engines"]["transformer"]["file"])
    fp32 = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized = floats = int8_bytes = 0
    for node in (n for n in model.graph.node if n.op_type == "MatMul"):
        weight, dq = node.input[1], producers.get(node.input[1])
        if weight in inits:
            assert inits[weight].data_type == onnx.TensorProto.FLOAT and in_modules(node_module(node), KEEP), \
                f"{node.name} ({node_module(node)}) kept an fp32 weight outside the islands"
            floats += 1
        elif dq is not None and dq.op_type == "DequantizeLinear":
            assert not in_modules(node_module(node), KEEP), f"{node.name} is in an fp32 island but quantized"
            q, scale = (numpy_helper.to_array(inits[i]) for i in dq.input[:2])
            original = fp32[dq.input[0].removesuffix("_int8")]  # [K, N]
            assert q.dtype == np.int8 and scale.shape == (original.shape[1],)  # per output channel
            assert onnx.helper.get_attribute_value(dq.attribute[0]) == 1  # axis: the N columns
            step = np.abs(q.astype(np.float32) * scale - original) / scale  # error in quantization steps
            assert step.max() <= 0.5 + 1e-3 and np.abs(q).max() == 127
            quantized += 1
            int8_bytes += q.size + 4 * scale.size
    detail = m.data["engines"]["transformer"]["detail"]
    assert quantized == detail["quantized_matmuls"] > 0 and floats == detail["float_matmuls"] > 0
    assert detail["weight_bytes_after"] == int8_bytes < detail["weight_bytes_before"] / 3  # (tiny K: scales count)


def test_passes_the_gate_and_generates_close_to_fp32(dynamic_engines, tiny_engines):
    m = load_manifest(dynamic_engines)
    assert m.data["precision"]["transformer"] == "int8-dynamic"
    gate = m.runtime["quality_gate"]
    assert gate["min_psnr_db"] == 30.0 and min(gate["psnr_db"]) >= 30.0
    reference = _frames(tiny_engines("tiny-a"))
    for backend in ["ort"] + (["openvino"] if openvino_available() else []):
        frames = _frames(dynamic_engines, backend)
        score = psnr(frames, reference)
        print(f"int8-dynamic on {backend}: {score:.1f} dB against the fp32 engines")
        assert np.isfinite(frames).all() and score >= 40.0


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed (no wheel for this platform)")
def test_openvino_keeps_the_weights_int8(dynamic_engines):
    pipe = Pipeline.load(dynamic_engines, backend="openvino", precision="fp32")
    engine = pipe.engine("transformer")
    lat = pipe.latent_shape(SIZE["height"], SIZE["width"], SIZE["frames"])
    feeds = engine.spec.sample_inputs(seed=0, b=2, f=lat[2], h=lat[3], w=lat[4])
    engine(**feeds)
    compiled = engine.compiled_for(feeds)[0]
    assert int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == ACTIVATION_GROUP
    int8 = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        kind = op.get_rt_info()["layerType"]
        kind = kind.astype(str) if hasattr(kind, "astype") else str(kind)
        if kind == "FullyConnected" and str(op.input(1).get_element_type()) in ("<Type: 'int8_t'>", "i8"):
            int8 += 1
    assert int8 == load_manifest(dynamic_engines).data["engines"]["transformer"]["detail"]["quantized_matmuls"]


def test_gpu_targets_refuse_it_before_any_work(tiny_model, dynamic_engines, tmp_path):
    lines = []
    with pytest.raises(SoraError, match="int8-dynamic DiT is a CPU precision"):
        run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=tmp_path / "e", **SIZE, precision="fp32",
                                component_precision=(("transformer", "int8-dynamic"),), backend="ort-cuda"),
                   log=lines.append)
    assert not any("exporting" in line for line in lines) and not (tmp_path / "e").exists()
    with pytest.raises(SoraError, match="int8-dynamic DiT is a CPU precision"):  # the two-step path too
        build_from_engines(TargetConfig(source=dynamic_engines, out=tmp_path / "t", backend="tensorrt"))
    assert not (tmp_path / "t").exists()
