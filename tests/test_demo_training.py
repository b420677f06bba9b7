"""demo/train.py runs end to end from scratch (a few steps of each phase) and writes a pipeline that sora-export
reads: fp16 safetensors with diffusers configs, latent statistics in the VAE config, and a training log; the
export's checks before tracing (every component's weights well formed and the model its config builds, tensor for
tensor) pass on it. The export of these architectures is tested on the shipped demo weights (test_demo_model.py).
Its decoder-only stage leaves the encoder, and so the DiT's latent space, exactly as it was, and can train on the
saved DiT's denoised latents or on the saved DiT's own samples, each paired with its caption's clip drawn where the
DiT put the object; its dit-more stage continues the saved DiT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from soraedge.demo.train import main as train_main


def test_training_from_scratch_writes_weights_the_exporter_reads(tmp_path):
    from soraedge.export import build

    args = ["--out", str(tmp_path / "w"), "--vae-steps", "2", "--vae-clip-steps", "1", "--decoder-steps", "1",
            "--dit-steps", "2", "--clips", "8", "--check-clips", "2"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "w" / "train_log.json").read_text())
    assert [p["window"] for p in log["vae"]["phases"]] == [5, 17, 17]
    assert [p["decoder_only"] for p in log["vae"]["phases"]] == [False, False, True]
    assert [p["steps"] for p in log["dit"]["phases"]] == [2] and log["vae_check"]["n"] == 2
    check = CliRunner().invoke(train_main, ["--out", str(tmp_path / "w"), "--stage", "check", "--check-clips", "2"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.output.strip().splitlines()[-1]) == log["vae_check"]  # the same reading, no training
    vae_config = json.loads((tmp_path / "w" / "vae" / "config.json").read_text())
    assert len(vae_config["latents_mean"]) == len(vae_config["latents_std"]) == vae_config["z_dim"]
    assert all(s > 0 for s in vae_config["latents_std"])
    (tmp_path / "src").mkdir()
    ck, _, source = build._prepare_source(build.ExportConfig(model="demo", out=tmp_path / "e",
                                                             demo_weights=str(tmp_path / "w")), tmp_path / "src")
    assert source == f"demo (weights {(tmp_path / 'w').resolve()})"
    params = build._check_sizes(ck)
    assert set(params) == {"text_encoder", "transformer", "vae"} and all(n > 0 for n in params.values())
    dit_file = tmp_path / "w" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = load_file(dit_file)
    more = CliRunner().invoke(train_main, ["--out", str(tmp_path / "w"), "--stage", "dit-more", "--dit-steps", "1",
                                           "--dit-lr", "1e-2", "--clips", "8", "--object-weight", "4", "--grow", "1",
                                           "--decoded-weight", "1", "--decoded-sigma", "1", "--fill-weight", "2"])
    assert more.exit_code == 0, more.output
    after = load_file(dit_file)
    assert before.keys() < after.keys() and any((before[k] != after[k]).any() for k in before)
    log = json.loads((tmp_path / "w" / "train_log.json").read_text())
    assert [(p["steps"], p["lr"], p["object_weight"], p["grow"]) for p in log["dit"]["phases"]] == [(2, 1e-3, 0, 0),
                                                                                                    (1, 1e-2, 4, 1)]
    assert (log["dit"]["phases"][-1]["decoded_weight"], log["dit"]["phases"][-1]["fill_weight"]) == (1, 2)
    assert log["dit"]["config"]["num_layers"] == 5 == json.loads((dit_file.parent / "config.json").read_text())[
        "num_layers"]
    denoised = CliRunner().invoke(train_main, ["--out", str(tmp_path / "w"), "--stage", "decoder", "--decoder-steps",
                                               "1", "--denoised", "0.5", "--check-clips", "2"])
    assert denoised.exit_code == 0, denoised.output
    log = json.loads((tmp_path / "w" / "train_log.json").read_text())
    assert [p["denoised"] for p in log["vae"]["phases"]] == [0, 0, 0, 0.5]
    garbage = CliRunner().invoke(train_main, ["--out", str(tmp_path / "w"), "--stage", "decoder", "--samples", "1"])
    assert garbage.exit_code != 0 and "nothing to train the decoder on" in garbage.output  # a 3-step DiT's samples


def test_decoder_trains_on_the_dit_samples_that_read_right(tmp_path):
    """The shipped DiT's samples mostly read as their captions; the decoder trains on them, its encoder untouched."""
    import shutil

    from soraedge.demo.pipeline_dir import WEIGHTS

    out = tmp_path / "w"
    shutil.copytree(WEIGHTS, out)
    before = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    result = CliRunner().invoke(train_main, ["--out", str(out), "--stage", "decoder", "--samples", "3",
                                             "--decoder-steps", "3", "--check-clips", "2"])
    assert result.exit_code == 0, result.output
    phase = json.loads((out / "train_log.json").read_text())["vae"]["phases"][-1]
    assert phase["samples"] == 3 and 1 <= phase["samples_kept"] <= 3 and phase["decoder_only"]
    after = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all((before[k] == after[k]).all() for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any((before[k] != after[k]).any() for k in before if k.startswith("decoder."))


def test_follow_draws_the_caption_where_the_video_put_the_object():
    """On the world's own clips `follow` redraws the clip; given another shape's clip it draws the caption's shape on
    the same path (read back as that shape, moving the same way); a clip read as another colour or motion gives
    None."""
    from soraedge.demo.probe import read_video
    from soraedge.demo.toy_world import ALL_SCENES, Scene, render
    from soraedge.demo.train import follow

    for i, scene in enumerate(ALL_SCENES):
        clip = render(scene, 300 + i)
        mse = np.mean((follow(scene, clip).astype(np.float32) - clip) ** 2)
        assert mse < 255**2 * 1e-4, scene  # PSNR above 40 dB
    circle = render(Scene("red", "circle", "right"), 1)
    square = follow(Scene("red", "square", "right"), circle)
    seen, drawn = read_video(circle), read_video(square)
    assert (drawn.shape, drawn.motion, drawn.colour) == ("square", "right", "red")
    assert abs(drawn.travel_px - seen.travel_px) < 1.0
    assert follow(Scene("blue", "circle", "right"), circle) is None
    assert follow(Scene("red", "circle", "left"), circle) is None


def test_a_grown_dit_computes_what_the_saved_one_did():
    import torch
    from diffusers import WanTransformer3DModel

    from soraedge.demo.pipeline_dir import WEIGHTS
    from soraedge.demo.train import grow_dit

    dit = WanTransformer3DModel.from_pretrained(WEIGHTS / "transformer", torch_dtype=torch.float32).eval()
    grown = grow_dit(dit, 2).eval()
    assert len(grown.blocks) == len(dit.blocks) + 2 == grown.config.num_layers
    x, t, text = torch.randn(2, 16, 5, 16, 16), torch.tensor([900.0, 100.0]), torch.randn(2, 32, 384)
    with torch.no_grad():
        assert torch.equal(grown(x, t, text, return_dict=False)[0], dit(x, t, text, return_dict=False)[0])
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert "blocks.5.attn1.to_out.0.weight" in trainable  # zero, not frozen


def test_a_widened_decoder_computes_what_the_saved_one_did():
    """Every decoder width doubles, the encoder stays byte for byte, and the decoder's drawing of a latent is the
    same; the two copies of each channel start apart (their outgoing weights differ), or training could not use
    them."""
    import torch
    from diffusers import AutoencoderKLWan

    from soraedge.demo.pipeline_dir import WEIGHTS
    from soraedge.demo.train import widen

    vae = AutoencoderKLWan.from_pretrained(WEIGHTS / "vae", torch_dtype=torch.float32).eval()
    wide = widen(vae, 0).eval()
    assert wide.config.decoder_base_dim == 2 * vae.config.base_dim
    assert wide.config.latents_mean == vae.config.latents_mean
    old, new = vae.state_dict(), wide.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("decoder."))
    conv = new["decoder.up_blocks.0.resnets.0.conv1.weight"]  # [2 out, 2 in, ...]
    half = conv.shape[1] // 2
    assert conv.shape[1] == 2 * old["decoder.up_blocks.0.resnets.0.conv1.weight"].shape[1]
    assert not torch.allclose(conv[:, :half], conv[:, half:])
    z = torch.randn(1, vae.config.z_dim, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = vae.decode(z).sample, wide.decode(z).sample
    assert (a - b).abs().max() < 1e-4 and a.abs().max() > 0.5


def test_fill_term_measures_what_the_probe_reads():
    """`object_fill` is the probe's fill ratio (within 0.02 on world clips of each shape, every frame with a shape),
    yet differentiable; `fill_error` is zero for the clip itself, clear for a circle drawn where a square was asked,
    and its gradient fills a rounded square's corners in."""
    import torch

    from soraedge.demo.probe import SHAPE_PIXELS, _fill, object_pixels
    from soraedge.demo.toy_world import BACKGROUND, Scene, render
    from soraedge.demo.train import fill_error, object_fill, to_video_tensor

    clips = [render(Scene("yellow", shape, "growing"), 7) for shape in ("circle", "square", "triangle")]
    x = to_video_tensor(clips)
    full = ((x + 1) * 127.5).sum(dim=1).amax(dim=(2, 3))[:, None]
    ours = object_fill(x, full)
    for clip, fills in zip(clips, ours):
        masks, coverage = object_pixels(clip, BACKGROUND)
        probe = [(_fill(c), float(f)) for c, m, f in zip(coverage, masks, fills) if m.sum() >= SHAPE_PIXELS]
        assert probe and max(abs(a - b) for a, b in probe) < 0.02, probe
    assert float(fill_error(x, x)) == 0.0
    square, circle = x[1:2], to_video_tensor([render(Scene("yellow", "circle", "growing"), 7)])
    assert float(fill_error(circle, square)) > 0.02  # (1 - pi / 4)^2 = 0.046
    rounded = torch.nn.functional.avg_pool3d(square, (1, 5, 5), 1, (0, 2, 2), count_include_pad=False)
    rounded.requires_grad_(True)
    fill_error(rounded, square).backward()
    ys, xs = np.nonzero(clips[1][-1].sum(-1))  # the last frame's square
    corner = rounded.grad[0, :, -1, ys.min():ys.min() + 3, xs.min():xs.min() + 3]
    assert corner.sum() < 0  # brighter corner pixels lower the error


def test_mask_fill_term_reads_the_object_as_a_plain_detector_does():
    """`object_fill` at a cut is the probe's plain-mask fill (`probe._mask_fill`, within 0.04 on world clips of each
    shape and three colours); `mask_fill_error` is zero for the clip itself and clear for a square whose faint
    fringe is round, a square to the probe's coverage and a circle to a mask, and its gradient darkens that fringe
    where it sticks out of the square's box."""
    from soraedge.demo.probe import OBJECT_DISTANCE, SHAPE_PIXELS, _mask_fill, object_pixels
    from soraedge.demo.toy_world import BACKGROUND, Scene, _mask, render
    from soraedge.demo.train import distance_from_black, mask_fill_error, object_fill, to_video_tensor

    clips = [render(Scene(colour, shape, "growing"), 7) for colour in ("red", "yellow", "blue")
             for shape in ("circle", "square", "triangle")]
    x = to_video_tensor(clips)
    ours = object_fill(x, distance_from_black(x).amax(dim=(2, 3))[:, None], OBJECT_DISTANCE)
    for clip, fills in zip(clips, ours):
        masks, _ = object_pixels(clip, BACKGROUND)
        probe = [(_mask_fill(m), float(f)) for m, f in zip(masks, fills) if m.sum() >= SHAPE_PIXELS]
        assert probe and max(abs(a - b) for a, b in probe) < 0.04, probe
    assert float(mask_fill_error(x, x)) == 0.0

    def frame(layers):  # [1, 3, 1, H, W] in [-1, 1]: shapes centred in the frame, painted in order
        out = np.zeros((64, 64, 3), np.float32)
        for shape, rgb, r in layers:
            cover = _mask(shape, 32.0, 32.0, r)[..., None]
            out = cover * np.array(rgb, np.float32) + (1 - cover) * out
        return to_video_tensor([np.round(out)[None].astype(np.uint8)])

    square = frame([("square", (255, 255, 0), 9)])
    fringed = frame([("circle", (70, 70, 0), 13), ("square", (255, 255, 0), 9)]).requires_grad_(True)
    err = mask_fill_error(fringed, square)
    assert err.item() > 0.01
    err.backward()
    assert fringed.grad[0, :, 0, 32, 32 + 12].sum() > 0  # the fringe beside the square's edge: darker is better


def test_decoded_loss_draws_the_dits_clean_latent_against_its_clip():
    """With the DiT's flow exact (pred = noise - x0) the decoded term is the VAE's own reconstruction loss of the
    clip, small; against another clip's latent it is large; above its sigma bound it is zero, and it passes a
    gradient to the prediction and none to the frozen decoder."""
    import torch
    from diffusers import AutoencoderKLWan

    from soraedge.demo.pipeline_dir import WEIGHTS
    from soraedge.demo.train import DecodedLoss, encode_clips, latent_statistics

    vae = AutoencoderKLWan.from_pretrained(WEIGHTS / "vae", torch_dtype=torch.float32)
    z, _, _ = encode_clips(vae, 2, 11)
    mean, std = latent_statistics(vae)
    x0 = (z - mean) / std
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.3, 0.9]).view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    loss = DecodedLoss(vae, 11, 1.0, 0.5, ring=2, fill_weight=2.0)
    pred = (noise - x0).requires_grad_(True)
    right = loss(xt, s, pred, torch.tensor([0, 1]))  # item 0 only: item 1's sigma is above the bound
    swapped = loss(xt, s, pred, torch.tensor([1, 0]))  # item 0's latent against clip 1
    assert right.item() < 0.1 < swapped.item(), (right.item(), swapped.item())
    right.backward()
    assert pred.grad[0].abs().sum() > 0 and pred.grad[1].abs().sum() == 0
    assert all(p.grad is None for p in vae.parameters())
    assert loss(xt, torch.full_like(s, 0.9), pred, torch.tensor([0, 1])).item() == 0.0


