"""The quantized-weight kernels (cuda/gemm_quant.cu) against NumPy dequantize-then-matmul, on fresh random inputs with
outputs poisoned (NaN) before every launch: int4 in the device layout of runtime/cuda/quant_layout.py, every group
size, symmetric and asymmetric, 1 … 64 token rows (odd ones too), odd N, every K split, the SiLU·up epilogue, and
the bf16 dequantization for M > 64. Runs on a GPU, or on the CPU emulator (tests/cuda_emulator/run.py).

Tolerances (relative Frobenius error against float64 on the same inputs): f32 outputs ≤ 1e-5 (q − z and x are
exact in bf16, their products exact in f32, the group scale applied in f32); the SiLU·up products (bf16) ≤ 1e-2;
the dequantized matrix bit for bit (bf16 of the f32 product, as NumPy's cast).
"""

from __future__ import annotations

import numpy as np
import pytest

from test_cuda_kernels import BF16, bf16, dev, rel, rng, silu  # noqa: F401  (fixtures: the device, the generator)

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda import kernels as K
from olmoscope.runtime.cuda.quant_layout import Q4Device, dequantize_q4, pack_q4, pack_q8

pytestmark = pytest.mark.cuda


def random_q4(rng, N: int, Kdim: int, group: int, asym: bool):
    """Canonical int4 arrays (qweight, scales, zeros or None) and their float64 matrix [N, K]."""
    qweight = rng.integers(0, 256, (N, Kdim // 2), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.03, (N, Kdim // group)).astype(np.float16)
    zeros = rng.integers(0, 16, (N, Kdim // group), dtype=np.uint8) if asym else None
    return qweight, scales, zeros, dequantize_q4(qweight, scales, zeros).astype(np.float64)


def upload(dev, packed: Q4Device):
    zeros = None if packed.zeros is None else dev.put(packed.zeros, "u8")
    return dev.put(packed.qweight, "u8"), dev.put(packed.scales, "f16"), zeros


def q4_case(dev, rng, N, Kdim, group, asym, pairs=False):
    """(device qweight, scales, zeros, float64 matrix) of a random int4 matrix."""
    qweight, scales, zeros, w = random_q4(rng, N, Kdim, group, asym)
    return (*upload(dev, pack_q4(qweight, scales, zeros, pairs=pairs)), w)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 33, 64])
@pytest.mark.parametrize("group", K.Q4_GROUPS)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_q4_matches_numpy_dequantize_then_matmul(dev, rng, M, group, asym):
    N, Kdim = 333, 640  # odd N (a last tile of 13 rows); K: whole steps of every unroll and a leftover of chunks
    qw, sc, zr, w = q4_case(dev, rng, N, Kdim, group, asym)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M + 1, N), "f32")  # one row more than written
    if M <= K.GEMV_MAX_ROWS:
        dev.kernels.gemv_q4(qw, sc, zr, dev.put(x, "bf16"), out, M, N)
    else:
        dev.kernels.gemm_q4(dev.put(x, "bf16"), qw, sc, zr, out, M, N)
    got = dev.get(out)
    err = rel(got[:M], x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "rows past M were written"


@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("M", [3, 12])
def test_q4_every_k_split_gives_the_same_result(dev, rng, split, M):
    N, Kdim, group = 100, 64 * 27, 64  # 27 chunks: 3 steps of 8 and 3 leftover chunks (U = 8), 6 + 3 (U = 4)
    qw, sc, zr, w = q4_case(dev, rng, N, Kdim, group, asym=True)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M, N), "f32")
    dev.kernels.gemm_q4(dev.put(x, "bf16"), qw, sc, zr, out, M, N, split=split)
    err = rel(dev.get(out), x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


def test_q4_at_a_7b_depth_of_k(dev, rng):
    M, N, Kdim, group = 2, 48, 11008, 128  # down_proj's K: 172 chunks (21 steps of 8 and 4 left over)
    qw, sc, zr, w = q4_case(dev, rng, N, Kdim, group, asym=False)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M, N), "f32")
    dev.kernels.gemv_q4(qw, sc, zr, dev.put(x, "bf16"), out, M, N)
    err = rel(dev.get(out), x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("M", [1, 4, 5, 17, 64])
@pytest.mark.parametrize("group,asym", [(32, True), (128, False)])
def test_q4_silu_pairs_gate_and_up(dev, rng, M, group, asym):
    I, Kdim = 200, 256  # I a multiple of 8, not of 16: a tile of gate rows 8t … 8t+7 and up rows I+8t …
    qw, sc, zr, w = q4_case(dev, rng, 2 * I, Kdim, group, asym, pairs=True)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M + 1, I), "bf16")
    dev.kernels.gemm_q4(dev.put(x, "bf16"), qw, sc, zr, out, M, 2 * I, silu=True)
    gate, up = np.split(x @ w.T, 2, axis=-1)
    got = dev.get(out)
    err = rel(got[:M], silu(gate) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "rows past M were written"


@pytest.mark.parametrize("pairs", [False, True], ids=["plain", "pairs"])
@pytest.mark.parametrize("group,asym", [(32, True), (64, False), (128, True)])
def test_dequantize_q4_is_numpys_bf16_bit_for_bit(dev, rng, pairs, group, asym):
    N, Kdim = (208 if pairs else 211), 384
    qweight, scales, zeros, _ = random_q4(rng, N, Kdim, group, asym)
    qw, sc, zr = upload(dev, pack_q4(qweight, scales, zeros, pairs=pairs))
    out = dev.poisoned((N + 5, Kdim), "bf16")  # a scratch larger than the matrix: its last rows stay untouched
    dev.kernels.dequantize_q4(qw, sc, zr, out, N, pairs=pairs)
    got = dev.get(out)
    want = dequantize_q4(qweight, scales, zeros).astype(BF16).astype(np.float64)
    assert np.array_equal(got[:N], want), f"{np.sum(got[:N] != want)} elements differ"
    assert np.all(np.isnan(got[N:])), "rows past N were written"


def test_q4_beyond_64_rows_dequantize_then_the_bf16_gemm(dev, rng):
    M, N, Kdim, group = 100, 160, 512, 128
    qweight, scales, zeros, w = random_q4(rng, N, Kdim, group, asym=True)
    qw, sc, zr = upload(dev, pack_q4(qweight, scales, zeros))
    scratch = dev.poisoned((N, Kdim), "bf16")
    dev.kernels.dequantize_q4(qw, sc, zr, scratch, N)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M, N), "f32")
    dev.kernels.gemm(dev.put(x, "bf16"), scratch, None, out, M)
    err = rel(dev.get(out), x @ bf16(w).T)
    assert err <= 1e-5, f"rel err {err:.2e}"


