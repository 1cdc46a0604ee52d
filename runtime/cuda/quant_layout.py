"""Quantized weights repacked for the kernels of cuda/gemm_quant.cu (pure NumPy, at upload): a permutation of the
canonical engine layout, so that every lane of a warp reads its tensor-core fragments with one 16-byte load and
dequantizes them in registers. int4 below; int8 (pack_q8) at the end of the file.

Canonical int4 (the engine file's): W [N, K] as qweight uint8 [N, K/2] (element k of row n in byte k//2, low nibble
for even k), scales float16 [N, K/G], zeros uint8 [N, K/G] (asymmetric; symmetric: none, zero 8), G ∈ {32, 64, 128};
w[n, k] = (q − z[n, k//G]) · s[n, k//G].

Device int4 (`Q4Device`), for N padded to Np = ⌈N/16⌉·16 rows (pad rows: q = z = 0, s = 0) and K % 64 == 0:
- rows in tile order: tile t holds logical rows 16t … 16t+15. With pairs=True (a fused [gate; up] matrix, N = 2I,
  I % 8 == 0) tile t holds gate rows 8t … 8t+7 then up rows I+8t … I+8t+7, so one thread's mma accumulators
  hold the gate and the up value of the same intermediate index (the SiLU·up epilogue needs both).
- qweight uint8 [Np, K/2] viewed as [Np/16 tiles][K/64 chunks][32 lanes][4 words] uint32: lane 4g + c, word j
  holds tile rows g and g+8 at k = 64·chunk + 32·(j >> 1) + 8c + 4·(j & 1) + e (e = 0 … 3) as nibbles
  i = h + 2·(e >> 1) + 4·(e & 1) (h = 0 for row g, 1 for row g+8), nibble i at bits 4i … 4i+3. Then
  (word >> 4r) & 0x000F000F holds, in its two bf16 halves, the elements of the m16n8k16 A-fragment register r of
  k16 block j (r = 0 … 3: rows g / g+8, k pairs e 0-1 / 2-3), the matching B fragment is the 4 consecutive
  activations x[token][64·chunk + 32·(j >> 1) + 8c + 4·(j & 1) …] (one 8-byte load), and each k16 block lies in one
  half chunk: inside one group of 32 or more.
- scales float16 [Np, K/G] viewed as [tiles][K/G][8 g][2 h]: s of tile row g + 8h (one 32-bit load per group).
- zeros uint8 [Np/2, K/G] viewed as [tiles][K/G][8 g]: z of row g in the low nibble, of row g+8 in the high one.

    >>> dev = pack_q4(q, s, z); q2, s2, z2 = unpack_q4(dev)   # exactly the canonical arrays again
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from olmoscope.errors import DeviceError
from olmoscope.quantize import dequantize_int4, pack_nibbles, unpack_nibbles

Q4_GROUPS = (32, 64, 128)  # group sizes the kernels are built for (gemm_quant.cu)
Q4_TILE_ROWS = 16  # weight rows per tile (one m16 mma tile)
Q4_CHUNK = 64  # k per chunk: one 16-byte load per lane

# nibble i of a device word ↔ (h, e): row g + 8h of the tile, k offset e within the word's 4 consecutive k
_NIBBLE_H = np.array([i & 1 for i in range(8)])
_NIBBLE_E = np.array([2 * ((i >> 1) & 1) + (i >> 2) for i in range(8)])


class Q4Device(NamedTuple):
    """An int4 matrix in the kernels' layout (module docstring): numpy arrays ready to upload."""

    qweight: np.ndarray  # uint8 [Np, K/2]
    scales: np.ndarray  # float16 [Np, K/G]
    zeros: np.ndarray | None  # uint8 [Np/2, K/G], None when symmetric
    N: int  # real rows (≤ Np)
    K: int
    group: int
    pairs: bool  # rows paired as [gate; up] (SiLU epilogue)


