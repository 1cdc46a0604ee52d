"""The OLMo 2 forward pass in NumPy float32, equation by equation (docs: OLMO2.md, "Forward pass").

Shapes: T new tokens, S positions in the cache (S ≥ T), D hidden, H query heads, Hkv kv heads,
d head_dim, I intermediate, V vocabulary rows. Every Linear is y = x·Wᵀ with W stored [out, in].
`w` maps engine tensor names (spec.engine_tensors) to float32 arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from olmoscope.config import ModelConfig
from olmoscope.runtime.kv_cache import KVCache


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x·rsqrt(mean(x²) + ε)·weight over the last axis, in float32.  [T, n] → [T, n]"""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)  # [T, 1]
    return (x / np.sqrt(mean_square + np.float32(eps))) * weight


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of pos·θ^(−2i/d), each half repeated over both halves.  [T] → ([T, d], [T, d])"""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [d/2]
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponents)  # [d/2]
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, d]
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """concat(−x2, x1) over the last axis (NeoX style, not interleaved)."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x·cos + rotate_half(x)·sin.  x [T, heads, d], cos/sin [T, d] → [T, heads, d]"""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32; -inf entries get probability 0."""
    shifted = scores - np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / np.sum(weights, axis=-1, keepdims=True)


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """softmax(q·kᵀ/√d + causal mask)·v with GQA: query head j reads kv head ⌊j / (H/Hkv)⌋.

    q [T, H, d] holds the last T of the S positions in keys/values [Hkv, S, d]; returns [T, H·d].
    """
    T, H, d = q.shape
    Hkv, S, _ = keys.shape
    group = H // Hkv
    q = q.reshape(T, Hkv, group, d).transpose(1, 2, 0, 3)  # [Hkv, group, T, d]: heads j = kv·group + g
    scores = (q @ keys[:, None].swapaxes(-1, -2)) * np.float32(d**-0.5)  # [Hkv, group, T, S]
    query_positions = np.arange(S - T, S)[:, None]  # [T, 1]
    future = np.arange(S)[None, :] > query_positions  # [T, S]: keys a query must not see
    scores = np.where(future, np.float32(-np.inf), scores)
    out = softmax(scores) @ values[:, None]  # [Hkv, group, T, d]
    return out.transpose(2, 0, 1, 3).reshape(T, H * d)  # [T, H·d]


def attention(h: np.ndarray, w: Mapping[str, np.ndarray], l: int, cfg: ModelConfig, cache: KVCache,
              cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """One layer's attention sublayer, before its post-norm.  h [T, D] → [T, D]"""
    T = h.shape[0]
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = h @ w[f"layers.{l}.qkv"].T  # [T, H·d + 2·Hkv·d]
    q, k, v = np.split(qkv, [H * d, H * d + Hkv * d], axis=-1)
    q = rms_norm(q, w[f"layers.{l}.q_norm"], cfg.rms_norm_eps)  # over all H·d, before heads and RoPE
    k = rms_norm(k, w[f"layers.{l}.k_norm"], cfg.rms_norm_eps)  # over all Hkv·d
    q = apply_rope(q.reshape(T, H, d), cos, sin)  # [T, H, d]
    k = apply_rope(k.reshape(T, Hkv, d), cos, sin)  # [T, Hkv, d]
    keys, values = cache.store(l, k, v.reshape(T, Hkv, d))  # [Hkv, S, d] each
    return causal_attention(q, keys, values) @ w[f"layers.{l}.o_proj"].T  # [T, D]


def silu(x: np.ndarray) -> np.ndarray:
    """x·sigmoid(x)."""
    with np.errstate(over="ignore"):  # exp(−x) → inf for x ≪ 0 gives the right limit, −0
        return x / (np.float32(1) + np.exp(-x))


def mlp(h: np.ndarray, w: Mapping[str, np.ndarray], l: int) -> np.ndarray:
    """SwiGLU: (SiLU(h·Wgateᵀ) ⊙ h·Wupᵀ)·Wdownᵀ.  h [T, D] → [T, D]"""
    gate, up = np.split(h @ w[f"layers.{l}.gate_up"].T, 2, axis=-1)  # [T, I] each
    return (silu(gate) * up) @ w[f"layers.{l}.down_proj"].T


def forward(cfg: ModelConfig, w: Mapping[str, np.ndarray], token_ids: np.ndarray, cache: KVCache,
            all_logits: bool = True) -> np.ndarray:
    """Run T tokens at positions cache.length … +T−1; logits [T, V] (or [1, V] for the last token only)."""
    T = len(token_ids)
    h = w["embedding"][token_ids]  # [T, D]
    cos, sin = rope_tables(np.arange(cache.length, cache.length + T), cfg.head_dim, cfg.rope_theta)
    eps = cfg.rms_norm_eps
    for l in range(cfg.num_hidden_layers):
        h = h + rms_norm(attention(h, w, l, cfg, cache, cos, sin), w[f"layers.{l}.post_attention_norm"], eps)
        h = h + rms_norm(mlp(h, w, l), w[f"layers.{l}.post_feedforward_norm"], eps)
    cache.advance(T)
    if not all_logits:
        h = h[-1:]  # only the last token's logits are needed to pick the next one
    head = w["lm_head"] if "lm_head" in w else w["embedding"]  # tied: the head reads the embedding
    return rms_norm(h, w["final_norm"], eps) @ head.T  # [T, V]
