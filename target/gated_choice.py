"""The quality gate over what a target build ships, and the fallback that makes bf16 a safe default.

The target build (target/choose.py) picks by measurement among the (backend, execution precision)
pairs the request leaves open: the fastest, with bf16 only where it beats the fastest fp32 step by a margin.
`gate_target` then measures what would ship against the fp32 reference engines (precision/quality_gate.py) whenever
it is not fp32 throughout: reduced graphs (fp16, int8, int8-dynamic, weight-only) or bf16 execution.
- Asked for explicitly (`--precision bf16`, a reduced graph), a failed gate refuses the export: nothing is written.
- Chosen by `--precision auto` for its speed, bf16 execution that fails the gate is set aside: the fastest
  fp32 candidate ships instead (gated in turn if the graphs are reduced), and the manifest records the rejected
  choice with its measurement. So on a CPU with bf16 the gate decides whether bf16 ships by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .choose import choose, steps_of
from ..precision.convert import default_min_psnr
from ..precision.quality_gate import check_quality, measure_quality


def gate_target(reference: Path, stage: Path, runtime: dict, plan: dict[str, str], min_psnr: float | None,
                threads: int | None, log: Callable[[str], None]) -> dict | None:
    """Gate `stage` as `runtime` (the manifest's runtime section, updated in place) would run it, against the fp32
    engines at `reference`. `plan`: the graphs' precision per component; `min_psnr`: the threshold asked for (None:
    the default for what ships). Returns the gate's record (also stored in `runtime`), or None when everything is
    fp32. Raises SoraError when what must ship fails."""
    reduced = [f"{p} {c}" for c, p in plan.items() if p != "fp32"]
    if not reduced and runtime["precision"] == "fp32":
        return None
    gate = _measure(reference, stage, runtime, plan, min_psnr, threads, log)
    if not gate["passed"] and runtime.get("asked", {}).get("precision") == "auto" and runtime["precision"] != "fp32":
        runtime["rejected"] = {"backend": runtime["backend"], "precision": runtime["precision"], "quality_gate": gate}
        candidates = [tuple(c) for c in runtime["candidates"]]
        runtime["backend"], runtime["precision"] = choose(
            candidates, steps_of(runtime), rejected=frozenset(c for c in candidates if c[1] != "fp32"))
        log(f"  {gate['backend']} {gate['execution_precision']} fails the gate: shipping the fastest fp32 "
            f"candidate, {runtime['backend']} {runtime['precision']}")
        if not reduced:
            return None
        gate = _measure(reference, stage, runtime, plan, min_psnr, threads, log)
    label = ", ".join(reduced + ([f"{runtime['precision']} execution"] if runtime["precision"] != "fp32" else []))
    check_quality(gate, label)
    runtime["quality_gate"] = gate
    return gate


def _measure(reference, stage, runtime, plan, min_psnr, threads, log) -> dict:
    threshold = min_psnr if min_psnr is not None else default_min_psnr(plan, runtime["precision"])
    log(f"quality gate of {runtime['backend']} {runtime['precision']} against fp32 (threshold {threshold} dB) ...")
    gate = measure_quality(reference, stage, runtime["backend"], runtime["precision"], threshold, threads)
    log(f"  PSNR {min(gate['psnr_db']):.1f} dB, DiT step cosine >= "
        f"{min(min(c) for c in gate['dit_step_cosine']):.5f}, text embedding cosine >= "
        f"{min(gate['text_embedding_cosine']):.5f}")
    return gate
