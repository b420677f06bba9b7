"""Per-component precision: what each component may be stored as, its fp32 islands, and the conversion pass.

Precision lives in the ONNX graph (FP16 casts, INT8 Q/DQ, weight-only MatMulNBits, the int8-dynamic DiT's
DequantizeLinear weights), never in builder flags, so one file serves ONNX Runtime and TensorRT alike (the
int8-dynamic DiT is a CPU precision: precision/int8_dynamic.py). `--precision` is the default for every component; a
component that does not offer it falls back to fp32 with the reason recorded (and an explicit per-component request
that it cannot honour is refused). `bf16` is different: the graphs stay fp32 and OpenVINO executes them in bf16.
`auto` (the default) also keeps the graphs fp32 and leaves the execution precision to the target build
(target/choose.py's `choose`, then the quality gate: target/gated_choice.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..runtime.choices import AUTO, PRECISION_REQUESTS, Execution, Graph
from ..runtime.errors import SoraError
from ..runtime.safe_files import link_or_copy

COMPONENTS = ("transformer", "text_encoder", "vae")
EXECUTION = (AUTO, Execution.BF16)  # --precision values that are execution precisions over fp32 graphs
OFFERED = {"transformer": (Graph.FP32, Graph.FP16, Graph.INT8, Graph.INT8_DYNAMIC),
           "text_encoder": (Graph.FP32, Graph.INT8, Graph.INT4), "vae": (Graph.FP32, Graph.FP16)}
WHY_NOT = {
    ("text_encoder", "fp16"): "umT5's feed-forward outputs overflow fp16 (transformers keeps its `wo` layers in fp32 "
                              "and clamps hidden states for this reason); weight-only int8/int4 saves more memory "
                              "and keeps fp32 arithmetic",
    ("vae", "int8"): "an 8-bit video VAE decoder bands smooth gradients, and the decoder runs once per video; "
                     "use fp16 for its memory",
    ("vae", "int4"): "weight-only int4 is for the text encoder's memory",
    ("transformer", "int4"): "weight-only int4 helps memory-bound models; a DiT step is compute-bound",
    ("text_encoder", "int8-dynamic"): "the text encoder runs once per prompt: its weight-only int8/int4 saves the "
                                      "same memory",
    ("vae", "int8-dynamic"): "int8-dynamic quantizes linear layers; the VAE decoder is convolutions",
}
# FP16 islands: op types and module prefixes kept in fp32, per component. Normalisations and softmax (overflow in
# sums of squares and exponentials), sin/cos of the timestep and RoPE (argument precision), the timestep
# embedder and the final projection (the model's output scale).
FP16_ISLANDS = {
    "transformer": (("LayerNormalization", "RMSNormalization", "Softmax", "Sin", "Cos", "ReduceMean", "Pow", "Sqrt"),
                    ("rope", "condition_embedder.timesteps_proj", "condition_embedder.time_embedder",
                     "condition_embedder.time_proj", "norm_out", "proj_out")),
    # Wan's RMS_norm exports as ReduceL2 -> Clip -> Div: the sum of squares overflows fp16 first.
    "vae": (("ReduceL2", "Clip", "Div", "Softmax"), ("norm_out", "conv_out")),
}
DEFAULT_MIN_PSNR = {"int8": 30.0, "int8-dynamic": 30.0, "int4": 30.0, "bf16": 30.0, "fp16": 40.0}


def component_of(engine: str) -> str:
    """The component whose precision an engine takes: Wan2.2's second expert is a transformer."""
    return "vae" if engine.startswith("vae_") else "transformer" if engine.startswith("transformer") else engine


