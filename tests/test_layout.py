"""The layout follows the data flow and the torch boundary: checkpoint -> export (torch) -> precision -> target ->
runtime, with serve/ beside the runtime. Imports go one way, none of them in a cycle, and no folder below export/
imports torch or its model libraries, at module level or inside a function."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "fused_attention", "precision", "target", "serve", "export", "cli", "bench", "demo")
# what each folder may import from the project (itself included); cli and bench sit on top of everything
MAY_IMPORT = {
    "runtime": {"runtime"},
    "fused_attention": {"fused_attention", "runtime"},
    "precision": {"precision", "runtime"},
    "target": {"target", "precision", "runtime", "fused_attention"},
    "serve": {"serve", "runtime"},
    "export": {"export", "precision", "target", "runtime", "fused_attention", "demo"},
    "demo": {"demo", "export", "runtime"},
}
TORCH_FREE = ("runtime", "precision", "target", "serve")
TORCH_LIBRARIES = {"torch", "diffusers", "transformers", "accelerate", "safetensors"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    package = _module_name(path).split(".")
    return _imports_of(path.read_text(), package if path.name == "__init__.py" else package[:-1])


def _imports_of(source: str, package: list[str]) -> set[str]:
    """Every module `source` imports, anywhere in it: project modules as `folder.module`, others as their top
    name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                name = a.name.removeprefix("soraedge.")
                found.add(name if a.name.startswith("soraedge.") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` / `from .pkg import mod`: x may itself be a module
                for a in node.names:
                    sub = f"{module}.{a.name}" if module else a.name
                    found.add(sub if _exists(sub) else module)
            elif node.module and node.module.startswith("soraedge"):
                found.add(node.module.removeprefix("soraedge").lstrip("."))
            elif node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m}


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _project_files() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = _project_files()
    return {m: _imports(p) for m, p in files.items()}


def _wrong_direction(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in graph.items():
        allowed = MAY_IMPORT.get(module.split(".")[0])
        for imp in imports if allowed is not None else ():
            if imp.split(".")[0] in PACKAGES and imp.split(".")[0] not in allowed:
                wrong.append(f"{module} imports {imp}")
    return wrong


def _torch_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {i}" for m, imports in graph.items() if m.split(".")[0] in TORCH_FREE
            for i in imports if i in TORCH_LIBRARIES]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    project = {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in project[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in project:
        if v not in index:
            visit(v)
    return cycles


def test_imports_go_one_way(graph):
    assert not _wrong_direction(graph)


def test_no_folder_below_export_imports_torch(graph):
    assert not _torch_imports(graph)


def test_no_import_cycles(graph):
    assert not _cycles(graph)


def test_the_checks_fail_on_a_violation():
    """Control: a function-level torch import, an upward relative import and a two-module cycle are all caught."""
    source = "def f():\n    import torch\n    from ..export.build import run_export\n    from .pipeline import P\n"
    imports = _imports_of(source, ["runtime"])
    assert {"torch", "export.build", "runtime.pipeline"} <= imports
    bad = {"runtime.validate": imports, "runtime.pipeline": {"runtime.validate"}, "export.build": set()}
    assert _wrong_direction(bad) == ["runtime.validate imports export.build"]
    assert _torch_imports(bad) == ["runtime.validate imports torch"]
    assert _cycles(bad) == [["runtime.pipeline", "runtime.validate"]]


def _shadowing(folders, installed: set[str]) -> list[str]:
    return sorted(set(folders) & (installed | set(sys.stdlib_module_names)))


def test_no_folder_shadows_an_installed_module():
    """The project's root is the `soraedge` package, so its folders are importable by their bare names whenever the
    root is on sys.path (`python -m ...` from a checkout). A folder named like an installed module would replace it
    for every library that imports it (transformers imports the `kernels` distribution)."""
    folders = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()]
    assert set(PACKAGES) <= set(folders)
    assert not _shadowing(folders, set(importlib.metadata.packages_distributions()))


def test_the_shadowing_check_fails_on_a_clash():
    """Control: an installed top-level module and a standard-library one, both named like folders, are caught."""
    assert _shadowing(["runtime", "kernels", "json"], {"kernels", "numpy"}) == ["json", "kernels"]
