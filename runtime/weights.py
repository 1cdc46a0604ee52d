"""Model weights by role, built once from the engine's tensors: what each backend's forward pass reads.

The names of the engine's tensors come from spec.py alone; here they become fields, so the forward passes
say `layer.qkv`, never "layers.3.qkv". A backend builds the structure with its own loader (NumPy: arrays,
CUDA: device buffers):

    >>> w = model_weights(engine.weights.specs.values(), lambda spec: engine.weights.tensor(spec.name))
    >>> w.layers[0].qkv.shape
    (384, 128)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

from olmoscope.spec import EngineTensorSpec

T = TypeVar("T")


@dataclass
class LayerWeights(Generic[T]):
    """One transformer block (OLMO2.md, "Forward pass"); every Linear is [out, in]."""

    qkv: T  # [Hd + 2·Hkvd, D]: rows [q; k; v]
    q_norm: T  # [Hd]: RMSNorm over the whole query, before RoPE
    k_norm: T  # [Hkvd]
    o_proj: T  # [D, Hd]
    post_attention_norm: T  # [D]: RMSNorm of the attention output, inside the residual
    gate_up: T  # [2I, D]: rows [gate; up]
    down_proj: T  # [D, I]
    post_feedforward_norm: T  # [D]


@dataclass
class ModelWeights(Generic[T]):
    """The whole model; with tied embeddings `lm_head` is the embedding itself."""

    embedding: T  # [V, D], gathered by token id
    layers: list[LayerWeights[T]]
    final_norm: T  # [D]
    lm_head: T  # [V, D]


LAYER_ROLES = tuple(f.name for f in fields(LayerWeights))
MODEL_ROLES = ("embedding", "final_norm", "lm_head")


def model_weights(specs: Iterable[EngineTensorSpec], load: Callable[[EngineTensorSpec], T]) -> ModelWeights[T]:
    """Every tensor of `specs` through `load`, in the engine's order, placed by role and layer."""
    model: dict[str, T] = {}
    layers: dict[int, dict[str, T]] = {}
    for spec in specs:
        value = load(spec)
        if spec.layer is None:
            model[spec.role] = value
        else:
            layers.setdefault(spec.layer, {})[spec.role] = value
    model.setdefault("lm_head", model["embedding"])  # tied: the head reads the embedding
    return ModelWeights(
        embedding=model["embedding"],
        layers=[LayerWeights(**layers[layer]) for layer in sorted(layers)],
        final_norm=model["final_norm"],
        lm_head=model["lm_head"],
    )
