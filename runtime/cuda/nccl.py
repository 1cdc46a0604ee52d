"""NCCL through ctypes: the collectives tensor parallelism needs (issue 13), from the `nvidia-nccl-cu13` wheel's
libnccl, as vLLM's pynccl reaches it — no torch, no hand-written collectives. Calls are enqueued on the caller's
CUDA stream, so they can be captured in a CUDA graph with the kernels around them.

    >>> nccl = Nccl.load(); uid = nccl.unique_id()         # rank 0 makes the id, every rank gets its bytes
    >>> comm = nccl.communicator(uid, ranks=2, rank=r)      # in each rank's process, its GPU's context current
    >>> comm.all_reduce(buffer.ptr, buffer.ptr, count, "f32", stream_handle)   # in place, summed over ranks

Every process must run with NCCL_NVLS_ENABLE=0 (NVLink multicast off: it can take a shared host's GPUs out of
service); `Nccl.load` sets it when it is unset and refuses a process where it is on.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from olmoscope.errors import DeviceError

UNIQUE_ID_BYTES = 128  # nccl.h NCCL_UNIQUE_ID_BYTES
DATA_TYPES = {"i8": 0, "u8": 1, "i32": 2, "u32": 3, "i64": 4, "u64": 5, "f16": 6, "f32": 7, "f64": 8, "bf16": 9}
REDUCTIONS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}  # ncclRedOp_t


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


def library_path() -> Path:
    """$OLMOSCOPE_NCCL, else the libnccl.so.2 of the nvidia-nccl wheel (under site-packages' `nvidia` folder:
    nvidia/nccl/lib for the cu12 wheels, nvidia/cu13/lib for cu13's)."""
    if os.environ.get("OLMOSCOPE_NCCL"):
        return Path(os.environ["OLMOSCOPE_NCCL"])
    try:
        import nvidia  # the wheels' namespace package
    except ImportError:
        nvidia = None
    for root in getattr(nvidia, "__path__", []):
        for found in sorted(Path(root).glob("*/lib/libnccl.so.2")):
            return found
    raise DeviceError("NCCL is not installed: pip install nvidia-nccl-cu13 (or set OLMOSCOPE_NCCL to a libnccl.so.2)")


def header_path() -> Path | None:
    """The nccl.h beside the library (the wheel ships it), for the test that checks the constants mirrored here."""
    found = library_path().parent.parent / "include" / "nccl.h"
    return found if found.is_file() else None


class Nccl:
    """The loaded library: its version, unique ids, communicators."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        c = ctypes
        for name, args in (("ncclGetVersion", [c.POINTER(c.c_int)]), ("ncclGetUniqueId", [c.POINTER(UniqueId)]),
                           ("ncclCommInitRank", [c.POINTER(c.c_void_p), c.c_int, UniqueId, c.c_int]),
                           ("ncclAllReduce", [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_void_p,
                                              c.c_void_p]),
                           ("ncclAllGather", [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int, c.c_void_p, c.c_void_p]),
                           ("ncclCommDestroy", [c.c_void_p])):
            function = getattr(lib, name)
            function.argtypes, function.restype = args, c.c_int
        lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [c.c_int], c.c_char_p

    @classmethod
    def load(cls) -> Nccl:
        if os.environ.setdefault("NCCL_NVLS_ENABLE", "0") != "0":
            raise DeviceError("NCCL_NVLS_ENABLE is on: olmoscope runs NCCL with NVLink multicast off (set it to 0)")
        path = library_path()
        try:
            return cls(ctypes.CDLL(str(path)))
        except OSError as exc:
            raise DeviceError(f"cannot load NCCL from {path}: {exc}") from None

    def check(self, result: int, what: str) -> None:
        if result != 0:
            raise DeviceError(f"NCCL {what}: {self.lib.ncclGetErrorString(result).decode(errors='replace')}")

    @property
    def version(self) -> int:
        """As NCCL spells it: major·10000 + minor·100 + patch (2.27.3 → 22703)."""
        value = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(value)), "version")
        return value.value

    def unique_id(self) -> bytes:
        uid = UniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "unique id")
        return bytes(uid.internal)

    def communicator(self, uid: bytes, ranks: int, rank: int) -> Communicator:
        """This process's member of a `ranks`-process communicator (blocks until every rank has joined)."""
        if len(uid) != UNIQUE_ID_BYTES or not 0 <= rank < ranks:
            raise DeviceError(f"NCCL communicator: rank {rank} of {ranks}, a {len(uid)}-byte id")
        handle, id_struct = ctypes.c_void_p(), UniqueId()
        ctypes.memmove(id_struct.internal, uid, UNIQUE_ID_BYTES)
        self.check(self.lib.ncclCommInitRank(ctypes.byref(handle), ranks, id_struct, rank), "init")
        return Communicator(self, handle, ranks, rank)


class Communicator:
    """One rank's communicator; its collectives are enqueued on the given stream (a CUDA stream handle)."""

    def __init__(self, nccl: Nccl, handle: ctypes.c_void_p, ranks: int, rank: int):
        self.nccl, self.handle, self.ranks, self.rank = nccl, handle, ranks, rank

    def all_reduce(self, source: int, destination: int, count: int, dtype: str, stream: int, op: str = "sum") -> None:
        """destination[i] = op over ranks of source[i], i < count (in place when they are the same pointer)."""
        self.nccl.check(self.nccl.lib.ncclAllReduce(source, destination, count, DATA_TYPES[dtype], REDUCTIONS[op],
                                                    self.handle, stream), "all-reduce")

    def all_gather(self, source: int, destination: int, count: int, dtype: str, stream: int) -> None:
        """destination = the ranks' `count` elements each, in rank order."""
        self.nccl.check(self.nccl.lib.ncclAllGather(source, destination, count, DATA_TYPES[dtype], self.handle,
                                                    stream), "all-gather")

    def close(self) -> None:
        if self.handle:
            self.nccl.check(self.nccl.lib.ncclCommDestroy(self.handle), "destroy")
            self.handle = ctypes.c_void_p()
