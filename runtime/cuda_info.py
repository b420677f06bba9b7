"""What this machine's NVIDIA GPU and CUDA stack are, read through the driver's own C libraries (ctypes; no torch).

`gpu()` asks libcuda for the device's name, compute capability and memory and the driver's CUDA version; NVML adds
the driver's version string. `device_memory_used()` reads NVML's used-memory counter of the same physical device
(matched by PCI bus id), or the driver's free/total memory where there is no NVML (Jetson); memory.PeakDevice
samples it. `ort_cuda()` says whether this onnxruntime can run CUDA and which CUDA/cuDNN it was built against. On a
machine without a GPU every function returns None (or an empty answer); none raises. Not for: deciding whether an
engine directory may run here (runtime/gpu_target.py does that).
"""

from __future__ import annotations

import ctypes
import functools

_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR}


def _load(*names: str):
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def _libcuda():
    lib = _load("libcuda.so.1", "libcuda.so", "nvcuda.dll")
    if lib is None or lib.cuInit(0) != 0:
        return None
    return lib


@functools.lru_cache(maxsize=None)
def _nvml():
    lib = _load("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll")
    if lib is None or lib.nvmlInit_v2() != 0:
        return None
    return lib


def _version(v: int) -> str:
    """CUDA's integer versions: 12080 -> "12.8"."""
    return f"{v // 1000}.{v % 1000 // 10}"


@functools.lru_cache(maxsize=None)
def gpu(device_id: int = 0) -> dict | None:
    """{name, compute_capability "9.0", memory_mb, driver_cuda "13.0", driver "580.65"} of one device, or None."""
    dev = _device(device_id)
    if dev is None:
        return None
    cuda, major, minor, ver = _libcuda(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    mem = ctypes.c_size_t()
    cuda.cuDeviceGetName(name, 256, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
    cuda.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
    cuda.cuDriverGetVersion(ctypes.byref(ver))
    info = {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}",
            "memory_mb": mem.value // 2**20, "driver_cuda": _version(ver.value), "driver": None}
    nvml = _nvml()
    if nvml is not None:
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
            info["driver"] = buf.value.decode()
    return info


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _device(device_id: int):
    """libcuda's handle of device `device_id` as this process numbers it (after CUDA_VISIBLE_DEVICES), or None."""
    cuda = _libcuda()
    dev = ctypes.c_int()
    if cuda is None or cuda.cuDeviceGet(ctypes.byref(dev), device_id) != 0:
        return None
    return dev


@functools.lru_cache(maxsize=None)
def _nvml_handle(device_id: int):
    """NVML's handle of the same physical device. NVML numbers every GPU of the machine and ignores
    CUDA_VISIBLE_DEVICES, so the two are matched by PCI bus id, never by index."""
    nvml, dev = _nvml(), _device(device_id)
    if nvml is None or dev is None:
        return None
    bus = ctypes.create_string_buffer(32)
    handle = ctypes.c_void_p()
    if _libcuda().cuDeviceGetPCIBusId(bus, 32, dev) != 0:
        return None
    if nvml.nvmlDeviceGetHandleByPciBusId_v2(bus, ctypes.byref(handle)) != 0:
        return None
    return handle


@functools.lru_cache(maxsize=None)
def _primary_context(device_id: int):
    """The device's primary context (the one ONNX Runtime and TensorRT use), retained for the process."""
    dev = _device(device_id)
    ctx = ctypes.c_void_p()
    if dev is None or _libcuda().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
        return None
    return ctx


def device_memory_used(device_id: int = 0) -> int | None:
    """Bytes in use on the device (every process), or None without a GPU. NVML where it exists; on Jetson, which
    has no NVML, the driver's free/total memory of the device. Sampled, it can go down between stages."""
    handle = _nvml_handle(device_id)
    if handle is not None:
        mem = _NvmlMemory()
        if _nvml().nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) == 0:
            return int(mem.used)
    ctx = _primary_context(device_id)
    if ctx is None:
        return None
    cuda, free, total, popped = _libcuda(), ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_void_p()
    if cuda.cuCtxPushCurrent_v2(ctx) != 0:
        return None
    try:
        ok = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
    finally:
        cuda.cuCtxPopCurrent_v2(ctypes.byref(popped))
    return int(total.value - free.value) if ok else None


def ort_cuda() -> dict:
    """{available, providers, onnxruntime, cuda, cudnn}: whether this onnxruntime build has the CUDA provider and the
    CUDA/cuDNN versions it was built for (onnxruntime-gpu writes them into capi/build_and_package_info.py)."""
    import onnxruntime as ort

    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:
        build = None
    providers = ort.get_available_providers()
    return {"available": "CUDAExecutionProvider" in providers, "providers": providers,
            "onnxruntime": ort.__version__, "cuda": getattr(build, "cuda_version", None) or None,
            "cudnn": getattr(build, "cudnn_version", None) or None}
