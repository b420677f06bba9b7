"""`--low-memory` at real scale: peak RSS of a whole generation against its largest stage, one process per mode.

Builds a pipeline of export/tiny_wan.py's table (`--model`; by default `wan21-1.3b-shapes`: Wan2.1-T2V-1.3B's
transformer and VAE configurations with random weights, a 1-layer UMT5 text encoder of width 4096;
`wan22-a14b-2layers`: two Wan2.2 A14B experts of 2 layers at their real width), exports it (fp32, ONNX Runtime),
then runs one generation per mode (default, --low-memory) in a fresh process. Two measurements per run:
- per stage (encode, denoise, decode): peak RSS sampled by a thread during the stage (runtime/memory.py), which can
  go down between stages;
- the whole generation: the process's VmHWM (a high-water mark: it only rises).
Target: with --low-memory, the whole generation's peak at most the largest stage's plus 20% (with two experts, the
denoise stage holds one at a time).
Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.low_memory [--model wan21-1.3b-shapes] [--height 128 --width 128 --frames 9 --steps 4]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from .harness import results_option, save, shape_name, versions

MODELS = {"wan21-1.3b-shapes": "Wan2.1-T2V-1.3B transformer + VAE configurations, random weights; 1-layer UMT5 "
                               "(d_model 4096)",
          "wan22-a14b-2layers": "two Wan2.2 A14B experts (width 5120, ffn 13824), 2 layers each, the Wan2.1 VAE, "
                                "random weights; 1-layer UMT5 (d_model 4096)"}

CHILD = """
import json, sys, time
from soraedge.runtime.pipeline import Pipeline
d, low, h, w, f, steps, threads = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:8])
t0 = time.perf_counter()
pipe = Pipeline.load(d, threads=threads, low_memory=low)
r = pipe("a red fox runs through the snow in the forest", height=h, width=w, frames=f, steps=steps)
from soraedge.bench.children import peak_gb
print(json.dumps({"stage_peak_mb": r.memory_mb, "vm_hwm_mb": peak_gb() * 1024, "timings": r.timings,
                  "seconds": time.perf_counter() - t0}))
"""


def run(height: int, width: int, frames: int, steps: int, threads: int, name: str = "wan21-1.3b-shapes",
        log=print) -> dict:
    from ..export.build import ExportConfig, run_export
    from ..export.tiny_wan import build_tiny_wan
    from ..runtime.machine import machine

    with tempfile.TemporaryDirectory(prefix="bench-lowmem-") as tmp:
        tmp = Path(tmp)
        log(f"building the {name} pipeline (random weights) ...")
        model = build_tiny_wan(tmp / "model", name)
        log("exporting (fp32, ONNX Runtime) ...")
        t0 = time.perf_counter()
        run_export(ExportConfig(model=str(model), out=tmp / "engines", height=height, width=width, frames=frames,
                                max_frames=frames, backend="ort", check_parity=False, threads=threads))
        export_s = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size / 1e6 for p in (tmp / "engines").glob("*.onnx.data")}
        rows = {}
        for mode, flag in (("default", "0"), ("low-memory", "1")):
            log(f"generating ({mode}) in a fresh process ...")
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "engines"), flag, str(height), str(width),
                                  str(frames), str(steps), str(threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["largest_stage_mb"] = max(v for v in row["stage_peak_mb"].values() if v is not None)
            row["whole_vs_largest_stage"] = row["vm_hwm_mb"] / row["largest_stage_mb"]
            rows[mode] = row
    return {"model": f"{name}: {MODELS.get(name, name)}", "height": height, "width": width, "frames": frames, "steps": steps,
            "threads": threads, "export_s": export_s, "weights_mb": sizes, "machine": machine(),
            "versions": versions(), "rows": rows,
            "method": "stage peaks: RSS sampled by a thread during each stage; whole: VmHWM of a fresh process"}


def to_markdown(r: dict) -> str:
    lines = [f"### Peak memory per stage: {r['model']}", "",
             f"{r['machine']['cpu']}, {r['threads']} threads; {r['frames']} frames {r['width']}x{r['height']}, "
             f"{r['steps']} steps; weights (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in r["weights_mb"].items()),
             f"Method: {r['method']}.", "",
             "| mode | encode MB | denoise MB | decode MB | whole generation MB | whole / largest stage | seconds |",
             "|---|---|---|---|---|---|---|"]
    for mode, row in r["rows"].items():
        m = row["stage_peak_mb"]
        lines.append(f"| {mode} | {m['encode']:.0f} | {m['denoise']:.0f} | {m['decode']:.0f} | {row['vm_hwm_mb']:.0f} "
                     f"| {row['whole_vs_largest_stage']:.2f}x | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", "name", type=click.Choice(sorted(MODELS)), default="wan21-1.3b-shapes", show_default=True)
@click.option("--height", default=128, show_default=True)
@click.option("--width", default=128, show_default=True)
@click.option("--frames", default=9, show_default=True)
@click.option("--steps", default=4, show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@results_option
def main(name, height, width, frames, steps, threads, results):
    r = run(height, width, frames, steps, threads, name, log=lambda m: click.echo(m, err=True))
    save("low_memory", shape_name(name, frames, height, width), r, to_markdown(r), results)


if __name__ == "__main__":
    main()
