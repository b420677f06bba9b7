"""VAE decode speed on a real Wan VAE configuration (random weights; `--vae wan2.1|wan2.2`): diffusers'
`AutoencoderKLWan.decode`
(PyTorch eager) against the chunked decoder engines on ONNX Runtime fp32 and OpenVINO fp32/bf16, in one run.

Same latents and thread count for every peer; each engine peer decodes once to warm up, then is timed. PSNR of the
frames against PyTorch's. Also reports the decoder's convolution FLOPs, because the decode is convolution-bound:
the achieved GFLOP/s says how far each peer is from this machine's MatMul peak (bench/matmul_peak.py). Writes
bench/results/ (JSON + Markdown).

    python -m soraedge.bench.vae_speed [--vae wan2.1] [--height 128 --width 128 --frames 9] [--threads 2]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..runtime.machine import machine
from ..runtime.validate import latent_grid

from .harness import results_option, save, shape_name, versions


def _conv_flops(vae, z) -> float:
    """Multiply-adds x 2 of every Conv3d in one PyTorch decode of `z`, counted with forward hooks."""
    import torch

    total = [0.0]

    def hook(m, args, out):
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3] * m.weight.shape[4]
        total[0] += 2.0 * out.numel() * k

    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        vae.decode(torch.from_numpy(z), return_dict=False)
    for h in handles:
        h.remove()
    return total[0]


def run(height: int, width: int, frames: int, threads: int, log=print, family: str = "wan2.1") -> dict:
    import torch

    from ..precision.quality_gate import psnr
    from ..runtime.backends import open_engine
    from ..runtime.backends import openvino as ov
    from ..runtime.vae_decode import ChunkedVaeDecoder
    from .matmul_peak import matmul_peak
    from .vae_memory import export_real_vae

    torch.set_num_threads(threads)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-vae-") as tmp:
        tmp = Path(tmp)
        specs, vae = export_real_vae(tmp, height, width, log, family)
        c, s, t = vae.config.z_dim, vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
        z = np.random.default_rng(0).standard_normal((1, c, *latent_grid(frames, height, width, t, s)),
                                                    dtype=np.float32)
        flops = _conv_flops(vae, z)

        def frames01(video):  # [1, 3, F, H, W] in [-1, 1] -> [0, 1]
            return np.clip(video / 2 + 0.5, 0, 1)

        log("PyTorch eager ...")
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = vae.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
        rows["pytorch-eager-fp32"] = {"seconds": time.perf_counter() - t0}
        peers = [("ort", "fp32")]
        if ov.available():
            peers += [("openvino", "fp32")] + ([("openvino", "bf16")] if ov.cpu_info()["bf16"] else [])
        for backend, precision in peers:
            log(f"{backend} {precision} ...")
            decoder = ChunkedVaeDecoder(*(open_engine(backend, tmp / f"{s.name}.onnx", s, threads, precision,
                                                      static_shapes=True) for s in specs))
            decoder(z)  # warm-up (and OpenVINO's compilation)
            t0 = time.perf_counter()
            got = decoder(z)
            rows[f"{backend}-{precision}"] = {"seconds": time.perf_counter() - t0,
                                              "psnr_db_vs_pytorch": psnr(frames01(got), frames01(ref))}
    peak = matmul_peak(threads)
    for row in rows.values():
        row["speedup_vs_pytorch"] = rows["pytorch-eager-fp32"]["seconds"] / row["seconds"]
        row["conv_gflops"] = flops / row["seconds"] / 1e9
    described = {"wan2.1": "the Wan2.1 VAE configuration (AutoencoderKLWan's defaults: base_dim 96, dim_mult "
                            "[1,2,4,4])",
                 "wan2.2": "the Wan2.2 VAE configuration (z_dim 48, decoder 256 wide, residual blocks, 2x2 patch, 16x "
                           "spatial)"}[family]
    return {"vae": f"{described}, random weights", "height": height, "width": width, "frames": frames,
            "latent_shape": list(z.shape),
            "threads": threads, "conv_gflop": flops / 1e9, "matmul_peak_gflops": peak, "machine": machine(),
            "versions": versions(), "rows": rows}


def to_markdown(r: dict) -> str:
    lines = [f"### VAE decode: {r['vae']}", "",
             f"{r['machine']['cpu']}, {r['threads']} threads; {r['frames']} frames {r['width']}x{r['height']} "
             f"(latents {r['latent_shape']}); {r['conv_gflop']:.0f} GFLOP of convolutions per decode; MatMul peak "
             + ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_peak_gflops"].items()) + " GFLOP/s", "",
             "| peer | seconds | vs PyTorch | conv GFLOP/s | PSNR vs PyTorch dB |", "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        p = f"{row['psnr_db_vs_pytorch']:.1f}" if "psnr_db_vs_pytorch" in row else "reference"
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['speedup_vs_pytorch']:.2f}x | {row['conv_gflops']:.0f} "
                     f"| {p} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--vae", "family", type=click.Choice(["wan2.1", "wan2.2"]), default="wan2.1", show_default=True)
@click.option("--height", default=128, show_default=True)
@click.option("--width", default=128, show_default=True)
@click.option("--frames", default=9, show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@results_option
def main(family, height, width, frames, threads, results):
    r = run(height, width, frames, threads, log=lambda m: click.echo(m, err=True), family=family)
    save("vae_speed", shape_name(f"{family}-vae", frames, height, width), r, to_markdown(r), results)


if __name__ == "__main__":
    main()
