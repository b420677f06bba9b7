"""Read a diffusers-format Wan text-to-video directory: what it holds, what is supported, what is refused.

Wan2.1 T2V; Wan2.2 A14B's layout: a second DiT (`transformer_2`, the low-noise expert) that `WanPipeline` runs
below `boundary_ratio` of the training timesteps; Wan2.2 TI2V-5B's: `expand_timesteps` (the DiT takes a timestep
per token: for text-to-video every token's is the step's, which the exported DiT computes from the step's
timestep, as the same numbers) and the Wan2.2 VAE (48 latent channels, residual blocks, a 2x2 pixel patch: 16x
spatial compression). The family-specific knowledge of which files and classes make these pipelines, and each
family's generation defaults, lives here and nowhere else.
Only safetensors weights are loaded; a directory that ships only pickled `.bin` weights is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import SoraError

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
TEXT_ENCODERS = ("UMT5EncoderModel", "T5EncoderModel", "BertModel")  # BERT: the demo's MiniLM
SCHEDULERS = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
# What sora-run generates when not told otherwise, per family: WanPipeline.__call__'s defaults for Wan2.1 and A14B;
# TI2V-5B's from its release (1280x704, 121 frames at 24 fps: Wan2.2's ti2v-5B configuration).
WAN_DEFAULTS = {"height": 480, "width": 832, "frames": 81, "steps": 50, "guidance": 5.0, "negative_prompt": "",
                "fps": 16, "max_sequence_length": 512}
# AutoencoderKLWan's compression factors where its config names none
VAE_SCALE_DEFAULTS = {"scale_factor_spatial": 8, "scale_factor_temporal": 4}
FAMILY_DEFAULTS = {"wan2.1-t2v": WAN_DEFAULTS, "wan2.2-t2v-a14b": WAN_DEFAULTS,
                   "wan2.2-ti2v-5b": {**WAN_DEFAULTS, "height": 704, "width": 1280, "frames": 121, "fps": 24}}


@dataclass(frozen=True)
class WanCheckpoint:
    root: Path
    model_index: dict
    transformer_config: dict
    vae_config: dict
    text_encoder_class: str
    scheduler_config: dict
    experts: tuple[str, ...] = ("transformer",)  # the DiT folders: Wan2.2 A14B adds "transformer_2"
    boundary_ratio: float | None = None  # Wan2.2 A14B: the low-noise expert runs below this share of the timesteps

    @property
    def family(self) -> str:
        if self.model_index.get("expand_timesteps"):
            return "wan2.2-ti2v-5b"
        return "wan2.2-t2v-a14b" if len(self.experts) > 1 else "wan2.1-t2v"

    @property
    def defaults(self) -> dict:
        return dict(FAMILY_DEFAULTS[self.family])

    @property
    def tokenizer_file(self) -> Path:
        return self.root / "tokenizer" / "tokenizer.json"

    @property
    def vae_scale_spatial(self) -> int:
        return _vae_scale(self.vae_config, "scale_factor_spatial")

    @property
    def vae_scale_temporal(self) -> int:
        return _vae_scale(self.vae_config, "scale_factor_temporal")

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["z_dim"])

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(self.transformer_config["patch_size"])  # type: ignore[return-value]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise SoraError(f"{path} is missing: not a complete diffusers Wan pipeline directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SoraError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SoraError(f"{path} is not a JSON object")
    return data


def _require_safetensors(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        bins = [p.name for p in folder.glob("*.bin")]
        hint = f" (found {bins}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
        raise SoraError(f"{folder} has no .safetensors weights{hint}")


def _vae_scale(vcfg: dict, key: str) -> int:
    return int(vcfg.get(key) or VAE_SCALE_DEFAULTS[key])


def _check_vae_factors(root: Path, vcfg: dict) -> None:
    """The VAE config's compression factors and latent statistics agree with its architecture (WanPipeline sizes
    latents by the factors alone): one line naming what disagrees. Absent keys take AutoencoderKLWan's defaults."""
    try:
        down = [bool(x) for x in vcfg.get("temperal_downsample", [False, True, True])]
        spatial = 2 ** (len(vcfg.get("dim_mult", [1, 2, 4, 4])) - 1) * int(vcfg.get("patch_size") or 1)
        z_dim = int(vcfg.get("z_dim", 16))
        stats = {k: len(vcfg.get(k) or [0.0] * 16) for k in ("latents_mean", "latents_std")}
        configured = {k: _vae_scale(vcfg, k) for k in VAE_SCALE_DEFAULTS}
    except (TypeError, ValueError):
        raise SoraError(f"{root}/vae/config.json: dim_mult, temperal_downsample, z_dim, the scale factors or the "
                        f"latent statistics are not lists and numbers") from None
    for key, built in (("scale_factor_spatial", spatial), ("scale_factor_temporal", 2 ** sum(down))):
        if configured[key] != built:
            raise SoraError(f"{root}/vae/config.json: {key} is {configured[key]}, but its blocks compress by {built}")
    for key, n in stats.items():
        if n != z_dim:
            raise SoraError(f"{root}/vae/config.json: {key} has {n} values for {z_dim} latent channels (z_dim)")


