"""`--precision auto` (the default): fp32 graphs, and on a CPU with bf16 the execution precision that the DiT step
timings and the quality gate choose (target/gated_choice.py): bf16 where its step beats the fastest fp32 one by
BF16_MIN_SPEEDUP and it passes the gate. A bf16 choice that fails the gate falls back to the fastest fp32
candidate; an explicit bf16 that fails it is refused. Real exports, real gate runs."""

import numpy as np
import pytest

from conftest import TEST_SIZE
from soraedge.export.build import ExportConfig, run_export
from soraedge.target.choose import BF16_MIN_SPEEDUP
from soraedge.target.gated_choice import gate_target
from soraedge.precision.convert import RUN_FRACTION, plan_precision
from soraedge.runtime.backends import openvino as ov_backend
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline

SIZE = {k: TEST_SIZE["tiny-a"][k] for k in ("frames", "height", "width")}
needs_bf16 = pytest.mark.skipif(not (ov_backend.available() and ov_backend.cpu_info()["bf16"]),
                                reason="needs OpenVINO on a CPU with bf16")


def _step(runtime, b, p):
    return runtime["timings"][f"{b}-{p}"]["step_s"]


def test_auto_is_the_default_and_keeps_the_graphs_fp32():
    assert ExportConfig(model="demo", out="x").precision == "auto"
    assert plan_precision("auto", {})[0] == {c: "fp32" for c in ("transformer", "text_encoder", "vae")}
    assert plan_precision("auto", {"transformer": "int8-dynamic"})[0]["transformer"] == "int8-dynamic"


@needs_bf16
def test_auto_export_ships_what_the_timings_choose_and_the_gate_passes(tiny_model, tmp_path):
    out = tmp_path / "e"
    run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=out, **SIZE, check_parity=False))
    m = load_manifest(out)
    runtime = m.runtime
    assert m.precision == {c: "fp32" for c in ("transformer", "text_encoder", "vae")}
    assert runtime["asked"] == {"backend": "auto", "precision": "auto"}
    assert runtime["candidates"] == [["ort", "fp32"], ["openvino", "fp32"], ["openvino", "bf16"]]
    chosen = (runtime["backend"], runtime["precision"])
    fp32 = min([("ort", "fp32"), ("openvino", "fp32")], key=lambda c: _step(runtime, *c))
    bf16_won = _step(runtime, "openvino", "bf16") * BF16_MIN_SPEEDUP <= _step(runtime, *fp32)
    assert runtime["bf16_min_speedup"] == BF16_MIN_SPEEDUP
    if "rejected" in runtime:  # bf16 won on time and failed the gate: the fastest fp32 ships
        assert bf16_won and not runtime["rejected"]["quality_gate"]["passed"]
        assert chosen == fp32
    else:
        assert chosen == (("openvino", "bf16") if bf16_won else fp32)
    if chosen[1] == "bf16":
        gate = runtime["quality_gate"]
        assert gate["passed"] and gate["execution_precision"] == "bf16" and min(gate["psnr_db"]) >= 30.0
    else:
        assert "quality_gate" not in runtime  # nothing reduced ships: nothing to gate
    pipe = Pipeline.load(out)
    assert (pipe.backend, pipe.precision) == chosen
    assert pipe("a red fox", steps=2, seed=0).frames.shape[0] == SIZE["frames"]


def _bf16_won(asked: str) -> dict:
    """A target choice in which OpenVINO's bf16 step was the fastest (the timings are what decides; these are set so
    that the fallback's choice among the fp32 candidates is known)."""
    return {"timings": {"ort-fp32": {"step_s": 2.0}, "openvino-fp32": {"step_s": 1.5},
                        "openvino-bf16": {"step_s": 1.0}},
            "candidates": [["ort", "fp32"], ["openvino", "fp32"], ["openvino", "bf16"]],
            "asked": {"backend": "auto", "precision": asked}, "backend": "openvino", "precision": "bf16"}


