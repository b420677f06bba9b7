"""Fold SmoothQuant's per-channel 1/s into the ops that produce a linear layer's input, so no `Mul` runs on it.

SmoothQuant divides a linear layer's input x [..., C] by s per channel. Written as a `Mul` on x, that is one more
full pass over a [B, L, C] activation per linear group and call: measured at up to ~15% of the INT8 DiT step on the
CPU. The paper instead folds 1/s into what produces x. This module does that on the ONNX graph, walking back from x
through ops that commute with a per-channel scale v on the last axis:

    initializer c                  -> a new initializer c * v (broadcast on the last axis)
    tensor not computed from the   -> Mul(t, v): t is timestep- or text-derived ([B, 1, C] modulation, [B, S, C]
      latents                         text context), small next to the [B, L, C] activation
    Add / Sub (a, b)               -> both a and b
    Mul (a, b)                     -> one of them (the one not computed from the latents first)
    LayerNormalization over the last axis -> its scale and bias
    MatMul(h, W), W a 2-D initializer     -> W's columns
    Cast between float types       -> its input

and, for an attention output: Reshape (heads merged) -> Transpose -> Attention's value input or the P·V MatMul's
right operand -> Transpose -> Reshape (heads split) -> the value projection, whose columns and bias take v. The
head split and merge use the same channel order (h * D + d), so v passes through unchanged.

Only tensors that nothing else reads are walked through (otherwise the other readers would change). A group whose
input cannot be folded (the FFN's second linear, after GELU) gets the Mul on its input, or is left unsmoothed as in
the paper, which smooths only the inputs that follow a normalization (CalibConfig.smooth_unfoldable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class FoldPlan:
    """What folding one scale takes: edges (node, input index) whose initializer is replaced by a scaled copy,
    edges that get a Mul, and 2-D weights whose columns are scaled."""
    scaled_initializers: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)
    edge_muls: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)
    weight_columns: list[str] = field(default_factory=list)

    def extend(self, other: FoldPlan) -> FoldPlan:
        self.scaled_initializers += other.scaled_initializers
        self.edge_muls += other.edge_muls
        self.weight_columns += other.weight_columns
        return self


class ScaleFolder:
    """Plans and applies per-channel scale folds on one model (its graph and initializers, changed in place).
    `finish()` puts the Muls that folding added into the node list."""

    def __init__(self, model: onnx.ModelProto, latent_inputs: tuple[str, ...]):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.readers: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers[i] = self.readers.get(i, 0) + 1
        for o in model.graph.output:
            self.readers[o.name] = self.readers.get(o.name, 0) + 1
        self.from_latents = _reachable(model.graph, set(latent_inputs))
        self._muls: dict[str, list[onnx.NodeProto]] = {}  # first output of a reader -> Muls to put before it
        self._replaced: set[str] = set()  # shared initializers some readers no longer read
        self._count = 0

    # -- planning (no change to the model) --

    def plan(self, x: str, group: list[onnx.NodeProto], mul_fallback: bool = False) -> FoldPlan | None:
        """How to fold a scale of x's last axis into what produces x, x being read by the nodes of `group` (its
        linear layers); None when it cannot be folded. Where it cannot, `mul_fallback` gives one Mul on x itself
        (read by the group only; a full pass over the activation)."""
        on_x = FoldPlan(edge_muls=[(n, list(n.input).index(x)) for n in group])
        if self.readers.get(x, 0) != len(group):
            return on_x if mul_fallback else None
        plan = self._plan_output(self.producer[x], heads=False) if x in self.producer else None
        if plan is None and (x not in self.from_latents or mul_fallback):  # text context: one Mul on it is cheap
            plan = on_x
        return plan

    def _plan_edge(self, node: onnx.NodeProto, index: int, heads: bool) -> FoldPlan | None:
        t = node.input[index]
        if t in self.inits:
            if heads or self.inits[t].data_type not in FLOAT_TYPES:
                return None
            return FoldPlan(scaled_initializers=[(node, index)])
        plan = None
        if self.readers.get(t, 0) == 1 and t in self.producer:
            plan = self._plan_output(self.producer[t], heads)
        if plan is None and not heads and t not in self.from_latents:
            plan = FoldPlan(edge_muls=[(node, index)])
        return plan

    def _plan_output(self, p: onnx.NodeProto, heads: bool) -> FoldPlan | None:
        op = p.op_type if p.domain in ("", "ai.onnx") else None
        if op in ("Add", "Sub"):
            return self._plan_all(p, (0, 1), heads)
        if op == "Mul":
            order = sorted((0, 1), key=lambda i: p.input[i] in self.from_latents)  # the small operand first
            return next((plan for i in order if (plan := self._plan_edge(p, i, heads))), None)
        if op == "Cast":
            return self._plan_edge(p, 0, heads) if _attr(p, "to") in FLOAT_TYPES else None
        if op == "LayerNormalization" and not heads:
            if _attr(p, "axis", -1) != -1 or self._other_outputs_read(p):
                return None
            return self._plan_all(p, [i for i in (1, 2) if i < len(p.input) and p.input[i]], heads)
        if op == "MatMul" and not heads:
            w = self.inits.get(p.input[1])
            if w is None or len(w.dims) != 2 or self.readers.get(w.name) != 1 or w.data_type not in FLOAT_TYPES:
                return None
            return FoldPlan(weight_columns=[w.name])
        # Attention layout: each Reshape toggles between [B, L, C] and the heads layout; inside it only layout ops
        # and the value side of the attention are walked.
        if op == "Reshape":
            return self._plan_edge(p, 0, not heads)
        if op == "Transpose" and heads:
            return self._plan_edge(p, 0, heads)
        if op == "Attention" and heads and len(p.input) >= 3 and not self._other_outputs_read(p):
            return self._plan_edge(p, 2, heads)
        if op == "MatMul" and heads:  # P·V of the decomposed attention
            return self._plan_edge(p, 1, heads)
        return None

    def _plan_all(self, p: onnx.NodeProto, indices, heads: bool) -> FoldPlan | None:
        plan = FoldPlan()
        for i in indices:
            sub = self._plan_edge(p, i, heads)
            if sub is None:
                return None
            plan.extend(sub)
        return plan

    def _other_outputs_read(self, p: onnx.NodeProto) -> bool:
        return any(self.readers.get(o, 0) for o in p.output[1:] if o)

    # -- applying --

    def apply(self, plan: FoldPlan, scale: np.ndarray) -> None:
        """Fold `scale` [C] (the factor x is multiplied by) as planned."""
        scale = scale.astype(np.float64)
        for name in plan.weight_columns:
            w = numpy_helper.to_array(self.inits[name])  # [K, C]
            self.inits[name].CopyFrom(numpy_helper.from_array((w * scale[None, :]).astype(w.dtype), name))
        for node, index in plan.scaled_initializers:
            name = node.input[index]
            c = numpy_helper.to_array(self.inits[name])
            if self.readers.get(name) == 1:  # only this edge reads it: in place
                self.inits[name].CopyFrom(numpy_helper.from_array((c * scale).astype(c.dtype), name))
            else:  # shared (the exporter merges equal constants): a scaled copy for this edge
                node.input[index] = self._add_initializer(name, (c * scale).astype(c.dtype))
                self._replaced.add(name)
        if plan.edge_muls:
            factor = self._add_initializer("smooth_fold_scale", scale.astype(np.float32))
            shared: dict[str, str] = {}  # one Mul per tensor, shared by the edges that read it
            for node, index in plan.edge_muls:
                t = node.input[index]
                if t not in shared:
                    shared[t] = self._new_name(t)
                    mul = helper.make_node("Mul", [t, factor], [shared[t]], name=shared[t])
                    self._muls.setdefault(node.output[0], []).append(mul)
                node.input[index] = shared[t]

    def finish(self) -> None:
        """Put the added Muls into the node list, each before the first node that reads it (stays sorted), and drop
        the shared initializers that every reader now reads a scaled copy of."""
        nodes = []
        for n in self.model.graph.node:
            nodes.extend(self._muls.pop(n.output[0], []))
            nodes.append(onnx.NodeProto.FromString(n.SerializeToString()))  # detach before clearing
        self.model.graph.ClearField("node")
        self.model.graph.node.extend(nodes)
        read = {i for n in nodes for i in n.input}
        unread = [i for i in self.model.graph.initializer if i.name in self._replaced and i.name not in read]
        for init in unread:
            self.model.graph.initializer.remove(init)

    def _add_initializer(self, base: str, value: np.ndarray) -> str:
        name = self._new_name(base)
        init = numpy_helper.from_array(value, name)
        self.model.graph.initializer.append(init)
        self.inits[name] = init
        return name

    def _new_name(self, base: str) -> str:
        self._count += 1
        return f"{base}_smoothed_{self._count}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reachable(graph: onnx.GraphProto, sources: set[str]) -> set[str]:
    """Tensors computed (transitively) from `sources`; nodes are in topological order in a valid model."""
    seen = set(sources)
    for n in graph.node:
        if any(i in seen for i in n.input):
            seen.update(o for o in n.output if o)
    return seen
