"""The file-system rules every reader and writer of an engine directory follows. Torch-free.

- `inside(root, rel)`: a path that a manifest (or any file from elsewhere) names is relative, has no `..`, and,
  symlinks resolved, stays inside `root`. Checked when a manifest is read and again where anything is written.
- `temp_beside(path)`: a temporary file created exclusively (O_EXCL, a random name) in the target's folder, so a
  symlink planted at a predictable name is never followed; removed on any failure.
- `atomic_write_bytes/text`: write through such a file, fsync, rename over the target.
- `output_lock(out)`: an exclusive lock for one output path, held while a build checks what is there and swaps its
  result in, so two concurrent builds to one folder cannot both replace it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .errors import SoraError


def inside(root: Path, rel, what: str = "path") -> Path:
    """root/rel, refused with SoraError unless `rel` is a non-empty relative POSIX path without `.`/`..` parts whose
    resolved location (symlinks followed) is inside `root`'s."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise SoraError(f"{root}: {what} {rel!r} is not a relative path inside the directory")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(p in (".", "..") for p in rel.split("/")) or not parts:
        raise SoraError(f"{root}: {what} {rel!r} leaves the directory (absolute or with '..'): refusing it")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise SoraError(f"{root}: {what} {rel!r} resolves to {target}, outside the directory (a symlink): "
                        f"refusing it")
    return Path(root) / rel


def make_temp_beside(path: Path, suffix: str = "") -> tuple[int, Path]:
    """(fd, temp path) in `path`'s folder, created with O_EXCL under a random name ending in `suffix` (a writer
    that picks its format by extension still sees it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    return fd, Path(tmp)


def drop_temp(fd: int, tmp: Path) -> None:
    """Close and remove a temp file from make_temp_beside (nothing to remove once it was renamed into place)."""
    with contextlib.suppress(OSError):
        os.close(fd)
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def temp_beside(path: Path, suffix: str = ""):
    """make_temp_beside as a context: the temp file is removed on exit unless the caller renamed it into place."""
    fd, tmp = make_temp_beside(path, suffix)
    try:
        yield fd, tmp
    finally:
        drop_temp(fd, tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers never see a half-written file, and nothing but `path` itself is ever written."""
    with temp_beside(path) as (fd, tmp):
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def output_lock(out: Path):
    """An exclusive lock for the output `out`: an flock on its parent folder (no file is left behind), shared by
    every writer of that folder for the few milliseconds of a check-and-swap."""
    fd = os.open(Path(out).parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (same content, no copy), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
