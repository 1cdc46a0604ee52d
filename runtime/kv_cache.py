"""The NumPy backend's KV cache: every layer's keys (after QK-norm and RoPE) and values, float32."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values for `capacity` positions of every layer; `length` positions are filled.

    Allocated once with np.zeros, so untouched positions cost no resident memory.

    >>> cache = KVCache(layers=2, kv_heads=1, head_dim=64, capacity=128); cache.length
    0
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.capacity = capacity  # positions it can hold
        self.length = 0  # positions filled: the next token's position
        self.keys = np.zeros((layers, kv_heads, capacity, head_dim), np.float32)  # [L, Hkv, S, d]
        self.values = np.zeros((layers, kv_heads, capacity, head_dim), np.float32)  # [L, Hkv, S, d]

    def store(self, layer: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write T new positions after `length` (keys, values: [T, Hkv, d]); return all so far, [Hkv, length+T, d]."""
        start, end = self.length, self.length + keys.shape[0]
        self.keys[layer, :, start:end] = keys.transpose(1, 0, 2)
        self.values[layer, :, start:end] = values.transpose(1, 0, 2)
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, count: int) -> None:
        """Commit `count` positions once every layer has stored them."""
        self.length += count

    def reset(self) -> None:
        self.length = 0