def test_redenoiser_starts_at_the_schedule_sigmas_up_to_its_bound():
    """Bound 0: the encoder's latents come back as they went in; bound 1: every sigma of the sampler's schedule can
    be the start, and the DiT's denoising changes the latents (finite)."""
    import torch
    from diffusers import AutoencoderKLWan

    from soraedge.demo.pipeline_dir import DEMO_DEFAULTS, WEIGHTS
    from soraedge.demo.train import Redenoiser

    vae = AutoencoderKLWan.from_pretrained(WEIGHTS / "vae", torch_dtype=torch.float32)
    z = torch.randn(2, 16, 5, 16, 16)
    captions = ["a red circle moving up on a black background", "a blue square growing on a black background"]
    same = Redenoiser(WEIGHTS, vae, 0.0, seed=0)
    assert same.starts == [DEMO_DEFAULTS["steps"]]
    assert torch.allclose(same(z, captions), z, atol=1e-5)
    every = Redenoiser(WEIGHTS, vae, 1.0, seed=0)
    assert every.starts == list(range(DEMO_DEFAULTS["steps"] + 1))
    every.starts = [0]  # from pure noise: nothing of z is left
    out = every(z, captions)
    assert torch.isfinite(out).all() and not torch.allclose(out, z, atol=0.1)