@needs_bf16
def test_a_bf16_choice_that_fails_the_gate_falls_back_and_an_asked_one_is_refused(tiny_engines):
    engines = tiny_engines("tiny-a")  # fp32 graphs: the reference and the candidate are the same files
    plan = load_manifest(engines).precision
    runtime = gate_target(engines, engines, _bf16_won("auto"), plan, 200.0, 2, print)
    assert "quality_gate" not in runtime  # fp32 ships: nothing to gate
    assert (runtime["backend"], runtime["precision"]) == ("openvino", "fp32")  # the fastest fp32 candidate
    rejected = runtime["rejected"]
    assert (rejected["backend"], rejected["precision"]) == ("openvino", "bf16")
    assert not rejected["quality_gate"]["passed"] and 20.0 < min(rejected["quality_gate"]["psnr_db"]) < 200.0

    asked = _bf16_won("auto")
    runtime = gate_target(engines, engines, asked, plan, None, 2, print)  # the default threshold: 30 dB for bf16
    gate = runtime["quality_gate"]
    assert gate["passed"] and gate["min_psnr_db"] == 30.0 and "quality_gate" not in asked  # a new record
    assert (runtime["backend"], runtime["precision"]) == ("openvino", "bf16") and "rejected" not in runtime

    with pytest.raises(SoraError, match="bf16 execution on openvino fails the quality gate"):
        gate_target(engines, engines, _bf16_won("bf16"), plan, 200.0, 2, print)


@needs_bf16
def test_a_failed_bf16_choice_over_reduced_graphs_gates_the_fp32_fallback_too(dynamic_engines, tiny_engines):
    """int8-dynamic DiT graphs, bf16 chosen for speed: at 55 dB bf16 fails (about 45 dB on tiny-a) and the fp32
    fallback, whose graphs are still reduced, is gated in turn and passes (about 72 dB); at 100 dB it fails too and
    the export is refused, because the int8-dynamic graphs were asked for."""
    reference = tiny_engines("tiny-a")
    plan = load_manifest(dynamic_engines).precision
    assert plan["transformer"] == "int8-dynamic"
    runtime = gate_target(reference, dynamic_engines, _bf16_won("auto"), plan, 55.0, 2, print)
    assert (runtime["backend"], runtime["precision"]) == ("openvino", "fp32")
    assert not runtime["rejected"]["quality_gate"]["passed"]
    gate = runtime["quality_gate"]
    assert gate["passed"] and gate["execution_precision"] == "fp32"
    with pytest.raises(SoraError, match="int8-dynamic transformer on openvino fails the quality gate"):
        gate_target(reference, dynamic_engines, _bf16_won("auto"), plan, 100.0, 2, print)


def test_a_text_encoder_whose_fp32_form_does_not_fit_is_exported_weight_only(tmp_path, monkeypatch):
    """`auto` where the text encoder's fp32 weights exceed the machine's memory (here: the available memory set
    between its fp32 size and every other component's): it is exported weight-only int8 from the start, checked
    against PyTorch run block by block at full size, said in one line and in the manifest, and the engines generate;
    the gate, whose reference holds the same encoder, has nothing to measure. With the per-token bound set above
    what int8 reaches (the control), the same export is refused, nothing written."""
    from soraedge.export import build
    from soraedge.export.checkpoint import read_checkpoint
    from soraedge.export.tiny_wan import TinyWanConfig, build_tiny_wan

    model = build_tiny_wan(tmp_path / "model", TinyWanConfig(text_dim=64, seed=3))
    params = build._check_sizes(read_checkpoint(model))
    available = int(2 * (params["text_encoder"] + max(params["transformer"], params["vae"])) / RUN_FRACTION)
    assert 4 * params["text_encoder"] > RUN_FRACTION * available > 4 * max(params["transformer"], params["vae"])
    monkeypatch.setattr(build, "available_bytes", lambda: available)
    cfg = ExportConfig(model=str(model), out=tmp_path / "e", **SIZE, backend="ort")
    logged = []
    run_export(cfg, log=logged.append)
    m = load_manifest(tmp_path / "e")
    assert m.precision["text_encoder"] == "int8" and m.precision["transformer"] == "fp32"
    assert "do not run within this machine's" in m.data["precision_notes"]["text_encoder"]
    assert any(line.startswith("text_encoder: weight-only int8: its fp32 weights") for line in logged)
    check = m.data["engines"]["text_encoder"]["pytorch_check"]
    assert check["threshold"] <= check["min_token_cosine"] <= 1.0
    assert m.data["engines"]["text_encoder"]["detail"]["quantized"] > 0
    # the gate's reference holds the same int8 encoder and everything else ships fp32: nothing for it to measure
    assert "quality_gate" not in m.runtime and not any("quality gate" in line for line in logged)
    video = Pipeline.load(tmp_path / "e")("a red ball", steps=2, seed=0).frames
    assert video.shape[0] == SIZE["frames"] and np.isfinite(video).all()

    monkeypatch.setattr(build, "MIN_TOKEN_COSINE", check["min_token_cosine"] + 1e-4)
    with pytest.raises(SoraError, match="text encoder's embeddings differ from PyTorch's"):
        run_export(ExportConfig(model=str(model), out=tmp_path / "f", **SIZE, backend="ort"))
    assert not (tmp_path / "f").exists()
