"""Reduced precision on the CPU, side by side in one run: the DiT step of INT8 and FP16 engines against the fp32
engine and PyTorch eager on the same weights and thread count, and each engine's end-to-end PSNR; every engine
directory on each CPU backend that can run it (ONNX Runtime; OpenVINO fp32, and bf16 execution where the CPU has
it).

The model (`--model`, export/tiny_wan.py's configurations, built from a fixed seed) is `bench-384` (hidden 384 =
6 heads x 64, 6 layers, Wan2.1's FFN ratio) or `wan21-1.3b-4layers` (Wan2.1-T2V-1.3B's layer shape, 4 layers); the
shape is 17 frames of 256x256 (1280 tokens), CFG batch 2. Every variant is a real `run_export` (calibration,
quality gate and all); a variant the gate refuses is reported as refused. The `auto` variant is the export's
default (fp32 graphs, the execution precision chosen by DiT step timings and the gate) and is timed only on what
it shipped. End-to-end PSNR: frames of the variant's engines against the fp32 engines' from the same prompts and
initial latents, at `--steps` steps. Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.precision [--model bench-384] [--threads 2] [--repeats 5] [--steps 20]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..precision.calib.config import CalibConfig
from ..runtime.machine import machine
from .harness import results_option, save, shape_name, time_calls, time_interleaved, versions

SHAPE = {"frames": 17, "height": 256, "width": 256}
PROMPTS = ("a red fox runs through the snow in the forest", "a small boat drifts on a calm lake at night")
# Variants as data: ExportConfig fields. The DiT has 6 blocks, so first/last stay int8 unless asked (auto: 8+).
VARIANTS = {
    "fp32": {"precision": "fp32"},
    # the export's default: fp32 graphs, the execution precision chosen by timing and the gate; timed as it ships
    "auto": {"precision": "auto", "backend": "auto"},
    "int8": {"precision": "int8"},
    "int8-no-smoothquant": {"precision": "int8", "calib": CalibConfig(smooth_alpha=None)},
    "int8-smooth-skip": {"precision": "int8", "calib": CalibConfig(smooth_unfoldable="skip")},
    "int8-keep-first-last": {"precision": "int8", "calib": CalibConfig(keep_first_last_blocks=True)},
    "int8-s8-symmetric": {"precision": "int8", "calib": CalibConfig(activations="s8")},
    "int8-attention-products": {"precision": "int8", "attention": "decomposed"},
    # INT8 linears, everything else (the attention products included) executed in bf16 by OpenVINO
    "int8-dit-bf16": {"precision": "bf16", "component_precision": (("transformer", "int8"),), "backend": "auto"},
    "fp16": {"precision": "fp16"},
    # int8 weights, activations quantized at run time by OpenVINO (no calibration); then with bf16 execution
    "int8-dynamic": {"precision": "int8-dynamic", "backend": "auto"},
    "int8-dynamic-dit-bf16": {"precision": "bf16", "component_precision": (("transformer", "int8-dynamic"),),
                              "backend": "auto"},
}
GAP_S = 0.3  # pause before each timed call: the previous library's worker threads stop spinning


def _export(model: Path, out: Path, variant: dict, threads: int, log) -> dict:
    from ..export.build import ExportConfig, run_export
    from ..export.dit import AttentionForm
    from ..runtime.errors import SoraError

    fields = dict(variant)
    if "attention" in fields:
        fields["attention"] = AttentionForm(fields["attention"])
    fields.setdefault("backend", "ort")
    t0 = time.perf_counter()
    try:
        run_export(ExportConfig(model=str(model), out=out, **SHAPE, check_parity=False, threads=threads, **fields),
                   log=lambda s: log("    " + s.strip()) if "PSNR" in s else None)
    except SoraError as e:
        return {"refused": str(e), "export_s": time.perf_counter() - t0}
    return {"export_s": time.perf_counter() - t0}


MODELS = ("bench-384", "wan21-1.3b-4layers")  # export/tiny_wan.py configurations


def describe(model_name: str) -> str:
    """The model's DiT shape, read from its tiny_wan configuration, e.g. "bench-384 (hidden 384, 6 layers, 6 heads x
    64, ffn 2240)"."""
    from ..export.tiny_wan import TINY_CONFIGS

    c = TINY_CONFIGS[model_name]
    return (f"{model_name} (hidden {c.heads * c.head_dim}, {c.layers} layers, {c.heads} heads x {c.head_dim}, "
            f"ffn {c.ffn_dim})")