def test_latent_mask_marks_the_cells_that_see_the_object():
    """The causal VAE's latent frame 0 sees frame 0 alone, latent frame k frames 4k-3..4k; a cell 4x4 pixels."""
    import torch

    from soraedge.demo.train import latent_mask

    x = -torch.ones(1, 3, 17, 64, 64)  # black
    x[0, :, 0, 1, 62] = 1.0  # frame 0 -> latent frame 0, cell (0, 15)
    x[0, 1, 5, 10, 37] = 0.0  # frame 5 -> latent frame 2, cell (2, 9)
    x[0, 0, 16, 63, 0] = 0.5  # frame 16 -> latent frame 4, cell (15, 0)
    mask = latent_mask(x, (5, 16, 16))
    assert mask.shape == (1, 1, 5, 16, 16)
    assert sorted(map(tuple, mask[0, 0].nonzero().tolist())) == [(0, 0, 15), (2, 2, 9), (4, 15, 0)]


def test_decoder_stage_trains_the_decoder_alone(tmp_path):
    out = tmp_path / "w"
    base = ["--out", str(out), "--check-clips", "2", "--decoder-steps", "2"]
    first = CliRunner().invoke(train_main, base + ["--stage", "vae", "--vae-steps", "1", "--vae-clip-steps", "1"])
    assert first.exit_code == 0, first.output
    before = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    config_before = json.loads((out / "vae" / "config.json").read_text())
    result = CliRunner().invoke(train_main, base + ["--stage", "decoder", "--ring", "2", "--fill-weight", "2",
                                                    "--mask-fill-weight", "3"])
    assert result.exit_code == 0, result.output
    after = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all((before[k] == after[k]).all() for k in frozen)
    assert any((before[k] != after[k]).any() for k in before if k.startswith("decoder."))
    config_after = json.loads((out / "vae" / "config.json").read_text())
    assert config_after["latents_mean"] == config_before["latents_mean"]
    log = json.loads((out / "train_log.json").read_text())
    assert [(p["decoder_only"], p["ring"], p["fill_weight"], p["mask_fill_weight"]) for p in log["vae"]["phases"]] == [
        (False, 0, 0, 0), (False, 0, 0, 0), (True, 0, 0, 0), (True, 2, 2, 3)]
    wider = CliRunner().invoke(train_main, base + ["--stage", "decoder", "--widen-decoder"])
    assert wider.exit_code == 0, wider.output
    widened = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all((after[k] == widened[k]).all() for k in frozen)
    config = json.loads((out / "vae" / "config.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    assert config["decoder_base_dim"] == 2 * config["base_dim"] == log["vae"]["config"]["decoder_base_dim"]
    assert [p["widened"] for p in log["vae"]["phases"][3:]] == [False, True]


@pytest.mark.parametrize("args, message", [(["--stage", "dit-more"], "run --stage dit first"),
                                           (["--stage", "decoder", "--denoised", "0.5"], "--denoised needs"),
                                           (["--stage", "decoder", "--samples", "8"], "--samples needs"),
                                           (["--stage", "vae", "--denoised", "0.5"], "--denoised needs"),
                                           (["--stage", "dit", "--grow", "2"], "--grow needs"),
                                           (["--stage", "dit", "--widen-decoder"], "--widen-decoder needs"),
                                           (["--stage", "decoder", "--decoded-weight", "1"], "--decoded-weight needs"),
                                           (["--stage", "dit", "--mask-fill-weight", "1"], "--mask-fill-weight needs")])
def test_options_without_what_they_need_say_so(tmp_path, args, message):
    result = CliRunner().invoke(train_main, ["--out", str(tmp_path / "w")] + args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
