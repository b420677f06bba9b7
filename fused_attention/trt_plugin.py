"""The fused attentions as TensorRT plugins: Triton's flash attention and INT8 attention compiled ahead of time,
so an engine needs no Python at run time.

Two halves:
- `compile_attention` (triton only; no torch, no TensorRT, no GPU needed) compiles `attention_core`'s
  `flash_attention_blhd` or `int8_attention_blhd` to PTX for one GPU architecture, dtype, head dim and tile. It returns the kernel name, the PTX, the threads per
  block, the shared memory and the grid as a function of (B, L, H). The tests compile it for sm_90 and sm_87 on
  the CPU machine.
- `register_plugins` (TensorRT >= 10.9) registers "soraedge::flash_attention" and "soraedge::int8_attention" with
  `tensorrt.plugin`:
  - `@trtp.register` describes the output (like q: [B, L, H, D]);
  - `@trtp.autotune` advertises fp16 and bf16 with one tactic per tile configuration; TensorRT times them while
    it builds and keeps the fastest;
  - `@trtp.aot_impl` returns the compiled kernel for the tactic asked for, with L, S and H as symbolic int32
    arguments.

  The API is documented at https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/pluginGuide.html
  (ahead-of-time implementations need TensorRT 10.9 or newer).

Triton >= 3.3 appends two hidden pointer parameters to every kernel: a global scratch buffer and a profiler buffer.
TensorRT's launch passes only inputs, scalars and outputs. `strip_hidden_params` removes the two declarations from
the PTX entry, and refuses when the kernel actually uses them (scratch size > 0).

`tensorrt.plugin` validates the decorated functions by their annotations at registration (`issubclass` on each
parameter's, a `tuple[...]` of four for `aot_impl`'s return), so this module keeps its annotations evaluated: it
has no `from __future__ import annotations`, and `plugin_functions` builds the three functions with the real
classes of the module it is given. Registering again in one process only re-points the kernels at the new
architecture: `tensorrt.plugin` refuses a second definition of a name.

Not verified on TensorRT: TensorRT cannot be installed on this project's machines (docs/verification.md).
"""

import math
import re
from dataclasses import dataclass

from .attention_core import LOG2_E

NAMESPACE = "soraedge"
FLASH, INT8 = "flash_attention", "int8_attention"
KERNELS = {FLASH: "flash_attention_blhd", INT8: "int8_attention_blhd"}  # plugin name -> attention_core kernel
SCALARS = ("L", "S", "H")  # int32 arguments between the tensor inputs and the output, in the kernel's order
# Tactics: index -> tile. Tactic 0 is never used (TensorRT reserves it), so the list starts at 1.
TILES = {1: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
         2: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
         3: dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
         4: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)}
DTYPES = {"fp16": "*fp16", "bf16": "*bf16"}


@dataclass(frozen=True)
class CompiledAttention:
    name: str
    ptx: bytes
    threads: int  # per block
    shared_mem: int  # bytes of dynamic shared memory
    block_m: int

    def grid(self, batch, length, heads):
        """(x, y) blocks for [B, L, H, D] queries; works on ints and on TensorRT's symbolic shape expressions."""
        return (length + self.block_m - 1) // self.block_m, batch * heads


def strip_hidden_params(ptx: str, name: str, keep: int) -> str:
    """Drop the entry parameters after the first `keep` (Triton's scratch pointers) if the body never reads them."""
    params = re.findall(rf"\.param [^\n]*?({re.escape(name)}_param_(\d+))", ptx)
    extra = [p for p, i in params if int(i) >= keep]
    for p in extra:
        if re.search(rf"\[{p}\]", ptx):
            raise ValueError(f"{name} reads its hidden parameter {p}: it needs scratch memory a TensorRT plugin "
                             f"launch does not pass")
    lines = [ln for ln in ptx.splitlines(keepends=True) if not any(re.search(rf"\b{p}\b", ln) for p in extra)]
    out = "".join(lines)
    # the last remaining parameter declaration must not end with a comma
    last = rf"({re.escape(name)}_param_{keep - 1}),\n(\s*\))"
    return re.sub(last, r"\1\n\2", out)


