"""DiT step latency, side by side in one run: PyTorch eager (the reference; and in bf16 where OpenVINO reports the
CPU has it, as diffusers loads it), ONNX Runtime fp32 (the portable graph and its CPU graph with
MultiHeadAttention), OpenVINO fp32/bf16 (compiled for the shape, as the pipeline runs it), and the int8-dynamic DiT
(int8 linear weights, activations quantized at run time: precision/int8_dynamic.py) on both.

Same weights (a Wan-architecture transformer built from a fixed seed), same inputs, same thread count; the ONNX
engines are timed in turn (bench/dit_step.time_interleaved). Reports the median and p95 of repeats after warm-up,
the load/compile time apart, the output error against PyTorch, the step's
FLOPs (bench/flops.py), achieved GFLOP/s and the fraction of this machine's measured MatMul peak
(bench/matmul_peak.py). Writes bench/results/dit_step_<tag>.json and .md.

    python -m soraedge.bench.dit_step [--threads 2] [--repeats 5] [--scenario wan-384x6-1280tok] [--tag cpu]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..runtime.machine import machine

from .e2e import versions
from .flops import wan_dit_flops
from .matmul_peak import best_peak, matmul_peak
from .report import result_options, save

# Scenarios as data. hidden 384 = 6 heads x 64; ffn in Wan2.1's ratio (8960 / 1536); 17 frames of 256x256 ->
# 5 x 32 x 32 latents -> 1280 tokens after the 1x2x2 patch; CFG batch of 2; 512 text tokens of width 4096.
SCENARIOS = {
    "wan-384x6-1280tok": dict(model=dict(num_attention_heads=6, attention_head_dim=64, ffn_dim=2240, num_layers=6,
                                         text_dim=4096), frames=17, height=256, width=256, text_len=512, batch=2),
    "wan-384x6-320tok": dict(model=dict(num_attention_heads=6, attention_head_dim=64, ffn_dim=2240, num_layers=6,
                                        text_dim=4096), frames=5, height=128, width=256, text_len=512, batch=2),
    # Wan2.1-T2V-1.3B's layer shape (hidden 1536 = 12 heads x 128, ffn 8960), 4 of its 30 layers, the same tokens
    "wan-1.3b-4layers-1280tok": dict(model=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                                num_layers=4, text_dim=4096), frames=17, height=256, width=256,
                                     text_len=512, batch=2),
    # Wan2.1-T2V-1.3B's whole transformer configuration (30 layers), the GPU verification's DiT
    "wan-1.3b-1280tok": dict(model=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                                        text_dim=4096), frames=17, height=256, width=256, text_len=512, batch=2),
    "tiny": dict(model=dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32),
                 frames=5, height=32, width=48, text_len=16, batch=2),
}
DEFAULT_SCENARIO = "wan-384x6-1280tok"
BASE = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def scenario_options(fn):
    """--scenario (one of SCENARIOS) and --threads, as every CPU DiT bench takes them."""
    fn = click.option("--threads", type=int, default=os.cpu_count(), show_default=True)(fn)
    return click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default=DEFAULT_SCENARIO,
                        show_default=True)(fn)


def time_calls(fn, repeats: int) -> tuple[dict, object]:
    """(median/p95 seconds of `fn` over `repeats` calls after one warm-up call, warm-up seconds; the warm-up
    call's output)."""
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(times)), "p95_s": float(np.percentile(times, 95)), "warmup_s": warm,
            "repeats": repeats}, out


def time_interleaved(calls: dict, repeats: int, gap_s: float = 0.3) -> tuple[dict, dict]:
    """Each of `calls` ({key: fn}, every engine already open) once as warm-up, then all in turn `repeats` times with
    a pause before each call (the previous library's worker threads stop spinning): on a small shared machine,
    timing one engine after another let drift between minutes move ratios by 10% or more. Returns
    ({key: median/p95/min seconds}, {key: warm-up output})."""
    outs, times = {}, {k: [] for k in calls}
    for key, fn in calls.items():
        t0 = time.perf_counter()
        outs[key] = fn()
        times[key].append(time.perf_counter() - t0)  # the warm-up, reported apart
    warmup = {k: v.pop() for k, v in times.items()}
    for _ in range(repeats):
        for key, fn in calls.items():
            time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: {"median_s": float(np.median(v)), "p95_s": float(np.percentile(v, 95)), "min_s": float(min(v)),
                "warmup_s": warmup[k], "repeats": repeats} for k, v in times.items()}, outs


