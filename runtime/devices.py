"""Picking a backend for --device: the CUDA one when a GPU, PyCUDA and nvcc are all present, else NumPy.

The CUDA backend lives in olmoscope.runtime.cuda.backend, which imports without PyCUDA and provides
``available() -> (bool, reason)`` and ``CudaBackend(engine, options)``.
"""

from __future__ import annotations

import importlib

from olmoscope.errors import UsageError
from olmoscope.runtime.backend import Backend, RuntimeOptions
from olmoscope.runtime.engine import Engine

DEVICES = ("auto", "cpu", "cuda")
CUDA_MODULE = "olmoscope.runtime.cuda.backend"  # provides available() -> (bool, reason) and CudaBackend
# The weight_formats kernel variants this build's CUDA kernels implement (cuda/gemv.cu, cuda/gemm.cu).
CUDA_KERNEL_VARIANTS = ("bf16", "int8", "int4")


def cuda_availability() -> tuple[bool, str]:
    """(True, "") when the CUDA backend can run here, else (False, why not).

    >>> cuda_availability()[0]   # on a machine without an NVIDIA GPU
    False
    """
    try:
        module = importlib.import_module(CUDA_MODULE)
    except Exception as exc:  # a broken driver or PyCUDA install must not stop --device auto
        return False, f"the CUDA backend cannot be imported ({exc})"
    return module.available()


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when the CUDA backend is available, else "cpu"; "cuda" unavailable → UsageError."""
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    usable, reason = cuda_availability()
    if usable:
        return "cuda"
    if device == "cuda":
        raise UsageError(f"--device cuda: {reason}")
    return "cpu"


def check_cuda_kernels(engine: Engine) -> None:
    """The one place that refuses an engine whose weight format has no CUDA kernels in this build."""
    variant = engine.weights.format.kernel
    if variant not in CUDA_KERNEL_VARIANTS:
        raise UsageError(f"{engine.label}: {engine.weights.dtype} engines need the {variant} kernels, not in this "
                         f"build; run it with --device cpu (the NumPy reference) or convert with --dtype bf16 or int8")


def open_backend(engine: Engine, device: str = "auto", options: RuntimeOptions | None = None) -> Backend:
    """Build the backend for `device` (auto|cpu|cuda) on an open engine.

    >>> open_backend(open_engine("tiny.olmo"), "cpu").name
    'numpy'
    """
    options = options or RuntimeOptions()
    if device == "cuda" or resolve_device(device) == "cuda":
        resolve_device("cuda")
        check_cuda_kernels(engine)
        module = importlib.import_module(CUDA_MODULE)
        return module.CudaBackend(engine, options)
    from olmoscope.runtime.numpy_backend import NumpyBackend

    return NumpyBackend(engine, options)
