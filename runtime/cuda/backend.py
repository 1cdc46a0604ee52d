"""The CUDA backend: OLMo 2 on an NVIDIA GPU with olmoscope's own kernels (cuda/), launched through PyCUDA.

One layer function serves every step, prefill chunks and decode tokens mixed: projections by GEMV (1–4 rows)
or tensor-core GEMM (split-K for skinny batches), QK-norm + RoPE + paged append at explicit positions, paged
flash-decoding for the single-token sequences and paged flash attention for the prompt chunks. Decode-only
steps replay a CUDA graph captured once per batch size (1, 2, 4, … padded up), reading the step's block tables,
positions and sampling parameters from device memory. Sampling runs on the GPU; only token ids come back. Steps
are asynchronous: the next one may be launched before this one's result is read, and will see its samples.
"""

from __future__ import annotations

import contextlib

import math
import sys
from dataclasses import dataclass

import numpy as np

from olmoscope.errors import DeviceError, UsageError
from olmoscope.runtime.backend import Backend, PendingStep, RuntimeOptions, plan_blocks
from olmoscope.runtime.blocks import BLOCK_SIZE
from olmoscope.runtime.cuda.driver import (ITEMSIZE, CudaGraph, DeviceBuffer, available, cuda, cuda_errors,
                                           free_pinned, gib)
from olmoscope.runtime.cuda.kernels import (FA_QUERIES, HEAD_DIMS, Q4_IN_LOOP_MAX_ROWS, Q4_MAX_ROWS, TOP_LOGPROBS,
                                            Kernels, decode_splits, prefill_tiles)
from olmoscope.runtime.cuda.weights import DeviceWeight, decode_weight_bytes, device_bytes, upload
from olmoscope.runtime.cuda.workspace import MetaSizes, StepMeta
from olmoscope.runtime.engine import Engine
from olmoscope.runtime.step import SCORE_ROWS, Step, StepArrays, StepResult

RESERVE_BYTES = 1 << 30  # left free for the driver, cubins, graphs and the odd temporary
RESULT_RING = 4  # pinned result buffers: at most RESULT_RING − 1 launched steps may wait unread
UPKEEP_IDS = 1 << 16  # ids per mark-seen / block-copy launch


def graph_sizes(limit: int) -> list[int]:
    """Decode batch sizes with a captured graph: powers of two up to `limit`, and `limit` itself."""
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]
    return sizes + ([limit] if sizes[-1] != limit else [])


def projection_shapes(cfg) -> dict[str, tuple[int, int, bool]]:
    """Each layer projection's (N, K, silu) for a model config (lm_head aside: it writes the logits buffer)."""
    return {"qkv": (cfg.q_width + 2 * cfg.kv_width, cfg.hidden_size, False), "o": (cfg.hidden_size, cfg.q_width, False),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size, True),
            "down": (cfg.hidden_size, cfg.intermediate_size, False)}


@dataclass(frozen=True)
class Plan:
    """The launch sizes of one forward pass (captured graphs freeze them)."""

    tokens: int  # T token rows
    seqs: int  # B sequences
    decode: int  # the first `decode` sequences have one row each
    logits: int  # R rows get logits
    samples: int  # S rows are sampled (rows 0 … S−1 of the logits buffer)
    tiles: int  # prefill attention tiles
    splits: int  # flash-decoding splits
    window: int = 0  # attention window (0: full)
    logprobs: int = -1  # alternatives the step's rows ask for, at most; −1: no logprobs (graphs have none)
    scores: int = 0  # P rows scored against a target (prompt scoring; graphs have none)

    @classmethod
    def decode_graph(cls, size: int, splits: int) -> Plan:
        return cls(size, size, size, size, size, 0, splits)


class CudaPending(PendingStep):
    """A launched step: its sampled ids arrive in a pinned buffer, signalled by an event."""

    def __init__(self, tokens: np.ndarray, count: int, event, logits: np.ndarray | None,
                 scores: np.ndarray | None = None):
        self._tokens, self._count, self._event, self._logits, self._scores = tokens, count, event, logits, scores
        self.logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (logprob, top ids, top logprobs)

    def result(self) -> StepResult:
        with cuda_errors("a step"):
            self._event.synchronize()
        scores = self._scores.copy() if self._scores is not None else None  # the pinned buffer is reused
        result = StepResult(self._tokens[: self._count].copy(), self._logits, scores=scores)
        if self.logprobs is not None:
            result.logprobs, result.top_ids, result.top_logprobs = self.logprobs
        return result


