"""Where OpenVINO's CPU DiT step spends its time: per-layer-type shares from OpenVINO's performance counters.

Exports the scenario's DiT (bench/harness.py SCENARIOS), compiles it for the scenario's shape as the pipeline does
(fp32 or bf16 execution), runs it with PERF_COUNT on and sums each executed layer's real time by layer type and
kernel (after OpenVINO's fusions: "Subgraph" holds the fused attention and elementwise chains, "RoPE" its rotary
kernel). Also lists the slowest layers. Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.ov_profile [--scenario wan-384x6-1280tok] [--threads 2] [--runs 5] [--precision bf16]
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import click

from .harness import (SCENARIOS, build_scenario_model, export_scenario_dit, results_option, save,
                      scenario_options)


def profile(scenario: str, threads: int, runs: int, precision: str = "fp32") -> dict:
    import openvino as ov

    from ..runtime.backends.openvino import OvEngine

    sc = SCENARIOS[scenario]
    feeds = sc.dit_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_scenario_model(sc, tmp)
        spec = export_scenario_dit(sc, tmp)
        engine = OvEngine(tmp / "dit.onnx", spec, threads, precision, static_shapes=1)  # as the pipeline opens it
        engine.config["PERF_COUNT"] = True  # read when it compiles, at the first call's shape
        engine(**feeds)  # compile + warm-up
        request = engine.compiled_for(feeds)[1]
        by_kind: dict[tuple, float] = defaultdict(float)
        by_layer: dict[tuple, float] = defaultdict(float)
        count: dict[tuple, int] = defaultdict(int)
        for _ in range(runs):
            engine(**feeds)
            for p in request.profiling_info:
                seconds = p.real_time.total_seconds() / runs
                by_kind[(p.node_type, p.exec_type)] += seconds
                by_layer[(p.node_name, p.node_type)] += seconds
                count[(p.node_type, p.exec_type)] += 1
    total = sum(by_kind.values())
    kinds = sorted(({"layer": k[0], "kernel": k[1], "seconds": v, "share": v / total, "layers": count[k] // runs}
                    for k, v in by_kind.items() if v > 0), key=lambda r: -r["seconds"])
    slowest = sorted(({"name": k[0], "layer": k[1], "seconds": v} for k, v in by_layer.items()),
                     key=lambda r: -r["seconds"])[:12]
    return {"scenario": scenario, "threads": threads, "runs": runs, "precision": precision,
            "openvino": ov.get_version(), "layer_seconds_per_run": total, "kinds": kinds, "slowest": slowest}


def to_markdown(r: dict) -> str:
    lines = [f"### OpenVINO CPU profile: {r['scenario']}, {r['precision']} execution ({r['threads']} threads, "
             f"OpenVINO {r['openvino']}, compiled for the shape)", "",
             f"sum of layer times per run: {r['layer_seconds_per_run']:.3f} s", "",
             "| layer type | kernel | s per run | share | layers |", "|---|---|---|---|---|"]
    for k in r["kinds"][:15]:
        lines.append(f"| {k['layer']} | {k['kernel']} | {k['seconds']:.4f} | {k['share']:.1%} | {k['layers']} |")
    lines += ["", "| slowest layers | type | s per run |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['layer']} | {s['seconds']:.4f} |" for s in r["slowest"]]
    return "\n".join(lines) + "\n"


@click.command()
@scenario_options
@click.option("--runs", type=int, default=5, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@results_option
def main(scenario, threads, runs, precision, results):
    r = profile(scenario, threads, runs, precision)
    save("ov_profile", scenario, r, to_markdown(r), results)


if __name__ == "__main__":
    main()
