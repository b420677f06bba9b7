"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before INT8 quantization.

For a linear layer y = x W (x [..., K], W [K, N]) a few input channels of x carry outliers that make one per-tensor
activation scale coarse for every other channel. With s_j = max|x_j|^alpha / max|W_j,:|^(1-alpha),
y = (x / s) (diag(s) W): the activation gets easier to quantize, the weight (quantized per output channel) a bit
harder. Linear layers that read the same tensor (q/k/v of one attention) share one s, so one `Mul` by 1/s is
inserted per shared input, and their weights are rescaled in place. The statistics come from the same calibration
samples as the activation ranges (calib/trajectories.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..export.fp16 import save_with_external_data


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
                   threads: int | None = None) -> dict:
    """Write `dst`: `src` with every non-excluded linear layer smoothed. Returns a summary for the manifest."""
    model = onnx.load(str(src))
    groups = _linear_groups(model, exclude)
    amax = activation_absmax(src, list(groups), samples, threads)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    position = {id(n): i for i, n in enumerate(nodes)}
    inserts: list[tuple[int, onnx.NodeProto]] = []
    spread_before, spread_after = [], []
    for x, consumers in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in consumers]  # each [K, N]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # [K]
        a = amax[x].astype(np.float64)  # [K]
        ok = (a > 0) & (w_max > 0)
        s = np.ones_like(a)
        s[ok] = a[ok] ** alpha / w_max[ok] ** (1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        spread_before.append(float(a.max() / max(np.median(a), 1e-12)))
        spread_after.append(float((a / s).max() / max(np.median(a / s), 1e-12)))
        for n, w in zip(consumers, weights):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
        inv = f"{x}_smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        mul = helper.make_node("Mul", [x, inv], [f"{x}_smoothed"], name=f"{x}_smooth")
        for n in consumers:
            n.input[0] = mul.output[0]
        inserts.append((min(position[id(n)] for n in consumers), mul))  # before its first reader: stays sorted
    for index, mul in sorted(inserts, key=lambda p: -p[0]):
        nodes.insert(index, mul)
    rebuilt = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]  # detach before clearing
    model.graph.ClearField("node")
    model.graph.node.extend(rebuilt)
    save_with_external_data(model, dst)
    return {"alpha": alpha, "smoothed_inputs": len(groups), "linears": sum(len(c) for c in groups.values()),
            "outlier_ratio_before": float(np.median(spread_before)) if groups else None,
            "outlier_ratio_after": float(np.median(spread_after)) if groups else None}
