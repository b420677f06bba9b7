"""Loading an unchanged engine directory does not hash its files again, and never trusts the record over a change
(runtime/verified_files.py). `sha256_file` is wrapped to count its calls; it still hashes."""

import json
import os
import time

import pytest

from soraedge.runtime import manifest as manifest_module
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import CACHE_DIR, MANIFEST, load_manifest
from soraedge.runtime.verified_files import RECORD, SETTLE_S


@pytest.fixture
def settled_copy(engine_copy):
    """The copy, once its files are older than the record's settle time."""
    time.sleep(SETTLE_S + 0.1)
    return engine_copy


@pytest.fixture
def hashed(monkeypatch):
    """The files sha256_file reads, in order."""
    seen = []
    real = manifest_module.sha256_file

    def counting(path, *args, **kwargs):
        seen.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return seen


def _files(root):
    return json.loads((root / MANIFEST).read_text())["files"]


def test_second_load_hashes_nothing(settled_copy, hashed):
    load_manifest(settled_copy)
    assert len(hashed) == len(_files(settled_copy))
    assert set(json.loads((settled_copy / CACHE_DIR / RECORD).read_text())) == set(_files(settled_copy))
    hashed.clear()
    load_manifest(settled_copy)
    assert hashed == []


def test_a_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(settled_copy):
    load_manifest(settled_copy)
    rel = max(_files(settled_copy), key=lambda r: _files(settled_copy)[r]["bytes"])
    path = settled_copy / rel
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; the ctime cannot be
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(SoraError, match="does not match its manifest hash"):
        load_manifest(settled_copy)


def test_the_record_never_outvotes_the_manifest(settled_copy):
    load_manifest(settled_copy)
    manifest = json.loads((settled_copy / MANIFEST).read_text())
    rel = next(iter(manifest["files"]))
    manifest["files"][rel]["sha256"] = "0" * 64
    (settled_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SoraError, match="does not match its manifest hash"):
        load_manifest(settled_copy)


def test_an_unreadable_record_is_ignored_and_rewritten(settled_copy, hashed):
    (settled_copy / CACHE_DIR).mkdir(exist_ok=True)
    (settled_copy / CACHE_DIR / RECORD).write_text("{not json")
    load_manifest(settled_copy)
    assert len(hashed) == len(_files(settled_copy))
    assert set(json.loads((settled_copy / CACHE_DIR / RECORD).read_text())) == set(_files(settled_copy))


def test_a_just_changed_file_is_not_recorded(settled_copy):
    """A change in the same timestamp tick as the hashing could go unseen: such a file is hashed again next time,
    and an entry recorded of it before goes."""
    load_manifest(settled_copy)
    rel = next(iter(_files(settled_copy)))
    assert rel in json.loads((settled_copy / CACHE_DIR / RECORD).read_text())
    os.utime(settled_copy / rel)  # its ctime is now
    load_manifest(settled_copy)
    recorded = json.loads((settled_copy / CACHE_DIR / RECORD).read_text())
    assert rel not in recorded and len(recorded) == len(_files(settled_copy)) - 1
