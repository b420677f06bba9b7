"""Native TensorRT engines from the precision-carrying ONNX: what each TensorRT version can take, the builder
configuration as data, and the build itself.

- `capabilities(version)`: TensorRT 10.3 (JetPack 6, Orin), 10.13+ (JetPack 7) and 11.x (desktop) differ in what
  they parse and offer. Before 10.14 the ONNX `Attention` op does not parse: those versions build from the
  decomposed-attention export (MatMul-Softmax-MatMul), which TensorRT fuses itself, or from the plugin graph where
  no `Attention` node is left. Ahead-of-time plugins need 10.9.
- `builder_plan(spec, settings, version)`: everything the builder is told, as plain data, so tests check it without
  TensorRT. The network is strongly typed: precision comes from the graph's casts and Q/DQ nodes, never from
  builder flags. TensorRT 11 removed the FP16/INT8 flags and the calibrators, and nothing here sets them (or the
  explicit-batch flag, which 10.x no longer needs). The optimization profile is the engine spec's min/opt/max
  (`EngineSpec.trt_profile`). The plan also carries the workspace and tactic-memory limits (engine builds on Jetson
  run out of unified memory), the builder optimization level, optional version- and hardware-compatible builds,
  and a refittable DiT (`REFIT`: LoRAs applied to the plan at load by runtime/backends/trt.py's `refit`).
- `build_engine(onnx, plan, timing_cache)`: parses the ONNX from its file (so external weights load), applies the
  plan, and builds. The timing cache is read from and written back to the engine directory, one file per GPU model
  and TensorRT version; a cache TensorRT rejects is replaced, not silently ignored.

API references (TensorRT Python API, 10.x/11.x):
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html,
.../Graph/Network.html (NetworkDefinitionCreationFlag.STRONGLY_TYPED, 10.0+), .../Parsers/Onnx/pyOnnx.html
(OnnxParser.parse_from_file). Not run on TensorRT by this project: TensorRT cannot be installed on its machines.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..runtime.errors import SoraError
from ..runtime.experts import HIGH
from ..runtime.spec import EngineSpec

OLDEST = (10, 3)  # JetPack 6's TensorRT
# Builder switches that must never appear: precision belongs to the graph (TensorRT 11 removed these), and
# explicit batch is implied since 10.0.
FORBIDDEN_FLAGS = frozenset({"FP16", "BF16", "INT8", "FP8", "INT4", "STRICT_TYPES", "OBEY_PRECISION_CONSTRAINTS",
                             "PREFER_PRECISION_CONSTRAINTS", "EXPLICIT_BATCH"})


def parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if not m:
        raise SoraError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR")
    return int(m.group(1)), int(m.group(2))


def capabilities(version: str) -> dict:
    """What this TensorRT version parses and offers, as the export and build decide from it."""
    v = parse_version(version)
    if v < OLDEST:
        raise SoraError(f"TensorRT {version} is older than {OLDEST[0]}.{OLDEST[1]} (JetPack 6), the oldest supported")
    return {"version": f"{v[0]}.{v[1]}", "onnx_attention": v >= (10, 14), "aot_plugins": v >= (10, 9)}


def attention_graph(version: str, attention: str, exported_form: str | None = None) -> str:
    """Which ONNX form the DiT must be exported in for `attention` (native|plugin|int8) on this TensorRT version:
    "onnx-attention" or "decomposed". With `exported_form` (a two-step build), refuse a graph that cannot work."""
    caps = capabilities(version)
    if attention in ("plugin", "int8"):
        if not caps["aot_plugins"]:
            raise SoraError(f"--attention {attention} needs TensorRT 10.9 or newer (ahead-of-time plugins); this is "
                            f"{version}: use --attention native")
        need = "onnx-attention"  # the pass replaces every Attention node, so the parser never sees one
    else:
        need = "onnx-attention" if caps["onnx_attention"] else "decomposed"
    if exported_form is not None and exported_form != need and not (attention == "native" and exported_form
                                                                     == "decomposed"):
        raise SoraError(f"these engines were exported with --attention {exported_form}; TensorRT {version} with "
                        f"--attention {attention} needs the {need} form: re-export the ONNX with --attention {need}")
    return need


@dataclass(frozen=True)
class BuildSettings:
    workspace_mb: int | None = None  # None: TensorRT's default (the device's memory)
    tactic_memory_mb: int | None = None  # tactic DRAM limit (Jetson builds that run out of unified memory)
    optimization_level: int = 3  # 0-5: higher searches more tactics and builds slower
    version_compatible: bool = False  # the plan runs on later TensorRT versions too (lean runtime embedded)
    hardware_compatible: bool = False  # the plan runs on any Ampere or newer GPU (some speed traded away)
    refittable: bool = False  # the DiT's plan takes new weights at load (sora-run --lora, TensorRT's Refitter)

    def to_dict(self) -> dict:
        return asdict(self)


def builder_plan(spec: EngineSpec, settings: BuildSettings, version: str) -> dict:
    """The builder's configuration for one engine, as data (see the module docstring)."""
    capabilities(version)
    if not 0 <= settings.optimization_level <= 5:
        raise SoraError(f"builder optimization level {settings.optimization_level}: TensorRT takes 0 to 5")
    pools = {}
    if settings.workspace_mb:
        pools["WORKSPACE"] = settings.workspace_mb * 2**20
    if settings.tactic_memory_mb:
        pools["TACTIC_DRAM"] = settings.tactic_memory_mb * 2**20
    plan = {
        "network_flags": ["STRONGLY_TYPED"],
        "builder_flags": (["VERSION_COMPATIBLE"] if settings.version_compatible else [])
        + (["REFIT"] if settings.refittable and spec.name == HIGH else []),  # the DiT LoRAs go into
        # TF32 is on by default; an fp32 graph runs in fp32 (precision lives in the graph, not in the builder)
        "cleared_flags": ["TF32"],
        "hardware_compatibility_level": "AMPERE_PLUS" if settings.hardware_compatible else None,
        "memory_pool_limits": pools,
        "optimization_level": settings.optimization_level,
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in spec.trt_profile().items()}],
    }
    assert not FORBIDDEN_FLAGS & set(plan["builder_flags"])
    return plan


