"""DiT step latency, side by side in one run: PyTorch eager (the reference; and in bf16 where OpenVINO reports the
CPU has it, as diffusers loads it), ONNX Runtime fp32 (the portable graph and its CPU graph with
MultiHeadAttention), OpenVINO fp32/bf16 (compiled for the shape, as the pipeline runs it), and the int8-dynamic DiT
(int8 linear weights, activations quantized at run time: precision/int8_dynamic.py) on both.

Same weights (the scenario's model from export/tiny_wan.py, its fixed seed), same inputs, same thread count; the ONNX
engines are timed in turn (bench/harness.py's time_interleaved). Reports the median and p95 of repeats after warm-up,
the load/compile time apart, the output error against PyTorch, the step's
FLOPs (bench/flops.py), achieved GFLOP/s and the fraction of this machine's measured MatMul peak
(bench/matmul_peak.py). Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.dit_step [--threads 2] [--repeats 5] [--scenario wan-384x6-1280tok]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..runtime.machine import machine

from .flops import wan_dit_flops
from .harness import (SCENARIOS, build_scenario_model, export_scenario_dit, results_option, save,
                      scenario_options, time_calls, time_interleaved, versions)
from .matmul_peak import best_peak, matmul_peak

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
    cfg, lat, feeds, tokens = sc.dit_config(), sc.latent_shape, sc.dit_inputs(), sc.tokens
    torch.set_num_threads(threads)
    has_bf16 = ov_backend.available() and ov_backend.cpu_info()["bf16"]  # bf16 peers: OpenVINO and PyTorch
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_scenario_model(sc, tmp)
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
        spec = export_scenario_dit(sc, tmp)
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

    flops = wan_dit_flops(cfg, sc.batch, tokens, sc.text_len)
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
    return {"scenario": scenario, "model": sc.model, "config": cfg,
            "shape": {"frames": sc.frames, "height": sc.height, "width": sc.width, "text_len": sc.text_len,
                      "batch": sc.batch, "latents": list(lat), "tokens": tokens},
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
@results_option
def main(scenario, threads, repeats, compile_peer, results):
    r = run(scenario, threads, repeats, compile_peer, log=lambda m: click.echo(m, err=True))
    save("dit_step", scenario, r, to_markdown(r), results)


if __name__ == "__main__":
    main()
