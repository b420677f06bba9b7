"""Export with weights that take no memory: trace a component built with fake parameters, then write the ONNX
external data straight from the checkpoint's safetensors, one tensor at a time.

`weightless()` builds modules whose parameters are fake tensors (a shape and a dtype, no storage); buffers a module
computes when built (RoPE's tables) stay real and are written from memory. The exporter traces the fake module as
it would the real one; `attach_checkpoint` then gives each initializer that stands for a parameter a lazy value:
its checkpoint tensor, read from the shard that holds it (one positioned read of its bytes), converted to float32
whatever the checkpoint stored (bf16, fp16, fp32), plus the LoRAs fused into it (runtime/lora.py), with the
export-time reordering of its rows applied where the model declares one (`row_orders`: export/dit.py's rotary
layout). A transpose of such a weight (how the exporter writes a Linear) becomes a lazy transposed value instead of a
node, as the exporter's own constant folding would make it. Which checkpoint tensor each initializer holds, and how,
is recorded in the graph (export/onnx_export.py), so LoRAs can change built engines at load. Saving reads, converts
and writes one tensor at a time, so host memory is the largest tensor plus the trace.
`load_model` builds the same models with their weights, read the same way: the PyTorch references of the parity
check, whole or with fewer layers; `blocks_streamed` runs a weightless model with each block's weights read as the
block runs: a PyTorch reference at full size for a model that does not fit.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from ..runtime.errors import SoraError
from ..runtime.lora import LoraSet
from ..runtime.weights import TensorInfo, component_tensors, read_float32



@contextlib.contextmanager
def weightless() -> Iterator[None]:
    """Inside, every parameter a module registers is replaced by a fake tensor of its shape (float32 where it is
    floating point): building a model of any size takes no memory, and its initialisation runs on nothing."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the real buffers and inputs meet the fake weights in it
    register = torch.nn.Module.register_parameter

    def fake_parameter(self, name, param):
        if param is not None and not is_fake(param):
            dtype = torch.float32 if param.is_floating_point() else param.dtype  # the export's, not the config's
            with mode:
                param = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype), param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = fake_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def is_weightless(module: torch.nn.Module) -> bool:
    return any(is_fake(p) for p in module.parameters())


class CheckpointTensors:
    """One component's safetensors (a single file or shards named by an index), read one tensor at a time from the
    file that holds it, as float32, with what `loras` add to it (runtime/lora.py: fused as the weights stream)."""

    def __init__(self, folder: Path, loras: LoraSet | None = None):
        self.folder = folder
        self.tensors: dict[str, TensorInfo] = component_tensors(folder)  # headers and shards checked
        self.loras = loras or LoraSet([])
        if self.loras:
            self.loras.check({name: info.shape for name, info in self.tensors.items()})

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32, whatever the checkpoint stores, plus the LoRAs' delta to it."""
        value = read_float32(self.tensors[name], name)
        delta = self.loras.delta(name) if self.loras else None
        return value if delta is None else value + delta

    def key(self, folder_digest: str) -> list:
        """What the tensors read here depend on: the folder's content digest and the LoRAs fused into them."""
        return [folder_digest, *self.loras.key()]


def _checkpoint_name(aliases: list[str], tensors: dict[str, TensorInfo]) -> str | None:
    """The checkpoint's name for a parameter known by `aliases` (its names in the export wrapper, tied weights
    having several): the first alias, or a suffix of one after whole leading components (the wrapper's attribute
    names), that the checkpoint holds."""
    split = [alias.split(".") for alias in aliases]
    for i in range(max(map(len, split))):  # the fewest leading components dropped, over every alias
        for parts in split:
            if i < len(parts) and ".".join(parts[i:]) in tensors:
                return ".".join(parts[i:])
    return None


def _aliases(*modules: torch.nn.Module) -> tuple[dict[int, torch.nn.Parameter], dict[int, list[str]]]:
    """({id: parameter}, {id: its names}) over `modules`, in their order (tied weights have several names)."""
    params: dict[int, torch.nn.Parameter] = {}
    aliases: dict[int, list[str]] = defaultdict(list)
    for m in modules:
        for name, p in m.named_parameters(remove_duplicate=False):
            params[id(p)] = p
            aliases[id(p)].append(name)
    return params, aliases


