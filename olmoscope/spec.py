"""The OLMo 2 tensor tables, as data: checkpoint names and the engine file's fused layout.

Every shape is a formula over the config's symbols (V, D, I, Hd = H·d, Hkvd = Hkv·d). The analyzers,
the converter and the runtime all read these tables; nothing else spells a tensor name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from olmoscope.config import ModelConfig

# ── checkpoint (Hugging Face) names ─────────────────────────────────────────────
# (scope, name template, shape formula, role, component). Scope "layer" repeats for l in 0..L-1.
CHECKPOINT_TABLE: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    ("model", "model.embed_tokens.weight", ("V", "D"), "embedding", "embedding"),
    ("layer", "model.layers.{l}.self_attn.q_proj.weight", ("Hd", "D"), "q_proj", "attention"),
    ("layer", "model.layers.{l}.self_attn.k_proj.weight", ("Hkvd", "D"), "k_proj", "attention"),
    ("layer", "model.layers.{l}.self_attn.v_proj.weight", ("Hkvd", "D"), "v_proj", "attention"),
    ("layer", "model.layers.{l}.self_attn.o_proj.weight", ("D", "Hd"), "o_proj", "attention"),
    ("layer", "model.layers.{l}.self_attn.q_norm.weight", ("Hd",), "q_norm", "qk_norm"),
    ("layer", "model.layers.{l}.self_attn.k_norm.weight", ("Hkvd",), "k_norm", "qk_norm"),
    ("layer", "model.layers.{l}.post_attention_layernorm.weight", ("D",), "post_attention_norm", "norm"),
    ("layer", "model.layers.{l}.mlp.gate_proj.weight", ("I", "D"), "gate_proj", "mlp"),
    ("layer", "model.layers.{l}.mlp.up_proj.weight", ("I", "D"), "up_proj", "mlp"),
    ("layer", "model.layers.{l}.mlp.down_proj.weight", ("D", "I"), "down_proj", "mlp"),
    ("layer", "model.layers.{l}.post_feedforward_layernorm.weight", ("D",), "post_feedforward_norm", "norm"),
    ("model", "model.norm.weight", ("D",), "final_norm", "norm"),
    ("model", "lm_head.weight", ("V", "D"), "lm_head", "lm_head"),
)

ROLE_DESCRIPTIONS = {
    "embedding": "token embedding, gathered by id",
    "q_proj": "query projection",
    "k_proj": "key projection (Hkv·d wide)",
    "v_proj": "value projection (Hkv·d wide)",
    "o_proj": "attention output projection",
    "q_norm": "RMSNorm over the whole query, before RoPE",
    "k_norm": "RMSNorm over the whole key, before RoPE",
    "post_attention_norm": "RMSNorm of the attention output, inside the residual",
    "gate_proj": "SwiGLU gate (SiLU applied)",
    "up_proj": "SwiGLU up projection",
    "down_proj": "SwiGLU down projection",
    "post_feedforward_norm": "RMSNorm of the MLP output, inside the residual",
    "final_norm": "RMSNorm before the head",
    "lm_head": "output projection to vocabulary logits",
    "qkv": "fused [q; k; v] projection rows",
    "gate_up": "fused [gate; up] projection rows",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the config implies."""

    name: str  # the name as stored
    shape: tuple[int, ...]  # in elements, row-major; Linear weights are [out, in]
    role: str  # what the tensor does (keys of ROLE_DESCRIPTIONS)
    layer: int | None  # block index, None for model-level tensors
    component: str  # parameter-count grouping: embedding, attention, qk_norm, norm, mlp, lm_head
    formula: tuple[str, ...]  # the shape as symbols, for reports

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def _shape(formula: tuple[str, ...], symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(symbols[s] for s in formula)


def checkpoint_tensors(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor a checkpoint of this config holds, in natural order (embedding, layers, norm, head).

    >>> [t.name for t in checkpoint_tensors(cfg)][:2]
    ['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight']
    """
    symbols = config.symbols()
    out: list[TensorSpec] = []
    model_rows = [r for r in CHECKPOINT_TABLE if r[0] == "model"]
    layer_rows = [r for r in CHECKPOINT_TABLE if r[0] == "layer"]
    head, tail = model_rows[:1], model_rows[1:]

    def add(row, layer=None):
        _, template, formula, role, component = row
        if role == "lm_head" and config.tie_word_embeddings:
            return  # tied: the head reads the embedding, no tensor of its own
        name = template.format(l=layer) if layer is not None else template
        out.append(TensorSpec(name, _shape(formula, symbols), role, layer, component, formula))

    for row in head:
        add(row)
    for layer in range(config.num_hidden_layers):
        for row in layer_rows:
            add(row, layer)
    for row in tail:
        add(row)
    return out


def parameter_count(config: ModelConfig) -> int:
    """Total parameters: 2·V·D + D + L·(2·D·Hd + 2·D·Hkvd + 3·D·I + Hd + Hkvd + 2·D), less V·D when tied."""
    return sum(t.elements for t in checkpoint_tensors(config))


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def natural_key(name: str) -> tuple:
    """Sort key putting checkpoint names in reading order: embedding, layers numerically, norm, head."""
    if name == "model.embed_tokens.weight":
        return (0, 0, 0, name)
    m = _LAYER_NAME.match(name)
    if m:
        within = [i for i, r in enumerate(CHECKPOINT_TABLE) if r[0] == "layer" and r[1].format(l=m[1]) == name]
        return (1, int(m[1]), within[0] if within else len(CHECKPOINT_TABLE), name)
    order = {"model.norm.weight": 0, "lm_head.weight": 1}
    return (2, order.get(name, 2), 0, name)


def layer_of(name: str) -> int | None:
    """The block index a checkpoint name belongs to, or None."""
    m = _LAYER_NAME.match(name)
    return int(m[1]) if m else None


# ── engine file layout ──────────────────────────────────────────────────────────
# (scope, engine name template, checkpoint roles fused by concatenating rows, role, kind).
# Order is the order the runtime consumes them and the order they are written.
# kind "matrix" tensors take the engine's weight dtype (and int8 quantization); "norm" stays float32.
ENGINE_TABLE: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    ("model", "embedding", ("embedding",), "embedding", "matrix"),
    ("layer", "layers.{l}.qkv", ("q_proj", "k_proj", "v_proj"), "qkv", "matrix"),
    ("layer", "layers.{l}.q_norm", ("q_norm",), "q_norm", "norm"),
    ("layer", "layers.{l}.k_norm", ("k_norm",), "k_norm", "norm"),
    ("layer", "layers.{l}.o_proj", ("o_proj",), "o_proj", "matrix"),
    ("layer", "layers.{l}.post_attention_norm", ("post_attention_norm",), "post_attention_norm", "norm"),
    ("layer", "layers.{l}.gate_up", ("gate_proj", "up_proj"), "gate_up", "matrix"),
    ("layer", "layers.{l}.down_proj", ("down_proj",), "down_proj", "matrix"),
    ("layer", "layers.{l}.post_feedforward_norm", ("post_feedforward_norm",), "post_feedforward_norm", "norm"),
    ("model", "final_norm", ("final_norm",), "final_norm", "norm"),
    ("model", "lm_head", ("lm_head",), "lm_head", "matrix"),
)


@dataclass(frozen=True)
class EngineTensorSpec:
    """One tensor of the engine file, and the checkpoint tensors whose rows it concatenates."""

    name: str  # engine name, e.g. "layers.3.qkv"
    shape: tuple[int, ...]  # rows of the parts stacked: [Hd + 2·Hkvd, D] for qkv
    role: str  # qkv, gate_up, or a checkpoint role
    layer: int | None
    kind: str  # "matrix" (weight dtype, quantizable) or "norm" (float32)
    sources: tuple[TensorSpec, ...]  # the checkpoint tensors, in row order

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def engine_tensors(config: ModelConfig) -> list[EngineTensorSpec]:
    """The engine file's tensors, in the order they are stored and consumed.

    >>> [t.name for t in engine_tensors(cfg)][:3]
    ['embedding', 'layers.0.qkv', 'layers.0.q_norm']
    """
    by_key = {(t.layer, t.role): t for t in checkpoint_tensors(config)}
    out: list[EngineTensorSpec] = []

    def add(row, layer=None):
        _, template, roles, role, kind = row
        if role == "lm_head" and config.tie_word_embeddings:
            return
        parts = tuple(by_key[(layer, r)] for r in roles)
        rows = sum(p.shape[0] for p in parts)
        shape = (rows, *parts[0].shape[1:])
        name = template.format(l=layer) if layer is not None else template
        out.append(EngineTensorSpec(name, shape, role, layer, kind, parts))

    for row in ENGINE_TABLE:
        if row[0] == "model" and row[3] == "embedding":
            add(row)
    for layer in range(config.num_hidden_layers):
        for row in ENGINE_TABLE:
            if row[0] == "layer":
                add(row, layer)
    for row in ENGINE_TABLE:
        if row[0] == "model" and row[3] != "embedding":
            add(row)
    return out
