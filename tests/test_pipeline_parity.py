"""The whole sora-run path (ONNX Runtime engines, numpy schedulers) against diffusers' WanPipeline.

Same tiny random pipeline directory, prompt, negative prompt, steps, guidance and initial latents; fp32 on CPU.
Bounds: frames within 1e-3 max abs error, final latents within 1e-4 relative error. A control run with guidance
changed by 0.1 must fail the latent bound, so the test is shown able to fail.
"""

import numpy as np
import pytest
import torch

from conftest import TEST_SIZE
from soraedge.runtime.pipeline import Pipeline

PROMPT = "a red fox runs on the beach at sunset, &amp; waves"
NEGATIVE = "low quality,   blurry"
FRAME_TOL, LATENT_RTOL = 1e-3, 1e-4

# UniPC, flow-match Euler, the no-CFG branch, and a frame count other than the one recorded at export (chunked VAE)
CASES = [("tiny-a", 5.0, 4, None), ("tiny-b", 3.0, 3, None), ("tiny-a", 1.0, 2, None), ("tiny-a", 5.0, 2, 13)]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,guidance,steps,frames", CASES)
def test_sora_run_matches_wan_pipeline(name, guidance, steps, frames, tiny_model, tiny_engines):
    from diffusers import WanPipeline

    size = {**TEST_SIZE[name], **({"frames": frames} if frames else {})}
    ref_pipe = WanPipeline.from_pretrained(tiny_model(name))
    ref_pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.load(tiny_engines(name))
    shape = ours.latent_shape(size["height"], size["width"], size["frames"])
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=size["height"], width=size["width"],
              num_frames=size["frames"], num_inference_steps=steps, guidance_scale=guidance)

    ref_lat = ref_pipe(**kw, latents=torch.from_numpy(noise), output_type="latent").frames.numpy()
    ref_frames = ref_pipe(**kw, latents=torch.from_numpy(noise), output_type="np").frames[0]  # [F, H, W, 3]
    got = ours(PROMPT, NEGATIVE, size["height"], size["width"], size["frames"], steps,
                guidance, latents=noise)

    assert got.frames.shape == ref_frames.shape
    frame_err = float(np.abs(got.frames - ref_frames).max())
    latent_err = _rel(got.latents, ref_lat)
    assert latent_err < LATENT_RTOL, f"final latents: relative error {latent_err:.2e}"
    assert frame_err < FRAME_TOL, f"frames: max abs error {frame_err:.2e}"

    if guidance > 1.0:  # control: a run that differs a little must fail the same bound
        control = ours(PROMPT, NEGATIVE, size["height"], size["width"], size["frames"], steps, guidance + 0.1,
                       latents=noise, output_type="latent")
        assert _rel(control.latents, ref_lat) > LATENT_RTOL, "the parity bound cannot tell guidance g from g+0.1"


def test_a_few_step_recipe_with_a_swapped_scheduler_matches_wan_pipeline(tiny_model, tiny_engines):
    """A distillation LoRA's published recipe on engines exported with UniPC: 4 steps, guidance 1 (one DiT call per
    step, no negative branch), Euler with shift 5, against WanPipeline with the same scheduler swap; with the
    exported scheduler instead (the control) the latents differ beyond the bound."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    size = TEST_SIZE["tiny-a"]
    ref_pipe = WanPipeline.from_pretrained(tiny_model("tiny-a"))
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref_pipe.scheduler.config, shift=5.0)
    ours = Pipeline.load(tiny_engines("tiny-a"))
    noise = np.random.default_rng(3).standard_normal(ours.latent_shape(**size), dtype=np.float32)
    ref_lat = ref_pipe(prompt=PROMPT, height=size["height"], width=size["width"], num_frames=size["frames"],
                       num_inference_steps=4, guidance_scale=1.0, latents=torch.from_numpy(noise),
                       output_type="latent").frames.numpy()
    calls = []
    got = ours(PROMPT, None, size["height"], size["width"], size["frames"], 4, 1.0, latents=noise,
               output_type="latent", scheduler="euler", flow_shift=5.0,
               observe=lambda feeds, out: calls.append(feeds["timestep"].shape[0]))
    assert calls == [1, 1, 1, 1] and got.dit_evaluations == 4
    assert _rel(got.latents, ref_lat) < LATENT_RTOL, f"final latents: relative error {_rel(got.latents, ref_lat):.2e}"
    control = ours(PROMPT, None, size["height"], size["width"], size["frames"], 4, 1.0, latents=noise,
                   output_type="latent")
    assert _rel(control.latents, ref_lat) > LATENT_RTOL