def read_checkpoint(path: str | Path) -> WanCheckpoint:
    """Validate a Wan2.1-T2V diffusers directory; raise SoraError naming what is missing or unsupported."""
    root = Path(path)
    if not root.is_dir():
        raise SoraError(f"model {path!r} is neither a directory nor a built-in model name (built-in: demo)")
    index = read_json(root / "model_index.json")
    cls = index.get("_class_name")
    if cls != "WanPipeline":
        raise SoraError(f"{root}: pipeline class {cls!r} is not supported (supported: WanPipeline: Wan2.1 T2V, "
                        f"Wan2.2 A14B and TI2V-5B text-to-video)")
    experts, boundary = _experts(root, index)
    if not isinstance(index.get("expand_timesteps", False), bool):
        raise SoraError(f"{root}/model_index.json: expand_timesteps is {index['expand_timesteps']!r}, not true/false")
    if (index.get("image_encoder") or [None])[0] is not None:
        raise SoraError(f"{root}: image-to-video / VACE pipelines (image_encoder) are not supported yet")
    for c in COMPONENTS:
        entry = index.get(c)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2
                                      and all(isinstance(x, (str, type(None))) for x in entry)):
            raise SoraError(f"{root}/model_index.json: {c} is {entry!r}, not a [library, class] pair")
    missing = [c for c in COMPONENTS if not (index.get(c) or [None, None])[1] or not (root / c).is_dir()]
    if missing:
        raise SoraError(f"{root}: missing components {missing} (a Wan2.1 T2V pipeline needs {list(COMPONENTS)})")

    tcfg = read_json(root / "transformer" / "config.json")
    if tcfg.get("image_dim") is not None or tcfg.get("added_kv_proj_dim") is not None:
        raise SoraError(f"{root}: transformer has image conditioning (image_dim/added_kv_proj_dim): "
                        "image-to-video is not supported yet")
    if index.get("expand_timesteps") and list(tcfg.get("patch_size") or [])[1:] != [2, 2]:
        raise SoraError(f"{root}: expand_timesteps needs the DiT's spatial patch 2x2 (WanPipeline builds the "
                        f"per-token timesteps for it), not {tcfg.get('patch_size')}")
    vcfg = read_json(root / "vae" / "config.json")
    patch = vcfg.get("patch_size")
    if patch is not None and not (isinstance(patch, int) and not isinstance(patch, bool) and patch >= 1):
        raise SoraError(f"{root}/vae/config.json: patch_size {patch!r} is not a positive integer")
    _check_vae_factors(root, vcfg)
    te_class = index["text_encoder"][1]
    if te_class not in TEXT_ENCODERS:
        raise SoraError(f"{root}: text encoder class {te_class!r} is not supported (supported: {list(TEXT_ENCODERS)})")
    scfg = read_json(root / "scheduler" / "scheduler_config.json")
    if scfg.get("_class_name") not in SCHEDULERS:
        raise SoraError(f"{root}: scheduler {scfg.get('_class_name')!r} is not supported "
                        f"(supported: {list(SCHEDULERS)})")
    # Validate scheduler math now, so an unsupported config fails before minutes of export.
    from ..runtime.schedulers import scheduler_from_config

    scheduler_from_config(scfg)
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        raise SoraError(f"{root}/tokenizer has no tokenizer.json (a fast tokenizer file is required)")
    for comp in (*experts, "text_encoder", "vae"):
        _require_safetensors(root / comp)
    for expert in experts[1:]:
        other = read_json(root / expert / "config.json")
        differ = [k for k in ("in_channels", "out_channels", "patch_size", "text_dim") if other.get(k) != tcfg.get(k)]
        if differ:
            raise SoraError(f"{root}/{expert}: {', '.join(differ)} differ from transformer's: the two experts must "
                            f"take the same latents and text")
    return WanCheckpoint(root, index, tcfg, vcfg, te_class, scfg, experts, boundary)


def _experts(root: Path, index: dict) -> tuple[tuple[str, ...], float | None]:
    """The DiT folders and Wan2.2 A14B's boundary: a second expert and a boundary in (0, 1) come together."""
    entry = index.get("transformer_2")
    second = isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
    boundary = index.get("boundary_ratio")
    if not second and boundary is None:
        return ("transformer",), None
    if not (second and isinstance(boundary, (int, float)) and 0 < boundary < 1):
        raise SoraError(f"{root}/model_index.json: a Wan2.2 two-expert pipeline needs both transformer_2 and a "
                        f"boundary_ratio between 0 and 1 (got transformer_2 {index.get('transformer_2')!r}, "
                        f"boundary_ratio {boundary!r})")
    if not (root / "transformer_2").is_dir():
        raise SoraError(f"{root}: missing component transformer_2 (the low-noise expert model_index.json names)")
    return ("transformer", "transformer_2"), float(boundary)
