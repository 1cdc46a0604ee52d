"""TMA tensor maps for the Hopper GEMM (cuda/gemm_sm90_tma.cu): the 128-byte CUtensorMap the bulk tensor copies
read, encoded on the host by the driver's cuTensorMapEncodeTiled through ctypes (PyCUDA has no binding).

A map names a bf16 matrix (address, rows, columns, row pitch) and the box one copy moves (box_rows × 64 columns:
128 bytes, the width of the 128-byte swizzle the wgmma descriptors read). Kernels take maps by value, as
`const __grid_constant__` parameters (format "128s", launched through driver.DriverFunction: the driver places such
parameters itself), copied with the other arguments at each launch; a CUDA graph keeps the bytes it was captured
with, valid as long as the matrices stay where they are (the backend's buffers do). `TensorMaps` caches the encoded
bytes per (address, shape, box), so a step encodes each map once.
"""

from __future__ import annotations

import ctypes

from olmoscope.errors import DeviceError

MAP_BYTES = 128
MAP_FORMAT = "128s"  # the PyCUDA/struct format of one map parameter
BOX_COLS = 64  # bf16 columns per box: 128 bytes, one swizzle span
CACHE_LIMIT = 4096  # maps kept before the cache starts over (a serving run sees a few hundred: rows × buffers)

# cuda.h enums (CUtensorMapDataType, …Interleave, …Swizzle, …L2promotion, …FloatOOBfill)
_BFLOAT16, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_ZERO = 9, 0, 3, 3, 0


def check_matrix(address: int, rows: int, cols: int, pitch: int, box_rows: int) -> None:
    """The driver's constraints on a 2-D bf16 map with 128-byte swizzle, checked before encoding (the emulator's
    stand-in encoder checks the same): 16-byte aligned address and pitch, 1 … 256 box rows, positive extents."""
    if address % 16 or pitch % 16 or pitch < 2 * cols:
        raise DeviceError(f"tensor map: address {address:#x}, pitch {pitch} bytes for {cols} bf16 columns "
                          "(both 16-byte aligned, the pitch at least a row)")
    if not (1 <= rows < 2**32 and 1 <= cols < 2**32 and 1 <= box_rows <= 256):
        raise DeviceError(f"tensor map: {rows} × {cols} matrix, box of {box_rows} rows (1 … 256)")


def encode_tiled(address: int, rows: int, cols: int, pitch: int, box_rows: int) -> bytes:
    """cuTensorMapEncodeTiled of a row-major bf16 matrix, box box_rows × BOX_COLS, 128-byte swizzle, L2 fetches of
    256 bytes, zero fill out of bounds."""
    check_matrix(address, rows, cols, pitch, box_rows)
    encode = _driver().cuTensorMapEncodeTiled
    storage = ctypes.create_string_buffer(MAP_BYTES + 64)  # CUtensorMap is 64-byte aligned
    aligned = (ctypes.addressof(storage) + 63) & ~63
    status = encode(ctypes.c_void_p(aligned), _BFLOAT16, 2, ctypes.c_void_p(address),
                    (ctypes.c_uint64 * 2)(cols, rows), (ctypes.c_uint64 * 1)(pitch),
                    (ctypes.c_uint32 * 2)(BOX_COLS, box_rows), (ctypes.c_uint32 * 2)(1, 1),
                    _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_ZERO)
    if status != 0:
        raise DeviceError(f"cuTensorMapEncodeTiled failed ({status}) for a {rows} × {cols} bf16 matrix at "
                          f"{address:#x}, box {box_rows} × {BOX_COLS}")
    return ctypes.string_at(aligned, MAP_BYTES)


_LIB = None


def _driver():
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
        lib.cuTensorMapEncodeTiled.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _LIB = lib
    return _LIB


class TensorMaps:
    """Encoded maps by (address, rows, cols, pitch, box_rows); `encode` is encode_tiled (the CPU emulator's plugin
    passes its stand-in)."""

    def __init__(self, encode=None):
        self.encode = encode or encode_tiled
        self._maps: dict[tuple[int, int, int, int, int], bytes] = {}

    def bf16(self, address: int, rows: int, cols: int, box_rows: int, pitch: int | None = None) -> bytes:
        key = (address, rows, cols, pitch or 2 * cols, box_rows)
        found = self._maps.get(key)
        if found is None:
            if len(self._maps) >= CACHE_LIMIT:
                self._maps.clear()
            found = self._maps[key] = self.encode(*key)
        return found

    def __len__(self) -> int:
        return len(self._maps)