class CudaBackend(Backend):
    """One OLMo 2 model on one NVIDIA GPU; see backend.py for the contract.

    >>> with CudaBackend(open_engine("olmo2-1b.olmo"), RuntimeOptions(max_num_seqs=64)) as gpu: gpu.run(step)
    """

    name = "cuda"
    asynchronous = True

    def __init__(self, engine: Engine, options: RuntimeOptions | None = None, *, use_graphs: bool = True,
                 progress: bool | None = None, device_index: int = 0):
        usable, reason = available()
        if not usable:
            raise DeviceError(f"--device cuda: {reason}")
        options = options or RuntimeOptions()
        self.config = engine.config
        self.vocab_limit = engine.vocab_limit
        self.notes: list[str] = []
        self.max_seqs = options.max_num_seqs
        self.max_step_tokens = options.max_num_batched_tokens
        self.use_graphs = use_graphs
        self._check_supported(engine)
        self._buffers: list[DeviceBuffer] = []
        self._graphs: dict[int, CudaGraph] = {}
        self._context = None
        with cuda_errors("start-up"):
            device = cuda.Device(device_index)
            self._context = device.retain_primary_context()
            self._context.push()
        try:
            with cuda_errors("loading the model"):
                self.device = device.name()
                self.stream = cuda.Stream()
                self.kernels = Kernels(cuda, device, self.stream)
                self._plan_memory(engine, options)
                self.weights = upload(engine.weights, self.stream, self._alloc,
                                      sys.stderr.isatty() if progress is None else progress)
                self._allocate_state()
        except BaseException:
            self.close()
            raise

    # ── set-up ────────────────────────────────────────────────────────────────────────────────────
    def _check_supported(self, engine: Engine) -> None:
        cfg = self.config
        if cfg.head_dim not in HEAD_DIMS:
            raise UsageError(f"the CUDA backend supports head_dim {', '.join(map(str, HEAD_DIMS))}; "
                             f"this model has {cfg.head_dim}")
        step = {"int8": 32, "int4": 64}.get(engine.weights.dtype, 8)  # an input chunk per 16-byte load (quant_layout)
        for name, value in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)):
            if value % step:
                raise UsageError(f"the CUDA backend needs {name} to be a multiple of {step}; this model has {value}")

    def _plan_memory(self, engine: Engine, options: RuntimeOptions) -> None:
        """Check that weights and workspaces fit, then size the KV pool from what is left."""
        cfg = self.config
        self.sm_count = self.kernels.sm_count
        self.graph_sizes = graph_sizes(min(self.max_seqs, self.max_step_tokens))
        self._int8 = engine.weights.dtype == "int8"
        self._quantized = engine.weights.dtype in ("int8", "int4")  # matrices widened to bf16 for the big GEMMs
        weights = device_bytes(engine.weights)
        free, total = cuda.mem_get_info()
        self._max_context_guess = min(options.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        workspace = self._workspace_bytes(engine)
        budget = int(options.gpu_memory_utilization * total) - (total - free)  # others' use counts against it
        kv_room = min(budget, free - RESERVE_BYTES) - weights - workspace
        if kv_room <= 0:
            raise DeviceError(f"not enough GPU memory: weights {gib(weights)} and buffers {gib(workspace)} need "
                              f"more than the {gib(max(budget, 0))} allowed ({gib(free)} free of {gib(total)}; "
                              "--gpu-memory-utilization)")
        self.num_blocks, self.max_context, notes = plan_blocks(options, cfg, 2, kv_room, "GPU")
        self.notes += notes
        if engine.weights.dtype in ("fp16", "fp32"):
            self.notes.append(f"{engine.weights.dtype} weights rounded to bf16 on the GPU")

    def _sizes(self) -> MetaSizes:
        T, B = self.max_step_tokens, self.max_seqs
        context = getattr(self, "max_context", self._max_context_guess)  # the guess bounds it until the pool is planned
        tokens = max(T, self.graph_sizes[-1])
        return MetaSizes(tokens=tokens, seqs=B, logits=tokens, samples=B, scores=T,
                         tiles=-(-T // FA_QUERIES) + B, table_width=-(-context // BLOCK_SIZE))

    def _proj_elements(self) -> int:
        """f32 elements the projection output must hold: any step's rows of any projection, or its split-K partials,
        as the plan runs them."""
        return self.kernels.workspace(projection_shapes(self.config).values(), self._sizes().tokens, int8=self._int8)

    def _decode_partials(self) -> int:
        """Rows (of head_dim) flash-decoding's partial results need at the largest split plan."""
        cfg = self.config
        width = self._sizes().table_width
        return max(b * cfg.num_attention_heads * decode_splits(b, cfg.num_key_value_heads, self.sm_count, width)
                   for b in range(1, self.max_seqs + 1))

    def _workspace_bytes(self, engine: Engine) -> int:
        """Bytes of everything _allocate_state makes but the KV pool (an upper bound)."""
        cfg, sizes = self.config, self._sizes()
        T, R, D, I, V = sizes.tokens, self.max_seqs, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        per_token = 4 * D + 2 * D + 2 * cfg.q_width * 2 + 2 * I
        widened = 0
        if self._quantized:
            quantized = [s for s in engine.weights.specs.values() if engine.weights.is_quantized(s.name)]
            widened = max(2 * s.elements for s in quantized) + max(4 * s.shape[0] for s in quantized)
        meta = 4 * (15 * T + sizes.seqs * sizes.table_width)
        state = (self.max_seqs + 1) * (4 * -(-V // 32) + 4 * V + 4)
        scoring = self._score_rows() * (4 * V + 2 * D) + 4 * T
        return (T * per_token + 4 * self._proj_elements() + R * (4 * V + 2 * D) + widened + meta + state + scoring
                + 4 * self._decode_partials() * (cfg.head_dim + 2))

    def _score_rows(self) -> int:
        """Rows of the prompt-scoring workspace: lm_head runs over at most this many scored rows at once."""
        return min(SCORE_ROWS, self.max_step_tokens)

    def _alloc(self, shape: tuple[int, ...], dtype: str) -> DeviceBuffer:
        nbytes = max(math.prod(shape) * ITEMSIZE[dtype], 1)
        try:
            allocation = cuda.mem_alloc(nbytes)
        except cuda.MemoryError:
            free, _ = cuda.mem_get_info()
            raise DeviceError(f"not enough GPU memory: needs {gib(nbytes)} more, {gib(free)} free") from None
        buffer = DeviceBuffer(int(allocation), tuple(shape), dtype, allocation)
        self._buffers.append(buffer)
        return buffer

    @property
    def allocated_bytes(self) -> int:
        """Device memory this backend holds (weights, KV cache, workspaces)."""
        return sum(b.nbytes for b in self._buffers if b.allocation is not None)

    def decode_weight_bytes(self, batch: int = 1) -> int:
        """Weight bytes a decode step of `batch` sequences reads (benchmarks' roofline)."""
        return decode_weight_bytes(self.weights, batch)

    def _allocate_state(self) -> None:
        """KV pool, per-slot state, the step metadata, activations, sampling buffers."""
        cfg, sizes = self.config, self._sizes()
        L, H, Hkv, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, I, V, T, R = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, sizes.tokens, self.max_seqs
        self.pad_state = self.max_seqs  # the state slot padded rows of a graph use
        self.kv = self._alloc((L, 2, self.num_blocks, Hkv, BLOCK_SIZE, d), "bf16")
        for start in range(0, self.kv.nbytes, 1 << 30):  # finite everywhere, the null block too (chunks: 32-bit counts)
            cuda.memset_d32_async(self.kv.ptr + start, 0, min(1 << 30, self.kv.nbytes - start) // 4, self.stream)
        self.seen_words = -(-V // 32)
        self.seen = self._alloc((self.max_seqs + 1, self.seen_words), "i32")
        cuda.memset_d32_async(self.seen.ptr, 0, self.seen.nbytes // 4, self.stream)
        self.counts = self._alloc((self.max_seqs + 1, V), "i32")  # generated ids per state (presence/frequency)
        cuda.memset_d32_async(self.counts.ptr, 0, self.counts.nbytes // 4, self.stream)
        self.last_sampled = self._alloc((self.max_seqs + 1,), "i32")
        cuda.memset_d32_async(self.last_sampled.ptr, 0, self.max_seqs + 1, self.stream)
        exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)  # as reference.rope_tables
        inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
        self.inv_freq = self._alloc((d // 2,), "f32")
        cuda.memcpy_htod(self.inv_freq.ptr, inv_freq)
        self.meta = StepMeta(sizes, self._alloc, self.stream)
        self.h = self._alloc((T, D), "f32")
        self.hb = self._alloc((T, D), "bf16")
        self.proj = self._alloc((self._proj_elements(),), "f32")
        self.q = self._alloc((T, H, d), "bf16")
        self.attn = self._alloc((T, H * d), "bf16")
        self.act = self._alloc((T, I), "bf16")
        self.xf = self._alloc((R, D), "bf16")
        self.logits = self._alloc((R, V), "f32")
        partials = self._decode_partials()
        self.part_o = self._alloc((partials, d), "f32")
        self.part_ml = self._alloc((partials, 2), "f32")
        self.counters = self._alloc((self.max_seqs * Hkv,), "i32")
        cuda.memset_d32_async(self.counters.ptr, 0, self.max_seqs * Hkv, self.stream)  # merge tickets: zero between steps
        self.tokens_out = self._alloc((R,), "i32")
        self.score_x = self._alloc((self._score_rows(), D), "bf16")  # final-normed scored rows
        self.score_logits = self._alloc((self._score_rows(), V), "f32")
        self.scores = self._alloc((self.max_step_tokens,), "f32")  # each scored row's target logprob
        self.raw_logits = None  # made at the first step that asks for logprobs (_keep_raw)
        self.upkeep = self._alloc((2, UPKEEP_IDS), "i32")
        self.widened = self.widened_scales = None
        if self._quantized:
            matrices = [w for layer in self.weights.layers for w in vars(layer).values()] + [self.weights.lm_head]
            # the matrices _matrix widens past Q4_MAX_ROWS rows (packed int8 on sm_90 is widened in the GEMM instead)
            in_loop = self.kernels.quant_in_loop
            quantized = [w for w in matrices if w.data.dtype in ("i8", "u8") and not (in_loop and w.q8)]
            if quantized:
                self.widened = self._alloc((max(math.prod(w.matrix_shape) for w in quantized),), "bf16")
            if any(w.q8 for w in quantized):  # dequantize_q8 puts the row scales back in row order too
                self.widened_scales = self._alloc((max(w.matrix_shape[0] for w in quantized),), "f32")
        self._results = [cuda.pagelocked_empty(R, np.int32) for _ in range(RESULT_RING)]
        self._score_results = [cuda.pagelocked_empty(self.max_step_tokens, np.float32) for _ in range(RESULT_RING)]
        self._result_events = [cuda.Event() for _ in range(RESULT_RING)]
        self._result_turn = 0
        self.stream.synchronize()

    # ── the Backend interface ─────────────────────────────────────────────────────────────────────────
    def launch(self, step: Step, return_logits: bool = False) -> PendingStep:
        arrays = self.check_step(step)
        with cuda_errors("a step"):
            self._upkeep(step)
            size = self._graph_size(arrays, return_logits)
            logits = None
            if size:
                self._upload(pad_decode(arrays, size, self.pad_state), size, [])
                self._graph(size).launch()
            else:
                tile_seq, tile_row = prefill_tiles(arrays.first_row, arrays.rows, arrays.num_decode)
                self._upload(arrays, arrays.num_seqs, [tile_seq, tile_row])
                logits = self._forward(self._plan(arrays, len(tile_seq), step.window), arrays, return_logits)
            pending = self._collect(len(arrays.sample_rows), len(arrays.score_rows), logits)
            if np.any(arrays.logprobs >= 0):
                pending.logprobs = self._fetch_logprobs(len(arrays.sample_rows), int(arrays.logprobs.max()))
            return pending

    def synchronize(self) -> None:
        """Wait for the GPU to finish everything queued (benchmarks time with this)."""
        with cuda_errors("synchronize"):
            self.stream.synchronize()

    @contextlib.contextmanager
    def in_thread(self):
        """This backend's context current in the calling thread while held (PyCUDA's contexts are per thread)."""
        with cuda_errors("binding the engine thread"):
            self._context.push()
        try:
            yield
        finally:
            cuda.Context.pop()

    def close(self) -> None:
        if self._context is None:
            return
        try:
            for graph in self._graphs.values():
                graph.close()
            self._graphs = {}
            if hasattr(self, "meta"):
                self.meta.close()
            for pinned in getattr(self, "_results", []) + getattr(self, "_score_results", []):
                free_pinned(pinned)
            self._results, self._score_results = [], []
            for buffer in self._buffers:
                buffer.free()
            self._buffers = []
        finally:
            self._context.pop()
            self._context = None

    # ── a step ────────────────────────────────────────────────────────────────────────────────────
    def _graph_size(self, arrays: StepArrays, return_logits: bool) -> int | None:
        """The captured batch size this step replays, or None when it runs eagerly (prefill, logits, no graphs)."""
        B = arrays.num_seqs
        plain = (arrays.num_decode == B and len(arrays.logit_rows) == B == len(arrays.sample_rows)
                 and np.array_equal(arrays.sample_rows, np.arange(B)) and not np.any(arrays.logprobs >= 0)
                 and not len(arrays.score_rows))
        if not (self.use_graphs and plain and not return_logits and B <= self.graph_sizes[-1]):
            return None
        return next(size for size in self.graph_sizes if size >= B)

    def _plan(self, arrays: StepArrays, tiles: int, window: int) -> Plan:
        cfg = self.config
        splits = decode_splits(max(arrays.num_decode, 1), cfg.num_key_value_heads, self.sm_count,
                               self.meta.sizes.table_width)
        logprobs = int(arrays.logprobs.max()) if len(arrays.logprobs) else -1
        return Plan(arrays.num_tokens, arrays.num_seqs, arrays.num_decode, len(arrays.logit_rows),
                    len(arrays.sample_rows), tiles, splits, window, logprobs, len(arrays.score_rows))

    def _upload(self, arrays: StepArrays, seqs: int, tiles: list[np.ndarray]) -> None:
        values = {"ids": arrays.token_ids, "positions": arrays.positions, "slots": arrays.slots,
                  "token_state": arrays.token_state, "first_row": arrays.first_row, "rows": arrays.rows,
                  "context": arrays.context, "logit_rows": arrays.logit_rows, "sample_state": arrays.sample_state,
                  "top_k": arrays.top_k, "temperature": device_temperatures(arrays.temperature), "top_p": arrays.top_p,
                  "u": device_uniforms(arrays), "penalty": arrays.repetition_penalty,
                  "presence": arrays.presence_penalty, "frequency": arrays.frequency_penalty,
                  "score_rows": arrays.score_rows, "score_targets": arrays.score_targets,
                  "block_tables": arrays.block_tables}
        if tiles:
            values["tile_seq"], values["tile_first_row"] = tiles
        self.meta.upload(values, seqs)

    def _upkeep(self, step: Step) -> None:
        """Before the forward pass: copy-on-write block copies, fresh slots' seen sets cleared, history marked."""
        k = self.kernels
        pairs = np.asarray(step.copies, np.int32).reshape(-1, 2)
        for start in range(0, len(pairs), UPKEEP_IDS // 2):
            chunk = pairs[start:start + UPKEEP_IDS // 2]
            cuda.memcpy_htod_async(self.upkeep.ptr, np.ascontiguousarray(chunk), self.stream)
            k.copy_blocks(self.kv, DeviceBuffer(self.upkeep.ptr, (len(chunk), 2), "i32"), len(chunk))
        V = self.config.vocab_size
        for slot in step.fresh_slots:
            cuda.memset_d32_async(self.seen.ptr + 4 * slot * self.seen_words, 0, self.seen_words, self.stream)
            cuda.memset_d32_async(self.counts.ptr + 4 * slot * V, 0, V, self.stream)
        for ids, states in self._upkeep_ids(step.seen):
            k.mark_seen(ids, states, self.seen, ids.shape[0])
        for ids, states in self._upkeep_ids(step.counted):
            k.count_tokens(ids, states, self.counts, ids.shape[0])

    def _upkeep_ids(self, marks: list[tuple[int, list[int]]]):
        """(ids, states) device buffers of at most UPKEEP_IDS entries each, from (slot, ids) pairs."""
        if not marks:
            return
        ids = np.concatenate([np.asarray(m, np.int32) for _, m in marks])
        states = np.concatenate([np.full(len(m), slot, np.int32) for slot, m in marks])
        for start in range(0, len(ids), UPKEEP_IDS):
            n = len(ids[start:start + UPKEEP_IDS])
            cuda.memcpy_htod_async(self.upkeep.ptr, np.ascontiguousarray(ids[start:start + n]), self.stream)
            cuda.memcpy_htod_async(self.upkeep.ptr + 4 * UPKEEP_IDS, np.ascontiguousarray(states[start:start + n]),
                                   self.stream)
            yield DeviceBuffer(self.upkeep.ptr, (n,), "i32"), DeviceBuffer(self.upkeep.ptr + 4 * UPKEEP_IDS, (n,), "i32")

    def _collect(self, samples: int, scored: int, logits: np.ndarray | None) -> CudaPending:
        """Queue the sampled ids' (and scores') copy to the host; the pending step that waits for it."""
        turn = self._result_turn
        self._result_turn = (turn + 1) % RESULT_RING
        self._result_events[turn].synchronize()  # its last reader is done (the loop reads each step before the next)
        if samples:
            cuda.memcpy_dtoh_async(self._results[turn][:samples], self.tokens_out.ptr, self.stream)
        scores = self._score_results[turn][:scored] if scored else None
        if scored:
            cuda.memcpy_dtoh_async(scores, self.scores.ptr, self.stream)
        self._result_events[turn].record(self.stream)
        return CudaPending(self._results[turn], samples, self._result_events[turn], logits, scores)

    def _graph(self, size: int) -> CudaGraph:
        """The decode step of `size` rows, captured at first use."""
        graph = self._graphs.get(size)
        if graph is None:
            cfg = self.config
            plan = Plan.decode_graph(size, decode_splits(size, cfg.num_key_value_heads, self.sm_count,
                                                         self.meta.sizes.table_width))
            graph = CudaGraph(self.stream, programmatic=self.kernels.programmatic)
            try:
                graph.capture(lambda: self._forward(plan, None, False))
            except BaseException:
                graph.close()
                raise
            self._graphs[size] = graph
        return graph

    # ── the forward pass ──────────────────────────────────────────────────────────────────────────
    def _forward(self, plan: Plan, arrays: StepArrays | None, return_logits: bool) -> np.ndarray | None:
        """Every kernel of one step, on the metadata uploaded for it; the logits [R, V] when asked."""
        cfg, k, w, m = self.config, self.kernels, self.weights, self.meta
        T, eps = plan.tokens, cfg.rms_norm_eps
        ids = m.field("ids", T)
        k.prepare_tokens(ids, self.last_sampled, m.field("token_state", T), self.seen, T)
        k.embedding(w.embedding.data, w.embedding.scales, ids, self.h, self.hb, T)
        for l, layer in enumerate(w.layers):
            k_pool, v_pool = self._kv_planes(l)
            parts = self._linear(self.hb, layer.qkv, T)
            k.qk_norm_rope_append(*parts, layer.q_norm.data, layer.k_norm.data, self.inv_freq, self.q, k_pool, v_pool,
                                  m.field("positions", T), m.field("slots", T), T, eps)
            self._attention(k_pool, v_pool, plan)
            k.residual_norm(self.h, *self._linear(self.attn, layer.o_proj, T), layer.post_attention_norm.data,
                            self.hb, T, eps)
            self._silu_linear(self.hb, layer.gate_up, T)
            k.residual_norm(self.h, *self._linear(self.act, layer.down_proj, T), layer.post_feedforward_norm.data,
                            self.hb, T, eps)
        if plan.scores:
            self._score(plan.scores, eps)
        R = plan.logits
        if R == 0:  # a prompt chunk short of its end: nothing to sample
            return None
        gathered = arrays is not None and not np.array_equal(arrays.sample_rows, np.arange(R))  # all-logits steps
        if gathered:
            xf, target = self._alloc((R, cfg.hidden_size), "bf16"), self._alloc((R, cfg.vocab_size), "f32")
        else:
            xf, target = self.xf.rows(0, R), self.logits.rows(0, R)
        try:
            k.rmsnorm_rows(self.h, m.field("logit_rows", R), w.final_norm.data, xf, R, eps)
            self._linear(xf, w.lm_head, R, out=target, can_split=False)
            logits = self._fetch(target, R) if return_logits else None
            if gathered:
                self._gather_rows(target, arrays.sample_rows)
        finally:
            if gathered:
                self.stream.synchronize()
                for temporary in (xf, target):
                    self._buffers.remove(temporary)
                    temporary.free()
        if plan.samples:
            S = plan.samples
            raw = self._keep_raw(S) if plan.logprobs >= 0 else None
            k.penalize_rows(self._rows(self.logits, S), m.field("penalty", S), m.field("presence", S),
                            m.field("frequency", S), m.field("sample_state", S), self.seen, self.counts, S)
            k.sample_rows(self._rows(self.logits, S), self.vocab_limit, m.field("temperature", S), m.field("top_k", S),
                          m.field("top_p", S), m.field("u", S), m.field("sample_state", S), self.tokens_out,
                          self.last_sampled, self.counts, S)
            if raw is not None:
                k.row_logprobs(raw, self.vocab_limit, self.tokens_out, plan.logprobs, self.logprob, self.top_ids,
                               self.top_logprobs, S)
        return logits

    def _score(self, count: int, eps: float) -> None:
        """Prompt scoring: scores[p] = log-softmax of row score_rows[p]'s logits (all V columns) at score_targets[p],
        lm_head over at most _score_rows() rows at a time, so the logits never outgrow the workspace."""
        k, m, w = self.kernels, self.meta, self.weights
        rows, targets = m.field("score_rows", count), m.field("score_targets", count)
        for start in range(0, count, self._score_rows()):
            n = min(self._score_rows(), count - start)
            x, logits = self.score_x.rows(0, n), self.score_logits.rows(0, n)
            k.rmsnorm_rows(self.h, rows.rows(start, n), w.final_norm.data, x, n, eps)
            self._linear(x, w.lm_head, n, out=logits, can_split=False)
            k.row_logprobs(logits, self.config.vocab_size, targets.rows(start, n), 0, self.scores.rows(start, n),
                           None, None, n)

    def _keep_raw(self, rows: int) -> DeviceBuffer:
        """A copy of the sampled rows' raw logits (the penalties change them in place), for their logprobs."""
        if self.raw_logits is None:  # only steps that ask for logprobs pay for this buffer
            V = self.config.vocab_size
            self.raw_logits = self._alloc((self.max_seqs, V), "f32")
            self.logprob = self._alloc((self.max_seqs,), "f32")
            self.top_ids = self._alloc((self.max_seqs, TOP_LOGPROBS), "i32")
            self.top_logprobs = self._alloc((self.max_seqs, TOP_LOGPROBS), "f32")
        cuda.memcpy_dtod_async(self.raw_logits.ptr, self.logits.ptr, rows * self.config.vocab_size * 4, self.stream)
        return self.raw_logits.rows(0, rows)

    def _rows(self, buffer: DeviceBuffer, rows: int) -> DeviceBuffer:
        return buffer.rows(0, rows)

    def _fetch_logprobs(self, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The logprobs of a step that asked for them (copied after its sampling: these steps are not pipelined)."""
        logprob = np.empty(rows, np.float32)
        ids, top = np.empty((rows, TOP_LOGPROBS), np.int32), np.empty((rows, TOP_LOGPROBS), np.float32)
        cuda.memcpy_dtoh_async(logprob, self.logprob.ptr, self.stream)
        cuda.memcpy_dtoh_async(ids, self.top_ids.ptr, self.stream)
        cuda.memcpy_dtoh_async(top, self.top_logprobs.ptr, self.stream)
        self.stream.synchronize()
        return logprob, ids[:, :k], top[:, :k]

    def _fetch(self, logits: DeviceBuffer, rows: int) -> np.ndarray:
        out = np.empty((rows, self.config.vocab_size), np.float32)
        cuda.memcpy_dtoh_async(out, logits.ptr, self.stream)
        self.stream.synchronize()
        return out

    def _gather_rows(self, source: DeviceBuffer, rows: np.ndarray) -> None:
        """Sampled rows of an all-logits buffer into the first rows of the sampling buffer (tests' path)."""
        width = self.config.vocab_size * 4
        for i, row in enumerate(rows):
            cuda.memcpy_dtod_async(self.logits.ptr + i * width, source.ptr + int(row) * width, width, self.stream)

    def _kv_planes(self, layer: int) -> tuple[DeviceBuffer, DeviceBuffer]:
        _, _, blocks, Hkv, size, d = self.kv.shape
        plane = blocks * Hkv * size * d * 2
        base = self.kv.ptr + 2 * layer * plane
        return (DeviceBuffer(base, (blocks, Hkv, size, d), "bf16"),
                DeviceBuffer(base + plane, (blocks, Hkv, size, d), "bf16"))

    def _matrix(self, weight: DeviceWeight) -> tuple[DeviceBuffer, DeviceBuffer | None]:
        """A weight matrix for the bf16 GEMM and the per-row scales of its epilogue: bf16 as is; past Q4_MAX_ROWS rows
        (where the GEMM's math outweighs the weights' bytes) int4 dequantized into the scratch, packed int8 widened
        into it with its scales put back in row order (the epilogue applies them), an unpacked int8 matrix widened.
        A scratch is written inside the step, so its GEMM is launched with static_weights=False (Kernels.gemm)."""
        if weight.data.dtype == "bf16":
            return weight.data, None
        N = weight.matrix_shape[0]
        widened = DeviceBuffer(self.widened.ptr, weight.matrix_shape, "bf16")
        if weight.int4:
            self.kernels.dequantize_q4(weight.data, weight.scales, weight.zeros, widened, N, pairs=weight.pairs)
            return widened, None
        if weight.q8:
            scales = DeviceBuffer(self.widened_scales.ptr, (N,), "f32")
            self.kernels.dequantize_q8(weight.data, weight.scales, widened, scales, N, pairs=weight.pairs)
            return widened, scales
        self.kernels.widen_int8(weight.data, widened)
        return widened, weight.scales

    def _gemm(self, x: DeviceBuffer, weight: DeviceWeight, out: DeviceBuffer, rows: int, **plan) -> None:
        """Kernels.gemm on the weight's bf16 matrix and epilogue scales (_matrix); a widened scratch is not static."""
        self.kernels.gemm(x, *self._matrix(weight), out, rows, static_weights=weight.data.dtype == "bf16", **plan)

    def _quant_mma(self, x: DeviceBuffer, weight: DeviceWeight, y: DeviceBuffer, rows: int, silu: bool) -> bool:
        """The packed int4/int8 kernels (weights dequantized in registers) for up to Q4_MAX_ROWS rows: whether they ran."""
        if rows > Q4_MAX_ROWS or not (weight.int4 or weight.q8):
            return False
        N = weight.matrix_shape[0]
        if weight.int4:
            self.kernels.gemm_q4(x, weight.data, weight.scales, weight.zeros, y, rows, N, silu=silu)
        else:
            self.kernels.gemm_q8(x, weight.data, weight.scales, y, rows, N, silu=silu)
        return True

    def _quant_in_loop(self, x: DeviceBuffer, weight: DeviceWeight, y: DeviceBuffer, rows: int, splits: int,
                       silu: bool) -> bool:
        """Packed int8 past Q4_MAX_ROWS rows, int4 up to Q4_IN_LOOP_MAX_ROWS, on sm_90: gemm_q8_tma / gemm_q4_tma
        (dequantized in the wgmma main loop, no scratch) with the plan's split count (the workspace is sized for it):
        whether it ran."""
        if not (self.kernels.quant_in_loop and (weight.q8 or (weight.int4 and rows <= Q4_IN_LOOP_MAX_ROWS))):
            return False
        N = weight.matrix_shape[0]
        if weight.q8:
            self.kernels.gemm_q8_tma(x, weight.data, weight.scales, y, rows, N, silu=silu, splits=splits,
                                     pairs=weight.pairs)
        else:
            self.kernels.gemm_q4_tma(x, weight.data, weight.scales, weight.zeros, y, rows, N, silu=silu, splits=splits,
                                     pairs=weight.pairs)
        return True

    def _linear(self, x: DeviceBuffer, weight: DeviceWeight, rows: int, out: DeviceBuffer | None = None,
                can_split: bool = True) -> tuple[DeviceBuffer, int, int]:
        """y = x·Wᵀ for `rows` rows by the plan's kernel: (output [parts·rows, N] f32, parts, part stride in elements)."""
        N, K = weight.matrix_shape
        x = x.rows(0, rows) if x.shape[0] != rows else x
        y = out.rows(0, rows) if out is not None else DeviceBuffer(self.proj.ptr, (rows, N), "f32")
        if self._quant_mma(x, weight, y, rows, silu=False):  # one complete output
            return y, 1, rows * N
        plan = self.kernels.plan(rows, N, K, int8=weight.int8_rows)
        if plan.variant == "gemv":
            self.kernels.gemv(weight.data, weight.scales, x, y, rows)
            return y, 1, rows * N
        splits = plan.splits if can_split else 1
        y = out.rows(0, rows) if out is not None else DeviceBuffer(self.proj.ptr, (splits * rows, N), "f32")
        if not self._quant_in_loop(x, weight, y, rows, splits, silu=False):
            self._gemm(x, weight, y, rows, splits=splits, bm=plan.bm, variant=plan.variant)
        return y, splits, rows * N

    def _silu_linear(self, x: DeviceBuffer, weight: DeviceWeight, rows: int) -> None:
        """act = SiLU(x·gateᵀ)·(x·upᵀ) (bf16) from the fused [gate; up] matrix, by the plan's kernel: fused in its
        epilogue with one split, else split-K partials summed by silu_mul_parts."""
        N, K = weight.matrix_shape
        act = self.act.rows(0, rows)
        x = x.rows(0, rows)
        if self._quant_mma(x, weight, act, rows, silu=True):
            return
        plan = self.kernels.plan(rows, N, K, silu=True, int8=weight.int8_rows)
        if plan.variant == "gemv":
            self.kernels.gemv(weight.data, weight.scales, x, act, rows, silu=True)
            return
        if plan.splits == 1:
            if not self._quant_in_loop(x, weight, act, rows, 1, silu=True):
                self._gemm(x, weight, act, rows, silu=True, bm=plan.bm, variant=plan.variant)
            return
        parts = DeviceBuffer(self.proj.ptr, (plan.splits * rows, N), "f32")
        if not self._quant_in_loop(x, weight, parts, rows, plan.splits, silu=False):
            self._gemm(x, weight, parts, rows, splits=plan.splits, bm=plan.bm, variant=plan.variant)
        self.kernels.silu_mul_parts(parts, plan.splits, rows * N, act, rows)

    def _attention(self, k_pool: DeviceBuffer, v_pool: DeviceBuffer, plan: Plan) -> None:
        """attn [T, H·d]: flash-decoding for the single-token sequences, flash attention for the prompt chunks."""
        k, m = self.kernels, self.meta
        if plan.decode:
            shape = (plan.decode, self.config.num_attention_heads, plan.splits)
            part_o = DeviceBuffer(self.part_o.ptr, (*shape, self.config.head_dim), "f32")
            part_ml = DeviceBuffer(self.part_ml.ptr, (*shape, 2), "f32")
            k.paged_decode(self.q, k_pool, v_pool, self.attn, part_o, part_ml, self.counters,
                           m.field("context", plan.decode), m.field("block_tables"), plan.decode, plan.splits,
                           plan.window)
        if plan.tiles:
            k.paged_prefill(self.q, k_pool, v_pool, self.attn, m.field("tile_seq", plan.tiles),
                            m.field("tile_first_row", plan.tiles), m.field("first_row", plan.seqs),
                            m.field("rows", plan.seqs), m.field("context", plan.seqs), m.field("block_tables"),
                            plan.tiles, plan.window)


def device_temperatures(temperature: np.ndarray) -> np.ndarray:
    """float32 temperatures for the kernels: a positive one that float32 rounds to 0 (1e-310) stays positive (the
    smallest subnormal), so the row still samples among its maximum ids instead of turning greedy."""
    out = temperature.astype(np.float32)
    return np.where((temperature > 0) & (out == 0), np.float32(1e-45), out)


def device_uniforms(arrays: StepArrays) -> np.ndarray:
    """float32 uniforms, kept below 1 (a float64 u just below 1 rounds up to 1.0 in float32)."""
    return np.minimum(arrays.u.astype(np.float32), np.float32(1) - np.float32(2**-24))


def pad_decode(arrays: StepArrays, size: int, pad_state: int) -> StepArrays:
    """A decode step's arrays padded to a graph's `size` rows: padded rows read and write the null block only,
    keep their state in the pad slot, and are sampled greedily into ids nobody reads."""
    extra = size - arrays.num_seqs
    if extra == 0:
        return arrays

    def grow(array: np.ndarray, value) -> np.ndarray:
        return np.concatenate([array, np.full(extra, value, array.dtype)])

    tables = np.concatenate([arrays.block_tables, np.zeros((extra, arrays.block_tables.shape[1]), np.int32)])
    return StepArrays(
        token_ids=grow(arrays.token_ids, 0), positions=grow(arrays.positions, 0), slots=grow(arrays.slots, 0),
        token_state=grow(arrays.token_state, pad_state), first_row=np.arange(size, dtype=np.int32),
        rows=grow(arrays.rows, 1), context=grow(arrays.context, 1), block_tables=tables, num_decode=size,
        logit_rows=np.arange(size, dtype=np.int32), sample_rows=np.arange(size, dtype=np.int32),
        temperature=grow(arrays.temperature, 0.0), top_k=grow(arrays.top_k, 0), top_p=grow(arrays.top_p, 1.0),
        repetition_penalty=grow(arrays.repetition_penalty, 1.0), presence_penalty=grow(arrays.presence_penalty, 0.0),
        frequency_penalty=grow(arrays.frequency_penalty, 0.0), logprobs=grow(arrays.logprobs, -1),
        score_rows=arrays.score_rows, score_targets=arrays.score_targets, u=grow(arrays.u, 0.0),
        sample_state=grow(arrays.sample_state, pad_state), params=arrays.params)
