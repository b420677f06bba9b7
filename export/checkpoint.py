"""Read a diffusers-format Wan2.1 text-to-video directory: what it holds, what is supported, what is refused.

The family-specific knowledge of which files and classes make a Wan2.1-T2V pipeline lives here and nowhere else.
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


@dataclass(frozen=True)
class WanCheckpoint:
    root: Path
    model_index: dict
    transformer_config: dict
    vae_config: dict
    text_encoder_class: str
    scheduler_config: dict

    @property
    def tokenizer_file(self) -> Path:
        return self.root / "tokenizer" / "tokenizer.json"

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial") or 8)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal") or 4)

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


def read_checkpoint(path: str | Path) -> WanCheckpoint:
    """Validate a Wan2.1-T2V diffusers directory; raise SoraError naming what is missing or unsupported."""
    root = Path(path)
    if not root.is_dir():
        raise SoraError(f"model {path!r} is neither a directory nor a built-in model name (built-in: demo)")
    index = read_json(root / "model_index.json")
    cls = index.get("_class_name")
    if cls != "WanPipeline":
        raise SoraError(f"{root}: pipeline class {cls!r} is not supported (supported: WanPipeline, Wan2.1 T2V)")
    # Wan2.2 (two experts, boundary switching, per-token timesteps) and I2V/VACE change the sampler; refuse.
    if (index.get("transformer_2") or [None])[0] is not None or index.get("boundary_ratio") is not None:
        raise SoraError(f"{root}: Wan2.2 two-expert pipelines (transformer_2/boundary_ratio) are not supported yet")
    if index.get("expand_timesteps"):
        raise SoraError(f"{root}: expand_timesteps (Wan2.2 TI2V) is not supported yet")
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
    vcfg = read_json(root / "vae" / "config.json")
    if vcfg.get("patch_size") is not None or vcfg.get("is_residual"):
        raise SoraError(f"{root}: the Wan2.2 VAE (patch_size/is_residual) is not supported yet")
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
    for comp in ("transformer", "text_encoder", "vae"):
        _require_safetensors(root / comp)
    return WanCheckpoint(root, index, tcfg, vcfg, te_class, scfg)
