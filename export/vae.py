"""The Wan VAE decoder (AutoencoderKLWan) for export: its EngineSpec and the traced wrapper.

Wan decodes one latent frame at a time through a causal feature cache held in Python lists; tracing unrolls that
loop, so each exported decoder is fixed to one latent frame count (height and width stay dynamic). Export one per
requested frame count. Input is the de-normalised latent (the runtime applies latents_mean/std); output is the
video in [-1, 1].
"""

from __future__ import annotations

import torch

from ..runtime.spec import Dim, EngineSpec, TensorSpec


def vae_engine_name(latent_frames: int) -> str:
    return f"vae_decoder_f{latent_frames}"


def vae_spec(z_dim: int, latent_frames: int, scale_t: int, scale_s: int, lat_h: Dim, lat_w: Dim) -> EngineSpec:
    """latents [1, z, F, h, w] -> video [1, 3, scale_t*(F-1)+1, scale_s*h, scale_s*w]."""
    return EngineSpec(
        name=vae_engine_name(latent_frames),
        inputs=(TensorSpec("latents", "float32", (1, z_dim, latent_frames, "h", "w")),),
        outputs=(TensorSpec("video", "float32",
                            (1, 3, scale_t * (latent_frames - 1) + 1, f"{scale_s}*h", f"{scale_s}*w")),),
        dims=(lat_h, lat_w),
    )


class VaeDecoderForExport(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def load_vae_decoder(root) -> VaeDecoderForExport:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(root / "vae", use_safetensors=True).eval()
    return VaeDecoderForExport(vae).eval()
