"""A pytest plugin that runs tests/test_cuda_kernels.py on the CPU emulator: a stand-in `pycuda.driver` whose
device memory is host memory, and a Kernels whose launches call the emulated kernels (build.py) through ctypes.

    PYTHONPATH=tests python -m pytest -p cuda_emulator.plugin tests/test_cuda_kernels.py   (after build.py; or run.py)

What the emulator checks: indexing, masking, fragment layouts, barriers and cp.async waits (copies land only at the
wait that retires them), the launchers' shapes, argument formats and dynamic shared memory. What it cannot: speed,
alignment faults, races the round-robin schedule happens to order, real asynchrony between CTAs (the split-K
merge's ticket runs CTAs one after another), CUDA graphs (the graph test is skipped).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import types

import numpy as np
import pytest

SM_COUNT = int(os.environ.get("EMU_SMS", "132"))  # the planners see an H100/H200-sized chip


class Error(Exception):
    """pycuda.driver.Error's stand-in."""


class Allocation:
    """Host memory standing in for a device allocation (256-byte aligned, as cudaMalloc's)."""

    def __init__(self, nbytes: int):
        self.buffer = np.zeros(nbytes + 256, np.uint8)
        self.address = (self.buffer.ctypes.data + 255) & ~255

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.buffer = None


class Stream:
    handle = 0

    def synchronize(self) -> None:
        pass


class Context:
    def push(self) -> None:
        pass

    def pop(self) -> None:
        pass


class Device:
    def __init__(self, index: int = 0):
        self.index = index

    @staticmethod
    def count() -> int:
        return 1

    def retain_primary_context(self) -> Context:
        return Context()

    def compute_capability(self) -> tuple[int, int]:
        return (9, 0)

    def get_attribute(self, attribute: str) -> int:
        return {"MULTIPROCESSOR_COUNT": SM_COUNT, "L2_CACHE_SIZE": 50 << 20}[attribute]

    def name(self) -> str:
        return "olmoscope CPU emulator"


def memcpy_htod(ptr, array) -> None:
    array = np.ascontiguousarray(array)
    ctypes.memmove(int(ptr), array.ctypes.data, array.nbytes)


def memcpy_dtoh(array, ptr) -> None:
    ctypes.memmove(array.ctypes.data, int(ptr), array.nbytes)


def _memset(ctype):
    def fill(ptr, value, count):
        np.ctypeslib.as_array((ctype * count).from_address(int(ptr)))[:] = value
    return fill


driver = types.ModuleType("pycuda.driver")
driver.__dict__.update(
    Error=Error, Stream=Stream, Device=Device, init=lambda: None, mem_alloc=Allocation, memcpy_htod=memcpy_htod,
    memcpy_dtoh=memcpy_dtoh, memset_d8=_memset(ctypes.c_uint8), memset_d16=_memset(ctypes.c_uint16),
    memset_d32=_memset(ctypes.c_uint32),
    device_attribute=types.SimpleNamespace(MULTIPROCESSOR_COUNT="MULTIPROCESSOR_COUNT", L2_CACHE_SIZE="L2_CACHE_SIZE"),
    function_attribute=types.SimpleNamespace(MAX_DYNAMIC_SHARED_SIZE_BYTES="MAX_DYNAMIC_SHARED_SIZE_BYTES"))
package = types.ModuleType("pycuda")
package.driver = driver
sys.modules["pycuda"] = package
sys.modules["pycuda.driver"] = driver

CTYPES = {"P": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float, "q": ctypes.c_longlong,
          "128s": lambda b: (ctypes.c_char * 128).from_buffer_copy(b)}  # a TMA tensor map, by value
EMU_TENSOR_MAP_MAGIC = 0x50414D54554D45  # emu.h's EmuTensorMap: "EMUTMAP"


def emulated_tensor_map(address: int, rows: int, cols: int, pitch: int, box_rows: int) -> bytes:
    """The stand-in for cuTensorMapEncodeTiled (runtime/cuda/tensor_map.encode_tiled): the same checks, then emu.h's
    own layout of the 128 bytes (EmuTensorMap: magic, address, cols, rows, pitch, box cols/rows, element bytes,
    swizzle bytes) for its model of cp.async.bulk.tensor."""
    from olmoscope.runtime.cuda import tensor_map

    tensor_map.check_matrix(address, rows, cols, pitch, box_rows)
    packed = struct.pack("<5Q4I", EMU_TENSOR_MAP_MAGIC, address, cols, rows, pitch, tensor_map.BOX_COLS, box_rows,
                         2, 128)
    return packed.ljust(tensor_map.MAP_BYTES, b"\0")
DEFAULT_SMEM = 48 * 1024
MAX_SMEM = 227 * 1024  # sm_90's per-block opt-in maximum


class EmulatedFunction:
    """One kernel: checks the launch the way the driver would, then runs it on the emulator."""

    def __init__(self, library, name: str, argtypes: str):
        self.entry = getattr(library, f"emu_call_{name}")
        self.entry.restype = None
        self.entry.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6
        self.set_smem = library.emu_set_dynamic_smem  # shared memory past the launch's bytes aborts the emulator
        self.set_smem.restype = None
        self.set_smem.argtypes = [ctypes.c_uint]
        from olmoscope.runtime.cuda.kernels import argument_codes

        self.name, self.argtypes, self.smem_limit = name, argument_codes(argtypes), DEFAULT_SMEM

    def set_attribute(self, attribute, value: int) -> None:
        if value > MAX_SMEM:
            raise Error(f"{self.name}: {value} bytes of dynamic shared memory is over the limit")
        self.smem_limit = value

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        if len(args) != len(self.argtypes):
            raise Error(f"{self.name}: {len(args)} arguments for the format {self.argtypes}")
        if shared_size > self.smem_limit:
            raise Error(f"{self.name}: {shared_size} bytes of dynamic shared memory over its {self.smem_limit}")
        if block[0] * block[1] * block[2] > 1024 or max(grid[1:]) > 65535:
            raise Error(f"{self.name}: invalid launch {grid} × {block}")
        values = [CTYPES[c](a) for c, a in zip(self.argtypes, args)]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        self.set_smem(shared_size)
        self.entry(argv, *grid, *block)


def _install() -> None:
    from olmoscope.runtime.cuda import driver as driver_module
    from olmoscope.runtime.cuda import kernels as K

    driver_module.cuda = driver  # in case it was imported (finding no PyCUDA) before this plugin

    from cuda_emulator.build import build_dir

    class EmulatedKernels(K.Kernels):
        """Kernels with the emulated libraries in place of the cubins; every launcher is the real one."""

        def __init__(self, cuda, device, stream):
            self.cuda, self.stream, self.arch = cuda, stream, "sm_90"
            self.hopper = True  # gemm_sm90.cu runs on emu.h's model of wgmma
            self.programmatic = False  # no CUDA graphs here (graph tests are skipped)
            self.sm_count = device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
            libraries = {}
            self.functions = {}
            for name, (source, argtypes) in K.SIGNATURES.items():
                if source not in libraries:
                    libraries[source] = ctypes.CDLL(str(build_dir() / f"{source}.so"), mode=ctypes.RTLD_LOCAL)
                self.functions[name] = EmulatedFunction(libraries[source], name, argtypes)
            self._modules = libraries
            self._configure()  # the real shared-memory limits and GEMM scratch
            self.tensor_maps = K.TensorMaps(emulated_tensor_map)  # emu.h's maps, not the driver's

    K.Kernels = EmulatedKernels


_install()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="the CPU emulator has no CUDA graphs")
    for item in items:
        if "graph" in item.name:
            item.add_marker(skip)
