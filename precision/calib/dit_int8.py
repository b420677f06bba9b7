"""Build the INT8 DiT of an export: trajectories -> (SmoothQuant) -> Q/DQ, with the float layers chosen by module.

Called by export/build.py through precision/convert.py with the fp32 engine directory already written, so the
calibration runs the real fp32 pipeline (once, for both of Wan2.2 A14B's experts). Calibration happens at the
quality gate's shape (the default size capped near 2K tokens) and the default frame count, over
`CalibConfig.steps` steps of each calibration prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from ..graph_scopes import node_module, nodes_in_modules
from ..quality_gate import gate_size
from ...runtime.choices import Backend, Execution
from ...runtime.errors import SoraError
from ...runtime.manifest import Manifest
from ...runtime.pipeline import Pipeline
from .config import FIRST_LAST_MIN_BLOCKS, CalibConfig
from .qdq import QUANTIZED_OPS, quantize_qdq
from .smoothquant import smooth_linears
from .trajectories import collect_dit_inputs


def kept_modules(model: onnx.ModelProto, cfg: CalibConfig) -> tuple[str, ...]:
    """Module prefixes that stay float: the configured ones plus, optionally, the first and last block."""
    blocks = sorted({int(m.group(1)) for n in model.graph.node if (m := re.match(r"blocks\.(\d+)", node_module(n)))})
    keep = tuple(cfg.keep_modules)
    first_last = cfg.keep_first_last_blocks
    if first_last is None:
        first_last = len(blocks) >= FIRST_LAST_MIN_BLOCKS
    if first_last and blocks:
        keep += tuple(dict.fromkeys((f"blocks.{blocks[0]}", f"blocks.{blocks[-1]}")))
    return keep


def calibration_samples(ref_dir: Path | Manifest, cfg: CalibConfig, threads: int | None) -> tuple[dict, dict]:
    """({DiT engine: its recorded inputs}, the calibration shape) from the fp32 engine directory `ref_dir`."""
    pipe = Pipeline.load(ref_dir, threads=threads, verify=False, backend=Backend.ORT, precision=Execution.FP32)
    h, w = gate_size(pipe)
    frames = pipe.defaults["frames"]
    del pipe
    samples = collect_dit_inputs(ref_dir, cfg.read_prompts(), cfg.steps, h, w, frames, threads)
    return samples, {"height": h, "width": w, "frames": frames}


def quantize_dit(name: str, src: Path, dst: Path, calibration: tuple[dict, dict], cfg: CalibConfig, work: Path,
                 threads: int | None) -> dict:
    """Write the INT8 DiT `dst` from the fp32 `src` (the engine `name`: Wan2.2 A14B's experts each from the steps
    it runs) with `calibration` (calibration_samples'). Returns the manifest detail."""
    by_engine, shape = calibration
    samples = by_engine.get(name, [])
    if not samples:
        raise SoraError(f"calibration over {cfg.steps} steps gives {name} no step to record (its expert runs a "
                        f"smaller share of the schedule): raise --calib-steps")
    model = onnx.load(str(src), load_external_data=False)
    keep = kept_modules(model, cfg)
    exclude = nodes_in_modules(model, keep, QUANTIZED_OPS)
    del model
    detail = {"calibration": cfg.to_dict(), "calibration_shape": shape, "samples": len(samples),
              "kept_float_modules": list(keep)}
    if cfg.smooth_alpha:
        smoothed = work / f"{name}.smoothed.onnx"
        detail["smoothquant"] = smooth_linears(src, smoothed, samples, cfg.smooth_alpha, set(exclude), threads,
                                               unfoldable=cfg.smooth_unfoldable)
        src = smoothed
    detail.update(quantize_qdq(src, dst, samples, cfg, exclude))
    return detail
