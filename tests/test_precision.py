"""FP16 and INT8 engines against the fp32 engines (themselves checked against PyTorch): they load, run, stay
finite, pass the quality gate with the PSNR recorded; the Q/DQ sits around the linear layers and nowhere in the
layers kept float; ONNX Runtime turns it into integer kernels; a clipped calibration is refused and nothing is
written."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from soraedge.precision.calib.config import CalibConfig
from soraedge.precision.calib.smoothquant import smooth_linears
from soraedge.precision.calib.trajectories import collect_dit_inputs
from soraedge.cli.export_cmd import main as export_main
from soraedge.export.build import ExportConfig, run_export
from soraedge.precision.graph_scopes import in_modules, node_module
from soraedge.precision.convert import default_min_psnr, plan_precision
from soraedge.precision.quality_gate import psnr
from soraedge.runtime.backends.openvino import available as openvino_available
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline

from conftest import TEST_SIZE

SIZE = TEST_SIZE["tiny-a"]
FAST_CALIB = CalibConfig(prompts=2, steps=4)


@pytest.fixture(scope="session")
def reduced_engines(tmp_path_factory, tiny_model):
    """'int8' (DiT int8, text encoder weight-only int8) and 'fp16' (DiT and VAE fp16) exports of tiny-a."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"tiny-a-{kind}") / "engines"
            run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=out, **SIZE, precision=kind, backend="ort",
                                    check_parity=False, calib=FAST_CALIB))
            cache[kind] = out
        return cache[kind]

    return get


def _generate(engine_dir, prompt="a red fox runs in the snow", backend=None):
    pipe = Pipeline.load(engine_dir, backend=backend)
    noise = np.random.default_rng(3).standard_normal(pipe.latent_shape(SIZE["height"], SIZE["width"],
                                                                       SIZE["frames"]), dtype=np.float32)
    return pipe(prompt, **SIZE, steps=6, latents=noise).frames


@pytest.mark.parametrize("kind, plan, threshold", [
    ("int8", {"transformer": "int8", "text_encoder": "int8", "vae": "fp32"}, 30.0),
    ("fp16", {"transformer": "fp16", "text_encoder": "fp32", "vae": "fp16"}, 40.0),
])
def test_reduced_engines_run_and_pass_the_gate(kind, plan, threshold, reduced_engines, tiny_engines):
    m = load_manifest(reduced_engines(kind))
    assert m.data["precision"] == plan
    gate = m.runtime["quality_gate"]
    assert gate["min_psnr_db"] == threshold and min(gate["psnr_db"]) >= threshold
    assert all(len(c) == gate["steps"] and min(c) > 0.99 for c in gate["dit_step_cosine"])
    assert min(gate["text_embedding_cosine"]) >= 0.99
    frames = _generate(m.root)
    assert np.isfinite(frames).all()
    score = psnr(frames, _generate(tiny_engines("tiny-a")))  # same latents, more steps than the gate
    print(f"{kind}: PSNR {score:.1f} dB against the fp32 engines")
    assert score >= threshold


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed (no wheel for this platform)")
def test_int8_engines_run_on_openvino(reduced_engines, tiny_engines):
    """The same Q/DQ DiT and weight-only (MatMulNBits) text encoder on OpenVINO, which runs the linears as u8 x i8
    kernels: within the gate of the fp32 engines, and close to ONNX Runtime running the same files."""
    root = reduced_engines("int8")
    ov = Pipeline.load(root, backend="openvino")
    assert ov.backend == "openvino" and ov.precision == "fp32"
    frames = _generate(root, backend="openvino")
    assert np.isfinite(frames).all()
    against_fp32 = psnr(frames, _generate(tiny_engines("tiny-a")))
    against_ort = psnr(frames, _generate(root, backend="ort"))
    print(f"int8 on OpenVINO: {against_fp32:.1f} dB against the fp32 engines, {against_ort:.1f} dB against ORT int8")
    assert against_fp32 >= 30.0 and against_ort >= 30.0


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_int8_qdq_sits_around_the_linear_layers_only(reduced_engines):
    root = reduced_engines("int8")
    model = onnx.load(str(root / "transformer.onnx"), load_external_data=False)
    prod = _producers(model)
    kept = load_manifest(root).data["engines"]["transformer"]["detail"]["kept_float_modules"]
    assert {"condition_embedder", "proj_out", "patch_embedding"} <= set(kept)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    for n in matmuls:
        dq = [i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input]
        if in_modules(node_module(n), tuple(kept)):
            assert not any(dq), n.name
        elif node_module(n).startswith("blocks."):
            assert all(dq), n.name  # both the activation and the weight
    in_blocks = [n for n in matmuls if node_module(n).startswith("blocks.")]
    assert in_blocks and len(in_blocks) < len(matmuls)
    # weights: int8, symmetric (zero point 0), per output channel
    inits = {i.name: i for i in model.graph.initializer}
    weight_dq = [prod[n.input[1]] for n in in_blocks]
    for dq in weight_dq:
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        zp = onnx.numpy_helper.to_array(inits[dq.input[2]])
        assert zp.ndim == 1 and zp.size > 1 and not zp.any()
    # activations: per tensor, uint8 with a matching zero point (onnxruntime 1.32 can write a QuantizeLinear whose
    # output type disagrees with its zero point under other settings)
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].data_type == onnx.TensorProto.UINT8 and not inits[q.input[2]].dims
    # SmoothQuant's 1/s is folded into the producers of the quantized linears' inputs; a Mul pass over an
    # activation is left only before the FFN's second linears (after GELU, nothing to fold into)
    smooth = load_manifest(root).data["engines"]["transformer"]["detail"]["smoothquant"]
    assert smooth["smoothed_inputs"] > 0 and smooth["output_rel_err"] < 1e-4
    after_mul = _muls_on_latent_tensors(model)
    assert after_mul and all(node_module(n).endswith("ffn.net.2") for n in after_mul)


