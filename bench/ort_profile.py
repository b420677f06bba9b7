"""Where ONNX Runtime's CPU DiT step spends its time: per-operator-type shares from ORT's own profiler.

Exports the scenario's DiT (bench/harness.py SCENARIOS), runs it with profiling on, and sums node times by op
type (after ORT's graph optimisations, so fused ops show under their fused names). Writes
bench/results/ (JSON + Markdown).

    python -m soraedge.bench.ort_profile [--scenario wan-384x6-1280tok] [--threads 2] [--runs 3] [--graph mha]

`--graph mha` profiles ONNX Runtime's CPU graph (MultiHeadAttention, target/attention_rewrite.py), the one the
export keeps where it is faster; `portable` the ONNX `Attention` graph every backend reads.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import click

from .harness import (SCENARIOS, build_scenario_model, export_scenario_dit, results_option, save,
                      scenario_options)


def profile(scenario: str, threads: int, runs: int, opt_level: str = "all", graph: str = "portable") -> dict:
    import onnxruntime as ort

    from ..target.attention_rewrite import rewrite_file

    sc = SCENARIOS[scenario]
    feeds = sc.dit_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_scenario_model(sc, tmp)
        export_scenario_dit(sc, tmp)
        path = tmp / "dit.onnx"
        if graph == "mha":
            rewrite_file(path, tmp / "dit-mha.onnx")
            path = tmp / "dit-mha.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[opt_level]
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp / "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up (excluded below)
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    model_runs = [e for e in events if e.get("name") == "model_run"]
    first_timed = model_runs[1]["ts"] if len(model_runs) > 1 else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            op = e["args"].get("op_name", "?")
            by_op[op] += e["dur"] / 1e6 / runs
            count[op] += 1
    total = sum(by_op.values())
    ops = sorted(({"op": k, "seconds": v, "share": v / total, "nodes": count[k] // runs} for k, v in by_op.items()),
                 key=lambda r: -r["seconds"])
    return {"scenario": scenario, "threads": threads, "runs": runs, "opt_level": opt_level, "graph": graph,
            "node_seconds_per_run": total, "ops": ops}


def to_markdown(r: dict) -> str:
    lines = [f"### ONNX Runtime CPU profile: {r['scenario']}, {r.get('graph', 'portable')} graph ({r['threads']} "
             f"threads, optimisation {r['opt_level']})",
             "", f"sum of node times per run: {r['node_seconds_per_run']:.3f} s", "",
             "| op type | s per run | share | nodes |", "|---|---|---|---|"]
    for o in r["ops"][:15]:
        lines.append(f"| {o['op']} | {o['seconds']:.4f} | {o['share']:.1%} | {o['nodes']} |")
    return "\n".join(lines) + "\n"


@click.command()
@scenario_options
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--graph", type=click.Choice(["portable", "mha"]), default="portable", show_default=True)
@results_option
def main(scenario, threads, runs, graph, results):
    r = profile(scenario, threads, runs, graph=graph)
    save("ort_profile", scenario, r, to_markdown(r), results)


if __name__ == "__main__":
    main()
