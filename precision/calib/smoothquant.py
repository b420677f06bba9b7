"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before INT8 quantization.

For a linear layer y = x W (x [..., K], W [K, N]) a few input channels of x carry outliers that make one per-tensor
activation scale coarse for every other channel. With s_j = max|x_j|^alpha / max|W_j,:|^(1-alpha),
y = (x / s) (diag(s) W): the activation gets easier to quantize, the weight (quantized per output channel) a bit
harder. Linear layers that read the same tensor (q/k/v of one attention) share one s; their weights are rescaled in
place, and 1/s is folded into whatever produces the input (precision/calib/scale_folding.py: the normalization's modulation,
the value projection before an attention), so no pass over the activation is added. An input that does not fold
(the FFN's second linear, after GELU) gets the Mul (default) or stays unsmoothed (`smooth_unfoldable="skip"`).
The statistics come from the same calibration samples as the activation ranges (precision/calib/trajectories.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..fp16 import save_with_external_data
from ..tensor_files import load_model
from .scale_folding import ScaleFolder


def _linear_groups(model: onnx.ModelProto, exclude: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """{activation tensor: MatMuls that read it with a 2-D constant weight of their own}."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is not None and len(w.dims) == 2 and uses[w.name] == 1 and n.name not in exclude:
            groups.setdefault(n.input[0], []).append(n)
    return groups


def activation_absmax(model_path: Path, tensors: list[str], samples: list[dict[str, np.ndarray]],
                      threads: int | None) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |value| of `tensors` over all samples: run the model with them as outputs.

    Only the graph is loaded and rewritten: the augmented copy is written beside `model_path` for the few seconds
    it runs, so its external-data references resolve to the same weights file (no second copy of the weights in
    memory or on disk: 5.7 GB for Wan2.1-1.3B's DiT)."""
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    present = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in present:
            model.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    fd, path = tempfile.mkstemp(prefix=f".{model_path.stem}.smoothquant-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, path)
        del model
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    finally:
        os.unlink(path)  # the session has read the graph; the weights file stays
    amax: dict[str, np.ndarray] = {}
    for feeds in samples:
        for name, value in zip(tensors, sess.run(tensors, feeds)):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)  # [K]
            amax[name] = m if name not in amax else np.maximum(amax[name], m)
    return amax


def smooth_linears(src: Path, dst: Path, samples: list[dict[str, np.ndarray]], alpha: float, exclude: set[str],
                   threads: int | None = None, latent_inputs: tuple[str, ...] = ("hidden_states",),
                   unfoldable: str = "mul") -> dict:
    """Write `dst`: `src` with every linear group smoothed whose input folds (precision/calib/scale_folding.py), and the
    others with a Mul on their input (`unfoldable="mul"`) or left as they are ("skip"). Checks on the first sample
    that the function is unchanged. Returns a summary for the manifest."""
    from ...runtime.errors import SoraError

    model = load_model(src)
    groups = _linear_groups(model, exclude)
    folder = ScaleFolder(model, latent_inputs)
    plans = {x: plan for x, consumers in groups.items()
             if (plan := folder.plan(x, consumers, mul_fallback=unfoldable == "mul"))}
    on_input = [x for x, plan in plans.items() if any(n.input[i] == x for n, i in plan.edge_muls)]  # before apply
    amax = activation_absmax(src, list(plans), samples, threads)
    inits = folder.inits
    scales: dict[str, np.ndarray] = {}  # all from the original weights, before any of them is rescaled
    spread_before, spread_after = [], []
    for x in plans:
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in groups[x]]  # each [K, N]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # [K]
        a = amax[x].astype(np.float64)  # [K]
        ok = (a > 0) & (w_max > 0)
        s = np.ones_like(a)
        s[ok] = a[ok] ** alpha / w_max[ok] ** (1 - alpha)
        scales[x] = np.clip(s, 1e-4, 1e4)
        spread_before.append(float(a.max() / max(np.median(a), 1e-12)))
        spread_after.append(float((a / scales[x]).max() / max(np.median(a / scales[x]), 1e-12)))
    for x, plan in plans.items():
        for n in groups[x]:  # x / s feeds diag(s) W
            w = numpy_helper.to_array(inits[n.input[1]])
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * scales[x][:, None]).astype(w.dtype), n.input[1]))
        folder.apply(plan, 1.0 / scales[x])
    folder.finish()
    save_with_external_data(model, dst)
    del model, folder, inits
    err = function_change(src, dst, samples[0], threads)
    if not err < 1e-3:
        raise SoraError(f"SmoothQuant changed the DiT's output (relative error {err:.1e}); export with "
                        f"--smooth-alpha 0 and report this model")
    return {"alpha": alpha, "smoothed_inputs": len(plans), "linears": sum(len(groups[x]) for x in plans),
            "mul_on_input": len(on_input), "not_smoothed_inputs": len(groups) - len(plans), "unfoldable": unfoldable,
            "output_rel_err": err,
            "outlier_ratio_before": float(np.median(spread_before)) if plans else None,
            "outlier_ratio_after": float(np.median(spread_after)) if plans else None}


def function_change(a: Path, b: Path, feeds: dict[str, np.ndarray], threads: int | None) -> float:
    """max |out_b - out_a| / max |out_a| of two models on one input (one session at a time)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    outs = []
    for path in (a, b):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, feeds)[0])
        del sess
    return float(np.abs(outs[1] - outs[0]).max() / max(np.abs(outs[0]).max(), 1e-12))
