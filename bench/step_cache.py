"""Step caching on the demo model: DiT evaluations and PSNR against no caching, over thresholds, in one run.

Same engines, prompts, initial latents, steps and threads for every row; the reference is the same pipeline
without the cache. Picks the largest threshold whose worst PSNR stays >= 30 dB (the issue's bar) and reports the
evaluations saved there. Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.step_cache [--steps 30] [--threads 2]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..runtime.machine import machine

from .harness import results_option, save, versions

PROMPTS = ("a yellow circle moving left on a black background", "a blue triangle shrinking on a black background",
           "a green square moving up on a black background")  # the trained demo's world
THRESHOLDS = (0.02, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)
MIN_PSNR = 30.0


def run(steps: int, threads: int, thresholds, engines: Path | None = None, log=print) -> dict:
    from ..export.build import ExportConfig, run_export
    from ..precision.quality_gate import psnr
    from ..runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="bench-step-cache-") as tmp:
        if engines is None:
            log("exporting demo ...")
            engines = Path(tmp) / "demo"
            run_export(ExportConfig(model="demo", out=engines, backend="ort", check_parity=False))
        pipe = Pipeline.load(engines, threads=threads).open_all()
        h, w, f = pipe.defaults["height"], pipe.defaults["width"], pipe.defaults["frames"]
        noises = [np.random.default_rng(i).standard_normal(pipe.latent_shape(h, w, f), dtype=np.float32)
                  for i in range(len(PROMPTS))]

        def generate(threshold):
            t0 = time.perf_counter()
            runs = [pipe(p, steps=steps, latents=z, step_cache=threshold) for p, z in zip(PROMPTS, noises)]
            return runs, (time.perf_counter() - t0) / len(runs)

        log("no cache ...")
        ref, ref_s = generate(None)
        rows = [{"threshold": None, "dit_evaluations": ref[0].dit_evaluations, "s_per_video": ref_s,
                 "denoise_s": float(np.mean([r.timings["denoise"] for r in ref])), "psnr_db": None}]
        for t in thresholds:
            log(f"threshold {t} ...")
            runs, s = generate(t)
            rows.append({"threshold": t, "dit_evaluations": float(np.mean([r.dit_evaluations for r in runs])),
                         "s_per_video": s, "denoise_s": float(np.mean([r.timings["denoise"] for r in runs])),
                         "psnr_db": [psnr(r.frames, q.frames) for r, q in zip(runs, ref)]})
    for r in rows:
        r["fewer_evaluations"] = rows[0]["dit_evaluations"] / r["dit_evaluations"]
        r["denoise_speedup"] = rows[0]["denoise_s"] / r["denoise_s"]
    ok = [r for r in rows[1:] if min(r["psnr_db"]) >= MIN_PSNR]
    best = max(ok, key=lambda r: r["threshold"]) if ok else None
    return {"model": "demo", "size": {"height": h, "width": w, "frames": f}, "steps": steps, "threads": threads,
            "prompts": list(PROMPTS), "machine": machine(), "versions": versions(), "rows": rows,
            "best_threshold_at_30db": best["threshold"] if best else None}


def to_markdown(r: dict) -> str:
    s = r["size"]
    lines = [f"### Step caching: {r['model']}, {s['frames']} x {s['width']}x{s['height']}, {r['steps']} steps", "",
             f"{r['machine']['cpu']}, {r['threads']} threads, ONNX Runtime fp32; {len(r['prompts'])} prompts, the "
             f"same initial latents per row; PSNR of the frames against no caching (worst prompt).", "",
             "| threshold | DiT evaluations | fewer evaluations | denoise s | denoise speedup | worst PSNR dB |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        t = "off" if row["threshold"] is None else f"{row['threshold']}"
        p = "reference" if row["psnr_db"] is None else f"{min(row['psnr_db']):.1f}"
        lines.append(f"| {t} | {row['dit_evaluations']:.1f} | {row['fewer_evaluations']:.2f}x | "
                     f"{row['denoise_s']:.2f} | {row['denoise_speedup']:.2f}x | {p} |")
    lines += ["", f"Largest threshold with worst PSNR >= 30 dB: {r['best_threshold_at_30db']}"]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--engines", type=click.Path(path_type=Path), help="A demo engine directory (default: export one).")
@results_option
def main(steps, threads, engines, results):
    r = run(steps, threads, THRESHOLDS, engines, log=lambda m: click.echo(m, err=True))
    save("step_cache", "demo", r, to_markdown(r), results)


if __name__ == "__main__":
    main()
