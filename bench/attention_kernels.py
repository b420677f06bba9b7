"""Attention kernels on a GPU: Triton fp16/bf16 flash and INT8 attention against PyTorch SDPA, in one run.

At Wan shapes (batch 2, 12 heads, head dim 128, 4K to 32K tokens): TFLOP/s (4 * B * H * L * S * D per call) of
PyTorch's SDPA with its flash and cuDNN backends, the Triton fp16 and bf16 kernels, and the Triton INT8 kernel
(its quantization passes included in its time), each timed by triton.testing.do_bench (CUDA events, L2 flushed
between calls, median), autotuning done before timing. Accuracy of every peer against an fp32 reference (TF32
off) on the same inputs: cosine similarity, relative L2 error. Writes bench/results/ (JSON + Markdown) with the
GPU's name, the versions and the ratios to SDPA flash.

Needs a CUDA GPU and triton; on the lent GPU machine (no pip there) run it from the repository root as
    ln -sfn "$PWD" /tmp/soraedge && PYTHONPATH=/tmp python3 -m soraedge.bench.attention_kernels
"""

from __future__ import annotations

import platform
from pathlib import Path

import click

from .harness import results_option, save

TOKENS = (4096, 8192, 16384, 32768)
BATCH, HEADS, HEAD_DIM = 2, 12, 128


def attention_tflops(batch: int, heads: int, queries: int, keys: int, head_dim: int, seconds: float) -> float:
    """Two matmuls of 2 * L * S * D FLOPs each per (batch, head); softmax not counted."""
    return 4 * batch * heads * queries * keys * head_dim / seconds / 1e12


def peers(torch):
    """name -> (input dtype, callable(q, k, v) on [B, H, L, D] views of [B, L, H, D] buffers)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from ..fused_attention.flash_attention import flash_attention
    from ..fused_attention.int8_attention import int8_attention

    def sdpa_with(backend):
        def call(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        return call

    return {
        "sdpa-flash fp16": (torch.float16, sdpa_with(SDPBackend.FLASH_ATTENTION)),
        "sdpa-cudnn fp16": (torch.float16, sdpa_with(SDPBackend.CUDNN_ATTENTION)),
        "triton fp16": (torch.float16, flash_attention),
        "triton bf16": (torch.bfloat16, flash_attention),
        "triton int8 (QK int8, PV fp16)": (torch.float16, int8_attention),
        "sdpa-flash bf16": (torch.bfloat16, sdpa_with(SDPBackend.FLASH_ATTENTION)),
    }


def run(tokens, log=print) -> dict:
    import torch
    import triton
    from triton.testing import do_bench

    from ..fused_attention.reference import accuracy, attention_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for n in tokens:
        gen = torch.Generator(device="cuda").manual_seed(n)
        shape = (BATCH, n, HEADS, HEAD_DIM)  # [B, L, H, D], the exported graphs' projection layout
        base = [torch.randn(shape, device="cuda", generator=gen) for _ in range(3)]
        base[1] += 3 * torch.randn(HEAD_DIM, device="cuda", generator=gen)  # DiT keys share an offset
        ref = attention_reference(*(t.transpose(1, 2) for t in base), dtype=torch.float32, query_chunk=1024)
        for name, (dtype, call) in peers(torch).items():
            q, k, v = (t.to(dtype).transpose(1, 2) for t in base)
            try:
                out = call(q, k, v)
                seconds = do_bench(lambda: call(q, k, v), warmup=50, rep=300) / 1e3
            except RuntimeError as err:  # e.g. a backend this GPU or build lacks
                log(f"{n:>6} tokens  {name:<32} unavailable: {str(err).splitlines()[0]}")
                rows.append({"tokens": n, "peer": name, "unavailable": str(err).splitlines()[0]})
                continue
            acc = accuracy(out.float(), ref)
            row = {"tokens": n, "peer": name, "ms": seconds * 1e3,
                   "tflops": attention_tflops(BATCH, HEADS, n, n, HEAD_DIM, seconds), **acc}
            rows.append(row)
            log(f"{n:>6} tokens  {name:<32} {row['ms']:8.3f} ms  {row['tflops']:6.1f} TFLOP/s  "
                f"cos {acc['cosine']:.6f}")
            del out
        del base, ref
        torch.cuda.empty_cache()
    for r in rows:
        flash = next((f for f in rows if f["tokens"] == r["tokens"] and f["peer"] == "sdpa-flash fp16"), None)
        if "ms" in r and flash and "ms" in flash:
            r["vs_sdpa_flash_fp16"] = flash["ms"] / r["ms"]
    props = torch.cuda.get_device_properties(0)
    return {
        "machine": {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                    "host": platform.node()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "tokens": list(tokens)},
        "timing": "triton.testing.do_bench median, L2 flushed, after autotune",
        "reference": "fp32 softmax attention, TF32 off",
        "rows": rows,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Attention kernels on {m['gpu']} (sm_{m['compute_capability'].replace('.', '')})", "",
             f"batch {BATCH}, {HEADS} heads, head dim {HEAD_DIM}, self-attention; {result['timing']}; "
             f"versions {result['versions']}", "",
             "| tokens | peer | ms | TFLOP/s | vs SDPA flash fp16 | cosine vs fp32 | rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['tokens']} | {r['peer']} | unavailable | | | | |")
            continue
        lines.append(f"| {r['tokens']} | {r['peer']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                     f"{r.get('vs_sdpa_flash_fp16', float('nan')):.2f}x | {r['cosine']:.6f} | {r['rel_l2']:.2e} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--tokens", default=",".join(map(str, TOKENS)), show_default=True, help="Comma-separated.")
@results_option
def main(tokens: str, results: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        raise click.ClickException("the attention kernel bench needs a CUDA GPU (the CPU tests cover correctness)")
    result = run(tuple(int(t) for t in tokens.split(",")))
    save("attention_kernels", "wan-1.3b-heads", result, markdown(result), results)


if __name__ == "__main__":
    main()
