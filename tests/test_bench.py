"""sora-bench smoke test on the tiny pipeline (one repeat): every field present, times positive, PSNR computed; the
harness's results naming and index; the demo grid's picture. Performance itself is measured in bench/, never
asserted here."""

import json
import math

import pytest
from click.testing import CliRunner

from conftest import TEST_SIZE, fails_one_line
from soraedge.bench import harness
from soraedge.runtime.errors import SoraError
from soraedge.cli.bench_cmd import main as bench_main
from soraedge.bench.flops import wan_dit_flops


def test_sora_bench_smoke(tiny_model, tiny_engines, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(bench_main, [str(tiny_model("tiny-a")), "--engines", str(tiny_engines("tiny-a")),
                                        "--repeats", "1", "--steps", "2", "--threads", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    (result,) = out.glob("*.json")  # named by the model's folder and the shape, the machine and the date
    scenario = f"{tiny_model('tiny-a').name}-5x32x48"
    name = harness.NAME.match(result.stem)
    assert name and name["bench"] == "e2e" and name["scenario"] == scenario
    assert name["machine"] == harness.machine_name()
    data = json.loads(result.read_text())
    assert data["command"] and data["scenario"] == scenario
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
    assert result.with_suffix(".md").read_text().startswith("## sora-bench")
    assert f"[json]({result.name})" in (out / "README.md").read_text()


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


def test_results_are_never_overwritten_and_the_index_lists_each(tmp_path):
    first = harness.save("dit_step", "tiny", {"threads": 2}, "| a |\n", tmp_path)
    second = harness.save("dit_step", "tiny", {"threads": 2}, "| b |\n", tmp_path)
    assert first != second and second.stem == first.stem + "-2"
    assert first.with_suffix(".md").read_text() == "| a |\n"
    rows = harness.index_rows(tmp_path)
    assert [r["run"] for r in rows] == [1, 2] and rows[0]["threads"] == 2
    index = (tmp_path / "README.md").read_text()
    assert f"[md]({first.stem}.md)" in index and f"[md]({second.stem}.md)" in index


def test_a_result_named_otherwise_is_refused(tmp_path):
    (tmp_path / "dit_step_wan-384x6.json").write_text("{}")
    with pytest.raises(SoraError, match="is not a result of these benches"):
        harness.index_rows(tmp_path)


def test_machine_names():
    assert harness.machine_name({"cpu": "AMD EPYC", "cores": 2, "gpu": None}) == "amd-epyc-2c"
    assert harness.machine_name({"cpu": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cores": 16,
                                 "gpu": None}) == "intel-xeon-platinum-8480-16c"
    assert harness.machine_name({"cpu": "x", "cores": 16, "gpu": {"name": "NVIDIA H200"}}) == "nvidia-h200"


def test_the_committed_results_follow_the_naming_and_their_index_is_current():
    harness.index_rows(harness.RESULTS)
    assert (harness.RESULTS / harness.INDEX).read_text() == harness.index_markdown(harness.RESULTS)


def test_scenarios_name_models_of_the_tests_table():
    """One name, one model: every scenario's model is a tiny_wan configuration and its DiT is built from it."""
    from soraedge.export.tiny_wan import TINY_CONFIGS, dit_config

    for sc in harness.SCENARIOS.values():
        assert sc.dit_config() == dit_config(TINY_CONFIGS[sc.model])
        assert sc.tokens == sc.latent_shape[2] * sc.latent_shape[3] * sc.latent_shape[4] // 4


def test_the_demo_grid_is_one_row_per_held_out_prompt(tiny_engines, tmp_path):
    from PIL import Image

    from soraedge.bench.demo_grid import FRAME_STEP, GAP, LABEL_WIDTH, SCALE, main as grid_main
    from soraedge.demo.toy_world import HELD_OUT

    engines = tiny_engines("tiny-a")
    result = CliRunner().invoke(grid_main, ["--engines", str(engines), "-o", str(tmp_path / "g.png"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    size = TEST_SIZE["tiny-a"]
    frames = len(range(0, size["frames"], FRAME_STEP))
    with Image.open(tmp_path / "g.png") as image:
        assert image.size == (LABEL_WIDTH + frames * (size["width"] * SCALE + GAP),
                              len(HELD_OUT) * (size["height"] * SCALE + GAP))
    fails_one_line(grid_main, ["--engines", engines, "-o", tmp_path / "g.jpg"], "is written as a .png")
    assert not (tmp_path / "g.jpg").exists()


def test_the_demo_probe_reports_a_refused_precision_as_refused():
    """A precision the quality gate refuses is a row of the result, with the gate's words, not a crash."""
    from soraedge.bench.demo_probe import to_markdown

    verdict = {"prompt": "a red circle moving left on a black background", "split": "held_out"}
    split = {"n": 1, "colour_accuracy": 1.0, "shape_accuracy": 1.0, "motion_accuracy": 1.0, "all_accuracy": 1.0}
    r = {"machine": {"cpu": "test cpu"}, "threads": 2, "steps": 20, "seeds_per_prompt": 1, "weights": "w",
         "rows": {"fp32 on ort": {"precision": "fp32", "backend": "ort", "s_per_video": 1.0, "held_out": split,
                                  "train": split, "verdicts": [verdict]},
                  "int8": {"precision": "int8", "refused": "PSNR 29.4 dB against fp32 (threshold 30.0 dB)"}}}
    md = to_markdown(r)
    row = next(line for line in md.splitlines() if line.startswith("| int8 |"))
    assert "refused: PSNR 29.4 dB" in row and row.count("|") == md.splitlines()[4].count("|")
