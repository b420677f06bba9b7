"""ONNX Runtime DiT step with the standard `Attention` op against the contrib `MultiHeadAttention` rewrite.

Same exported DiT (bench/harness.py's scenario, its fixed seed), same inputs, same threads, the two sessions timed
alternately in one run so machine noise falls on both; the rewritten output is compared with the original.
This is the measurement behind the rule "keep the rewrite only where it gains on the DiT step": on the CPU here,
and on CUDA (`--provider cuda`, onnxruntime-gpu) when a GPU is lent. Writes
bench/results/ (JSON + Markdown).

    python -m soraedge.bench.attention_rewrite [--scenario wan-384x6-1280tok] [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from ..runtime.machine import machine
from .harness import (SCENARIOS, build_scenario_model, export_scenario_dit, results_option, save,
                      scenario_options, time_interleaved, versions)

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def run(scenario: str, threads: int, repeats: int, provider: str, log=print) -> dict:
    import onnxruntime as ort

    from ..target.attention_rewrite import rewrite_file

    sc = SCENARIOS[scenario]
    feeds = sc.dit_inputs()
    with tempfile.TemporaryDirectory(prefix="bench-mha-") as tmp:
        tmp = Path(tmp)
        build_scenario_model(sc, tmp)
        log("exporting ...")
        export_scenario_dit(sc, tmp)
        report = rewrite_file(tmp / "dit.onnx", tmp / "dit_mha.onnx", sc.config().heads)
        log(f"rewrote {report.replaced} of {report.attention_nodes} Attention nodes")
        sessions = {}
        for name in ("dit", "dit_mha"):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sessions[name] = ort.InferenceSession(str(tmp / f"{name}.onnx"), so, providers=PROVIDERS[provider])
        stats, outputs = time_interleaved({name: (lambda s=s: s.run(None, feeds)[0])
                                           for name, s in sessions.items()}, repeats)
    median = {name: s["median_s"] for name, s in stats.items()}
    ref = outputs["dit"]
    return {
        "machine": machine(), "versions": versions(), "threads": threads, "provider": provider,
        "scenario": scenario, "latent_shape": list(sc.latent_shape), "tokens": sc.tokens,
        "repeats": repeats, "attention_nodes": report.attention_nodes, "replaced": report.replaced,
        "median_s": median, "p95_s": {name: s["p95_s"] for name, s in stats.items()},
        "speedup_mha": median["dit"] / median["dit_mha"],
        "max_abs_diff": float(np.abs(outputs["dit_mha"] - ref).max()), "ref_max_abs": float(np.abs(ref).max()),
    }


def to_markdown(r: dict) -> str:
    return "\n".join([
        f"# DiT step: ONNX Attention vs contrib MultiHeadAttention ({r['provider']})", "",
        f"{r['machine']['cpu']}, {r['threads']} threads, scenario {r['scenario']} ({r['tokens']} tokens, "
        f"latents {r['latent_shape']}), fp32, median of {r['repeats']} alternating runs; "
        f"{r['replaced']} of {r['attention_nodes']} Attention nodes rewritten.", "",
        "| graph | median s | p95 s |", "|---|---|---|",
        f"| ONNX Attention | {r['median_s']['dit']:.3f} | {r['p95_s']['dit']:.3f} |",
        f"| MultiHeadAttention | {r['median_s']['dit_mha']:.3f} | {r['p95_s']['dit_mha']:.3f} |", "",
        f"MultiHeadAttention speedup: {r['speedup_mha']:.3f}x; max |diff| {r['max_abs_diff']:.2e} "
        f"(output max {r['ref_max_abs']:.2f}).", ""])


@click.command()
@scenario_options
@click.option("--repeats", type=int, default=7, show_default=True)
@click.option("--provider", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True)
@results_option
def main(scenario, threads, repeats, provider, results):
    r = run(scenario, threads, repeats, provider)
    save("attention_rewrite", scenario, r, to_markdown(r), results)


if __name__ == "__main__":
    main()