def test_int8_runs_integer_kernels_on_the_cpu(reduced_engines, tmp_path):
    """After ORT's graph optimisation every quantized MatMul is an integer GEMM (MatMulIntegerToFloat)."""
    root = reduced_engines("int8")
    quantized = load_manifest(root).data["engines"]["transformer"]["detail"]["quantized_matmuls"]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(root / "transformer.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") == quantized > 0
    assert "QLinearMatMul" not in ops


def test_text_encoder_weight_only_int8(reduced_engines):
    root = reduced_engines("int8")
    model = onnx.load(str(root / "text_encoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    detail = load_manifest(root).data["engines"]["text_encoder"]["detail"]
    assert ops.count("MatMulNBits") == detail["quantized"] == detail["matmuls"] > 0
    assert detail["bits"] == 8


def test_fp16_keeps_its_islands_in_fp32(reduced_engines):
    root = reduced_engines("fp16")
    model = onnx.load(str(root / "transformer.onnx"), load_external_data=False)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    prod = _producers(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert sum(t == onnx.TensorProto.FLOAT16 for t in types.values()) > len(types) // 2
    norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "RMSNormalization")]
    assert norms
    for n in norms:  # fed by a Cast to fp32 or by other fp32 nodes, with fp32 scale
        if n.input[0] in prod and prod[n.input[0]].op_type == "Cast":
            assert next(a.i for a in prod[n.input[0]].attribute if a.name == "to") == onnx.TensorProto.FLOAT
        assert types.get(n.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    kept = [n for n in model.graph.node if node_module(n).startswith("proj_out") and n.op_type == "MatMul"]
    assert kept and all(types.get(n.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in kept)


def test_gate_refuses_a_clipped_calibration_and_keeps_what_was_there(tiny_model, engine_copy):
    """Activation ranges from the 0.1th percentile clip almost every activation: the gate must say no, at the
    threshold a proper calibration of the same model passes (see test_reduced_engines_run_and_pass_the_gate)."""
    before = {p.name: p.read_bytes() for p in engine_copy.iterdir() if p.is_file()}
    bad = CalibConfig(method="percentile", percentile=0.1, prompts=1, steps=4)
    with pytest.raises(SoraError, match="int8 transformer.* fails the quality gate"):
        run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=engine_copy, **SIZE, precision="int8",
                                component_precision=(("text_encoder", "fp32"),), calib=bad, min_psnr=40.0,
                                backend="ort", check_parity=False, overwrite=True))
    assert {p.name: p.read_bytes() for p in engine_copy.iterdir() if p.is_file()} == before
    assert not list(engine_copy.parent.glob(f".{engine_copy.name}.build-*"))


def test_calibration_records_every_step_and_both_branches(tiny_engines):
    samples = collect_dit_inputs(tiny_engines("tiny-a"), ["a red fox", "a blue boat"], 3, SIZE["height"],
                                 SIZE["width"], SIZE["frames"])["transformer"]
    assert len(samples) == 2 * 3
    pipe = Pipeline.load(tiny_engines("tiny-a"), verify=False)
    pipe.scheduler.set_timesteps(3)
    for i, s in enumerate(samples):
        assert s["hidden_states"].shape[0] == 2  # conditional and unconditional in one batch
        assert s["timestep"][0] == np.float32(pipe.scheduler.timesteps[i % 3])
        assert not np.array_equal(s["encoder_hidden_states"][0], s["encoder_hidden_states"][1])


@pytest.mark.parametrize("unfoldable", ["mul", "skip"])
def test_smoothquant_preserves_the_function(tiny_engines, tmp_path, unfoldable):
    """(x / s)(diag(s) W) == x W: the smoothed fp32 graph computes the same output, with 1/s folded into the
    producers of the linear inputs where it folds."""
    src = tiny_engines("tiny-a") / "transformer.onnx"
    samples = collect_dit_inputs(tiny_engines("tiny-a"), ["a red fox"], 2, SIZE["height"], SIZE["width"],
                                 SIZE["frames"])["transformer"]
    summary = smooth_linears(src, tmp_path / "smoothed.onnx", samples, 0.8, set(), unfoldable=unfoldable)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, samples[0])[0]
    b = ort.InferenceSession(str(tmp_path / "smoothed.onnx"), providers=["CPUExecutionProvider"]).run(
        None, samples[0])[0]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert summary["output_rel_err"] <= 1e-4
    # which linear inputs took a scale: per block q/k/v (after the modulated norm), both attention outputs (folded
    # into the value projections), the cross-attention query (norm2's affine), its key/value (the text context)
    # and the FFN's first linear; the FFN's second (after GELU) folds into nothing: a Mul on it, or unsmoothed
    smoothed = onnx.load(str(tmp_path / "smoothed.onnx"), load_external_data=False)
    blocks = {node_module(n).split(".")[1] for n in smoothed.graph.node if node_module(n).startswith("blocks.")}
    assert summary["smoothed_inputs"] - summary["mul_on_input"] >= 5 * len(blocks) + 1  # + the shared text context
    if unfoldable == "skip":
        assert summary["not_smoothed_inputs"] == len(blocks)
        _assert_smoothing_muls_are_small(smoothed)
    else:
        assert summary["not_smoothed_inputs"] == 0
        big = _muls_on_latent_tensors(smoothed)
        assert len(big) == len(blocks) and all(node_module(n).endswith("ffn.net.2") for n in big), big


