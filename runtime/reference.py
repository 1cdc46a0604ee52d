"""The OLMo 2 forward pass in NumPy float32, equation by equation (docs/OLMO2.md, "Forward pass"), over a step:
a ragged batch of sequences whose keys and values live in a paged cache (docs/RUNTIME.md).

Shapes: T token rows in the step, B sequences, D hidden, H query heads, Hkv kv heads, d head_dim, I intermediate,
V vocabulary rows, R logits rows. Every Linear is y = x·Wᵀ with W stored [out, in].

Batch invariance: a token's numbers never depend on what else is in its step, so that a sequence run in any
schedule (alone, chunked, beside others) gives bit-identical logits. Projections run on blocks of exactly
ROW_BLOCK rows (BLAS picks its kernel by shape, so every call of one matrix must have one shape), and each query
row attends over exactly its visible keys.
"""

from __future__ import annotations

import numpy as np

from olmoscope.config import ModelConfig
from olmoscope.runtime.blocks import BLOCK_SIZE
from olmoscope.runtime.step import SCORE_ROWS, StepArrays
from olmoscope.runtime.weights import LayerWeights, ModelWeights

ROW_BLOCK = 16  # rows per BLAS call of a projection; the last block is zero-padded


class PagedKV:
    """Keys (after QK-norm and RoPE) and values of every layer, in blocks: [L, num_blocks, Hkv, BLOCK_SIZE, d] f32.

    Allocated with np.zeros, so blocks never written cost no resident memory.

    >>> kv = PagedKV(layers=2, num_blocks=64, kv_heads=1, head_dim=64); kv.keys.shape
    (2, 64, 1, 16, 64)
    """

    def __init__(self, layers: int, num_blocks: int, kv_heads: int, head_dim: int):
        shape = (layers, num_blocks, kv_heads, BLOCK_SIZE, head_dim)
        self.keys = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)

    def store(self, layer: int, slots: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Write T tokens' keys/values [T, Hkv, d] at cache slots [T] (block·BLOCK_SIZE + offset)."""
        blocks, offsets = np.divmod(slots, BLOCK_SIZE)
        self.keys[layer, blocks, :, offsets] = keys
        self.values[layer, blocks, :, offsets] = values

    def gather(self, layer: int, blocks: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence's keys and values for positions 0 … length−1, each [Hkv, length, d]."""
        used = blocks[: -(-length // BLOCK_SIZE)]
        Hkv, d = self.keys.shape[2], self.keys.shape[4]
        keys = self.keys[layer, used].transpose(1, 0, 2, 3).reshape(Hkv, -1, d)[:, :length]
        values = self.values[layer, used].transpose(1, 0, 2, 3).reshape(Hkv, -1, d)[:, :length]
        return np.ascontiguousarray(keys), np.ascontiguousarray(values)

    def copy_block(self, source: int, destination: int) -> None:
        self.keys[:, destination] = self.keys[:, source]
        self.values[:, destination] = self.values[:, source]


def linear(x: np.ndarray, w) -> np.ndarray:
    """x·Wᵀ in float32, ROW_BLOCK rows per BLAS call.  x [T, in], W [out, in] → [T, out]"""
    w = np.asarray(w, np.float32)
    T = x.shape[0]
    padded = np.zeros((-(-T // ROW_BLOCK) * ROW_BLOCK, x.shape[1]), np.float32)
    padded[:T] = x
    out = np.empty((padded.shape[0], w.shape[0]), np.float32)
    for start in range(0, padded.shape[0], ROW_BLOCK):
        out[start:start + ROW_BLOCK] = padded[start:start + ROW_BLOCK] @ w.T
    return out[:T]


def rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
    """x·rsqrt(mean(x²) + ε)·weight over the last axis, in float32.  [T, n] → [T, n]"""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)  # [T, 1]
    return (x / np.sqrt(mean_square + np.float32(eps))) * np.asarray(weight, np.float32)


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


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """softmax(q·kᵀ/√d)·v of one query over the keys it sees, GQA: head j reads kv head ⌊j / (H/Hkv)⌋.

    q [H, d]; keys, values [Hkv, S, d] → [H·d]
    """
    H, d = q.shape
    Hkv = keys.shape[0]
    grouped = q.reshape(Hkv, H // Hkv, d)  # heads j = kv·group + g
    scores = (grouped @ keys.transpose(0, 2, 1)) * np.float32(d**-0.5)  # [Hkv, group, S]
    return (softmax(scores) @ values).reshape(H * d)


def visible_keys(position: int, window: int) -> slice:
    """The positions a query at `position` attends: all before it (causal), or the last `window` of them."""
    return slice(max(0, position - window + 1) if window else 0, position + 1)


def paged_attention(q: np.ndarray, kv: PagedKV, layer: int, step: StepArrays, window: int = 0) -> np.ndarray:
    """Each query row over its sequence's cached keys, causally.  q [T, H, d] → [T, H·d]"""
    T, H, d = q.shape
    out = np.empty((T, H * d), np.float32)
    for s in range(step.num_seqs):
        keys, values = kv.gather(layer, step.block_tables[s], int(step.context[s]))
        for row in range(step.first_row[s], step.first_row[s] + step.rows[s]):
            seen = visible_keys(int(step.positions[row]), window)
            out[row] = attend(q[row], keys[:, seen], values[:, seen])
    return out


def attention(h: np.ndarray, w: LayerWeights, l: int, cfg: ModelConfig, kv: PagedKV, step: StepArrays,
              cos: np.ndarray, sin: np.ndarray, window: int) -> np.ndarray:
    """One layer's attention sublayer, before its post-norm.  h [T, D] → [T, D]"""
    T = h.shape[0]
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(h, w.qkv)  # [T, H·d + 2·Hkv·d]
    q, k, v = np.split(qkv, [H * d, H * d + Hkv * d], axis=-1)
    q = rms_norm(q, w.q_norm, cfg.rms_norm_eps)  # over all H·d, before heads and RoPE
    k = rms_norm(k, w.k_norm, cfg.rms_norm_eps)  # over all Hkv·d
    q = apply_rope(q.reshape(T, H, d), cos, sin)  # [T, H, d]
    k = apply_rope(k.reshape(T, Hkv, d), cos, sin)  # [T, Hkv, d]
    kv.store(l, step.slots, k, v.reshape(T, Hkv, d))
    return linear(paged_attention(q, kv, l, step, window), w.o_proj)  # [T, D]


def silu(x: np.ndarray) -> np.ndarray:
    """x·sigmoid(x)."""
    with np.errstate(over="ignore"):  # exp(−x) → inf for x ≪ 0 gives the right limit, −0
        return x / (np.float32(1) + np.exp(-x))


def mlp(h: np.ndarray, w: LayerWeights) -> np.ndarray:
    """SwiGLU: (SiLU(h·Wgateᵀ) ⊙ h·Wupᵀ)·Wdownᵀ.  h [T, D] → [T, D]"""
    gate, up = np.split(linear(h, w.gate_up), 2, axis=-1)  # [T, I] each
    return linear(silu(gate) * up, w.down_proj)


def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[target] of each row, over all V columns (as transformers' loss); the sum in float64.

    logits [P, V] f32, targets [P] → [P] f32
    """
    top = np.max(logits, axis=-1, keepdims=True)  # [P, 1]
    mass = np.sum(np.exp(logits - top), axis=-1, dtype=np.float64)  # [P]
    chosen = np.take_along_axis(logits, targets[:, None].astype(np.int64), axis=-1)[:, 0]  # [P]
    return (chosen.astype(np.float64) - top[:, 0] - np.log(mass)).astype(np.float32)


def scores(x: np.ndarray, lm_head, targets: np.ndarray) -> np.ndarray:
    """Each final-normed row's target logprob, lm_head over SCORE_ROWS rows at a time.  x [P, D] → [P]"""
    out = np.empty(len(targets), np.float32)
    for start in range(0, len(targets), SCORE_ROWS):
        end = start + SCORE_ROWS
        out[start:end] = target_logprobs(linear(x[start:end], lm_head), targets[start:end])
    return out


def forward(cfg: ModelConfig, w: ModelWeights, step: StepArrays, token_ids: np.ndarray, kv: PagedKV,
            window: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Run a step's T tokens (ids resolved: none FED) at their positions: (logits [R, V] of step.logit_rows, the
    target logprobs [P] of step.score_rows).

    Extreme weights may overflow to ±inf or NaN: the sampler's rules handle those, so numpy stays quiet."""
    with np.errstate(all="ignore"):
        return _forward(cfg, w, step, token_ids, kv, window)


def _forward(cfg: ModelConfig, w: ModelWeights, step: StepArrays, token_ids: np.ndarray, kv: PagedKV,
             window: int) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(w.embedding[token_ids], np.float32)  # [T, D]
    cos, sin = rope_tables(step.positions, cfg.head_dim, cfg.rope_theta)
    eps = cfg.rms_norm_eps
    for l, layer in enumerate(w.layers):
        h = h + rms_norm(attention(h, layer, l, cfg, kv, step, cos, sin, window), layer.post_attention_norm, eps)
        h = h + rms_norm(mlp(h, layer), layer.post_feedforward_norm, eps)
    logits = linear(rms_norm(h[step.logit_rows], w.final_norm, eps), w.lm_head)  # [R, V]
    scored = scores(rms_norm(h[step.score_rows], w.final_norm, eps), w.lm_head, step.score_targets)  # [P]
    return logits, scored
