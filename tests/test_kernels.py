"""The Triton attention kernels against an exact float64 softmax-attention reference.

Without a CUDA GPU the kernels run under TRITON_INTERPRET=1 (set here, before the kernels are defined) on small
shapes with ragged tile edges, fp16 and int8. bf16 runs on a GPU only: the interpreter's bf16 `tl.dot` returns
garbage in triton 3.9, and casting the operands to fp32 to please it would test a different kernel. On a GPU the
same tests also run at Wan's size (12 heads of 128, 4K tokens). Every output buffer is poisoned with NaN first.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (the `kernels` extra)")

from soraedge.fused_attention.flash_attention import flash_attention  # noqa: E402
from soraedge.fused_attention.int8_attention import int8_attention  # noqa: E402
from soraedge.fused_attention.reference import accuracy, attention_reference  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the Triton interpreter's bf16 dot is wrong)")

# (B, H, L, S, D): ragged edges against the 32-row interpreter tile and the 64/128-row GPU tiles.
SMALL_SHAPES = [(1, 2, 100, 77, 64), (2, 1, 33, 130, 128), (1, 1, 64, 64, 64)]
WAN_SHAPE = (2, 12, 4096, 4096, 128)

# Bounds per kernel and dtype, against the float64 reference.
BOUNDS = {
    ("flash", torch.float16): dict(cosine=0.99999, max_abs=4e-3),
    ("flash", torch.bfloat16): dict(cosine=0.9999, max_abs=3e-2),
    ("int8", torch.float16): dict(cosine=0.999, rel_l2=0.05),
    ("int8", torch.bfloat16): dict(cosine=0.999, rel_l2=0.05),
}
KERNELS = {"flash": flash_attention, "int8": int8_attention}


def make_inputs(shape, dtype, layout: str, seed: int = 0):
    """Fresh random q/k/v [B, H, L, D] (keys offset by a shared vector, as DiT keys are); BLHD as views."""
    b, h, length, keys, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, length, h, d, generator=gen)
    k = torch.randn(b, keys, h, d, generator=gen) + 3 * torch.randn(d, generator=gen)
    v = torch.randn(b, keys, h, d, generator=gen)
    tensors = [t.to(DEVICE, dtype) for t in (q, k, v)]
    if layout == "bhld":
        return [t.transpose(1, 2).contiguous() for t in tensors]
    return [t.transpose(1, 2) for t in tensors]  # [B, H, L, D] views of [B, L, H, D] buffers


def poisoned_output(q):
    b, h, length, d = q.shape
    return torch.full((b, length, h, d), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)


def check(kernel: str, shape, dtype, layout: str):
    q, k, v = make_inputs(shape, dtype, layout)
    out = KERNELS[kernel](q, k, v, out=poisoned_output(q))
    assert not torch.isnan(out).any(), "part of the output was never written"
    ref = attention_reference(q, k, v, dtype=torch.float64 if DEVICE == "cpu" else torch.float32)
    got = accuracy(out, ref)
    bound = BOUNDS[(kernel, dtype)]
    assert got["cosine"] >= bound["cosine"], got
    for key in ("max_abs", "rel_l2"):
        if key in bound:
            assert got[key] <= bound[key], got


@pytest.mark.parametrize("kernel", ["flash", "int8"])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_fp16_inputs_match_reference(kernel, shape, layout):
    check(kernel, shape, torch.float16, layout)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "int8"])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_bf16_inputs_match_reference(kernel, shape):
    check(kernel, shape, torch.bfloat16, "blhd")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wan_size_matches_reference(kernel, dtype):
    check(kernel, WAN_SHAPE, dtype, "blhd")


@pytest.mark.parametrize("kernel", ["flash", "int8"])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_tensorrt_plugin_kernels_match_reference(kernel, shape):
    """The kernels the TensorRT plugins launch (fused_attention/trt_plugin.py): contiguous [B, L, H, D] tensors,
    L/S/H as int32 arguments between the inputs and the output, head dim and scale as compile-time constants."""
    import math

    import triton

    from soraedge.fused_attention import attention_core
    from soraedge.fused_attention.attention_core import LOG2_E

    b, h, length, keys, d = shape
    q, k, v = make_inputs(shape, torch.float16, "blhd")  # [B, H, L, D] views of [B, L, H, D] buffers
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # what TensorRT hands the plugin
    out = torch.full_like(qb, float("nan"))
    tile = 64 if HAS_CUDA else 32
    fn = {"flash": attention_core.flash_attention_blhd, "int8": attention_core.int8_attention_blhd}[kernel]
    fn[(triton.cdiv(length, tile), b * h)](
        qb, kb, vb, length, keys, h, out, HEAD_DIM=d, QK_SCALE=LOG2_E / math.sqrt(d), BLOCK_M=tile, BLOCK_N=tile)
    assert not torch.isnan(out).any(), "part of the output was never written"
    ref = attention_reference(q, k, v, dtype=torch.float64 if DEVICE == "cpu" else torch.float32)
    got = accuracy(out.transpose(1, 2), ref)
    bound = BOUNDS[(kernel, torch.float16)]
    assert got["cosine"] >= bound["cosine"], got
    for key in ("max_abs", "rel_l2"):
        if key in bound:
            assert got[key] <= bound[key], got


def test_mean_subtraction_is_what_keeps_int8_keys_accurate():
    """Control: on strongly offset keys, the same int8 grid without K's mean removed misses the bound."""
    q, k, v = make_inputs((1, 2, 64, 128, 64), torch.float16, "blhd", seed=1)
    k = k + 20 * torch.randn(k.shape[-1], generator=torch.Generator().manual_seed(2)).to(k)
    ref = attention_reference(q, k, v)
    centered = accuracy(int8_attention(q, k, v), ref)
    raw = accuracy(int8_attention(q, k, v, center_keys=False), ref)
    assert centered["cosine"] >= BOUNDS[("int8", torch.float16)]["cosine"], centered
    assert raw["rel_l2"] > 3 * centered["rel_l2"], (raw, centered)


@pytest.mark.parametrize("bad, message", [
    (dict(d=96), "head dim 96"),
    (dict(dtype=torch.float32), "expected one of"),
])
def test_unsupported_inputs_say_why(bad, message):
    d, dtype = bad.get("d", 64), bad.get("dtype", torch.float16)
    q = torch.zeros(1, 1, 8, d, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, q, q)