def run(threads: int, repeats: int, steps: int, variants: list[str], log=print, model_name: str = "bench-384") -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    from ..precision.quality_gate import psnr
    from ..export.tiny_wan import build_tiny_wan
    from ..runtime.manifest import load_manifest
    from ..runtime.pipeline import Pipeline

    torch.set_num_threads(threads)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_wan(tmp / "model", model_name)
        for name in ["fp32"] + [v for v in variants if v != "fp32"]:
            log(f"export {name} ...")
            rows[name] = _export(model, tmp / name, VARIANTS[name], threads, log)

        ref = Pipeline.load(tmp / "fp32", threads=threads)
        spec = ref.manifest.spec("transformer")
        lat = ref.latent_shape(SHAPE["height"], SHAPE["width"], SHAPE["frames"])
        feeds = spec.sample_inputs(seed=0, b=2, f=lat[2], h=lat[3], w=lat[4])
        feeds["timestep"] = np.full((2,), 700.0, np.float32)
        tokens = lat[2] * lat[3] * lat[4] // 4

        log("PyTorch eager ...")
        torch_model = WanTransformer3DModel.from_pretrained(model / "transformer").eval()
        args = [torch.from_numpy(feeds[k]) for k in ("hidden_states", "timestep", "encoder_hidden_states")]

        def eager():
            with torch.inference_mode():
                return torch_model(*args, return_dict=False)[0].numpy()

        rows["pytorch-eager"], torch_out = time_calls(eager, repeats)
        torch_model = None  # release the weights before the engines load

        noises = [np.random.default_rng(i).standard_normal(lat, dtype=np.float32) for i in range(len(PROMPTS))]
        names = [v for v in rows if v != "pytorch-eager" and "refused" not in rows[v]]
        runs = [(name, backend, execution) for name in names
                for backend, execution in (shipped(tmp / name) if name == "auto" else peers(name))]
        log(f"DiT step: {len(runs)} engines, interleaved ...")
        steps_s, outs = time_engines(tmp, runs, feeds, threads, repeats)
        ref_frames = None
        for name in names:
            row = rows[name]
            m = load_manifest(tmp / name)
            row["precision"] = m.data["precision"]
            row["runtime_chosen"] = f"{m.runtime['backend']} {m.runtime['precision']}"
            detail = m.data["engines"]["transformer"].get("detail", {})
            row["dit_detail"] = {k: detail[k] for k in ("quantized_matmuls", "float_matmuls", "kept_float_modules",
                                                        "smoothquant", "samples") if k in detail}
            row["gate"] = m.runtime.get("quality_gate", {}).get("psnr_db")
            if "rejected" in m.runtime:  # an `auto` choice the gate set aside
                row["rejected"] = m.runtime["rejected"]
            row["engine_mb"] = {e: sum(m.data["files"][f]["bytes"] for f in (m.data["engines"][e]["file"],
                                                                             m.data["engines"][e]["file"] + ".data")
                                       if f in m.data["files"]) / 1e6 for e in m.engine_names}
            row["peers"] = {}
            for backend, execution in [(b, e) for n, b, e in runs if n == name]:
                peer = f"{backend} {execution}"
                log(f"end to end: {name} on {peer} ...")
                r = dict(steps_s[(name, backend, execution)])
                out = outs[(name, backend, execution)]
                r["max_rel_err_vs_pytorch"] = float(np.abs(out - torch_out).max() / np.abs(torch_out).max())
                pipe = Pipeline.load(tmp / name, threads=threads, backend=backend, precision=execution)
                t0 = time.perf_counter()
                frames = [pipe(p, **SHAPE, steps=steps, latents=z).frames for p, z in zip(PROMPTS, noises)]
                r["e2e_s_per_video"] = (time.perf_counter() - t0) / len(PROMPTS)
                pipe = None
                if ref_frames is None:  # fp32 on ONNX Runtime comes first
                    ref_frames = frames
                r["e2e_psnr_db"] = [psnr(f, r_) for f, r_ in zip(frames, ref_frames)]
                row["peers"][peer] = r

    base = rows["fp32"]["peers"]["ort fp32"]["median_s"]
    for name, row in rows.items():
        for r in ([row] if name == "pytorch-eager" else row.get("peers", {}).values()):
            r["speedup_vs_ort_fp32"] = base / r["median_s"]
            r["speedup_vs_pytorch"] = rows["pytorch-eager"]["median_s"] / r["median_s"]
    return {"model": describe(model_name), "shape": {**SHAPE,
            "latents": list(lat), "tokens": tokens, "cfg_batch": 2, "text_len": int(feeds["encoder_hidden_states"]
                                                                                      .shape[1])},
            "steps": steps, "prompts": list(PROMPTS), "threads": threads, "repeats": repeats, "machine": machine(),
            "versions": versions(), "rows": rows}


