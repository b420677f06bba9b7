"""Safetensors weights (a checkpoint component's, a LoRA's), read from their headers: what tensors there are, where,
and of what dtype and shape; then one tensor at a time as float32 (`read_float32`). Torch-free; nothing is
unpickled.

Every file is checked before any loader sees it, so a truncated shard, a malformed header, a shard missing from a
`*.safetensors.index.json`, or a tensor that lies past the end of its file is one line naming the file, not a
traceback from deep inside a loader. Format: https://huggingface.co/docs/safetensors/index#format (an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SoraError
from .safe_files import inside

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 << 20  # the format's own limit on the header's size
_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
READ_SLICE = 1 << 26  # bytes of a bf16/fp16 tensor converted at a time


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in `file`
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_float32(info: TensorInfo, name: str = "") -> np.ndarray:
    """The tensor as float32 whatever it is stored as; a bf16/fp16 one converted slice by slice, so reading it takes
    its float32 size and no more (umT5-XXL's 4.2 GB token table)."""
    stored = np.uint16 if info.dtype == "BF16" else _NUMPY.get(info.dtype)
    if stored is None:
        raise SoraError(f"{info.file}: {name} is stored as {info.dtype}, not a floating-point type")
    if stored == np.float32:
        return np.fromfile(info.file, stored, info.numel, offset=info.begin).reshape(info.shape)
    out = np.empty(info.numel, np.float32)
    step = READ_SLICE // np.dtype(stored).itemsize
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        for i in range(0, info.numel, step):
            part = np.fromfile(f, stored, min(step, info.numel - i))
            if info.dtype == "BF16":  # the high half of a float32
                out.view(np.uint32)[i:i + part.size] = part.astype(np.uint32) << 16
            else:
                out[i:i + part.size] = part
    return out.reshape(info.shape)


def read_metadata(path: Path) -> dict:
    """The `__metadata__` of a .safetensors file whose header read_header accepted ({} where it has none)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def read_header(path: Path) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} of one .safetensors file; SoraError naming the file when it is malformed or
    truncated."""
    def bad(why: str) -> SoraError:
        return SoraError(f"{path} is not a valid safetensors file ({why}): re-download or re-save it")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise bad(f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            ok = dtype in ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape) \
                and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name!r} has a malformed entry")
        if e - b != math.prod(shape) * ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r}: {e - b} bytes for {dtype} {list(shape)}")
        if e > data_size:
            raise bad(f"tensor {name!r} ends at byte {e} of {data_size} (truncated)")
        tensors[name] = TensorInfo(path, dtype, shape, 8 + n + b, 8 + n + e)
    return tensors


def component_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of one component folder: through its `*.safetensors.index.json` where it has one (each shard it
    names must exist inside the folder and hold the tensors it lists), else from every .safetensors file."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        tensors = {}
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(read_header(f))
        return tensors
    try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise SoraError(f"{indexes[0]} is not a valid safetensors index (no weight_map)") from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors = {}
    for name, shard in weight_map.items():
        if shard not in headers:
            path = inside(folder, shard, f"shard of {indexes[0].name}")
            if not path.is_file():
                raise SoraError(f"{path} is missing: {indexes[0].name} lists it as a shard")
            headers[shard] = read_header(path)
        if name not in headers[shard]:
            raise SoraError(f"{folder / shard} does not hold {name!r}, which {indexes[0].name} places there")
        tensors[name] = headers[shard][name]
    return tensors