def test_q4_launchers_refuse_bad_shapes(dev, rng):
    N, Kdim = 64, 256
    qw, sc, zr, _ = q4_case(dev, rng, N, Kdim, 64, asym=True)
    x, y = dev.poisoned((65, Kdim), "bf16"), dev.poisoned((65, N), "f32")
    with pytest.raises(DeviceError, match="rows"):
        dev.kernels.gemm_q4(x, qw, sc, zr, y, 65, N)
    with pytest.raises(DeviceError, match="rows"):
        dev.kernels.gemv_q4(qw, sc, zr, x, y, 5, N)
    with pytest.raises(DeviceError, match="rows in a device matrix"):
        dev.kernels.gemm_q4(x, qw, sc, zr, y, 4, N + 16)
    with pytest.raises(DeviceError, match="zeros"):
        dev.kernels.gemm_q4(x, qw, sc, sc, y, 4, N)
    with pytest.raises(DeviceError, match="input"):
        dev.kernels.gemm_q4(dev.poisoned((4, Kdim + 64), "bf16"), qw, sc, zr, y, 4, N)
    with pytest.raises(DeviceError, match="silu"):
        dev.kernels.gemm_q4(x, qw, sc, zr, dev.poisoned((4, N // 2), "bf16"), 4, N - 8, silu=True)
    with pytest.raises(DeviceError, match="split"):
        dev.kernels.gemm_q4(x, qw, sc, zr, y, 4, N, split=3)
    with pytest.raises(DeviceError, match="output"):
        dev.kernels.dequantize_q4(qw, sc, zr, dev.poisoned((N, Kdim), "f32"), N)


# ── int8 (per-row scales) on the same tensor-core scheme ───────────────────────────────────────────────
def q8_case(dev, rng, N, Kdim, pairs=False, scale=1.0):
    """(device qweight, scales, float64 matrix) of a random int8 matrix with per-row scales."""
    w = scale * rng.standard_normal((N, Kdim))
    s = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    q = np.round(w / s[:, None]).astype(np.int8)
    packed = pack_q8(q, s, pairs=pairs)
    return dev.put(packed.qweight, "i8"), dev.put(packed.scales, "f32"), q * s[:, None].astype(np.float64)


@pytest.mark.parametrize("M", [1, 2, 4, 5, 9, 16, 23, 33, 64])
def test_q8_matches_numpy(dev, rng, M):
    N, Kdim = 333, 32 * 21  # odd N; 21 chunks: an odd count, a partial last stage
    qw, sc, w = q8_case(dev, rng, N, Kdim)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M + 1, N), "f32")
    dev.kernels.gemm_q8(dev.put(x, "bf16"), qw, sc, out, M, N)
    got = dev.get(out)
    err = rel(got[:M], x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "rows past M were written"


@pytest.mark.parametrize("M,chunks", [(3, 35), (1, 137), (16, 73), (33, 73)])
@pytest.mark.parametrize("split", [1, 2, 4, 8])
def test_q8_every_k_split_gives_the_same_result(dev, rng, M, chunks, split):
    # 73 chunks (stages of 2 from M = 9) and 137 (stages of 4 at M ≤ 8): at every split the rings of four stages wrap,
    # and a tile's last slice ends in a partial stage
    N, Kdim = 100, 32 * chunks
    qw, sc, w = q8_case(dev, rng, N, Kdim)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M, N), "f32")
    dev.kernels.gemm_q8(dev.put(x, "bf16"), qw, sc, out, M, N, split=split)
    err = rel(dev.get(out), x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("M", [1, 4, 17])
def test_q8_silu_pairs_gate_and_up(dev, rng, M):
    I, Kdim = 200, 256
    qw, sc, w = q8_case(dev, rng, 2 * I, Kdim, pairs=True, scale=0.25)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M, I), "bf16")
    dev.kernels.gemm_q8(dev.put(x, "bf16"), qw, sc, out, M, 2 * I, silu=True)
    gate, up = np.split(x @ w.T, 2, axis=-1)
    err = rel(dev.get(out), silu(gate) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"


def test_q8_launcher_refuses_bad_shapes(dev, rng):
    qw, sc, _ = q8_case(dev, rng, 64, 256)
    x, y = dev.poisoned((65, 256), "bf16"), dev.poisoned((65, 64), "f32")
    with pytest.raises(DeviceError, match="rows"):
        dev.kernels.gemm_q8(x, qw, sc, y, 65, 64)
    with pytest.raises(DeviceError, match="device matrix"):
        dev.kernels.gemm_q8(x, qw, sc, y, 4, 80)
    with pytest.raises(DeviceError, match="scales"):
        dev.kernels.gemm_q8(x, qw, dev.poisoned((63,), "f32"), y, 4, 64)


@pytest.mark.parametrize("pairs", [False, True], ids=["plain", "pairs"])
def test_q8_beyond_64_rows_dequantize_then_the_bf16_gemm(dev, rng, pairs):
    M, N, Kdim = 70, (208 if pairs else 211), 256
    w = rng.standard_normal((N, Kdim))
    s = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    q = np.round(w / s[:, None]).astype(np.int8)
    packed = pack_q8(q, s, pairs=pairs)
    widened, row_scales = dev.poisoned((N + 3, Kdim), "bf16"), dev.poisoned((N + 3,), "f32")
    dev.kernels.dequantize_q8(dev.put(packed.qweight, "i8"), dev.put(packed.scales, "f32"), widened, row_scales, N,
                              pairs=pairs)
    got, got_s = dev.get(widened), dev.get(row_scales)
    assert np.array_equal(got[:N], q.astype(np.float64)) and np.array_equal(got_s[:N], s), "not exact"
    assert np.all(np.isnan(got[N:])) and np.all(np.isnan(got_s[N:])), "rows past N were written"
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((M, N), "f32")
    dev.kernels.gemm(dev.put(x, "bf16"), K.DeviceBuffer(widened.ptr, (N, Kdim), "bf16"),
                     K.DeviceBuffer(row_scales.ptr, (N,), "f32"), out, M)
    err = rel(dev.get(out), x @ (q * s[:, None].astype(np.float64)).T)
    assert err <= 1e-5, f"rel err {err:.2e}"


# The Hopper int8 GEMM (gemm_sm90_tma.cu gemm90tma_q8*: the packed int8 matrix through TMA copies, widened to bf16
# wgmma fragments in registers; sm_90, or the emulator's models of wgmma, ldmatrix and the copies): against float64 on
# odd N (a last device tile of 13 rows, a last 128-row weight tile of 5 device tiles), K % 64 = 32 (a half k-tile at
# the end: its other half reads the next tile's bytes, times x's zero fill), token tiles cut short, split-K partials,
# persistent CTAs walking many units, and rows past M left alone.
def q8_tma_skip(dev):
    if not dev.kernels.hopper:
        pytest.skip("the Hopper int8 GEMM needs an sm_90 GPU (or the emulator)")


# M ≤ 128 runs every unit as a half tile of 128 tokens; 500 tokens on 3 CTAs leave one of 4 tiles for a last round
# of two half tiles (gemm90t_schedule), the second partial (tokens 384 … 499).
@pytest.mark.parametrize("M,N,chunks,splits,ctas", [(65, 333, 21, 1, None), (300, 200, 16, 1, 3), (70, 144, 34, 3, None),
                                                    (1, 40, 2, 1, None), (257, 1040, 8, 2, 5), (500, 200, 16, 1, 3)])
def test_q8_tma_matches_numpy(dev, rng, M, N, chunks, splits, ctas):
    q8_tma_skip(dev)
    Kdim = 32 * chunks
    qw, sc, w = q8_case(dev, rng, N, Kdim)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((splits, M + 1, N), "f32")
    parts = K.DeviceBuffer(out.ptr, (splits * M, N), "f32")  # splits × [M, N], then one row never written
    dev.kernels.gemm_q8_tma(dev.put(x, "bf16"), qw, sc, parts, M, N, splits=splits, ctas=ctas)
    got = dev.get(out).reshape(-1, N)
    err = rel(got[:splits * M].reshape(splits, M, N).sum(axis=0), x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"
    assert np.all(np.isnan(got[splits * M:])), "rows past the partials were written"


@pytest.mark.parametrize("M,ctas", [(100, None), (260, 1), (500, 6)])  # 500 on 6 CTAs: 8 tiles, 2 as half tiles
def test_q8_tma_silu_pairs_gate_and_up(dev, rng, M, ctas):
    q8_tma_skip(dev)
    I, Kdim = 200, 32 * 11
    qw, sc, w = q8_case(dev, rng, 2 * I, Kdim, pairs=True, scale=0.25)
    x = bf16(rng.standard_normal((M, Kdim)))
    want = x @ w.T
    out = dev.poisoned((M + 1, I), "bf16")
    dev.kernels.gemm_q8_tma(dev.put(x, "bf16"), qw, sc, out, M, 2 * I, silu=True, ctas=ctas)
    got = dev.get(out)
    gate, up = np.split(want, 2, axis=-1)
    err = rel(got[:M], silu(gate) * up)
    assert err <= 1e-2, f"silu: rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "rows past M were written"
    parts = dev.poisoned((2 * M, 2 * I), "f32")  # the plain kernel on a pairs matrix: canonical [gate; up] columns
    dev.kernels.gemm_q8_tma(dev.put(x, "bf16"), qw, sc, parts, M, 2 * I, splits=2, pairs=True, ctas=ctas)
    err = rel(dev.get(parts).reshape(2, M, 2 * I).sum(axis=0), want)
    assert err <= 1e-5, f"pairs partials: rel err {err:.2e}"


# int4 on the same pipeline: every group size, symmetric and asymmetric, against the dequantized matrix rounded to
# bf16 (the weights the kernel builds are dequantize_q4's, bit for bit; only the order of the f32 sums differs).
@pytest.mark.parametrize("group,asym", [(32, True), (64, False), (128, True), (128, False)])
@pytest.mark.parametrize("M,N,Kdim,splits,ctas", [(65, 333, 640, 1, None), (300, 200, 512, 2, 3), (500, 200, 256, 1, 3)])
def test_q4_tma_matches_numpy(dev, rng, group, asym, M, N, Kdim, splits, ctas):
    q8_tma_skip(dev)
    qw, sc, zr, w = q4_case(dev, rng, N, Kdim, group, asym)
    x = bf16(rng.standard_normal((M, Kdim)))
    out = dev.poisoned((splits, M + 1, N), "f32")
    parts = K.DeviceBuffer(out.ptr, (splits * M, N), "f32")
    dev.kernels.gemm_q4_tma(dev.put(x, "bf16"), qw, sc, zr, parts, M, N, splits=splits, ctas=ctas)
    got = dev.get(out).reshape(-1, N)
    err = rel(got[:splits * M].reshape(splits, M, N).sum(axis=0), x @ bf16(w).T)
    assert err <= 1e-5, f"rel err {err:.2e}"
    assert np.all(np.isnan(got[splits * M:])), "rows past the partials were written"



@pytest.mark.parametrize("group,asym", [(32, True), (64, True), (128, False)])
def test_q4_tma_weights_are_dequantize_q4s_bit_for_bit(dev, rng, group, asym):
    """x = the identity, so output row k is column k of the weights the kernel built, each times 1 alone in its sum:
    they must equal bf16(dequantize_q4) exactly, for scales over f16's whole range (subnormals too), where the bf16
    split of the scale (s_hi + s_lo) is what keeps the single rounding."""
    q8_tma_skip(dev)
    N, Kdim = 40, 256
    qweight, _, zeros, _ = random_q4(rng, N, Kdim, group, asym)
    scales = (10.0 ** rng.uniform(-7.5, 4.5, (N, Kdim // group)) * rng.choice([-1, 1], (N, Kdim // group)))
    scales = scales.astype(np.float16)
    want = bf16(dequantize_q4(qweight, scales, zeros))
    qw, sc, zr = upload(dev, pack_q4(qweight, scales, zeros))
    out = dev.poisoned((Kdim, N), "f32")
    dev.kernels.gemm_q4_tma(dev.put(np.eye(Kdim), "bf16"), qw, sc, zr, out, Kdim, N)
    got = dev.get(out).T
    wrong = np.count_nonzero(got != want)
    assert wrong == 0, f"{wrong} of {want.size} weights differ from dequantize_q4's bf16 (max |Δ| " \
                       f"{np.max(np.abs(got - want)):.3g})"

@pytest.mark.parametrize("group", [32, 128])
def test_q4_tma_silu_pairs_gate_and_up(dev, rng, group):
    q8_tma_skip(dev)
    M, I, Kdim = 90, 200, 256
    qw, sc, zr, w = q4_case(dev, rng, 2 * I, Kdim, group, asym=True, pairs=True)
    x = bf16(rng.standard_normal((M, Kdim)))
    want = x @ bf16(w).T
    out = dev.poisoned((M + 1, I), "bf16")
    dev.kernels.gemm_q4_tma(dev.put(x, "bf16"), qw, sc, zr, out, M, 2 * I, silu=True)
    got = dev.get(out)
    gate, up = np.split(want, 2, axis=-1)
    err = rel(got[:M], silu(gate) * up)
    assert err <= 1e-2, f"silu: rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "rows past M were written"
    parts = dev.poisoned((M, 2 * I), "f32")
    dev.kernels.gemm_q4_tma(dev.put(x, "bf16"), qw, sc, zr, parts, M, 2 * I, pairs=True, ctas=2)
    err = rel(dev.get(parts), want)
    assert err <= 1e-5, f"pairs: rel err {err:.2e}"


def test_q8_tma_launcher_refuses_bad_shapes(dev, rng):
    q8_tma_skip(dev)
    qw, sc, _ = q8_case(dev, rng, 64, 256)
    x, y = dev.poisoned((70, 256), "bf16"), dev.poisoned((70, 64), "f32")
    with pytest.raises(DeviceError, match="device matrix"):
        dev.kernels.gemm_q8_tma(x, qw, sc, y, 70, 80)
    with pytest.raises(DeviceError, match="scales"):
        dev.kernels.gemm_q8_tma(x, qw, dev.poisoned((63,), "f32"), y, 70, 64)
    with pytest.raises(DeviceError, match="splits"):
        dev.kernels.gemm_q8_tma(x, qw, sc, y, 70, 64, splits=5)  # 4 k-tiles
    with pytest.raises(DeviceError, match="silu"):
        dev.kernels.gemm_q8_tma(x, qw, sc, dev.poisoned((70, 32), "bf16"), 70, 64, silu=True, splits=2)
    with pytest.raises(DeviceError, match="output"):
        dev.kernels.gemm_q8_tma(x, qw, sc, dev.poisoned((69, 64), "f32"), 70, 64)
    with pytest.raises(DeviceError, match="CTAs"):
        dev.kernels.gemm_q8_tma(x, qw, sc, y, 70, 64, ctas=dev.kernels.sm_count + 1)
    q4w, q4s, q4z, _ = q4_case(dev, rng, 64, 256, 64, asym=True)
    with pytest.raises(DeviceError, match="zeros"):
        dev.kernels.gemm_q4_tma(x, q4w, q4s, dev.put(np.zeros((64, 4)), "u8"), y, 70, 64)
    with pytest.raises(DeviceError, match="device matrix"):
        dev.kernels.gemm_q4_tma(x, q4w, q4s, q4z, y, 70, 40)
    with pytest.raises(DeviceError, match="input"):
        dev.kernels.gemm_q4_tma(dev.poisoned((70, 128), "bf16"), q4w, q4s, q4z, y, 70, 64)


def test_q8_resident_warps_match_the_loaded_kernels(dev):
    """kernels.Q8_RESIDENT_WARPS (q8_split's input) from the cubins: registers (allocated per warp in 256s) and shared
    memory (static + dynamic + the 1 KB the driver reserves per block) against the multiprocessor's."""
    probe = dev.kernels.functions["q8_mma_n1"]
    if not hasattr(probe, "num_regs"):
        pytest.skip("register counts come from a GPU's loaded cubins (the emulator has none)")
    attribute = dev.kernels.cuda.device_attribute
    device = dev.kernels.cuda.Context.get_device()
    regs_sm = device.get_attribute(attribute.MAX_REGISTERS_PER_MULTIPROCESSOR)
    smem_sm = device.get_attribute(attribute.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
    for nt, expected in K.Q8_RESIDENT_WARPS.items():
        blocks = []
        for name in (f"q8_mma_n{nt}", f"q8_mma_silu_n{nt}"):
            f = dev.kernels.functions[name]
            per_warp = -(-f.num_regs * 32 // 256) * 256
            smem = f.shared_size_bytes + dev.kernels.smem[name] + 1024
            blocks.append(min(regs_sm // (per_warp * K.Q4_WARPS), smem_sm // smem, 64 // K.Q4_WARPS))
        assert min(blocks) * K.Q4_WARPS == expected, (nt, blocks, expected)