def timing_cache_name(gpu: dict, version: str) -> str:
    """One timing cache per GPU model and TensorRT version: tactic timings carry across neither, nor across two
    GPUs of one architecture (an H100 and an H200 are both sm_90 and time differently)."""
    cc = str(gpu.get("compute_capability", "unknown")).replace(".", "")
    model = re.sub(r"[^A-Za-z0-9]+", "-", str(gpu.get("name") or "unknown")).strip("-")
    major, minor = parse_version(version)
    return f"timing-sm{cc}-{model}-trt{major}.{minor}.cache"


def check_plugin_precision(attention: str, dit_precision: str) -> None:
    if attention != "native" and dit_precision != "fp16":
        raise SoraError(f"--trt-attention {attention} runs fp16/bf16 kernels inside a strongly typed network, which "
                        f"cannot insert casts; this DiT is {dit_precision}: export it with --dit-precision fp16, or "
                        f"use --trt-attention native")


def plugin_arch(attention: str, dit_precision: str, settings: BuildSettings, arch: tuple[int, int]
                ) -> tuple[int, int] | None:
    """The architecture the attention plugin's kernels compile for, or None without the plugin; refuses what
    cannot build. The plugins take fp16/bf16 tensors and a strongly typed network cannot insert casts, so the DiT
    must carry fp16 activations. A hardware-compatible plan runs on any GPU from Ampere (sm_80) up, so its kernels
    compile for sm_80, whose PTX every later GPU loads; on Hopper and newer, Triton's kernels use sm_90a features
    that PTX for sm_80 gives up, so that combination is refused rather than built slower than asked."""
    if attention == "native":
        return None
    check_plugin_precision(attention, dit_precision)
    if settings.hardware_compatible:
        if arch >= (9, 0):
            raise SoraError(f"--trt-attention {attention} with --trt-hardware-compatible on sm_{arch[0]}{arch[1]}: "
                            f"the plugin's kernels are built for this GPU's architecture and would not load on "
                            f"older ones; drop one of the two")
        return (8, 0)
    return arch


def apply_plan(trt, builder, plan: dict):
    """A real IBuilderConfig from the plan's data."""
    config = builder.create_builder_config()
    for pool, size in plan["memory_pool_limits"].items():
        config.set_memory_pool_limit(getattr(trt.MemoryPoolType, pool), size)
    config.builder_optimization_level = plan["optimization_level"]
    for flag in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan["cleared_flags"]:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    if plan["hardware_compatibility_level"]:
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      plan["hardware_compatibility_level"])
    for shapes in plan["profiles"]:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return config


def build_engine(onnx_path: Path, plan: dict, timing_cache: Path, log: Callable[[str], None] = lambda s: None) -> bytes:
    """Build a serialized engine (plan file bytes); the timing cache file is read first and rewritten after."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for flag in plan["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights are found beside it
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise SoraError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = apply_plan(trt, builder, plan)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # made on another device or TensorRT
        log(f"  the timing cache {timing_cache.name} does not match this GPU or TensorRT: starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    log(f"  building {onnx_path.stem} with TensorRT {trt.__version__} ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SoraError(f"TensorRT could not build {onnx_path.name} (see the log above; on Jetson try "
                        f"--trt-workspace-mb / --trt-tactic-memory-mb)")
    tmp = timing_cache.with_name(f".{timing_cache.name}.tmp{os.getpid()}")
    tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    os.replace(tmp, timing_cache)
    return bytes(serialized)
