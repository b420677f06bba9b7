"""The built-in demo model: diffusers' WanPipeline runs it with all-MiniLM-L6-v2 as its text encoder, and
sora-run's engines match that reference; generated videos show the prompt's colour and motion to the probe.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soraedge.demo.pipeline_dir import DEMO_DEFAULTS, build_demo_pipeline
from soraedge.demo.probe import read_video
from soraedge.demo.toy_world import HELD_OUT
from soraedge.runtime.pipeline import Pipeline

FRAME_TOL, LATENT_RTOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from soraedge.export.build import ExportConfig, run_export

    root = tmp_path_factory.mktemp("demo")
    run_export(ExportConfig(model="demo", out=root / "engines", backend="ort"))  # parity-checked per component
    return build_demo_pipeline(root / "src"), Pipeline.load(root / "engines")


def test_wan_pipeline_with_minilm_matches_sora_run(demo):
    from diffusers import WanPipeline

    src, ours = demo
    ref = WanPipeline.from_pretrained(src)
    ref.set_progress_bar_config(disable=True)
    prompt, h, w, f = HELD_OUT[0].caption, DEMO_DEFAULTS["height"], DEMO_DEFAULTS["width"], DEMO_DEFAULTS["frames"]
    noise = np.random.default_rng(3).standard_normal(ours.latent_shape(h, w, f), dtype=np.float32)
    kw = dict(prompt=prompt, negative_prompt="", height=h, width=w, num_frames=f, num_inference_steps=4,
              guidance_scale=DEMO_DEFAULTS["guidance"], max_sequence_length=DEMO_DEFAULTS["max_sequence_length"])
    ref_lat = ref(**kw, latents=torch.from_numpy(noise), output_type="latent").frames.numpy()
    ref_frames = ref(**kw, latents=torch.from_numpy(noise), output_type="np").frames[0]  # [F, H, W, 3]
    got = ours(prompt, "", h, w, f, 4, DEMO_DEFAULTS["guidance"], latents=noise)
    assert float(np.abs(got.latents - ref_lat).max() / np.abs(ref_lat).max()) < LATENT_RTOL
    assert float(np.abs(got.frames - ref_frames).max()) < FRAME_TOL


def test_generated_videos_show_the_prompt(demo):
    """Meaning, not numbers: on twelve training prompts the shipped weights draw the object in the asked colour, flat
    by the probe's strict reading (at least 80% of its pixels that colour), and move it the way asked. A model that
    ignored its prompt would score ~1/12 on the colour and ~1/6 on the motion; these weights read 12 and 12 of 12
    (seed 11, AMD EPYC). bench/demo_probe.py measures the held-out combinations and the shape: docs/demo.md has
    the numbers."""
    from soraedge.demo.toy_world import TRAIN_SCENES

    _, ours = demo
    scenes = TRAIN_SCENES[::8]  # 12 scenes
    verdicts = [read_video(np.round(ours(s.caption, seed=11).frames * 255)) for s in scenes]
    colour = sum(v.colour == s.colour for v, s in zip(verdicts, scenes))
    motion = sum(v.motion == s.motion for v, s in zip(verdicts, scenes))
    assert colour >= 9 and motion >= 9, [(s.caption, v) for s, v in zip(scenes, verdicts)]
