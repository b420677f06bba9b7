"""Writing an engine directory safely: check the destination, stage beside it, rename into place. Torch-free.

Every build (a full export in export/build.py, a target build from existing ONNX in export/build_target.py) writes
into a temporary sibling directory and renames it into place at the end, so an interrupted or failed build never
leaves a half-written engine directory, and an existing one is moved aside only once its replacement is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..runtime.errors import SoraError
from ..runtime.interrupts import raise_if_interrupted
from ..runtime.manifest import MANIFEST, load_manifest


@dataclass
class ExportReport:
    out: Path
    reused: bool
    seconds: dict[str, float] = field(default_factory=dict)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (same content, no copy), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_destination(out: Path) -> None:
    """Refuse an output that is a file or a non-empty folder that is not an engine directory; create its parent."""
    if out.exists() and not out.is_dir():
        raise SoraError(f"output {out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoraError(f"cannot create the folder {out.parent} for the output ({e.strerror})") from None
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SoraError(f"{out} exists, is not empty and is not an engine directory: refusing to touch it")


def build_keys(inputs: dict, versions: dict) -> tuple[str, str]:
    """(cache key, inputs key): the cache key hashes what a build is made from (content, options, machine) and the
    tools that made it; the inputs key only the former, so a directory built from the same inputs by other tool
    versions is recognised as a stale copy of this build rather than a different one."""
    def digest(obj):
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

    inputs_key = digest(inputs)
    return digest({"inputs": inputs_key, "versions": versions}), inputs_key


def up_to_date(out: Path, key: str, inputs_key: str, overwrite: bool,
               log: Callable[[str], None] = lambda s: None) -> bool:
    """True when `out` is a valid engine directory built with cache key `key` (the build can be skipped). One built
    from the same inputs by other tool versions is rebuilt; a different (or damaged) directory there is refused
    unless `overwrite`."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        existing = load_manifest(out)
    except SoraError:
        existing = None
    if existing is not None and existing.data.get("cache_key") == key:
        return True
    if existing is not None and existing.data.get("inputs_key") == inputs_key:
        log(f"{out} was built from the same model and options by other tool versions: rebuilding it")
        return False
    if not overwrite:
        raise SoraError(f"{out} holds a different engine directory; pass --overwrite to replace it")
    return False


def swap_into_place(stage: Path, out: Path, work: Path) -> None:
    """Rename the finished build into place; an old directory is moved aside first and deleted only after. A Ctrl-C
    that arrived during the build stops it here, even if Python swallowed it where it landed."""
    raise_if_interrupted()
    if out.exists():
        old = work / "previous"
        out.rename(old)  # the work dir is removed with everything in it once we return
    stage.rename(out)
