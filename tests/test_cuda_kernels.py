"""Each CUDA kernel alone against NumPy on fresh random inputs, outputs poisoned with NaN (ints: −1) before every
launch, so an element a kernel forgets, or a cache entry it should not read, shows.

Tolerances (relative Frobenius error ‖gpu − ref‖/‖ref‖, the reference in float64 on the same bf16 inputs):
- f32 outputs of exact bf16 (or int8) products with f32 accumulation (GEMV, GEMM and its split-K partials, the
  residual norm): ≤ 1e-5;
- outputs rounded to bf16 (rotated q/k, v in the cache, attention, the SiLU·up products, the final norm's rows):
  ≤ 1e-2 (bf16 keeps 8 significant bits: one rounding is ≤ 2^-9 ≈ 2e-3 relative per element; attention also
  rounds its probabilities to bf16 for P·V);
- bit-exact: embedding rows, widened int8, the repetition penalty (same f32 division as NumPy), token
  preparation and seen sets, block copies, greedy choices;
- sampling: the same draw as runtime/sampler.py's NumPy rules except right at a boundary (f32 sums on the GPU
  against f64), as the counts in each test state.
A 1e-2 error cannot see one key too many or too few among a thousand, so the attention tests also poison every
cache entry no query may read (NaN) and put a dominant "spike" key at each visibility boundary.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from olmoscope.runtime import reference
from olmoscope.runtime.sampler import (SamplingParams, candidate_probabilities, draw, generated_penalties,
                                       penalized_logits, token_logprobs)

pytestmark = pytest.mark.cuda
driver = pytest.importorskip("olmoscope.runtime.cuda.driver")
usable, why = driver.available()
if not usable:
    pytest.skip(f"CUDA unavailable: {why}", allow_module_level=True)

import pycuda.driver as cuda  # noqa: E402

from olmoscope.errors import DeviceError  # noqa: E402
from olmoscope.runtime.cuda import kernels as K  # noqa: E402
from olmoscope.runtime.cuda.driver import CudaGraph, DeviceBuffer  # noqa: E402

BF16 = ml_dtypes.bfloat16
NUMPY_OF = {"bf16": BF16, "f32": np.float32, "i8": np.int8, "i32": np.int32, "u8": np.uint8, "f16": np.float16}
BS = K.BLOCK_SIZE


class Device:
    """A context, a stream and the kernels; buffers made here are freed at the end of the module."""

    def __init__(self):
        cuda.init()
        self.context = cuda.Device(0).retain_primary_context()
        self.context.push()
        self.stream = cuda.Stream()
        self.kernels = K.Kernels(cuda, cuda.Device(0), self.stream)
        self.sm_count = self.kernels.sm_count
        self.buffers: list[DeviceBuffer] = []

    def put(self, array, dtype: str) -> DeviceBuffer:
        array = np.ascontiguousarray(array, dtype=NUMPY_OF[dtype])
        allocation = cuda.mem_alloc(max(array.nbytes, 1))
        buffer = DeviceBuffer(int(allocation), array.shape, dtype, allocation)
        cuda.memcpy_htod(buffer.ptr, array)
        self.buffers.append(buffer)
        return buffer

    def poisoned(self, shape: tuple[int, ...], dtype: str) -> DeviceBuffer:
        """A buffer full of NaN (f32/bf16) or -1 (ints): an element the kernel forgot shows."""
        fill = -1 if dtype in ("i8", "i32") else np.nan
        return self.put(np.full(shape, fill), dtype)

    def get(self, buffer: DeviceBuffer) -> np.ndarray:
        self.stream.synchronize()
        out = np.empty(buffer.shape, NUMPY_OF[buffer.dtype])
        cuda.memcpy_dtoh(out, buffer.ptr)
        return out.astype(np.float64) if buffer.dtype in ("bf16", "f32") else out

    def set(self, buffer: DeviceBuffer, array) -> None:
        self.stream.synchronize()
        cuda.memcpy_htod(buffer.ptr, np.ascontiguousarray(array, dtype=NUMPY_OF[buffer.dtype]))

    def close(self):
        for buffer in self.buffers:
            buffer.free()
        self.context.pop()


@pytest.fixture(scope="module")
def dev():
    device = Device()
    yield device
    device.close()


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % (1 << 32))


def rel(got: np.ndarray, want: np.ndarray) -> float:
    assert np.all(np.isfinite(got)), f"{np.sum(~np.isfinite(got))} elements unwritten or not finite"
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def bf16(array) -> np.ndarray:
    """Rounded to bf16, back as float64: the exact values the GPU sees."""
    return np.asarray(array, np.float32).astype(BF16).astype(np.float64)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


# ── embedding, token preparation, seen sets ─────────────────────────────────────────────────────────
def test_embedding_gathers_rows_exactly(dev, rng):
    V, D, T = 1001, 264, 37
    table = bf16(rng.standard_normal((V, D)))
    ids = rng.integers(0, V, T)
    h, hb = dev.poisoned((T, D), "f32"), dev.poisoned((T, D), "bf16")
    dev.kernels.embedding(dev.put(table, "bf16"), None, dev.put(ids, "i32"), h, hb, T)
    assert np.array_equal(dev.get(h), table[ids]) and np.array_equal(dev.get(hb), table[ids])


def test_embedding_int8_scales_rows(dev, rng):
    V, D, T = 300, 128, 9
    q = rng.integers(-127, 128, (V, D)).astype(np.int8)
    scales = rng.uniform(0.001, 0.02, V).astype(np.float32)
    ids = rng.integers(0, V, T)
    h = dev.poisoned((T, D), "f32")
    dev.kernels.embedding(dev.put(q, "i8"), dev.put(scales, "f32"), dev.put(ids, "i32"), h, None, T)
    err = rel(dev.get(h), q[ids] * scales[ids, None].astype(np.float64))
    assert err <= 1e-6, f"rel err {err:.2e}"


def seen_bits(V: int, history: dict[int, list[int]], states: int) -> np.ndarray:
    """uint32 [states, ceil(V/32)] bitsets with history[state]'s ids set."""
    words = math.ceil(V / 32)
    bits = np.zeros((states, words), np.uint32)
    for state, ids in history.items():
        for i in ids:
            bits[state, i // 32] |= np.uint32(1) << np.uint32(i % 32)
    return bits


def as_i32(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.int32)


@pytest.mark.parametrize("T", [1, 7, 300])
def test_prepare_tokens_feeds_back_samples_and_marks_seen(dev, rng, T):
    V, states = 1000, 12
    ids = rng.integers(0, V, T)
    ids[rng.random(T) < 0.5] = -1  # decode rows: the sequence's previous sample
    state = rng.integers(0, states, T)
    state[rng.random(T) < 0.1] = -1  # padding rows: no state, nothing marked, their id left alone
    last = rng.integers(0, V, states)
    before = seen_bits(V, {s: list(rng.integers(0, V, 5)) for s in range(states)}, states)
    ids_buf, seen = dev.put(ids, "i32"), dev.put(as_i32(before), "i32")
    dev.kernels.prepare_tokens(ids_buf, dev.put(last, "i32"), dev.put(state, "i32"), seen, T)
    want_ids = np.where((ids < 0) & (state >= 0), last[np.maximum(state, 0)], ids)
    assert np.array_equal(dev.get(ids_buf), want_ids)
    want = before.copy()
    for i, s in zip(want_ids, state):
        if s >= 0 and i >= 0:
            want[s, i // 32] |= np.uint32(1) << np.uint32(i % 32)
    assert np.array_equal(dev.get(seen).view(np.uint32), want)


def test_mark_seen_sets_exactly_the_given_bits(dev, rng):
    V, states, n = 100352, 5, 2000
    ids, st = rng.integers(0, V, n), rng.integers(0, states, n)
    seen = dev.put(np.zeros((states, math.ceil(V / 32)), np.int32), "i32")
    dev.kernels.mark_seen(dev.put(ids, "i32"), dev.put(st, "i32"), seen, n)
    history = {s: list(ids[st == s]) for s in range(states)}
    assert np.array_equal(dev.get(seen).view(np.uint32), seen_bits(V, history, states))


# ── norms ───────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("T,parts,D", [(T, parts, D) for T in (1, 5, 64) for parts in (1, 2, 3, 4)
                                         for D in (64, 1000, 4096)] + [(3, 8, 8192), (64, 8, 4096)])
