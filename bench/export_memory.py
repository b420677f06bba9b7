"""Peak host memory and wall time of exporting a real-size component: streamed (traced weightless, the weights
written from the checkpoint one tensor at a time: export/streaming.py) against loaded (the module built with its
weights, then traced), side by side in one run.

The checkpoint is written first with random weights in the real configuration, in the dtype and shards asked for,
one shard at a time (its writer never holds the model). Each export runs in its own fresh process, so each
high-water mark (VmHWM) is that export's alone; the parity check is measured separately as the export runs it for
a model of this size (on a copy with fewer layers where the whole does not fit twice). Writes
bench/results/ (JSON + Markdown).

    python -m soraedge.bench.export_memory [--component transformer] [--dtype bf16] [--modes streamed,loaded]
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import click

from .children import run_child, table
from .harness import host, results_option, save

from ..export.tiny_wan import REAL_DIT_CONFIGS

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHARD_BYTES = 2 << 30

CHILD = """
import json, sys, time
from pathlib import Path
root, mode, parity = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter()
from soraedge.export.dit import AttentionForm, dit_spec, load_dit, load_reference_dit
from soraedge.export.onnx_export import export_onnx, parity_check
from soraedge.export.streaming import CheckpointTensors
from soraedge.runtime.spec import Dim
config = json.loads((root / "transformer" / "config.json").read_text())
spec = dit_spec(config, 512, Dim("f", 1, 21, 21), Dim("h", 2, 60, 160, 2), Dim("w", 2, 104, 160, 2))
out = root / f"{mode}.onnx"
sample = {"b": 2, "f": 2, "h": 4, "w": 6}
result = {}
if parity:  # as the export checks a model this size: a copy with its first 2 layers, streamed, against PyTorch
    fewer = {"num_layers": 2}
    export_onnx(load_dit(root, AttentionForm.ONNX, False, **fewer), spec, out, 23, sample,
                CheckpointTensors(root / "transformer"))
    result["parity"] = parity_check(load_reference_dit(root, **fewer), spec, out, [{"b": 1, "f": 3, "h": 6, "w": 4}])
else:
    streamed = mode == "streamed"
    export_onnx(load_dit(root, AttentionForm.ONNX, not streamed), spec, out, 23, sample,
                CheckpointTensors(root / "transformer") if streamed else None)
    result["onnx_bytes"] = sum(p.stat().st_size for p in root.glob(f"{mode}.onnx*"))
for p in root.glob(f"{mode}.onnx*"):
    p.unlink()
from soraedge.bench.children import peak_gb
print(json.dumps({**result, "seconds": time.perf_counter() - t0, "vm_hwm_gb": peak_gb()}))
"""


def write_random_checkpoint(folder: Path, cls, config: dict, dtype: str, prefix: str, seed: int = 0) -> dict:
    """The diffusers or transformers model `cls` of `config` with random weights (normal, `_init_std`; the scales of
    normalisations 1) saved as `dtype` safetensors in shards of about SHARD_BYTES named `prefix`-0000i-of-0000n with
    an index, as the public checkpoints are; one shard in memory at a time, each tensor drawn in `dtype`."""
    import torch
    from safetensors.torch import save_file

    from ..export.streaming import load_model

    folder.mkdir(parents=True, exist_ok=True)
    header = {"_class_name": cls.__name__} if hasattr(cls, "load_config") else {"architectures": [cls.__name__]}
    (folder / "config.json").write_text(json.dumps({**header, **config}))
    model = load_model(cls, folder, weights=False)  # shapes only
    full = ({**header, **dict(model.config)} if hasattr(cls, "load_config")  # every value, as save_pretrained writes
            else {**model.config.to_dict(), **header})
    (folder / "config.json").write_text(json.dumps(full, default=list))
    g = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, DTYPES[dtype])
    written: list[list[str]] = []  # each shard's tensor names, once it is on disk
    shard, size = {}, 0
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            t = torch.ones(p.shape, dtype=torch_dtype)
        else:
            t = torch.randn(p.shape, generator=g, dtype=torch_dtype).mul_(_init_std(name, p, config))
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            save_file(shard, folder / f"part-{len(written) + 1:05d}.safetensors")
            written.append(list(shard))
            shard, size = {}, 0
    if shard:
        save_file(shard, folder / f"part-{len(written) + 1:05d}.safetensors")
        written.append(list(shard))
    weight_map = {}
    for i, names in enumerate(written, 1):  # named n-of-N once N is known, as the libraries name them
        final = f"{prefix}-{i:05d}-of-{len(written):05d}.safetensors"
        (folder / f"part-{i:05d}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"parameters": sum(p.numel() for p in model.parameters()), "shards": len(written)}


def _init_std(name: str, p, config: dict) -> float:
    """The spread of a random weight, as the libraries initialise them, so that a random model of the real size
    computes something tame (activations of unit scale, attention not saturated) rather than amplifying every
    rounding error: token tables 1, weight matrices and convolutions fan_in^-1/2 (T5's query also d_kv^-1/2: T5
    does not scale its attention scores), biases 0.02."""
    if p.dim() == 1:
        return 0.02
    if "shared" in name or "embed_tokens" in name:
        return 1.0
    fan_in = math.prod(p.shape[1:]) if "relative_attention_bias" not in name else p.shape[1]
    std = fan_in ** -0.5
    if name.endswith("SelfAttention.q.weight"):
        std *= config["d_kv"] ** -0.5
    return std


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"### Export memory: {r['model']} transformer ({r['parameters'] / 1e9:.2f}B parameters, stored "
             f"{r['dtype']} in {r['shards']} shards)", "",
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; fp32 ONNX written; each in a fresh process, "
             f"peak = VmHWM; {r['date']}.", "",
             *table("Export", r["runs"], lambda run: f"parity max rel {run['parity']['max_rel']:.1e}" if "parity" in run
                    else f"{run['onnx_bytes'] / 2**30:.1f} GiB ONNX")]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", type=click.Choice(sorted(REAL_DIT_CONFIGS)), default="wan2.1-1.3b", show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True,
              help="How the random checkpoint is stored.")
@click.option("--modes", default="streamed,loaded,parity", show_default=True,
              help="streamed, loaded (the module with its weights) and/or parity (the 2-layer copy check).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the checkpoint and ONNX go (default: a temporary folder; needs disk for both).")
@results_option
def main(model, dtype, modes, workdir, results):
    from diffusers import WanTransformer3DModel

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        info = write_random_checkpoint(root / "transformer", WanTransformer3DModel, REAL_DIT_CONFIGS[model], dtype,
                                       "diffusion_pytorch_model")
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s: {info}")
        runs = {}
        for mode in modes.split(","):
            runs[mode] = run_child(root, CHILD, mode, "1" if mode == "parity" else "0")
            print(mode, runs[mode])
    result = {"model": model, "dtype": dtype, **info, "runs": runs, "date": time.strftime("%Y-%m-%d"),
              "machine": host()}
    save("export_memory", model, result, to_markdown(result), results)


if __name__ == "__main__":
    main()
