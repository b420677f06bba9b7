"""One export routine for every component: torch.onnx.export(dynamo=True) driven by the component's EngineSpec.

A weightless module (export/streaming.py) is traced without its weights, which are then written from the
checkpoint one tensor at a time; the exporter's optimizer runs after they are attached, as it does for a module
with weights, so both give the same graph.

The spec supplies the sample inputs, the exporter's dynamic shapes and the input/output names; afterwards the ONNX
model is run in ONNX Runtime against the PyTorch module on shapes *different* from the export sample (so the
dynamic axes are proven) and the worst error is returned for the manifest.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..runtime.errors import SoraError
from ..runtime.lora import CHECKPOINT_TENSORS
from ..runtime.spec import EngineSpec
from ..precision.fp16 import write_fp16
from .streaming import (CheckpointTensors, attach_checkpoint, fold_weight_transposes, graph_and_weights,
                        is_weightless)


def torch_dynamic_shapes(spec: EngineSpec) -> tuple[dict[int, object], ...]:
    """The exporter's dynamic_shapes (positional, one dict per input), derived from the spec: a dim with multiple
    m becomes m * Dim(name_q); an entry "k*name" becomes k * Dim(name)."""
    dims = {}
    for d in spec.dims:
        if d.multiple > 1:
            quotient = torch.export.Dim(f"{d.name}_q", min=d.min // d.multiple, max=d.max // d.multiple)
            dims[d.name] = quotient * d.multiple
        else:
            dims[d.name] = torch.export.Dim(d.name, min=d.min, max=d.max)
    def axis(entry):
        if entry in dims:
            return dims[entry]
        factor, _, name = entry.partition("*")  # "k*name": a dim derived from another
        return dims[name] * int(factor)

    return tuple({i: axis(e) for i, e in enumerate(t.shape) if isinstance(e, str)} for t in spec.inputs)


def _group_varargs(module: torch.nn.Module, shapes: tuple) -> tuple:
    """torch.export matches dynamic_shapes to the forward signature: inputs taken by `*args` form one tuple."""
    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*shapes[:i], tuple(shapes[i:]))
    return shapes


def export_onnx(module: torch.nn.Module, spec: EngineSpec, path: Path, opset: int, sizes: dict[str, int],
                checkpoint: CheckpointTensors | None = None,
                fp16: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> dict | None:
    """Trace `module` at the given sample sizes into `path` (+ `path.data` external weights). A weightless module's
    weights come from `checkpoint`, streamed. With `fp16` (the component's fp32 islands: op types, module prefixes),
    the graph is written in fp16 as its weights stream, never in fp32 (precision/fp16.py); returns that pass's
    summary."""
    streamed = is_weightless(module)
    if streamed and checkpoint is None:
        raise SoraError(f"{spec.name}: a weightless module needs the checkpoint its weights stream from")
    feeds = spec.sample_inputs(seed=0, **sizes)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=_group_varargs(module, torch_dynamic_shapes(spec)),
            optimize=not streamed, verbose=False, report=False,
        )
        if program is None:
            raise SoraError(f"export of {spec.name} produced no ONNX program")
        if streamed:
            sources = attach_checkpoint(program.model, module, checkpoint)
            fold_weight_transposes(program.model, sources)
            program.optimize()
            kept = program.model.graph.initializers  # what the optimizer left of them, by name
            program.model.metadata_props[CHECKPOINT_TENSORS] = json.dumps(
                {name: source for name, source in sources.items() if name in kept}, sort_keys=True)
    if fp16 is None:
        program.save(str(path), external_data=True)
        return None
    return write_fp16(*graph_and_weights(program.model), path, *fp16)


def parity_check(reference: torch.nn.Module | Callable[[], torch.nn.Module], spec: EngineSpec, path: Path,
                 probes: list[dict[str, int]]) -> dict:
    """Run ONNX Runtime and PyTorch on random inputs at each probe size; return the worst errors. `reference` may be
    a function that builds the module: it is then built after ONNX Runtime's session is released, so the check
    holds one copy of the model at a time."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = [spec.sample_inputs(seed=100 + i, **sizes) for i, sizes in enumerate(probes)]
    outputs = [sess.run(spec.output_names, f) for f in feeds]
    del sess
    module = reference if isinstance(reference, torch.nn.Module) else reference()
    worst = {"max_abs": 0.0, "max_rel": 0.0, "probes": []}
    for sizes, feed, got_all in zip(probes, feeds, outputs):
        with torch.no_grad():
            refs = module(*(torch.from_numpy(feed[n]) for n in spec.input_names))
        refs = refs if isinstance(refs, (tuple, list)) else (refs,)
        max_abs = max_rel = 0.0
        for name, got, ref in zip(spec.output_names, got_all, refs):  # every output, caches included
            ref = ref.numpy()
            if got.shape != ref.shape:
                raise SoraError(f"{spec.name}: ONNX {name} shape {got.shape} != PyTorch {ref.shape} at {sizes}")
            err = float(np.abs(got - ref).max()) if got.size else 0.0
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / (float(np.abs(ref).max()) + 1e-12))
        worst["max_abs"] = max(worst["max_abs"], max_abs)
        worst["max_rel"] = max(worst["max_rel"], max_rel)
        worst["probes"].append({"sizes": sizes, "max_abs": max_abs, "max_rel": max_rel})
    return worst
