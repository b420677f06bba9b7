"""Wan2.2 TI2V-5B's layout (per-token timesteps, the Wan2.2 VAE) against diffusers' WanPipeline, text to video.

Two tiny configurations that differ in every dimension the layout leaves free (and in scheduler), exported and run
as sora-run runs them: frames within 1e-3 max abs, final latents within 1e-4 relative, fp32 on the CPU, with a
control whose guidance differs by 0.1. The chunked Wan2.2 decoder against AutoencoderKLWan.decode of the whole clip
at several clip lengths; OpenVINO runs the same engines; fp16 graphs pass through the gate.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from soraedge.export.build import ExportConfig, run_export
from soraedge.export.checkpoint import read_checkpoint
from soraedge.runtime.backends import openvino as ov_backend
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline

PROMPT, NEGATIVE = "a red fox runs on the beach at sunset", "low quality, blurry"
FRAME_TOL, LATENT_RTOL = 1e-3, 1e-4
SIZE = {"tiny-ti2v-a": dict(height=32, width=64, frames=5), "tiny-ti2v-b": dict(height=64, width=32, frames=9)}


@pytest.fixture(scope="module")
def ti2v_engines(tiny_model, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name) / "engines"
            # each graph's own check against PyTorch is left to the export of every other layout: here the whole
            # pipeline is checked against WanPipeline and the chunked decoder against AutoencoderKLWan below
            run_export(ExportConfig(model=str(tiny_model(name)), out=out, **SIZE[name], max_sequence_length=512,
                                    precision="fp32", backend="ort", check_parity=False))
            cache[name] = out
        return cache[name]

    return get


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,steps,guidance", [("tiny-ti2v-a", 4, 5.0), ("tiny-ti2v-b", 3, 4.0)])
def test_ti2v_text_to_video_matches_wan_pipeline(name, steps, guidance, tiny_model, ti2v_engines):
    from diffusers import WanPipeline

    ref_pipe = WanPipeline.from_pretrained(tiny_model(name))
    ref_pipe.set_progress_bar_config(disable=True)
    assert ref_pipe.config.expand_timesteps and ref_pipe.vae.config.patch_size == 2
    ours = Pipeline.load(ti2v_engines(name))
    config = ours.manifest.config
    assert config["family"] == "wan2.2-ti2v-5b" and config["vae_scale_spatial"] == 16
    size = SIZE[name]
    noise = np.random.default_rng(7).standard_normal(ours.latent_shape(size["height"], size["width"], size["frames"]),
                                                     dtype=np.float32)
    assert noise.shape[1] == ref_pipe.vae.config.z_dim
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=size["height"], width=size["width"],
              num_frames=size["frames"], num_inference_steps=steps, guidance_scale=guidance)
    ref_lat = ref_pipe(**kw, latents=torch.from_numpy(noise), output_type="latent").frames.numpy()
    ref_frames = ref_pipe(**kw, latents=torch.from_numpy(noise), output_type="np").frames[0]
    got = ours(PROMPT, NEGATIVE, size["height"], size["width"], size["frames"], steps, guidance, latents=noise)
    assert got.frames.shape == ref_frames.shape
    assert _rel(got.latents, ref_lat) < LATENT_RTOL, f"final latents: relative error {_rel(got.latents, ref_lat):.2e}"
    assert float(np.abs(got.frames - ref_frames).max()) < FRAME_TOL

    control = ours(PROMPT, NEGATIVE, size["height"], size["width"], size["frames"], steps, guidance + 0.1,
                   latents=noise, output_type="latent")
    assert _rel(control.latents, ref_lat) > LATENT_RTOL, "the bound cannot tell guidance + 0.1"


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_the_chunked_wan22_decoder_equals_diffusers_whole_clip_decode(latent_frames, tiny_model, ti2v_engines):
    """The runtime's frame-by-frame decode on the exported graphs against AutoencoderKLWan.decode of the whole
    clip, at clip lengths other than the export's check (3 latent frames); a shifted latent is seen (control)."""
    from diffusers import AutoencoderKLWan

    from soraedge.runtime.vae_decode import ChunkedVaeDecoder

    name = "tiny-ti2v-b"
    pipe = Pipeline.load(ti2v_engines(name))
    vae = AutoencoderKLWan.from_pretrained(tiny_model(name) / "vae").eval()
    z = np.random.default_rng(latent_frames).standard_normal((1, vae.config.z_dim, latent_frames, 3, 2),
                                                             dtype=np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
    decoder = pipe.decoder()
    assert isinstance(decoder, ChunkedVaeDecoder)
    got = np.clip(decoder(z), -1, 1)
    assert got.shape == ref.shape == (1, 3, 4 * latent_frames - 3, 48, 32)
    assert float(np.abs(got - ref).max()) < FRAME_TOL
    z[:, :, -1] += 0.1
    assert float(np.abs(np.clip(decoder(z), -1, 1) - ref).max()) > FRAME_TOL


@pytest.mark.skipif(not ov_backend.available(), reason="OpenVINO is not installed")
def test_ti2v_runs_on_openvino_and_its_fp16_graphs_pass_the_gate(tiny_model, ti2v_engines, tmp_path):
    """OpenVINO builds the same engines (sora-build) and computes what ONNX Runtime computes; the fp16 export's
    DiT and VAE are measured by the gate against the fp32 engines and pass."""
    from soraedge.target.build import TargetConfig, build_from_engines

    name = "tiny-ti2v-a"
    src, size = ti2v_engines(name), SIZE[name]
    noise = np.random.default_rng(3).standard_normal(Pipeline.load(src).latent_shape(**size), dtype=np.float32)
    ort = Pipeline.load(src)(PROMPT, NEGATIVE, **size, steps=3, guidance=5.0, latents=noise)
    build_from_engines(TargetConfig(src, tmp_path / "ov", backend="openvino", precision="fp32", threads=2))
    ov = Pipeline.load(tmp_path / "ov")
    assert ov.backend == "openvino"
    got = ov(PROMPT, NEGATIVE, **size, steps=3, guidance=5.0, latents=noise)
    assert _rel(got.latents, ort.latents) < 1e-3 and float(np.abs(got.frames - ort.frames).max()) < 1e-2

    run_export(ExportConfig(model=str(tiny_model(name)), out=tmp_path / "fp16", **size, max_sequence_length=512,
                            precision="fp16", backend="ort"))
    m = load_manifest(tmp_path / "fp16")
    assert m.precision["transformer"] == m.precision["vae"] == "fp16"
    gate = m.runtime["quality_gate"]
    assert gate["passed"] and min(gate["psnr_db"]) >= gate["min_psnr_db"]


def test_a_per_token_timestep_pipeline_needs_the_2x2_patch(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model("tiny-ti2v-b"), tmp_path / "m")
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "patch_size": [1, 1, 1]}))
    with pytest.raises(SoraError, match="expand_timesteps needs the DiT's spatial patch 2x2"):
        read_checkpoint(model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": "yes"}))
    with pytest.raises(SoraError, match="expand_timesteps is 'yes', not true/false"):
        read_checkpoint(model)
