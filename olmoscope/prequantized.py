"""Pre-quantized int4 checkpoints (GPTQ, AWQ GEMM): their config, their tensors, and their unpacking into the
engine's int4 layout — exactly, without quantizing anything again.

The checkpoints' conventions (verified against AutoGPTQ's qlinear pack/forward and AutoAWQ's WQLinear_GEMM):

    GPTQ  qweight int32 [K/8, N]    packed along K: input k of output n is nibble k%8 (low bits first) of
                                    qweight[k//8, n]
          qzeros  int32 [K/G, N/8]  packed along N the same way; the "gptq" (v1) checkpoint format stores
                                    zero − 1, "gptq_v2" the zero itself
          scales  fp16  [K/G, N]
          g_idx   int32 [K]         k // G when desc_act is false (anything else is refused)
    AWQ   qweight int32 [K, N/8]    packed along N in the interleaved order: nibble i of qweight[k, c]
                                    holds output 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]
          qzeros  int32 [K/G, N/8]  the same order; the zero itself
          scales  fp16  [K/G, N]
    both: w[k, n] = (q[k, n] − z[k//G, n]) · s[k//G, n]; the engine stores the transpose ([N, K], rows = outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from olmoscope.config import ModelConfig
from olmoscope.errors import CheckpointError, SourceError
from olmoscope.quantize import INT4_LEVELS, INT4_SYMMETRIC_ZERO
from olmoscope.spec import checkpoint_tensors
from olmoscope.weight_formats import INT4_GROUPS

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds output column 8c + AWQ_ORDER[i]
NIBBLES = 8  # 4-bit values per int32
QUANTIZED_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format → what to add to a stored zero


@dataclass(frozen=True)
class Prequantized:
    """What a checkpoint's quantization_config says, once checked."""

    method: str  # "gptq" or "awq"
    group_size: int  # inputs per scale
    symmetric: bool  # GPTQ sym=true: every zero is 8
    zero_offset: int  # added to each stored zero: 1 for GPTQ v1 (it stores zero − 1), else 0
    lm_head: bool  # the checkpoint stores lm_head quantized too (decided by its tensors)

    @property
    def scheme(self) -> str:
        return "sym" if self.symmetric else "asym"


