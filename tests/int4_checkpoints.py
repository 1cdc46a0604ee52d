"""Tiny GPTQ and AWQ checkpoints built from known integers, packed here from the formats' definitions —
independently of olmoscope/prequantized.py, whose unpacking the tests check against these.

    GPTQ  qweight int32 [K/8, N]: word [r, n] holds inputs 8r … 8r+7 of output n, input 8r+j in bits 4j…4j+3
          qzeros  int32 [K/G, N/8]: word [g, c] holds outputs 8c … 8c+7, output 8c+j in bits 4j…4j+3;
                  checkpoint_format "gptq" stores zero − 1, "gptq_v2" the zero
    AWQ   qweight int32 [K, N/8]: word [k, c], bits 4i…4i+3 hold output 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]
          qzeros  int32 [K/G, N/8]: the same order, the zero itself
    both  scales fp16 [K/G, N]; w[n, k] = (q[n, k] − z[n, k // G]) · s[n, k // G]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import Olmo2Config, Olmo2ForCausalLM

AWQ_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)  # bits 4i… of an AWQ word hold column 8c + this[i]
LINEAR_ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
# D=128, H=4, Hkv=2 (d=32), I=256, L=2, V=1000: every input width a multiple of 128, every output of 8.
HF_DIMS = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


def gptq_pack_inputs(q_kn: np.ndarray) -> np.ndarray:
    """[K, N] integers 0..15 → int32 [K/8, N], eight consecutive inputs per word, the first in the low bits."""
    words = np.zeros((q_kn.shape[0] // 8, q_kn.shape[1]), np.uint32)
    for j in range(8):
        words |= q_kn[j::8].astype(np.uint32) << np.uint32(4 * j)
    return words.view(np.int32)


def pack_outputs(values_rn: np.ndarray, columns: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """[R, N] integers 0..15 → int32 [R, N/8]: word [r, c] bits 4i… hold values[r, 8c + columns[i]]."""
    words = np.zeros((values_rn.shape[0], values_rn.shape[1] // 8), np.uint32)
    for i, column in enumerate(columns):
        words |= values_rn[:, column::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


@dataclass
class KnownMatrix:
    """One quantized Linear, as chosen by the test: integers, zero points and scales in the engine's [N, K]."""

    q: np.ndarray  # uint8 [N, K], 0..15
    zeros: np.ndarray  # uint8 [N, K/G], 0..15 (8 everywhere when symmetric)
    scales: np.ndarray  # float16 [N, K/G]
    group: int

    @property
    def dequantized(self) -> np.ndarray:
        """float32 [N, K] = (q − z)·s, computed in float64 (exact) and rounded once (also exact here)."""
        z = np.repeat(self.zeros.astype(np.float64), self.group, axis=1)
        s = np.repeat(self.scales.astype(np.float64), self.group, axis=1)
        return ((self.q.astype(np.float64) - z) * s).astype(np.float32)


def known_matrix(rng: np.random.Generator, n: int, k: int, group: int, symmetric: bool,
                 lowest_zero: int = 0) -> KnownMatrix:
    """Random integers, zeros from lowest_zero to 15 (GPTQ v1 cannot store a zero of 0), fp16 scales."""
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    q[0, :16] = [0, 15] * 8  # both extremes at every nibble position of a word
    zeros = (np.full((n, k // group), 8, np.uint8) if symmetric
             else rng.integers(lowest_zero, 16, (n, k // group)).astype(np.uint8))
    zeros.flat[0] = 8 if symmetric else 15
    scales = (rng.uniform(0.002, 0.03, (n, k // group))).astype(np.float16)
    return KnownMatrix(q, zeros, scales, group)


def pack(method: str, m: KnownMatrix, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """The checkpoint tensors of one Linear (suffixes qweight, qzeros, scales[, g_idx])."""
    q_kn, zeros_gn = m.q.T, m.zeros.T.astype(np.int64)  # the checkpoints' [in, out] orientation
    if method == "gptq":
        stored_zeros = zeros_gn - (1 if checkpoint_format == "gptq" else 0)
        return {"qweight": gptq_pack_inputs(q_kn), "qzeros": pack_outputs(stored_zeros),
                "scales": np.ascontiguousarray(m.scales.T),
                "g_idx": (np.arange(m.q.shape[1]) // m.group).astype(np.int32)}
    return {"qweight": pack_outputs(q_kn, AWQ_NIBBLE_COLUMNS), "qzeros": pack_outputs(zeros_gn, AWQ_NIBBLE_COLUMNS),
            "scales": np.ascontiguousarray(m.scales.T)}


@dataclass
class Prequantized:
    """A written checkpoint, the transformers model holding its dequantized weights, and the known matrices."""

    directory: Path
    model: Olmo2ForCausalLM
    matrices: dict[str, KnownMatrix] = field(default_factory=dict)  # "model.layers.0.self_attn.q_proj" → …


def write_prequantized(directory: Path, method: str, *, symmetric: bool = False, group: int = 128,
                       checkpoint_format: str = "gptq", seed: int = 0, quantization_config: dict | None = None,
                       drop: tuple[str, ...] = ()) -> Prequantized:
    """A random OLMo 2 model whose Linears are replaced by known int4 matrices, saved in `method`'s packing.

    The embedding and lm_head are rounded to bf16 (what an int4 engine stores them as), norms stay float32.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = Olmo2Config(**HF_DIMS, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0,
                         tie_word_embeddings=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    model = Olmo2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    out = Prequantized(directory, model)
    tensors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.removesuffix(".weight")
            if any(module.endswith(role) for role in LINEAR_ROLES):
                n, k = param.shape
                lowest = 1 if method == "gptq" and checkpoint_format == "gptq" else 0
                m = out.matrices[module] = known_matrix(rng, n, k, group, symmetric, lowest)
                param.copy_(torch.from_numpy(m.dequantized))
                tensors.update({f"{module}.{suffix}": array for suffix, array in pack(method, m, checkpoint_format).items()})
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
                tensors[name] = param.numpy().copy()
            else:  # embedding, lm_head: bf16 values, stored as fp16 would lose range, so as float32
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
                tensors[name] = param.numpy().astype(ml_dtypes.bfloat16)
    for name in drop:
        del tensors[name]
    qc = quantization_config or default_config(method, symmetric, group, checkpoint_format)
    raw = {**config.to_dict(), "architectures": ["Olmo2ForCausalLM"], "quantization_config": qc}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return out


def default_config(method: str, symmetric: bool, group: int, checkpoint_format: str) -> dict:
    """quantization_config as AutoGPTQ/GPTQModel and AutoAWQ write it into config.json."""
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": symmetric,
                "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": checkpoint_format}
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}
