"""Which PyTorch module each node of an exported ONNX graph came from, so precision rules can name modules.

torch.onnx's dynamo exporter records the module path of every node in its metadata
(`pkg.torch.onnx.name_scopes`: ['', 'transformer', 'transformer.blocks.0', 'transformer.blocks.0.attn1', ..., op]).
The FP16 islands and the INT8 exclusions are lists of module prefixes (e.g. `condition_embedder`), matched against
that path with the root module's name stripped, so they read like the diffusers module names they refer to.
"""

from __future__ import annotations

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def node_module(node: onnx.NodeProto) -> str:
    """'blocks.0.attn1.to_q' for a node inside transformer.blocks.0.attn1.to_q; '' when unknown or at the root."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            scopes = [s for s in eval_list(prop.value) if s]
            if len(scopes) < 2:
                return ""
            path = scopes[-2]  # the last entry is the op's own name
            root = scopes[0]
            return path[len(root) + 1:] if path.startswith(root + ".") else ""
    return ""


def eval_list(text: str) -> list[str]:
    """The exporter writes the scope list as a Python literal of strings."""
    import ast

    value = ast.literal_eval(text)
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def in_modules(module: str, prefixes: tuple[str, ...]) -> bool:
    """True when `module` is one of `prefixes` or inside one (prefix match on whole path components)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def nodes_in_modules(model: onnx.ModelProto, prefixes: tuple[str, ...], op_types: tuple[str, ...] = ()) -> list[str]:
    """Names of the nodes (optionally only of `op_types`) that belong to one of the module `prefixes`."""
    return [n.name for n in model.graph.node
            if (not op_types or n.op_type in op_types) and in_modules(node_module(n), prefixes)]
