"""DiT step on a GPU, side by side in one run: PyTorch eager bf16 (SDPA, flash backend) against ONNX Runtime CUDA
fp16 (IO binding; with and without a CUDA graph). Same weights, same inputs, same GPU.

The real Wan2.1-T2V-1.3B transformer configuration with random weights (seed 0), CFG batch of 2, 512 text tokens, at
480x832x81 (32,760 tokens: where the matrix multiplies dominate) and 256x256x17 (1,280 tokens: where launch overhead
matters and CUDA graphs pay). The fp16 graph is the one `sora-export --dit-precision fp16` writes (casts with fp32
islands, export/fp16.py). Timings are medians after warm-up; PyTorch is timed with CUDA events, ONNX Runtime by wall
clock around `run_with_iobinding` (which synchronizes). Also reports the GPU's measured fp16 matrix-multiply peak
(torch.matmul 8192^3) and each row's fraction of it (FLOPs from bench/flops.py).

Needs torch with CUDA, diffusers and onnxruntime-gpu on the GPU machine (`pip install -e '.[export]'` and the
onnxruntime-gpu wheel in place of onnxruntime). Not yet run by this project: no GPU was lent while it was written.

    python -m soraedge.bench.gpu_dit_step [--scenario wan1.3b-1280tok] [--repeats 10] [--tag h100]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .dit_step import BASE, build_scenario_model, export_scenario_dit
from .flops import wan_dit_flops
from .report import result_options, save

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096)
SCENARIOS = {"wan1.3b-32760tok": (81, 480, 832), "wan1.3b-1280tok": (17, 256, 256)}  # frames, height, width
TEXT_LEN, BATCH = 512, 2


def _torch_peak_tflops(dtype) -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1000) / 1e12


def _time_torch(model, args, repeats: int) -> tuple[float, np.ndarray]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.inference_mode(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(2):
            out = model(*args, return_dict=False)[0]
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(*args, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return float(np.median(times)), out.float().cpu().numpy()


def _time_ort(path: Path, spec, feeds: dict, repeats: int, cuda_graph: bool) -> tuple[float, np.ndarray, float]:
    from ..runtime.backends.ort_io import OrtIoEngine

    t0 = time.perf_counter()
    engine = OrtIoEngine(path, spec, "cuda", cuda_graph=cuda_graph)
    load_s = time.perf_counter() - t0
    for _ in range(3):  # a CUDA graph is captured during these
        out = engine(**feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine(**feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out, load_s


def run(scenario: str, repeats: int, log=print) -> dict:
    import torch

    from ..export.fp16 import convert_fp16
    from ..export.precision import FP16_ISLANDS
    from ..runtime.cuda_info import gpu, ort_cuda

    frames, height, width = SCENARIOS[scenario]
    cfg = {**BASE, **WAN_1_3B}
    lat = (BATCH, 16, (frames - 1) // 4 + 1, height // 8, width // 8)  # [B, C, f, h, w]
    tokens = lat[2] * lat[3] * lat[4] // 4
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal(lat, dtype=np.float32),
             "timestep": np.full((BATCH,), 900.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((BATCH, TEXT_LEN, cfg["text_dim"]), dtype=np.float32)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log("building and exporting the transformer (CPU) ...")
        model = build_scenario_model(cfg, tmp)
        spec = export_scenario_dit(cfg, TEXT_LEN, lat, tmp)
        convert_fp16(tmp / "dit.onnx", tmp / "dit_fp16.onnx", *FP16_ISLANDS["transformer"])
        log("PyTorch eager bf16, SDPA flash ...")
        model = model.to("cuda", torch.bfloat16)
        args = [torch.from_numpy(feeds["hidden_states"]).to("cuda", torch.bfloat16),
                torch.from_numpy(feeds["timestep"]).to("cuda"),
                torch.from_numpy(feeds["encoder_hidden_states"]).to("cuda", torch.bfloat16)]
        t, ref = _time_torch(model, args, repeats)
        rows["pytorch-eager-bf16-flash"] = {"median_s": t}
        del model, args
        torch.cuda.empty_cache()
        for graph in (False, True):
            name = f"ort-cuda-fp16{'-cuda-graph' if graph else ''}"
            log(f"{name} ...")
            t, out, load_s = _time_ort(tmp / "dit_fp16.onnx", spec, feeds, repeats, graph)
            rows[name] = {"median_s": t, "load_s": load_s,
                          "max_rel_err_vs_pytorch_bf16": float(np.abs(out - ref).max() / np.abs(ref).max())}
    flops = wan_dit_flops(cfg, BATCH, tokens, TEXT_LEN)
    peak = {"fp16": _torch_peak_tflops(torch.float16), "bf16": _torch_peak_tflops(torch.bfloat16)}
    base = rows["pytorch-eager-bf16-flash"]["median_s"]
    for row in rows.values():
        row["tflops"] = flops["total"] / row["median_s"] / 1e12
        row["fraction_of_fp16_peak"] = row["tflops"] / peak["fp16"]
        row["speedup_vs_pytorch"] = base / row["median_s"]
    return {"scenario": scenario, "config": cfg, "tokens": tokens, "latents": list(lat), "text_len": TEXT_LEN,
            "gpu": gpu(), "onnxruntime": ort_cuda(), "torch": torch.__version__, "flops": flops,
            "matmul_peak_tflops": peak, "repeats": repeats, "rows": rows}


def to_markdown(r: dict) -> str:
    g = r["gpu"] or {}
    lines = [f"### DiT step on {g.get('name')}: {r['scenario']} ({r['tokens']} tokens, CFG batch 2)", "",
             f"driver {g.get('driver')}, onnxruntime {r['onnxruntime']['onnxruntime']} (CUDA "
             f"{r['onnxruntime']['cuda']}, cuDNN {r['onnxruntime']['cudnn']}), torch {r['torch']}; "
             f"{r['flops']['total'] / 1e12:.1f} TFLOP per call; matmul peak fp16 "
             f"{r['matmul_peak_tflops']['fp16']:.0f} TFLOP/s", "",
             "| peer | median ms | TFLOP/s | of fp16 peak | vs PyTorch |", "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['median_s'] * 1000:.1f} | {row['tflops']:.0f} | "
                     f"{row['fraction_of_fp16_peak']:.0%} | {row['speedup_vs_pytorch']:.2f}x |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default="wan1.3b-1280tok", show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True)
@result_options("gpu_dit_step", default_tag="gpu")
def main(scenario, repeats, tag, results):
    r = run(scenario, repeats, log=lambda m: click.echo(m, err=True))
    save(results, "gpu_dit_step", f"{tag}-{scenario}", r, to_markdown(r))


if __name__ == "__main__":
    main()
