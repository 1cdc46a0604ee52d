"""The weight-format table: one record per `--dtype`, read by the engine format, convert, verify, arch and the runtime.

Everything that differs between bf16, fp16, fp32, int8 and int4 is here — what a matrix is stored as,
its scales and zero points, how many bytes it takes, how it is quantized and dequantized, and which
kernel variant the CUDA runtime dispatches on — so no other module spells a format's rules.

    >>> FORMATS["int4"].matrix_bytes((4096, 4096), group=128)  # asym: packed pairs, fp16 scales, zero points
    8781824
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# numpy and olmoscope.quantize are imported where used: `arch` reads this table, and its start-up imports
# no numpy (an interrupt inside numpy's C import is an ImportError, not a KeyboardInterrupt).

INT4_GROUPS = (32, 64, 128)  # --group-size choices: they divide every OLMo 2 width, and the kernels tile by 32
INT4_DEFAULT_GROUP = 128  # what GPTQ and AWQ releases use
INT4_SCHEMES = ("asym", "sym")
# asym is the default: a zero point per group fits the group's actual range (weights are rarely centred
# on zero within 32–128 inputs) for 1 byte per group, and it is what AWQ and most GPTQ releases store.
INT4_DEFAULT_SCHEME = "asym"
NORM_DTYPE = "F32"  # norm weights are multiplied in float32 (OLMO2.md), so every format stores them that way
ELEMENT_BITS = {"F32": 32, "BF16": 16, "F16": 16, "I8": 8, "U8": 8, "U4": 4}  # stored element types


@dataclass(frozen=True)
class WeightFormat:
    """How one `--dtype` stores the matrices (qkv, o_proj, gate_up, down_proj, lm_head); norms are always F32."""

    name: str  # the --dtype value and the header's weight_dtype
    stored: str  # element type of a matrix's data: F32, BF16, F16, I8, or U4 (two 4-bit values per byte)
    wide: str  # the format of the embedding (gathered by row, never quantized) and of an unquantized lm_head
    group: str  # what one scale covers: "none", "row" (int8) or "group" (int4: --group-size inputs of a row)
    scale_dtype: str | None  # element type of the scales, None when unquantized
    zero_dtype: str | None  # element type of the zero points (asymmetric int4 only), else None
    kernel: str  # the CUDA runtime's kernel variant ("bf16": the GPU computes in bf16 whatever the file holds)
    quantized_head: bool  # whether lm_head is quantized by default (int4: on a flag, --int4-lm-head)
    # the quantization of a float block: (block, group, symmetric, name) → (data, scales, zeros); None: a cast
    encode: Callable | None
    # float32 [rows, cols] from (data, scales, zeros, group); None: a plain upcast
    decode: Callable | None
    layout: str = ""  # what the stored bytes of a matrix add to "row-major [out, in]", for the tensor table
    part_layouts: tuple[tuple[str, str], ...] = ()  # ("scales" | "zeros", its layout; {name}, {group} filled in)

    @property
    def quantized(self) -> bool:
        return self.scale_dtype is not None

    def for_tensor(self, kind: str, role: str, head_quantized: bool) -> WeightFormat | None:
        """The format one engine tensor takes in a file of this format: None for norms (NORM_DTYPE), the wide
        one for the embedding and an unquantized lm_head, else this one."""
        if kind == "norm":
            return None
        if role == "embedding" or (role == "lm_head" and self.quantized and not head_quantized):
            return FORMATS[self.wide]
        return self

    def scale_shape(self, shape: tuple[int, ...], group: int | None) -> tuple[int, ...] | None:
        """The scales' shape for a matrix [N, K]: [N] per row, [N, K/G] per group, None unquantized."""
        if self.group == "row":
            return (shape[0],)
        if self.group == "group":
            return (shape[0], -(-shape[1] // group))  # whole groups (convert refuses a K they do not divide)
        return None

    def steps(self, scales, group: int | None):
        """float64 quantization step of each element of a block of rows: [rows, 1] per row, [rows, K] per group."""
        import numpy as np

        s = scales.astype(np.float64)
        return s[:, None] if self.group == "row" else np.repeat(s, group, axis=1)

    def data_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored array's shape: [N, K/2] bytes for int4 (packed pairs), else the tensor's own."""
        bits = ELEMENT_BITS[self.stored]
        return tuple(shape) if bits >= 8 or len(shape) != 2 else (shape[0], shape[1] * bits // 8)

    def values(self, data):
        """The stored elements one per array entry: int4's unpacked 0..15, else the data itself."""
        from olmoscope import quantize

        return quantize.unpack_nibbles(data) if self.stored == "U4" else data

    def matrix_bytes(self, shape: tuple[int, ...], group: int | None = None, symmetric: bool = False) -> int:
        """Bytes a matrix takes in this format: data, scales and zero points."""
        rows, cols = shape
        total = rows * cols * ELEMENT_BITS[self.stored] // 8
        scales = self.scale_shape(shape, group)
        if scales is not None:
            count = math.prod(scales)
            total += count * ELEMENT_BITS[self.scale_dtype] // 8
            if self.zero_dtype is not None and not symmetric:
                total += count * ELEMENT_BITS[self.zero_dtype] // 8
        return total


def _encode_int8(block, group, symmetric, name):
    from olmoscope import quantize

    q, scales = quantize.quantize_int8_rows(block, name)
    return q, scales, None


def _decode_int8(data, scales, zeros, group):
    from olmoscope import quantize

    return quantize.dequantize_int8(data, scales)


def _encode_int4(block, group, symmetric, name):
    from olmoscope import quantize

    q, scales, zeros = quantize.quantize_int4_groups(block, group, symmetric, name)
    return quantize.pack_nibbles(q), scales, zeros


def _decode_int4(data, scales, zeros, group):
    from olmoscope import quantize

    return quantize.dequantize_int4(data, scales, zeros, group)


FORMATS: dict[str, WeightFormat] = {
    "bf16": WeightFormat("bf16", "BF16", "bf16", "none", None, None, "bf16", False, None, None),
    "fp16": WeightFormat("fp16", "F16", "fp16", "none", None, None, "bf16", False, None, None),
    "fp32": WeightFormat("fp32", "F32", "fp32", "none", None, None, "bf16", False, None, None),
    # The embedding stays bf16 in quantized files: the runtime gathers single rows from it, where a
    # quantized table saves memory but no time, and every lookup would need its row's scales.
    "int8": WeightFormat("int8", "I8", "bf16", "row", "F32", None, "int8", True, _encode_int8, _decode_int8,
                         part_layouts=(("scales", "vector [rows]; {name}[r, :] ≈ q[r, :] · scale[r]"),)),
    # fp16 scales, as GPTQ and AWQ store them, so an import is exact; lm_head stays bf16 unless asked, as in
    # GPTQ and AWQ releases: its output is the logits, with no later layer to average its rounding away.
    "int4": WeightFormat(
        "int4", "U4", "bf16", "group", "F16", "U8", "int4", False, _encode_int4, _decode_int4,
        layout="bytes [out, in/2], element k in byte k//2, low nibble for even k",
        part_layouts=(("scales", "row-major [rows, in/G], G = {group}; {name}[r, k] = (q[r, k] − z[r, k//G]) · s[r, k//G]"),
                      ("zeros", "row-major [rows, in/G], one zero point 0..15 per group (symmetric files: none, z = 8)"))),
}
BY_STORED = {fmt.stored: fmt for fmt in FORMATS.values()}  # "U4" → int4: the format a stored matrix is in


def by_stored(dtype: str) -> WeightFormat:
    """The format whose matrices are stored as `dtype` (F32 → fp32, I8 → int8, U4 → int4).

    >>> by_stored("U4").name
    'int4'
    """
    return BY_STORED[dtype]
