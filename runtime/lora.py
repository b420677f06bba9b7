"""LoRAs for the Wan DiT: read from safetensors, named as diffusers names the DiT's layers, as weight deltas.

`read_lora(path)` reads the formats diffusers' `WanLoraLoaderMixin` reads for Wan's transformer:
- diffusers/PEFT: `[transformer.]<module>.lora_A.weight`, `.lora_B.weight` (and `.lora_B.bias`), scaled by
  `lora_alpha / r` where the file's metadata carries its adapter config (`lora_adapter_metadata`), else by 1;
- the original Wan/ComfyUI layout: `diffusion_model.blocks.N.self_attn.q.lora_down.weight` / `lora_up` (or
  `lora_A`/`lora_B`), an optional `.alpha` (scale alpha / rank), `.diff_b` bias deltas and the head's `.diff`
  weight delta, the module names mapped as diffusers maps them (`self_attn.q` -> `attn1.to_q`, `ffn.0` ->
  `ffn.net.0.proj`, ...).
Anything else in the file is refused in one line naming it, never ignored; so is a file that is not safetensors
(a pickled `.pt`/`.bin`/`.ckpt` is never unpickled). `LoraSet.deltas` then gives, for a checkpoint tensor name
(`blocks.0.attn1.to_q.weight`), what the LoRAs add to it at their scales: scale x scaling x B @ A, summed over the
LoRAs in order, as diffusers' `fuse_lora` adds them. Torch-free: export fuses these into the weights as they stream
(export/streaming.py), and `fused_initializers` applies them to built engines at load: each changed weight is read
from the engine's weights file where the manifest says the graph holds it (`lora_targets`, recorded at export from
the graph's CHECKPOINT_TENSORS metadata), put in the graph's layout (the rotary rewrite's row order, the exporter's
transpose) and handed to the backend in place of the file's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SoraError
from .manifest import sha256_file
from .weights import read_float32, read_header, read_metadata

PICKLED = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
CHECKPOINT_TENSORS = "soraedge.checkpoint_tensors"  # ONNX model metadata: {initializer: the checkpoint tensor it is}
# The original Wan layout's module names -> diffusers' (loaders/lora_conversion_utils.py's
# _convert_non_diffusers_wan_lora_to_diffusers).
_WAN_BLOCK = {**{f"self_attn.{o}": f"attn1.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
              **{f"cross_attn.{o}": f"attn2.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
              "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
_WAN_TOP = {"time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
            "text_embedding.0": "condition_embedder.text_embedder.linear_1",
            "text_embedding.2": "condition_embedder.text_embedder.linear_2",
            "time_embedding.0": "condition_embedder.time_embedder.linear_1",
            "time_embedding.2": "condition_embedder.time_embedder.linear_2"}


@dataclass
class LoraLayer:
    """One layer's update: weight += scaling x up @ down (+ a full `diff`), bias += bias_scaling x `bias`. (PEFT
    scales lora_B's bias as it scales the product; diffusers folds a Wan-layout alpha into the two matrices alone.)"""

    down: np.ndarray | None = None  # [rank, in]
    up: np.ndarray | None = None  # [out, rank]
    scaling: float = 1.0
    bias: np.ndarray | None = None
    bias_scaling: float = 1.0
    diff: np.ndarray | None = None


@dataclass(frozen=True)
class Lora:
    """A LoRA file at a scale: its path, its content hash, and its layers by diffusers module name."""

    path: Path
    scale: float
    sha256: str
    layers: dict[str, LoraLayer] = field(repr=False)

    def describe(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale, "layers": len(self.layers)}


def parse_lora(arg: str) -> tuple[Path, float]:
    """'FILE[:SCALE]' -> (path, scale); the scale defaults to 1."""
    path, sep, scale = arg.rpartition(":")
    if not sep or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
        return Path(arg), 1.0
    value = float(scale)
    if not math.isfinite(value):
        raise SoraError(f"--lora {arg}: the scale {scale} is not a finite number")
    return Path(path), value