def scenario_inputs(scenario: str) -> tuple[dict, tuple[int, ...], dict[str, np.ndarray]]:
    """(transformer config, latent shape [B, C, f, h, w], DiT inputs at a fixed seed) of a scenario."""
    sc = SCENARIOS[scenario]
    cfg = {**BASE, **sc["model"]}
    lat = (sc["batch"], 16, (sc["frames"] - 1) // 4 + 1, sc["height"] // 8, sc["width"] // 8)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal(lat, dtype=np.float32),
             "timestep": np.full((sc["batch"],), 900.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((sc["batch"], sc["text_len"], cfg["text_dim"]),
                                                          dtype=np.float32)}
    return cfg, lat, feeds


def build_scenario_model(cfg: dict, tmp: Path):
    """The scenario's transformer (seed 0), saved as tmp/transformer for the exporter; returned for eager runs."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**cfg).eval()
    model.save_pretrained(tmp / "transformer")
    return model


def export_scenario_dit(cfg: dict, text_len: int, lat: tuple[int, ...], tmp: Path):
    """Export tmp/transformer to tmp/dit.onnx with a spec covering the scenario's shape; returns the spec."""
    from ..export.dit import AttentionForm, dit_spec, load_dit
    from ..export.onnx_export import export_onnx
    from ..runtime.spec import Dim

    spec = dit_spec(cfg, text_len, Dim("f", 1, lat[2], max(lat[2], 21)),
                    Dim("h", 2, lat[3], max(lat[3], 160), 2), Dim("w", 2, lat[4], max(lat[4], 160), 2))
    export_onnx(load_dit(tmp, AttentionForm.ONNX), spec, tmp / "dit.onnx", 23, {"b": 2, "f": 2, "h": 4, "w": 6})
    return spec


def eager_bf16(transformer_dir: Path, args: list):
    """PyTorch's bf16 peer as diffusers loads it (`torch_dtype=bfloat16`, its fp32 modules kept fp32): a callable
    returning the float32 output."""
    import torch
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(transformer_dir, torch_dtype=torch.bfloat16).eval()
    args = [a.to(torch.bfloat16) if a.dim() > 1 else a for a in args]  # the timestep stays fp32

    def call():
        with torch.inference_mode():
            return model(*args, return_dict=False)[0].float().numpy()

    return call


def run(scenario: str, threads: int, repeats: int, compile_peer: bool = False, log=print) -> dict:
    import torch

    from ..target.attention_rewrite import rewrite_file
    from ..precision.int8_dynamic import quantize_linear_weights
    from ..precision.convert import FP16_ISLANDS
    from ..runtime.backends import open_engine
    from ..runtime.backends import openvino as ov_backend

    sc = SCENARIOS[scenario]
    cfg, lat, feeds = scenario_inputs(scenario)
    torch.set_num_threads(threads)
    tokens = lat[2] * lat[3] * lat[4] // 4
    has_bf16 = ov_backend.available() and ov_backend.cpu_info()["bf16"]  # bf16 peers: OpenVINO and PyTorch
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_scenario_model(cfg, tmp)
        args = [torch.from_numpy(feeds[k]) for k in ("hidden_states", "timestep", "encoder_hidden_states")]

        def eager():
            with torch.inference_mode():
                return model(*args, return_dict=False)[0].numpy()

        log("PyTorch eager ...")
        rows["pytorch-eager-fp32"], ref = time_calls(eager, repeats)
        if compile_peer:
            log("torch.compile ...")
            compiled = torch.compile(model)

            def comp():
                with torch.inference_mode():
                    return compiled(*args, return_dict=False)[0].numpy()

            rows["torch-compile-fp32"], out = time_calls(comp, repeats)
            rows["torch-compile-fp32"]["max_rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
        if has_bf16:
            log("PyTorch eager bf16 ...")
            rows["pytorch-eager-bf16"], out = time_calls(eager_bf16(tmp / "transformer", args), repeats)
            rows["pytorch-eager-bf16"]["max_rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())

        log("exporting ...")
        t0 = time.perf_counter()
        spec = export_scenario_dit(cfg, sc["text_len"], lat, tmp)
        export_s = time.perf_counter() - t0
        # ONNX Runtime's CPU graph (MultiHeadAttention), which the export keeps where it is faster
        rewrite_file(tmp / "dit.onnx", tmp / "dit-mha.onnx")
        # the int8-dynamic DiT, as `sora-export --dit-precision int8-dynamic` writes it
        quantize_linear_weights(tmp / "dit.onnx", tmp / "dit-int8-dynamic.onnx", FP16_ISLANDS["transformer"][1])
        peers = {"ort-fp32": ("ort", "dit.onnx", "fp32"), "ort-mha-fp32": ("ort", "dit-mha.onnx", "fp32"),
                 "ort-int8-dynamic-fp32": ("ort", "dit-int8-dynamic.onnx", "fp32")}
        if ov_backend.available():
            peers["openvino-fp32"] = ("openvino", "dit.onnx", "fp32")
            peers["openvino-int8-dynamic-fp32"] = ("openvino", "dit-int8-dynamic.onnx", "fp32")
            if has_bf16:
                peers["openvino-bf16"] = ("openvino", "dit.onnx", "bf16")
                peers["openvino-int8-dynamic-bf16"] = ("openvino", "dit-int8-dynamic.onnx", "bf16")
        engines, load_s = {}, {}
        for name, (backend, file, precision) in peers.items():
            log(f"opening {name} ...")
            t0 = time.perf_counter()
            engines[name] = open_engine(backend, tmp / file, spec, threads, precision,  # as the pipeline opens it
                                        static_shapes=1 if backend == "openvino" else 0)
            load_s[name] = time.perf_counter() - t0
        log("timing the engines in turn ...")
        stats, outs = time_interleaved({k: (lambda e=e: e(**feeds)) for k, e in engines.items()}, repeats)
        for name in peers:
            rows[name] = {**stats[name], "load_s": load_s[name],
                          "max_rel_err": float(np.abs(outs[name] - ref).max() / np.abs(ref).max())}

    flops = wan_dit_flops(cfg, sc["batch"], tokens, sc["text_len"])
    log("matmul peak ...")
    peak = matmul_peak(threads)
    best_fp32, best_bf16 = best_peak(peak, "fp32"), best_peak(peak, "bf16")
    for name, row in rows.items():
        row["gflops"] = flops["total"] / row["median_s"] / 1e9
        row["fraction_of_fp32_peak"] = row["gflops"] / best_fp32
        row["speedup_vs_pytorch"] = rows["pytorch-eager-fp32"]["median_s"] / row["median_s"]
        row["speedup_vs_ort_fp32"] = rows["ort-fp32"]["median_s"] / row["median_s"]
        if name.endswith("bf16") and best_bf16:
            row["fraction_of_bf16_peak"] = row["gflops"] / best_bf16
    return {"scenario": scenario, "config": cfg, "shape": {**{k: sc[k] for k in ("frames", "height", "width",
                                                                                "text_len", "batch")},
                                                         "latents": list(lat), "tokens": tokens},
            "threads": threads, "machine": machine(), "versions": versions(), "export_s": export_s,
            "flops": flops, "matmul_peak_gflops": peak, "rows": rows}


def to_markdown(r: dict) -> str:
    s = r["shape"]
    lines = [f"### DiT step: {r['scenario']}", "",
             f"{r['machine']['cpu']}, {r['threads']} threads; {s['frames']} frames {s['width']}x{s['height']} "
             f"-> {s['tokens']} tokens, CFG batch {s['batch']}, {s['text_len']} text tokens; "
             f"{r['flops']['total'] / 1e9:.1f} GFLOP per call; MatMul peak (best of 1024^3, 2048^3, with B an input "
             f"or a constant weight; the shares below are of the best per precision): "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in r["matmul_peak_gflops"].items()), "",
             "| backend | precision | median s | p95 s | warm-up s | GFLOP/s | of fp32 peak | of bf16 peak "
             "| vs PyTorch | vs ORT fp32 | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        backend, precision = name.rsplit("-", 1)
        backend = {"ort-mha": "ort (MultiHeadAttention)", "ort-int8-dynamic": "ort, int8-dynamic DiT",
                   "openvino-int8-dynamic": "openvino, int8-dynamic DiT"}.get(backend, backend)
        err = f"{row['max_rel_err']:.1e}" if "max_rel_err" in row else "reference"
        lines.append(f"| {backend} | {precision} | {row['median_s']:.3f} | {row['p95_s']:.3f} | "
                     f"{row['warmup_s']:.2f} | {row['gflops']:.0f} | {row['fraction_of_fp32_peak']:.0%} | "
                     f"{format(row['fraction_of_bf16_peak'], '.0%') if 'fraction_of_bf16_peak' in row else ''} | "
                     f"{row['speedup_vs_pytorch']:.2f}x | {row['speedup_vs_ort_fp32']:.2f}x | {err} |")
    return "\n".join(lines) + "\n"


@click.command()
@scenario_options
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--compile", "compile_peer", is_flag=True, help="Also time torch.compile (slow to compile).")
@result_options("dit_step")
def main(scenario, threads, repeats, compile_peer, tag, results):
    r = run(scenario, threads, repeats, compile_peer, log=lambda m: click.echo(m, err=True))
    save(results, "dit_step", tag, r, to_markdown(r))


if __name__ == "__main__":
    main()
