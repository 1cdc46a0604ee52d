"""The CUDA backend: OLMo 2 on an NVIDIA GPU with olmoscope's own kernels (cuda/), launched through PyCUDA.

Weights live on the GPU in bf16 (int8 engines stay int8, with per-row f32 scales; fp16/fp32 engines are
rounded to bf16 at upload). Prefill runs tensor-core GEMMs and flash attention over T tokens; a decode step
is 7 kernels per layer (4 GEMVs, QK-norm/RoPE/append, flash-decoding, 2 fused residual norms), captured once
as a CUDA graph and replayed, its per-step values (token id, position) read from device memory. Sampling
runs on the GPU: only the chosen token id crosses back to the host, and the step that feeds it back is
already queued behind it, so the GPU does not wait for the host between tokens.
"""

from __future__ import annotations

import math
import sys

import ml_dtypes
import numpy as np
from tqdm import tqdm

from olmoscope.errors import DeviceError, UsageError
from olmoscope.runtime.backend import Backend, check_max_context
from olmoscope.runtime.cuda.driver import ITEMSIZE, CudaGraph, DeviceBuffer, available, cuda, cuda_errors, free_pinned, gib
from olmoscope.runtime.cuda.kernels import FD_SPLIT, HEAD_DIMS, Kernels
from olmoscope.runtime.engine import Engine
from olmoscope.runtime.sampler import SamplingParams

STAGING_BYTES = 64 << 20  # each of the two pinned upload buffers
RESERVE_BYTES = 512 << 20  # left free for the driver, cubins and the odd temporary
PREFILL_CHUNK = 2048  # longest prompt run in one pass; longer ones run in chunks over the same cache