def read_lora(path: Path, scale: float = 1.0) -> Lora:
    """The LoRA in the safetensors file `path`, at `scale`; one line for a file that is missing, pickled, not
    safetensors, or holds keys of no known format."""
    path = Path(path)
    if path.suffix.lower() in PICKLED:
        raise SoraError(f"{path}: a pickled LoRA ({path.suffix}) is never unpickled: convert it to .safetensors")
    if not path.is_file():
        raise SoraError(f"{path}: no such LoRA file")
    tensors = read_header(path)  # a file that is not safetensors: one line naming it
    if not tensors:
        raise SoraError(f"{path}: the LoRA holds no tensors")
    names = list(tensors)
    if any(k.startswith("diffusion_model.") for k in names):
        layers = _wan_layers(path, tensors)
    else:
        layers = _diffusers_layers(path, tensors, _adapter_scaling(path))
    for name, layer in layers.items():
        if (layer.down is None) != (layer.up is None):
            raise SoraError(f"{path}: {name} has only one of its two low-rank matrices")
        if layer.down is not None and layer.up.shape[1] != layer.down.shape[0]:
            raise SoraError(f"{path}: {name}: its up matrix {list(layer.up.shape)} and down matrix "
                            f"{list(layer.down.shape)} disagree in rank")
    return Lora(path, float(scale), sha256_file(path), layers)


def _adapter_scaling(path: Path) -> float:
    """lora_alpha / r from the adapter config diffusers saves in the file's metadata; 1 without one."""
    raw = read_metadata(path).get("lora_adapter_metadata")
    if raw is None:
        return 1.0
    try:
        config = json.loads(raw)
        if any(k.startswith("transformer.") for k in config):  # a pipeline's file: each component's own prefix
            config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise SoraError(f"{path}: per-layer ranks or alphas (rank_pattern/alpha_pattern) are not supported")
        return float(config.get("lora_alpha", config["r"])) / float(config["r"])
    except (ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError):
        raise SoraError(f"{path}: its lora_adapter_metadata is not an adapter config with r and lora_alpha") from None


def _diffusers_layers(path: Path, tensors, scaling: float) -> dict[str, LoraLayer]:
    layers: dict[str, LoraLayer] = {}
    for key, info in tensors.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", name)
        if m is None:
            raise SoraError(f"{path}: {key} is not a LoRA tensor of a known format (diffusers/PEFT lora_A/lora_B, "
                            f"or Wan's diffusion_model.* layout)")
        layer = layers.setdefault(m.group(1), LoraLayer(scaling=scaling, bias_scaling=scaling))
        value = read_float32(info, key)
        if m.group(2) == "lora_A.weight":
            layer.down = value
        elif m.group(2) == "lora_B.weight":
            layer.up = value
        else:
            layer.bias = value
    return layers


def _wan_layers(path: Path, tensors) -> dict[str, LoraLayer]:
    layers: dict[str, LoraLayer] = {}
    alphas = {}
    for key, info in tensors.items():
        m = re.fullmatch(r"diffusion_model\.(?:(blocks\.\d+)\.)?(.+?)\.(lora_down\.weight|lora_A\.weight|"
                         r"lora_up\.weight|lora_B\.weight|alpha|diff_b|diff)", key)
        table = _WAN_BLOCK if m is not None and m.group(1) else _WAN_TOP
        if m is None or m.group(2) not in table or (m.group(3) == "diff" and m.group(2) != "head.head"):
            raise SoraError(f"{path}: {key} names no layer of the Wan DiT that LoRAs change (self_attn, "
                            f"cross_attn, ffn, time/text embeddings, head)")
        module = (f"{m.group(1)}." if m.group(1) else "") + table[m.group(2)]
        value = read_float32(info, key)
        layer = layers.setdefault(module, LoraLayer())
        kind = m.group(3)
        if kind in ("lora_down.weight", "lora_A.weight"):
            layer.down = value
        elif kind in ("lora_up.weight", "lora_B.weight"):
            layer.up = value
        elif kind == "alpha":
            alphas[module] = float(value.reshape(-1)[0])
        elif kind == "diff_b":
            layer.bias = value
        else:
            layer.diff = value
    for module, alpha in alphas.items():
        layer = layers[module]
        if layer.down is None:
            raise SoraError(f"{path}: {module} has an alpha but no low-rank matrices")
        layer.scaling = alpha / layer.down.shape[0]
    return layers


