"""sora-bench smoke test on the tiny pipeline (one repeat): every field present, times positive, PSNR computed.
Performance itself is measured in bench/, never asserted here."""

import json
import math

from click.testing import CliRunner

from soraedge.cli.bench_cmd import main as bench_main
from soraedge.bench.flops import wan_dit_flops


def test_sora_bench_smoke(tiny_model, tiny_engines, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(bench_main, [str(tiny_model("tiny-a")), "--engines", str(tiny_engines("tiny-a")),
                                        "--repeats", "1", "--steps", "2", "--threads", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "bench_cpu.json").read_text())
    assert {"machine", "threads", "versions", "shape", "rows", "flops_per_dit_call", "matmul_peak_gflops",
            "scaling"} <= set(data)
    assert data["machine"]["cpu"] and data["threads"] == 2
    names = [row["name"] for row in data["rows"]]
    assert names[0] == "pytorch-eager" and "ort" in names
    for row in data["rows"]:
        for stage in ("encode", "step", "denoise", "decode", "total"):
            assert row["stages"][stage]["median"] > 0, (row["name"], stage)
        assert row["load_s"] > 0 and row["warmup_s"] > 0 and row["dit_gflops"] > 0
        assert not math.isnan(row["psnr_db"])
    ort = next(row for row in data["rows"] if row["name"] == "ort")
    assert ort["psnr_db"] > 60  # fp32 engines against fp32 PyTorch
    assert len(data["scaling"]["points"]) >= 2 and "ort-fp32" in data["scaling"]["exponents"]
    assert (out / "bench_cpu.md").read_text().startswith("## sora-bench")


def test_sora_bench_bad_arguments(tiny_model, tiny_engines, tmp_path):
    r = CliRunner().invoke(bench_main, [str(tiny_model("tiny-a")), "--engines", str(tmp_path / "none")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(bench_main, [str(tiny_model("tiny-a")), "--engines", str(tiny_engines("tiny-a")),
                                        "--frames", "89", "--no-scaling"])
    assert r.exit_code == 2 and "outside the exported range" in r.output
    r = CliRunner().invoke(bench_main, [str(tiny_model("tiny-a")), "--engines", str(tiny_engines("tiny-a")),
                                        "--peers", "cuda-fp16"])
    assert r.exit_code == 2 and "unknown peer" in r.output


def test_flop_count_by_hand():
    cfg = dict(num_attention_heads=1, attention_head_dim=4, ffn_dim=8, num_layers=1, text_dim=2, in_channels=1,
               patch_size=(1, 1, 1))
    f = wan_dit_flops(cfg, batch=1, tokens=3, text_len=2)
    d, n, s = 4, 3, 2
    linear = 2 * n * d * d * 4 + 2 * n * d * d * 2 + 2 * s * d * d * 2 + 2 * n * d * 8 * 2
    embed = 2 * s * 2 * d + 2 * s * d * d + 2 * n * d * 1 * 2
    assert f["linear"] == linear + embed
    assert f["attention"] == 2 * n * n * d * 2 + 2 * n * s * d * 2