def plan_precision(default: str, overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """({component: graph precision}, {component: why it differs from the default})."""
    if default not in PRECISION_REQUESTS:
        raise SoraError(f"precision {default!r} unknown (known: {', '.join(PRECISION_REQUESTS)})")
    graph_default = Graph.FP32 if default in EXECUTION else Graph(default)
    plan, notes = {}, {}
    for c in COMPONENTS:
        asked = overrides.get(c)
        if asked is not None and asked not in OFFERED[c]:
            why = WHY_NOT.get((c, asked), "")
            raise SoraError(f"{c} cannot be {asked} (offered: {', '.join(OFFERED[c])})" + (f": {why}" if why else ""))
        if asked is None and graph_default not in OFFERED[c]:
            plan[c] = Graph.FP32
            notes[c] = f"{graph_default} not offered: {WHY_NOT[(c, graph_default)]}"
        else:
            plan[c] = Graph(asked) if asked else graph_default
    for c in overrides:
        if c not in COMPONENTS:
            raise SoraError(f"unknown component {c!r} (known: {', '.join(COMPONENTS)})")
    return plan, notes


# Host bytes per parameter of a graph precision: what a component's weights take when it runs (weight-only int8
# and int4 add one fp32 scale per block of 32).
WEIGHT_BYTES = {Graph.FP32: 4.0, Graph.FP16: 2.0, Graph.INT8: 1.125, Graph.INT8_DYNAMIC: 1.0, Graph.INT4: 0.625}
# A component runs where its weights take at most this share of the available memory: the runtime's own buffers,
# the activations and the process need the rest (a 21.2 GiB umT5-XXL within 21.5 GiB available does not run).
RUN_FRACTION = 0.8


def runs_in(weight_bytes: float, available: int | None) -> bool:
    """Whether weights of this size run within `available` bytes (None: unknown, assumed yes)."""
    return available is None or weight_bytes <= RUN_FRACTION * available


def fit_to_memory(plan: dict[str, str], notes: dict[str, str], params: dict[str, int], available: int | None,
                  default: str, overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """With `--precision auto`, a text encoder whose fp32 weights alone exceed the `available` bytes of the machine
    that runs it (umT5-XXL: 22.8 GB) is planned weight-only int8 instead (a quarter of it), unless the user chose
    its precision. Returns (plan, notes, {component: precision chosen for memory}); the export then holds that
    component at that precision from the start (export/build.py), since its fp32 graph cannot run here."""
    te = "text_encoder"
    need = WEIGHT_BYTES[Graph.FP32] * params[te]
    if default != AUTO or te in overrides or plan[te] != Graph.FP32 or runs_in(need, available):
        return plan, notes, {}
    return ({**plan, te: Graph.INT8},
            {**notes, te: f"weight-only int8: its fp32 weights ({need / 2**30:.1f} GiB) do not run within this "
                          f"machine's {available / 2**30:.1f} GiB of available memory"}, {te: Graph.INT8})


def stream_fp16(plan: dict[str, str], params: dict[str, int], available: int | None) -> tuple[dict, dict]:
    """({component: fp16}, {component: why}) for each component planned fp16 whose fp32 weights do not run within
    `available` bytes: its graph is written in fp16 as its weights stream from the checkpoint (precision/fp16.py),
    never in fp32. An fp32 graph would only be the reference of a gate that cannot run it here, and would cost the
    disk twice the checkpoint (Wan2.1-14B's DiT: 57 GB). The export checks it against PyTorch in fp16 instead."""
    held, notes = {}, {}
    for c, p in plan.items():
        need = WEIGHT_BYTES[Graph.FP32] * max((n for k, n in params.items() if component_of(k) == c), default=0)
        if p == Graph.FP16 and not runs_in(need, available):
            held[c] = Graph.FP16
            notes[c] = (f"fp16, written as its weights stream from the checkpoint: its fp32 weights ({need / 2**30:.1f}"
                        f" GiB) do not run within this machine's {available / 2**30:.1f} GiB of available memory")
    return held, notes


def execution_of(default: str) -> str:
    """The execution precision a --precision value asks for: bf16, auto (decided at the target build) or fp32."""
    return default if default in EXECUTION else Execution.FP32


def default_min_psnr(plan: dict[str, str], execution: str) -> float:
    """The gate's threshold: the loosest precision in use decides (30 dB with any 8-bit or bf16, else 40 dB).
    `execution` is the precision the target runs (fp32 or bf16), not `auto`."""
    used = set(plan.values()) | {execution}
    return min((DEFAULT_MIN_PSNR[p] for p in used if p in DEFAULT_MIN_PSNR), default=DEFAULT_MIN_PSNR["fp16"])


def convert_engines(ref: Path, stage: Path, engines: dict, plan: dict[str, str],
                    dit_int8: Callable[[str, Path, Path], dict], log: Callable[[str], None]) -> dict[str, dict]:
    """Write each engine of the fp32 export `ref` into `stage` at its component's precision.

    `dit_int8(name, src, dst)` builds the INT8 DiT `name` (it needs calibration data, see export/build.py). Returns
    {engine: {"precision": ..., "detail": summary of the pass}} for the manifest.
    """
    from .fp16 import convert_fp16
    from .int8_dynamic import quantize_linear_weights
    from .weight_only import quantize_weights

    out = {}
    for name, entry in engines.items():
        comp = component_of(name)
        p = plan.get(comp, Graph.FP32)  # the step-cache probe stays fp32: it is tiny and decides what is skipped
        src, dst = ref / entry["file"], stage / entry["file"]
        if p == entry.get("precision", Graph.FP32):  # the reference already holds it so (fp32, or fit_to_memory's)
            for f in (src, src.with_name(src.name + ".data")):
                if f.exists():
                    link_or_copy(f, stage / f.name)
            out[name] = {k: v for k, v in entry.items() if k in ("precision", "detail")} or {"precision": p}
            continue
        log(f"  {name}: {p} ...")
        if p == Graph.FP16:
            detail = convert_fp16(src, dst, *FP16_ISLANDS[comp])
        elif p == Graph.INT8_DYNAMIC:  # its linears outside the FP16 islands' modules; no calibration
            detail = quantize_linear_weights(src, dst, FP16_ISLANDS[comp][1])
        elif comp == "text_encoder":
            detail = quantize_weights(src, dst, p)
        else:
            detail = dit_int8(name, src, dst)
        out[name] = {"precision": p, "detail": detail}
    return out
