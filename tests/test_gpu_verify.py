"""The prepared GPU verification (bench/gpu_verify.py), checked here before any GPU time is spent on it: the wheel
parts join only when every checksum holds, the calls fit one loan, and a stage runs its logic on the CPU."""

import json
import shutil

import numpy as np
import pytest

from soraedge.bench import gpu_verify as gv


def _prepared(tmp_path, size=3_000_000, part=1 << 20):
    prep, home = tmp_path / "prep", tmp_path / "home"
    big = tmp_path / "onnxruntime_gpu-0-cp312-cp312-manylinux_2_28_x86_64.whl"
    big.write_bytes(np.random.default_rng(0).bytes(size))
    parts = gv.split(big, prep, part)
    (prep / "small").mkdir(parents=True)
    (prep / "small" / "parts.json").write_text(json.dumps({"wheel": big.name, "sha256": gv.sha256_file(big),
                                                           "parts": parts}))
    return prep, home, big, parts


def test_wheel_parts_join_to_the_prepared_file(tmp_path):
    prep, home, big, parts = _prepared(tmp_path)
    assert len(parts) == 3 and max(p["bytes"] for p in parts) <= 1 << 20
    for i in range(len(parts)):  # one part per call, as the device calls carry them
        carried = tmp_path / f"call{i}"
        shutil.copytree(prep / f"p{i}", carried / f"p{i}")
        if i == len(parts) - 1:
            shutil.copytree(prep / "small", carried / "small")
        gv.receive(carried, home)
    assert gv._join(home).read_bytes() == big.read_bytes()


def test_a_damaged_or_missing_part_is_refused(tmp_path):
    prep, home, _, parts = _prepared(tmp_path)
    gv.receive(prep, home)
    damaged = home / "parts" / parts[1]["file"].split("/")[1]
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="damaged"):
        gv._join(home)
    damaged.unlink()
    with pytest.raises(RuntimeError, match="never arrived"):
        gv._join(home)


def test_the_calls_fit_one_loan():
    stages = [s for call in gv.CALLS.values() for s, _ in call]
    assert sorted(stages) == sorted(gv.STAGES)  # every stage runs once
    last = gv.CALLS[max(gv.CALLS)]
    assert sum(t for _, t in last) <= 9 * 60  # the final call's stages within its 9 minutes
    assert all(sum(t for _, t in c) <= 3 * 60 for n, c in gv.CALLS.items() if n != max(gv.CALLS))


def test_the_ort_stage_runs_its_checks_on_the_cpu(tiny_engines, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(tiny_engines("tiny-a"), home / "small" / "engines")
    result = gv.run_stage("ort", {"home": home, "dry_run": True})
    assert result["passed"], result
    assert result["session_providers"][0] == "CPUExecutionProvider" and result["max_rel_vs_cpu"] == 0.0
