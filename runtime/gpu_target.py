"""The "built for this GPU" contract: what a GPU engine directory records, and the check that refuses it elsewhere.

`sora-export ... --backend ort-cuda` records `target()` in the manifest's "gpu" section: the GPU's name, compute
capability and memory, the driver, and the onnxruntime/CUDA/cuDNN versions. Before a GPU backend opens anything,
`check_target` compares that record with this machine. A mismatch is refused with one line that names what differs
and gives the command that rebuilds the directory here. The ONNX files stay portable: the CPU backends never check.

What must match: the compute capability (kernels and the measured precision choice are per architecture), the
onnxruntime major.minor, and the CUDA and cuDNN major versions. The driver must support the CUDA major version the
build used (CUDA's minor-version compatibility covers the rest). A different GPU name with the same compute
capability (an H100 PCIe and an H100 SXM) is allowed.
Native TensorRT plans also need the TensorRT version they were built with, or, for a version-compatible build, the
same major version at least as new. Plans built hardware-compatible (Ampere and newer) skip the compute-capability
check on GPUs of compute capability 8.0 or higher.
"""

from __future__ import annotations

from . import cuda_info
from .errors import SoraError


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:  # also the PyPI stub packages that cannot fetch their libraries
        return None
    return getattr(tensorrt, "__version__", None)


def target() -> dict:
    """This machine as a GPU build target; name etc. are None without a GPU, cuda_provider False without
    onnxruntime-gpu."""
    g = cuda_info.gpu() or {}
    o = cuda_info.ort_cuda()
    return {"name": g.get("name"), "compute_capability": g.get("compute_capability"),
            "memory_mb": g.get("memory_mb"), "driver": g.get("driver"), "driver_cuda": g.get("driver_cuda"),
            "cuda_provider": o["available"], "trt_provider": "TensorrtExecutionProvider" in o["providers"],
            "onnxruntime": o["onnxruntime"], "cuda": o["cuda"], "cudnn": o["cudnn"], "tensorrt": tensorrt_version()}


def missing(current: dict, backend: str = "ort-cuda") -> str | None:
    """Why this machine cannot run `backend` at all, or None."""
    if current["name"] is None:
        return "no CUDA GPU is visible here (the NVIDIA driver's libcuda did not report a device)"
    if backend == "tensorrt":
        if not current.get("tensorrt"):
            return ("TensorRT's Python package is not installed here (pip install tensorrt, or JetPack's "
                    "python3-libnvinfer)")
        return None
    if not current["cuda_provider"]:
        return (f"onnxruntime {current['onnxruntime']} here has no CUDA provider (install onnxruntime-gpu in place "
                f"of onnxruntime)")
    if backend == "ort-trt" and not current.get("trt_provider"):
        return f"onnxruntime {current['onnxruntime']} here has no TensorRT provider (it needs TensorRT's libraries)"
    return None


def _major(v) -> str | None:
    return None if v is None else str(v).split(".")[0]


def _major_minor(v) -> str | None:
    return None if v is None else ".".join(str(v).split(".")[:2])


def _num(v) -> tuple[int, ...]:
    return tuple(int(x) for x in str(v).split(".") if x.isdigit())


def _tensorrt_mismatch(recorded: dict, current: dict) -> str | None:
    built, here = recorded.get("tensorrt"), current.get("tensorrt")
    if built is None or here == built:
        return None
    if recorded.get("version_compatible") and here and _num(here)[:1] == _num(built)[:1] and _num(here) >= _num(built):
        return None
    return f"TensorRT here is {here}, the plans were built with {built}"


def _same_architecture(recorded: dict, current: dict) -> bool:
    if recorded.get("compute_capability") == current["compute_capability"]:
        return True
    return bool(recorded.get("hardware_compatible")) and _num(current["compute_capability"]) >= (8, 0)


def mismatches(recorded: dict, current: dict) -> list[str]:
    """What differs between the build record and this machine in ways that matter (empty: compatible)."""
    backend = recorded.get("backend", "ort-cuda")
    why = missing(current, backend)
    if why:
        return [why]
    out = []
    if not _same_architecture(recorded, current):
        out.append(f"this GPU is {current['name']} (compute capability {current['compute_capability']})")
    if backend == "tensorrt":
        trt = _tensorrt_mismatch(recorded, current)
        return out + ([trt] if trt else [])
    if _major_minor(recorded.get("onnxruntime")) != _major_minor(current["onnxruntime"]):
        out.append(f"onnxruntime here is {current['onnxruntime']}, built with {recorded.get('onnxruntime')}")
    for lib, label in (("cuda", "CUDA"), ("cudnn", "cuDNN")):
        if recorded.get(lib) and current[lib] and _major(recorded[lib]) != _major(current[lib]):
            out.append(f"onnxruntime here uses {label} {current[lib]}, built with {recorded[lib]}")
    if current["cuda"] and current["driver_cuda"] and _num(current["driver_cuda"])[:1] < _num(current["cuda"])[:1]:
        # CUDA's minor-version compatibility: a build for 13.y runs on a driver for any 13.x (ONNX Runtime's CUDA
        # provider documents it); a newer major needs a newer driver
        out.append(f"the driver supports CUDA up to {current['driver_cuda']}, onnxruntime needs {current['cuda']}")
    return out


def rebuild_command(engine_dir, backend: str) -> str:
    return f"sora-build {engine_dir} -o {engine_dir} --backend {backend} --overwrite"


def check_target(recorded: dict | None, backend: str, engine_dir, current: dict | None = None) -> None:
    """Raise SoraError (one line, with the command that fixes it) unless `backend` may run this directory here."""
    current = target() if current is None else current
    cpu_hint = " (or run it on the CPU with --backend ort)"
    why = missing(current, backend)
    if recorded is None or recorded.get("backend") != backend:
        built = "portable ONNX" if recorded is None else f"built for {recorded.get('backend')}"
        fix = why or f"build it with: {rebuild_command(engine_dir, backend)}"
        raise SoraError(f"{engine_dir} is {built}, not built for {backend}: {fix}{cpu_hint}")
    stack = (f"TensorRT {recorded.get('tensorrt')}" if backend == "tensorrt" else
             f"onnxruntime {recorded.get('onnxruntime')}, CUDA {recorded.get('cuda')}")
    built = f"{recorded.get('name')} (compute capability {recorded.get('compute_capability')}, {stack})"
    if why:
        raise SoraError(f"{engine_dir} was built for {built}, but {why}{cpu_hint}")
    reasons = mismatches(recorded, current)
    if reasons:
        raise SoraError(f"{engine_dir} was built for {built}, but {'; '.join(reasons)}: rebuild it here with: "
                        f"{rebuild_command(engine_dir, backend)}{cpu_hint}")
