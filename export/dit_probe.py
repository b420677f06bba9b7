"""The step-cache probe: the DiT's cheap front (patch embedding, timestep embedding, first block's modulation)
as its own small engine, so the runtime can tell how much a step's input has changed before paying for the DiT.

It returns what TeaCache (Liu et al., 2024) keys its decision on: the first block's timestep-modulated input
    norm1(patchify(x)) * (1 + scale_msa) + shift_msa        [B, N, D], N = f * (h / ph) * (w / pw)
which reacts to both the latents and the timestep. It costs a patchify convolution and a few small linears
(well under 1% of a DiT step). See runtime/step_cache.py for the decision and the reuse.
"""

from __future__ import annotations

import torch

from ..runtime.spec import Dim, EngineSpec, RunSettings, TensorSpec


def probe_spec(tcfg: dict, lat_frames: Dim, lat_h: Dim, lat_w: Dim, max_batch: int = 2,
               name: str = "dit_probe") -> EngineSpec:
    _, ph, pw = tcfg["patch_size"]
    dim = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    return EngineSpec(
        name=name,
        inputs=(TensorSpec("hidden_states", "float32", ("b", tcfg["in_channels"], "f", "h", "w")),
                TensorSpec("timestep", "float32", ("b",))),
        outputs=(TensorSpec("modulated_input", "float32", ("b", f"f*(h//{ph})*(w//{pw})", dim)),),
        dims=(Dim("b", 1, max_batch, max_batch), lat_frames, lat_h, lat_w),
        # tiny, and called between DiT steps (measured on the demo: +70% denoise time with a 2-thread pool of its own)
        run=RunSettings(one_thread=True),
    )


class FirstBlockProbe(torch.nn.Module):
    """(hidden_states [B, C, F, H, W], timestep [B]) -> block 0's modulated input [B, N, D], as diffusers' forward
    computes it (WanTransformer3DModel.forward up to WanTransformerBlock's norm_hidden_states)."""

    def __init__(self, transformer):
        super().__init__()
        self.patch_embedding = transformer.patch_embedding
        self.timesteps_proj = transformer.condition_embedder.timesteps_proj
        self.time_embedder = transformer.condition_embedder.time_embedder
        self.act_fn = transformer.condition_embedder.act_fn
        self.time_proj = transformer.condition_embedder.time_proj
        self.block = transformer.blocks[0]
        object.__setattr__(self, "checkpoint_model", transformer)  # its names are the checkpoint's (streaming)

    def forward(self, hidden_states, timestep):
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # [B, N, D]
        temb = self.time_embedder(self.timesteps_proj(timestep).type_as(x))  # [B, D]
        timestep_proj = self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))  # [B, 6, D]
        shift, scale = (self.block.scale_shift_table + timestep_proj.float()).chunk(6, dim=1)[:2]  # [B, 1, D]
        return (self.block.norm1(x.float()) * (1 + scale) + shift).type_as(x)


class ProbeReference(torch.nn.Module):
    """diffusers' own model, run to block 0's self-attention and stopped there: the probe's parity reference."""

    class _Stop(Exception):
        pass

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep):
        seen = {}

        def grab(module, args):
            seen["x"] = args[0]
            raise self._Stop

        handle = self.model.blocks[0].attn1.register_forward_pre_hook(grab)
        text = torch.zeros(hidden_states.shape[0], 1, self.model.config.text_dim)
        try:
            self.model(hidden_states, timestep, text, return_dict=False)
        except self._Stop:
            pass
        finally:
            handle.remove()
        return seen["x"]
