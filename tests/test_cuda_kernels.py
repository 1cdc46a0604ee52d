"""Each CUDA kernel alone against NumPy on fresh random inputs, outputs poisoned with NaN before every launch.

Tolerances (relative Frobenius error ‖gpu − ref‖/‖ref‖, the reference in float64 on the same bf16 inputs):
- f32 outputs of exact bf16 products with f32 accumulation (GEMV, GEMM, norms): ≤ 1e-5;
- outputs rounded to bf16 (rotated q/k, attention output, the GEMM's SiLU·up): ≤ 1e-2 (bf16 keeps 8
  significant bits: one rounding is ≤ 2^-9 ≈ 2e-3 relative per element);
- flash-decoding, f32 out of bf16 cache entries: ≤ 1e-4 (exp2 and f32 sums over ≤ 4096 positions).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from olmoscope.runtime import reference
from olmoscope.runtime.sampler import SamplingParams, candidate_probabilities, draw, penalized_logits

pytestmark = pytest.mark.cuda
cuda_backend = pytest.importorskip("olmoscope.runtime.cuda.backend")
usable, why = cuda_backend.available()
if not usable:
    pytest.skip(f"CUDA backend unavailable: {why}", allow_module_level=True)

import pycuda.driver as cuda  # noqa: E402

from olmoscope.runtime.cuda.kernels import FD_SPLIT, DeviceBuffer, Kernels  # noqa: E402

BF16 = ml_dtypes.bfloat16
NUMPY_OF = {"bf16": BF16, "f32": np.float32, "i8": np.int8, "i32": np.int32}


class Device:
    """A context, a stream and the kernels; buffers made here are freed at the end of the module."""

    def __init__(self):
        cuda.init()
        self.context = cuda.Device(0).retain_primary_context()
        self.context.push()
        self.stream = cuda.Stream()
        self.kernels = Kernels(cuda, cuda.Device(0), self.stream)
        self.buffers: list[DeviceBuffer] = []

    def put(self, array: np.ndarray, dtype: str) -> DeviceBuffer:
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


def bf16(array: np.ndarray) -> np.ndarray:
    """Rounded to bf16, back as float64: the exact values the GPU sees."""
    return np.asarray(array, np.float32).astype(BF16).astype(np.float64)


# ── embedding, norms ──────────────────────────────────────────────────────────────────────────────
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


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("D", [64, 1000, 4096, 5120])
def test_residual_rmsnorm_add_matches_numpy(dev, rng, D, T):
    eps = 1e-6
    h0, a = rng.standard_normal((T, D)), 3 * rng.standard_normal((T, D))
    w = 1 + 0.1 * rng.standard_normal(D)
    h, hb = dev.put(h0, "f32"), dev.poisoned((T, D), "bf16")
    dev.kernels.residual_norm(h, dev.put(a, "f32"), dev.put(w, "f32"), hb, T, eps)
    want = h0.astype(np.float32) + reference.rms_norm(a.astype(np.float32), w.astype(np.float32), eps)
    err, err_b = rel(dev.get(h), want), rel(dev.get(hb), want)
    assert err <= 1e-5 and err_b <= 1e-2, f"rel err f32 {err:.2e}, bf16 copy {err_b:.2e}"


@pytest.mark.parametrize("T", [1, 3])
def test_rmsnorm_f32_and_bf16_outputs(dev, rng, T):
    D, eps = 2048, 1e-6
    x, w = rng.standard_normal((T, D)), 1 + 0.1 * rng.standard_normal(D)
    want = reference.rms_norm(x.astype(np.float32), w.astype(np.float32), eps)
    out32, out16 = dev.poisoned((T, D), "f32"), dev.poisoned((T, D), "bf16")
    xb, wb = dev.put(x, "f32"), dev.put(w, "f32")
    dev.kernels.rmsnorm(xb, wb, out32, T, eps)
    dev.kernels.rmsnorm(xb, wb, out16, T, eps)
    assert rel(dev.get(out32), want) <= 1e-5 and rel(dev.get(out16), want) <= 1e-2


# ── QK-norm, RoPE, cache append ───────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("H,Hkv,d,start", [(4, 4, 64, 0), (8, 2, 128, 37), (4, 2, 16, 5)])
def test_qk_norm_rope_append_matches_reference(dev, rng, H, Hkv, d, start, T):
    S, eps, theta = 64, 1e-6, 500000.0
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * d)).astype(np.float32)
    qn, kn = (1 + 0.1 * rng.standard_normal(H * d)), (1 + 0.1 * rng.standard_normal(Hkv * d))
    exps = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv_freq = np.float32(1) / np.power(np.float32(theta), exps)
    q_out = dev.poisoned((T, H, d), "bf16")
    kc, vc = dev.poisoned((Hkv, S, d), "bf16"), dev.poisoned((Hkv, S, d), "bf16")
    dev.kernels.qk_norm_rope_append(dev.put(qkv, "f32"), dev.put(qn, "f32"), dev.put(kn, "f32"),
                                    dev.put(inv_freq, "f32"), q_out, kc, vc, dev.put([start], "i32"), T, eps)
    q, k, v = np.split(qkv, [H * d, H * d + Hkv * d], axis=-1)
    cos, sin = reference.rope_tables(np.arange(start, start + T), d, theta)
    q_ref = reference.apply_rope(reference.rms_norm(q, qn.astype(np.float32), eps).reshape(T, H, d), cos, sin)
    k_ref = reference.apply_rope(reference.rms_norm(k, kn.astype(np.float32), eps).reshape(T, Hkv, d), cos, sin)
    k_got, v_got = dev.get(kc)[:, start:start + T], dev.get(vc)[:, start:start + T]
    errs = (rel(dev.get(q_out), q_ref), rel(k_got, k_ref.transpose(1, 0, 2)),
            rel(v_got, v.reshape(T, Hkv, d).transpose(1, 0, 2)))
    assert max(errs) <= 1e-2, f"rel err q {errs[0]:.2e}, k {errs[1]:.2e}, v {errs[2]:.2e}"


# ── GEMV (decode) and GEMM (prefill) ──────────────────────────────────────────────────────────────
def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scales = np.abs(w).max(axis=1) / 127
    return np.round(w / scales[:, None]).astype(np.int8), scales.astype(np.float32)


@pytest.mark.parametrize("N,K", [(1001, 776), (2, 8), (6144, 2048), (4096, 11008)])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_gemv_matches_numpy(dev, rng, N, K, kind):
    if kind == "int8" and K % 16:
        K += 8
    x = rng.standard_normal(K).astype(np.float32)
    if kind == "bf16":
        w, scales = bf16(rng.standard_normal((N, K))), None
        wb, sb, w_eff = dev.put(w, "bf16"), None, w
    else:
        q, s = quantize_rows(rng.standard_normal((N, K)))
        wb, sb, w_eff = dev.put(q, "i8"), dev.put(s, "f32"), q * s[:, None].astype(np.float64)
    y = dev.poisoned((N,), "f32")
    dev.kernels.gemv(wb, sb, dev.put(x, "f32"), y)
    err = rel(dev.get(y), w_eff @ x)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_gemv_silu_pairs_gate_and_up(dev, rng, kind):
    I, K = 344, 256
    x = rng.standard_normal(K).astype(np.float32)
    w = rng.standard_normal((2 * I, K))
    if kind == "bf16":
        w = bf16(w)
        wb, sb, w_eff = dev.put(w, "bf16"), None, w
    else:
        q, s = quantize_rows(w)
        wb, sb, w_eff = dev.put(q, "i8"), dev.put(s, "f32"), q * s[:, None].astype(np.float64)
    y = dev.poisoned((I,), "f32")
    dev.kernels.gemv(wb, sb, dev.put(x, "f32"), y, silu=True)
    gate, up = np.split(w_eff @ x, 2)
    err = rel(dev.get(y), gate / (1 + np.exp(-gate)) * up)
    assert err <= 1e-5, f"rel err {err:.2e}"


@pytest.mark.parametrize("M,N,K", [(1, 1001, 776), (33, 1001, 776), (77, 256, 64), (300, 384, 2048), (128, 128, 32)])
def test_gemm_matches_numpy(dev, rng, M, N, K):
    a, w = bf16(rng.standard_normal((M, K))), bf16(rng.standard_normal((N, K)))
    c = dev.poisoned((M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M)
    err = rel(dev.get(c), a @ w.T)
    assert err <= 1e-5, f"rel err {err:.2e}"


def test_gemm_rows_beyond_m_are_left_alone(dev, rng):
    M, N, K = 50, 128, 64
    a, w = bf16(rng.standard_normal((M, K))), bf16(rng.standard_normal((N, K)))
    c = dev.poisoned((M + 30, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M)
    got = dev.get(c)
    assert np.all(np.isnan(got[M:])), "the GEMM wrote rows past M"
    assert rel(got[:M], a @ w.T) <= 1e-5


def test_gemm_silu_pairs_gate_and_up(dev, rng):
    M, I, K = 130, 352, 256
    a, w = bf16(rng.standard_normal((M, K))), bf16(rng.standard_normal((2 * I, K)) / 8)
    c = dev.poisoned((M, I), "bf16")
    dev.kernels.gemm(dev.put(a, "bf16"), dev.put(w, "bf16"), None, c, M, silu=True)
    gate, up = np.split(a @ w.T, 2, axis=-1)
    err = rel(dev.get(c), gate / (1 + np.exp(-gate)) * up)
    assert err <= 1e-2, f"rel err {err:.2e}"


def test_int8_gemm_widens_exactly_and_scales_rows(dev, rng):
    M, N, K = 70, 200, 512
    a = bf16(rng.standard_normal((M, K)))
    q, s = quantize_rows(rng.standard_normal((N, K)))
    qb = dev.put(q, "i8")
    widened = dev.poisoned((N, K), "bf16")
    dev.kernels.widen_int8(qb, widened)
    assert np.array_equal(dev.get(widened), q.astype(np.float64)), "widening int8 to bf16 is not exact"
    c = dev.poisoned((M, N), "f32")
    dev.kernels.gemm(dev.put(a, "bf16"), widened, dev.put(s, "f32"), c, M)
    err = rel(dev.get(c), a @ (q * s[:, None].astype(np.float64)).T)
    assert err <= 1e-5, f"rel err {err:.2e}"


# ── attention ─────────────────────────────────────────────────────────────────────────────────────
def attention_reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """float64 causal GQA attention of q [T, H, d] at positions start… over keys/values [Hkv, ≥start+T, d]."""
    T, H, d = q.shape
    Hkv = keys.shape[0]
    S = start + T
    out = np.empty((T, H, d))
    for j in range(H):
        kv = j // (H // Hkv)
        scores = q[:, j] @ keys[kv, :S].T / math.sqrt(d)  # [T, S]
        scores[np.arange(S)[None, :] > (start + np.arange(T))[:, None]] = -np.inf
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, j] = (p / p.sum(axis=1, keepdims=True)) @ values[kv, :S]
    return out.reshape(T, H * d)


@pytest.mark.parametrize("T,start,H,Hkv,d", [(1, 0, 2, 2, 64), (100, 0, 4, 2, 64), (64, 37, 4, 1, 128),
                                             (130, 0, 2, 2, 128), (33, 3, 4, 2, 16), (20, 0, 2, 1, 32),
                                             (700, 300, 2, 2, 128)])
def test_flash_prefill_matches_numpy(dev, rng, T, start, H, Hkv, d):
    S = start + T + 50  # room past the tokens: stale cache entries there must not be read
    q = bf16(rng.standard_normal((T, H, d)))
    keys, values = bf16(rng.standard_normal((Hkv, S, d))), bf16(rng.standard_normal((Hkv, S, d)))
    keys[:, start + T:] = np.nan  # would poison the output if read unmasked
    values[:, start + T:] = np.nan
    out = dev.poisoned((T, H * d), "bf16")
    dev.kernels.flash_prefill(dev.put(q, "bf16"), dev.put(keys, "bf16"), dev.put(values, "bf16"), out,
                              dev.put([start], "i32"), T)
    err = rel(dev.get(out), attention_reference(q, keys, values, start))
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("length", [1, 2, 127, 128, 129, 1000, 4096])
@pytest.mark.parametrize("H,Hkv,d", [(4, 2, 64), (2, 2, 128)])
def test_flash_decode_matches_numpy(dev, rng, length, H, Hkv, d):
    S = 4096
    splits = math.ceil(S / FD_SPLIT)
    q = bf16(rng.standard_normal((1, H, d)))
    keys, values = bf16(rng.standard_normal((Hkv, S, d))), bf16(rng.standard_normal((Hkv, S, d)))
    keys[:, length:] = np.nan
    values[:, length:] = np.nan
    out, counters = dev.poisoned((H * d,), "f32"), dev.put(np.zeros(H), "i32")
    dev.kernels.flash_decode(dev.put(q, "bf16"), dev.put(keys, "bf16"), dev.put(values, "bf16"),
                             dev.poisoned((H, splits, d), "f32"), dev.poisoned((H, splits, 2), "f32"), out, counters,
                             dev.put([length - 1], "i32"))
    err = rel(dev.get(out), attention_reference(q, keys, values, length - 1)[0])
    assert err <= 1e-4, f"rel err {err:.2e}"
    assert not dev.get(counters).any(), "the merge tickets were not reset for the next step"


# ── sampling ──────────────────────────────────────────────────────────────────────────────────────
def gpu_sample(dev, logits: np.ndarray, limit: int, params: SamplingParams, u: float) -> int:
    token = dev.poisoned((1,), "i32")
    dev.kernels.sample(dev.put(logits, "f32"), limit, params.temperature, params.top_k, params.top_p, u, token)
    return int(dev.get(token)[0])


def test_greedy_is_argmax_lowest_id_on_ties_and_never_padding(dev, rng):
    for _ in range(20):
        V, limit = 100352, 100278
        logits = rng.standard_normal(V).astype(np.float32)
        logits[limit:] = 100.0  # padding rows: never chosen
        top = rng.choice(limit, 3, replace=False)
        logits[top] = 50.0  # a three-way tie
        assert gpu_sample(dev, logits, limit, SamplingParams(), 0.0) == top.min()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=40),
                                    SamplingParams(temperature=1.3, top_p=0.9),
                                    SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
                                    SamplingParams(temperature=1.0, top_k=1)])
def test_sampling_follows_the_numpy_sampler(dev, rng, params):
    agree, trials = 0, 60
    for _ in range(trials):
        V = int(rng.integers(1000, 5000))
        logits = (3 * rng.standard_normal(V)).astype(np.float32)
        u = float(rng.random())
        want = draw(candidate_probabilities(logits, params), u)
        got = gpu_sample(dev, logits, V, params, u)
        assert candidate_probabilities(logits, params)[got] > 0, f"drew id {got}, outside the kept set"
        agree += got == want
    # f32 running sums on the GPU against NumPy's f64 may disagree only right at a boundary
    assert agree >= trials - 1, f"{trials - agree} of {trials} draws differ from the NumPy sampler"


@pytest.mark.parametrize("V,scale,params", [(8000, 0.05, SamplingParams(temperature=1.0, top_p=0.9)),
                                             (6000, 3.0, SamplingParams(temperature=0.9, top_k=5000)),
                                             (6000, 0.05, SamplingParams(temperature=1.0, top_k=4500, top_p=0.8))])
def test_sampling_from_flat_logits_follows_the_numpy_sampler(dev, rng, V, scale, params):
    """More than 4096 candidates: the kernel's radix selection runs over the whole vocabulary instead. With thousands
    of near-equal probabilities, f32 running sums put a boundary in a slightly different place about once in a
    hundred draws (NumPy sums in f64): two disagreements in 30 are allowed."""
    agree, trials = 0, 30
    for _ in range(trials):
        logits = (scale * rng.standard_normal(V)).astype(np.float32)
        u = float(rng.random())
        probs = candidate_probabilities(logits, params)
        got = gpu_sample(dev, logits, V, params, u)
        assert probs[got] > 0, f"drew id {got}, outside the kept set"
        agree += got == draw(probs, u)
    assert agree >= trials - 2, f"{trials - agree} of {trials} draws differ from the NumPy sampler"


def test_repetition_penalty_matches_numpy(dev, rng):
    V, limit, penalty = 5000, 4900, 1.3
    logits = rng.standard_normal(V).astype(np.float32)
    seen = np.unique(rng.integers(0, limit, 300)).astype(np.int32)
    buffer = dev.put(logits, "f32")
    dev.kernels.repetition_penalty(buffer, dev.put(seen, "i32"), len(seen), penalty)
    want = penalized_logits(logits, seen, penalty, V)
    assert np.array_equal(dev.get(buffer).astype(np.float32), want)
