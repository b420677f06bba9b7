"""Graph pass: every attention of the DiT -> one node of this project's TensorRT plugin (fused_attention/trt_plugin.py).

The pattern is the one target/attention_rewrite.py matches: Transpose x3 -> ONNX `Attention` -> Transpose. It
becomes one node, op type = the plugin's name, in the plugin's own domain, carrying `plugin_namespace` and
`plugin_version` attributes. TensorRT's ONNX parser imports a node it does not know as the registered plugin of
that name and namespace. The plugin takes the [B, L, H, D] q/k/v the projections produce and returns
[B, L, H, D], so the Transposes go. The weights are untouched: the rewritten graph shares the original's weights
file. Only TensorRT runs the result (with the plugin registered), so it sits beside the portable graph.

`--trt-attention plugin` uses the fp16/bf16 flash kernel, `--trt-attention int8` the INT8 one. The plugin kernels
take head dims 64 and 128 (Wan2.1: 128); another head dim is refused here rather than at engine build.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from ..fused_attention.trt_plugin import FLASH, INT8, NAMESPACE
from ..runtime.errors import SoraError
from .attention_rewrite import RewriteReport, apply_to_file, match_attention, replace_attention, static_dims

PLUGIN_VERSION = "1"
HEAD_DIMS = (64, 128)
PLUGIN_FOR = {"plugin": FLASH, "int8": INT8}  # --trt-attention -> plugin name


def head_dim(graph: onnx.GraphProto, tensor: str) -> int | None:
    """The static last dim of `tensor` ([B, L, H, D]) from the graph's shape information, if recorded."""
    dims = static_dims(graph, tensor)
    return dims[-1] if dims else None


def to_plugin(model: onnx.ModelProto, mode: str = "plugin") -> RewriteReport:
    """Rewrite `model` in place with the plugin for `mode` (plugin|int8); weights untouched (it may be loaded without
    external data)."""
    op = PLUGIN_FOR[mode]
    total, matches = match_attention(model.graph)
    dims = {head_dim(model.graph, m.sources[0]) for m in matches}
    if matches and not dims <= set(HEAD_DIMS):
        raise SoraError(f"the attention plugin's kernels take head dims {HEAD_DIMS}; this DiT's are "
                        f"{sorted(d for d in dims if d) or 'unknown'}: use --attention native")

    def build(m):
        return [helper.make_node(op, list(m.sources), [m.output], name=f"{m.tag}/plugin", domain=NAMESPACE,
                                 plugin_namespace=NAMESPACE, plugin_version=PLUGIN_VERSION)]

    replace_attention(model, matches, build, domain=(NAMESPACE, 1))
    return RewriteReport(attention_nodes=total, replaced=len(matches))


def plugin_file(src: Path, dst: Path, mode: str = "plugin") -> RewriteReport:
    """src.onnx -> dst.onnx in the same folder, sharing src's weights file."""
    return apply_to_file(src, dst, lambda model: to_plugin(model, mode))