def _resolve(checkpoint: CheckpointTensors, names: list[str], shape) -> str:
    """The checkpoint's name of the parameter known by `names`, holding a tensor of `shape`; one line otherwise."""
    key = _checkpoint_name(names, checkpoint.tensors)
    if key is None:
        raise SoraError(f"{checkpoint.folder}: no tensor for the model's parameter {names[0]} (the checkpoint does "
                        f"not hold it under any of its names)")
    info = checkpoint.tensors[key]
    if tuple(info.shape) != tuple(shape):
        raise SoraError(f"{info.file}: {key} is {list(info.shape)}, the model's config makes it {list(shape)}")
    return key


def attach_checkpoint(model: ir.Model, module: torch.nn.Module, checkpoint: CheckpointTensors) -> dict[str, dict]:
    """Give every initializer of `model` (traced from the weightless `module`) that stands for a parameter its
    checkpoint tensor, lazily; returns {initializer: {"tensor": its checkpoint name, "rows": whether its rows are
    reordered}}. A wrapper that renames the model's parameters names the model as its `checkpoint_model` attribute
    (not a submodule), whose names the checkpoint uses. A parameter the checkpoint does not hold, or holds in
    another shape, is one line naming it."""
    params, aliases = _aliases(*([module.checkpoint_model] if hasattr(module, "checkpoint_model") else []), module)
    orders = row_orders(module)
    sources = {}
    for value in model.graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)  # the exporter keeps the parameter itself
        if raw is None or not is_fake(raw):
            continue
        param = params.get(id(raw))
        key = _resolve(checkpoint, aliases[id(raw)] if param is not None else [value.name], raw.shape)
        order = orders.get(param) if param is not None else None
        value.const_value = ir.LazyTensor(_reader(checkpoint, key, order), dtype=ir.DataType.FLOAT,
                                          shape=ir.Shape(list(raw.shape)), name=value.name)
        sources[value.name] = {"tensor": key, "rows": order is not None}
    return sources


def row_orders(module: torch.nn.Module) -> dict[torch.nn.Parameter, np.ndarray]:
    """{parameter: the order its checkpoint tensor's rows take in the export}, as declared by `row_orders`
    attributes of `module`'s submodules."""
    orders = {}
    for m in module.modules():
        orders.update(getattr(m, "row_orders", {}))
    return orders


def from_config(cls, folder: Path, **overrides) -> torch.nn.Module:
    """`cls` built from the config in `folder` alone (with `overrides`), in whatever context the caller set up (the
    meta device for a shape check, `weightless()` to export)."""
    if hasattr(cls, "load_config"):  # diffusers
        return cls.from_config({**cls.load_config(folder), **overrides})
    import transformers

    return cls._from_config(transformers.AutoConfig.from_pretrained(folder, **overrides))


def load_model(cls, folder: Path, weights: bool | CheckpointTensors = True, **overrides) -> torch.nn.Module:
    """A diffusers or transformers model `cls` from a checkpoint folder, in eval mode: weightless (its config only;
    export streams the weights) or with its checkpoint's weights as float32 whatever they are stored as (`weights`
    True, or the CheckpointTensors to read them from: with LoRAs fused). `overrides` change its config
    (`num_layers=2`: the first two layers' weights of the same checkpoint)."""
    with weightless():
        model = from_config(cls, folder, **overrides)
    if weights:  # buffers (computed when built) stay
        source = weights if isinstance(weights, CheckpointTensors) else CheckpointTensors(folder)
        _materialize(model, source, _aliases(model)[1])
    return model.eval()


def _reader(checkpoint: CheckpointTensors, key: str, order) -> Callable[[], ir.Tensor]:
    def read() -> ir.Tensor:
        array = checkpoint.read(key)
        return ir.tensor(array if order is None else array[np.asarray(order)])

    return read


