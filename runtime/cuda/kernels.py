"""The kernels of cuda/ as Python calls: each one checks the shapes it is given, then launches on one stream.

Device memory is held in `DeviceBuffer`s (a pointer, a shape and an element type), so every launch can be
checked on the host before it runs; any CUDA failure becomes a DeviceError naming the kernel.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda.build import arch_of, compile_kernel
from olmoscope.runtime.cuda.driver import DeviceBuffer

HEAD_DIMS = (16, 32, 64, 128)  # the attention kernels' instantiations
GEMM_TILE = 128
GEMM_SMEM = 3 * (128 + 128) * (32 + 8) * 2  # STAGES · (BM + BN) · LDS · sizeof(bf16), as gemm.cu
FA_QUERIES = 64  # flash_prefill's query tile
FD_SPLIT = 128  # flash_decode's positions per block
GEMV_WARPS = 8  # warps per GEMV block (gemv.cu)
GEMV_WARPS_PER_SM = 16  # split K across warps until about this many stream on every multiprocessor (measured)
SAMPLE_THREADS = 1024

# kernel name → (file, PyCUDA argument format: P pointer, i int32, f float32, q int64)
SIGNATURES = {
    "embedding_gather_bf16": ("embedding.cu", "PPPPii"),
    "embedding_gather_int8": ("embedding.cu", "PPPPPii"),
    "residual_rmsnorm_add": ("norms.cu", "PPPPif"),
    "rmsnorm_f32": ("norms.cu", "PPPif"),
    "rmsnorm_bf16": ("norms.cu", "PPPif"),
    "qk_norm_rope_append": ("rope.cu", "PPPPPPPPiiiif"),
    "qk_norm_rope_append_heads": ("rope.cu", "PPPPPPPPiiiif"),
    "gemv_bf16": ("gemv.cu", "PPPPiii"),
    "gemv_bf16_silu": ("gemv.cu", "PPPPiii"),
    "gemv_int8": ("gemv.cu", "PPPPiii"),
    "gemv_int8_silu": ("gemv.cu", "PPPPiii"),
    "gemm_bf16": ("gemm.cu", "PPPPiii"),
    "gemm_bf16_silu": ("gemm.cu", "PPPPiii"),
    "widen_int8": ("gemm.cu", "PPq"),
    **{f"flash_prefill_d{d}": ("attention.cu", "PPPPPiiii") for d in HEAD_DIMS},
    **{f"flash_decode_d{d}": ("attention.cu", "PPPPPPPPiii") for d in HEAD_DIMS},
    "repetition_penalty": ("sampling.cu", "PPif"),
    "sample_token": ("sampling.cu", "PififfP"),
    "feed_token": ("sampling.cu", "PPi"),
}


def _expect(buffer: DeviceBuffer | None, what: str, dtype: str, shape: tuple[int, ...], min_rows: int | None = None):
    """Refuse a launch whose buffer has the wrong type or shape (min_rows: a matrix with at least that many rows)."""
    if buffer is None:
        raise DeviceError(f"{what}: buffer missing")
    if buffer.dtype != dtype:
        raise DeviceError(f"{what}: expected {dtype}, found {buffer.dtype}")
    if min_rows is not None:
        ok = buffer.shape[1:] == shape[1:] and buffer.shape[0] >= min_rows
    else:
        ok = buffer.shape == shape
    if not ok:
        raise DeviceError(f"{what}: expected shape {list(shape)}, found {list(buffer.shape)}")


def _ptr(buffer: DeviceBuffer | None) -> int:
    return 0 if buffer is None else buffer.ptr


class Kernels:
    """Every kernel, loaded for this GPU's architecture, with shape-checked launchers on one stream.

    >>> kernels = Kernels(cuda.Device(0), cuda.Stream()); kernels.gemv(w, None, x, y)
    """

    def __init__(self, driver, device, stream):
        self.cuda = driver  # the pycuda.driver module
        self.stream = stream
        self.arch = arch_of(device.compute_capability())
        self.sm_count = device.get_attribute(driver.device_attribute.MULTIPROCESSOR_COUNT)
        sources = sorted({source for source, _ in SIGNATURES.values()})
        with ThreadPoolExecutor() as pool:  # nvcc runs, one per file, in parallel at first use
            cubins = dict(zip(sources, pool.map(lambda source: compile_kernel(source, self.arch), sources)))
        modules = {}
        for source, cubin in cubins.items():
            try:
                modules[source] = driver.module_from_file(str(cubin))
            except driver.Error as exc:
                raise DeviceError(f"cuda/{source}: cannot load the {self.arch} cubin ({exc})") from None
        self.functions = {}
        for name, (source, argtypes) in SIGNATURES.items():
            function = modules[source].get_function(name)
            function.prepare(argtypes)
            self.functions[name] = function
        for name in ("gemm_bf16", "gemm_bf16_silu"):
            self.functions[name].set_attribute(driver.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, GEMM_SMEM)
        self._modules = modules  # keep them loaded

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args, smem: int = 0) -> None:
        """One asynchronous launch; a refusal (bad configuration, earlier fault) becomes a DeviceError."""
        if min(grid) < 1:
            raise DeviceError(f"{name}: empty grid {grid}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        try:
            self.functions[name].prepared_async_call(grid, block, self.stream, *args, shared_size=smem)
        except self.cuda.Error as exc:
            raise DeviceError(f"CUDA error launching {name}: {exc}") from None

    # ── the forward pass's kernels ────────────────────────────────────────────────────────────────
    def embedding(self, table: DeviceBuffer, scales: DeviceBuffer | None, ids: DeviceBuffer, h: DeviceBuffer,
                  h_bf16: DeviceBuffer | None, tokens: int) -> None:
        """h[t] = table[ids[t]] (f32), and a bf16 copy when h_bf16 is given.  table [V, D], ids [≥T]."""
        V, D = table.shape
        _expect(ids, "embedding ids", "i32", (tokens,), min_rows=tokens)
        _expect(h, "embedding output", "f32", (tokens, D), min_rows=tokens)
        if h_bf16 is not None:
            _expect(h_bf16, "embedding bf16 output", "bf16", (tokens, D), min_rows=tokens)
        if table.dtype == "i8":
            self.launch("embedding_gather_int8", (tokens,), (256, 1, 1), table.ptr, _ptr(scales), ids.ptr, h.ptr,
                        _ptr(h_bf16), D, V)
        else:
            self.launch("embedding_gather_bf16", (tokens,), (256, 1, 1), table.ptr, ids.ptr, h.ptr, _ptr(h_bf16), D, V)

    def residual_norm(self, h: DeviceBuffer, a: DeviceBuffer, weight: DeviceBuffer, h_bf16: DeviceBuffer | None,
                      rows: int, eps: float) -> None:
        """h += RMSNorm(a)·weight over `rows` rows of [*, D]; h_bf16 gets the new h when given."""
        D = weight.shape[0]
        if D % 4:
            raise DeviceError(f"residual norm: D = {D} is not a multiple of 4")
        _expect(h, "residual", "f32", (rows, D), min_rows=rows)
        _expect(a, "residual update", "f32", (rows, D), min_rows=rows)
        if h_bf16 is not None:
            _expect(h_bf16, "residual bf16 copy", "bf16", (rows, D), min_rows=rows)
        self.launch("residual_rmsnorm_add", (rows, self._slices(rows, D)), (256, 1, 1), h.ptr, a.ptr, weight.ptr,
                    _ptr(h_bf16), D, eps)

    def rmsnorm(self, x: DeviceBuffer, weight: DeviceBuffer, out: DeviceBuffer, rows: int, eps: float) -> None:
        """out = RMSNorm(x)·weight for `rows` rows; out f32 or bf16."""
        D = weight.shape[0]
        if D % 4:
            raise DeviceError(f"rmsnorm: D = {D} is not a multiple of 4")
        _expect(x, "rmsnorm input", "f32", (rows, D), min_rows=rows)
        _expect(out, "rmsnorm output", out.dtype, (rows, D), min_rows=rows)
        name = "rmsnorm_bf16" if out.dtype == "bf16" else "rmsnorm_f32"
        self.launch(name, (rows, self._slices(rows, D)), (256, 1, 1), x.ptr, weight.ptr, out.ptr, D, eps)

    @staticmethod
    def _slices(rows: int, D: int) -> int:
        """Blocks per row for the norms: one row (decode) spreads over several multiprocessors, 1024 elements each."""
        return math.ceil(D / 1024) if rows == 1 else 1

    def qk_norm_rope_append(self, qkv: DeviceBuffer, q_norm: DeviceBuffer, k_norm: DeviceBuffer,
                            inv_freq: DeviceBuffer, q_out: DeviceBuffer, k_cache: DeviceBuffer,
                            v_cache: DeviceBuffer, start_pos: DeviceBuffer, tokens: int, eps: float) -> None:
        """QK-norm and RoPE of `tokens` rows of qkv; q to q_out [T, H, d], k and v into the cache [Hkv, S, d]."""
        Hkv, S, d = k_cache.shape
        H = q_norm.shape[0] // d
        _expect(qkv, "qkv", "f32", (tokens, (H + 2 * Hkv) * d), min_rows=tokens)
        _expect(q_out, "rotated q", "bf16", (tokens, H, d), min_rows=tokens)
        _expect(v_cache, "v cache", "bf16", (Hkv, S, d))
        _expect(inv_freq, "inv_freq", "f32", (d // 2,))
        if tokens == 1:  # decode: a block per head instead of one block doing everything
            self.launch("qk_norm_rope_append_heads", (1, H + Hkv), (128, 1, 1), qkv.ptr, q_norm.ptr, k_norm.ptr,
                        inv_freq.ptr, q_out.ptr, k_cache.ptr, v_cache.ptr, start_pos.ptr, H, Hkv, d, S, eps)
        else:
            self.launch("qk_norm_rope_append", (tokens,), (256, 1, 1), qkv.ptr, q_norm.ptr, k_norm.ptr, inv_freq.ptr,
                        q_out.ptr, k_cache.ptr, v_cache.ptr, start_pos.ptr, H, Hkv, d, S, eps)

    def gemv(self, weight: DeviceBuffer, scales: DeviceBuffer | None, x: DeviceBuffer, y: DeviceBuffer,
             silu: bool = False, split: int | None = None) -> None:
        """y = W·x (f32); silu: W is [gate; up] and y = SiLU(gate·x)·(up·x)."""
        N, K = weight.shape
        step = 16 if weight.dtype == "i8" else 8
        if K % step:
            raise DeviceError(f"gemv: K = {K} is not a multiple of {step}")
        _expect(x, "gemv input", "f32", (K,))
        _expect(y, "gemv output", "f32", (N // 2 if silu else N,))
        pairs = N // 2 if silu else (N + 1) // 2
        split = split or self.gemv_split(pairs)
        kind = "int8" if weight.dtype == "i8" else "bf16"
        name = f"gemv_{kind}_silu" if silu else f"gemv_{kind}"
        self.launch(name, (math.ceil(pairs / (GEMV_WARPS // split)),), (32 * GEMV_WARPS, 1, 1), weight.ptr,
                    _ptr(scales), x.ptr, y.ptr, N, K, split)

    def gemm(self, a: DeviceBuffer, weight: DeviceBuffer, scales: DeviceBuffer | None, c: DeviceBuffer, rows: int,
             silu: bool = False) -> None:
        """C = A·Wᵀ on the tensor cores, A [rows, K] bf16; C f32 [rows, N], or bf16 [rows, N/2] with silu."""
        N, K = weight.shape
        if weight.dtype != "bf16":
            raise DeviceError(f"gemm: weights must be bf16 (widen int8 first), found {weight.dtype}")
        if K % 8:
            raise DeviceError(f"gemm: K = {K} is not a multiple of 8")
        _expect(a, "gemm input", "bf16", (rows, K), min_rows=rows)
        if silu:
            _expect(c, "gemm silu output", "bf16", (rows, N // 2), min_rows=rows)
        else:
            _expect(c, "gemm output", "f32", (rows, N), min_rows=rows)
        grid = (math.ceil(N / GEMM_TILE), math.ceil(rows / GEMM_TILE))
        self.launch("gemm_bf16_silu" if silu else "gemm_bf16", grid, (256, 1, 1), a.ptr, weight.ptr, _ptr(scales),
                    c.ptr, rows, N, K, smem=GEMM_SMEM)

    def gemv_split(self, pairs: int) -> int:
        """Warps per row pair (1, 2, 4 or 8): more when there are too few pairs to keep the chip streaming."""
        split = 1
        while split < GEMV_WARPS and pairs * split < self.sm_count * GEMV_WARPS_PER_SM:
            split *= 2
        return split

    def widen_int8(self, q: DeviceBuffer, out: DeviceBuffer) -> None:
        """out (bf16) = q (int8), elementwise and exact; out may be larger than q."""
        n = math.prod(q.shape)
        if n % 16 or out.nbytes < 2 * n:
            raise DeviceError(f"widen_int8: {n} elements into {out.nbytes} bytes")
        self.launch("widen_int8", (math.ceil(n / 4096),), (256, 1, 1), q.ptr, out.ptr, n)

    def flash_prefill(self, q: DeviceBuffer, k_cache: DeviceBuffer, v_cache: DeviceBuffer, out: DeviceBuffer,
                      start_pos: DeviceBuffer, tokens: int) -> None:
        """Causal attention of `tokens` queries [T, H, d] over the cache; out [T, H·d] bf16."""
        Hkv, S, d = k_cache.shape
        H = q.shape[1]
        _expect(q, "attention q", "bf16", (tokens, H, d), min_rows=tokens)
        _expect(out, "attention output", "bf16", (tokens, H * d), min_rows=tokens)
        self.launch(f"flash_prefill_d{d}", (math.ceil(tokens / FA_QUERIES), H), (128, 1, 1), q.ptr, k_cache.ptr,
                    v_cache.ptr, out.ptr, start_pos.ptr, tokens, H, Hkv, S)

    def flash_decode(self, q: DeviceBuffer, k_cache: DeviceBuffer, v_cache: DeviceBuffer, partial_o: DeviceBuffer,
                     partial_ml: DeviceBuffer, out: DeviceBuffer, counters: DeviceBuffer,
                     start_pos: DeviceBuffer) -> None:
        """One query [H, d] over positions 0 … start_pos[0], split across blocks and merged by the last; out [H·d] f32.

        counters [H] int32 must be zero before the first launch; the kernel leaves them zero.
        """
        Hkv, S, d = k_cache.shape
        H = q.shape[1]
        splits = math.ceil(S / FD_SPLIT)
        _expect(q, "decode q", "bf16", (1, H, d), min_rows=1)
        _expect(partial_o, "decode partials", "f32", (H, splits, d))
        _expect(partial_ml, "decode partial max/sum", "f32", (H, splits, 2))
        _expect(out, "decode attention output", "f32", (H * d,))
        _expect(counters, "decode merge counters", "i32", (H,))
        self.launch(f"flash_decode_d{d}", (H, splits), (128, 1, 1), q.ptr, k_cache.ptr, v_cache.ptr, partial_o.ptr,
                    partial_ml.ptr, out.ptr, counters.ptr, start_pos.ptr, H, Hkv, S)

    # ── sampling ──────────────────────────────────────────────────────────────────────────────────────
    def repetition_penalty(self, logits: DeviceBuffer, ids: DeviceBuffer, count: int, penalty: float) -> None:
        """Penalise `count` distinct ids (ids [≥ count] int32) in logits [V] in place."""
        _expect(ids, "penalty ids", "i32", (count,), min_rows=count)
        self.launch("repetition_penalty", (math.ceil(count / 256),), (256, 1, 1), logits.ptr, ids.ptr, count, penalty)

    def sample(self, logits: DeviceBuffer, vocab_limit: int, temperature: float, top_k: int, top_p: float,
               u: float, token_out: DeviceBuffer) -> None:
        """token_out[0] = the next token, by sampler.py's rules, from logits [≥ vocab_limit]."""
        if logits.dtype != "f32" or logits.shape[-1] < vocab_limit:
            raise DeviceError(f"sample: logits {logits.dtype} {list(logits.shape)} for a vocabulary of {vocab_limit}")
        self.launch("sample_token", (1,), (SAMPLE_THREADS, 1, 1), logits.ptr, vocab_limit, temperature, top_k, top_p,
                    u, token_out.ptr)

    def feed_token(self, token_out: DeviceBuffer, step: DeviceBuffer, position: int) -> None:
        """step = [token_out[0], position] on the device: the sampled token becomes the next step's input."""
        _expect(token_out, "sampled token", "i32", (1,))
        _expect(step, "decode step state", "i32", (2,))
        self.launch("feed_token", (1,), (32, 1, 1), token_out.ptr, step.ptr, position)
