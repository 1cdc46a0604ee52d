"""Tensor parallelism's arithmetic: which rows and columns of each matrix a rank holds, and the forward pass of N
ranks emulated in NumPy, so that the sharded math is proven equal to the unsharded reference on the CPU
(issue 13; the NCCL ranks on GPUs follow exactly this plan).

The Megatron split, per layer (docs/OLMO2.md for the shapes):
- qkv and gate_up are column-parallel: a rank holds its heads' rows of each part of the fused matrix (its q heads,
  its kv heads' k and v rows; its slice of gate and the same slice of up), so no part straddles ranks;
- o_proj and down_proj are row-parallel: a rank holds the input columns that match its heads / its slice, and
  their partial products are summed by one all-reduce each;
- OLMo 2's QK-norm normalises q (and k) over all heads, so before it each rank all-reduces two floats per token,
  its partial sums of q² and k²; every rank then scales its own heads with its slice of the norm weights;
- the norms inside the residual, the embedding and the final norm are replicated; the lm_head is split by
  vocabulary rows and its logits gathered (a rank's slice is V / N rows).

    >>> plan = ShardPlan(config, ranks=2); plan.heads(1), plan.intermediate(1)
    (range(8, 16), range(4096, 8192))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from olmoscope.config import ModelConfig
from olmoscope.errors import UsageError
from olmoscope.runtime import reference
from olmoscope.runtime.reference import PagedKV, apply_rope, linear, paged_attention, rope_tables, silu
from olmoscope.runtime.step import StepArrays
from olmoscope.runtime.weights import LayerWeights, ModelWeights


@dataclass(frozen=True)
class ShardPlan:
    """The split of one model over `ranks` GPUs; refuses a model whose heads or widths the count does not divide."""

    config: ModelConfig
    ranks: int

    def __post_init__(self) -> None:
        cfg, n = self.config, self.ranks
        if n < 1:
            raise UsageError(f"--tensor-parallel {n}: at least 1")
        for what, count in (("query heads", cfg.num_attention_heads), ("key/value heads", cfg.num_key_value_heads),
                            ("intermediate size", cfg.intermediate_size), ("vocabulary rows", cfg.vocab_size)):
            if count % n:
                raise UsageError(f"--tensor-parallel {n} does not divide the model's {count} {what}")

    def _share(self, count: int, rank: int) -> range:
        """Rank `rank`'s contiguous share of `count` things (the constructor checked that the ranks divide it)."""
        per = count // self.ranks
        return range(rank * per, (rank + 1) * per)

    def heads(self, rank: int) -> range:
        return self._share(self.config.num_attention_heads, rank)

    def kv_heads(self, rank: int) -> range:
        return self._share(self.config.num_key_value_heads, rank)

    def intermediate(self, rank: int) -> range:
        return self._share(self.config.intermediate_size, rank)

    def vocabulary(self, rank: int) -> range:
        return self._share(self.config.vocab_size, rank)

    # ── what a rank holds ────────────────────────────────────────────────────────────────────────────
    def qkv_rows(self, rank: int) -> np.ndarray:
        """Rows of the fused qkv [Hd + 2·Hkvd, D] that rank holds: its q heads, then its kv heads' k, then v."""
        cfg, d = self.config, self.config.head_dim
        q = _head_rows(self.heads(rank), d)
        k = cfg.q_width + _head_rows(self.kv_heads(rank), d)
        return np.concatenate([q, k, cfg.kv_width + k])

    def gate_up_rows(self, rank: int) -> np.ndarray:
        """Rows of the fused gate_up [2I, D]: its slice of gate, then the same slice of up."""
        part = np.asarray(self.intermediate(rank))
        return np.concatenate([part, self.config.intermediate_size + part])

    def layer(self, w: LayerWeights, rank: int) -> LayerWeights:
        """Rank's share of one layer (NumPy arrays in, views or copies out)."""
        q_cols, kv_cols = _head_rows(self.heads(rank), self.config.head_dim), _head_rows(self.kv_heads(rank),
                                                                                         self.config.head_dim)
        inner = np.asarray(self.intermediate(rank))
        return replace(w, qkv=np.asarray(w.qkv)[self.qkv_rows(rank)], q_norm=np.asarray(w.q_norm)[q_cols],
                       k_norm=np.asarray(w.k_norm)[kv_cols], o_proj=np.asarray(w.o_proj)[:, q_cols],
                       gate_up=np.asarray(w.gate_up)[self.gate_up_rows(rank)],
                       down_proj=np.asarray(w.down_proj)[:, inner])

    def model(self, w: ModelWeights, rank: int) -> ModelWeights:
        vocab = self.vocabulary(rank)
        return ModelWeights(embedding=w.embedding, layers=[self.layer(layer, rank) for layer in w.layers],
                            final_norm=w.final_norm, lm_head=np.asarray(w.lm_head)[vocab.start:vocab.stop])


