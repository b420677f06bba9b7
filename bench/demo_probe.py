"""The demo model judged by the probe: colour, shape and motion accuracy of generated videos, per precision.

Exports the built-in demo to fp32 engines (and, with --precision, reduced-precision ones through the quality gate;
INT8 calibrated on 8 training captions), generates every prompt of the prompt set from the engines (sora-run's path,
fixed seeds), reads each video back with demo/probe.py, and reports colour, shape and motion accuracy (and all three
at once) separately for the held-out colour x shape x motion combinations (never seen in training) and for training
combinations; reduced precisions also get the PSNR of their videos against the fp32 engines' on the same seeds, and
one the quality gate refuses is reported as refused, with the gate's measurement.
Writes bench/results/ (JSON + Markdown, with the prompt set).

    python -m soraedge.bench.demo_probe [--seeds 3] [--precision int8 --precision fp16] [--backend ort
                                        --backend openvino --backend openvino-bf16]
                                        [--weights DIR]   # weights from demo/train.py other than the shipped ones
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


def prompt_set(seeds: int) -> list[dict]:
    """Every held-out scene and every 8th training scene, each with `seeds` seeds."""
    from ..demo.toy_world import HELD_OUT, TRAIN_SCENES

    scenes = [("held_out", s) for s in HELD_OUT] + [("train", s) for s in TRAIN_SCENES[::8]]
    return [{"split": split, "scene": s, "seed": 1000 + k} for split, s in scenes for k in range(seeds)]


def generate_all(engines: Path, prompts: list[dict], threads: int, steps: int | None,
                 backend: str = "ort") -> tuple[list, float]:
    """`backend`: ort | openvino | openvino-bf16 (OpenVINO executing the graphs in bf16)."""
    from ..runtime.pipeline import Pipeline

    name, _, execution = backend.partition("-")
    pipe = Pipeline.load(engines, threads=threads, backend=name, precision=execution or "fp32").open_all()
    t0 = time.perf_counter()
    videos = [pipe(p["scene"].caption, seed=p["seed"], steps=steps).frames for p in prompts]  # [F, H, W, 3] in [0, 1]
    return videos, (time.perf_counter() - t0) / len(prompts)


def accuracy_by_split(videos, prompts) -> dict:
    from ..demo.probe import read_video, score

    verdicts = [read_video(np.round(v * 255)) for v in videos]
    out = {}
    for split in ("held_out", "train"):
        idx = [i for i, p in enumerate(prompts) if p["split"] == split]
        out[split] = score([verdicts[i] for i in idx], [prompts[i]["scene"] for i in idx])
    out["verdicts"] = [{"prompt": p["scene"].caption, "seed": p["seed"], "split": p["split"],
                        "colour": v.colour, "mean_colour": v.mean_name, "flat_share": round(v.flat_share, 3),
                        "shape": v.shape, "fill": round(v.fill, 3), "mask_fill": round(v.mask_fill, 3),
                        "motion": v.motion}
                       for p, v in zip(prompts, verdicts)]
    return out


def run(seeds: int, precisions, threads: int, steps: int | None, weights: Path | None = None,
        backends=("ort",), log=print) -> dict:
    from ..precision.calib.config import CalibConfig
    from ..demo.toy_world import TRAIN_SCENES
    from ..export.build import ExportConfig, run_export
    from ..precision.quality_gate import QualityGateRefused, psnr

    prompts = prompt_set(seeds)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-demo-probe-") as tmp:
        # INT8 calibrates on the demo's own world (training captions), not on the shipped general prompts.
        calib_file = Path(tmp) / "calib_prompts.txt"
        calib_file.write_text("\n".join(s.caption for s in TRAIN_SCENES[5::12]) + "\n")
        calib = CalibConfig(prompts_file=calib_file, prompts=8)
        reference = None
        for precision in ("fp32", *precisions):
            log(f"exporting demo ({precision}) ...")
            out = Path(tmp) / precision
            try:
                run_export(ExportConfig(model="demo", out=out, backend="ort", precision=precision, check_parity=False,
                                        threads=threads, calib=calib,
                                        demo_weights=str(weights) if weights else None))
            except QualityGateRefused as e:  # the refusal is the measurement; any other error stops the run
                if precision == "fp32":
                    raise
                rows[precision] = {"precision": precision, "refused": str(e)}
                log(f"  {precision}: {e}")
                continue
            for backend in backends:
                log(f"generating {len(prompts)} videos on {backend} ...")
                videos, s_per_video = generate_all(out, prompts, threads, steps, backend)
                row = {"precision": precision, "backend": backend, "s_per_video": s_per_video,
                       **accuracy_by_split(videos, prompts)}
                if reference is None:  # fp32 on the first backend
                    reference = videos
                else:
                    row["psnr_vs_fp32_db"] = float(np.median([psnr(v, r) for v, r in zip(videos, reference)]))
                rows[f"{precision} on {backend}"] = row
                log(f"  {precision} on {backend}: held-out {row['held_out']}, train {row['train']}")
    return {"machine": machine(), "versions": versions(), "weights": str(weights or "demo/weights (shipped)"),
            "threads": threads, "steps": steps or "model default",
            "seeds_per_prompt": seeds, "rows": rows}


def to_markdown(r: dict) -> str:
    lines = ["# The demo model, read back by the probe", "",
             f"{r['machine']['cpu']}, {r['threads']} threads, steps {r['steps']}, "
             f"{r['seeds_per_prompt']} seeds per prompt; held-out = colour x shape x motion combinations never seen "
             f"in training. Weights: {r['weights']}.", "",
             "| engines | runs on | split | videos | colour | shape | motion | all three | PSNR vs fp32 | s/video |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"].values():
        if "refused" in row:
            lines.append(f"| {row['precision']} | - | - | - | refused: {row['refused']} | | | | | |")
            continue
        p = f"{row['psnr_vs_fp32_db']:.1f} dB" if "psnr_vs_fp32_db" in row else "reference"
        for split in ("held_out", "train"):
            a = row[split]
            lines.append(f"| {row['precision']} | {row.get('backend', 'ort')} | {split.replace('_', '-')} | {a['n']} | "
                         f"{a['colour_accuracy']:.0%} | {a['shape_accuracy']:.0%} | {a['motion_accuracy']:.0%} | "
                         f"{a['all_accuracy']:.0%} | {p} | {row['s_per_video']:.2f} |")
    lines += ["", "Prompt set (seeds 1000..):", ""]
    first = next(iter(r["rows"].values()))["verdicts"]
    lines += sorted({f"- {v['split']}: {v['prompt']}" for v in first})
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--seeds", default=3, show_default=True, help="Seeds per prompt.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp16", "int8", "int8-dynamic"]),
              help="Also judge these engines (through the export's quality gate).")
@click.option("--steps", type=int, help="Sampling steps (default: the model's).")
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A demo/train.py output folder to judge instead of the shipped weights.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["ort", "openvino", "openvino-bf16"]),
              help="Run every engine directory on these CPU backends (default: ort); openvino-bf16 executes the "
                   "graphs in bf16.")
@results_option
def main(seeds, precisions, steps, threads, weights, backends, results):
    r = run(seeds, precisions, threads, steps, weights, backends or ("ort",))
    save("demo_probe", "demo", r, to_markdown(r), results)


if __name__ == "__main__":
    main()
