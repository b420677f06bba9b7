"""Writing an engine directory safely: check the destination, stage beside it, rename into place. Torch-free.

Every build (a full export in export/build.py, a target build from existing ONNX in target/build.py) writes
into a temporary sibling directory and renames it into place at the end, so an interrupted or failed build never
leaves a half-written engine directory, and an existing one is moved aside only once its replacement is complete.
A folder is replaced only when it is an engine directory of ours (`is_engine_dir`), holds no file its manifest does
not list, and is either the same build's stale copy or the user said `--overwrite`; the output never holds the
source. The last check is repeated under the output's lock just before the rename (`commit`), so concurrent builds
to one folder cannot replace each other's different results.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..runtime.errors import SoraError
from ..runtime.interrupts import raise_if_interrupted
from ..runtime.manifest import CACHE_DIR, MANIFEST, is_engine_dir, load_manifest
from ..runtime.safe_files import output_lock


@dataclass
class ExportReport:
    out: Path
    reused: bool
    seconds: dict[str, float] = field(default_factory=dict)


def check_destination(out: Path, source: Path | None = None) -> None:
    """Refuse an output that is a file, that holds the source (replacing it would delete what the build reads), or
    that is a non-empty folder other than an engine directory of ours; create its parent."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SoraError(f"output {out} exists and is not a directory: refusing to replace it")
    if source is not None and out.resolve() in Path(source).resolve().parents:
        raise SoraError(f"output {out} holds the source {source}: replacing it would delete the source; write the "
                        f"engines to another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoraError(f"cannot create the folder {out.parent} for the output ({e.strerror})") from None
    if out.is_dir() and any(out.iterdir()) and not is_engine_dir(out):
        raise SoraError(f"{out} exists, is not empty and is not an engine directory (it holds "
                        f"{_listing(out.iterdir(), out)}): refusing to touch it")


def _listing(paths, root: Path, most: int = 3) -> str:
    names = sorted(p.relative_to(root).as_posix() for p in paths)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def foreign_files(out: Path) -> list[Path]:
    """Files inside the engine directory `out` that its manifest does not list (a user's renders, notes): a rebuild
    that replaced the folder would delete them."""
    try:
        listed = set(json.loads((out / MANIFEST).read_text()).get("files") or {})
    except (OSError, ValueError, AttributeError):
        listed = set()
    return [p for p in out.rglob("*") if not p.is_dir() and p.relative_to(out).parts[0] != CACHE_DIR
            and p.name != MANIFEST and p.relative_to(out).as_posix() not in listed]


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
    unless `overwrite`; one holding files its manifest does not list is refused either way."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        existing = load_manifest(out)
    except SoraError:
        existing = None
    if existing is not None and existing.data.get("cache_key") == key:
        return True
    same_inputs = existing is not None and existing.data.get("inputs_key") == inputs_key
    if not same_inputs and not overwrite:
        raise SoraError(f"{out} holds a different engine directory; pass --overwrite to replace it")
    if foreign := foreign_files(out):
        raise SoraError(f"{out} also holds files that are not part of its engines ({_listing(foreign, out)}): "
                        f"replacing it would delete them; move them out or write to another folder")
    if same_inputs:
        log(f"{out} was built from the same model and options by other tool versions: rebuilding it")
    return False


def commit(stage: Path, out: Path, work: Path, key: str, inputs_key: str, overwrite: bool,
           log: Callable[[str], None] = lambda s: None) -> bool:
    """Rename the finished build into place, under the output's lock and after repeating the destination checks
    there (another build may have written `out` meanwhile). False when an identical build is already in place
    (this one is discarded). An old directory is moved aside first and deleted only after, with the work dir. A
    Ctrl-C that arrived during the build stops it here, even if Python swallowed it where it landed."""
    raise_if_interrupted()
    with output_lock(out):
        check_destination(out)
        if up_to_date(out, key, inputs_key, overwrite, log):
            return False
        raise_if_interrupted()
        if out.exists():
            out.rename(work / "previous")  # the work dir is removed with everything in it once we return
        stage.rename(out)
    return True