def _head_rows(heads: range, head_dim: int) -> np.ndarray:
    return np.arange(heads.start * head_dim, heads.stop * head_dim)


# ── N ranks emulated: the collectives are sums (and a gather) in rank order ──────────────────────────────
def all_reduce(parts: list[np.ndarray]) -> np.ndarray:
    """What NCCL's all-reduce (sum) gives every rank; here in rank order, in float32."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def sharded_forward(plan: ShardPlan, shards: list[ModelWeights], step: StepArrays, token_ids: np.ndarray,
                    caches: list[PagedKV], window: int = 0) -> np.ndarray:
    """reference.forward over plan.ranks ranks, each with its own weights (plan.model) and KV cache (its kv heads);
    logits [R, V] gathered from the ranks' vocabulary slices (the logits only: prompt scoring stays unsharded)."""
    with np.errstate(all="ignore"):
        cfg, eps = plan.config, plan.config.rms_norm_eps
        h = np.asarray(shards[0].embedding[token_ids], np.float32)  # replicated on every rank
        cos, sin = rope_tables(step.positions, cfg.head_dim, cfg.rope_theta)
        for l in range(cfg.num_hidden_layers):
            layers = [shard.layers[l] for shard in shards]
            attn = all_reduce([_attention_part(plan, h, w, l, kv, step, cos, sin, window, layers)
                               for w, kv in zip(layers, caches)])
            h = h + reference.rms_norm(attn, layers[0].post_attention_norm, eps)
            mlp = all_reduce([linear(_swiglu(h, w), w.down_proj) for w in layers])
            h = h + reference.rms_norm(mlp, layers[0].post_feedforward_norm, eps)
        final = reference.rms_norm(h[step.logit_rows], shards[0].final_norm, eps)
        return np.concatenate([linear(final, shard.lm_head) for shard in shards], axis=-1)  # all-gather


def _swiglu(h: np.ndarray, w: LayerWeights) -> np.ndarray:
    gate, up = np.split(linear(h, w.gate_up), 2, axis=-1)
    return silu(gate) * up


def _attention_part(plan: ShardPlan, h: np.ndarray, w: LayerWeights, l: int, kv: PagedKV, step: StepArrays,
                    cos: np.ndarray, sin: np.ndarray, window: int, every_rank: list[LayerWeights]) -> np.ndarray:
    """One rank's attention: its heads' q, k, v; the QK-norm over all heads from the all-reduced sums of squares;
    its partial o_proj product [T, D] (summed over ranks by the caller)."""
    cfg = plan.config
    T, d = h.shape[0], cfg.head_dim
    Hr, Hkvr = len(plan.heads(0)), len(plan.kv_heads(0))
    q, k, v = np.split(linear(h, w.qkv), [Hr * d, Hr * d + Hkvr * d], axis=-1)
    squares = all_reduce([_square_sums(h, other, Hr * d, Hkvr * d) for other in every_rank])  # [T, 2]: Σq², Σk²
    q = _normalize(q, squares[:, 0] / np.float32(cfg.q_width), w.q_norm, cfg.rms_norm_eps)
    k = _normalize(k, squares[:, 1] / np.float32(cfg.kv_width), w.k_norm, cfg.rms_norm_eps)
    q = apply_rope(q.reshape(T, Hr, d), cos, sin)
    k = apply_rope(k.reshape(T, Hkvr, d), cos, sin)
    kv.store(l, step.slots, k, v.reshape(T, Hkvr, d))
    return linear(paged_attention(q, kv, l, step, window), w.o_proj)


def _square_sums(h: np.ndarray, w: LayerWeights, q_width: int, kv_width: int) -> np.ndarray:
    """A rank's two floats per token: Σ q² and Σ k² over its own heads.  [T, D] → [T, 2]
    (The emulation recomputes each rank's q and k to get them; on a GPU each rank has its own at hand.)"""
    q, k, _ = np.split(linear(h, w.qkv), [q_width, q_width + kv_width], axis=-1)
    return np.stack([np.sum(np.square(q), axis=-1, dtype=np.float32),
                     np.sum(np.square(k), axis=-1, dtype=np.float32)], axis=-1)


def _normalize(x: np.ndarray, mean_square: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x·rsqrt(mean(x²) + ε)·weight with the mean over all ranks' heads given."""
    return (x / np.sqrt(mean_square[:, None] + np.float32(eps))) * np.asarray(weight, np.float32)