def half_split_order(heads: int, head_dim: int) -> np.ndarray:
    """Channel order [heads * head_dim] that moves each head's interleaved pairs (2i, 2i+1) to (i, head_dim/2 + i):
    the layout export/dit.py's rotary rewrite writes the self-attention's query and key rows in."""
    within = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(heads)[:, None] * head_dim + within).reshape(-1)


def fused_initializers(targets: dict[str, dict], loras: "LoraSet", read: Callable[[dict], np.ndarray]
                       ) -> dict[str, np.ndarray]:
    """{initializer: its weights with the LoRAs added, in the graph's layout and dtype} for each checkpoint tensor
    the LoRAs change. `targets`: the engine's `lora_targets` ({checkpoint tensor: where the graph holds it});
    `read(target)`: the initializer's stored values. The LoRAs are checked against `targets` (LoraSet.check).
    Each delta is computed in the graph's layout from the small factors (rows reordered in the up matrix, a
    transposed weight as down^T @ up^T) into one scratch buffer per shape, then added in place: no full-size
    transposed or reordered copy, no fresh full-size allocation per layer."""
    out, scratch = {}, {}
    for tensor, target in targets.items():
        if not loras.changes(tensor):
            continue
        order = half_split_order(*target["rows"]) if target.get("rows") else None
        transposed = bool(target.get("transpose"))
        if transposed and list(target["transpose"]) != [1, 0]:
            raise SoraError(f"{tensor}: the graph holds it transposed as {target['transpose']}; LoRAs change "
                            f"matrices (transposed [1, 0]) only")
        base = read(target)
        if base.shape not in scratch:
            scratch[base.shape] = np.empty(base.shape, np.float32)
        delta = loras.delta(tensor, order, transposed, out=scratch[base.shape])
        if base.dtype == np.float32 and base.flags.writeable:  # a fresh copy of the file's values: add in place
            base += delta
            out[target["initializer"]] = base
        else:
            out[target["initializer"]] = (base.astype(np.float32) + delta).astype(base.dtype)
    return out


