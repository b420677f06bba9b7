"""Train the built-in demo model from scratch: a small Wan VAE on toy clips, then a small Wan DiT with flow matching.

    python -m soraedge.demo.train --out demo/weights                  # both stages with the defaults
    python -m soraedge.demo.train --out demo/weights --stage dit      # the DiT again, on the saved VAE
    python -m soraedge.demo.train --out demo/weights --stage decoder  # more decoder-only steps; the DiT stays valid
    python -m soraedge.demo.train --out demo/weights --stage dit-more # more steps on the saved DiT
    python -m soraedge.demo.train --out demo/weights --stage check    # the probe's reading of the VAE's reconstructions

The committed weights came from these twenty commands, seed 0 where none is named, into demo/weights (the
default --out; its train_log.json records every phase, its time and loss; docs/demo.md has the times):

    python -m soraedge.demo.train --stage vae
    python -m soraedge.demo.train --stage decoder --decoder-steps 900 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --threads 1
    python -m soraedge.demo.train --stage dit
    python -m soraedge.demo.train --stage decoder --decoder-steps 800
    python -m soraedge.demo.train --stage decoder --decoder-steps 1600 --ring 2 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1600 --ring 2 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --ring 2 --threads 1
    python -m soraedge.demo.train --stage dit-more --dit-steps 2600 --dit-lr 5e-4 --clips 3072 --threads 1
    python -m soraedge.demo.train --stage dit-more --dit-steps 1500 --dit-lr 3e-4 --clips 3072 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1600 --ring 2 --threads 1
    python -m soraedge.demo.train --stage dit-more --dit-steps 2400 --dit-lr 3e-4 --clips 3072 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 600 --ring 2 --denoised 0.6 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --ring 2 --denoised 0.6 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1800 --ring 2 --samples 1200
    python -m soraedge.demo.train --stage decoder --decoder-steps 600 --ring 2 --samples 400 --fill-weight 8 \
        --seed 3 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --ring 2 --samples 1200 --fill-weight 16 \
        --seed 4 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --ring 2 --samples 800 --fill-weight 32 \
        --seed 6 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --ring 2 --samples 800 --fill-weight 32 \
        --mask-fill-weight 32 --seed 8 --threads 1
    python -m soraedge.demo.train --stage decoder --decoder-steps 1200 --ring 2 --samples 800 --fill-weight 32 \
        --mask-fill-weight 32 --seed 10 --threads 1

A decoder-only run leaves the encoder, and so the DiT's latent space, as it is, and a DiT run reads only the
encoder: the decoder runs and the DiT runs do not depend on each other's order, except that a `--denoised` decoder
run (and a `--samples` one) reads the saved DiT and so comes after the DiT runs.

Stage `vae`: AutoencoderKLWan (base 16, z 16, 4x spatial / 4x temporal) on training clips in three phases: 5-frame
crops; whole 17-frame clips (the decoder's own causal cache, as the pipeline decodes); whole clips again with the
encoder frozen (the decoder alone: the latent space does not move). L2 + L1 reconstruction weighted towards the
object's pixels (with `--ring`, also the pixels that many around it, where a blurred edge or a rounded corner
bleeds; plus, on whole clips, the error of the object's mean colour per frame), on the posterior mean (a
plain autoencoder) with a small latent L2 term. Then per-channel latent mean/std are measured on encoded clips and
written into the VAE config (`latents_mean`/`latents_std`, as Wan2.1 ships them), and 108 reconstructed clips, one
of every scene, are scored by the probe (`vae_check` in the log). The recipe is deterministic for a seed and thread
count; it was tried with seed 0 only at this architecture.
Stage `dit`: WanTransformer3DModel (4 layers, 4 heads x 32, patch 1x2x2: 320 tokens) on normalised latents of
17-frame training clips, rectified flow (x_t = (1 - s) x0 + s e, target e - x0, s shifted as the scheduler's
flow_shift), conditioned on the frozen all-MiniLM-L6-v2 embeddings of the captions exactly as WanPipeline computes
them (trimmed, zero-padded to TEXT_LEN), with 10% of captions dropped to the empty prompt for classifier-free
guidance. Stage `dit-more` continues the saved DiT with a fresh optimizer and schedule; `--grow N` first adds N
blocks after the saved ones, each starting as the identity; `--object-weight` counts the loss of the latent cells at
and next to the object more (tried; not used by the committed weights); `--decoded-weight` adds the frozen
decoder's drawing of the DiT's clean-latent prediction at low sigmas, judged against the clip (`DecodedLoss`; tried,
not used by the committed weights).
`--stage decoder --denoised S` trains the decoder on latents as the sampler hands them over: each clip's latent is
noised to a sigma of the sampler's schedule up to S and denoised again by the saved DiT; the clip is the target.
`--stage decoder --samples N` draws half of each batch from N latents the saved DiT samples from pure noise for
training captions, each with the clip of its caption drawn on the path and at the size the DiT gave the object
(`follow`); samples the probe reads as another colour or motion are dropped. `--widen-decoder` first doubles
every feature width of the saved decoder (`widen`: decoder_base_dim, four times the parameters), computing exactly
what it did, so the run goes on from the saved decoder with more capacity; the encoder stays as it is.
`--fill-weight` adds the error of how much of its bounding box the object fills, as the probe measures it
(`fill_error`): the term that makes the decoder draw a square's corners. `--mask-fill-weight` adds the same error
read from plain masks of the object at three distances from the background (`mask_fill_error`): a soft edge whose
faint fringe is round fills its box to the probe's coverage and not to a detector that thresholds low.
Only training scenes are used (toy_world.TRAIN_SCENES); HELD_OUT combinations are never seen.
Weights are saved as fp16 safetensors with their diffusers configs; train_log.json records losses and times.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import numpy as np
import torch

from ..runtime.machine import machine
from ..runtime.validate import latent_grid
from .pipeline_dir import DEMO_DEFAULTS, FLOW_SHIFT
from .probe import OBJECT_DISTANCE, SHAPE_PIXELS, object_pixels, read_video, score
from .text_encoder import TEXT_LEN, encode_prompts
from .toy_world import BACKGROUND, FRAMES, SIZE, TRAIN_SCENES, render, sample

VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                  scale_factor_spatial=4, scale_factor_temporal=4)
DIT_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
                  text_dim=384, freq_dim=256, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
# The object-mean-colour term of the VAE loss, in the whole-clip phase only: from scratch it kept the decoder drawing
# a tinted background instead of objects (loss flat for 450 steps).
COLOUR_WEIGHT = 10.0
CFG_DROPOUT = 0.1


def to_video_tensor(clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 [F, H, W, 3] clips -> float [B, 3, F, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1.0
    return x.permute(0, 4, 1, 2, 3).contiguous()


def one_cycle_adamw(model, lr: float, weight_decay: float, steps: int):
    """AdamW with a one-cycle schedule (5% warm-up), as both stages train."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)


