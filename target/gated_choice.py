"""The quality gate over what a target build ships, and the fallback that makes bf16 a safe default.

The target build picks by measurement among the (backend, execution precision) pairs the request leaves open
(target/choose.py's `choose`). `gate_target` then measures what would ship against the fp32 reference engines (precision/quality_gate.py) whenever
it is not fp32 throughout: reduced graphs (fp16, int8, int8-dynamic, weight-only) or bf16 execution.
- Asked for explicitly (`--precision bf16`, a reduced graph), a failed gate refuses the export: nothing is written.
- Chosen by `--precision auto` for its speed, bf16 execution that fails the gate is set aside: the fastest
  fp32 candidate ships instead (gated in turn if the graphs are reduced), and the manifest records the rejected
  choice with its measurement. So on a CPU with bf16 the gate decides whether bf16 ships by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..runtime.manifest import Manifest, load_manifest

from .choose import candidates_of, choose, steps_of
from ..runtime.choices import AUTO, Execution, Graph
from ..precision.convert import default_min_psnr
from ..precision.quality_gate import check_quality, measure_quality


def gate_target(reference: Path | Manifest, stage: Path | Manifest, runtime: dict, plan: dict[str, str],
                min_psnr: float | None, threads: int | None, log: Callable[[str], None]) -> dict:
    """Gate `stage` as `runtime` (the manifest's runtime section) would run it, against the fp32 engines at
    `reference`. `plan`: the graphs' precision per component; `min_psnr`: the threshold asked for (None: the default
    for what ships). Returns the runtime section that ships: with the gate's record as "quality_gate" (none when
    everything is fp32) and, where an `auto` choice of bf16 failed, the fp32 fallback and the rejected choice.
    Raises SoraError when what must ship fails."""
    held = _precision(reference)  # components the reference itself holds reduced (too large for fp32 here)
    reduced = [f"{p} {c}" for c, p in plan.items() if p != held.get(c, Graph.FP32)]
    if not reduced and runtime["precision"] == Execution.FP32:
        return runtime
    gate = _measure(reference, stage, runtime, plan, min_psnr, threads, log)
    if (not gate["passed"] and runtime.get("asked", {}).get("precision") == AUTO
            and runtime["precision"] != Execution.FP32):
        candidates = candidates_of(runtime)
        chosen = choose(candidates, steps_of(runtime),
                        rejected=frozenset(c for c in candidates if c.precision != Execution.FP32))
        runtime = {**runtime, "backend": chosen.backend, "precision": chosen.precision,
                   "rejected": {"backend": runtime["backend"], "precision": runtime["precision"], "quality_gate": gate}}
        log(f"  {gate['backend']} {gate['execution_precision']} fails the gate: shipping the fastest fp32 "
            f"candidate, {chosen}")
        if not reduced:
            return runtime
        gate = _measure(reference, stage, runtime, plan, min_psnr, threads, log)
    execution = [f"{runtime['precision']} execution"] if runtime["precision"] != Execution.FP32 else []
    check_quality(gate, ", ".join(reduced + execution))
    return {**runtime, "quality_gate": gate}


def _precision(engines: Path | Manifest) -> dict[str, str]:
    return (engines if isinstance(engines, Manifest) else load_manifest(engines, verify=False)).precision


def _measure(reference, stage, runtime, plan, min_psnr, threads, log) -> dict:
    threshold = min_psnr if min_psnr is not None else default_min_psnr(plan, runtime["precision"])
    log(f"quality gate of {runtime['backend']} {runtime['precision']} against fp32 (threshold {threshold} dB) ...")
    gate = measure_quality(reference, stage, runtime["backend"], runtime["precision"], threshold, threads)
    log(f"  PSNR {min(gate['psnr_db']):.1f} dB, DiT step cosine >= "
        f"{min(min(c) for c in gate['dit_step_cosine']):.5f}, text embedding cosine >= "
        f"{min(gate['text_embedding_cosine']):.5f}")
    return gate
