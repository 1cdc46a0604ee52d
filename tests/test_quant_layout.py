"""runtime/cuda/quant_layout.py on the CPU: the int4 device layout is a permutation of the canonical engine layout
(unpack_q4 gives back exactly the arrays pack_q4 was given), and every element sits where the module docstring (and
cuda/gemm_quant.cu) says it does."""

from __future__ import annotations

import numpy as np
import pytest

from olmoscope.errors import DeviceError
from olmoscope.quantize import unpack_nibbles
from olmoscope.runtime.cuda.quant_layout import (Q4_GROUPS, dequantize_q4, pack_q4, pack_q8, q4_device_bytes, tile_rows,
                                                unpack_q4, unpack_q8)


def canonical(rng, N: int, K: int, group: int, asym: bool):
    qweight = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (N, K // group)).astype(np.float16)
    zeros = rng.integers(0, 16, (N, K // group), dtype=np.uint8) if asym else None
    return qweight, scales, zeros


CASES = [(N, K, group, asym, pairs) for group in Q4_GROUPS for asym in (False, True)
         for (N, K, pairs) in ((1, 128, False), (37, 384, False), (400, 256, True), (48, 1152, True))]


@pytest.mark.parametrize("N,K,group,asym,pairs", CASES)
def test_pack_then_unpack_gives_back_the_canonical_arrays_exactly(N, K, group, asym, pairs):
    rng = np.random.default_rng(N * K + group)
    qweight, scales, zeros = canonical(rng, N, K, group, asym)
    packed = pack_q4(qweight, scales, zeros, pairs=pairs)
    Np = -(-N // 16) * 16
    assert packed.qweight.shape == (Np, K // 2) and packed.scales.shape == (Np, K // group)
    assert packed.zeros is None if not asym else packed.zeros.shape == (Np // 2, K // group)
    q2, s2, z2 = unpack_q4(packed)
    assert np.array_equal(q2, qweight) and np.array_equal(s2.view(np.uint16), scales.view(np.uint16))
    assert (z2 is None) == (zeros is None) and (zeros is None or np.array_equal(z2, zeros))


@pytest.mark.parametrize("pairs", [False, True])
def test_every_element_sits_where_the_kernels_read_it(pairs):
    """Read each (row, k) back through the documented formulas: lane 4g + c, word j, nibble i of tile t, chunk q."""
    rng = np.random.default_rng(7)
    N, K, group = 48, 256, 32
    qweight, scales, zeros = canonical(rng, N, K, group, asym=True)
    packed = pack_q4(qweight, scales, zeros, pairs=pairs)
    q = unpack_nibbles(qweight)
    words = packed.qweight.reshape(-1).view("<u4").reshape(N // 16, K // 64, 32, 4)
    srcs = tile_rows(N, pairs)
    for dev_row, src in enumerate(srcs):
        t, r = divmod(dev_row, 16)
        g, h = r % 8, r // 8
        for k in range(K):
            chunk, kk = divmod(k, 64)
            jh, rest = divmod(kk, 32)
            c, rest = divmod(rest, 8)
            jl, e = divmod(rest, 4)
            i = h + 2 * (e >> 1) + 4 * (e & 1)
            nibble = (int(words[t, chunk, 4 * g + c, 2 * jh + jl]) >> (4 * i)) & 15
            assert nibble == q[src, k], f"row {src} k {k}"
        grp = np.arange(K // group)
        s = packed.scales.reshape(N // 16, K // group, 8, 2)[t, grp, g, h]
        z = (packed.zeros.reshape(N // 16, K // group, 8)[t, grp, g] >> (4 * h)) & 15
        assert np.array_equal(s, scales[src]) and np.array_equal(z, zeros[src])
    if pairs:  # tile t: gate rows 8t … 8t+7, then up rows I+8t …
        assert list(srcs[:16]) == [*range(8), *range(24, 32)]


def test_padding_rows_dequantize_to_zero_and_the_reference_is_fp32():
    rng = np.random.default_rng(3)
    qweight, scales, zeros = canonical(rng, 5, 64, 32, asym=True)
    packed = pack_q4(qweight, scales, zeros)
    s = packed.scales.reshape(1, 2, 8, 2).transpose(0, 3, 2, 1).reshape(16, 2)  # tile rows g + 8h, groups
    z = packed.zeros.reshape(1, 2, 8).transpose(0, 2, 1)
    z = np.concatenate([z & 15, z >> 4], axis=1).reshape(16, 2)
    assert not s[5:].any() and not z[5:].any(), "pad rows carry scale and zero 0"
    w = dequantize_q4(qweight, scales, zeros)
    q = unpack_nibbles(qweight).astype(np.float32)
    assert w.dtype == np.float32
    assert w[2, 40] == (q[2, 40] - np.float32(zeros[2, 1])) * np.float32(scales[2, 1])
    assert np.array_equal(dequantize_q4(qweight, scales, None)[0, :32], (q[0, :32] - 8) * np.float32(scales[0, 0]))


@pytest.mark.parametrize("N,K,group,pairs,match", [(16, 96, 32, False, "multiple of 64"),
                                                   (16, 128, 16, False, "group size"),
                                                   (24, 128, 64, True, "pairs")])
def test_shapes_the_kernels_cannot_take_are_refused(N, K, group, pairs, match):
    rng = np.random.default_rng(0)
    qweight = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    scales = np.ones((N, K // group), np.float16)
    with pytest.raises(DeviceError, match=match):
        pack_q4(qweight, scales, None, pairs=pairs)


@pytest.mark.parametrize("N,K,pairs", [(1, 32, False), (37, 96, False), (400, 256, True)])
def test_int8_pack_then_unpack_gives_back_the_canonical_arrays_exactly(N, K, pairs):
    rng = np.random.default_rng(N + K)
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    scales = rng.uniform(0.001, 0.02, N).astype(np.float32)
    packed = pack_q8(q, scales, pairs=pairs)
    assert packed.qweight.shape == (-(-N // 16) * 16, K) and packed.scales.shape == (packed.qweight.shape[0],)
    q2, s2 = unpack_q8(packed)
    assert np.array_equal(q2, q) and np.array_equal(s2, scales)


def test_int8_elements_sit_where_the_kernels_read_them():
    rng = np.random.default_rng(5)
    N, K = 32, 64
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    words = pack_q8(q, np.ones(N, np.float32)).qweight.reshape(N // 16, K // 32, 32, 4, 4)  # bytes e of word
    for n in range(N):
        t, r = divmod(n, 16)
        g, h = r % 8, r // 8
        for k in range(K):
            chunk, rest = divmod(k, 32)
            c, rest = divmod(rest, 8)
            j, e = divmod(rest, 4)
            byte = (0, 2, 1, 3)[e]  # a k pair in bytes 0, 2 or 1, 3 (gemm_quant.cu q8_pair)
            assert words[t, chunk, 4 * g + c, 2 * j + h, byte] == q[n, k], f"row {n} k {k}"


@pytest.mark.parametrize("N,asymmetric", [(333, True), (48, False), (32, True)])
def test_q4_device_bytes_is_what_pack_q4_makes(N, asymmetric):
    """The upload's memory plan (runtime/cuda/weights.py) counts exactly the bytes pack_q4 returns."""
    rng = np.random.default_rng(N)
    K, G = 256, 64
    qweight = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    scales = rng.random((N, K // G)).astype(np.float16)
    zeros = rng.integers(0, 16, (N, K // G), dtype=np.uint8) if asymmetric else None
    packed = pack_q4(qweight, scales, zeros)
    made = sum(a.nbytes for a in (packed.qweight, packed.scales, packed.zeros) if a is not None)
    assert q4_device_bytes(N, K, G, asymmetric) == made