def cached_weights(folder: Path | None, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Fused weights ({initializer: values}) from this user's cache folder `folder`, memory-mapped, when a run before
    wrote them; else `compute()`d and written there for the next run. The folder is named by the engine's content
    and the LoRAs' (runtime/user_cache.py's compiled models, within their size); it is written under another name
    and renamed into place, so a folder that exists is whole. None: no cache, computed each time. A cache that
    cannot be written (a full disk) costs the next run the computation, nothing else."""
    if folder is not None and (folder / "index.json").is_file():
        data = folder / "weights.bin"
        try:
            index = json.loads((folder / "index.json").read_text())
            if data.stat().st_size == sum(e["bytes"] for e in index.values()):
                return {name: np.memmap(data, e["dtype"], "r", e["offset"], tuple(e["shape"]))
                        for name, e in index.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        shutil.rmtree(folder, ignore_errors=True)  # not what was written: computed afresh below
    weights = compute()
    if folder is None:
        return weights
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        index, offset = {}, 0
        with open(staging / "weights.bin", "wb") as f:
            for name, values in weights.items():
                values = np.ascontiguousarray(values)
                f.write(memoryview(values).cast("B"))
                index[name] = {"dtype": values.dtype.str, "shape": list(values.shape), "offset": offset,
                               "bytes": values.nbytes}
                offset += values.nbytes
        (staging / "index.json").write_text(json.dumps(index))
        os.replace(staging, folder)
    except OSError:  # a full disk, or another run's folder already in place
        shutil.rmtree(staging, ignore_errors=True)
    return weights


class LoraSet:
    """LoRAs applied in order, each at its scale: the delta each adds to a checkpoint tensor."""

    def __init__(self, loras: list[Lora]):
        self.loras = list(loras)

    def __bool__(self) -> bool:
        return bool(self.loras)

    def describe(self) -> list[dict]:
        return [lora.describe() for lora in self.loras]

    def key(self) -> list[list]:
        """What the weights depend on: each LoRA's content and scale, in order (not its file's name)."""
        return [[lora.sha256, lora.scale] for lora in self.loras]

    def digest(self) -> str:
        """A short hash of `key()`, for naming caches of weights with these LoRAs."""
        return hashlib.sha256(json.dumps(self.key()).encode()).hexdigest()[:16]

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every layer of every LoRA names a weight of the model (`shapes`: checkpoint tensor name -> shape) with
        the LoRA's shape; one line naming those that do not."""
        for lora in self.loras:
            unknown = sorted(n for n in lora.layers if f"{n}.weight" not in shapes)
            if unknown:
                raise SoraError(f"{lora.path}: {len(unknown)} layer(s) match nothing in this DiT: "
                                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
            for name, layer in lora.layers.items():
                out_in = tuple(shapes[f"{name}.weight"])
                wrong = [(what, shape, want) for what, shape, want in (
                    ("", (layer.up.shape[0], layer.down.shape[1]) if layer.down is not None else None, out_in),
                    ("'s weight delta", layer.diff.shape if layer.diff is not None else None, out_in),
                    ("'s bias delta", layer.bias.shape if layer.bias is not None else None, out_in[:1]))
                    if shape is not None and tuple(shape) != want]
                if wrong:
                    what, shape, want = wrong[0]
                    raise SoraError(f"{lora.path}: {name}{what} is {list(shape)}, the DiT's is {list(want)}: this "
                                    f"LoRA is for another model")

    def changes(self, tensor: str) -> bool:
        """Whether any of the LoRAs adds to the checkpoint tensor `tensor`."""
        module, _, kind = tensor.rpartition(".")
        return any(self._factors(lora.layers[module], kind) for lora in self.loras if module in lora.layers)

    @staticmethod
    def _factors(layer: LoraLayer, kind: str) -> list:
        """The layer's terms for a `weight` or `bias`: ("low_rank", up, down, scaling) and ("full", value, scaling)."""
        if kind == "weight":
            return ([("low_rank", layer.up, layer.down, layer.scaling)] if layer.down is not None else []) + (
                [("full", layer.diff, 1.0)] if layer.diff is not None else [])
        return [("full", layer.bias, layer.bias_scaling)] if layer.bias is not None else []

    def delta(self, tensor: str, order: np.ndarray | None = None, transposed: bool = False,
              out: np.ndarray | None = None) -> np.ndarray | None:
        """What the LoRAs add to the checkpoint tensor `tensor` (`<module>.weight` or `.bias`), or None: scale x
        scaling x up @ down (+ scale x a full delta), summed in the LoRAs' order. In a graph's layout on request:
        rows (the output channels) taken in `order`, a weight `transposed` ([in, out]). `out`: a float32 buffer of
        the result's shape to write into."""
        module, _, kind = tensor.rpartition(".")
        total = None
        for lora in self.loras:
            layer = lora.layers.get(module)
            for term in self._factors(layer, kind) if layer is not None else []:
                if term[0] == "low_rank":  # the scale goes into the small factor, never the product
                    _, up, down, scaling = term
                    up = np.float32(lora.scale * scaling) * up.astype(np.float32)
                    up = up if order is None else up[order]
                    a, b = (down.astype(np.float32).T, up.T) if transposed else (up, down.astype(np.float32))
                    if total is None:
                        total = np.matmul(a, b, out=out)
                    else:
                        total += a @ b
                else:
                    _, value, scaling = term
                    value = np.float32(lora.scale * scaling) * value.astype(np.float32)
                    value = value if order is None else value[order]
                    value = value.T if transposed else value
                    if total is None and out is not None:
                        np.copyto(out, value)
                        total = out
                    elif total is None:
                        total = value
                    else:
                        total += value
        return total
