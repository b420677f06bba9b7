"""The Wan VAE decoder (AutoencoderKLWan) for export as a causal, chunked decoder: one latent frame per call.

Wan decodes latent frame by frame through a causal feature cache held in Python lists. Exported whole, that loop
unrolls and fixes the graph to one frame count. Here the cache is made explicit instead: two graphs,
- `vae_decoder_first`: latent frame 0 -> 1 video frame + every cache slot,
- `vae_decoder_step`: one latent frame + every cache slot -> 4 video frames + the updated slots,
and the runtime loops over latent frames, so any frame count decodes with one pair of engines in flat memory.

Each slot holds the last 2 frames of a causal convolution's input. diffusers' first chunk leaves some slots with
1 frame (the conv had no history) or the marker "Rep" (the temporal upsampler's first call); both are exactly
equivalent to 2 frames with zeros in front (the causal conv zero-pads the missing history), which is what the
first graph returns, so one steady-state graph serves every later frame. Input is the de-normalised latent (the
runtime applies latents_mean/std); output is the decoder's video, unclamped (nominally [-1, 1]). The Wan2.2 VAE
(residual blocks, a pixel patch) is the same loop; its pixels are unpatchified inside the graphs.
"""

from __future__ import annotations

import torch

from ..runtime.spec import Dim, EngineSpec, RunSettings, TensorSpec
from .streaming import load_model

CACHE_T = 2  # frames of history each causal conv keeps (diffusers' CACHE_T)


def _scaled(k: int, name: str) -> str:
    """A spec entry for k times the latent dim `name`."""
    return name if k == 1 else f"{k}*{name}"


def vae_specs(z_dim: int, scale_s: int, scale_t: int, slots: list[tuple[int, int]], lat_h: Dim,
              lat_w: Dim) -> tuple[EngineSpec, EngineSpec]:
    """(first, step) specs. `slots`: (channels, spatial factor vs the latent) of each cache slot, in order."""
    def cache_specs(prefix):  # each slot [1, C, 2, k*h, k*w]
        return tuple(TensorSpec(f"{prefix}cache_{i}", "float32", (1, c, CACHE_T, _scaled(k, "h"), _scaled(k, "w")))
                     for i, (c, k) in enumerate(slots))

    latent = TensorSpec("latents", "float32", (1, z_dim, 1, "h", "w"))
    run = RunSettings(arena=False, static_shapes=2)
    first = EngineSpec(
        name="vae_decoder_first", inputs=(latent,),
        outputs=(TensorSpec("video", "float32", (1, 3, 1, f"{scale_s}*h", f"{scale_s}*w")),
                 *cache_specs("out_")),
        dims=(lat_h, lat_w), run=run)
    step = EngineSpec(
        name="vae_decoder_step", inputs=(latent, *cache_specs("in_")),
        outputs=(TensorSpec("video", "float32", (1, 3, scale_t, f"{scale_s}*h", f"{scale_s}*w")),
                 *cache_specs("out_")),
        dims=(lat_h, lat_w), run=run)
    return first, step


def _run_decoder(vae, z, feat_cache):
    """diffusers' per-chunk call: post_quant_conv (1x1x1, no history) then the decoder with the cache list, then the
    Wan2.2 VAE's pixel unpatchify (frame by frame, so per chunk as on the whole clip). Not clamped: the runtime
    clamps after tiles are blended (runtime/vae_decode.py), as diffusers' tiled decode does."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    x = vae.post_quant_conv(z)
    out = vae.decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=feat_cache[0] is None)
    return out if vae.config.patch_size is None else unpatchify(out, patch_size=vae.config.patch_size)


def _pad_slot(value, like_step):
    """A first-chunk cache slot as the steady-state graph expects it: [1, C, 2, H, W], zeros for no history."""
    if isinstance(value, str) or value is None:  # "Rep": the temporal upsampler has no history yet
        return torch.zeros_like(like_step)
    if value.shape[2] < CACHE_T:
        return torch.cat([torch.zeros_like(value[:, :, :1]).expand(-1, -1, CACHE_T - value.shape[2], -1, -1),
                          value], dim=2)
    return value


class VaeDecoderFirst(torch.nn.Module):
    def __init__(self, vae, slot_templates):
        super().__init__()
        self.vae = vae
        self.slot_templates = slot_templates  # callables (z) -> zeros tensor of the slot's steady shape

    def forward(self, latents):  # [1, C, 1, h, w]
        cache = [None] * len(self.slot_templates)
        video = _run_decoder(self.vae, latents, cache)
        return (video, *(_pad_slot(v, t(latents)) for v, t in zip(cache, self.slot_templates)))


class VaeDecoderStep(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents, *caches):
        cache = list(caches)
        video = _run_decoder(self.vae, latents, cache)
        return (video, *cache)


def load_vae_decoders(root, probe_hw: tuple[int, int] = (4, 6), weights: bool = True):
    """(first module, step module, slots, the diffusers VAE), weightless (export streams the weights) or with them.
    Slots, as (channels, spatial factor), are found by running diffusers' decoder for two latent frames at a probe
    size (on fake weights too: only their shapes are read)."""
    vae = load_vae(root, weights)
    h, w = probe_hw
    z = torch.zeros(1, vae.config.z_dim, 2, h, w)
    n_slots = sum(isinstance(m, torch.nn.Conv3d) for m in vae.decoder.modules())
    cache = [None] * n_slots
    with torch.no_grad():
        _run_decoder(vae, z[:, :, :1], cache)
        _run_decoder(vae, z[:, :, 1:], cache)
    used = [v for v in cache if v is not None]
    slots = [(v.shape[1], v.shape[3] // h) for v in used]

    def template(c, k):
        return lambda z: z.new_zeros(1, c, CACHE_T, z.shape[3] * k, z.shape[4] * k)

    first = VaeDecoderFirst(vae, [template(c, k) for c, k in slots]).eval()
    return first, VaeDecoderStep(vae).eval(), slots, vae


def load_vae(root, weights: bool = True):
    from diffusers import AutoencoderKLWan

    return load_model(AutoencoderKLWan, root / "vae", weights)


class VaeReference(torch.nn.Module):
    """diffusers' whole-clip decode, the parity reference for the chunked engines."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]
