"""The NumPy reference backend: reference.py's float32 forward pass behind the Backend interface."""

from __future__ import annotations

import numpy as np

from olmoscope.runtime import reference
from olmoscope.runtime.backend import Backend, check_max_context
from olmoscope.runtime.engine import Engine
from olmoscope.runtime.kv_cache import KVCache
from olmoscope.runtime.sampler import SamplingParams, sample


class NumpyBackend(Backend):
    """float32 on the CPU: weights upcast once at load (float32 engine files are used in place).

    >>> NumpyBackend(engine).prefill(np.array([9906, 1917]), return_logits=True).shape
    (2, 100352)
    """

    name = "numpy"

    def __init__(self, engine: Engine, max_context: int | None = None):
        self.config = engine.config
        self.device = "cpu"
        self.notes = []
        self.vocab_limit = engine.vocab_limit
        self.max_context = check_max_context(max_context, engine.config)
        # engine name → float32 array; the reference reads these by name
        self.weights = {name: engine.weights.float32(name) for name in engine.weights.names}
        cfg = engine.config
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.max_context)
        self._last_logits: np.ndarray | None = None  # float32 [V] of the last position run

    @property
    def position(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()
        self._last_logits = None

    def prefill(self, token_ids: np.ndarray, return_logits: bool = False) -> np.ndarray | None:
        ids = self._check_ids(token_ids)
        logits = reference.forward(self.config, self.weights, ids, self.cache, all_logits=return_logits)
        self._last_logits = logits[-1].copy()  # the caller owns the returned array and may change it
        return logits if return_logits else None

    def decode_step(self, token_id: int, return_logits: bool = False) -> np.ndarray | None:
        ids = self._check_ids(np.array([token_id]))
        logits = reference.forward(self.config, self.weights, ids, self.cache, all_logits=False)
        self._last_logits = logits[0]
        return logits[0].copy() if return_logits else None

    def sample(self, params: SamplingParams, rng: np.random.Generator, history: np.ndarray) -> int:
        if self._last_logits is None:
            raise ValueError("sample() before any prefill or decode_step")
        return sample(self._last_logits, params, rng, history, self.vocab_limit)

    def close(self) -> None:
        # drop the float32 weights (views of the engine's memory map for fp32 files) so the file can close
        self.weights = {}
        self._last_logits = None

    def _check_ids(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        self.check_room(len(ids))
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        return ids.astype(np.int64)
