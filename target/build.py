"""The second step of the two-step path: build an engine directory for a target from an existing one's ONNX.

`sora-build ONNX_DIR -o ENGINE_DIR --backend B`, where ONNX_DIR is any engine directory: typically the portable
output of `sora-export MODEL -o ONNX_DIR --onnx-only` on a workstation, carried to the device. ONNX_DIR's files are
verified against its manifest and linked (or copied) into a staged directory. The target is then built and measured:
on a CPU the backend is chosen by timing, on a GPU the GPU is recorded (runtime/gpu_target.py). Finally the stage is
renamed into place. The graphs' precision and shapes come from ONNX_DIR unchanged. `precision` is the execution
precision: where ONNX_DIR's graphs are fp32, `auto` (the default) also times OpenVINO's bf16 execution on a CPU with
bf16, chosen by target/choose.py's rule and gated against ONNX_DIR itself (target/gated_choice.py); reduced graphs
run fp32 and keep the gate's result measured when they were made. No torch and no checkpoint are
needed, so this runs on the device itself.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..runtime.errors import SoraError
from ..runtime.choices import AUTO, EXECUTIONS, GPU_BACKENDS, Backend, Execution, Graph
from ..runtime.gpu_target import target
from ..runtime.machine import cpu_name
from ..runtime.manifest import TARGET_FILE_KEYS, load_manifest, staged
from ..runtime.safe_files import inside, link_or_copy
from ..runtime.validate import check_threads
from .choose import build_runtime, check_request, cpu_only, openvino_unsupported
from .gated_choice import gate_target
from .staging import ExportReport, build_keys, check_destination, commit, up_to_date
from .trt_target import TrtOptions


@dataclass(frozen=True)
class TargetConfig:
    source: Path  # an engine directory whose ONNX is built for the target
    out: Path  # may be `source` itself (rebuilt in place; the old directory is replaced only when done)
    backend: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    trt: TrtOptions = field(default_factory=TrtOptions)  # --backend tensorrt: attention mode, builder settings
    precision: str = "auto"  # execution precision: auto | fp32 | bf16 (the graphs keep the source's precision)


def _target_keys(src, backend: str, execution: str, trt: dict | None) -> tuple[str, str]:
    """Same source content, backend, execution precision, machine (GPU, or CPU) and runtime versions -> same build
    (cache key, inputs key: staging.build_keys)."""
    import onnxruntime

    machine = target() if backend in GPU_BACKENDS else {"machine": platform.machine(), "cpu": cpu_name()}
    return build_keys({"source": {rel: meta["sha256"] for rel, meta in src.data["files"].items()},
                       "backend": backend, "execution": execution, "machine": machine, "trt": trt},
                      {"soraedge": __version__, "onnxruntime": onnxruntime.__version__})


def build_from_engines(cfg: TargetConfig, log: Callable[[str], None] = lambda s: None) -> ExportReport:
    """Build `cfg.out` for `cfg.backend` from the ONNX of `cfg.source`. Raises SoraError on bad input."""
    out = Path(cfg.out)
    check_threads(cfg.threads)
    src = load_manifest(cfg.source)  # every file checked against its hash before anything is built from it
    check_destination(out, src.root)
    no_openvino = openvino_unsupported(src.precision)
    execution = _execution(cfg.precision, src)
    # e.g. no GPU for ort-cuda, or CPU-only engines: refused before any work
    check_request(cfg.backend, execution, no_openvino, cpu_only(src.precision))
    report = ExportReport(out=out, reused=False)
    t_all = time.perf_counter()
    key, inputs_key = _target_keys(src, cfg.backend, execution,
                                   asdict(cfg.trt) if cfg.backend == Backend.TENSORRT else None)
    if up_to_date(out, key, inputs_key, cfg.overwrite, log):
        log(f"{out} is already built from these engines for {cfg.backend} on this machine (cache key {key[:12]})")
        report.reused = True
        return report
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.build-", dir=out.parent) as work:
        work = Path(work)
        stage = work / "engine"
        log(f"linking the ONNX of {src.root} ...")
        # what the source's target added (plans, ONNX Runtime's CPU graph) stays behind: this target builds its own
        added_before = {e[k] for e in src.data["engines"].values() for k in TARGET_FILE_KEYS if e.get(k)}
        carried = {rel: h for rel, h in src.data["files"].items() if rel not in added_before}
        stage.mkdir()
        for rel in carried:  # paths checked when the manifest was read, and again on both sides here
            dst = inside(stage, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            inside(stage, rel)  # the folders just made are real folders inside the stage
            link_or_copy(src.file(rel), dst)
        body = {k: v for k, v in src.data.items() if k not in ("format_version", "files", "runtime", "gpu")}
        body["engines"] = {n: {k: v for k, v in e.items() if k not in TARGET_FILE_KEYS}
                           for n, e in src.data["engines"].items()}
        body.update(cache_key=key, inputs_key=inputs_key, created_unix=int(time.time()), gpu=None,
                    built_from={"path": str(src.root.resolve()), "cache_key": src.data.get("cache_key")})
        # in memory until the directory is complete: the target's timings and the gate run from it
        manifest = staged(stage, {**body, "runtime": src.runtime}, carried)
        t0 = time.perf_counter()
        log(f"building the runtime target {cfg.backend} (timing the DiT step) ...")
        manifest = build_runtime(manifest, cfg.backend, execution, cfg.threads, log, no_openvino, cfg.trt)
        report.seconds["build_target"] = time.perf_counter() - t0
        runtime = manifest.runtime
        if _fp32_graphs(src):  # the source is the fp32 reference of a bf16 choice
            t0 = time.perf_counter()
            runtime = gate_target(src, manifest, runtime, src.precision, None, cfg.threads, log)
            if "quality_gate" in runtime:
                report.seconds["quality_gate"] = time.perf_counter() - t0
        elif "quality_gate" in src.runtime:  # measured at the ONNX step, on the backend it names
            runtime = {**runtime, "quality_gate": src.runtime["quality_gate"]}
        manifest.updated(runtime=runtime).write()  # once, complete: then swapped into place
        if not commit(stage, out, work, key, inputs_key, cfg.overwrite, log):
            log(f"{out} was written meanwhile by another build of these engines for {cfg.backend}: keeping it")
            report.reused = True
    report.seconds["total"] = time.perf_counter() - t_all
    return report


def _fp32_graphs(src) -> bool:
    return all(p == Graph.FP32 for p in src.precision.values())


def _execution(precision: str, src) -> str:
    """The execution precision to build for: as asked where the source's graphs are fp32 (they are the gate's
    reference), else fp32 (`auto`) or refused (`bf16`)."""
    if precision not in (AUTO, *EXECUTIONS):
        raise SoraError(f"{src.root} is an engine directory: its graphs' precision is fixed when the ONNX is exported, "
                        f"and here --precision is the execution precision (auto, fp32 or bf16), not {precision}")
    if _fp32_graphs(src):
        return precision
    if precision == Execution.BF16:
        reduced = ", ".join(f"{p} {c}" for c, p in src.precision.items() if p != Graph.FP32)
        raise SoraError(f"bf16 execution is gated against fp32 engines, and {src.root} holds {reduced}: export from "
                        f"the model with --precision bf16 to gate both together")
    return Execution.FP32
