"""Does the quality gate's small shape flatter bf16? The gate's measurement repeated at growing shapes and steps.

The export's quality gate (precision/quality_gate.py) generates at the default shape scaled down to at most
MAX_GATE_TOKENS, for GATE_STEPS steps, and `--precision auto` ships OpenVINO's bf16 execution on its verdict. Here
the same measurement (the gate's prompts and initial latents; final frames' PSNR of OpenVINO bf16 against the fp32
ONNX Runtime engines) runs at each `--size` and `--steps`, on fp32 engines exported here from the built-in `demo`
(trained) or `bench-384` (random weights) model. Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.gate_shape --model demo --size 64x64 --size 256x256 --steps 4 --steps 20
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from ..runtime.machine import machine
from .harness import results_option, save

MODELS = {"demo": {}, "bench-384": {"frames": 17, "height": 256, "width": 256}}  # export defaults per model


def export_fp32(model: str, root: Path, threads: int) -> Path:
    """fp32 engines of `model` under root (the bench-384 checkpoint is built first)."""
    from ..export.build import ExportConfig, run_export

    source = model
    if model == "bench-384":
        from ..export.tiny_wan import build_tiny_wan

        source = str(build_tiny_wan(root / "bench-384", "bench-384"))
    out = root / "engines"
    run_export(ExportConfig(model=source, out=out, precision="fp32", backend="ort", check_parity=False,
                            threads=threads, **MODELS[model]))
    return out


def run(model: str, sizes: list[tuple[int, int]], steps: list[int], threads: int, log) -> dict:
    import openvino

    from ..precision.quality_gate import GATE_PROMPTS, GATE_STEPS, MAX_GATE_TOKENS, gate_size, latent_tokens, prompt_psnr
    from ..runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        engines = export_fp32(model, Path(tmp), threads)
        ref = Pipeline.load(engines, threads=threads, verify=False, backend="ort", precision="fp32")
        cand = Pipeline.load(engines, threads=threads, verify=False, backend="openvino", precision="bf16")
        frames = ref.defaults["frames"]
        rows = []
        for n in steps:
            for h, w in sizes:
                psnrs = [prompt_psnr(ref, cand, i, h, w, frames, n) for i in range(len(GATE_PROMPTS))]
                rows.append({"height": h, "width": w, "frames": frames, "steps": n,
                             "tokens": latent_tokens(ref, h, w, frames), "psnr_db": psnrs})
                log(f"{h}x{w}, {n} steps: " + ", ".join(f"{p:.1f} dB" for p in psnrs))
        gate_h, gate_w = gate_size(ref)
    return {"model": model, "threads": threads, "machine": machine(), "openvino": openvino.__version__,
            "prompts": list(GATE_PROMPTS), "gate": {"height": gate_h, "width": gate_w, "steps": GATE_STEPS,
                                                    "max_tokens": MAX_GATE_TOKENS}, "rows": rows}


def to_markdown(r: dict) -> str:
    g = r["gate"]
    lines = [f"### The quality gate's measurement at growing shapes: {r['model']}", "",
             f"{r['machine']['cpu']}, {r['threads']} threads, OpenVINO {r['openvino']}. Final frames' PSNR of "
             f"OpenVINO bf16 execution against the fp32 ONNX Runtime engines, the gate's prompts and initial "
             f"latents. The export's gate runs at {g['height']}x{g['width']} for {g['steps']} steps (the default "
             f"shape, scaled to at most {g['max_tokens']} tokens).", "",
             "| size | frames | tokens | steps | PSNR dB (" + " / ".join(f"prompt {i + 1}" for i in
                                                                 range(len(r["prompts"]))) + ") | worst dB |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['height']}x{row['width']} | {row['frames']} | {row['tokens']} | {row['steps']} | "
                     + " / ".join(f"{p:.1f}" for p in row["psnr_db"]) + f" | {min(row['psnr_db']):.1f} |")
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HEIGHTxWIDTH") from None
    return h, w


@click.command()
@click.option("--model", type=click.Choice(sorted(MODELS)), default="demo", show_default=True)
@click.option("--size", "sizes", multiple=True, required=True, help="HEIGHTxWIDTH, repeatable.")
@click.option("--steps", multiple=True, type=int, default=(4,), show_default=True, help="Repeatable.")
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@results_option
def main(model, sizes, steps, threads, results):
    r = run(model, [_size(s) for s in sizes], list(steps), threads, log=lambda m: click.echo(m, err=True))
    save("gate_shape", model, r, to_markdown(r), results)


if __name__ == "__main__":
    main()