def quantization_config(raw_config: dict[str, Any], label: str) -> dict[str, Any] | None:
    """config.json's quantization_config, None when the checkpoint is not pre-quantized."""
    qc = raw_config.get("quantization_config") if isinstance(raw_config, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise SourceError(f"{label}: config.json's quantization_config is not an object")
    return qc


def read_prequantized(qc: dict[str, Any], names: set[str], label: str) -> Prequantized:
    """The checked quantization_config; anything olmoscope cannot import exactly is one clear error."""
    where = f"{label}: quantization_config"
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        raise SourceError(f"{where}: quant_method {method!r} is not supported (olmoscope imports gptq and awq int4)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise SourceError(f"{where}: {bits!r} bits; olmoscope imports 4-bit checkpoints only")
    group = qc.get("group_size", qc.get("q_group_size"))
    if isinstance(group, bool) or group not in INT4_GROUPS:
        raise SourceError(f"{where}: group_size {group!r}; the engine's int4 layout takes "
                          f"{', '.join(map(str, INT4_GROUPS))}")
    lm_head = "lm_head.qweight" in names
    if method == "gptq":
        return _gptq(qc, where, group, lm_head)
    return _awq(qc, where, group, lm_head)


def _gptq(qc: dict[str, Any], where: str, group: int, lm_head: bool) -> Prequantized:
    if qc.get("desc_act", False) is not False:
        raise SourceError(f"{where}: desc_act {qc.get('desc_act')!r}: act-order (permuted groups) is not supported; "
                          f"use a desc_act: false checkpoint")
    sym = qc.get("sym", True)
    if not isinstance(sym, bool):
        raise SourceError(f"{where}: sym {sym!r} is not true or false")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in GPTQ_FORMATS:
        raise SourceError(f"{where}: checkpoint_format {fmt!r} is not supported (olmoscope reads "
                          f"{' and '.join(GPTQ_FORMATS)})")
    return Prequantized("gptq", group, sym, GPTQ_FORMATS[fmt], lm_head)


def _awq(qc: dict[str, Any], where: str, group: int, lm_head: bool) -> Prequantized:
    version = qc.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise SourceError(f"{where}: AWQ version {version!r} is not supported (olmoscope reads GEMM packing)")
    if qc.get("zero_point", True) is not True:
        raise SourceError(f"{where}: zero_point {qc.get('zero_point')!r}: AWQ without zero points is not supported")
    return Prequantized("awq", group, False, 0, lm_head)


def module_of(weight_name: str) -> str:
    """"model.layers.0.mlp.up_proj.weight" → "model.layers.0.mlp.up_proj"."""
    return weight_name.removesuffix(".weight")


def is_quantized(role: str, pq: Prequantized) -> bool:
    return role in QUANTIZED_ROLES and (role != "lm_head" or pq.lm_head)


def expected_tensors(config: ModelConfig, pq: Prequantized) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor the checkpoint must hold: name → (shape, dtypes it may be stored in)."""
    floats = ("F32", "BF16", "F16")
    out = {}
    G = pq.group_size
    for t in checkpoint_tensors(config):
        if not is_quantized(t.role, pq):
            out[t.name] = (t.shape, floats)
            continue
        N, K = t.shape
        prefix = module_of(t.name)
        packed = (K // NIBBLES, N) if pq.method == "gptq" else (K, N // NIBBLES)
        out[f"{prefix}.qweight"] = (packed, ("I32",))
        out[f"{prefix}.qzeros"] = ((K // G, N // NIBBLES), ("I32",))
        out[f"{prefix}.scales"] = ((K // G, N), ("F16",))
        if pq.method == "gptq":
            out[f"{prefix}.g_idx"] = ((K,), ("I32",))
    return out


def check_shapes_divide(config: ModelConfig, pq: Prequantized, label: str) -> None:
    """Every quantized matrix's K is a multiple of the group and N of 8 (the packing needs both)."""
    for t in checkpoint_tensors(config):
        if is_quantized(t.role, pq):
            N, K = t.shape
            if K % pq.group_size or N % NIBBLES:
                raise SourceError(f"{label}: tensor {t.name} [{N}, {K}] cannot be {pq.method} int4 with group "
                                  f"{pq.group_size} (inputs must divide by the group, outputs by 8)")


def check_tensors(entries, config: ModelConfig, pq: Prequantized, label: str):
    """Checkpoint tensors (or rows) against what the config and the packing imply, as a checkpoint.CheckResult;
    a tensor of the wrong type is an error at once."""
    from olmoscope.checkpoint import CheckResult

    check_shapes_divide(config, pq, label)
    expected = expected_tensors(config, pq)
    found = {e.name: e for e in entries}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [(n, expected[n][0], tuple(found[n].shape)) for n in expected
             if n in found and tuple(found[n].shape) != expected[n][0]]
    for name, (_, dtypes) in expected.items():
        if name in found and found[name].dtype not in dtypes:
            raise CheckpointError(f"{label}: tensor {name} is {found[name].dtype}; a {pq.method} checkpoint "
                                  f"stores it as {' or '.join(dtypes)}")
    return CheckResult(missing, unexpected, wrong, expected=len(expected))


def unpack_int32(packed: np.ndarray) -> np.ndarray:
    """int32 [R, C] → uint8 [R, C, 8]: nibble i (bits 4i..4i+3) of each word."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    return ((words[:, :, None] >> shifts) & 0xF).astype(np.uint8)


def _along_columns(packed: np.ndarray, method: str) -> np.ndarray:
    """int32 [R, C/8] packed along columns → uint8 [R, C] in natural column order."""
    nibbles = unpack_int32(packed)  # [R, C/8, 8]
    if method == "awq":
        natural = np.empty_like(nibbles)
        natural[:, :, list(AWQ_ORDER)] = nibbles  # nibble i is column AWQ_ORDER[i]
        nibbles = natural
    return nibbles.reshape(packed.shape[0], -1)


def read_matrix_rows(checkpoint, pq: Prequantized, weight_name: str, start: int, stop: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output rows start..stop of one quantized matrix in the engine's layout, exactly as stored:
    (q uint8 [n, K], scales float16 [n, K/G], zeros uint8 [n, K/G]); start and stop are multiples of 8."""
    prefix = module_of(weight_name)
    qweight = checkpoint.read(f"{prefix}.qweight")
    qzeros = checkpoint.read(f"{prefix}.qzeros")
    scales = checkpoint.read(f"{prefix}.scales")[:, start:stop]  # [K/G, n]
    if pq.method == "gptq":
        _check_g_idx(checkpoint.read(f"{prefix}.g_idx"), pq.group_size, prefix)
        nibbles = unpack_int32(qweight[:, start:stop])  # [K/8, n, 8]: nibble j is input 8r + j
        q = nibbles.transpose(1, 0, 2).reshape(stop - start, -1)  # [n, K]
    else:
        q = _along_columns(qweight[:, start // NIBBLES:stop // NIBBLES], "awq").T  # [n, K]
    zeros = _along_columns(qzeros[:, start // NIBBLES:stop // NIBBLES], pq.method).T.astype(np.int16) + pq.zero_offset
    _check_zeros(zeros, pq, prefix)
    return np.ascontiguousarray(q), np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.astype(np.uint8))


def _check_g_idx(g_idx: np.ndarray, group: int, prefix: str) -> None:
    if not np.array_equal(g_idx, np.arange(g_idx.shape[0]) // group):
        raise CheckpointError(f"{prefix}.g_idx is not k // {group}: act-order (permuted) groups are not supported")


def _check_zeros(zeros: np.ndarray, pq: Prequantized, prefix: str) -> None:
    if zeros.size and int(zeros.max()) > INT4_LEVELS:
        raise CheckpointError(f"{prefix}.qzeros: a stored zero of 15 means zero point 16 in the v1 gptq format, "
                              f"which the engine's 0..15 zero points cannot hold; refused")
    if pq.symmetric and zeros.size and not (zeros == INT4_SYMMETRIC_ZERO).all():
        raise CheckpointError(f"{prefix}.qzeros: sym is true but a zero point is not {INT4_SYMMETRIC_ZERO}; "
                              f"the checkpoint contradicts its quantization_config")
