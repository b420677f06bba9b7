"""The "built for this GPU" contract: what a GPU engine directory records, and the check that refuses it elsewhere.

`sora-export ... --backend ort-cuda` records `target()` in the manifest's "gpu" section: the GPU's name, compute
capability and memory, the driver, and the onnxruntime/CUDA/cuDNN versions. Before a GPU backend opens anything,
`check_target` compares that record with this machine. A mismatch is refused with one line that names what differs
and gives the command that rebuilds the directory here. The ONNX files stay portable: the CPU backends never check.

What must match: the compute capability (kernels and the measured precision choice are per architecture), the
onnxruntime major.minor, and the CUDA and cuDNN major versions. The driver must support the CUDA version the
build used. A different GPU name with the same compute capability (an H100 PCIe and an H100 SXM) is allowed.
"""

from __future__ import annotations

from . import cuda_info
from .errors import SoraError

GPU_BACKENDS = ("ort-cuda",)


def target() -> dict:
    """This machine as a GPU build target; name etc. are None without a GPU, cuda_provider False without
    onnxruntime-gpu."""
    g = cuda_info.gpu() or {}
    o = cuda_info.ort_cuda()
    return {"name": g.get("name"), "compute_capability": g.get("compute_capability"),
            "memory_mb": g.get("memory_mb"), "driver": g.get("driver"), "driver_cuda": g.get("driver_cuda"),
            "cuda_provider": o["available"], "onnxruntime": o["onnxruntime"], "cuda": o["cuda"], "cudnn": o["cudnn"]}


def missing(current: dict) -> str | None:
    """Why this machine cannot run a GPU backend at all, or None."""
    if current["name"] is None:
        return "no CUDA GPU is visible here (the NVIDIA driver's libcuda did not report a device)"
    if not current["cuda_provider"]:
        return (f"onnxruntime {current['onnxruntime']} here has no CUDA provider (install onnxruntime-gpu in place "
                f"of onnxruntime)")
    return None


def _major(v) -> str | None:
    return None if v is None else str(v).split(".")[0]


def _major_minor(v) -> str | None:
    return None if v is None else ".".join(str(v).split(".")[:2])


def _num(v) -> tuple[int, ...]:
    return tuple(int(x) for x in str(v).split(".") if x.isdigit())


def mismatches(recorded: dict, current: dict) -> list[str]:
    """What differs between the build record and this machine in ways that matter (empty: compatible)."""
    why = missing(current)
    if why:
        return [why]
    out = []
    if recorded.get("compute_capability") != current["compute_capability"]:
        out.append(f"this GPU is {current['name']} (compute capability {current['compute_capability']})")
    if _major_minor(recorded.get("onnxruntime")) != _major_minor(current["onnxruntime"]):
        out.append(f"onnxruntime here is {current['onnxruntime']}, built with {recorded.get('onnxruntime')}")
    for lib, label in (("cuda", "CUDA"), ("cudnn", "cuDNN")):
        if recorded.get(lib) and current[lib] and _major(recorded[lib]) != _major(current[lib]):
            out.append(f"onnxruntime here uses {label} {current[lib]}, built with {recorded[lib]}")
    if current["cuda"] and current["driver_cuda"] and _num(current["driver_cuda"]) < _num(current["cuda"])[:2]:
        out.append(f"the driver supports CUDA up to {current['driver_cuda']}, onnxruntime needs {current['cuda']}")
    return out


def rebuild_command(engine_dir, backend: str) -> str:
    return f"sora-export {engine_dir} -o {engine_dir} --backend {backend} --overwrite"


def check_target(recorded: dict | None, backend: str, engine_dir, current: dict | None = None) -> None:
    """Raise SoraError (one line, with the command that fixes it) unless `backend` may run this directory here."""
    current = target() if current is None else current
    cpu_hint = " (or run it on the CPU with --backend ort)"
    why = missing(current)
    if recorded is None or recorded.get("backend") != backend:
        built = "portable ONNX" if recorded is None else f"built for {recorded.get('backend')}"
        fix = why or f"build it with: {rebuild_command(engine_dir, backend)}"
        raise SoraError(f"{engine_dir} is {built}, not built for {backend}: {fix}{cpu_hint}")
    built = (f"{recorded.get('name')} (compute capability {recorded.get('compute_capability')}, onnxruntime "
             f"{recorded.get('onnxruntime')}, CUDA {recorded.get('cuda')})")
    if why:
        raise SoraError(f"{engine_dir} was built for {built}, but {why}{cpu_hint}")
    reasons = mismatches(recorded, current)
    if reasons:
        raise SoraError(f"{engine_dir} was built for {built}, but {'; '.join(reasons)}: rebuild it here with: "
                        f"{rebuild_command(engine_dir, backend)}{cpu_hint}")
