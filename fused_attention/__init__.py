"""Fused attention kernels in Triton and their exact reference.

- `flash_attention.py`: fp16/bf16 flash attention forward (online softmax, fp32 accumulation).
- `int8_attention.py`: SageAttention-style INT8 Q·Kᵀ (keys centred, per-block scales) with fp16 P·V.
- `reference.py`: float64/float32 softmax attention and the accuracy measures the tests and bench use.
- `tiles.py`: the autotuned tile configurations (one small tile under TRITON_INTERPRET=1).

Importing this package does not import triton or torch; the runtime never imports it. The kernels need a CUDA
GPU for speed; `TRITON_INTERPRET=1` runs them on the CPU for the correctness tests.
"""
