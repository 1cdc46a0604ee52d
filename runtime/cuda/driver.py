"""The CUDA driver through PyCUDA: availability, typed device buffers, one-line errors, CUDA graphs via ctypes.

PyCUDA is an optional extra: without it this module imports, and `available()` says why.
"""

from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda.build import find_nvcc

ITEMSIZE = {"bf16": 2, "f32": 4, "i8": 1, "i32": 4, "u8": 1, "f16": 2}  # u8, f16: int4 weights, scales, zeros

try:  # PyCUDA is an optional extra: without it the module imports, and available() says why
    import pycuda.driver as cuda
except ImportError as _exc:  # pragma: no cover - depends on the machine
    cuda = None
    _IMPORT_ERROR = str(_exc)


def available() -> tuple[bool, str]:
    """(True, "") when PyCUDA, a GPU and nvcc are all present, else (False, why not).

    >>> available()
    (False, "PyCUDA is not installed: install the CUDA toolkit (nvcc), then pip install 'olmoscope[cuda]' (README, \"On a GPU\")")
    """
    if cuda is None:
        return False, "PyCUDA is not installed: install the CUDA toolkit (nvcc), then pip install 'olmoscope[cuda]' (README, \"On a GPU\")"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no NVIDIA GPU found"
    except cuda.Error as exc:
        return False, f"the CUDA driver is not usable ({exc})"
    if find_nvcc() is None:
        return False, "nvcc not found (the kernels are compiled at first use): put the CUDA toolkit on PATH"
    return True, ""


@contextmanager
def cuda_errors(what: str):
    """Turn any CUDA failure inside the block into one DeviceError line."""
    try:
        yield
    except DeviceError:
        raise
    except Exception as exc:
        if cuda is not None and isinstance(exc, cuda.Error):
            raise DeviceError(f"CUDA error during {what}: {exc}") from None
        raise


def free_pinned(array: np.ndarray) -> None:
    """Release a pagelocked array's host allocation now, while its context is current."""
    free = getattr(array.base, "free", None)
    if free is not None:
        free()


GiB = 1 << 30


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def driver_check(lib, status: int, call: str) -> None:
    """A driver API call's non-zero CUresult as one DeviceError line naming the call and the error."""
    if status != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(status, ctypes.byref(name))
        raise DeviceError(f"{call} failed: {name.value.decode() if name.value else status}")


class _EdgeData(ctypes.Structure):
    """CUgraphEdgeData: which ports of the two nodes an edge joins, and its type."""

    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class CudaGraph:
    """A captured stream of launches, replayed with one call (PyCUDA has no graph API: the driver's, via ctypes).

    programmatic=True (sm_90+) turns every kernel-to-kernel edge of the captured graph into a programmatic one
    (programmatic dependent launch): the next kernel launches while the previous one drains, and its
    grid_dependency_sync (cuda/common.cuh, first in every kernel but the projections, which copy their first static
    weights ahead of it) waits for the data. The backend asks for it on sm_90+ unless OLMOSCOPE_PDL=0 (kernels.py
    PDL: what it measured).
    """

    CAPTURE_MODE_RELAXED = 2
    NODE_KERNEL = 0  # CU_GRAPH_NODE_TYPE_KERNEL
    PORT_PROGRAMMATIC, DEPENDENCY_PROGRAMMATIC = 1, 1  # CU_GRAPH_KERNEL_NODE_PORT_…, CU_GRAPH_DEPENDENCY_TYPE_…

    def __init__(self, stream, programmatic: bool = False):
        self.programmatic = programmatic
        self.programmatic_edges = 0  # kernel→kernel edges made programmatic at capture
        self._lib = ctypes.CDLL("libcuda.so.1")
        handle = getattr(stream, "handle", None)
        self._stream = ctypes.c_void_p(handle if handle is not None else stream.handle_int)
        self._graph = ctypes.c_void_p()
        self._exec = ctypes.c_void_p()

    def _check(self, status: int, call: str) -> None:
        driver_check(self._lib, status, call)

    def capture(self, record) -> None:
        """Run record() with the stream in capture mode, then instantiate what it launched."""
        self._check(self._lib.cuStreamBeginCapture_v2(self._stream, self.CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")
        try:
            record()
        finally:
            status = self._lib.cuStreamEndCapture(self._stream, ctypes.byref(self._graph))
        self._check(status, "cuStreamEndCapture")
        if self.programmatic:
            self.programmatic_edges = self._make_programmatic()
        self._check(self._lib.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), self._graph, ctypes.c_ulonglong(0)),
                    "cuGraphInstantiate")

    def _make_programmatic(self) -> int:
        """Replace each default kernel→kernel edge by a programmatic one; the number replaced."""
        lib, count = self._lib, ctypes.c_size_t(0)
        self._check(lib.cuGraphGetEdges_v2(self._graph, None, None, None, ctypes.byref(count)), "cuGraphGetEdges")
        n = count.value
        sources, targets, data = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (_EdgeData * n)()
        self._check(lib.cuGraphGetEdges_v2(self._graph, sources, targets, data, ctypes.byref(count)), "cuGraphGetEdges")
        kernel = {}

        def is_kernel(node) -> bool:
            if node not in kernel:
                kind = ctypes.c_int()
                self._check(lib.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)), "cuGraphNodeGetType")
                kernel[node] = kind.value == self.NODE_KERNEL
            return kernel[node]

        picked = [i for i in range(n) if data[i].type == 0 and is_kernel(sources[i]) and is_kernel(targets[i])]
        if not picked:
            return 0
        m = len(picked)
        old, new = (_EdgeData * m)(), (_EdgeData * m)()
        frm = (ctypes.c_void_p * m)(*[sources[i] for i in picked])
        to = (ctypes.c_void_p * m)(*[targets[i] for i in picked])
        for j, i in enumerate(picked):
            old[j] = data[i]
            new[j].from_port, new[j].type = self.PORT_PROGRAMMATIC, self.DEPENDENCY_PROGRAMMATIC
        self._check(lib.cuGraphRemoveDependencies_v2(self._graph, frm, to, old, ctypes.c_size_t(m)),
                    "cuGraphRemoveDependencies")
        self._check(lib.cuGraphAddDependencies_v2(self._graph, frm, to, new, ctypes.c_size_t(m)),
                    "cuGraphAddDependencies")
        return m

    def launch(self) -> None:
        self._check(self._lib.cuGraphLaunch(self._exec, self._stream), "cuGraphLaunch")

    def close(self) -> None:
        if self._exec:
            self._lib.cuGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()
        if self._graph:
            self._lib.cuGraphDestroy(self._graph)
            self._graph = ctypes.c_void_p()