def compile_attention(dtype: str, head_dim: int, tactic: int, arch: tuple[int, int], plugin: str = FLASH
                      ) -> CompiledAttention:
    """PTX of a plugin's kernel for sm_{arch}, dtype "fp16"|"bf16", head dim 64|128 and tile TILES[tactic]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import attention_core

    if plugin not in KERNELS or dtype not in DTYPES or head_dim not in (64, 128) or tactic not in TILES:
        raise ValueError(f"no {plugin} kernel for {dtype}, head dim {head_dim}, tactic {tactic}")
    if not hasattr(getattr(attention_core, KERNELS[plugin]), "cache_key"):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1, which cannot compile to PTX; compile "
                           "in a process without it")
    tile = TILES[tactic]
    ptr = DTYPES[dtype]
    constants = {"HEAD_DIM": head_dim, "QK_SCALE": LOG2_E / math.sqrt(head_dim), "BLOCK_M": tile["BLOCK_M"],
                 "BLOCK_N": tile["BLOCK_N"]}
    signature = {"Q": ptr, "K": ptr, "V": ptr, **{s: "i32" for s in SCALARS}, "O": ptr,
                 **{c: "constexpr" for c in constants}}
    src = ASTSource(fn=getattr(attention_core, KERNELS[plugin]), signature=signature, constexprs=constants)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch[0] * 10 + arch[1], 32),
                            options={"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
    md = kernel.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise ValueError(f"{md.name} needs scratch memory, which a TensorRT plugin launch does not pass")
    ptx = strip_hidden_params(kernel.asm["ptx"], md.name, keep=4 + len(SCALARS))
    return CompiledAttention(md.name, ptx.encode(), md.num_warps * 32, md.shared, tile["BLOCK_M"])


# plugin name -> the architecture its kernels compile for; read when TensorRT asks for a kernel, so registering
# again for another GPU in the same process re-points the plugin instead of defining it twice
_ARCH: dict[str, tuple[int, int]] = {}


def register_plugins(arch: tuple[int, int]) -> None:
    """Register both plugins with TensorRT's plugin registry, their kernels compiled for sm_{arch} (the build GPU)."""
    import tensorrt.plugin as trtp

    for plugin in KERNELS:
        if plugin not in _ARCH:
            desc, autotune, aot = plugin_functions(trtp, plugin)
            plugin_id = f"{NAMESPACE}::{plugin}"
            trtp.register(plugin_id)(desc)
            trtp.autotune(plugin_id)(autotune)
            trtp.aot_impl(plugin_id)(aot)
        _ARCH[plugin] = arch  # read when TensorRT asks for the kernel, at build time


def constant_value(expr) -> int:
    """A build-time constant dimension of a `tensorrt.plugin` shape expression (a property in some releases, a
    method in others)."""
    if not expr.is_constant:
        raise ValueError("the attention plugin needs a static head dimension")
    value = expr.constant_value
    return int(value() if callable(value) else value)


def plugin_functions(trtp, plugin: str):
    """The register, autotune and aot_impl functions of one plugin, annotated with `trtp`'s classes as
    `tensorrt.plugin`'s validator requires."""
    TensorDesc, Combination = trtp.TensorDesc, trtp.AutoTuneCombination  # noqa: N806 (class aliases)
    LaunchParams, SymIntExprs = trtp.KernelLaunchParams, trtp.SymIntExprs  # noqa: N806

    def desc(q: TensorDesc, k: TensorDesc, v: TensorDesc) -> TensorDesc:
        return q.like()  # [B, L, H, D], q's dtype

    def autotune(q: TensorDesc, k: TensorDesc, v: TensorDesc, outputs: tuple[TensorDesc]) -> list[Combination]:
        combos = []
        for t in ("FP16", "BF16"):
            c = Combination(", ".join([t] * 4), "LINEAR")
            c.tactics(list(TILES))
            combos.append(c)
        return combos

    def aot(q: TensorDesc, k: TensorDesc, v: TensorDesc, outputs: tuple[TensorDesc], tactic: int
            ) -> tuple[bytes, bytes, LaunchParams, SymIntExprs]:
        import tensorrt as trt

        dtype = {trt.float16: "fp16", trt.bfloat16: "bf16"}[q.dtype]
        compiled = compile_attention(dtype, constant_value(q.shape_expr[3]), tactic, _ARCH[plugin], plugin)
        batch, length, heads = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = LaunchParams()
        launch.grid_x = trtp.cdiv(length, compiled.block_m)
        launch.grid_y = batch * heads
        launch.block_x = compiled.threads
        launch.shared_mem = compiled.shared_mem
        scalars = SymIntExprs(len(SCALARS))
        for i, e in enumerate((length, k.shape_expr[1], heads)):  # L, S, H: SCALARS' order
            scalars[i] = trtp.SymInt32(e)
        return compiled.name.encode(), compiled.ptx, launch, scalars

    return desc, autotune, aot