def time_engines(tmp: Path, runs, feeds: dict, threads: int, repeats: int) -> tuple[dict, dict]:
    """DiT step of every (variant, backend, execution) in `runs`, all engines open at once and called in turn
    (harness.time_interleaved), each the engine the pipeline itself opens (its file, shapes and cache)."""
    from ..runtime.pipeline import Pipeline

    calls = {}
    for name, backend, execution in runs:
        engine = Pipeline.load(tmp / name, threads=threads, backend=backend, precision=execution).engine("transformer")
        calls[(name, backend, execution)] = lambda e=engine: e(**feeds)
    return time_interleaved(calls, repeats, GAP_S)


def shipped(engines: Path) -> list[tuple[str, str]]:
    """The (backend, execution precision) an engine directory's manifest chose."""
    from ..runtime.manifest import load_manifest

    runtime = load_manifest(engines).runtime
    return [(runtime["backend"], runtime["precision"])]


def peers(variant: str) -> list[tuple[str, str]]:
    """(backend, execution precision) pairs that run a variant's engines: the CPU candidates of a target build here
    (target/choose.py), bf16 execution only over fp32 and int8 graphs, and only it for a variant built for it."""
    from ..runtime.choices import AUTO, Execution, Graph
    from ..target.choose import check_request

    graph = VARIANTS[variant].get("precision", Graph.FP32)
    found = check_request(AUTO, AUTO)
    if graph == Execution.BF16:
        found = [t for t in found if t.precision == Execution.BF16]
    elif graph == Graph.FP16:
        found = [t for t in found if t.precision == Execution.FP32]
    return [(t.backend, t.precision) for t in found]


def to_markdown(r: dict) -> str:
    s = r["shape"]
    lines = [f"### Reduced precision: {r['model']}", "",
             f"{r['machine']['cpu']}, {r['threads']} threads; {s['frames']} frames {s['width']}x{s['height']} -> "
             f"{s['tokens']} tokens, CFG batch 2, {s['text_len']} text tokens. DiT step: median of {r['repeats']} "
             f"after warm-up, every engine open at once and called in turn with a {GAP_S} s pause (OpenVINO "
             f"compiled for the shape, ONNX Runtime on the graph its export chose, as the pipeline runs them). "
             f"End to end: "
             f"{len(r['prompts'])} prompts, {r['steps']} steps, PSNR of the frames against the fp32 engines' on "
             f"ONNX Runtime from the same latents. `bf16` = OpenVINO executing the graph in bf16.", "",
             "| engines | runs on | DiT step s | vs ORT fp32 | vs PyTorch | e2e s/video | e2e PSNR dB | gate PSNR dB "
             "| int8 linears | max rel err vs PyTorch | DiT / text encoder MB | export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        if "refused" in row:
            lines.append(f"| {name} | refused by the gate: {row['refused']} ||||||||| {row['export_s']:.1f} |")
            continue
        if name == "pytorch-eager":
            lines.append(f"| {name} | PyTorch | {row['median_s']:.3f} | {row['speedup_vs_ort_fp32']:.2f}x | 1.00x "
                         f"|  |  |  |  | reference |  |  |")
            continue
        q = row.get("dit_detail", {})
        gate = f"{min(row['gate']):.1f}" if row.get("gate") else ""
        lin = f"{q['quantized_matmuls']}/{q['quantized_matmuls'] + q['float_matmuls']}" if q.get("quantized_matmuls") \
            else ""
        sizes = row.get("engine_mb", {})
        mb = f"{sizes['transformer']:.1f} / {sizes['text_encoder']:.2f}" if sizes else ""
        for peer, p in row["peers"].items():
            reference = name == "fp32" and peer == "ort fp32"
            e2e = "reference" if reference else f"{min(p['e2e_psnr_db']):.1f}"
            lines.append(f"| {name} | {peer} | {p['median_s']:.3f} | {p['speedup_vs_ort_fp32']:.2f}x | "
                         f"{p['speedup_vs_pytorch']:.2f}x | {p['e2e_s_per_video']:.1f} | {e2e} | {gate} | {lin} | "
                         f"{p['max_rel_err_vs_pytorch']:.1e} | {mb} | {row['export_s']:.1f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="Sampler steps of the end-to-end runs.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(sorted(VARIANTS)),
              help="Variants to run (default: all).")
@click.option("--model", "model_name", type=click.Choice(MODELS), default="bench-384", show_default=True)
@results_option
def main(threads, repeats, steps, variants, model_name, results):
    r = run(threads, repeats, steps, list(variants) or list(VARIANTS), log=lambda m: click.echo(m, err=True),
            model_name=model_name)
    save("precision", shape_name(model_name, **SHAPE), r, to_markdown(r), results)


if __name__ == "__main__":
    main()