def _muls_on_latent_tensors(model):
    """The Mul nodes smoothing added on tensors computed from the latents (full activation passes), each paired
    with the node that reads it."""
    from soraedge.precision.calib.scale_folding import _reachable

    big = _reachable(model.graph, {"hidden_states"})
    frontier = {n.output[0] for n in model.graph.node if n.op_type == "Mul" and "_smoothed_" in n.name and
                n.input[0] in big}
    for _ in range(2):  # through QuantizeLinear -> DequantizeLinear in the INT8 graph
        frontier |= {n.output[0] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                     and n.input[0] in frontier}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in frontier]


def _assert_smoothing_muls_are_small(model):
    """Every Mul the smoothing added reads a tensor not computed from the latents (modulation, text context)."""
    added = [n for n in model.graph.node if n.op_type == "Mul" and "_smoothed_" in n.name]
    assert added and not _muls_on_latent_tensors(model)


def test_precision_plan():
    plan, notes = plan_precision("int8", {})
    assert plan == {"transformer": "int8", "text_encoder": "int8", "vae": "fp32"} and "vae" in notes
    plan, notes = plan_precision("fp16", {"text_encoder": "int4"})
    assert plan == {"transformer": "fp16", "text_encoder": "int4", "vae": "fp16"} and not notes
    plan, notes = plan_precision("fp16", {})
    assert plan["text_encoder"] == "fp32" and "overflow" in notes["text_encoder"]
    assert plan_precision("bf16", {})[0] == {c: "fp32" for c in ("transformer", "text_encoder", "vae")}
    with pytest.raises(SoraError, match="vae cannot be int8"):
        plan_precision("fp32", {"vae": "int8"})
    assert default_min_psnr({"transformer": "fp16"}, "fp32") == 40.0
    assert default_min_psnr({"transformer": "int8", "vae": "fp16"}, "fp32") == 30.0


def test_bad_calibration_prompts_file_is_one_line_error(tmp_path):
    out = tmp_path / "e"
    r = CliRunner().invoke(export_main, ["demo", "-o", str(out), "--precision", "int8", "--calib-prompts",
                                         str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.strip().startswith("error: cannot read calibration prompts"), r.output
    assert not out.exists()


def test_impossible_runtime_requests_fail_before_export(tiny_model, tmp_path):
    """bf16 execution is OpenVINO's: asking ONNX Runtime for it fails at once, not after export."""
    lines = []
    with pytest.raises(SoraError, match="bf16 runs on OpenVINO"):
        run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=tmp_path / "e", **SIZE, precision="bf16",
                                backend="ort"), log=lines.append)
    assert not any("exporting" in line for line in lines) and not (tmp_path / "e").exists()
