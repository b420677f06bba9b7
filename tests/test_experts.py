"""Wan2.2 A14B's layout (two experts switched at a boundary timestep) against diffusers' WanPipeline.

Two tiny configurations that differ in every dimension (and in scheduler and boundary), exported and run as
sora-run runs them: frames within 1e-3 max abs, final latents within 1e-4 relative, fp32 on the CPU, with a control
whose low-noise guidance differs by 0.1. Which expert runs at each step equals diffusers' rule for boundaries that
switch after the first, a middle and the last but one step; the high-noise expert is let go at the switch. Step
caching and INT8 calibration work per expert; OpenVINO runs both.
"""

import gc
import json
import shutil
import weakref

import numpy as np
import pytest
import torch

from soraedge.export.build import ExportConfig, run_export
from soraedge.export.checkpoint import read_checkpoint
from soraedge.runtime.backends import openvino as ov_backend
from soraedge.runtime.errors import SoraError
from soraedge.runtime.experts import HIGH, LOW, ExpertSwitch
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline
from soraedge.runtime.sampler import sample
from soraedge.runtime.schedulers import scheduler_from_config

from conftest import TEST_SIZE

PROMPT, NEGATIVE = "a red fox runs on the beach at sunset", "low quality, blurry"
FRAME_TOL, LATENT_RTOL = 1e-3, 1e-4


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,steps,guidance,guidance_2", [("tiny-a14b-a", 4, 5.0, 3.0),
                                                            ("tiny-a14b-b", 3, 4.0, None)])
def test_two_experts_match_wan_pipeline(name, steps, guidance, guidance_2, tiny_model, experts_engines):
    from diffusers import WanPipeline

    ref_pipe = WanPipeline.from_pretrained(tiny_model(name))
    ref_pipe.set_progress_bar_config(disable=True)
    assert ref_pipe.transformer_2 is not None and ref_pipe.config.boundary_ratio is not None
    ours = Pipeline.load(experts_engines(name))
    assert ours.experts and ours.manifest.config["family"] == "wan2.2-t2v-a14b"
    size = TEST_SIZE[name]
    noise = np.random.default_rng(7).standard_normal(ours.latent_shape(size["height"], size["width"], size["frames"]),
                                                     dtype=np.float32)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=size["height"], width=size["width"],
              num_frames=size["frames"], num_inference_steps=steps, guidance_scale=guidance,
              guidance_scale_2=guidance_2)
    ref_lat = ref_pipe(**kw, latents=torch.from_numpy(noise), output_type="latent").frames.numpy()
    ref_frames = ref_pipe(**kw, latents=torch.from_numpy(noise), output_type="np").frames[0]
    ran = []
    got = ours(PROMPT, NEGATIVE, size["height"], size["width"], size["frames"], steps, guidance, latents=noise,
               guidance_2=guidance_2, observe=lambda feeds, out: ran.append(float(feeds["timestep"][0])))
    assert _rel(got.latents, ref_lat) < LATENT_RTOL, f"final latents: relative error {_rel(got.latents, ref_lat):.2e}"
    assert float(np.abs(got.frames - ref_frames).max()) < FRAME_TOL
    boundary = ref_pipe.config.boundary_ratio * ref_pipe.scheduler.config.num_train_timesteps
    assert min(ran) < boundary <= max(ran), "both experts ran"

    # control: the scale asked for changed by 0.1 (the low-noise expert's where one is given) fails the bound
    changed = dict(guidance_2=guidance_2 + 0.1) if guidance_2 else dict(guidance=guidance + 0.1)
    control = ours(PROMPT, NEGATIVE, size["height"], size["width"], size["frames"], steps,
                   **{"guidance": guidance, "guidance_2": guidance_2, **changed}, latents=noise, output_type="latent")
    assert _rel(control.latents, ref_lat) > LATENT_RTOL, f"the bound cannot tell {changed}"


