"""The `tensorrt` runtime target: build a native plan for every engine of a directory on this GPU.

Called by target/choose.py's `build_runtime`, from a full export or from the second step of the two-step
path. It checks that this TensorRT can take the directory's ONNX (target/trt_build.py's version rules). With
`--trt-attention plugin|int8` it registers the fused attention plugins for this GPU's architecture
(fused_attention/trt_plugin.py) and writes `transformer.plugin.onnx` beside the portable graph
(target/attention_plugin.py). It then builds `<engine>.plan` for each engine, with the timing cache kept under
`trt/` per GPU and TensorRT version, and times the DiT step with and without a CUDA graph. It returns the manifest
with its runtime and gpu sections and the new per-engine entries (plan file and builder plan). Not run by this project:
TensorRT cannot be installed on its machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..runtime import gpu_target
from ..runtime.choices import Backend, Execution, Graph
from ..runtime.errors import SoraError
from ..runtime.manifest import Manifest
from .trt_build import (BuildSettings, attention_graph, build_engine, builder_plan, capabilities, plugin_arch,
                        timing_cache_name)

TRT_ATTENTION = ("native", "plugin", "int8")


@dataclass(frozen=True)
class TrtOptions:
    attention: str = "native"  # native: TensorRT's own fusion; plugin / int8: our Triton flash / INT8 attention
    settings: BuildSettings = field(default_factory=BuildSettings)


def _unlink(path: Path) -> None:
    """A file carried over from the source directory is a hard link to the source's: replace it, never write
    through it."""
    path.unlink(missing_ok=True)


def require_tensorrt() -> str:
    """The installed TensorRT version, or a one-line refusal."""
    why = gpu_target.missing(gpu_target.target(), Backend.TENSORRT)
    if why:
        raise SoraError(f"--backend tensorrt builds plans on this machine's GPU, but {why}; export portable ONNX here "
                        f"with --onnx-only and build on the device: sora-build ONNX_DIR -o ENGINE_DIR --backend "
                        f"tensorrt")
    version = gpu_target.tensorrt_version()
    capabilities(version)  # refuses versions older than 10.3
    return version


def trt_runtime(manifest: Manifest, options: TrtOptions, threads: int | None, log: Callable[[str], None]
                ) -> Manifest:
    """`manifest` with its runtime and gpu sections and every engine's plan, after building the plans into its
    directory."""
    from .timing import time_dit_step

    version = require_tensorrt()
    if options.attention not in TRT_ATTENTION:
        raise SoraError(f"unknown --trt-attention {options.attention!r} (known: {', '.join(TRT_ATTENTION)})")
    engine_dir = manifest.root
    attention_graph(version, options.attention, manifest.data.get("attention"))
    gpu = {"backend": Backend.TENSORRT, **gpu_target.target(), "version_compatible": options.settings.version_compatible,
           "hardware_compatible": options.settings.hardware_compatible}
    arch = plugin_arch(options.attention, manifest.precision.get("transformer", Graph.FP32), options.settings,
                       tuple(int(x) for x in gpu["compute_capability"].split(".")))
    (engine_dir / "trt").mkdir(exist_ok=True)
    cache = engine_dir / "trt" / timing_cache_name(gpu, version)
    sources = {name: manifest.engine_path(name) for name in manifest.engine_names}
    if options.attention in ("plugin", "int8"):
        from ..fused_attention.trt_plugin import register_plugins
        from .attention_plugin import plugin_file

        register_plugins(arch)
        _unlink(engine_dir / "transformer.plugin.onnx")
        report = plugin_file(sources["transformer"], engine_dir / "transformer.plugin.onnx", options.attention)
        if report.replaced != report.attention_nodes:
            raise SoraError(f"{report.attention_nodes - report.replaced} of the DiT's {report.attention_nodes} "
                            f"attentions do not fit the plugin (mask or scale): use --trt-attention native")
        log(f"  attention plugin: {report.replaced} attentions replaced")
        sources["transformer"] = engine_dir / "transformer.plugin.onnx"
    entries = {}
    for name, src in sources.items():
        plan = builder_plan(manifest.spec(name), options.settings, version)
        data = build_engine(src, plan, cache, log)
        _unlink(engine_dir / f"{name}.plan")
        (engine_dir / f"{name}.plan").write_bytes(data)
        entries[name] = {"plan": f"{name}.plan", "trt_build": {"source": src.name, "builder": plan}}
    manifest = manifest.updated(engines=entries, gpu=gpu)  # the timing pipeline checks the record like sora-run
    timings = {}
    for graph in (False, True):
        key = f"tensorrt{'-cuda-graph' if graph else ''}"
        timings[key] = time_dit_step(manifest, Backend.TENSORRT, Execution.FP32, threads, cuda_graph=graph)
        log(f"  DiT step, TensorRT {version}{' with a CUDA graph' if graph else ''}: "
            f"{timings[key]['step_s'] * 1000:.1f} ms ({timings[key]['tokens']} tokens, CFG batch 2)")
    runtime = {"backend": Backend.TENSORRT, "precision": Execution.FP32, "tensorrt": version, "attention": options.attention,
               "build_settings": options.settings.to_dict(), "timings": timings}
    return manifest.updated(runtime=runtime)
