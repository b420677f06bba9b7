"""Backends beneath the one sampler: OpenVINO against ONNX Runtime, the export-time choice, the bf16 gate."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import TEST_SIZE
from soraedge.cli.export_cmd import main as export_main
from soraedge.cli.run_cmd import main as run_main
from soraedge.export.build import ExportConfig, run_export
from soraedge.target.timing import MAX_REPEATS, MIN_TIMING_S
from soraedge.runtime.backends import openvino as ov_backend
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline

needs_openvino = pytest.mark.skipif(not ov_backend.available(), reason="OpenVINO is not installed")


@needs_openvino
@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_openvino_fp32_matches_ort(name, tiny_engines):
    size = TEST_SIZE[name]
    ort = Pipeline.load(tiny_engines(name), backend="ort")
    ov = Pipeline.load(tiny_engines(name), backend="openvino", precision="fp32")
    noise = np.random.default_rng(0).standard_normal(ort.latent_shape(size["height"], size["width"], size["frames"]),
                                                     dtype=np.float32)
    a = ort("a fox on the beach", steps=3, guidance=4.0, latents=noise).frames
    b = ov("a fox on the beach", steps=3, guidance=4.0, latents=noise).frames
    assert np.abs(a - b).max() < 1e-3
    # The VAE decoder ran compiled for its input shape (OpenVINO's dynamic bf16 VAE step crashes at 256x256+), and
    # so did the DiT (faster), keeping one shape: a new shape replaces the compiled one
    step = ov.engine(ov.config["vae"]["step"])
    assert step.static_shapes == 2 and len(step._by_shape) == 1
    dit = ov.engine("transformer")
    assert dit.static_shapes == 1 and len(dit._by_shape) == 1
    # The export's rotary form (half-split channels, rotate-half) is the one OpenVINO fuses at the generation's
    # shape: one RoPE kernel for each self-attention's query and key, as many as the graph has attentions (a self
    # and a cross attention per block)
    compiled = next(iter(dit._by_shape.values()))[0]
    layers = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    attentions = sum(n.op_type == "Attention" for n in onnx.load(dit.path, load_external_data=False).graph.node)
    assert attentions > 0 and layers.count("RoPE") == attentions
    spec = dit.spec
    other = spec.sample_inputs(seed=1, **spec.sizes("min", b=1))
    assert dit(**other).shape[0] == 1 and [k[0][0] for k in dit._by_shape] == [1]


def test_backend_choice_is_recorded_and_honoured(tiny_engines):
    m = load_manifest(tiny_engines("tiny-a"))
    runtime = m.data["runtime"]
    assert runtime["backend"] in ("ort", "openvino") and runtime["precision"] == "fp32"
    assert runtime["timings"]["ort-fp32"]["step_s"] > 0
    # a step of a few ms is timed over many calls (MIN_TIMING_S of them), not three
    for t in runtime["timings"].values():
        assert 3 <= t["repeats"] <= MAX_REPEATS and (t["repeats"] > 10 or t["step_s"] > MIN_TIMING_S / 20)
    if ov_backend.available():
        fastest = min(runtime["timings"], key=lambda k: runtime["timings"][k]["step_s"])
        assert fastest == f"{runtime['backend']}-fp32"
    pipe = Pipeline.load(tiny_engines("tiny-a"))
    assert (pipe.backend, pipe.precision) == (runtime["backend"], runtime["precision"])
    assert Pipeline.load(tiny_engines("tiny-a"), backend="ort").backend == "ort"


def test_explicit_backend_is_recorded(tiny_model, tmp_path):
    size = TEST_SIZE["tiny-a"]
    out = tmp_path / "e"
    run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=out, frames=size["frames"], backend="ort",
                            height=size["height"], width=size["width"], check_parity=False))
    assert json.loads((out / "manifest.json").read_text())["runtime"]["backend"] == "ort"
    assert Pipeline.load(out).backend == "ort"


def test_bad_backend_names(tiny_engines, tmp_path):
    r = CliRunner().invoke(run_main, ["--engines", str(tiny_engines("tiny-a")), "--prompt", "x", "--backend", "tpu",
                                      "-o", str(tmp_path / "v.npy")])
    assert r.exit_code == 2 and "Invalid value for '--backend'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(export_main, ["demo", "-o", str(tmp_path / "e"), "--backend", "cuda"])
    assert r.exit_code == 2 and "Invalid value for '--backend'" in r.output
    with pytest.raises(SoraError, match="unknown backend"):
        Pipeline.load(tiny_engines("tiny-a"), backend="tpu")


@needs_openvino
def test_bf16_gate_refuses_and_writes_nothing(tiny_model, tmp_path):
    if not ov_backend.cpu_info()["bf16"]:
        pytest.skip("this CPU has no bf16")
    size = TEST_SIZE["tiny-a"]
    out = tmp_path / "e"
    with pytest.raises(SoraError, match="fails the quality gate"):
        run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=out, frames=size["frames"],
                                height=size["height"], width=size["width"], precision="bf16", min_psnr=200.0,
                                check_parity=False))
    assert not out.exists()
    assert not list(tmp_path.glob(".e.build-*"))