class CudaBackend(Backend):
    """One OLMo 2 model on one NVIDIA GPU; see backend.py for the contract.

    >>> with CudaBackend(open_engine("olmo2-1b.olmo")) as gpu: gpu.prefill(np.array([9906, 1917]))
    """

    name = "cuda"

    def __init__(self, engine: Engine, max_context: int | None = None, *, use_graph: bool = True,
                 progress: bool | None = None, device_index: int = 0):
        usable, reason = available()
        if not usable:
            raise DeviceError(f"--device cuda: {reason}")
        cfg = engine.config
        self.config = cfg
        self.vocab_limit = engine.vocab_limit
        self.notes: list[str] = []
        self._check_supported(engine)
        requested = check_max_context(max_context, cfg)
        self._buffers: list[DeviceBuffer] = []
        self._graphs: list[CudaGraph] | None = None  # the decode step, one per logits slot
        self._use_graph = use_graph
        self._slot: int | None = None  # the logits slot holding the last position's logits
        self._speculated: tuple[int, int, int] | None = None  # (token, position, slot) of a step already queued
        self._position = 0
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
                self.max_context = self._plan_memory(engine, requested, explicit=max_context is not None)
                self._upload_weights(engine, sys.stderr.isatty() if progress is None else progress)
                self._allocate_state()
        except BaseException:
            self.close()
            raise

    # ── set-up ────────────────────────────────────────────────────────────────────────────────────
    def _check_supported(self, engine: Engine) -> None:
        cfg = self.config
        d = cfg.head_dim
        if d not in HEAD_DIMS:
            raise UsageError(f"the CUDA backend supports head_dim {', '.join(map(str, HEAD_DIMS))}; this model has {d}")
        step = 16 if engine.weights.dtype == "int8" else 8
        for name, value in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)):
            if value % step:
                raise UsageError(f"the CUDA backend needs {name} to be a multiple of {step}; this model has {value}")

    def _device_dtype(self, name: str) -> str:
        spec = self._weights.specs[name]
        if spec.kind != "matrix":
            return "f32"
        return "i8" if self._weights.dtype == "int8" else "bf16"

    def _plan_memory(self, engine: Engine, requested: int, explicit: bool) -> int:
        """Check the weights fit and size the KV cache: the requested context, or as much as memory allows."""
        cfg = self.config
        self._weights = engine.weights
        weight_bytes = 0
        for name in engine.weights.names:
            shape = engine.weights.specs[name].shape
            weight_bytes += math.prod(shape) * ITEMSIZE[self._device_dtype(name)]
            if self._device_dtype(name) == "i8":
                weight_bytes += shape[0] * 4
        self._widen_elements = 0
        if engine.weights.dtype == "int8":  # prefill widens one layer matrix at a time into bf16
            self._widen_elements = max(math.prod(s.shape) for s in engine.weights.specs.values()
                                       if s.kind == "matrix" and s.layer is not None)
        chunk = min(PREFILL_CHUNK, requested)
        workspace = self._workspace_bytes(chunk) + 2 * self._widen_elements
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
        free, _ = cuda.mem_get_info()
        fixed = weight_bytes + workspace + RESERVE_BYTES
        needed = fixed + kv_per_token * requested
        if needed <= free:
            context = requested
        elif not explicit and fixed + kv_per_token * 128 <= free:
            context = int((free - fixed) // kv_per_token) // FD_SPLIT * FD_SPLIT or 128
            self.notes.append(f"max context capped by free GPU memory: {context} of {requested} tokens")
        else:
            raise DeviceError(f"not enough GPU memory: needs {gib(needed)}, {gib(free)} free "
                              f"(weights {gib(weight_bytes)}, KV cache for {requested} tokens "
                              f"{gib(kv_per_token * requested)}); try a smaller --max-context")
        self._chunk = min(chunk, context)
        return context

    def _workspace_bytes(self, tokens: int) -> int:
        """Bytes of the buffers _allocate_state makes besides the weights and the KV cache (an upper bound)."""
        cfg = self.config
        D, I, Hd, Hkvd, V = cfg.hidden_size, cfg.intermediate_size, cfg.q_width, cfg.kv_width, cfg.vocab_size
        # prefill, per token: qkv f32, q and attention bf16, h and a f32, h bf16, SiLU·up bf16, the id
        per_token = 4 * (Hd + 2 * Hkvd) + 2 * Hd + 2 * Hd + 4 * D + 4 * D + 2 * D + 2 * I + 4
        splits = math.ceil(cfg.max_position_embeddings / FD_SPLIT)
        # decode: h, qkv, attention, a, act, xf; partials; two logits slots and the penalized copy
        decode = 4 * (3 * D + Hd + 2 * Hkvd + Hd + I + cfg.num_attention_heads * splits * (cfg.head_dim + 2) + 3 * V)
        return tokens * per_token + decode + 4 * cfg.max_position_embeddings

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

    def _upload_weights(self, engine: Engine, progress: bool) -> None:
        """Every engine tensor to the GPU through two pinned staging buffers, in the engine's order."""
        weights = engine.weights
        self.w: dict[str, DeviceBuffer] = {}
        self.scales: dict[str, DeviceBuffer] = {}
        staging = [cuda.pagelocked_empty(STAGING_BYTES, np.uint8) for _ in range(2)]
        done = [cuda.Event(), cuda.Event()]
        turn = 0
        total = sum(math.prod(weights.specs[n].shape) * ITEMSIZE[self._device_dtype(n)] for n in weights.names)
        converted = weights.dtype in ("fp16", "fp32")
        if converted:
            self.notes.append(f"{weights.dtype} weights rounded to bf16 on the GPU")
        with tqdm(total=total, unit="B", unit_scale=True, desc="uploading weights", disable=not progress,
                  file=sys.stderr) as bar:

            def send(dest: int, array: np.ndarray) -> None:
                nonlocal turn
                data = array.reshape(-1).view(np.uint8)
                for start in range(0, data.size, STAGING_BYTES):
                    part = data[start:start + STAGING_BYTES]
                    done[turn].synchronize()  # the buffer's previous copy has left it
                    staging[turn][: part.size] = part
                    cuda.memcpy_htod_async(dest + start, staging[turn][: part.size], self.stream)
                    done[turn].record(self.stream)
                    turn ^= 1
                    bar.update(part.size)

            for name in weights.names:
                array = weights.tensor(name)
                dtype = self._device_dtype(name)
                buffer = self._alloc(tuple(array.shape), dtype)
                self.w[name] = buffer
                if dtype == "f32":
                    send(buffer.ptr, np.ascontiguousarray(array, dtype=np.float32))
                elif dtype == "i8":
                    send(buffer.ptr, np.ascontiguousarray(array))
                    scales = np.ascontiguousarray(weights.scales(name), dtype=np.float32)
                    self.scales[name] = self._alloc(scales.shape, "f32")
                    send(self.scales[name].ptr, scales)
                else:
                    rows_per_part = max(1, STAGING_BYTES // (2 * array.shape[1]))
                    for r in range(0, array.shape[0], rows_per_part):  # fp32 → bf16 a slab at a time
                        part = np.ascontiguousarray(array[r:r + rows_per_part]).astype(ml_dtypes.bfloat16, copy=False)
                        send(buffer.ptr + r * array.shape[1] * 2, part)
            self.stream.synchronize()
        for buffer in staging:
            free_pinned(buffer)
        self._head = weights.head_name

    def _allocate_state(self) -> None:
        """KV cache, the decode step's buffers, the prefill workspace, sampling scratch."""
        cfg = self.config
        L, H, Hkv, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, I, V, S = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, self.max_context
        n_qkv = cfg.q_width + 2 * cfg.kv_width
        self.k_cache = self._alloc((L, Hkv, S, d), "bf16")
        self.v_cache = self._alloc((L, Hkv, S, d), "bf16")
        exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)  # as reference.rope_tables
        inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
        self.inv_freq = self._alloc((d // 2,), "f32")
        cuda.memcpy_htod(self.inv_freq.ptr, inv_freq)
        # per-step values the captured graph reads: [token id, position]
        self.step = self._alloc((2,), "i32")
        self._step_host = cuda.pagelocked_empty(2, np.int32)
        self._step_sent = cuda.Event()
        self._step_sent.record(self.stream)
        splits = math.ceil(S / FD_SPLIT)
        self.dec = {
            "h": self._alloc((1, D), "f32"), "qkv": self._alloc((1, n_qkv), "f32"), "q": self._alloc((1, H, d), "bf16"),
            "po": self._alloc((H, splits, d), "f32"), "pml": self._alloc((H, splits, 2), "f32"),
            "attn": self._alloc((H * d,), "f32"), "counters": self._alloc((H,), "i32"),
            "a": self._alloc((1, D), "f32"), "act": self._alloc((I,), "f32"),
            "xf": self._alloc((1, D), "f32"),
        }
        # two logits buffers: a decode step queued ahead by sample() writes the one sample() is not reading
        self.logits_slots = [self._alloc((V,), "f32"), self._alloc((V,), "f32")]
        C = self._chunk
        self.pre = {
            "ids": self._alloc((C,), "i32"), "h": self._alloc((C, D), "f32"), "hb": self._alloc((C, D), "bf16"),
            "qkv": self._alloc((C, n_qkv), "f32"), "q": self._alloc((C, H, d), "bf16"),
            "attn": self._alloc((C, H * d), "bf16"), "a": self._alloc((C, D), "f32"), "act": self._alloc((C, I), "bf16"),
        }
        cuda.memset_d32(self.dec["counters"].ptr, 0, H)  # flash-decoding's merge tickets start (and stay) at zero
        self.widened = self._alloc((self._widen_elements,), "bf16") if self._widen_elements else None
        self.penalized = self._alloc((V,), "f32")
        self.seen_ids = self._alloc((S + 1,), "i32")
        self.token_out = self._alloc((1,), "i32")
        self._token_host = cuda.pagelocked_empty(1, np.int32)
        self._token_ready = cuda.Event()
        self._last_logits: DeviceBuffer | None = None
        self.stream.synchronize()

    # ── Backend interface ─────────────────────────────────────────────────────────────────────────
    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position = 0  # attention reads positions < position only: stale entries are never seen
        self._last_logits = self._slot = self._speculated = None

    def prefill(self, token_ids: np.ndarray, return_logits: bool = False) -> np.ndarray | None:
        ids = self._check_ids(token_ids)
        self._speculated = None  # a step queued ahead is stream-ordered before this and then overwritten
        outputs = []
        with cuda_errors("prefill"):
            for start in range(0, len(ids), self._chunk):
                part = ids[start:start + self._chunk]
                logits = self._prefill_chunk(part, return_logits)
                if logits is not None:
                    outputs.append(logits)
            self.stream.synchronize()
        return np.concatenate(outputs) if return_logits else None

    def decode_step(self, token_id: int, return_logits: bool = False) -> np.ndarray | None:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise ValueError(f"token id must be an integer, got {type(token_id).__name__}")
        if not 0 <= token_id < self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        self.check_room(1)
        with cuda_errors("a decode step"):
            queued, self._speculated = self._speculated, None
            if queued is not None and queued[:2] == (int(token_id), self._position):
                slot = queued[2]  # sample() already queued this very step: nothing to launch
            else:
                slot = queued[2] if queued is not None else self._free_slot()
                self._step_sent.synchronize()  # the pinned [token, position] pair is free to rewrite
                self._step_host[0], self._step_host[1] = int(token_id), self._position
                cuda.memcpy_htod_async(self.step.ptr, self._step_host, self.stream)
                self._step_sent.record(self.stream)
                self._launch_decode(slot)
            self._position += 1
            self._slot, self._last_logits = slot, self.logits_slots[slot]
            if not return_logits:
                return None
            out = np.empty(self.config.vocab_size, np.float32)
            cuda.memcpy_dtoh_async(out, self._last_logits.ptr, self.stream)
            self.stream.synchronize()
            return out

    def sample(self, params: SamplingParams, rng: np.random.Generator, history: np.ndarray) -> int:
        """The next token, chosen on the GPU. With a decode graph, the step that feeds this token back is queued
        right behind it (into the other logits slot), so the GPU works while the host looks at the token; a
        decode_step with that token and position then launches nothing."""
        if self._last_logits is None:
            raise ValueError("sample() before any prefill or decode_step")
        with cuda_errors("sampling"):
            logits = self._last_logits
            if params.repetition_penalty != 1.0 and history is not None and len(history):
                seen = np.unique(np.asarray(history, dtype=np.int64))
                seen = seen[(seen >= 0) & (seen < self.vocab_limit)].astype(np.int32)[: self.seen_ids.shape[0]]
                cuda.memcpy_dtod_async(self.penalized.ptr, logits.ptr, logits.nbytes, self.stream)
                if seen.size:
                    cuda.memcpy_htod_async(self.seen_ids.ptr, seen, self.stream)
                    self.kernels.repetition_penalty(self.penalized, self.seen_ids, int(seen.size),
                                                    float(params.repetition_penalty))
                logits = self.penalized
            u = 0.0 if params.greedy else float(rng.random())  # exactly one draw per non-greedy sample
            self.kernels.sample(logits, self.vocab_limit, float(params.temperature), int(params.top_k),
                                float(params.top_p), u, self.token_out)
            cuda.memcpy_dtoh_async(self._token_host, self.token_out.ptr, self.stream)
            self._token_ready.record(self.stream)
            slot = self._speculate()
            self._token_ready.synchronize()
            token = int(self._token_host[0])
            self._speculated = (token, self._position, slot) if slot is not None else None
        return token

    def synchronize(self) -> None:
        """Wait for the GPU to finish everything queued (benchmarks time with this)."""
        with cuda_errors("synchronize"):
            self.stream.synchronize()

    def close(self) -> None:
        if self._context is None:
            return
        try:
            for graph in self._graphs or []:
                graph.close()
            self._graphs = None
            for buffer in self._buffers:
                buffer.free()
            self._buffers = []
            for pinned in ("_step_host", "_token_host"):
                if hasattr(self, pinned):
                    free_pinned(getattr(self, pinned))
                    delattr(self, pinned)
        finally:
            self._context.pop()
            self._context = None

    # ── the forward pass ──────────────────────────────────────────────────────────────────────────
    def _check_ids(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        self.check_room(len(ids))
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        return ids.astype(np.int32)

    def _matrix(self, name: str) -> tuple[DeviceBuffer, DeviceBuffer | None]:
        """A weight matrix for the GEMM: bf16 as is, int8 widened into the scratch (scales applied in the epilogue)."""
        weight = self.w[name]
        if weight.dtype != "i8":
            return weight, None
        widened = DeviceBuffer(self.widened.ptr, weight.shape, "bf16")
        self.kernels.widen_int8(weight, widened)
        return widened, self.scales[name]

    def _prefill_chunk(self, ids: np.ndarray, return_logits: bool) -> np.ndarray | None:
        cfg, k, p = self.config, self.kernels, self.pre
        T, eps = len(ids), cfg.rms_norm_eps
        self._step_sent.synchronize()
        self._step_host[1] = self._position
        cuda.memcpy_htod_async(self.step.ptr, self._step_host, self.stream)
        self._step_sent.record(self.stream)
        cuda.memcpy_htod_async(p["ids"].ptr, ids, self.stream)
        start_pos = DeviceBuffer(self.step.ptr + 4, (1,), "i32")
        k.embedding(self.w["embedding"], self.scales.get("embedding"), p["ids"], p["h"], p["hb"], T)
        for layer in range(cfg.num_hidden_layers):
            name = f"layers.{layer}."
            kc, vc = self._cache(layer)
            k.gemm(p["hb"], *self._matrix(name + "qkv"), p["qkv"], T)
            k.qk_norm_rope_append(p["qkv"], self.w[name + "q_norm"], self.w[name + "k_norm"], self.inv_freq, p["q"],
                                  kc, vc, start_pos, T, eps)
            k.flash_prefill(p["q"], kc, vc, p["attn"], start_pos, T)
            k.gemm(p["attn"], *self._matrix(name + "o_proj"), p["a"], T)
            k.residual_norm(p["h"], p["a"], self.w[name + "post_attention_norm"], p["hb"], T, eps)
            k.gemm(p["hb"], *self._matrix(name + "gate_up"), p["act"], T, silu=True)
            k.gemm(p["act"], *self._matrix(name + "down_proj"), p["a"], T)
            k.residual_norm(p["h"], p["a"], self.w[name + "post_feedforward_norm"], p["hb"], T, eps)
        self._position += T
        self._slot, self._last_logits = 0, self.logits_slots[0]
        head, head_scales = self.w[self._head], self.scales.get(self._head)
        if not return_logits:  # the last token's logits only: one GEMV
            k.rmsnorm(p["h"].rows(T - 1, 1), self.w["final_norm"], self.dec["xf"], 1, eps)
            k.gemv(head, head_scales, self._flat(self.dec["xf"]), self.logits_slots[0])
            return None
        V = cfg.vocab_size
        logits = self._alloc((T, V), "f32")
        try:
            if head.dtype == "i8":  # the lm_head is too large to widen whole: one GEMV per row
                for t in range(T):
                    k.rmsnorm(p["h"].rows(t, 1), self.w["final_norm"], self.dec["xf"], 1, eps)
                    k.gemv(head, head_scales, self._flat(self.dec["xf"]), self._flat(logits.rows(t, 1)))
            else:
                k.rmsnorm(p["h"], self.w["final_norm"], p["hb"], T, eps)
                k.gemm(p["hb"], head, None, logits, T)
            cuda.memcpy_dtod_async(self.logits_slots[0].ptr, logits.rows(T - 1, 1).ptr, V * 4, self.stream)
            out = np.empty((T, V), np.float32)
            cuda.memcpy_dtoh_async(out, logits.ptr, self.stream)
            self.stream.synchronize()
        finally:
            self._buffers.remove(logits)
            logits.free()
        return out

    @staticmethod
    def _flat(buffer: DeviceBuffer) -> DeviceBuffer:
        return DeviceBuffer(buffer.ptr, (math.prod(buffer.shape),), buffer.dtype)

    def _cache(self, layer: int) -> tuple[DeviceBuffer, DeviceBuffer]:
        _, Hkv, S, d = self.k_cache.shape
        per_layer = Hkv * S * d * 2
        return (DeviceBuffer(self.k_cache.ptr + layer * per_layer, (Hkv, S, d), "bf16"),
                DeviceBuffer(self.v_cache.ptr + layer * per_layer, (Hkv, S, d), "bf16"))

    def _free_slot(self) -> int:
        """The logits slot that is not holding the last logits."""
        return 1 - self._slot if self._slot is not None else 0

    def _launch_decode(self, slot: int) -> None:
        """Queue one decode step reading self.step, its logits into `slot`."""
        if self._use_graph and self._graphs is None:
            self._capture_decode()
        if self._graphs is not None:
            self._graphs[slot].launch()
        else:
            self._decode_kernels(slot)

    def _speculate(self) -> int | None:
        """Queue the decode step of the token being sampled (read on the GPU from token_out); its slot, or None."""
        if not self._use_graph or self._position >= self.max_context:
            return None
        if self._graphs is None:
            self._capture_decode()
            if self._graphs is None:
                return None
        slot = self._free_slot()
        self.kernels.feed_token(self.token_out, self.step, self._position)
        self._graphs[slot].launch()
        return slot

    def _decode_kernels(self, slot: int) -> None:
        """One token through the model: every launch reads the token and position from self.step."""
        cfg, k, b = self.config, self.kernels, self.dec
        eps = cfg.rms_norm_eps
        token = DeviceBuffer(self.step.ptr, (1,), "i32")
        start_pos = DeviceBuffer(self.step.ptr + 4, (1,), "i32")
        h = self._flat(b["h"])
        k.embedding(self.w["embedding"], self.scales.get("embedding"), token, b["h"], None, 1)
        for layer in range(cfg.num_hidden_layers):
            name = f"layers.{layer}."
            kc, vc = self._cache(layer)
            k.gemv(self.w[name + "qkv"], self.scales.get(name + "qkv"), h, self._flat(b["qkv"]))
            k.qk_norm_rope_append(b["qkv"], self.w[name + "q_norm"], self.w[name + "k_norm"], self.inv_freq, b["q"],
                                  kc, vc, start_pos, 1, eps)
            k.flash_decode(b["q"], kc, vc, b["po"], b["pml"], b["attn"], b["counters"], start_pos)
            k.gemv(self.w[name + "o_proj"], self.scales.get(name + "o_proj"), b["attn"], self._flat(b["a"]))
            k.residual_norm(b["h"], b["a"], self.w[name + "post_attention_norm"], None, 1, eps)
            k.gemv(self.w[name + "gate_up"], self.scales.get(name + "gate_up"), h, b["act"], silu=True)
            k.gemv(self.w[name + "down_proj"], self.scales.get(name + "down_proj"), b["act"], self._flat(b["a"]))
            k.residual_norm(b["h"], b["a"], self.w[name + "post_feedforward_norm"], None, 1, eps)
        k.rmsnorm(b["h"], self.w["final_norm"], b["xf"], 1, eps)
        k.gemv(self.w[self._head], self.scales.get(self._head), self._flat(b["xf"]), self.logits_slots[slot])

    def _capture_decode(self) -> None:
        """Record the decode step once per logits slot; where the driver refuses, plain launches (and say so)."""
        graphs = []
        try:
            for slot in (0, 1):
                graphs.append(CudaGraph(self.stream))
                graphs[-1].capture(lambda: self._decode_kernels(slot))
        except (DeviceError, OSError, AttributeError) as exc:
            for graph in graphs:
                graph.close()
            self._use_graph = False
            self.notes.append(f"decode runs without a CUDA graph ({exc})")
            return
        self._graphs = graphs
