"""EngineSpec: the single statement of an engine's inputs, outputs, dtypes and dynamic dimensions.

Everything shape-related is derived from it: export sample inputs, exporter dynamic shapes, ONNX dynamic axis
names, TensorRT optimisation profiles, runtime input validation and output buffer shapes. A shape entry is an int
(static), a dim name (dynamic, with min/opt/max and a required multiple), or an arithmetic expression over dim names
(for outputs, e.g. "4*(f-1)+1"). Not for: anything that runs a model.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import SoraError

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: legal values are multiples of `multiple` in [min, max]; `opt` is the tuning point."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self):
        if not (self.min <= self.opt <= self.max):
            raise ValueError(f"dim {self.name}: need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        for v in (self.min, self.opt, self.max):
            if v % self.multiple:
                raise ValueError(f"dim {self.name}: {v} is not a multiple of {self.multiple}")

    def check(self, value: int) -> str | None:
        if value % self.multiple or not (self.min <= value <= self.max):
            return f"{self.name}={value} (expected a multiple of {self.multiple} in [{self.min}, {self.max}])"
        return None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # entries: int | dim name | expression over dim names

    @property
    def np_dtype(self):
        return np.dtype(_DTYPES[self.dtype])


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval(expr, sizes: dict[str, int]) -> int:
    """Evaluate a shape entry (int, dim name, or +,-,*,// expression) against concrete dim sizes."""
    if isinstance(expr, int):
        return expr

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported shape expression: {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


@dataclass(frozen=True)
class RunSettings:
    """How the runtime opens one engine, decided where its spec is made (export/) and carried in the manifest.

    - `one_thread`: a small engine that runs between another's calls (the step-cache probe): a thread pool of its
      own would spin-wait after each call and take the cores from the DiT.
    - `arena`: ONNX Runtime's CPU arena keeps every block it ever grew to; off where large buffers should go back
      (the VAE decoder: 29% less peak RSS at the same speed).
    - `static_shapes`: OpenVINO compiles per input shape, keeping this many (0: one dynamic compile;
      backends/openvino.py says why the VAE needs it and the DiT gains from it).
    - `cuda_graph`: the same shape every call (the DiT step), so a GPU backend captures and replays it.
    """

    one_thread: bool = False
    arena: bool = True
    static_shapes: int = 0
    cuda_graph: bool = False


@dataclass(frozen=True)
class EngineSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...] = field(default_factory=tuple)
    run: RunSettings = field(default_factory=RunSettings)

    # -- lookups -------------------------------------------------------------------------------------------------
    @property
    def dim_map(self) -> dict[str, Dim]:
        return {d.name: d for d in self.dims}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def sizes(self, point: str = "opt", **overrides: int) -> dict[str, int]:
        """Concrete dim sizes at min/opt/max, with explicit overrides."""
        out = {d.name: getattr(d, point) for d in self.dims}
        out.update(overrides)
        return out

    def shape_of(self, tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(_eval(e, sizes) for e in tensor.shape)

    # -- derived views -------------------------------------------------------------------------------------------
    def sample_inputs(self, seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
        """Random inputs at `opt` (or the given sizes): export samples and parity probes."""
        rng = np.random.default_rng(seed)
        full = self.sizes("opt", **sizes)
        feeds = {}
        for t in self.inputs:
            shape = self.shape_of(t, full)
            if t.np_dtype.kind == "f":
                feeds[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
            else:
                feeds[t.name] = rng.integers(0, 2, size=shape).astype(t.np_dtype)
        return feeds

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: dim name}} for every dynamic axis of inputs and outputs (ONNX symbolic names)."""
        axes = {}
        for t in (*self.inputs, *self.outputs):
            dyn = {i: e for i, e in enumerate(t.shape) if not isinstance(e, int)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def trt_profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input: (min shape, opt shape, max shape)}: one TensorRT optimisation profile."""
        return {
            t.name: tuple(self.shape_of(t, self.sizes(p)) for p in ("min", "opt", "max"))  # type: ignore[misc]
            for t in self.inputs
        }

    def output_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Runtime buffer shapes for the outputs at concrete sizes."""
        return {t.name: self.shape_of(t, sizes) for t in self.outputs}

    # -- runtime validation --------------------------------------------------------------------------------------
    def bind(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes and shapes of `feeds`; return the dim sizes they imply. Raises SoraError."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise SoraError(f"{self.name}: missing inputs {sorted(missing)}")
        sizes: dict[str, int] = {}
        for t in self.inputs:
            arr = feeds[t.name]
            if arr.dtype != t.np_dtype:
                raise SoraError(f"{self.name}: input {t.name} has dtype {arr.dtype}, expected {t.dtype}")
            if arr.ndim != len(t.shape):
                raise SoraError(f"{self.name}: input {t.name} has rank {arr.ndim}, expected {len(t.shape)}")
            for axis, (entry, got) in enumerate(zip(t.shape, arr.shape)):
                if isinstance(entry, int):
                    if got != entry:
                        raise SoraError(f"{self.name}: {t.name} axis {axis} is {got}, expected {entry}")
                elif entry in self.dim_map:
                    if sizes.setdefault(entry, got) != got:
                        raise SoraError(f"{self.name}: dim {entry} is {sizes[entry]} and {got} in different inputs")
        bad = [msg for name, v in sizes.items() if (msg := self.dim_map[name].check(v))]
        if bad:
            raise SoraError(f"{self.name}: outside the exported range: {', '.join(bad)}")
        for t in self.inputs:  # derived entries ("2*h") must agree with the dims they derive from
            for axis, (entry, got) in enumerate(zip(t.shape, feeds[t.name].shape)):
                if isinstance(entry, str) and entry not in sizes and _eval(entry, sizes) != got:
                    raise SoraError(f"{self.name}: {t.name} axis {axis} is {got}, expected {entry}="
                                    f"{_eval(entry, sizes)}")
        return sizes

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EngineSpec:
        return cls(
            name=d["name"],
            inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]),
            outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["outputs"]),
            dims=tuple(Dim(**x) for x in d["dims"]),
            run=RunSettings(**d.get("run", {})),
        )