@pytest.mark.parametrize("switch_after", ["first", "middle", "last but one", "exactly at a timestep"])
def test_the_expert_of_each_step_is_diffusers_choice(switch_after, tiny_model):
    """Our scheduler's timesteps through the switch against diffusers' rule on diffusers' own timesteps, for
    boundaries placed after the first, a middle and the last but one step, and on a timestep (which the high-noise
    expert takes); the previous expert is released before the next one opens."""
    from diffusers import UniPCMultistepScheduler

    config = json.loads((tiny_model("tiny-a14b-a") / "scheduler" / "scheduler_config.json").read_text())
    steps = 6
    ref = UniPCMultistepScheduler.from_config(config)
    ref.set_timesteps(steps)
    ts = [float(t) for t in ref.timesteps]
    k = {"first": 1, "middle": steps // 2, "last but one": steps - 1}.get(switch_after)
    boundary = (ts[k - 1] + ts[k]) / 2 if k else ts[steps // 2]  # between steps k-1 and k, or on one (t >= it)
    expected = [HIGH if t >= boundary else LOW for t in ts]

    alive = {}

    class Expert:  # a Denoiser whose prediction is a constant: the loop's arithmetic is not what is tested here
        max_batch = 2

        def __call__(self, latents, timestep, context):
            return np.zeros_like(latents)

    def open_expert(name):
        assert all(r() is None for r in alive.values()), "the other expert is still held"
        expert = Expert()
        alive[name] = weakref.ref(expert)
        return expert

    switch = ExpertSwitch(open_expert, 2, boundary, 5.0, 3.0)
    x = np.zeros((1, 4, 2, 2, 2), np.float32)
    ctx = np.zeros((1, 3, 8), np.float32)
    gc.disable()  # the released expert must go by reference counting alone
    try:
        sample(switch, scheduler_from_config(config), x, ctx, ctx, switch.guidance, steps)
    finally:
        gc.enable()
    assert switch.ran == expected  # CFG as one batch of 2: one call per step
    assert [switch.guidance(t) for t in ts] == [5.0 if e == HIGH else 3.0 for e in expected]


def test_with_low_memory_no_expert_is_held_once_the_vae_opens(experts_engines):
    """--low-memory: one expert at a time while denoising, and none (nor a probe) once decoding starts; released by
    reference counting alone, as the memory bench measures it."""
    pipe = Pipeline.load(experts_engines("tiny-a14b-a"), low_memory=True)
    opened, open_engine = {}, pipe._open

    def tracked(name):
        if name.startswith("vae_"):
            assert not [n for n, ref in opened.items() if ref() is not None], "a DiT engine is still held"
        engine = open_engine(name)
        if not name.startswith(("vae_", "text_")):
            opened[name] = weakref.ref(engine)
        return engine

    pipe._open = tracked
    gc.disable()
    try:
        pipe(PROMPT, NEGATIVE, **TEST_SIZE["tiny-a14b-a"], steps=8, guidance=5.0, guidance_2=3.0, step_cache=0.0)
    finally:
        gc.enable()
    assert {HIGH, LOW} <= set(opened)


def test_a_half_described_two_expert_pipeline_is_refused(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model("tiny-a14b-a"), tmp_path / "m")
    index = json.loads((model / "model_index.json").read_text())
    for bad in ({"boundary_ratio": None}, {"boundary_ratio": 1.5}, {"transformer_2": [None, None]}):
        (model / "model_index.json").write_text(json.dumps({**index, **bad}))
        with pytest.raises(SoraError, match="needs both transformer_2 and a boundary_ratio between 0 and 1"):
            read_checkpoint(model)
    (model / "model_index.json").write_text(json.dumps(index))
    config = json.loads((model / "transformer_2" / "config.json").read_text())
    (model / "transformer_2" / "config.json").write_text(json.dumps({**config, "text_dim": 7}))
    with pytest.raises(SoraError, match="transformer_2: text_dim differ from transformer's"):
        read_checkpoint(model)


def test_step_caching_gives_each_expert_its_own_probe_and_starts_afresh_at_the_switch(experts_engines):
    """Threshold 0 computes exactly what the uncached run computes; a large one skips calls within each expert's
    stretch but never across the switch: the low-noise expert's first step always runs its own DiT."""
    pipe = Pipeline.load(experts_engines("tiny-a14b-a"))
    assert {"dit_probe", "dit_probe_2"} <= set(pipe.manifest.engine_names)
    size, steps = TEST_SIZE["tiny-a14b-a"], 8
    noise = np.random.default_rng(5).standard_normal(pipe.latent_shape(**size), dtype=np.float32)
    ran = []

    def run(step_cache):
        ran.clear()
        return pipe(PROMPT, NEGATIVE, **size, steps=steps, guidance=5.0, guidance_2=3.0, latents=noise,
                    output_type="latent", step_cache=step_cache, observe=lambda feeds, out: ran.append(
                        HIGH if feeds["timestep"][0] >= pipe.boundary else LOW))

    plain = run(None)
    assert plain.dit_evaluations == steps and HIGH in ran and LOW in ran
    exact = run(0.0)
    assert exact.dit_evaluations == steps and np.array_equal(exact.latents, plain.latents)
    cached = run(1e9)  # every step after each expert's first is skipped
    assert cached.dit_evaluations == 2 and ran == [HIGH, LOW]
    assert np.isfinite(cached.latents).all()


def test_int8_calibrates_each_expert_on_the_steps_it_runs(tiny_model, experts_engines, tmp_path):
    """--dit-precision int8 on two experts: one calibration run of the fp32 pipeline, each expert quantized from
    its own steps (their counts add up to every step), both gated like any reduced DiT."""
    from soraedge.precision.calib.config import CalibConfig

    experts_engines("tiny-a14b-a")  # its traced graphs
    out = tmp_path / "int8"
    run_export(ExportConfig(model=str(tiny_model("tiny-a14b-a")), out=out, **TEST_SIZE["tiny-a14b-a"],
                            max_sequence_length=512, component_precision=(("transformer", "int8"),), backend="ort",
                            check_parity=False, calib=CalibConfig(prompts=2, steps=8)))
    m = load_manifest(out)
    engines = m.data["engines"]
    details = {e: engines[e]["detail"] for e in (HIGH, LOW)}
    assert all(engines[e]["precision"] == "int8" for e in details)
    assert sum(d["samples"] for d in details.values()) == 2 * 8 and min(d["samples"] for d in details.values()) > 0
    assert m.runtime["quality_gate"]["passed"]
    with pytest.raises(SoraError, match="gives transformer_2 no step to record"):
        run_export(ExportConfig(model=str(tiny_model("tiny-a14b-a")), out=tmp_path / "e", **TEST_SIZE["tiny-a14b-a"],
                                max_sequence_length=512, component_precision=(("transformer", "int8"),),
                                backend="ort", check_parity=False, calib=CalibConfig(prompts=1, steps=1)))
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(not ov_backend.available(), reason="OpenVINO is not installed")
def test_two_experts_run_on_openvino_and_its_bf16_passes_through_the_gate(experts_engines, tmp_path):
    """The target build (sora-build) of the two-expert engines for OpenVINO: both experts run there, as on ONNX
    Runtime; bf16 execution, where the CPU has it, is gated against the fp32 engines like any other."""
    from soraedge.target.build import TargetConfig, build_from_engines

    src = experts_engines("tiny-a14b-a")
    size = TEST_SIZE["tiny-a14b-a"]
    noise = np.random.default_rng(3).standard_normal(Pipeline.load(src).latent_shape(**size), dtype=np.float32)
    ort = Pipeline.load(src, backend="ort")(PROMPT, NEGATIVE, **size, steps=3, guidance=5.0, guidance_2=3.0,
                                            latents=noise, output_type="latent").latents
    build_from_engines(TargetConfig(src, tmp_path / "ov", backend="openvino", precision="fp32", threads=2))
    ov = Pipeline.load(tmp_path / "ov")
    assert ov.backend == "openvino" and ov.experts
    got = ov(PROMPT, NEGATIVE, **size, steps=3, guidance=5.0, guidance_2=3.0, latents=noise,
             output_type="latent").latents
    assert _rel(got, ort) < 1e-3
    if ov_backend.cpu_info()["bf16"]:
        build_from_engines(TargetConfig(src, tmp_path / "bf16", backend="openvino", precision="bf16", threads=2))
        gate = load_manifest(tmp_path / "bf16").runtime["quality_gate"]
        assert gate["passed"] and gate["execution_precision"] == "bf16"