def test_residual_rmsnorm_add_sums_partials_then_norms(dev, rng, D, T, parts):
    eps = 1e-6
    h0, w = rng.standard_normal((T, D)), 1 + 0.1 * rng.standard_normal(D)
    partials = (3 * rng.standard_normal((parts, T, D))).astype(np.float32)
    stride = (T + 2) * D if parts > 1 else T * D  # a padded part stride: the kernel must use it, not T·D
    flat = np.full((parts * stride // D, D), np.nan, np.float32)
    for p in range(parts):
        flat[p * stride // D:p * stride // D + T] = partials[p]
    a = dev.put(flat, "f32")
    h, hb = dev.put(h0, "f32"), dev.poisoned((T, D), "bf16")
    dev.kernels.residual_norm(h, a, parts, stride, dev.put(w, "f32"), hb, T, eps)
    total = partials.astype(np.float64).sum(axis=0)
    want = h0 + total / np.sqrt(np.mean(total ** 2, axis=-1, keepdims=True) + eps) * w
    err, err_b = rel(dev.get(h), want), rel(dev.get(hb), want)
    assert err <= 1e-5 and err_b <= 1e-2, f"rel err f32 {err:.2e}, bf16 copy {err_b:.2e}"


@pytest.mark.parametrize("R", [1, 3, 40])
def test_rmsnorm_rows_norms_just_the_chosen_rows(dev, rng, R):
    T, D, eps = 50, 2048, 1e-6
    x, w = rng.standard_normal((T, D)), 1 + 0.1 * rng.standard_normal(D)
    rows = rng.choice(T, R, replace=False)
    out = dev.poisoned((R + 2, D), "bf16")
    dev.kernels.rmsnorm_rows(dev.put(x, "f32"), dev.put(rows, "i32"), dev.put(w, "f32"), out, R, eps)
    want = reference.rms_norm(x[rows].astype(np.float32), w.astype(np.float32), eps)
    got = dev.get(out)
    assert rel(got[:R], want) <= 1e-2
    assert np.all(np.isnan(got[R:])), "rows past the count were written"


# ── QK-norm, RoPE, paged cache append ───────────────────────────────────────────────────────────────
@pytest.mark.parametrize("T", [1, 7, 70])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("H,Hkv,d", [(4, 4, 64), (8, 2, 128), (4, 2, 16), (10, 2, 32), (64, 8, 128)])
def test_qk_norm_rope_append_writes_q_and_the_paged_slots(dev, rng, H, Hkv, d, T, parts, per_head):
    eps, theta, num_blocks = 1e-6, 500000.0, 40
    width = (H + 2 * Hkv) * d
    partials = rng.standard_normal((parts, T, width)).astype(np.float32)
    qkv = partials.astype(np.float64).sum(axis=0)
    qn, kn = (1 + 0.1 * rng.standard_normal(H * d)), (1 + 0.1 * rng.standard_normal(Hkv * d))
    inv_freq = np.float32(1) / np.power(np.float32(theta), np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    positions = rng.integers(0, 4096, T)
    slots = rng.choice(np.arange(BS, num_blocks * BS), T, replace=False)  # never the null block
    q_out = dev.poisoned((T, H, d), "bf16")
    kp, vp = dev.poisoned((num_blocks, Hkv, BS, d), "bf16"), dev.poisoned((num_blocks, Hkv, BS, d), "bf16")
    dev.kernels.qk_norm_rope_append(dev.put(partials.reshape(parts * T, width), "f32"), parts, T * width,
                                    dev.put(qn, "f32"), dev.put(kn, "f32"), dev.put(inv_freq, "f32"), q_out, kp, vp,
                                    dev.put(positions, "i32"), dev.put(slots, "i32"), T, eps, per_head=per_head)
    q, k, v = np.split(qkv.astype(np.float32), [H * d, H * d + Hkv * d], axis=-1)
    cos, sin = reference.rope_tables(positions, d, theta)
    q_ref = reference.apply_rope(reference.rms_norm(q, qn.astype(np.float32), eps).reshape(T, H, d), cos, sin)
    k_ref = reference.apply_rope(reference.rms_norm(k, kn.astype(np.float32), eps).reshape(T, Hkv, d), cos, sin)
    kg, vg = dev.get(kp), dev.get(vp)
    blocks, offsets = slots // BS, slots % BS
    k_got, v_got = kg[blocks, :, offsets], vg[blocks, :, offsets]  # [T, Hkv, d]
    errs = (rel(dev.get(q_out), q_ref), rel(k_got, k_ref), rel(v_got, v.reshape(T, Hkv, d)))
    assert max(errs) <= 1e-2, f"rel err q {errs[0]:.2e}, k {errs[1]:.2e}, v {errs[2]:.2e}"
    untouched = np.ones((num_blocks, BS), bool)
    untouched[blocks, offsets] = False
    assert np.all(np.isnan(kg.transpose(0, 2, 1, 3)[untouched])), "k written outside its slots"
    assert np.all(np.isnan(vg.transpose(0, 2, 1, 3)[untouched])), "v written outside its slots"


def test_norm_and_rope_refuse_vectors_wider_than_a_block_holds(dev):
    """residual_rmsnorm_add and qk_norm_rope_append keep a whole vector in one block's registers: a wider one is a
    clear error, not a vector left partly unwritten."""
    D = 4 * K.NORM_ITEMS * K.NORM_THREADS + 4
    h, a, w = dev.poisoned((1, D), "f32"), dev.poisoned((1, D), "f32"), dev.poisoned((D,), "f32")
    with pytest.raises(DeviceError, match=f"D = {D}"):
        dev.kernels.residual_norm(h, a, 1, D, w, None, 1, 1e-6)
    H, d = 8 * K.ROPE_ITEMS * K.ROPE_THREADS // 64 + 1, 64
    kp = dev.poisoned((2, 1, BS, d), "bf16")
    with pytest.raises(DeviceError, match=f"{H} heads of {d}"):
        dev.kernels.qk_norm_rope_append(dev.poisoned((1, (H + 2) * d), "f32"), 1, (H + 2) * d,
                                        dev.poisoned((H * d,), "f32"), dev.poisoned((d,), "f32"),
                                        dev.poisoned((d // 2,), "f32"), dev.poisoned((1, H, d), "bf16"), kp, kp,
                                        dev.put(np.zeros(1), "i32"), dev.put(np.zeros(1), "i32"), 1, 1e-6)


# ── GEMV (1 … 4 rows) ────────────────────────────────────────────────────────────────────────────────
def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = np.abs(w).max(axis=1) / 127
    return np.round(w / scales[:, None]).astype(np.int8), scales.astype(np.float32)


def weights(dev, rng, N: int, Kdim: int, kind: str, scale: float = 1.0):
    """(device weight, device scales or None, the effective float64 matrix)."""
    w = scale * rng.standard_normal((N, Kdim))
    if kind == "bf16":
        w = bf16(w)
        return dev.put(w, "bf16"), None, w
    q, s = quantize_rows(w)
    return dev.put(q, "i8"), dev.put(s, "f32"), q * s[:, None].astype(np.float64)


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("N,Kdim", [(1001, 784), (2, 16), (6144, 2048), (4096, 11008)])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_gemv_matches_numpy(dev, rng, M, N, Kdim, kind):
    wb, sb, w = weights(dev, rng, N, Kdim, kind)
    x = bf16(rng.standard_normal((M, Kdim)))
    y = dev.poisoned((M + 1, N), "f32")
    dev.kernels.gemv(wb, sb, dev.put(x, "bf16"), y, M)
    got = dev.get(y)
    err = rel(got[:M], x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "the GEMV wrote rows past M"


@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_gemv_every_k_split_gives_the_same_result(dev, rng, split, kind):
    M, N, Kdim = 3, 517, 8 * 1224  # every one of 8 slices streams; K not a multiple of the unrolled stride (tail loop)
    wb, sb, w = weights(dev, rng, N, Kdim, kind)
    x = bf16(rng.standard_normal((M, Kdim)))
    y = dev.poisoned((M, N), "f32")
    dev.kernels.gemv(wb, sb, dev.put(x, "bf16"), y, M, split=split)
    err = rel(dev.get(y), x @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_gemv_silu_pairs_gate_and_up(dev, rng, M, kind):
    I, Kdim = 344, 256
    wb, sb, w = weights(dev, rng, 2 * I, Kdim, kind, scale=0.25)
    x = bf16(rng.standard_normal((M, Kdim)))
    y = dev.poisoned((M, I), "bf16")
    dev.kernels.gemv(wb, sb, dev.put(x, "bf16"), y, M, silu=True)
    gate, up = np.split(x @ w.T, 2, axis=-1)
    err = rel(dev.get(y), silu(gate) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"


def test_gemv_refuses_more_rows_than_it_has(dev, rng):
    wb, _, _ = weights(dev, rng, 64, 64, "bf16")
    with pytest.raises(DeviceError, match="rows"):
        dev.kernels.gemv(wb, None, dev.poisoned((5, 64), "bf16"), dev.poisoned((5, 64), "f32"), 5)


# ── GEMM (any M), split-K, SiLU ─────────────────────────────────────────────────────────────────────
def gemm_parts(dev, a, w, wb, sb, M, N, splits, bm=None, variant="stream"):
    """The summed split-K partials of A·Wᵀ, after checking that the kernel wrote every partial."""
    c = dev.poisoned((splits, M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), wb, sb, c, M, splits=splits, bm=bm, variant=variant)
    return dev.get(c).sum(axis=0)


def planned(dev, a, wb, sb, M, N, Kdim, silu=False):
    """The projection as the backend runs it (Kernels.plan: GEMV, v1, stream-K or sm90; SiLU fused or through
    silu_mul_parts): the f32 result [M, N], or the bf16 SiLU·up product [M, N/2]."""
    plan = dev.kernels.plan(M, N, Kdim, silu=silu)
    x = dev.put(a, "bf16")
    if plan.variant == "gemv":
        out = dev.poisoned((M, N // 2) if silu else (M, N), "bf16" if silu else "f32")
        dev.kernels.gemv(wb, sb, x, out, M, silu=silu)
        return dev.get(out), plan
    if silu and plan.splits == 1:
        out = dev.poisoned((M, N // 2), "bf16")
        dev.kernels.gemm(x, wb, sb, out, M, silu=True, bm=plan.bm, variant=plan.variant)
        return dev.get(out), plan
    parts = dev.poisoned((plan.splits, M, N), "f32")
    dev.kernels.gemm(x, wb, sb, parts, M, splits=plan.splits, bm=plan.bm, variant=plan.variant)
    if not silu:
        return dev.get(parts).sum(axis=0), plan
    out = dev.poisoned((M, N // 2), "bf16")
    dev.kernels.silu_mul_parts(parts, plan.splits, M * N, out, M)
    return dev.get(out), plan


@pytest.mark.parametrize("M", [1, 2, 3, 5, 16, 17, 33, 64, 100, 256, 300, 2048])
@pytest.mark.parametrize("N,Kdim", [(1001, 776), (384, 2048), (1600, 256)])
def test_gemm_with_the_planned_kernel_and_splits_matches_numpy(dev, rng, M, N, Kdim):
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    got, plan = planned(dev, a, dev.put(w, "bf16"), None, M, N, Kdim)
    err = rel(got, a @ w.T)
    assert err <= 1e-5, f"{plan}: rel err {err:.2e}"


@pytest.mark.parametrize("M", [2, 7, 64, 130])
def test_gemm_planned_silu_matches_numpy(dev, rng, M):
    I, Kdim = 1536, 512  # N = 2I ≥ 2K: the GEMV at M = 2
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((2 * I, Kdim)) / 8)
    got, plan = planned(dev, a, dev.put(w, "bf16"), None, M, 2 * I, Kdim, silu=True)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    err = rel(got, silu(gate) * up)
    assert err <= 1e-2, f"{plan}: rel err {err:.2e}"


@pytest.mark.parametrize("bm", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_gemm_every_tile_and_split_count(dev, rng, bm, splits):
    M, N, Kdim = 37, 1001, 64 * 9 + 8  # a partial last k-tile; 16 splits of 10 k-tiles leave some empty
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    err = rel(gemm_parts(dev, a, w, dev.put(w, "bf16"), None, M, N, splits, bm=bm), a @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


def test_gemm_rows_beyond_m_are_left_alone(dev, rng):
    M, N, Kdim = 50, 128, 64
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    for bm in K.GEMM_TILES:
        c = dev.poisoned((M + 30, N), "f32")
        dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, bm=bm)
        got = dev.get(c)
        assert np.all(np.isnan(got[M:])), f"bm {bm}: the GEMM wrote rows past M"
        assert rel(got[:M], a @ w.T) <= 1e-5


@pytest.mark.parametrize("bm", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("M", [5, 130])
def test_gemm_silu_pairs_gate_and_up(dev, rng, bm, M):
    I, Kdim = 352, 256
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((2 * I, Kdim)) / 8)
    c = dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, silu=True, bm=bm)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    err = rel(dev.get(c), silu(gate) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_silu_mul_parts_sums_partials_of_gate_and_up(dev, rng, parts):
    M, I = 19, 344
    partials = rng.standard_normal((parts, M, 2 * I)).astype(np.float32)
    out = dev.poisoned((M, I), "bf16")
    dev.kernels.silu_mul_parts(dev.put(partials, "f32"), parts, M * 2 * I, out, M)
    total = partials.astype(np.float64).sum(axis=0)
    err = rel(dev.get(out), silu(total[:, :I]) * total[:, I:])
    assert err <= 1e-2, f"rel err {err:.2e}"


def test_split_gemm_then_silu_mul_parts_is_the_fused_silu_gemm(dev, rng):
    M, I, Kdim = 24, 512, 1024
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((2 * I, Kdim)) / 16)
    splits = K.gemm_splits(K.gemm_tile(M), M, 2 * I, Kdim, dev.sm_count)
    assert splits > 1, "this small gate_up should split"
    parts, out = dev.poisoned((splits, M, 2 * I), "f32"), dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, parts, M, splits=splits)
    dev.kernels.silu_mul_parts(parts, splits, M * 2 * I, out, M)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    assert rel(dev.get(out), silu(gate) * up) <= 1e-2


# The stream-K schedule (splits = 1): `ctas` persistent CTAs share the tiles' k-tiles; tiles cut by chunk boundaries
# are summed by the last of their CTAs from the others' partial slots. Few CTAs make whole tiles plus cut ones (the
# data-parallel waves and the stream-K remainder); many make tiles of many parts, down to one k-tile each.
@pytest.mark.parametrize("bm", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("ctas", [1, 3, 7, 40, 132])
def test_gemm_stream_k_with_any_number_of_ctas(dev, rng, bm, ctas):
    M, N, Kdim = 37 if bm != 16 else 13, 1001, 128 * 9 + 8  # a partial last k-tile, an odd N
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    c = dev.poisoned((M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, bm=bm, ctas=ctas)
    err = rel(dev.get(c), a @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


def test_gemm_stream_k_leaves_its_tickets_zero_and_repeats_bit_for_bit(dev, rng):
    M, N, Kdim = 20, 512, 2048  # 4 tiles of 16 k-tiles over 64 CTAs: every tile in 16 parts
    a, w = dev.put(bf16(rng.standard_normal((M, Kdim))), "bf16"), dev.put(bf16(rng.standard_normal((N, Kdim))), "bf16")
    runs = []
    for ctas in (64, 64, 5):
        c = dev.poisoned((M, N), "f32")
        dev.kernels.gemm(a, w, None, c, M, bm=32, ctas=ctas)
        runs.append(dev.get(c))
        tickets = np.empty(dev.kernels.gemm_ctas, np.int32)
        dev.stream.synchronize()
        cuda.memcpy_dtoh(tickets, int(dev.kernels._gemm_tickets))
        assert not tickets.any(), "a stream-K ticket was left non-zero (the next launch would misjudge its last CTA)"
    assert np.array_equal(runs[0], runs[1]), "the same schedule summed in a different order"
    assert rel(runs[2], runs[0]) <= 1e-5  # other cut points: the same sums reassociated in fp32 (measured 1.2e-6, H200)


@pytest.mark.parametrize("bm", [16, 64, 128, 256])
@pytest.mark.parametrize("ctas", [3, 50])
def test_gemm_stream_k_fused_silu_and_int8_scales_through_cut_tiles(dev, rng, bm, ctas):
    M, I, Kdim = 21, 328, 136 * 8
    a = bf16(rng.standard_normal((M, Kdim)))
    q, s = quantize_rows(rng.standard_normal((2 * I, Kdim)) / 8)
    wb, sb = dev.put(q.astype(np.float64), "bf16"), dev.put(s, "f32")
    c = dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), wb, sb, c, M, silu=True, bm=bm, ctas=ctas)
    gate, up = np.split(a @ (q * s[:, None].astype(np.float64)).T, 2, axis=-1)
    err = rel(dev.get(c), silu(gate) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("bm", [16, 32, 64, 128])
def test_gemm_v1_kernels_still_match_numpy(dev, rng, bm):
    M, N, Kdim = 37, 1001, 64 * 9 + 8
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    _, splits = K.gemm_v1_plan(M, N, Kdim, dev.sm_count)
    c = dev.poisoned((3, M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, splits=3, bm=bm, variant="v1")
    assert rel(dev.get(c).sum(axis=0), a @ w.T) <= 1e-5
    I = 352
    ws = bf16(rng.standard_normal((2 * I, Kdim)) / 8)
    out = dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(ws, "bf16"), None, out, M, silu=True, bm=bm, variant="v1")
    gate, up = np.split(a @ ws.T, 2, axis=-1)
    assert rel(dev.get(out), silu(gate) * up) <= 1e-2


# The Hopper GEMMs (planned on sm_90 unless GEMM_HOPPER is off), each test over both: "sm90" (gemm_sm90.cu: cp.async
# copies by every thread, wgmma from swizzled shared memory) and "tma" (gemm_sm90_tma.cu: a TMA producer warp, an
# mbarrier ring, consumer warpgroups, persistent CTAs; out-of-range rows and columns are the TMA's zero fill). On an
# sm_90 GPU, and on the CPU emulator's models of wgmma, mbarriers and bulk tensor copies. Partial tiles in M, N and K,
# odd N, rows past M.
HOPPER_VARIANTS = ("sm90", "tma")


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("M,N,Kdim", [(1, 256, 64), (130, 1001, 776), (300, 512, 2048), (2048, 768, 1024),
                                      (77, 12288, 4096)])
def test_gemm_hopper_wgmma_matches_numpy(dev, rng, M, N, Kdim, variant):
    if not dev.kernels.hopper:
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (not emulated)")
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    c = dev.poisoned((M + 5, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, variant=variant)
    got = dev.get(c)
    assert np.all(np.isnan(got[M:])), "the wgmma GEMM wrote rows past M"
    err = rel(got[:M], a @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("M,bm", [(5, None), (520, None), (9, 64), (64, 64)])  # bm 64: the skinny tile
def test_gemm_hopper_wgmma_fused_silu_and_int8_scales(dev, rng, M, bm, variant):
    if not dev.kernels.hopper:
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (not emulated)")
    I, Kdim = 328, 1088
    a = bf16(rng.standard_normal((M, Kdim)))
    q, s = quantize_rows(rng.standard_normal((2 * I, Kdim)) / 8)
    c = dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(q.astype(np.float64), "bf16"), dev.put(s, "f32"), c, M, silu=True,
                     bm=bm, variant=variant)
    gate, up = np.split(a @ (q * s[:, None].astype(np.float64)).T, 2, axis=-1)
    err = rel(dev.get(c), silu(gate) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"


# Grid split-K on both wgmma tiles (bm64: the skinny-M decode kernel, warpgroup 0 computing, warpgroup 1 copying;
# bm128: two computing warpgroups): odd M and N, a partial last k-tile, split counts that leave splits empty (they
# write zeros), every partial poisoned first.
@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("bm,M", [(64, 37), (64, 64), (64, 100), (128, 100)])
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_gemm_hopper_wgmma_split_k_matches_numpy(dev, rng, bm, M, splits, variant):
    if not dev.kernels.hopper:
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (not emulated)")
    N, Kdim = 1001, 64 * 9 + 8  # 4 column tiles, the last one partial; 10 k-tiles, the last one partial
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)))
    err = rel(gemm_parts(dev, a, w, dev.put(w, "bf16"), None, M, N, splits, bm=bm, variant=variant), a @ w.T)
    assert err <= 1e-5, f"bm {bm}, {splits} splits: rel err {err:.2e}"


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("M", [3, 64])
def test_gemm_hopper_wgmma_bm64_rows_past_m_and_int8_scales(dev, rng, M, variant):
    if not dev.kernels.hopper:
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (not emulated)")
    N, Kdim = 520, 200
    a = bf16(rng.standard_normal((M, Kdim)))
    q, s = quantize_rows(rng.standard_normal((N, Kdim)))
    c = dev.poisoned((M + 7, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(q.astype(np.float64), "bf16"), dev.put(s, "f32"), c, M, bm=64,
                     variant=variant)
    got = dev.get(c)
    assert np.all(np.isnan(got[M:])), "the bm64 wgmma GEMM wrote rows past M"
    err = rel(got[:M], a @ (q * s[:, None].astype(np.float64)).T)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
def test_gemm_hopper_wgmma_split_partials_then_silu_mul_parts(dev, rng, variant):
    if not dev.kernels.hopper:
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (not emulated)")
    M, I, Kdim = 21, 264, 704
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((2 * I, Kdim)) / 16)
    parts, out = dev.poisoned((3, M, 2 * I), "f32"), dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, parts, M, splits=3, bm=64, variant=variant)
    dev.kernels.silu_mul_parts(parts, 3, M * 2 * I, out, M)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    assert rel(dev.get(out), silu(gate) * up) <= 1e-2


# The skinny plan at a shape big enough for it (16 column tiles × 4 splits = 64 CTAs), as the backend runs it.
@pytest.mark.parametrize("M,gate_up", [(17, False), (64, False), (40, True)])
def test_gemm_planned_skinny_wgmma_matches_numpy(dev, rng, M, gate_up):
    if not dev.kernels.hopper:
        pytest.skip("the wgmma GEMM needs an sm_90 GPU (not emulated)")
    N, Kdim = 4096, 2048
    if K.gemm_plan(M, N, Kdim, dev.sm_count, silu=gate_up, hopper=True).variant != "sm90":
        pytest.skip(f"the skinny plan does not pick the wgmma kernel with {dev.sm_count} multiprocessors")
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)) / 8)
    got, plan = planned(dev, a, dev.put(w, "bf16"), None, M, N, Kdim, silu=gate_up)
    if K.GEMM_HOPPER and K.GEMM_SKINNY:
        assert plan.variant in HOPPER_VARIANTS and plan.splits > 1, plan
    ref = a @ w.T
    if gate_up:
        gate, up = np.split(ref, 2, axis=-1)
        ref = silu(gate) * up
    err = rel(got, ref)
    assert err <= (1e-2 if gate_up else 1e-5), f"{plan}: rel err {err:.2e}"


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
def test_gemm_hopper_wgmma_refuses_fused_silu_splits_other_tiles_and_other_gpus(dev, rng, variant):
    a, w = dev.poisoned((8, 64), "bf16"), dev.poisoned((64, 64), "bf16")
    with pytest.raises(DeviceError, match="silu"):
        dev.kernels.gemm(a, w, None, dev.poisoned((8, 32), "bf16"), 8, silu=True, splits=2, variant=variant)
    with pytest.raises(DeviceError, match=f"{variant}|sm_90"):
        dev.kernels.gemm(a, w, None, dev.poisoned((8, 64), "f32"), 8, bm=32, variant=variant)


# The TMA GEMM's persistent CTAs: few CTAs walk many work units (tiles × splits), so the mbarrier ring wraps through
# many phases and the producer runs into the next unit while the consumers store the last one; plain and SiLU.
@pytest.mark.parametrize("bm,ctas", [(64, 1), (64, 5), (128, 2), (128, 7)])
def test_gemm_tma_persistent_ctas_walk_every_unit(dev, rng, bm, ctas):
    if not dev.kernels.hopper:
        pytest.skip("the TMA GEMM needs an sm_90 GPU (not emulated)")
    M, N, Kdim, splits = 150, 600, 64 * 5 + 24, 2  # 3 (bm64) or 2 row tiles × 3 column tiles × 2 splits
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)) / 8)
    c = dev.poisoned((splits, M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, splits=splits, bm=bm, variant="tma", ctas=ctas)
    err = rel(dev.get(c).sum(axis=0), a @ w.T)
    assert err <= 1e-5, f"bm {bm}, {ctas} CTAs: rel err {err:.2e}"
    out = dev.poisoned((M, N // 2), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, out, M, silu=True, bm=bm, variant="tma", ctas=ctas)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    err = rel(dev.get(out), silu(gate) * up)
    assert err <= 1e-2, f"bm {bm}, {ctas} CTAs, silu: rel err {err:.2e}"


# A last round of at most half the grid runs as half tiles (gemm90t_schedule): 6 tiles on 4 CTAs (bm128) and 9 on 6
# (bm64) leave 2 and 3 tiles for 4 and 6 half units, all in the last column tile. N = 700: its first half whole and
# its second partial (plain: columns 640 … 699; silu: gate columns 320 … 349 of I = 350); N = 600: the first half
# partial and the second wholly past N.
@pytest.mark.parametrize("N", [700, 600])
@pytest.mark.parametrize("bm,ctas", [(128, 4), (64, 6)])
def test_gemm_tma_last_round_as_half_tiles(dev, rng, bm, ctas, N):
    if not dev.kernels.hopper:
        pytest.skip("the TMA GEMM needs an sm_90 GPU (or the emulator)")
    M, Kdim = 150, 64 * 5 + 24
    a, w = bf16(rng.standard_normal((M, Kdim))), bf16(rng.standard_normal((N, Kdim)) / 8)
    c = dev.poisoned((M + 1, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, bm=bm, variant="tma", ctas=ctas)
    got = dev.get(c)
    err = rel(got[:M], a @ w.T)
    assert err <= 1e-5, f"bm {bm}, {ctas} CTAs: rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "rows past M were written"
    out = dev.poisoned((M + 1, N // 2), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, out, M, silu=True, bm=bm, variant="tma", ctas=ctas)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    got = dev.get(out)
    err = rel(got[:M], silu(gate) * up)
    assert err <= 1e-2, f"bm {bm}, {ctas} CTAs, silu: rel err {err:.2e}"
    assert np.all(np.isnan(got[M:])), "silu: rows past M were written"


def test_gemm_tma_encodes_each_tensor_map_once(dev, rng):
    if not dev.kernels.hopper:
        pytest.skip("the TMA GEMM needs an sm_90 GPU (not emulated)")
    M, N, Kdim = 40, 512, 256
    a, w = dev.put(bf16(rng.standard_normal((M, Kdim))), "bf16"), dev.put(bf16(rng.standard_normal((N, Kdim))), "bf16")
    maps = dev.kernels.tensor_maps
    before = len(maps)
    for _ in range(3):
        dev.kernels.gemm(a, w, None, dev.poisoned((M, N), "f32"), M, variant="tma")
    assert len(maps) == before + 2, "A's map and W's map, once each for three launches"
    dev.kernels.gemm(a, w, None, dev.poisoned((M - 1, N), "f32"), M - 1, variant="tma")
    assert len(maps) == before + 3, "another row count is another A map (its zero fill starts at row M)"


def test_gemm_tma_replays_from_a_graph_with_new_inputs(dev, rng):
    if not dev.kernels.hopper:
        pytest.skip("the TMA GEMM needs an sm_90 GPU")
    M, N, Kdim = 70, 768, 512
    w = bf16(rng.standard_normal((N, Kdim)))
    a, wb, c = dev.poisoned((M, Kdim), "bf16"), dev.put(w, "bf16"), dev.poisoned((M, N), "f32")
    graph = CudaGraph(dev.stream)
    graph.capture(lambda: dev.kernels.gemm(a, wb, None, c, M, variant="tma"))
    try:
        for _ in range(2):  # the maps captured with the launch still name a's buffer: new contents, new result
            x = bf16(rng.standard_normal((M, Kdim)))
            dev.set(a, x)
            dev.set(c, np.full((M, N), np.nan))
            graph.launch()
            err = rel(dev.get(c), x @ w.T)
            assert err <= 1e-5, f"replay: rel err {err:.2e}"
    finally:
        graph.close()


def test_gemm_refuses_a_grid_beyond_its_scratch_and_unknown_variants(dev, rng):
    a, w, c = dev.poisoned((8, 64), "bf16"), dev.poisoned((64, 64), "bf16"), dev.poisoned((8, 64), "f32")
    with pytest.raises(DeviceError, match="CTAs"):
        dev.kernels.gemm(a, w, None, c, 8, ctas=dev.kernels.gemm_ctas + 1)
    with pytest.raises(DeviceError, match="variant"):
        dev.kernels.gemm(a, w, None, c, 8, variant="v0")


@pytest.mark.parametrize("M", [5, 70])
def test_int8_gemm_widens_exactly_and_scales_rows(dev, rng, M):
    N, Kdim = 200, 512
    a = bf16(rng.standard_normal((M, Kdim)))
    q, s = quantize_rows(rng.standard_normal((N, Kdim)))
    widened = dev.poisoned((N, Kdim), "bf16")
    dev.kernels.widen_int8(dev.put(q, "i8"), widened)
    assert np.array_equal(dev.get(widened), q.astype(np.float64)), "widening int8 to bf16 is not exact"
    plan = dev.kernels.plan(M, N, Kdim)
    c = dev.poisoned((plan.splits, M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), widened, dev.put(s, "f32"), c, M, splits=plan.splits, bm=plan.bm,
                     variant=plan.variant)
    err = rel(dev.get(c).sum(axis=0), a @ (q * s[:, None].astype(np.float64)).T)
    assert err <= 1e-5, f"{plan}: rel err {err:.2e}"


# ── paged attention ─────────────────────────────────────────────────────────────────────────────────
class PagedCache:
    """One layer's K/V planes [num_blocks, Hkv, 16, d] with random contents, per-sequence block tables of shuffled,
    non-contiguous block ids, and NaN wherever no query may read: the null block 0, the positions of a last block
    past its sequence's context, and (through table entries past a sequence's blocks, which point at block 0)
    anything beyond."""

    def __init__(self, rng, contexts, Hkv: int, d: int, spare_blocks: int = 7):
        self.contexts = list(contexts)
        needed = [math.ceil(c / BS) for c in self.contexts]
        self.width = max(needed) + 2
        self.num_blocks = 1 + sum(needed) + spare_blocks
        self.k = bf16(rng.standard_normal((self.num_blocks, Hkv, BS, d)))
        self.v = bf16(rng.standard_normal((self.num_blocks, Hkv, BS, d)))
        ids = rng.permutation(np.arange(1, self.num_blocks))
        self.tables = np.zeros((len(self.contexts), self.width), np.int32)
        at = 0
        for s, n in enumerate(needed):
            self.tables[s, :n] = ids[at:at + n]
            at += n
            if self.contexts[s] % BS and n:  # positions past the context in the last block
                self.k[ids[at - 1], :, self.contexts[s] % BS:] = np.nan
                self.v[ids[at - 1], :, self.contexts[s] % BS:] = np.nan
        self.k[0] = self.v[0] = np.nan

    def keys(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence s's cached keys and values, [context, Hkv, d] each, in position order."""
        n = math.ceil(self.contexts[s] / BS)
        blocks = self.tables[s, :n]
        k = self.k[blocks].transpose(0, 2, 1, 3).reshape(n * BS, *self.k.shape[1::2])[: self.contexts[s]]
        v = self.v[blocks].transpose(0, 2, 1, 3).reshape(n * BS, *self.v.shape[1::2])[: self.contexts[s]]
        return k, v

    def set_key(self, s: int, position: int, k_value: np.ndarray, v_value: np.ndarray) -> None:
        block, offset = self.tables[s, position // BS], position % BS
        self.k[block, :, offset] = k_value
        self.v[block, :, offset] = v_value

    def upload(self, dev):
        return dev.put(self.k, "bf16"), dev.put(self.v, "bf16"), dev.put(self.tables, "i32")


def attention_reference(q: np.ndarray, positions, keys: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """float64 causal (windowed) GQA attention of q [R, H, d] at `positions` over keys/values [ctx, Hkv, d]."""
    R, H, d = q.shape
    Hkv = keys.shape[1]
    positions = np.asarray(positions)
    key_pos = np.arange(keys.shape[0])
    visible = key_pos[None, :] <= positions[:, None]
    if window:
        visible &= key_pos[None, :] >= positions[:, None] - window + 1
    out = np.empty((R, H, d))
    for j in range(H):
        kv = j // (H // Hkv)
        scores = np.where(visible, q[:, j] @ np.nan_to_num(keys[:, kv]).T / math.sqrt(d), -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, j] = (p / p.sum(axis=1, keepdims=True)) @ np.nan_to_num(values[:, kv])
    return out.reshape(R, H * d)


def run_decode(dev, cache: PagedCache, q: np.ndarray, H: int, Hkv: int, d: int, splits: int, window: int,
               extra_rows: int = 3):
    B = len(cache.contexts)
    kp, vp, tables = cache.upload(dev)
    out = dev.poisoned((B + extra_rows, H * d), "bf16")
    counters = dev.put(np.zeros(B * Hkv), "i32")
    part_o = dev.poisoned((B, H, splits, d), "f32") if splits > 1 else None
    part_ml = dev.poisoned((B, H, splits, 2), "f32") if splits > 1 else None
    qb = dev.put(np.concatenate([q, np.zeros((extra_rows, H, d))]), "bf16")
    dev.kernels.paged_decode(qb, kp, vp, out, part_o, part_ml, counters, dev.put(cache.contexts, "i32"), tables, B,
                             splits, window)
    got = dev.get(out)
    assert np.all(np.isnan(got[B:])), "paged_decode wrote rows past the decode sequences"
    assert not dev.get(counters).any(), "the merge tickets were not reset for the next step"
    return got[:B]


def decode_reference(cache: PagedCache, q: np.ndarray, window: int) -> np.ndarray:
    return np.concatenate([attention_reference(q[s:s + 1], [c - 1], *cache.keys(s), window)
                           for s, c in enumerate(cache.contexts)])


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("H,Hkv,d", [(2, 2, 128), (4, 2, 64), (8, 2, 32), (10, 2, 16), (40, 8, 128), (8, 1, 64)])
def test_paged_decode_matches_numpy(dev, rng, H, Hkv, d, splits):
    contexts = [1, 15, 16, 17, 1000, 4096, 33, 2]
    cache = PagedCache(rng, contexts, Hkv, d)
    q = bf16(rng.standard_normal((len(contexts), H, d)))
    err = rel(run_decode(dev, cache, q, H, Hkv, d, splits, 0), decode_reference(cache, q, 0))
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("window", [1, 7, 16, 17, 100])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode_sliding_window(dev, rng, window, splits):
    H, Hkv, d = 4, 2, 64
    contexts = [1, 15, 16, 17, 40, 1000, 333]
    cache = PagedCache(rng, contexts, Hkv, d)
    q = bf16(rng.standard_normal((len(contexts), H, d)))
    err = rel(run_decode(dev, cache, q, H, Hkv, d, splits, window), decode_reference(cache, q, window))
    assert err <= 1e-2, f"rel err {err:.2e}"


def spike_cache(rng, contexts, Hkv, d, H, q, where):
    """Put a key at position where(s) of each sequence s that every query head scores far above the rest, with a
    distinct value: the output is then ≈ that value when the key is visible, and far from it when it is not."""
    cache = PagedCache(rng, contexts, Hkv, d)
    values = {}
    for s, c in enumerate(contexts):
        p = where(s, c)
        if p is None:
            continue
        k = np.stack([bf16(8 * q[s, kv * (H // Hkv)] / np.linalg.norm(q[s, kv * (H // Hkv)]) * math.sqrt(d))
                      for kv in range(Hkv)])
        v = bf16(5 + rng.standard_normal((Hkv, d)))
        cache.set_key(s, p, k, v)
        values[s] = v
    return cache, values


@pytest.mark.parametrize("window", [0, 5, 16])
@pytest.mark.parametrize("edge", ["first", "last", "before_window"])
def test_paged_decode_sees_exactly_its_visible_keys(dev, rng, window, edge):
    if window == 0 and edge == "before_window":
        pytest.skip("a full causal window has no key before it")
    H, Hkv, d = 2, 2, 64
    contexts = [16, 17, 32, 47, 300, 1000]
    q = bf16(rng.standard_normal((len(contexts), H, d)))
    q[:, 1] = q[:, 0]  # both heads aim at the same spike key
    lo = lambda c: max(0, c - window) if window else 0  # noqa: E731 (the first visible key of the query at c − 1)
    where = {"first": lambda s, c: lo(c), "last": lambda s, c: c - 1,
             "before_window": lambda s, c: lo(c) - 1 if lo(c) > 0 else None}[edge]
    cache, spikes = spike_cache(rng, contexts, Hkv, d, H, q, where)
    got = run_decode(dev, cache, q, H, Hkv, d, 3, window).reshape(len(contexts), H, d)
    want = decode_reference(cache, q, window).reshape(len(contexts), H, d)
    assert rel(got, want) <= 1e-2
    for s, v in spikes.items():
        distance = np.abs(got[s, 0] - v[0]).max()
        if edge == "before_window":
            assert distance > 2, f"sequence {s}: the key before the window was attended"
        else:
            assert distance < 0.1, f"sequence {s}: the visible spike key at the {edge} position was missed"


def test_paged_decode_with_more_splits_than_blocks_and_padding_sequences(dev, rng):
    H, Hkv, d = 4, 4, 32
    contexts = [1, 3, 0, 20]  # context 0: a padding sequence, zero output
    cache = PagedCache(rng, [max(c, 1) for c in contexts], Hkv, d)
    cache.contexts = contexts
    q = bf16(rng.standard_normal((len(contexts), H, d)))
    got = run_decode(dev, cache, q, H, Hkv, d, 16, 0)
    assert np.all(got[2] == 0), "a padding sequence's row is not zero"
    real = [0, 1, 3]
    want = np.concatenate([attention_reference(q[s:s + 1], [contexts[s] - 1], *cache.keys(s), 0) for s in real])
    assert rel(got[real], want) <= 1e-2


def test_paged_decode_replays_from_a_graph_with_new_contexts(dev, rng):
    """Per-step values come from device memory and the merge tickets reset: a captured launch replays correctly."""
    H, Hkv, d, splits = 8, 4, 128, 6
    cache = PagedCache(rng, [700, 90, 1200], Hkv, d)
    B = 3
    kp, vp, tables = cache.upload(dev)
    q = bf16(rng.standard_normal((B, H, d)))
    qb, out = dev.put(q, "bf16"), dev.poisoned((B, H * d), "bf16")
    part_o, part_ml = dev.poisoned((B, H, splits, d), "f32"), dev.poisoned((B, H, splits, 2), "f32")
    counters, ctx = dev.put(np.zeros(B * Hkv), "i32"), dev.put([1, 1, 1], "i32")
    graph = CudaGraph(dev.stream)
    graph.capture(lambda: dev.kernels.paged_decode(qb, kp, vp, out, part_o, part_ml, counters, ctx, tables, B, splits))
    try:
        for contexts in ([700, 90, 1200], [13, 77, 1199], [700, 90, 1200]):  # within each sequence's cache
            dev.set(ctx, contexts)
            graph.launch()
            want = np.concatenate([attention_reference(q[s:s + 1], [c - 1], *cache.keys(s), 0)[:, :]
                                   for s, c in enumerate(contexts)])
            assert rel(dev.get(out), want) <= 1e-2, f"contexts {contexts}"
            assert not dev.get(counters).any()
    finally:
        graph.close()


def test_a_programmatic_graph_keeps_every_dependency(dev, rng):
    """Programmatic edges (PDL) let a kernel launch before the one it depends on has finished; grid_dependency_sync
    must still hold it until the data is there. A chain where each kernel reads what the previous one wrote, over
    matrices large enough that an early reader would see the last replay's values, replayed with new inputs. The
    GEMV's weights are the previous kernel's output here, so it is told they are not static (with static weights it
    copies its first ones before the wait: this test failed that way on an H200)."""
    N, Kd = 4096, 4096
    q = dev.put(np.zeros((N, Kd)), "i8")
    widened, x = dev.poisoned((N, Kd), "bf16"), dev.put(bf16(rng.standard_normal((1, Kd))), "bf16")
    y, widened_again = dev.poisoned((1, N), "f32"), dev.poisoned((N, Kd), "bf16")

    def chain():
        dev.kernels.widen_int8(q, widened)  # y depends on it through widened
        dev.kernels.gemv(widened, None, x, y, 1, static_weights=False)
        dev.kernels.widen_int8(q, widened_again)  # the same values again: a write after the gemv's reads

    programmatic = cuda.Device(0).compute_capability() >= (9, 0)  # whatever OLMOSCOPE_PDL says for the backend
    graph = CudaGraph(dev.stream, programmatic=programmatic)
    graph.capture(chain)
    try:
        if programmatic:
            assert graph.programmatic_edges == 2, f"{graph.programmatic_edges} edges made programmatic, expected 2"
        for seed in range(3):
            values = np.random.default_rng(seed).integers(-127, 128, (N, Kd), dtype=np.int8)
            dev.set(q, values)
            graph.launch()
            want = values.astype(np.float64) @ dev.get(x)[0]
            assert rel(dev.get(y)[0], want) <= 1e-5, f"replay {seed}: {rel(dev.get(y)[0], want):.2e}"
            assert np.array_equal(dev.get(widened_again), values), f"replay {seed}: the last kernel's output"
    finally:
        graph.close()


def ragged_batch(rng, decode_contexts, prefill: list[tuple[int, int]]):
    """(contexts, first_row, rows) of a step: decode sequences (one row each) first, then prefill sequences given as
    (cached prefix, new rows)."""
    contexts = list(decode_contexts) + [cached + new for cached, new in prefill]
    rows = [1] * len(decode_contexts) + [new for _, new in prefill]
    first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int32)
    return contexts, first, np.asarray(rows, np.int32)


# paged_prefill's kernels: attention.cu's (mma.sync, every GPU) and attention_sm90.cu's (wgmma: sm_90 GPUs, d = 64 and
# 128; also on the CPU emulator's model of wgmma). The tests below run each where it runs.
PREFILL_VARIANTS = ["mma", "sm90"]


def needs_prefill_variant(dev, variant: str, d: int) -> None:
    if variant == "sm90" and not dev.kernels.hopper:
        pytest.skip("the wgmma prefill attention needs an sm_90 GPU (or the CPU emulator)")
    if variant == "sm90" and d not in K.HEAD_DIMS_SM90:
        pytest.skip(f"the wgmma prefill attention has d in {K.HEAD_DIMS_SM90}, not {d}")


def run_prefill(dev, cache: PagedCache, q: np.ndarray, first, rows, decode_seqs: int, window: int,
                variant: str | None = None):
    T, H, d = q.shape
    kp, vp, tables = cache.upload(dev)
    tile_seq, tile_first = K.prefill_tiles(first, rows, decode_seqs=decode_seqs)
    out = dev.poisoned((T, H * d), "bf16")
    dev.kernels.paged_prefill(dev.put(q, "bf16"), kp, vp, out, dev.put(tile_seq, "i32"), dev.put(tile_first, "i32"),
                              dev.put(first, "i32"), dev.put(rows, "i32"), dev.put(cache.contexts, "i32"), tables,
                              len(tile_seq), window, variant=variant)
    got = dev.get(out)
    decode_rows = int(first[decode_seqs]) if decode_seqs < len(first) else T
    assert np.all(np.isnan(got[:decode_rows])), "paged_prefill wrote a decode sequence's row"
    return got


def prefill_reference(cache: PagedCache, q: np.ndarray, first, rows, decode_seqs: int, window: int) -> np.ndarray:
    T, H, d = q.shape
    want = np.full((T, H * d), np.nan)
    for s in range(decode_seqs, len(rows)):
        r0, n, c = int(first[s]), int(rows[s]), cache.contexts[s]
        want[r0:r0 + n] = attention_reference(q[r0:r0 + n], np.arange(c - n, c), *cache.keys(s), window)
    return want


@pytest.mark.parametrize("variant", PREFILL_VARIANTS)
@pytest.mark.parametrize("H,Hkv,d", [(2, 2, 128), (4, 2, 64), (4, 1, 32), (10, 2, 16), (16, 2, 128)])
@pytest.mark.parametrize("window", [0, 37])
def test_paged_prefill_ragged_batch_matches_numpy(dev, rng, H, Hkv, d, window, variant):
    # two decode sequences, then prefill chunks with cached prefixes of different lengths (0, 15, 16, 17, 700)
    needs_prefill_variant(dev, variant, d)
    contexts, first, rows = ragged_batch(rng, [40, 7], [(0, 100), (15, 1), (16, 64), (17, 65), (700, 130), (0, 1)])
    cache = PagedCache(rng, contexts, Hkv, d)
    q = bf16(rng.standard_normal((int(rows.sum()), H, d)))
    got = run_prefill(dev, cache, q, first, rows, 2, window, variant)
    want = prefill_reference(cache, q, first, rows, 2, window)
    err = rel(got[first[2]:], want[first[2]:])
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("variant", PREFILL_VARIANTS)
@pytest.mark.parametrize("window", [1, 16, 64, 65, 200])
def test_paged_prefill_windows_that_mask_whole_first_tiles(dev, rng, window, variant):
    """A row whose first key tiles are all outside its window must still come out finite and right."""
    H, Hkv, d = 2, 1, 64
    needs_prefill_variant(dev, variant, d)
    contexts, first, rows = ragged_batch(rng, [], [(300, 200), (0, 129)])
    cache = PagedCache(rng, contexts, Hkv, d)
    q = bf16(rng.standard_normal((int(rows.sum()), H, d)))
    got = run_prefill(dev, cache, q, first, rows, 0, window, variant)
    err = rel(got, prefill_reference(cache, q, first, rows, 0, window))
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("variant", PREFILL_VARIANTS)
@pytest.mark.parametrize("edge", ["own_position", "first_visible", "before_window"])
def test_paged_prefill_sees_exactly_its_visible_keys(dev, rng, edge, variant):
    H, Hkv, d, window = 2, 2, 64, 20
    needs_prefill_variant(dev, variant, d)
    contexts, first, rows = ragged_batch(rng, [], [(50, 1), (31, 1), (200, 1)])  # one row each: one spike each
    q = bf16(rng.standard_normal((3, H, d)))
    q[:, 1] = q[:, 0]
    lo = lambda c: c - window  # noqa: E731 (first key visible to the query at c − 1)
    where = {"own_position": lambda s, c: c - 1, "first_visible": lambda s, c: lo(c),
             "before_window": lambda s, c: lo(c) - 1}[edge]
    cache, spikes = spike_cache(rng, contexts, Hkv, d, H, q, where)
    got = run_prefill(dev, cache, q, first, rows, 0, window, variant).reshape(3, H, d)
    for s, v in spikes.items():
        distance = np.abs(got[s, 0] - v[0]).max()
        if edge == "before_window":
            assert distance > 2, f"sequence {s}: the key before the window was attended"
        else:
            assert distance < 0.1, f"sequence {s}: the spike at {edge} was missed"


@pytest.mark.parametrize("variant", PREFILL_VARIANTS)
def test_paged_prefill_then_decode_of_one_sequence_agree(dev, rng, variant):
    """A prefill row at the last position attends exactly what a decode of that position does."""
    H, Hkv, d = 8, 2, 128
    needs_prefill_variant(dev, variant, d)
    cache = PagedCache(rng, [517], Hkv, d)
    q = bf16(rng.standard_normal((70, H, d)))
    first, rows = np.array([0], np.int32), np.array([70], np.int32)
    pre = run_prefill(dev, cache, q, first, rows, 0, 0, variant)
    dec = run_decode(dev, cache, q[-1:], H, Hkv, d, 4, 0)
    assert rel(dec, pre[-1:]) <= 1e-2


# The wgmma kernel pairs consecutive 64-row tiles in one CTA: one K/V stream for two tiles of a sequence, two passes
# for tiles of two sequences (19 tiles here: pairs inside a sequence, across sequences, a lone last
# tile), key tiles of 128 that the earlier tile's rows partly or wholly skip or see one key of (a last row at a
# multiple of 128), odd prefixes and lengths, GQA groups.
@pytest.mark.parametrize("H,Hkv,d", [(8, 2, 128), (4, 4, 64), (6, 1, 128)])
@pytest.mark.parametrize("window", [0, 100, 129])
def test_paged_prefill_wgmma_pairs_tiles_across_sequences(dev, rng, H, Hkv, d, window):
    needs_prefill_variant(dev, "sm90", d)
    contexts, first, rows = ragged_batch(rng, [9], [(5, 63), (33, 129), (100, 300), (0, 257), (301, 1), (0, 129),
                                                         (7, 64)])
    cache = PagedCache(rng, contexts, Hkv, d)
    q = bf16(rng.standard_normal((int(rows.sum()), H, d)))
    assert len(K.prefill_tiles(first, rows, decode_seqs=1)[0]) % 2 == 1, "the case has a lone last tile"
    got = run_prefill(dev, cache, q, first, rows, 1, window, "sm90")
    want = prefill_reference(cache, q, first, rows, 1, window)
    err = rel(got[first[1]:], want[first[1]:])
    assert err <= 1e-2, f"rel err {err:.2e}"
    # and row by row (≤ 1e-2 too; 2.7e-3 at worst on the emulator), so one row missing a key among a thousand shows
    per_row = [rel(got[r], want[r]) for r in range(int(first[1]), len(q))]
    worst = int(np.argmax(per_row))
    assert per_row[worst] <= 1e-2, f"row {first[1] + worst}: rel err {per_row[worst]:.2e}"


def test_paged_prefill_picks_the_wgmma_kernel_on_sm90_and_refuses_it_elsewhere(dev, rng):
    want = "paged_prefill90_d128" if dev.kernels.hopper and K.ATTENTION_HOPPER else "paged_prefill_d128"
    assert K.prefill_kernel(128, dev.kernels.hopper and K.ATTENTION_HOPPER) == want
    cache = PagedCache(rng, [20], 1, 32)
    q = bf16(rng.standard_normal((20, 2, 32)))
    with pytest.raises(DeviceError, match="sm90|sm_90"):
        run_prefill(dev, cache, q, np.array([0], np.int32), np.array([20], np.int32), 0, 0, "sm90")
    with pytest.raises(DeviceError, match="variant"):
        run_prefill(dev, cache, q, np.array([0], np.int32), np.array([20], np.int32), 0, 0, "fa4")


# ── KV cache block copies ───────────────────────────────────────────────────────────────────────────
def test_copy_blocks_copies_every_plane_of_each_pair_and_nothing_else(dev, rng):
    L, num_blocks, Hkv, d = 3, 12, 2, 32
    pool = bf16(rng.standard_normal((L, 2, num_blocks, Hkv, BS, d)))
    pairs = np.array([[3, 7], [5, 1], [3, 9]], np.int32)
    buffer = dev.put(pool, "bf16")
    dev.kernels.copy_blocks(buffer, dev.put(pairs, "i32"), len(pairs))
    want = pool.copy()
    for src, dst in pairs:
        want[:, :, dst] = pool[:, :, src]
    assert np.array_equal(dev.get(buffer), want)


# ── sampling ──────────────────────────────────────────────────────────────────────────────────────────
def gpu_sample_rows(dev, logits: np.ndarray, limit: int, params: list[SamplingParams], us, states=None,
                    n_states: int = 0):
    R = len(params)
    states = np.arange(R) if states is None else np.asarray(states)
    n_states = max(n_states, int(states.max()) + 1)
    tokens, last = dev.poisoned((R,), "i32"), dev.poisoned((n_states,), "i32")
    counts = dev.put(np.zeros((n_states, logits.shape[1])), "i32")
    dev.kernels.sample_rows(dev.put(logits, "f32"), limit, dev.put([p.temperature for p in params], "f32"),
                            dev.put([p.top_k for p in params], "i32"), dev.put([p.top_p for p in params], "f32"),
                            dev.put(us, "f32"), dev.put(states, "i32"), tokens, last, counts, R)
    got, counted = dev.get(tokens), dev.get(counts)
    for r, state in enumerate(states):  # each sampled token is counted once, at its row's state
        if state >= 0 and got[r] >= 0:
            assert counted[state, got[r]] == 1, f"row {r}: its token was not counted at state {state}"
    assert counted.sum() == sum(1 for r, st in enumerate(states) if st >= 0 and got[r] >= 0)
    return got, dev.get(last)


@pytest.mark.parametrize("V", [100352, 100353])  # an odd V: rows are not 16-byte aligned
def test_greedy_rows_are_argmax_lowest_id_on_ties_and_never_padding(dev, rng, V):
    R, limit = 6, 100278
    logits = rng.standard_normal((R, V)).astype(np.float32)
    logits[:, limit:] = 100.0  # padding ids: never chosen
    tops = [rng.choice(limit, 3, replace=False) for _ in range(R)]
    for r, top in enumerate(tops):
        logits[r, top] = 50.0  # a three-way tie
    tokens, last = gpu_sample_rows(dev, logits, limit, [SamplingParams()] * R, np.zeros(R))
    assert list(tokens) == [int(t.min()) for t in tops]
    assert list(last) == list(tokens), "last_sampled not written at each row's state"


MIXED = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=40),
         SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
         SamplingParams(temperature=1.0, top_k=1), SamplingParams()]


@pytest.mark.parametrize("V", [4096, 4099])
def test_sampling_rows_each_follow_the_numpy_sampler_with_their_own_parameters(dev, rng, V):
    agree, trials = 0, 0
    for _ in range(10):
        params = [MIXED[i] for i in rng.permutation(len(MIXED))]
        R, limit = len(params), V - 3
        logits = (3 * rng.standard_normal((R, V))).astype(np.float32)
        us = rng.random(R)
        states = rng.permutation(R + 2)[:R]
        tokens, last = gpu_sample_rows(dev, logits, limit, params, us, states)
        for r, p in enumerate(params):
            row = logits[r, :limit]
            if p.greedy:
                want = int(np.argmax(row))
                assert tokens[r] == want, f"greedy row {r}: {tokens[r]} ≠ {want}"
            else:
                probs = candidate_probabilities(row, p)
                assert probs[tokens[r]] > 0, f"row {r} drew id {tokens[r]}, outside its kept set ({p})"
                agree += tokens[r] == draw(probs, float(np.float32(us[r])))
                trials += 1
            assert last[states[r]] == tokens[r]
    # f32 running sums on the GPU against NumPy's f64 may disagree only right at a boundary
    assert agree >= trials - 1, f"{trials - agree} of {trials} draws differ from the NumPy sampler"


@pytest.mark.parametrize("V,scale,params", [(8000, 0.05, SamplingParams(temperature=1.0, top_p=0.9)),
                                             (6001, 3.0, SamplingParams(temperature=0.9, top_k=5000)),
                                             (6000, 0.05, SamplingParams(temperature=1.0, top_k=4500, top_p=0.8))])
def test_sampling_rows_from_flat_logits_follow_the_numpy_sampler(dev, rng, V, scale, params):
    """More than 4096 candidates: the kernel's radix selection runs over the whole vocabulary instead. With thousands
    of near-equal probabilities, f32 running sums put a boundary in a slightly different place about once in a
    hundred draws (NumPy sums in f64): two disagreements in 32 are allowed."""
    R = 8
    agree = 0
    for _ in range(4):
        logits = (scale * rng.standard_normal((R, V))).astype(np.float32)
        us = rng.random(R)
        tokens, _ = gpu_sample_rows(dev, logits, V, [params] * R, us)
        for r in range(R):
            probs = candidate_probabilities(logits[r], params)
            assert probs[tokens[r]] > 0, f"drew id {tokens[r]}, outside the kept set"
            agree += tokens[r] == draw(probs, float(np.float32(us[r])))
    assert agree >= 4 * R - 2, f"{4 * R - agree} of {4 * R} draws differ from the NumPy sampler"


def test_penalties_per_row_match_numpy(dev, rng):
    """Repetition penalty over the seen ids, then presence and frequency over the generated counts, per row."""
    R, V, states = 6, 5001, 7
    logits = (3 * rng.standard_normal((R, V))).astype(np.float32)
    penalty = np.array([1.3, 1.0, 0.7, 2.0, 1.3, 1.0], np.float32)
    presence = np.array([0.0, 0.5, -0.4, 1.5, 0.7, 0.0], np.float32)
    frequency = np.array([0.0, 0.3, 0.2, -0.6, 1.1, 0.0], np.float32)
    row_state = np.array([2, 0, 5, 6, -1, 3])  # row 4: no state, untouched; row 5: every penalty off
    counts = np.zeros((states, V), np.int32)
    history = {}
    for s in range(states):
        generated = rng.integers(0, V, 200)
        np.add.at(counts[s], generated, 1)
        history[s] = list(np.unique(np.concatenate([rng.integers(0, V, 150), generated])))
    buffer = dev.put(logits, "f32")
    dev.kernels.penalize_rows(buffer, dev.put(penalty, "f32"), dev.put(presence, "f32"), dev.put(frequency, "f32"),
                              dev.put(row_state, "i32"), dev.put(as_i32(seen_bits(V, history, states)), "i32"),
                              dev.put(counts, "i32"), R)
    got = dev.get(buffer).astype(np.float32)
    for r in range(R):
        if row_state[r] < 0:
            assert np.array_equal(got[r], logits[r]), f"row {r} has no state but was changed"
            continue
        state = row_state[r]
        want = penalized_logits(logits[r], np.array(history[state]), float(penalty[r]), V)
        want = generated_penalties(want, counts[state], float(presence[r]), float(frequency[r]))
        assert np.array_equal(got[r], want), f"row {r} (penalty {penalty[r]}, presence {presence[r]}, " \
                                             f"frequency {frequency[r]}, state {state})"


def test_generated_tokens_are_counted_back_as_history(dev, rng):
    V, states = 777, 3
    ids = rng.integers(0, V, 500).astype(np.int32)
    owners = rng.integers(-1, states, 500).astype(np.int32)  # −1: no state, not counted
    counts = dev.put(np.zeros((states, V)), "i32")
    dev.kernels.count_tokens(dev.put(ids, "i32"), dev.put(owners, "i32"), counts, len(ids))
    want = np.zeros((states, V), np.int32)
    for i, s in zip(ids, owners):
        if s >= 0:
            want[s, i] += 1
    assert np.array_equal(dev.get(counts), want)


@pytest.mark.parametrize("V,limit,k", [(1001, 1001, 5), (100353, 100278, 20), (4096, 4000, 0)])
def test_row_logprobs_are_the_log_softmax_of_the_raw_logits(dev, rng, V, limit, k):
    R = 5
    logits = (4 * rng.standard_normal((R, V))).astype(np.float32)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie at the top: the lower id first
    tokens = rng.integers(0, limit, R).astype(np.int32)
    tokens[4] = -1  # no token (a row that could not be sampled)
    lp, ids, top = dev.poisoned((R,), "f32"), dev.poisoned((R, K.TOP_LOGPROBS), "i32"), dev.poisoned(
        (R, K.TOP_LOGPROBS), "f32")
    dev.kernels.row_logprobs(dev.put(logits, "f32"), limit, dev.put(tokens, "i32"), k, lp, ids, top, R)
    got_lp, got_ids, got_top = dev.get(lp), dev.get(ids), dev.get(top)
    for r in range(R):
        want = token_logprobs(logits[r], int(tokens[r]), k, limit)
        assert abs(got_lp[r] - want.logprob) <= 1e-4 * max(1.0, abs(want.logprob)), f"row {r}: logprob"
        assert list(got_ids[r, :k]) == [t for t, _ in want.top], f"row {r}: top ids"
        assert np.allclose(got_top[r, :k], [lp for _, lp in want.top], rtol=1e-5, atol=1e-4), f"row {r}: top logprobs"
        assert np.all(got_ids[r, k:] == -1), "entries past k were written"


@pytest.mark.parametrize("V", [1001, 100352])
def test_row_logprobs_scores_targets_over_every_column(dev, rng, V):
    """Prompt scoring's use: k = 0 with no top buffers, the whole width as the vocabulary (padding ids included, as
    transformers' loss), any target; against a float64 log-softmax of the same f32 logits."""
    R = 7
    logits = (6 * rng.standard_normal((R, V))).astype(np.float32)
    logits[2] += 50  # a large common offset: the maximum must be taken out before exp
    targets = rng.integers(0, V, R).astype(np.int32)
    targets[0], targets[1] = 0, V - 1  # the edges (the last is a padding id for a real model's width)
    lp = dev.poisoned((R,), "f32")
    dev.kernels.row_logprobs(dev.put(logits, "f32"), V, dev.put(targets, "i32"), 0, lp, None, None, R)
    rows = logits.astype(np.float64)
    top = rows.max(axis=1)
    want = rows[np.arange(R), targets] - top - np.log(np.exp(rows - top[:, None]).sum(axis=1))
    err = np.abs(dev.get(lp) - want).max()
    print(f"V {V}: max |Δ logprob| {err:.1e}")
    assert err <= 1e-4, f"max |Δ logprob| {err:.2e}"


@pytest.mark.parametrize("case", ["nan", "all-minus-inf", "inf", "subnormal-temperature"])
def test_sampling_edge_values_follow_the_numpy_rules(dev, rng, case):
    """NaN among the real logits or nothing above −inf: the row cannot be sampled (the host makes it an error);
    +inf logits share all the mass; a subnormal temperature samples only among the maximum ids."""
    R, V = 4, 3001
    logits = rng.standard_normal((R, V)).astype(np.float32)
    params = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=10),
              SamplingParams(temperature=0.9, top_p=0.5)]
    if case == "nan":
        logits[:, 1234] = np.nan
    elif case == "all-minus-inf":
        logits[:] = -np.inf
    elif case == "inf":
        logits[:, [17, 400, 2999]] = np.inf
    else:
        logits[:, [55, 66]] = logits.max() + 1.0
        params = [SamplingParams(temperature=1e-40)] * R
    us = rng.random(R)
    tokens, _ = gpu_sample_rows(dev, logits, V, params, us)
    if case == "nan":
        assert list(tokens) == [K.SAMPLE_NAN] * R
    elif case == "all-minus-inf":
        assert list(tokens) == [K.SAMPLE_NO_MASS] * R
    elif case == "inf":
        assert tokens[0] == 17 and all(t in (17, 400, 2999) for t in tokens), tokens
    else:
        assert all(t in (55, 66) for t in tokens), tokens


def test_sampled_tokens_feed_the_next_step_on_the_device(dev, rng):
    """sample_rows → last_sampled → prepare_tokens: a decode row's id comes from its sequence's sample."""
    R, V = 4, 3000
    logits = rng.standard_normal((R, V)).astype(np.float32)
    tokens, _ = gpu_sample_rows(dev, logits, V, [SamplingParams()] * R, np.zeros(R), states=[3, 0, 2, 1])
    last = dev.put(np.full(4, -1), "i32")
    dev.kernels.sample_rows(dev.put(logits, "f32"), V, dev.put(np.zeros(R), "f32"), dev.put(np.zeros(R), "i32"),
                            dev.put(np.ones(R), "f32"), dev.put(np.zeros(R), "f32"), dev.put([3, 0, 2, 1], "i32"),
                            dev.poisoned((R,), "i32"), last, dev.put(np.zeros((4, V)), "i32"), R)
    ids = dev.put([-1, -1, -1, -1, 17], "i32")
    seen = dev.put(np.zeros((4, math.ceil(V / 32))), "i32")
    dev.kernels.prepare_tokens(ids, last, dev.put([0, 1, 2, 3, 0], "i32"), seen, 5)
    by_state = {3: tokens[0], 0: tokens[1], 2: tokens[2], 1: tokens[3]}
    assert list(dev.get(ids)) == [by_state[0], by_state[1], by_state[2], by_state[3], 17]
