"""ONNX weights one tensor at a time: graph passes that read and write a model's external data without loading it.

`StreamedGraph(src, dst)` loads the graph alone (`onnx.load(..., load_external_data=False)`: megabytes whatever the
model's size). A pass rewrites its nodes, reads the weights it changes with `array` (or `rows`, a slice of a large
table) and writes their replacements with `add`, which appends them to `dst.data` at once; `save` then copies the
weights it kept, in slices, and writes the graph. Reads are positioned reads, not memory maps, so a weight read is
memory only while it is in hand: a pass needs the graph plus one weight, never the model (a 5.7B-parameter text
encoder converts on a machine that could not hold it once). Paths the graph names are checked to stay inside its
folder (runtime/safe_files.py's `inside`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.errors import SoraError
from ..runtime.lora import CHECKPOINT_TENSORS
from ..runtime.safe_files import inside

ALIGN = 4096  # each tensor starts on a page boundary, so a runtime can map it in place
SLICE = 1 << 26  # bytes read at a time when a kept weight is copied


def load_model(path: Path) -> onnx.ModelProto:
    """The model at `path` with its weights in memory. `onnx.load` refuses external data with more than one hard
    link, and engine folders hard-link their files to the export's (the Triton repository, the target build, the
    trace cache): this reads them itself, with the same folder and size checks as every read here."""
    model = onnx.load(str(path), load_external_data=False)
    weights = ExternalWeights(path, model)
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            t.raw_data = weights.array(t.name).tobytes()
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return model


class ExternalWeights:
    """The initializers of the graph `model` loaded from `path`, read from disk on demand."""

    def __init__(self, path: Path, model: onnx.ModelProto):
        self.path = Path(path)
        self.initializers = {t.name: t for t in model.graph.initializer}

    def constant(self, name: str, dtype=TensorProto.FLOAT, rank: int | None = None) -> bool:
        """Whether `name` is an initializer of this type (and rank)."""
        t = self.initializers.get(name)
        return t is not None and t.data_type == dtype and (rank is None or len(t.dims) == rank)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.initializers[name].dims)

    def array(self, name: str) -> np.ndarray:
        return self.rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (along the first axis) of the initializer `name`, read from disk."""
        t = self.initializers[name]
        if t.data_location != TensorProto.EXTERNAL:
            a = numpy_helper.to_array(t)
            return a[start:stop] if a.ndim else a
        file, offset, dtype, shape = self.located(t)
        row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        stop = min(stop, shape[0]) if shape else 1
        a = np.fromfile(file, dtype=dtype, count=(stop - start) * row, offset=offset + start * row * dtype.itemsize)
        return a.reshape((stop - start, *shape[1:]) if shape else ())

    def located(self, t: TensorProto):
        """(file, offset, numpy dtype, shape) of an external initializer, checked to lie inside the folder and the
        file."""
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(t.dims)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = int(info.get("offset", 0))
        file = inside(self.path.parent, info.get("location"), f"external data of {t.name}")
        if int(info.get("length", nbytes)) != nbytes or offset + nbytes > file.stat().st_size:
            raise SoraError(f"{file}: tensor {t.name} ({list(shape)} {dtype}) does not fit in the file at offset "
                            f"{offset}: the file is truncated or does not belong to {self.path.name}")
        return file, offset, dtype, shape


def checkpoint_weights(path: Path, rows: list[int]) -> dict[str, dict]:
    """{checkpoint tensor: where the graph at `path` holds it} from the graph's CHECKPOINT_TENSORS metadata (written
    at export: export/onnx_export.py): its initializer, the weights file, offset and dtype (or, for a tensor small
    enough to sit in the graph, its values), the checkpoint's shape, the transpose and row order (`rows`: the rotary
    rewrite's [heads, head_dim]) the graph applied. What a LoRA needs to change it at load (runtime/lora.py)."""
    model = onnx.load(str(path), load_external_data=False)
    sources = json.loads({p.key: p.value for p in model.metadata_props}.get(CHECKPOINT_TENSORS, "{}"))
    weights = ExternalWeights(path, model)
    out = {}
    for name, source in sources.items():
        t = weights.initializers.get(name)
        if t is None or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        perm = source.get("transpose")
        shape = list(t.dims)
        target = {"initializer": name, "shape": [shape[i] for i in np.argsort(perm)] if perm else shape,
                  "transpose": perm, "rows": rows if source["rows"] else None}
        if t.data_location == TensorProto.EXTERNAL:
            file, offset, dtype, _ = weights.located(t)
            target.update(file=file.name, offset=offset, dtype=dtype.name)
        else:
            values = numpy_helper.to_array(t)
            target.update(values=values.reshape(-1).tolist(), dtype=values.dtype.name)
        out[source["tensor"]] = target
    return out


class DataFile:
    """The external-data file of the graph `dst` (dst + '.data'), written in order, each tensor on a page boundary."""

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        self.path = self.dst.with_name(self.dst.name + ".data")
        self.out = open(self.path, "wb")

    def close(self) -> None:
        self.out.close()

    def write(self, name: str, dtype, shape, chunks) -> TensorProto:
        """Append the tensor `name` of `dtype` and `shape` from `chunks` (bytes, in order); returns the initializer
        that refers to it."""
        self.out.write(b"\0" * (-self.out.tell() % ALIGN))
        offset = self.out.tell()
        for c in chunks:
            self.out.write(c)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape,
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)),
                           ("length", str(self.out.tell() - offset))):
            t.external_data.add(key=key, value=value)
        return t

    def save(self, model: onnx.ModelProto) -> int:
        """Close the data and write the graph `model` (its initializers referring to it) to dst. Returns the
        data's bytes."""
        self.close()
        onnx.save_model(model, str(self.dst))
        return self.path.stat().st_size


class StreamedGraph(ExternalWeights):
    """The graph of `src` in memory, its weights read from disk on demand and written to `dst` + '.data'."""

    def __init__(self, src: Path, dst: Path):
        self.model = onnx.load(str(src), load_external_data=False)
        super().__init__(src, self.model)
        self.file = DataFile(dst)
        self.added: dict[str, TensorProto] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def add(self, name: str, values: np.ndarray) -> str:
        """Append the initializer `name` = `values` to dst's data now (once per name); returns `name`."""
        if name not in self.added:
            values = np.ascontiguousarray(values)
            self.added[name] = self.file.write(name, values.dtype, values.shape, [values.tobytes()])
        return name

    def add_slices(self, name: str, dtype, shape: tuple[int, ...], slices) -> str:
        """Append the initializer `name` of `shape` from `slices`, arrays of `dtype` in order (a large table written
        as it is computed)."""
        if name not in self.added:
            self.added[name] = self.file.write(name, dtype, shape, (np.ascontiguousarray(s, dtype).tobytes()
                                                                    for s in slices))
        return name

    def save(self) -> int:
        """Copy the kept weights the graph still uses, drop the unused ones, write dst. Returns the data's bytes."""
        used = {i for n in self.model.graph.node for i in n.input} | {o.name for o in self.model.graph.output}
        kept = [self._copy(t) for t in self.model.graph.initializer if t.name in used and t.name not in self.added]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept + [t for n, t in self.added.items() if n in used])
        return self.file.save(self.model)

    def _copy(self, t: TensorProto) -> TensorProto:
        if t.data_location != TensorProto.EXTERNAL:
            return t
        file, offset, dtype, shape = self.located(t)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

        def slices():
            with open(file, "rb") as f:
                f.seek(offset)
                for done in range(0, nbytes, SLICE):
                    yield f.read(min(SLICE, nbytes - done))

        return self.file.write(t.name, dtype, shape, slices())