def apply_gradients(model, opt, sched, loss) -> float:
    """Backward, clip the gradient norm to 1, step the optimizer and the schedule; returns the loss value."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)  # the trainable ones, as the optimizer has them
    opt.step()
    sched.step()
    return loss.item()


def train_vae(steps: int, window: int, batch: int, lr: float, colour_weight: float, seed: int, log,
              vae=None, decoder_only: bool = False, ring: int = 0, denoise=None, samples=None,
              fill_weight: float = 0.0, mask_fill_weight: float = 0.0) -> tuple[object, list]:
    """`window`-frame crops: 5 (one cached chunk) teaches the pictures fast; whole 17-frame clips teach the decoder
    to run on its own causal cache for as long as the pipeline decodes. Shorter windows are not enough: a decoder
    trained on 9-frame crops drew the last four frames of a 17-frame clip in the wrong colour (green as yellow).
    `decoder_only` freezes the encoder, so the latent space (and a DiT trained on it) stays as it is. `ring`: the
    object's weight extends this many pixels around it, so that colour bled into the background next to the object
    (a blurred edge, a rounded corner) costs what colour missing inside it costs. `denoise` (decoder only): a
    `Redenoiser`; the decoder learns from the latents it returns for each clip, as the sampler hands them over.
    `samples` (decoder only, whole clips): `DiTSamples`; the second half of each batch is drawn from them.
    `fill_weight`: the weight of `fill_error`, the error of how much of its bounding box the object fills;
    `mask_fill_weight` that of `mask_fill_error`, the same read from plain masks."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE_CONFIG) if vae is None else vae.train()
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(not decoder_only)
    opt, sched = one_cycle_adamw(vae, lr, 0.0, steps)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        clips, captions = [], []
        for _ in range(batch - (batch // 2 if samples else 0)):
            scene, clip = sample(TRAIN_SCENES, int(rng.integers(1 << 31)))
            start = int(rng.integers(0, FRAMES - window + 1))
            clips.append(clip[start:start + window])  # [window, H, W, 3]
            captions.append(scene.caption)
        x = to_video_tensor(clips)  # [B, 3, window, 64, 64]
        with torch.set_grad_enabled(not decoder_only):
            z = vae.encode(x).latent_dist.mode()  # a plain autoencoder: sampling noise drowned the small objects
        if denoise is not None:
            z = denoise(z, captions)
        if samples is not None:
            more_z, more_x = samples.draw(rng, batch // 2)
            z, x = torch.cat([z, more_z]), torch.cat([x, more_x])
        recon = vae.decode(z).sample
        loss = picture_loss(recon, x, ring, colour_weight, fill_weight, mask_fill_weight) + 1e-4 * z.pow(2).mean()
        losses.append(apply_gradients(vae, opt, sched, loss))
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {np.mean(losses[-50:]):.4f}")
    return vae, losses


def picture_loss(recon: torch.Tensor, x: torch.Tensor, ring: int, colour_weight: float,
                 fill_weight: float, mask_fill_weight: float = 0.0) -> torch.Tensor:
    """How far a drawn video is from the clip, [B, 3, F, H, W] each: L2 + L1 / 2 per pixel, weighted towards the
    object's pixels and the `ring` around them, plus `object_colour_error`, `fill_error` and `mask_fill_error` at
    their weights."""
    # The object covers a few percent of the frame: weight its pixels (and its edges) up, or the decoder settles on
    # drawing the background alone.
    mask = object_mask(x)  # [B, 1, F, H, W]
    weight = 1.0 + 20.0 * near_object(mask, ring)
    err = recon - x
    loss = (weight * (err.pow(2) + 0.5 * err.abs())).mean() / weight.mean()
    if colour_weight:
        loss = loss + colour_weight * object_colour_error(recon, x, mask)
    if fill_weight:
        loss = loss + fill_weight * fill_error(recon, x)
    if mask_fill_weight:
        loss = loss + mask_fill_weight * mask_fill_error(recon, x)
    return loss


def object_colour_error(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error of the object's mean colour per frame ([B, 3, F, H, W] videos, [B, 1, F, H, W] mask).

    Per-pixel losses let a small decoder drift the hue of a whole object (green drawn yellowish-green) at little
    cost, because edges dominate them; the probe, and a viewer, read exactly that hue."""
    area = mask.sum(dim=(3, 4)).clamp(min=1.0)  # [B, 1, F]
    mean = lambda v: (v * mask).sum(dim=(3, 4)) / area  # noqa: E731 - [B, 3, F]
    return (mean(recon) - mean(x)).pow(2).mean()


def distance_from_black(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] video in [-1, 1] -> [B, F, H, W]: summed |RGB - black| in 0..255 units, as the probe sums it."""
    return ((video + 1) * 127.5).abs().sum(dim=1)


def object_fill(video: torch.Tensor, full: torch.Tensor, cut: float | None = None) -> torch.Tensor:
    """How much of its bounding box the object fills in each frame, differentiable: [B, 3, F, H, W] video in
    [-1, 1], `full` [B, 1, F] the object's own distance from the background -> [B, F]. `cut` None: as the probe
    measures it (`probe._fill` of `probe.object_pixels`' coverage on the world's black background); a distance: as
    a plain detector does, the pixels farther than `cut` from the background counted whole, their count over their
    box's area."""
    distance = distance_from_black(video)
    if cut is None:
        gate = torch.sigmoid((distance - OBJECT_DISTANCE / 2) / 4)  # the probe's hard cut at half OBJECT_DISTANCE
        coverage = (distance / full[:, 0, :, None, None].clamp(min=1.0)).clamp(0, 1) * gate
    else:  # soft enough that a dark pixel just outside a corner still feels the pull
        coverage = torch.sigmoid((distance - cut) / (cut / 8))
    width, height = coverage.amax(dim=2).sum(dim=-1), coverage.amax(dim=3).sum(dim=-1)
    return coverage.sum(dim=(2, 3)) / (width * height).clamp(min=1.0)


# The distances from the background at which `mask_fill_error` reads the object as a plain mask: half, once and
# twice the probe's OBJECT_DISTANCE; a crisp outline fills its box at every one.
MASK_CUTS = (OBJECT_DISTANCE / 2, OBJECT_DISTANCE, OBJECT_DISTANCE * 2)


def fill_error(recon: torch.Tensor, x: torch.Tensor, cut: float | None = None) -> torch.Tensor:
    """Squared error of how much of its bounding box the object fills (`object_fill`, read at `cut`), over the
    frames where the target's object has a shape (SHAPE_PIXELS or more), [B, 3, F, H, W] videos.

    A rounded corner costs the per-pixel losses a few pixels of the object's edge; to a viewer, and to the probe,
    it is the difference between a square and a circle. This term counts each frame's outline as a whole."""
    full = distance_from_black(x).amax(dim=(2, 3))[:, None]  # [B, 1, F]: the object's colour, its flat inside
    shaped = (object_mask(x).sum(dim=(1, 3, 4)) >= SHAPE_PIXELS).float()  # [B, F]
    err = (object_fill(recon, full, cut) - object_fill(x, full, cut)).pow(2)
    return (err * shaped).sum() / shaped.sum().clamp(min=1.0)


def mask_fill_error(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`fill_error` of the object read as a plain mask, the mean over MASK_CUTS: a soft edge whose faint fringe
    rounds the corners reads as a circle to a detector that thresholds low, though its coverage fills the box."""
    return torch.stack([fill_error(recon, x, cut) for cut in MASK_CUTS]).mean()


@torch.no_grad()
def encode_clips(vae, n: int, seed: int) -> tuple[torch.Tensor, list, torch.Tensor]:
    """n training clips -> (posterior means [n, z, latent frames, latent height, latent width], scenes, object masks
    [n, 1, latent frames, latent height, latent width]: 1 where a latent cell sees any of the object)."""
    latents, scenes, masks = [], [], []
    for i in range(0, n, 8):
        batch = [sample(TRAIN_SCENES, seed + j) for j in range(i, min(n, i + 8))]
        scenes += [s for s, _ in batch]
        x = to_video_tensor([c for _, c in batch])
        z = vae.encode(x).latent_dist.mode()
        latents.append(z)
        masks.append(latent_mask(x, z.shape[2:]))
    return torch.cat(latents), scenes, torch.cat(masks)


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] video in [-1, 1] on black -> [B, 1, F, H, W]: 1 on the object's pixels."""
    return ((x + 1).abs().sum(dim=1, keepdim=True) > 0.05).float()


def near_object(mask: torch.Tensor, ring: int) -> torch.Tensor:
    """A [B, 1, F, H, W] object mask grown by `ring` cells in each frame (0: the mask itself)."""
    return torch.nn.functional.max_pool3d(mask, (1, 2 * ring + 1, 2 * ring + 1), 1, (0, ring, ring))


def latent_mask(x: torch.Tensor, latent_shape) -> torch.Tensor:
    """[B, 3, F, H, W] video in [-1, 1] -> [B, 1, *latent_shape] object mask. The causal VAE's first latent frame
    sees frame 0 alone, each later one the next t = (F - 1) / (latent frames - 1) frames: frame 0 is repeated to
    fill the first window."""
    mask = object_mask(x)
    lf, lh, lw = latent_shape
    t, sh, sw = (mask.shape[2] - 1) // (lf - 1), mask.shape[3] // lh, mask.shape[4] // lw
    mask = torch.cat([mask[:, :, :1].expand(-1, -1, t - 1, -1, -1), mask], dim=2)
    return torch.nn.functional.max_pool3d(mask, (t, sh, sw))


@torch.no_grad()
def check_vae(vae, n: int, seed: int) -> dict:
    """PSNR and probe accuracy of n reconstructed 17-frame clips of every scene (held-out ones included)."""
    from .toy_world import ALL_SCENES

    scenes = [ALL_SCENES[(seed + i) % len(ALL_SCENES)] for i in range(n)]
    clips = [render(s, seed + i) for i, s in enumerate(scenes)]
    recon = torch.cat([vae.decode(vae.encode(to_video_tensor(clips[i:i + 12])).latent_dist.mode()).sample
                       for i in range(0, n, 12)]).clamp(-1, 1)  # [n, 3, F, H, W]
    recon = ((recon + 1) * 127.5).round().permute(0, 2, 3, 4, 1).numpy()  # [n, F, H, W, 3]
    mse = float(np.mean((recon - np.stack(clips).astype(np.float32)) ** 2))
    return {"psnr_db": 10 * math.log10(255**2 / mse), **score([read_video(r) for r in recon], scenes)}


def caption_embeddings(captions) -> tuple[dict, torch.Tensor]:
    """({caption: [TEXT_LEN, 384] embedding}, the empty prompt's embedding), from one text-encoder load."""
    captions = sorted(captions)
    embeddings = torch.from_numpy(encode_prompts(captions + [""]))  # [len + 1, TEXT_LEN, 384], "" last
    return dict(zip(captions, embeddings[:-1])), embeddings[-1]


def latent_statistics(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latent mean and std, [1, z, 1, 1, 1] each: the DiT works on (z - mean) / std,
    as WanPipeline de-normalises before decoding."""
    view = lambda v: torch.tensor(v).view(1, -1, 1, 1, 1)  # noqa: E731
    return view(vae.config.latents_mean), view(vae.config.latents_std)


def shifted_sigmas(u: torch.Tensor) -> torch.Tensor:
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def train_dit(latents, scenes, masks, steps: int, batch: int, lr: float, seed: int, log, dit=None,
              object_weight: float = 0.0, decoded=None) -> tuple[object, list]:
    """A new DiT, or more steps on `dit` (a fresh optimizer and one-cycle schedule). `object_weight`: the loss of the
    latent cells that see the object, and of their neighbours, counts 1 + object_weight times. The object covers a
    few percent of the latent; its outline (a square's corners) is what a viewer reads, and a per-cell reweighting
    leaves each cell's target, and so the flow, as it is. `decoded`: a `DecodedLoss`, added to each step's loss."""
    from diffusers import WanTransformer3DModel

    table, empty = caption_embeddings({s.caption for s in scenes})
    text = torch.stack([table[s.caption] for s in scenes])  # [N, TEXT_LEN, 384]

    torch.manual_seed(seed)
    dit = WanTransformer3DModel(**DIT_CONFIG) if dit is None else dit.train()
    opt, sched = one_cycle_adamw(dit, lr, 0.01, steps)
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 + object_weight * near_object(masks, 1)  # [N, 1, latent frames, latent height, latent width]
    losses = []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0, ctx = latents[idx], text[idx].clone()
        weight = weights[idx]
        drop = torch.rand(batch, generator=gen) < CFG_DROPOUT
        ctx[drop] = empty
        sigma = shifted_sigmas(torch.rand(batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = dit(xt, sigma * 1000, ctx, return_dict=False)[0]
        loss = (weight * (pred - (noise - x0)).pow(2)).mean() / weight.mean()
        if decoded is not None:
            loss = loss + decoded(xt, s, pred, idx)
        losses.append(apply_gradients(dit, opt, sched, loss))
        if step % 100 == 0 or step == steps - 1:
            log(f"dit step {step}/{steps} loss {np.mean(losses[-100:]):.4f}")
    return dit.eval(), losses


class DecodedLoss:
    """The DiT's prediction of the clean latent, drawn by the saved decoder (frozen) and compared with the clip:
    `picture_loss` (pixels, the object's colour and how much of its box it fills) at `weight`, on up to `count`
    items of each batch whose sigma is at most `max_sigma`. The flow loss counts every latent value alike; a
    square's corners are a few of them, and the DiT draws them round. From a low enough sigma the clean latent is
    nearly determined by the noisy one, so this term asks of the DiT what the flow target asks, counted as a viewer
    counts it. The DiT's latents are the `encode_clips` clips of `seed` (re-rendered here, index for index)."""

    def __init__(self, vae, seed: int, weight: float, max_sigma: float, ring: int, fill_weight: float,
                 count: int = 2):
        self.vae = vae.eval().requires_grad_(False)
        self.mean, self.std = latent_statistics(vae)
        self.seed, self.weight, self.max_sigma, self.ring, self.fill_weight = seed, weight, max_sigma, ring, fill_weight
        self.count = count

    def __call__(self, xt: torch.Tensor, s: torch.Tensor, pred: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        low = (s.flatten() <= self.max_sigma).nonzero().flatten()[: self.count]
        if not len(low):
            return pred.sum() * 0.0
        x0 = (xt[low] - s[low] * pred[low]) * self.std + self.mean  # pred is the flow (noise - x0)
        recon = self.vae.decode(x0).sample
        clips = to_video_tensor([sample(TRAIN_SCENES, self.seed + int(idx[i]))[1] for i in low])
        return self.weight * picture_loss(recon, clips, self.ring, COLOUR_WEIGHT, self.fill_weight)


def grow_dit(dit, layers: int):
    """The saved DiT with `layers` more blocks after its own, each starting as the identity (the output projections
    of its self-attention, cross-attention and feed-forward zero), so the grown DiT computes exactly what the saved
    one did and training goes on from there with the extra depth."""
    from diffusers import WanTransformer3DModel

    grown = WanTransformer3DModel.from_config(dit.config, num_layers=dit.config.num_layers + layers)
    missing, unexpected = grown.load_state_dict(dit.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("blocks.") for k in missing), (missing, unexpected)
    for block in grown.blocks[dit.config.num_layers:]:
        for proj in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
    return grown


def widen(vae, seed: int):
    """The saved VAE with every feature width of its decoder doubled (`decoder_base_dim`, which AutoencoderKLWan
    reads apart from the encoder's `base_dim`), computing exactly what the saved one did: each feature channel
    becomes two equal copies, a layer that reads a doubled input reads each copy at half weight, and the copies'
    outgoing weights differ by an opposite small perturbation (the sum the next layer sees stays the same; the
    gradients the two copies get do not, so training can tell them apart). Three layouts are not one run of
    channels: the attention's q | k | v (each part doubled; q scaled by 1/sqrt(2) because its dot product now sums
    twice as many equal terms under a 1/sqrt(width) scale), and the temporal upsampler's two output frames. The
    encoder, quant convs and latent statistics are untouched: the DiT's latent space stays as it is."""
    from diffusers import AutoencoderKLWan

    base = vae.config.decoder_base_dim or vae.config.base_dim
    wide = AutoencoderKLWan.from_config(vae.config, decoder_base_dim=2 * base)
    gen = torch.Generator().manual_seed(seed)
    old = vae.state_dict()
    state = {}
    for name, target in wide.state_dict().items():
        value = old[name].float()
        for dim in range(value.dim()):
            if target.shape[dim] == value.shape[dim]:
                continue
            assert target.shape[dim] == 2 * value.shape[dim], (name, value.shape, target.shape)
            groups = 3 if ".to_qkv." in name and dim == 0 else 2 if ".time_conv." in name and dim == 0 else 1
            parts = value.reshape(*value.shape[:dim], groups, -1, *value.shape[dim + 1:])
            value = torch.cat([parts, parts], dim=dim + 1).reshape(target.shape[:dim + 1] + value.shape[dim + 1:])
            if dim == 1:  # a doubled input: each copy at half weight, plus and minus a small perturbation
                half = value.shape[1] // 2
                noise = 1e-2 * value[:, :half].std() * torch.randn(value[:, :half].shape, generator=gen)
                value = torch.cat([value[:, :half] / 2 + noise, value[:, half:] / 2 - noise], dim=1)
        if ".to_qkv." in name and target.shape != old[name].shape:
            value[: len(value) // 3] /= math.sqrt(2)
        state[name] = value
    wide.load_state_dict(state)
    return wide


def schedule_sigmas() -> torch.Tensor:
    """The sampler's sigmas at sora-run's default step count, shifted by FLOW_SHIFT: [steps + 1], 1 -> 0."""
    return shifted_sigmas(torch.linspace(1.0, 0.0, DEMO_DEFAULTS["steps"] + 1))


@torch.no_grad()
def euler_guided(dit, x: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Latents [B, z, F, H, W] at sigmas[0] carried down to sigmas[-1] by Euler steps, with sora-run's default
    classifier-free guidance between their captions' embeddings `text` [B, L, D] and the empty prompt's [L, D]."""
    n = len(x)
    ctx = torch.cat([text, empty.expand(n, -1, -1)])
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        cond, uncond = dit(torch.cat([x, x]), a.expand(2 * n) * 1000, ctx, return_dict=False)[0].split(n)
        x = x + (b - a) * (uncond + DEMO_DEFAULTS["guidance"] * (cond - uncond))
    return x


def load_dit(out: Path):
    """The DiT saved in `out`, in fp32, in eval mode."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32).eval()


class Redenoiser:
    """Latents as the sampler hands them to the decoder: each clip's latent is noised to a sigma of the sampler's
    schedule (DEMO_DEFAULTS' steps, shifted by FLOW_SHIFT; drawn uniformly among those up to `max_sigma`, 0 included)
    and denoised again from there by the saved DiT, Euler steps with sora-run's default guidance. The DiT's latents
    are not the encoder's (softer outlines, colours a little off); a decoder trained on these learns to draw from
    what it will be given. The clip the latent was noised from is the target, so the sigma must stay where the DiT
    keeps the clip's layout."""

    def __init__(self, out: Path, vae, max_sigma: float, seed: int):
        self.dit = load_dit(out)
        self.mean, self.std = latent_statistics(vae)
        self.sigmas = schedule_sigmas()
        self.starts = [i for i, s in enumerate(self.sigmas.tolist()) if s <= max_sigma]
        self.text, self.empty = caption_embeddings({s.caption for s in TRAIN_SCENES})
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, captions: list[str]) -> torch.Tensor:
        out = []
        for latent, caption in zip((z - self.mean) / self.std, captions):
            k = self.starts[int(torch.randint(len(self.starts), (1,), generator=self.gen))]
            x = latent[None] + self.sigmas[k] * (torch.randn(latent[None].shape, generator=self.gen) - latent[None])
            out.append(euler_guided(self.dit, x, self.sigmas[k:], self.text[caption][None], self.empty)[0])
        return torch.stack(out) * self.std + self.mean


def follow(scene, frames: np.ndarray) -> np.ndarray | None:
    """The clip of `scene` (its shape, in its colour) whose object moves and grows as the object in `frames` (uint8
    [F, H, W, 3]) does: the object's centre and size in each frame (the centroid and area of its coverage as the
    probe measures it, on the world's background), each fitted by a straight line over the clip, as the world moves
    and grows its objects. None where the probe reads the colour or the motion of `frames` wrong, or the object is
    missing from half the frames."""
    from .toy_world import AREA, CENTROID_BELOW, draw

    verdict = read_video(frames)
    if verdict.colour != scene.colour or verdict.motion != scene.motion:
        return None
    _, coverage = object_pixels(frames, BACKGROUND)
    centre = np.arange(SIZE) + 0.5
    seen, cx, cy, radius = [], [], [], []
    for i, c in enumerate(coverage):
        area = c.sum()
        if area >= SHAPE_PIXELS:
            r = np.sqrt(area / AREA[scene.shape])
            seen.append(i)
            cx.append((c.sum(0) * centre).sum() / area)
            cy.append((c.sum(1) * centre).sum() / area - CENTROID_BELOW[scene.shape] * r)
            radius.append(r)
    if len(seen) < len(frames) / 2:
        return None
    line = lambda v: np.polyval(np.polyfit(seen, v, 1), np.arange(len(frames)))  # noqa: E731
    return draw(scene, line(cx), line(cy), line(radius))


class DiTSamples:
    """Latents the saved DiT samples from pure noise for training captions (sora-run's default steps and guidance,
    Euler), each paired with the clip the decoder is to draw from it: `follow`'s clip of the caption, on the path and
    at the size the DiT gave its object (read from the decoder's drawing of the latent before training). The DiT
    lays the object out right but its outline as a blob with wobbly edges; from these pairs the decoder learns to
    draw the outline the caption asks for from such latents. Samples whose colour or motion the probe reads wrong are
    dropped (their target would teach the decoder that error)."""

    def __init__(self, out: Path, vae, n: int, seed: int, log):
        dit = load_dit(out)
        mean, std = latent_statistics(vae)
        sigmas = schedule_sigmas()
        text, empty = caption_embeddings({s.caption for s in TRAIN_SCENES})
        gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        c = vae.config
        shape = (c.z_dim, *latent_grid(FRAMES, SIZE, SIZE, c.scale_factor_temporal, c.scale_factor_spatial))
        self.latents, self.clips = [], []
        for start in range(0, n, 16):
            scenes = [TRAIN_SCENES[int(rng.integers(len(TRAIN_SCENES)))] for _ in range(min(16, n - start))]
            x = torch.randn((len(scenes), *shape), generator=gen)
            z = euler_guided(dit, x, sigmas, torch.stack([text[s.caption] for s in scenes]), empty) * std + mean
            with torch.no_grad():
                drawn = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 4, 1).numpy()
            for scene, latent, frames in zip(scenes, z, drawn.astype(np.uint8)):
                target = follow(scene, frames)
                if target is not None:
                    self.latents.append(latent[None])
                    self.clips.append(target)
            log(f"dit samples {start + len(scenes)}/{n}, {len(self.clips)} kept")

    def draw(self, rng, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` (latents [count, z, F, H, W], target videos [count, 3, FRAMES, H, W] in [-1, 1]) drawn with rng."""
        idx = rng.integers(len(self.clips), size=count)
        return torch.cat([self.latents[i] for i in idx]), to_video_tensor([self.clips[i] for i in idx])


def save_fp16(model, folder: Path) -> None:
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path(__file__).parent / "weights", show_default=True)
@click.option("--stage", type=click.Choice(["all", "vae", "decoder", "dit", "dit-more", "check"]), default="all",
              show_default=True, help="decoder: only the VAE's decoder-only phase, on the saved VAE (its DiT stays "
              "valid). dit-more: more steps on the saved DiT. check: no training; the probe's reading of the saved "
              "VAE's reconstructions, printed.")
@click.option("--vae-steps", default=1000, show_default=True, help="Phase 1: 5-frame crops, batch 4.")
@click.option("--vae-clip-steps", default=600, show_default=True, help="Phase 2: whole 17-frame clips, batch 2.")
@click.option("--decoder-steps", default=400, show_default=True,
              help="Phase 3: whole clips, encoder frozen, the decoder alone.")
@click.option("--ring", default=0, show_default=True, type=click.IntRange(0),
              help="Pixels around the object that the VAE loss weights as the object (0: the object alone).")
@click.option("--denoised", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Stage decoder: train on latents noised up to this sigma and denoised by the saved DiT (0: the "
              "encoder's latents).")
@click.option("--samples", default=0, show_default=True, type=click.IntRange(0),
              help="Stage decoder: half of each batch from this many latents the saved DiT samples for training "
              "captions, each with its caption's clip drawn where the DiT put the object (0: none).")
@click.option("--widen-decoder", is_flag=True, help="Stage decoder: first double every feature width of the saved "
              "decoder, computing what it did (decoder_base_dim; the encoder and so the DiT stay valid).")
@click.option("--fill-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Stage vae or decoder: weight of the error of how much of its bounding box the object fills.")
@click.option("--mask-fill-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Stage vae or decoder: weight of the same error read from plain masks of the object "
              "(mask_fill_error).")
@click.option("--decoded-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Stage dit or dit-more: weight of the saved decoder's drawing of the DiT's clean-latent "
              "prediction against the clip (with --ring and --fill-weight as the decoder's loss has them).")
@click.option("--decoded-sigma", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="The sigmas up to which --decoded-weight applies.")
@click.option("--dit-steps", default=2500, show_default=True)
@click.option("--dit-lr", default=1e-3, show_default=True, help="The DiT's peak learning rate.")
@click.option("--object-weight", default=0.0, show_default=True, type=click.FloatRange(0),
              help="The DiT loss of latent cells at and next to the object counts 1 + this many times.")
@click.option("--grow", default=0, show_default=True, type=click.IntRange(0),
              help="Stage dit-more: this many blocks added after the saved DiT's, each starting as the identity.")
@click.option("--clips", default=1536, show_default=True, help="Encoded training clips for the DiT.")
@click.option("--check-clips", default=108, show_default=True, help="Reconstructed clips the probe scores.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(out: Path, stage: str, vae_steps: int, vae_clip_steps: int, decoder_steps: int, ring: int, denoised: float,
         samples: int, widen_decoder: bool, fill_weight: float, mask_fill_weight: float, decoded_weight: float,
         decoded_sigma: float, dit_steps: int, dit_lr: float, object_weight: float, grow: int, clips: int,
         check_clips: int, seed: int, threads: int) -> None:
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(threads)
    if stage == "check":
        vae = AutoencoderKLWan.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
        print(json.dumps(check_vae(vae, check_clips, seed + 30_000_000)))
        return
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.json"
    keep = log_file.exists() and stage in ("dit", "dit-more", "decoder")
    record = json.loads(log_file.read_text()) if keep else {}
    has_dit = "phases" in record.get("dit", {})
    for name, value in (("--denoised", denoised), ("--samples", samples)):
        if value and (stage != "decoder" or not has_dit):
            raise click.ClickException(f"{name} needs --stage decoder and a DiT trained into {out}")
    if widen_decoder and stage != "decoder":
        raise click.ClickException("--widen-decoder needs --stage decoder")
    if mask_fill_weight and stage not in ("all", "vae", "decoder"):
        raise click.ClickException("--mask-fill-weight needs --stage all, vae or decoder")
    if decoded_weight and stage not in ("dit", "dit-more"):
        raise click.ClickException("--decoded-weight needs --stage dit or dit-more")
    if grow and stage != "dit-more":
        raise click.ClickException("--grow needs --stage dit-more")
    record["machine"] = {**machine(), "threads": threads, "torch": torch.__version__}

    def log(msg):
        print(msg, flush=True)

    if stage in ("all", "vae", "decoder"):
        phases = [  # (steps, window, batch, lr, colour weight, decoder only)
            (vae_steps, 5, 4, 2e-3, 0.0, False),
            (vae_clip_steps, FRAMES, 2, 1e-3, COLOUR_WEIGHT, False),
            (decoder_steps, FRAMES, 2, 5e-4, COLOUR_WEIGHT, True),
        ]
        if stage == "decoder":
            vae = AutoencoderKLWan.from_pretrained(out / "vae", torch_dtype=torch.float32)
            record.setdefault("vae", {"config": VAE_CONFIG, "phases": []})
            if widen_decoder:
                vae = widen(vae, seed + 60_000_000)
                record["vae"]["config"] = {**record["vae"]["config"], "decoder_base_dim": vae.config.decoder_base_dim}
        else:
            vae = None
            record["vae"] = {"config": VAE_CONFIG, "phases": []}
        for phase_seed, (steps, window, batch, lr, colour, decoder_only) in enumerate(phases):
            if stage == "decoder" and not decoder_only:
                continue
            t0 = time.time()
            denoise = Redenoiser(out, vae, denoised, seed + 40_000_000) if denoised else None
            pairs = DiTSamples(out, vae, samples, seed + 50_000_000, log) if samples else None
            if pairs is not None and not pairs.clips:
                raise click.ClickException(f"none of the saved DiT's {samples} samples reads as its caption's colour "
                                           "and motion: nothing to train the decoder on")
            vae, losses = train_vae(steps, window, batch, lr, colour, seed + phase_seed, log, vae, decoder_only, ring,
                                    denoise, pairs, fill_weight, mask_fill_weight)
            record["vae"]["phases"].append({"steps": steps, "window": window, "batch": batch, "lr": lr,
                                            "colour_weight": colour, "decoder_only": decoder_only, "ring": ring,
                                            "denoised": denoised, "samples": samples, "widened": widen_decoder,
                                            "fill_weight": fill_weight, "mask_fill_weight": mask_fill_weight,
                                            "samples_kept": len(pairs.clips) if pairs else 0,
                                            "seconds": time.time() - t0,
                                            "final_loss": float(np.mean(losses[-50:]))})
        vae.eval()
        if stage != "decoder":  # a frozen encoder keeps the latent statistics (and the DiT's latent space)
            lat, _, _ = encode_clips(vae, 256, seed + 10_000_000)
            vae.register_to_config(latents_mean=lat.mean(dim=(0, 2, 3, 4)).tolist(),
                                   latents_std=lat.std(dim=(0, 2, 3, 4)).tolist())
        save_fp16(vae, out / "vae")
        record["vae_check"] = check_vae(vae, check_clips, seed + 30_000_000)
        log(f"vae reconstructions: {record['vae_check']}")
    if stage in ("all", "dit", "dit-more"):
        more = stage == "dit-more"
        if more and not has_dit:
            raise click.ClickException(f"--stage dit-more needs a DiT trained into {out} (its train_log.json names "
                                       "none); run --stage dit first")
        t0 = time.time()
        vae = AutoencoderKLWan.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
        lat, scenes, masks = encode_clips(vae, clips, seed + 20_000_000)
        mean, std = latent_statistics(vae)
        lat = (lat - mean) / std  # the DiT's latent space
        log(f"encoded {clips} clips in {time.time() - t0:.0f} s")
        phases = record["dit"]["phases"] if more else []
        dit = load_dit(out) if more else None  # train_dit puts it back in training mode
        if grow:
            dit = grow_dit(dit, grow)
        decoded = (DecodedLoss(vae, seed + 20_000_000, decoded_weight, decoded_sigma, ring, fill_weight)
                   if decoded_weight else None)
        dit, losses = train_dit(lat, scenes, masks, dit_steps, 32, dit_lr, seed + len(phases), log, dit, object_weight,
                                decoded)
        save_fp16(dit, out / "transformer")
        phases.append({"steps": dit_steps, "clips": clips, "lr": dit_lr, "object_weight": object_weight, "grow": grow,
                       "decoded_weight": decoded_weight, "decoded_sigma": decoded_sigma, "ring": ring,
                       "fill_weight": fill_weight,
                       "seconds": time.time() - t0,
                       "final_loss": float(np.mean(losses[-100:]))})
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dit.config.items() if k in DIT_CONFIG}
        record["dit"] = {"config": config, "batch": 32, "flow_shift": FLOW_SHIFT, "cfg_dropout": CFG_DROPOUT,
                         "text_len": TEXT_LEN, "phases": phases}
    log_file.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
