"""Weight-only quantization math: int8 per row, int4 per group, and the int4 nibble packing.

The engine's int4 layout (docs/ENGINE_FORMAT.md) for a matrix W [N, K] and group G:

    qweight  uint8   [N, K/2]   element k of row n in byte k//2: low nibble for even k, high for odd k
    scales   float16 [N, K/G]
    zeros    uint8   [N, K/G]   asymmetric only, one value 0..15 per group; symmetric: the zero is 8
    w[n, k] = (q[n, k] − z[n, k//G]) · s[n, k//G]      in float32 (exact: a float16 times a small integer)
"""

from __future__ import annotations

import numpy as np

from olmoscope.errors import OlmoscopeError

INT4_LEVELS = 15  # q ∈ 0..15
INT4_SYMMETRIC_ZERO = 8  # the implied zero point of a symmetric int4 matrix
FP16_MAX = float(np.finfo(np.float16).max)


class QuantizeError(OlmoscopeError):
    """A matrix that a quantized format cannot hold (NaN, Inf, beyond an fp16 scale)."""


# ── int8: symmetric, one float32 scale per output row ──────────────────────────
def quantize_int8_rows(block: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: scale = max|w[r, :]| / 127, q = round(w / scale) — |w − q·scale| ≤ scale/2.

    >>> q, s = quantize_int8_rows(np.array([[0.5, -1.0]], np.float32), "w"); q.tolist(), s.tolist()
    ([[64, -127]], [0.007874015718698502])
    """
    w = block.astype(np.float32, copy=False)  # [rows, cols]
    absmax = np.maximum(w.max(axis=1), -w.min(axis=1))  # [rows]; two reductions, no |w| temporary
    _refuse_non_finite(absmax, name, "int8")
    scale = absmax / np.float32(127)  # [rows]
    # Subnormal rows (absmax below ~1.5e-36): the scale has few bits, and rounding it down — to 0 when
    # absmax/127 underflows — would break |w − q·scale| ≤ scale/2. One float32 step up restores it.
    short = scale.astype(np.float64) * 127 < absmax.astype(np.float64) * (1 - 2.0**-20)
    scale[short] = np.nextafter(scale[short], np.float32(np.inf))
    safe = np.where(scale > 0, scale, np.float32(1))  # an all-zero row: q = 0, scale 0
    q = np.divide(w, safe[:, None])  # [rows, cols], |q| ≤ 127 up to float32 rounding
    np.rint(q, out=q)  # round half to even
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] = q · scale[row]."""
    return q.astype(np.float32) * scales.astype(np.float32)[:, None]


# ── int4: per group of G inputs, float16 scales, optional zero points ──────────
def quantize_int4_groups(block: np.ndarray, group: int, symmetric: bool, name: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q uint8 [N, K] in 0..15, scales float16 [N, K/G], zeros uint8 [N, K/G] or None when symmetric).

    Symmetric: s = 2·max|w|/15 and z = 8, so q − 8 ∈ −8..7 covers ±7.5·s. Asymmetric: the group's range
    widened to hold 0, s = (max − min)/15, z = round(−min/s). Either way s is rounded *up* to float16, so
    round-to-nearest then clip to 0..15 keeps |w − (q − z)·s| ≤ s/2. An all-zero group has s = 0 (w = 0).

    >>> q, s, z = quantize_int4_groups(np.float32([[-1, 1]]), 2, True, "w"); q.tolist(), s.tolist(), z
    ([[1, 15]], [[0.1334228515625]], None)
    """
    w = block.astype(np.float32, copy=False)
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)  # [N, K/G, G]
    high, low = g.max(axis=2), g.min(axis=2)  # [N, K/G]
    _refuse_non_finite(np.maximum(high, -low), name, "int4")  # a NaN or ±inf makes an extreme non-finite
    if symmetric:
        span = 2 * np.maximum(high, -low).astype(np.float64)
    else:
        high, low = np.maximum(high, 0), np.minimum(low, 0)
        span = high.astype(np.float64) - low.astype(np.float64)
    scales = _fp16_scale_up(span / INT4_LEVELS, name)  # [N, K/G] float16
    s32 = scales.astype(np.float32)
    safe = np.where(s32 > 0, s32, np.float32(1))
    if symmetric:
        zeros32 = np.full_like(s32, INT4_SYMMETRIC_ZERO)
    else:
        zeros32 = np.clip(np.rint(-low / safe), 0, INT4_LEVELS)
    q = np.rint(g / safe[:, :, None]) + zeros32[:, :, None]  # [N, K/G, G]
    np.clip(q, 0, INT4_LEVELS, out=q)
    q[s32 == 0] = zeros32[s32 == 0][:, None]  # an all-zero group: q = z, so w = 0 exactly
    q = q.reshape(rows, cols).astype(np.uint8)
    return q, scales, None if symmetric else zeros32.astype(np.uint8)


def _fp16_scale_up(scale: np.ndarray, name: str) -> np.ndarray:
    """float16 scales no smaller than the float64 ones (a smaller scale would clip the group's extreme)."""
    if scale.size and float(scale.max()) > FP16_MAX:
        raise QuantizeError(f"tensor {name}: a group spans {float(scale.max()) * INT4_LEVELS:.6g}, beyond what an "
                            f"fp16 int4 scale holds (±{FP16_MAX:g} per step); convert with --dtype bf16 or int8 "
                            f"instead; nothing was written")
    with np.errstate(over="ignore"):
        out = scale.astype(np.float16)
        short = out.astype(np.float64) < scale
        out[short] = np.nextafter(out[short], np.float16(np.inf))
    return out


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int) -> np.ndarray:
    """float32 [N, K] = (q − z)·s from the packed engine layout; zeros None means symmetric (z = 8).

    >>> dequantize_int4(np.uint8([[0xF0]]), np.float16([[0.5]]), None, 2).tolist()
    [[-4.0, 3.5]]
    """
    q = unpack_nibbles(qweight).astype(np.float32)  # [N, K]
    rows, cols = q.shape
    z = np.float32(INT4_SYMMETRIC_ZERO) if zeros is None else zeros.astype(np.float32)[:, :, None]
    g = (q.reshape(rows, cols // group, group) - z) * scales.astype(np.float32)[:, :, None]
    return g.reshape(rows, cols)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [N, K] of values 0..15 → uint8 [N, K/2]: even k in the low nibble, odd k in the high one."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] → uint8 [N, K], the inverse of pack_nibbles."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def _refuse_non_finite(values: np.ndarray, name: str, fmt: str) -> None:
    if not np.isfinite(values).all():  # a NaN or ±inf anywhere in a row or group makes its extremes non-finite
        raise QuantizeError(f"tensor {name}: holds NaN or Inf, which {fmt} cannot represent; "
                            f"convert with --dtype bf16 instead; nothing was written")