def dequantize_q4(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
    """The canonical int4 matrix as float32 [N, K]: (q − z)·s in fp32 (the kernels' reference; the engine's rule)."""
    return dequantize_int4(qweight, scales, zeros, qweight.shape[1] * 2 // scales.shape[1])


def tile_rows(N: int, pairs: bool) -> np.ndarray:
    """The source row of each device row (−1: padding), [Np]."""
    if pairs:
        if N % 16:
            raise DeviceError(f"int4 pairs: N = {N} is not 2·I with I a multiple of 8")
        I = N // 2
        idx = np.arange(I).reshape(-1, 8)
        return np.stack([idx, I + idx], axis=1).reshape(-1)
    Np = -(-N // Q4_TILE_ROWS) * Q4_TILE_ROWS
    rows = np.full(Np, -1)
    rows[:N] = np.arange(N)
    return rows


def q4_device_bytes(N: int, K: int, group: int, asymmetric: bool) -> int:
    """Device bytes pack_q4 makes of an [N, K] int4 matrix: Np·K/2 nibbles, f16 scales, u8 zero pairs."""
    padded, groups = -(-N // Q4_TILE_ROWS) * Q4_TILE_ROWS, K // group
    return padded * K // 2 + padded * groups * 2 + (padded // 2 * groups if asymmetric else 0)


def check_q4_shapes(N: int, K: int, group: int) -> None:
    if group not in Q4_GROUPS:
        raise DeviceError(f"int4: group size {group} (one of {Q4_GROUPS})")
    if K % Q4_CHUNK or K % group:
        raise DeviceError(f"int4: K = {K} is not a multiple of {Q4_CHUNK} and of the group size {group}")
    if N < 1:
        raise DeviceError(f"int4: N = {N}")


def pack_q4(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None = None, pairs: bool = False) -> Q4Device:
    """Canonical int4 (qweight uint8 [N, K/2], scales float16 [N, K/G], zeros uint8 [N, K/G] or None) → Q4Device."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if scales.shape[0] != N or K % scales.shape[1]:
        raise DeviceError(f"int4: scales {list(scales.shape)} for qweight {list(qweight.shape)}")
    group = K // scales.shape[1]
    check_q4_shapes(N, K, group)
    if zeros is not None and zeros.shape != scales.shape:
        raise DeviceError(f"int4: zeros {list(zeros.shape)}, scales {list(scales.shape)}")
    rows = tile_rows(N, pairs)
    Np, T, Q, NG = len(rows), len(rows) // 16, K // Q4_CHUNK, K // group
    valid = rows >= 0

    q = np.zeros((Np, K), np.uint8)
    q[valid] = unpack_nibbles(qweight)[rows[valid]]
    # (t, h, g, chunk, j >> 1, c, j & 1, e) → (t, chunk, g, c, j, nibble i)
    q = q.reshape(T, 2, 8, Q, 2, 4, 2, 4).transpose(0, 3, 2, 5, 4, 6, 1, 7).reshape(T, Q, 8, 4, 4, 2, 4)
    q = q[..., _NIBBLE_H, _NIBBLE_E]
    device_q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8).reshape(Np, K // 2)

    s = np.zeros((Np, NG), np.float16)
    s[valid] = scales[rows[valid]]
    device_s = np.ascontiguousarray(s.reshape(T, 2, 8, NG).transpose(0, 3, 2, 1)).reshape(Np, NG)

    device_z = None
    if zeros is not None:
        z = np.zeros((Np, NG), np.uint8)
        z[valid] = zeros[rows[valid]]
        z = z.reshape(T, 2, 8, NG)
        device_z = np.ascontiguousarray((z[:, 0] | (z[:, 1] << 4)).transpose(0, 2, 1)).reshape(Np // 2, NG)
    return Q4Device(device_q, device_s, device_z, N, K, group, pairs)


def unpack_q4(dev: Q4Device) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The inverse of pack_q4: the canonical (qweight, scales, zeros) again."""
    rows = tile_rows(dev.N, dev.pairs)
    Np, K, NG = len(rows), dev.K, dev.K // dev.group
    T, Q = Np // 16, K // Q4_CHUNK
    valid = rows >= 0
    order = np.argsort(rows[valid])  # device rows of source rows 0 … N−1

    b = dev.qweight.reshape(T, Q, 8, 4, 4, 4)
    nib = np.empty((T, Q, 8, 4, 4, 8), np.uint8)
    nib[..., 0::2] = b & 15
    nib[..., 1::2] = b >> 4
    q = np.empty((T, Q, 8, 4, 2, 2, 2, 4), np.uint8)  # (t, chunk, g, c, j >> 1, j & 1, h, e)
    q.reshape(T, Q, 8, 4, 4, 2, 4)[..., _NIBBLE_H, _NIBBLE_E] = nib
    q = q.transpose(0, 6, 2, 1, 4, 3, 5, 7).reshape(Np, K)[valid][order]

    s = dev.scales.reshape(T, NG, 8, 2).transpose(0, 3, 2, 1).reshape(Np, NG)[valid][order]
    z = None
    if dev.zeros is not None:
        zb = dev.zeros.reshape(T, NG, 8).transpose(0, 2, 1)
        z = np.stack([zb & 15, zb >> 4], axis=1).reshape(Np, NG)[valid][order]
    return pack_nibbles(q), np.ascontiguousarray(s), None if z is None else np.ascontiguousarray(z)


# ── int8: canonical int8 [N, K] with f32 per-row scales (today's engine layout) ──────────────────────────────
Q8_CHUNK = 32  # k per chunk: one 16-byte load per lane (2 rows × 8 k)
Q8_BYTES = [0, 2, 1, 3]  # byte p of a word holds element Q8_BYTES[p]: k pairs (0, 1), (2, 3) in bytes 0, 2 and 1, 3


class Q8Device(NamedTuple):
    """An int8 matrix in the kernels' layout: qweight int8 [Np, K] viewed as [Np/16 tiles][K/32 chunks][32 lanes]
    [4 words], lane 4g + c, word 2j + h = tile row g + 8h at k = 32·chunk + 8c + 4j + e in byte Q8_BYTES[e] (the
    kernels widen bytes 0, 2 and 1, 3 of a word to bf16 pairs without moving them apart); scales f32 [Np]
    in tile row order (pad rows 0; pairs: the [gate; up] tile order of pack_q4)."""

    qweight: np.ndarray  # int8 [Np, K]
    scales: np.ndarray  # float32 [Np]
    N: int
    K: int
    pairs: bool


def pack_q8(q: np.ndarray, scales: np.ndarray, pairs: bool = False) -> Q8Device:
    """Canonical int8 (q int8 [N, K], scales float32 [N]) → Q8Device."""
    N, K = q.shape
    if K % Q8_CHUNK or scales.shape != (N,):
        raise DeviceError(f"int8: K = {K} (a multiple of {Q8_CHUNK}), scales {list(scales.shape)} for {N} rows")
    rows = tile_rows(N, pairs)
    Np, T, Q = len(rows), len(rows) // 16, K // Q8_CHUNK
    valid = rows >= 0
    padded = np.zeros((Np, K), np.int8)
    padded[valid] = q[rows[valid]]
    # (t, h, g, chunk, c, j, e) → (t, chunk, g, c, j, h, e), then e in byte order
    tiled = padded.reshape(T, 2, 8, Q, 4, 2, 4).transpose(0, 3, 2, 4, 5, 1, 6)[..., Q8_BYTES]
    device_q = np.ascontiguousarray(tiled).reshape(Np, K)
    s = np.zeros(Np, np.float32)
    s[valid] = scales[rows[valid]]
    return Q8Device(device_q, s, N, K, pairs)


def unpack_q8(dev: Q8Device) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of pack_q8: the canonical (q, scales) again."""
    rows = tile_rows(dev.N, dev.pairs)
    Np, K = len(rows), dev.K
    valid = rows >= 0
    order = np.argsort(rows[valid])
    words = dev.qweight.reshape(Np // 16, K // Q8_CHUNK, 8, 4, 2, 2, 4)[..., Q8_BYTES]  # (an involution)
    q = words.transpose(0, 5, 2, 1, 3, 4, 6).reshape(Np, K)
    return np.ascontiguousarray(q[valid][order]), dev.scales[valid][order]