def fold_weight_transposes(model: ir.Model, sources: dict[str, dict]) -> int:
    """Each Transpose whose input is a lazy initializer used by it alone becomes a lazy transposed initializer (the
    exporter's constant folding would do the same, reading every weight into memory at once), its entry in
    `sources` (attach_checkpoint's) renamed and marked transposed. Returns how many."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if not (src is not None and src.is_initializer() and isinstance(src.const_value, ir.LazyTensor)
                and len(src.uses()) == 1):
            continue
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else None
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        lazy = src.const_value
        shape = list(lazy.shape)
        out_shape = [shape[i] for i in perm] if perm is not None else shape[::-1]
        folded_value = ir.Value(name=out.name, shape=ir.Shape(out_shape), type=ir.TensorType(ir.DataType.FLOAT))
        folded_value.const_value = ir.LazyTensor(_transposed(lazy, perm), dtype=ir.DataType.FLOAT,
                                                 shape=ir.Shape(out_shape), name=out.name)
        out.replace_all_uses_with(folded_value)
        graph.remove(node, safe=True)
        graph.initializers.pop(src.name)
        graph.register_initializer(folded_value)
        if src.name in sources:
            sources[out.name] = {**sources.pop(src.name), "transpose": perm or list(range(len(shape)))[::-1]}
        folded += 1
    return folded


def graph_and_weights(model: ir.Model) -> tuple[onnx.ModelProto, Callable[[str], np.ndarray]]:
    """The graph of `model`, each lazy initializer (a checkpoint tensor) in it a reference to external data not
    written yet, and a function reading one of them by name: what a pass that writes the weights itself takes
    (precision/fp16.py's write_fp16). Other initializers stay in the graph with their values."""
    lazies: dict[str, ir.LazyTensor] = {}
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.LazyTensor):
            lazy = lazies[value.name] = value.const_value
            value.const_value = ir.ExternalTensor("unwritten", 0, lazy.nbytes, lazy.dtype, shape=lazy.shape,
                                                  name=value.name)
    return ir.serde.serialize_model(model), lambda name: lazies[name].numpy()


def _transposed(lazy: ir.LazyTensor, perm) -> Callable[[], ir.Tensor]:
    def read() -> ir.Tensor:
        return ir.tensor(np.ascontiguousarray(np.transpose(lazy.numpy(), perm)))

    return read


def _materialize(module: torch.nn.Module, checkpoint: CheckpointTensors, aliases: dict[int, list[str]],
                 skip: frozenset[int] = frozenset()) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """Replace `module`'s fake parameters (but those in `skip`) by their checkpoint tensors, a tied one (several
    modules holding one parameter) read once; returns what to put back."""
    swapped, read = [], {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and is_fake(p) and id(p) not in skip:
                if id(p) not in read:
                    tensor = torch.from_numpy(checkpoint.read(_resolve(checkpoint, aliases[id(p)], p.shape)))
                    read[id(p)] = torch.nn.Parameter(tensor, requires_grad=False)
                sub._parameters[name] = read[id(p)]
                swapped.append((sub, name, p))
    return swapped


def _put_back(swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]]) -> None:
    for sub, name, p in swapped:
        sub._parameters[name] = p


@contextlib.contextmanager
def blocks_streamed(model: torch.nn.Module, folder: Path | CheckpointTensors, blocks: torch.nn.ModuleList
                    ) -> Iterator[torch.nn.Module]:
    """The weightless `model` (load_model(..., weights=False)), run eagerly inside, with its weights read from the
    checkpoint in `folder` (or those CheckpointTensors, LoRAs included) as it runs: every parameter outside `blocks`
    on entry, each block's when the block starts, released when it returns. Host memory is the weights outside the
    blocks plus one block: the PyTorch reference of a model that does not fit, at full size."""
    checkpoint = folder if isinstance(folder, CheckpointTensors) else CheckpointTensors(folder)
    _, aliases = _aliases(model)
    held: dict[int, list] = {}
    hooks = [h for b in blocks for h in (
        b.register_forward_pre_hook(lambda m, args: held.__setitem__(id(m), _materialize(m, checkpoint, aliases))),
        b.register_forward_hook(lambda m, args, out: _put_back(held.pop(id(m)))))]
    outside = _materialize(model, checkpoint, aliases, frozenset(id(p) for p in blocks.parameters()))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        _put_back(outside)


class BlocksStreamed(torch.nn.Module):
    """A weightless model as a module whose every call runs it under blocks_streamed: a full-size PyTorch reference
    that holds one block's weights at a time (export/build.py's parity of a DiT too large to hold beside its
    graph)."""

    def __init__(self, model: torch.nn.Module, checkpoint: CheckpointTensors, blocks: torch.nn.ModuleList):
        super().__init__()
        self.model, self.checkpoint, self.blocks = model, checkpoint, blocks

    def forward(self, *args):
        with blocks_streamed(self.model, self.checkpoint, self.blocks):
            return self.model(*args)
