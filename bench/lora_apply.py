"""LoRAs on built engines: the time to apply one at load against re-exporting with it fused, and a distilled
recipe's few steps against the checkpoint's default steps, in one run.

For each model of export/tiny_wan.py's table (`--model`, repeatable; by default the mid-size `bench-384` and
`wan21-1.3b-shapes`, Wan2.1-T2V-1.3B's DiT and VAE configurations), with random weights: export the base engines
(fp32, ONNX Runtime), write a random rank-`--rank` LoRA in Wan's own layout on every attention and feed-forward
layer of the DiT, then time
- `Pipeline.load(base, loras=[...])` until the DiT is open (reading the changed weights, adding the LoRA, writing
  them to the user's cache, the session taking them), against the same load without the LoRA; and again with the
  fused weights in the cache (mapped from it), as a second run with the same LoRA loads;
- `sora-export --lora` of the same model (the text encoder and VAE graphs come from the trace cache, as a user's
  second export would). Each model runs with caches of its own (XDG_CACHE_HOME in its temporary folder);
and check that both generate the same frames. On the first model, one generation at `--size` with the exported
UniPC at 50 steps and guidance 5, against 4 steps, guidance 1, Euler with shift 5 (a distillation LoRA's recipe;
random weights, so only the time is meaningful). Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.lora_apply [--model bench-384 --model wan21-1.3b-shapes] [--rank 16]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .harness import host, results_option, save, versions

PROMPT = "a red fox runs through the snow in the forest"


def write_wan_lora(model_dir: Path, path: Path, rank: int, seed: int = 0) -> int:
    """A random LoRA in Wan's layout (lora_down/lora_up, alpha = rank) on every block's attention and feed-forward
    linears; returns its parameter count."""
    from safetensors.numpy import save_file

    from ..runtime.weights import component_tensors

    shapes = {name: info.shape for name, info in component_tensors(model_dir / "transformer").items()}
    ours = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
            "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
            "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
            "ffn.net.2": "ffn.2"}
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in shapes.items():
        block, _, rest = name.partition(".")[2].partition(".")
        module = rest.removesuffix(".weight")
        if not name.startswith("blocks.") or not rest.endswith(".weight") or module not in ours:
            continue
        key = f"diffusion_model.blocks.{block}.{ours[module]}"
        out_f, in_f = shape
        state[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, in_f)) * 0.02).astype(np.float32)
        state[f"{key}.lora_up.weight"] = (rng.standard_normal((out_f, rank)) * 0.02).astype(np.float32)
        state[f"{key}.alpha"] = np.array(float(rank), np.float32)
    save_file(state, str(path))
    return sum(v.size for v in state.values())


def _open_dit(engines: Path, threads: int, loras=(), fresh: bool = False) -> float:
    """Seconds until the DiT is open; `fresh`: with no fused weights in this user's cache (computed and written)."""
    from ..runtime.pipeline import Pipeline
    from ..runtime.user_cache import cache_home

    if fresh:
        shutil.rmtree(cache_home() / "compiled" / "lora", ignore_errors=True)
    t0 = time.perf_counter()
    Pipeline.load(engines, threads=threads, backend="ort", loras=loras).engine("transformer")
    return time.perf_counter() - t0