_LAUNCH_CTYPES = {"P": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float, "q": ctypes.c_longlong}


class DriverFunction:
    """A kernel launched through the driver's cuLaunchKernel with kernelParams, one pointer per argument, which the
    driver copies to the offsets the cubin records; PyCUDA's launch passes one packed buffer that the driver copies as
    it is. The two agree except where ptxas moves the parameters: a kernel with a 64-byte aligned parameter (a
    `__grid_constant__` CUtensorMap) has it placed 64-byte aligned in the constant bank, every parameter shifted
    (by 48 bytes on sm_90), which a packed buffer cannot know. Same calls as a prepared PyCUDA Function (argument
    codes as kernels.SIGNATURES: P, i, f, q, and 128s for 128 bytes by value); the module is loaded into the current
    context from the same cubin.

    The argument storage and the pointer array to it are made once: a launch only writes the values in (the driver
    has copied them when cuLaunchKernel returns). Building a few dozen ctypes objects per launch cost ~50 µs of host
    time on the H200 machine (PyCUDA's launches ~12), enough to halve a host-bound 1B prefill of 128 tokens."""

    _MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute

    def __init__(self, cubin: str, name: str, codes: list[str], lib=None):
        self._lib = lib or ctypes.CDLL("libcuda.so.1")
        self._lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self.name, self.codes = name, codes
        self._slots = [(ctypes.c_char * int(code[:-1]))() if code.endswith("s") else _LAUNCH_CTYPES[code]()
                       for code in codes]
        self._params = (ctypes.c_void_p * len(codes))(*[ctypes.addressof(slot) for slot in self._slots])
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self._lib.cuModuleLoad(ctypes.byref(self._module), str(cubin).encode()), "cuModuleLoad")
        self._check(self._lib.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()),
                    "cuModuleGetFunction")

    def _check(self, status: int, call: str) -> None:
        driver_check(self._lib, status, f"{call} ({self.name})")

    def set_attribute(self, attribute, value: int) -> None:
        """The one attribute the kernels raise: their dynamic shared memory limit (PyCUDA's name is ignored)."""
        status = self._lib.cuFuncSetAttribute(self._function, self._MAX_DYNAMIC_SHARED_SIZE_BYTES, ctypes.c_int(value))
        self._check(status, "cuFuncSetAttribute")

    def _store(self, args) -> None:
        if len(args) != len(self._slots):
            raise DeviceError(f"{self.name}: {len(args)} arguments for {len(self.codes)} parameters")
        for slot, arg in zip(self._slots, args):
            if isinstance(slot, ctypes.Array):  # a struct by value: exactly its bytes
                if len(arg) != len(slot):
                    raise DeviceError(f"{self.name}: {len(arg)} bytes for a {len(slot)}-byte parameter")
                ctypes.memmove(slot, arg, len(slot))
            else:
                slot.value = arg

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        self._store(args)
        handle = getattr(stream, "handle", None)
        handle = handle if handle is not None else stream.handle_int
        self._check(self._lib.cuLaunchKernel(self._function, *grid, *block, shared_size, handle, self._params, None),
                    "cuLaunchKernel")


@dataclass
class DeviceBuffer:
    """A typed region of device memory: `ptr` to `shape` elements of `dtype` ("bf16", "f32", "i8", "i32")."""

    ptr: int  # device address
    shape: tuple[int, ...]  # row-major
    dtype: str  # element type
    allocation: Any = None  # the pycuda allocation that owns the memory (None for views)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    def rows(self, start: int, count: int) -> DeviceBuffer:
        """A view of rows start … start+count−1 of a matrix."""
        if not 0 <= start <= start + count <= self.shape[0]:
            raise DeviceError(f"rows {start}…{start + count - 1} outside a buffer of {self.shape[0]} rows")
        row_bytes = math.prod(self.shape[1:]) * ITEMSIZE[self.dtype]
        return DeviceBuffer(self.ptr + start * row_bytes, (count, *self.shape[1:]), self.dtype)

    def free(self) -> None:
        if self.allocation is not None:
            self.allocation.free()
            self.allocation = None