@contextlib.contextmanager
def _caches_in(folder: Path):
    """This user's caches (traced graphs, fused weights) in `folder` for the block: one model's run alone."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = before


def measure(name: str, size: tuple[int, int, int], rank: int, threads: int, recipe: bool, log=print) -> dict:
    from ..export.build import ExportConfig, run_export
    from ..export.tiny_wan import build_tiny_wan
    from ..runtime.pipeline import Pipeline

    h, w, f = size
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp, _caches_in(Path(tmp) / "cache"):
        tmp = Path(tmp)
        model = build_tiny_wan(tmp / "model", name)
        log(f"{name}: exporting the base engines ...")
        t0 = time.perf_counter()
        run_export(ExportConfig(model=str(model), out=tmp / "base", height=h, width=w, frames=f, precision="fp32",
                                backend="ort", threads=threads))
        base_export = time.perf_counter() - t0
        lora = tmp / "lora.safetensors"
        lora_params = write_wan_lora(model, lora, rank)
        log(f"{name}: loading with and without the LoRA ...")
        _open_dit(tmp / "base", threads)  # page cache warm for both
        plain = min(_open_dit(tmp / "base", threads) for _ in range(2))
        applied = min(_open_dit(tmp / "base", threads, ((lora, 1.0),), fresh=True) for _ in range(2))
        cached = min(_open_dit(tmp / "base", threads, ((lora, 1.0),)) for _ in range(2))
        log(f"{name}: re-exporting with the LoRA fused ...")
        t0 = time.perf_counter()
        run_export(ExportConfig(model=str(model), out=tmp / "fused", height=h, width=w, frames=f, precision="fp32",
                                backend="ort", threads=threads, loras=((str(lora), 1.0),)))
        reexport = time.perf_counter() - t0
        noise = np.random.default_rng(0).standard_normal(Pipeline.load(tmp / "base").latent_shape(h, w, f),
                                                         dtype=np.float32)
        frames = [Pipeline.load(d, threads=threads, backend="ort", loras=lo)(PROMPT, steps=2, height=h, width=w,
                                                                            frames=f, latents=noise).frames
                  for d, lo in ((tmp / "base", ((lora, 1.0),)), (tmp / "fused", ()))]
        row = {"model": name, "size": list(size), "lora_rank": rank, "lora_parameters": lora_params,
               "base_export_s": base_export, "load_s": plain, "load_with_lora_s": applied,
               "apply_s": applied - plain, "load_with_cached_lora_s": cached, "apply_cached_s": cached - plain,
               "reexport_s": reexport, "reexport_over_load_with_lora": reexport / applied,
               "reexport_over_apply": reexport / max(applied - plain, 1e-9),
               "frames_max_abs_diff": float(np.abs(frames[0] - frames[1]).max())}
        if recipe:
            log(f"{name}: 50 steps with guidance against the 4-step recipe ...")
            pipe = Pipeline.load(tmp / "base", threads=threads, backend="ort")
            pipe(PROMPT, steps=1, height=h, width=w, frames=f)  # sessions open
            runs = {}
            for label, kw in (("50 steps, guidance 5, UniPC", dict(steps=50, guidance=5.0)),
                              ("4 steps, guidance 1, Euler shift 5", dict(steps=4, guidance=1.0, scheduler="euler",
                                                                          flow_shift=5.0))):
                t0 = time.perf_counter()
                r = pipe(PROMPT, height=h, width=w, frames=f, **kw)
                runs[label] = {"seconds": time.perf_counter() - t0, "dit_evaluations": r.dit_evaluations}
            row["recipes"] = runs
        return row


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["### LoRAs applied to built engines at load, against re-exporting with them fused", "",
             f"{m['cpu']}, {r['threads']} threads; random weights, a random LoRA in Wan's layout on every attention "
             f"and feed-forward linear of the DiT; fp32 engines on ONNX Runtime; {r['date']}.", "",
             "| model | size | LoRA rank (params) | load (s) | load with the LoRA (s) | applying it (s) | applying it "
             "again, from the cache (s) | re-export with it fused (s) | re-export / load with LoRA | re-export / "
             "applying | frames, applied vs fused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {'x'.join(map(str, row['size']))} | {row['lora_rank']} "
                     f"({row['lora_parameters'] / 1e6:.1f}M) | {row['load_s']:.2f} | {row['load_with_lora_s']:.2f} | "
                     f"{row['apply_s']:.2f} | {row['apply_cached_s']:.2f} | {row['reexport_s']:.1f} | "
                     f"{row['reexport_over_load_with_lora']:.1f}x | {row['reexport_over_apply']:.1f}x | "
                     f"{row['frames_max_abs_diff']:.1e} |")
    for row in r["rows"]:
        if "recipes" in row:
            lines += ["", f"End to end on {row['model']} at {'x'.join(map(str, row['size']))} (HxWxF), same engines:",
                      "", "| recipe | seconds | DiT evaluations |", "|---|---|---|"]
            lines += [f"| {k} | {v['seconds']:.2f} | {v['dit_evaluations']} |" for k, v in row["recipes"].items()]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", "models", multiple=True, default=("bench-384", "wan21-1.3b-shapes"), show_default=True)
@click.option("--size", default="256x256x17", show_default=True, help="HEIGHTxWIDTHxFRAMES of the exports and runs.")
@click.option("--rank", default=16, show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@results_option
def main(models, size, rank, threads, results):
    h, w, f = map(int, size.split("x"))
    rows = [measure(name, (h, w, f), rank, threads, recipe=i == 0, log=lambda m: click.echo(m, err=True))
            for i, name in enumerate(models)]
    result = {"rows": rows, "threads": threads, "date": time.strftime("%Y-%m-%d"), "machine": host(),
              "versions": versions()}
    save("lora_apply", "-".join(models), result, to_markdown(result), results)


if __name__ == "__main__":
    main()
