"""The kernels of cuda/ as Python calls: each one checks the shapes it is given, then launches on one stream.

Device memory is held in `DeviceBuffer`s (a pointer, a shape and an element type), so every launch can be
checked on the host before it runs; any CUDA failure becomes a DeviceError naming the kernel.

Conventions of a step (the backend's contract with these launchers):
- T token rows; sequences s = 0 … B−1, the first Bd of them decode sequences with one row each (rows 0 … Bd−1),
  the rest prefill sequences. Per sequence (int32): first_row[s], rows[s], context_len[s] (positions 0 …
  context_len − 1 are cached after this step's append; the sequence's rows are its last `rows` positions),
  block_tables [B, table_width].
- KV pool: [L, 2, num_blocks, Hkv, BLOCK_SIZE, d] bf16; the launchers take one layer's K and V planes
  (num_blocks, Hkv, BLOCK_SIZE, d). Slot = block·BLOCK_SIZE + offset; block 0 is the null block.
- Split-K partials: `parts` × [rows, N] f32, part p at element p·part_stride, summed in order by the consumers.
- Seen-token bitsets: [states, ceil(V/32)] "i32" buffers holding uint32 words.
- Every per-step value is read from device memory (CUDA-graph safe); only launch sizes are host integers.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda.build import arch_of, build_arch, compile_kernel
from olmoscope.runtime.cuda.driver import ITEMSIZE, DeviceBuffer, DriverFunction
from olmoscope.runtime.cuda.quant_layout import Q4_CHUNK, Q4_GROUPS, Q4_TILE_ROWS, Q8_CHUNK
from olmoscope.runtime.cuda.tensor_map import MAP_FORMAT, TensorMaps
from olmoscope.runtime.step import SAMPLE_NAN, SAMPLE_NO_MASS  # noqa: F401  (mirrored from sampling.cu)

# ── constants mirrored from cuda/ (tests/test_kernel_mirror.py checks each against its constexpr) ──────────
BLOCK_SIZE = 16  # KV positions per cache block (common.cuh KV_BLOCK)
HEAD_DIMS = (16, 32, 64, 128)  # the attention kernels' instantiations
DECODE_GROUPS = (1, 2, 4, 8)  # paged_decode's query heads per kv head, rounded up
GEMV_MAX_ROWS = 4  # rows up to this go to the GEMV, more to the tensor-core GEMM (gemv.cu)
GEMV_WARPS = 8  # warps per GEMV block (gemv.cu)
GEMV_WARPS_PER_SM = 16  # split K across warps until about this many stream on every multiprocessor (measured)
GEMM_THREADS = 256  # every GEMM variant: 8 warps, one CTA per multiprocessor (gemm.cu)
GEMM_SMALL_BN = 128  # bm16/32/64 (decode batches): weight rows per tile, k-tile
GEMM_SMALL_BK = 128
GEMM_SMALL_STAGES = 4  # bm16, bm32
GEMM_BM64_STAGES = 3
GEMM_MID_BN = 128  # bm128 (M 65 … 256): weight rows per tile, k-tile, stages
GEMM_MID_BK = 64
GEMM_MID_STAGES = 4
GEMM_LARGE_BN = 128  # bm256 (prefill): weight rows per tile, k-tile, stages
GEMM_LARGE_BK = 64
GEMM_LARGE_STAGES = 3
GEMM90_BM = 128  # gemm_sm90.cu (Hopper wgmma) bm128: rows, columns, k-tile, stages, threads
GEMM90_BN = 256
GEMM90_BK = 64
GEMM90_STAGES = 4
GEMM90_THREADS = 256
GEMM90_BM64_STAGES = 5  # gemm_sm90.cu bm64 (skinny M: decode batches)
GEMM90T_BN = 256  # gemm_sm90_tma.cu (TMA + mbarrier pipeline): tile columns, k-tile, rows of one W box, stages
GEMM90T_BK = 64
GEMM90T_WBOX = 128
GEMM90T_GATE_BOX = 64  # silu: rows of one gate (or up) box
GEMM90T_BM128_STAGES = 4
GEMM90T_BM64_STAGES = 5
Q8T_TOKENS, Q8T_ROWS, Q8T_STAGES = 256, 128, 5  # gemm_sm90_tma.cu's int8 kernel: tokens × weight rows per tile, stages
GEMM_V1_BN = 128  # the previous GEMM (gemm_v1.cu, timed next to gemm.cu's): columns per CTA, smem row padding
GEMM_V1_PAD = 8
GEMM_V1_LARGE_BK = 32  # v1 bm128: k-tile, stages, threads
GEMM_V1_LARGE_STAGES = 3
GEMM_V1_LARGE_THREADS = 256
GEMM_V1_SMALL_BK = 64  # v1 bm16/32/64: k-tile, stages, threads
GEMM_V1_SMALL_STAGES = 4
GEMM_V1_SMALL_THREADS = 128
FA_QUERIES = 64  # paged_prefill's query tile (attention.cu FA_BQ)
FA_THREADS = 128
FA90_QUERIES = 128  # attention_sm90.cu (Hopper wgmma prefill): query rows per CTA (two FA_QUERIES tiles), keys per
FA90_KEYS = 128  # step, K/V ring stages, threads (2 warpgroups)
FA90_STAGES = 3
FA90_THREADS = 256
HEAD_DIMS_SM90 = (64, 128)  # its instantiations (other head sizes run attention.cu's kernel)
DECODE_THREADS = 128  # paged_decode (attention.cu DEC_*)
DECODE_WARPS = 4
DECODE_STAGES = 3
KV_PAD = 8  # bf16 of padding per smem row of a K/V tile (attention.cu)
NORM_THREADS = 256  # norms.cu
NORM_ITEMS = 8  # norms.cu: residual_rmsnorm_add holds a row's quads in registers, D ≤ 4·NORM_ITEMS·NORM_THREADS
ROPE_THREADS = 256  # rope.cu: two blocks per token (q; k and v)
ROPE_ITEMS = 4  # rope.cu: rotation pairs per thread of qk_norm_rope_append, H·d ≤ 8·ROPE_ITEMS·ROPE_THREADS
ROPE_HEAD_THREADS = 128  # rope.cu: one block per (token, head)
SAMPLE_THREADS = 1024  # sampling.cu
TOP_LOGPROBS = 20  # sampling.cu: row_logprobs' alternatives per row, at most
COPY_THREADS = 256  # kv_cache.cu
Q4_WARPS = 8  # gemm_quant.cu: warps per block; Q4_TILE_ROWS, Q4_CHUNK come from quant_layout (the device layout)
Q4_MAX_ROWS = 64  # token rows the int4 mma kernels take (more: dequantize_q4, then gemm)
Q4_SMALL_UNROLL = 8  # chunks (16-byte loads per lane) per step: NT ≤ 2, NT = 4, NT = 8
Q4_MID_UNROLL = 4
Q4_WIDE_UNROLL = 2
Q4_NT = (1, 2, 4, 8)  # n8 token tiles of the instantiations (M ≤ 8, 16, 32, 64)
Q8_STAGE_CHUNKS, Q8_N1_STAGE_CHUNKS, Q8_STAGES = 2, 4, 4  # gemm_quant.cu's int8 ring: chunks per stage (NT > 1,
# NT = 1), stages per warp


def q8t_smem() -> int:
    """Dynamic shared memory of gemm_sm90_tma.cu's int8 kernel (Q8TConfig): stages of x's [256][64] bf16 box and the
    8 device tiles' 1 KB each, 1 KB of alignment slack, two mbarriers per stage."""
    return Q8T_STAGES * (Q8T_TOKENS * GEMM90T_BK * 2 + Q8T_ROWS * GEMM90T_BK) + 1024 + 2 * Q8T_STAGES * 8


def q8_smem(nt: int) -> int:
    """Dynamic shared memory of an int8 kernel (gemm_quant.cu RingSmem): 8 warps' weight rings, their mbarriers, and
    the split-K partials."""
    chunks = Q8_N1_STAGE_CHUNKS if nt == 1 else Q8_STAGE_CHUNKS
    return Q4_WARPS * Q8_STAGES * (chunks * 512 + 8) + Q4_WARPS * nt * 4 * 32 * 4

# Python name → (file, constexpr name): what the mirror test compares.
MIRRORED = {
    "BLOCK_SIZE": ("common.cuh", "KV_BLOCK"),
    "GEMV_MAX_ROWS": ("gemv.cu", "GEMV_MAX_ROWS"),
    "GEMV_WARPS": ("gemv.cu", "GEMV_WARPS"),
    "GEMM_THREADS": ("gemm.cu", "GEMM_THREADS"),
    "GEMM_SMALL_BN": ("gemm.cu", "GEMM_SMALL_BN"),
    "GEMM_SMALL_BK": ("gemm.cu", "GEMM_SMALL_BK"),
    "GEMM_SMALL_STAGES": ("gemm.cu", "GEMM_SMALL_STAGES"),
    "GEMM_BM64_STAGES": ("gemm.cu", "GEMM_BM64_STAGES"),
    "GEMM_MID_BN": ("gemm.cu", "GEMM_MID_BN"),
    "GEMM_MID_BK": ("gemm.cu", "GEMM_MID_BK"),
    "GEMM_MID_STAGES": ("gemm.cu", "GEMM_MID_STAGES"),
    "GEMM_LARGE_BN": ("gemm.cu", "GEMM_LARGE_BN"),
    "GEMM_LARGE_BK": ("gemm.cu", "GEMM_LARGE_BK"),
    "GEMM_LARGE_STAGES": ("gemm.cu", "GEMM_LARGE_STAGES"),
    **{name: ("gemm_sm90.cu", name) for name in ("GEMM90_BM", "GEMM90_BN", "GEMM90_BK", "GEMM90_STAGES",
                                                 "GEMM90_THREADS", "GEMM90_BM64_STAGES")},
    **{name: ("gemm_sm90_tma.cu", name) for name in ("GEMM90T_BN", "GEMM90T_BK", "GEMM90T_WBOX", "GEMM90T_GATE_BOX",
                                                     "GEMM90T_BM128_STAGES", "GEMM90T_BM64_STAGES", "Q8T_TOKENS",
                                                     "Q8T_ROWS", "Q8T_STAGES")},
    **{name: ("gemm_v1.cu", name) for name in ("GEMM_V1_BN", "GEMM_V1_PAD", "GEMM_V1_LARGE_BK", "GEMM_V1_LARGE_STAGES",
                                               "GEMM_V1_LARGE_THREADS", "GEMM_V1_SMALL_BK", "GEMM_V1_SMALL_STAGES",
                                               "GEMM_V1_SMALL_THREADS")},
    "FA_QUERIES": ("attention.cu", "FA_BQ"),
    "FA_THREADS": ("attention.cu", "FA_THREADS"),
    "FA90_QUERIES": ("attention_sm90.cu", "FA90_BQ"),
    "FA90_KEYS": ("attention_sm90.cu", "FA90_BKV"),
    "FA90_STAGES": ("attention_sm90.cu", "FA90_STAGES"),
    "FA90_THREADS": ("attention_sm90.cu", "FA90_THREADS"),
    "DECODE_THREADS": ("attention.cu", "DEC_THREADS"),
    "DECODE_WARPS": ("attention.cu", "DEC_WARPS"),
    "DECODE_STAGES": ("attention.cu", "DEC_STAGES"),
    "KV_PAD": ("attention.cu", "KV_PAD"),
    "NORM_THREADS": ("norms.cu", "NORM_THREADS"),
    "NORM_ITEMS": ("norms.cu", "NORM_ITEMS"),
    "ROPE_THREADS": ("rope.cu", "ROPE_THREADS"),
    "ROPE_ITEMS": ("rope.cu", "ROPE_ITEMS"),
    "ROPE_HEAD_THREADS": ("rope.cu", "ROPE_HEAD_THREADS"),
    "SAMPLE_THREADS": ("sampling.cu", "SAMPLE_THREADS"),
    "TOP_LOGPROBS": ("sampling.cu", "TOP_LOGPROBS"),
    "SAMPLE_NAN": ("sampling.cu", "SAMPLE_NAN"),
    "SAMPLE_NO_MASS": ("sampling.cu", "SAMPLE_NO_MASS"),
    "COPY_THREADS": ("kv_cache.cu", "COPY_THREADS"),
    **{name: ("gemm_quant.cu", name) for name in ("Q4_WARPS", "Q4_TILE_ROWS", "Q4_CHUNK", "Q4_MAX_ROWS", "Q4_SMALL_UNROLL",
                                                  "Q4_MID_UNROLL", "Q4_WIDE_UNROLL", "Q8_CHUNK",
                                                  "Q8_STAGE_CHUNKS", "Q8_N1_STAGE_CHUNKS", "Q8_STAGES")},
}

# The switch of the Hopper GEMM (gemm_sm90.cu, wgmma): on by default on sm_90 GPUs, where gemm_plan picks it for the
# shapes with enough 128 × 256 tiles (measured on an H200); OLMOSCOPE_GEMM_HOPPER=0 turns it off for a run.
GEMM_HOPPER = os.environ.get("OLMOSCOPE_GEMM_HOPPER", "1") != "0"
# Programmatic dependent launch inside decode graphs (driver.py CudaGraph) on sm_90+ GPUs, on unless OLMOSCOPE_PDL=0.
# With every kernel waiting at its first line it measured no clear gain (H200, batch-1 decode: 1B 1.02 → 1.00 ms, 7B
# 4.04 → 4.10). The gain came with the projections copying their first weights before the wait (static_weights): the
# decode graph at context 448 (profile_decode.py, H200, 2026-12-02, same run) 7B 4.071 → 3.907 ms at batch 1, 6.057 →
# 5.897 at 16, 9.18 → 9.07 at 64; 1B 1.018 → 0.914, 1.510 → 1.379, 2.508 → 2.511.
PDL = os.environ.get("OLMOSCOPE_PDL", "1") != "0"
# The switch of the Hopper prefill attention (attention_sm90.cu, wgmma): on by default on sm_90 GPUs, where
# Kernels.paged_prefill runs it for d = 64 and 128 (NVIDIA H200, 2048 tokens at OLMo-2-7B shapes: 134 µs, 256 TFLOP/s
# against attention.cu's 306 µs for one prompt, 58 against 97 µs for 4 × 512; bench_kernels.py --attention-only);
# OLMOSCOPE_ATTENTION_HOPPER=0 keeps attention.cu's mma.sync kernel.
ATTENTION_HOPPER = os.environ.get("OLMOSCOPE_ATTENTION_HOPPER", "1") != "0"
# The TMA-fed wgmma kernels (gemm_sm90_tma.cu) in the Hopper regimes where gemm_plan's rule takes them; with
# OLMOSCOPE_GEMM_TMA=0 those regimes run gemm_sm90.cu's cp.async kernels as before.
GEMM_TMA = os.environ.get("OLMOSCOPE_GEMM_TMA", "1") != "0"
# Packed int8 and int4 projections past 64 rows on sm_90: dequantized in the TMA GEMM's main loop (gemm_sm90_tma.cu
# gemm90tma_q8, gemm90tma_q4) unless OLMOSCOPE_GEMM_QUANT_TMA=0, which keeps the scratch path (dequantize_q8 or
# dequantize_q4 into a bf16 copy, then the bf16 GEMM).
GEMM_QUANT_TMA = os.environ.get("OLMOSCOPE_GEMM_QUANT_TMA", "1") != "0"
# int4 in the main loop up to this many rows, the scratch path beyond: the in-loop kernel spends ~5 ALU operations per
# weight pair on the f32 group scale, so past ~512 rows its consumers, not the tensor cores, set the pace (H200,
# bench_kernels.py --quant-prefill-only, 2026-12-04: a 7B layer's four projections at M = 256 272 µs in the loop
# against 353 through the scratch, 514 against 524 at 512, 1435 against 1251 at 2048; int8 wins at every M).
Q4_IN_LOOP_MAX_ROWS = 256

# Host-side planning knobs (not in any .cu file).
GEMM_MIN_KTILES_PER_SPLIT = 4  # a split-K share streams at least this many k-tiles
GEMM_MAX_SPLITS = 16
DECODE_MAX_SPLITS = 16
ROPE_PER_HEAD_MAX_TOKENS = 32  # qk_norm_rope_append_heads up to this many rows (each block re-reads its vector's norm)
CTAS_PER_SM = 2  # the grid size the split planners aim at: about two resident CTAs per multiprocessor


class GemmTile(NamedTuple):
    """One GEMM variant of gemm.cu: rows (tokens) and columns (weight rows) per tile, k-tile, pipeline stages."""

    bm: int
    bn: int
    bk: int
    stages: int
    threads: int = GEMM_THREADS

    @property
    def smem(self) -> int:
        """Dynamic shared memory: STAGES · (BM + BN) · BK · sizeof(bf16) (swizzled rows, no padding), as GemmConfig."""
        return self.stages * (self.bm + self.bn) * self.bk * 2

    @property
    def slot_floats(self) -> int:
        """One partial tile of the stream-K fixup: BM · BN f32."""
        return self.bm * self.bn


GEMM_TILES = {
    16: GemmTile(16, GEMM_SMALL_BN, GEMM_SMALL_BK, GEMM_SMALL_STAGES),
    32: GemmTile(32, GEMM_SMALL_BN, GEMM_SMALL_BK, GEMM_SMALL_STAGES),
    64: GemmTile(64, GEMM_SMALL_BN, GEMM_SMALL_BK, GEMM_BM64_STAGES),
    128: GemmTile(128, GEMM_MID_BN, GEMM_MID_BK, GEMM_MID_STAGES),
    256: GemmTile(256, GEMM_LARGE_BN, GEMM_LARGE_BK, GEMM_LARGE_STAGES),
}


class Gemm90Tile(NamedTuple):
    """One tile of gemm_sm90.cu: BM rows × 256 columns × 64, `stages` shared-memory stages (Gemm90Config)."""

    bm: int
    stages: int
    bn: int = GEMM90_BN
    bk: int = GEMM90_BK
    threads: int = GEMM90_THREADS

    @property
    def smem(self) -> int:
        """STAGES · (BM + 256) · 64 · sizeof(bf16), + 1024 bytes to align the stages to 1 KB in the kernel."""
        return self.stages * (self.bm + self.bn) * self.bk * 2 + 1024


GEMM90_TILES = {64: Gemm90Tile(64, GEMM90_BM64_STAGES), 128: Gemm90Tile(GEMM90_BM, GEMM90_STAGES)}
GEMM90_SMEM = GEMM90_TILES[GEMM90_BM].smem


class Gemm90TmaTile(NamedTuple):
    """One tile of gemm_sm90_tma.cu: BM rows × 256 columns × 64, `stages` stages; a producer warpgroup (TMA) and
    BM / 64 consumer warpgroups (wgmma), as Gemm90TConfig."""

    bm: int
    stages: int
    bn: int = GEMM90T_BN
    bk: int = GEMM90T_BK

    @property
    def threads(self) -> int:
        return 128 * (1 + self.bm // 64)

    @property
    def smem(self) -> int:
        """STAGES · (BM + 256) · 64 · sizeof(bf16), + 1 KB to align the stages, + two mbarriers per stage."""
        return self.stages * (self.bm + self.bn) * self.bk * 2 + 1024 + 2 * self.stages * 8


GEMM90T_TILES = {64: Gemm90TmaTile(64, GEMM90T_BM64_STAGES), 128: Gemm90TmaTile(128, GEMM90T_BM128_STAGES)}


class GemmV1Tile(NamedTuple):
    """One variant of the previous GEMM (gemm_v1.cu): 128 columns per CTA, padded smem rows."""

    bm: int
    bk: int
    stages: int
    threads: int
    bn: int = GEMM_V1_BN

    @property
    def smem(self) -> int:
        """STAGES · (BM + BN) · (BK + PAD) · sizeof(bf16), as gemm_v1.cu's GemmV1Config."""
        return self.stages * (self.bm + GEMM_V1_BN) * (self.bk + GEMM_V1_PAD) * 2


GEMM_V1_TILES = {
    16: GemmV1Tile(16, GEMM_V1_SMALL_BK, GEMM_V1_SMALL_STAGES, GEMM_V1_SMALL_THREADS),
    32: GemmV1Tile(32, GEMM_V1_SMALL_BK, GEMM_V1_SMALL_STAGES, GEMM_V1_SMALL_THREADS),
    64: GemmV1Tile(64, GEMM_V1_SMALL_BK, GEMM_V1_SMALL_STAGES, GEMM_V1_SMALL_THREADS),
    128: GemmV1Tile(128, GEMM_V1_LARGE_BK, GEMM_V1_LARGE_STAGES, GEMM_V1_LARGE_THREADS),
}
# gemm.cu's stream-K family (the default), gemm_v1.cu's grid split-K family, gemm_sm90.cu's wgmma (sm_90 only),
# gemm_sm90_tma.cu's TMA-fed, warp-specialized wgmma (sm_90 only)
GEMM_VARIANTS = ("stream", "v1", "sm90", "tma")


def prefill90_smem(d: int) -> int:
    """attention_sm90.cu's dynamic shared memory: Q of both warpgroups, FA90_STAGES (K, V) tiles, 1 KB alignment slack."""
    return 2 * 64 * d * 2 + FA90_STAGES * 2 * FA90_KEYS * d * 2 + 1024


def prefill_kernel(d: int, hopper: bool) -> str:
    """The paged_prefill kernel for head size d: attention_sm90.cu's (wgmma) on an sm_90 GPU (`hopper`) for d = 64
    and 128, else attention.cu's (mma.sync).

    >>> prefill_kernel(128, hopper=True), prefill_kernel(32, hopper=True), prefill_kernel(128, hopper=False)
    ('paged_prefill90_d128', 'paged_prefill_d32', 'paged_prefill_d128')
    """
    return f"paged_prefill90_d{d}" if hopper and d in HEAD_DIMS_SM90 else f"paged_prefill_d{d}"


def decode_smem(d: int) -> int:
    """paged_decode's dynamic shared memory: each warp's ring of DECODE_STAGES (K, V) blocks."""
    return DECODE_WARPS * DECODE_STAGES * 2 * BLOCK_SIZE * (d + KV_PAD) * 2


# kernel name → (file, PyCUDA argument format: P pointer, i int32, f float32, q int64, 128s a TMA tensor map by value)
SIGNATURES = {
    "embedding_gather_bf16": ("embedding.cu", "PPPPii"),
    "embedding_gather_int8": ("embedding.cu", "PPPPPii"),
    "prepare_tokens": ("embedding.cu", "PPPPii"),
    "mark_seen": ("embedding.cu", "PPPii"),
    "residual_rmsnorm_add": ("norms.cu", "PPiqPPif"),
    "rmsnorm_rows_bf16": ("norms.cu", "PPPPif"),
    "qk_norm_rope_append": ("rope.cu", "PiqPPPPPPPPiiif"),
    "qk_norm_rope_append_heads": ("rope.cu", "PiqPPPPPPPPiiif"),
    **{f"gemv_{kind}{silu}_m{m}": ("gemv.cu", "PPPPiiii")
       for kind in ("bf16", "int8") for silu in ("", "_silu") for m in range(1, GEMV_MAX_ROWS + 1)},
    **{f"gemm_bf16_bm{bm}": ("gemm.cu", "PPPPiiiiiPP") for bm in GEMM_TILES},
    **{f"gemm_bf16_silu_bm{bm}": ("gemm.cu", "PPPPiiiiPP") for bm in GEMM_TILES},
    **{f"gemm90_bf16_bm{bm}": ("gemm_sm90.cu", "PPPPiiiii") for bm in GEMM90_TILES},
    **{f"gemm90_bf16_silu_bm{bm}": ("gemm_sm90.cu", "PPPPiiii") for bm in GEMM90_TILES},
    **{f"gemm90tma_bf16_bm{bm}": ("gemm_sm90_tma.cu", MAP_FORMAT * 3 + "PPiiiiii") for bm in GEMM90T_TILES},
    **{f"gemm90tma_bf16_silu_bm{bm}": ("gemm_sm90_tma.cu", MAP_FORMAT * 3 + "PPiiii") for bm in GEMM90T_TILES},
    "gemm90tma_q8": ("gemm_sm90_tma.cu", MAP_FORMAT * 2 + "PPiiiiii"),
    "gemm90tma_q8_silu": ("gemm_sm90_tma.cu", MAP_FORMAT * 2 + "PPiii"),
    "gemm90tma_q4": ("gemm_sm90_tma.cu", MAP_FORMAT * 2 + "PPPiiiiiii"),
    "gemm90tma_q4_silu": ("gemm_sm90_tma.cu", MAP_FORMAT * 2 + "PPPiiii"),
    **{f"gemm_v1_bf16_bm{bm}": ("gemm_v1.cu", "PPPPiiiii") for bm in GEMM_V1_TILES},
    **{f"gemm_v1_bf16_silu_bm{bm}": ("gemm_v1.cu", "PPPPiiii") for bm in GEMM_V1_TILES},
    "silu_mul_parts": ("gemm.cu", "PiqPii"),
    "widen_int8": ("gemm.cu", "PPq"),
    **{f"q4_mma{silu}_g{g}_n{nt}": ("gemm_quant.cu", "PPPPPiiii")
       for silu in ("", "_silu") for g in Q4_GROUPS for nt in Q4_NT},
    "dequantize_q4": ("gemm_quant.cu", "PPPPiiii"),
    **{f"q8_mma{silu}_n{nt}": ("gemm_quant.cu", "PPPPiiii") for silu in ("", "_silu") for nt in Q4_NT},
    "dequantize_q8": ("gemm_quant.cu", "PPPPiii"),
    **{f"paged_prefill_d{d}": ("attention.cu", "PPPPPPPPPPiiii") for d in HEAD_DIMS},
    **{f"paged_prefill90_d{d}": ("attention_sm90.cu", "PPPPPPPPPPiiiii") for d in HEAD_DIMS_SM90},
    **{f"paged_decode_d{d}_g{g}": ("attention.cu", "PPPPPPPPPiiiii") for d in HEAD_DIMS for g in DECODE_GROUPS},
    "penalize_rows": ("sampling.cu", "PiPPPPPiP"),
    "sample_rows": ("sampling.cu", "PiiPPPPPPPP"),
    "row_logprobs": ("sampling.cu", "PiiPiPPP"),
    "count_tokens": ("embedding.cu", "PPPii"),
    "copy_blocks": ("kv_cache.cu", "PPiqii"),
}


def argument_codes(argtypes: str) -> list[str]:
    """A SIGNATURES format split into its parameters ("128sPi" → ["128s", "P", "i"]), as struct reads it.

    >>> argument_codes(MAP_FORMAT + "PPiq")
    ['128s', 'P', 'P', 'i', 'q']
    """
    return re.findall(r"\d*[A-Za-z]", argtypes)


# ── host-side planning (pure functions: the backend and the tests use the same ones) ──────────────────────
def gemm_tile(M: int, tiles: dict | None = None) -> int:
    """The GEMM variant (BM) for M rows: 16, 32, 64 for decode batches, 128 up to 256 rows (two 128-row tiles keep
    stream-K's partial tiles half the size of one 256-row tile), 256 for prefill; the v1 kernels (tiles=
    GEMM_V1_TILES) stop at 128."""
    if M <= 16:
        return 16
    if M <= 32:
        return 32
    if tiles is GEMM_V1_TILES:
        return 64 if M <= 128 else 128  # v1: two bm64 tiles beat one half-empty bm128 tile
    if M <= 64:
        return 64
    return 128 if M <= 256 else 256


# A rough time model of gemm.cu on an H100/H200-class chip (bytes/s, FMA per clock per multiprocessor, clock), for
# gemm_plan to avoid the tiles that lose clearly: estimates, to be calibrated against bench_kernels.py, not measured.
GEMM_MODEL_DRAM = 3.9e12  # weight streaming, all multiprocessors
GEMM_MODEL_SM_LOAD = 85e9  # one multiprocessor's tile loads: ~110 KB in flight over ~1.3 µs
GEMM_MODEL_SM_L2 = 90e9  # one multiprocessor's share of L2 bandwidth: a stream-K tile's partials
GEMM_MODEL_FMA = {16: 285, 32: 415, 64: 650, 128: 900, 256: 1100}  # mma.sync FMA/clock/SM each tile sustains
GEMM_MODEL_CLOCK = 1.75e9
GEMM_MODEL_MARGIN = 0.85  # another tile replaces gemm_tile's only when the model finds it this much cheaper


def gemm_cost(bm: int, M: int, N: int, K: int, sm_count: int) -> float:
    """Modelled seconds of gemm.cu with tile bm on the stream-K schedule: the slowest of the weight stream (DRAM),
    one CTA's tile loads and one CTA's mma work, plus the partial sums of its cut tiles (the last CTA of a tile
    reads every part: many parts when there are far fewer tiles than CTAs, at the end of the kernel; overlapped
    with whole tiles when there are more)."""
    tile = GEMM_TILES[bm]
    tiles, kt = math.ceil(M / bm) * math.ceil(N / tile.bn), math.ceil(K / tile.bk)
    ctas, sk_tiles = gemm_stream_plan(tiles, kt, sm_count)
    per_cta = tiles * kt / ctas  # k-tiles
    stream = 2 * N * K / GEMM_MODEL_DRAM
    loads = per_cta * (bm + tile.bn) * tile.bk * 2 / GEMM_MODEL_SM_LOAD
    math_s = per_cta * bm * tile.bn * tile.bk / (GEMM_MODEL_FMA[bm] * GEMM_MODEL_CLOCK)
    slot = tile.slot_floats * 4
    if sk_tiles == 0:
        fixup = 0.0
    elif tiles <= ctas:
        fixup = (math.ceil(ctas / tiles) + 2) * slot / GEMM_MODEL_SM_L2
    else:
        fixup = 1.5 * slot / GEMM_MODEL_SM_L2
    return max(stream, loads, math_s) + fixup


def gemm_stream_tile(M: int, N: int, K: int, sm_count: int) -> int:
    """The stream-K tile (bm) of gemm.cu for C = A·Wᵀ with A [M, K], W [N, K]: the tile for M (gemm_tile) unless the
    time model (gemm_cost) finds a tile of at most twice the rows clearly cheaper (small matrices, whose few tiles
    stream-K would cut into many parts).

    >>> gemm_stream_tile(16, 4096, 4096, 132), gemm_stream_tile(64, 4096, 4096, 132), gemm_stream_tile(64, 2048, 2048, 132)
    (16, 64, 16)
    """
    natural = gemm_tile(M)
    best, best_cost = natural, gemm_cost(natural, M, N, K, sm_count)
    for bm in GEMM_TILES:
        if bm != natural and bm <= 2 * max(M, 16):
            cost = gemm_cost(bm, M, N, K, sm_count)
            if cost < GEMM_MODEL_MARGIN * best_cost:
                best, best_cost = bm, cost
    return best


class GemmPlan(NamedTuple):
    """How one projection runs: variant "gemv" (gemv.cu), "v1" (gemm_v1.cu, grid split-K), "stream" (gemm.cu,
    stream-K) or "sm90" (gemm_sm90.cu, wgmma); its row tile (0 for the GEMV) and split-K count (partials summed by the
    consumer; with silu and splits > 1, by silu_mul_parts)."""

    variant: str
    bm: int
    splits: int


GEMM90_MIN_USEFUL_TILES = 40  # sm90 from this many useful 128 × 256 tiles (measured on an H200, 2026-12-02)
GEMM90_MIN_ROWS = 33  # and from this many rows (v1's bm16/bm32 stream a thin batch faster; sm90 untimed below 64)
GEMM_V1_MAX_ROWS = 256  # v1 (grid split-K) up to this many rows, stream-K above
# The skinny-M plan (GEMM_SKINNY): gemm_sm90.cu with grid split-K for the decode batches (model, not yet measured)
GEMM_SKINNY = os.environ.get("OLMOSCOPE_GEMM_SKINNY", "1") != "0"
GEMM90_SKINNY_ROWS = (17, 256)  # M range: v1 already streams 75–80 % of copy bandwidth up to 16 rows (7B, H200)
GEMM90_MIN_KTILES_PER_SPLIT = 4  # a split streams at least 4 k-tiles (160 KB of bm64 stages: the pipeline fills)
GEMM90_FUSED_SILU_CTAS = 64  # gate_up keeps its fused SiLU (no partials, no silu_mul_parts) from this many tiles
# (1B gate_up at M = 64, 64 tiles, H200: fused 25.7 µs against two splits through partials 26.2)
GEMM90_SKINNY_MIN_CTAS = 64  # and the skinny plan needs this many CTAs: ~10 MB of copies in flight over the chip


def gemm90_tile(M: int) -> int:
    """gemm_sm90.cu's tile for M rows: bm64 (one warpgroup's wgmma, deeper copies) up to 64 rows, bm128 beyond."""
    return 64 if M <= 64 else GEMM90_BM


def gemm90_useful_tiles(M: int, N: int) -> float:
    """The 128 × 256 tiles of gemm_sm90.cu for M rows, each counted by the share of its rows that are real."""
    return math.ceil(M / GEMM90_BM) * math.ceil(N / GEMM90_BN) * min(M, GEMM90_BM) / GEMM90_BM


def gemm90_splits(bm: int, M: int, N: int, K: int, sm_count: int, silu: bool = False) -> int:
    """gemm_sm90.cu's grid split-K count for a skinny product: as many splits as keep every CTA of the grid resident
    at once (one CTA per multiprocessor: ~200 KB of stages), each streaming ≥ GEMM90_MIN_KTILES_PER_SPLIT k-tiles,
    the partials' traffic (written here, read back by the consumer: 8·splits·M·N bytes) at most half the weights'
    (2·N·K), and no split left empty; gate_up with ≥ GEMM90_FUSED_SILU_CTAS tiles stays whole (fused SiLU).

    >>> [gemm90_splits(64, 64, N, K, 132) for N, K in ((12288, 4096), (4096, 4096), (4096, 11008))]
    [2, 8, 8]
    >>> gemm90_splits(64, 64, 22016, 4096, 132, silu=True), gemm90_splits(64, 64, 6144, 2048, 132)
    (1, 4)
    """
    tiles = math.ceil(M / bm) * math.ceil(N / GEMM90_BN)
    ktiles = math.ceil(K / GEMM90_BK)
    if silu and tiles >= GEMM90_FUSED_SILU_CTAS:
        return 1
    splits = min(sm_count // tiles, ktiles // GEMM90_MIN_KTILES_PER_SPLIT, K // (8 * M), GEMM_MAX_SPLITS)
    if splits <= 1:
        return 1
    return math.ceil(ktiles / math.ceil(ktiles / splits))


def gemm_plan(M: int, N: int, K: int, sm_count: int, silu: bool = False, hopper: bool = False,
              int8: bool = False, skinny: bool = True, tma: bool = False) -> GemmPlan:
    """The projection kernel for C = A·Wᵀ, A [M, K], W [N, K] (silu: W = [gate; up], the SiLU·up product), one rule
    per regime, the same on every run; all but the skinny one chosen by the H200 measurements of
    benchmarks/bench_kernels.py (2026-12-02):

    - M = 1, or M = 2 with N ≥ 2K (qkv, gate_up), or int8 weights and M ≤ 4: the GEMV, which streams every weight
      byte once for all rows (int8: half the bytes; the GEMMs would first widen the matrix). Beyond that v1's split
      bm16 tile was faster (o_proj and down at M = 2: 4.6 against 5.7 µs; every shape at M = 4).
    - skinny (GEMM_SKINNY) on a hopper GPU and M in GEMM90_SKINNY_ROWS: gemm_sm90.cu's tile for M (bm64 up to 64
      rows) with gemm90_splits' grid split-K, when that makes ≥ GEMM90_SKINNY_MIN_CTAS CTAs: the weights streamed
      once by a grid of resident CTAs with 160 KB of copies in flight each. A model, not a measurement yet:
      skinny=False (OLMOSCOPE_GEMM_SKINNY=0) is the measured plan below.
    - hopper (an sm_90 GPU, GEMM_HOPPER on) and M ≥ GEMM90_MIN_ROWS and gemm90_useful_tiles ≥ GEMM90_MIN_USEFUL_TILES:
      gemm_sm90.cu, one split (7B gate_up at M = 64: 63.6 µs against v1's 76.7; every prefill shape but 1B o_proj at
      M = 512). Fewer tiles leave most multiprocessors idle (7B o_proj M = 128: 16 tiles, 53.1 against v1's 23.6).
    - M ≤ GEMM_V1_MAX_ROWS: gemm_v1.cu with its own tile and grid split-K (gemm_v1_plan; silu fused, one split):
      it beat the stream-K schedule at decode sizes (7B M = 64 o_proj 16.1 against 22.0, down 34.7 against 43.0).
    - otherwise gemm.cu's stream-K schedule with gemm_stream_tile's tile (prefill without enough wgmma tiles).

    tma (the TMA kernels available: sm_90 and GEMM_TMA): the wgmma regimes above run gemm_sm90_tma.cu's kernels
    (variant "tma", the same tiles and split counts) where gemm90_tma_wins says they measured faster: every bm128
    plan, and bm64 splits that stream enough k-tiles each.

    >>> gemm_plan(1, 4096, 4096, 132), gemm_plan(2, 4096, 4096, 132), gemm_plan(2, 12288, 4096, 132)
    (GemmPlan(variant='gemv', bm=0, splits=1), GemmPlan(variant='v1', bm=16, splits=8), GemmPlan(variant='gemv', bm=0, splits=1))
    >>> gemm_plan(64, 12288, 4096, 132, hopper=True, skinny=False), gemm_plan(64, 22016, 4096, 132, True, True, skinny=False)
    (GemmPlan(variant='v1', bm=64, splits=2), GemmPlan(variant='sm90', bm=128, splits=1))
    >>> gemm_plan(128, 4096, 4096, 132, hopper=True, skinny=False), gemm_plan(128, 12288, 4096, 132, hopper=True, skinny=False)
    (GemmPlan(variant='v1', bm=64, splits=4), GemmPlan(variant='sm90', bm=128, splits=1))
    >>> gemm_plan(8, 2048, 8192, 132), gemm_plan(512, 2048, 8192, 132, hopper=True)
    (GemmPlan(variant='v1', bm=16, splits=16), GemmPlan(variant='stream', bm=256, splits=1))
    >>> gemm_plan(64, 4096, 4096, 132, hopper=True), gemm_plan(128, 4096, 11008, 132, hopper=True)
    (GemmPlan(variant='sm90', bm=64, splits=8), GemmPlan(variant='sm90', bm=128, splits=8))
    >>> gemm_plan(64, 22016, 4096, 132, silu=True, hopper=True), gemm_plan(16, 4096, 4096, 132, hopper=True)
    (GemmPlan(variant='sm90', bm=64, splits=1), GemmPlan(variant='v1', bm=16, splits=8))
    >>> gemm_plan(64, 12288, 4096, 132, hopper=True, tma=True), gemm_plan(64, 4096, 4096, 132, hopper=True, tma=True)
    (GemmPlan(variant='tma', bm=64, splits=2), GemmPlan(variant='sm90', bm=64, splits=8))
    >>> gemm_plan(2048, 4096, 11008, 132, hopper=True, tma=True)
    GemmPlan(variant='tma', bm=128, splits=1)
    """
    if M == 1 or (M == 2 and N >= 2 * K) or (int8 and M <= GEMV_MAX_ROWS):
        return GemmPlan("gemv", 0, 1)
    if skinny and hopper and GEMM90_SKINNY_ROWS[0] <= M <= GEMM90_SKINNY_ROWS[1]:
        bm = gemm90_tile(M)
        splits = gemm90_splits(bm, M, N, K, sm_count, silu)
        if math.ceil(M / bm) * math.ceil(N / GEMM90_BN) * splits >= GEMM90_SKINNY_MIN_CTAS:
            kps = math.ceil(math.ceil(K / GEMM90_BK) / splits)
            return GemmPlan("tma" if tma and gemm90_tma_wins(bm, kps) else "sm90", bm, splits)
    if hopper and M >= GEMM90_MIN_ROWS and gemm90_useful_tiles(M, N) >= GEMM90_MIN_USEFUL_TILES:
        return GemmPlan("tma" if tma else "sm90", GEMM90_BM, 1)
    if M <= GEMM_V1_MAX_ROWS:
        return GemmPlan("v1", *gemm_v1_plan(M, N, K, sm_count, silu))
    return GemmPlan("stream", gemm_stream_tile(M, N, K, sm_count), 1)


GEMM90T_MIN_STREAM_KTILES = 20  # bm64: the TMA kernel from this many k-tiles per split (measured: ≤ 16 lose, ≥ 22 win)


def gemm90_tma_wins(bm: int, ktiles_per_split: int) -> bool:
    """Whether gemm_sm90_tma.cu's kernel beats gemm_sm90.cu's on the same plan (tile bm, k-tiles per split), as the
    H200 measured (bench_kernels.py, 2026-12-02): with bm128 always (7B prefill at 2048 rows 767–880 TFLOP/s against
    468–566; M = 128, 256: 7B o_proj 17.0 against 20.2 µs, gate_up 55.3 against 73.8); with bm64 when every split
    streams ≥ GEMM90T_MIN_STREAM_KTILES k-tiles (7B qkv M = 64, 32 k-tiles: 31.5 against 33.7 µs; down, 22: 29.3
    against 29.9), the cp.async kernel when the shares are short (7B o_proj M = 64, 8 k-tiles: 13.6 against 14.2;
    1B down, 16: 13.3 against 14.0): the TMA pipeline's fill by one thread costs more than it gains there.

    >>> gemm90_tma_wins(128, 4), gemm90_tma_wins(64, 32), gemm90_tma_wins(64, 8)
    (True, True, False)
    """
    return bm == GEMM90_BM or ktiles_per_split >= GEMM90T_MIN_STREAM_KTILES


def gemm_workspace(shapes, max_rows: int, sm_count: int, hopper: bool = False, int8: bool = False,
                   skinny: bool = True) -> int:
    """f32 elements the projection output (one [M, N] result, or a plan's split-K partials splits × [M, N]) needs for
    every row count 1 … max_rows and every projection (N, K, silu) in shapes, under gemm_plan: a silu projection
    needs room only when it is split (its fused output is bf16 elsewhere), the others always.

    >>> gemm_workspace([(4096, 4096, False)], 64, 132) == 8 * 64 * 4096  # v1's 8 splits at M = 64
    True
    """
    most = 0
    for M in range(1, max_rows + 1):
        for N, K, silu in shapes:
            plan = gemm_plan(M, N, K, sm_count, silu=silu, hopper=hopper, int8=int8, skinny=skinny)
            if not silu or plan.splits > 1:
                most = max(most, plan.splits * M * N)
    return most


def gemm_stream_plan(tiles: int, kt: int, ctas: int) -> tuple[int, int]:
    """(ctas, sk_tiles) of the stream-K schedule of gemm.cu for `tiles` output tiles of `kt` k-tiles each on at most
    `ctas` persistent CTAs (one per multiprocessor): whole waves of tiles stay whole; the rest, plus one wave when
    there is a whole one (so every CTA's chunk is at least a tile long and a cut tile has at most 2 or 3 parts), is
    cut into equal chunks of k-tiles. Fewer CTAs when there are fewer k-tiles than CTAs (no chunk is empty).

    >>> gemm_stream_plan(96, 32, 132), gemm_stream_plan(264, 32, 132), gemm_stream_plan(300, 64, 132)
    ((132, 96), (132, 0), (132, 168))
    """
    if tiles >= ctas:
        rem = tiles % ctas
        return ctas, 0 if rem == 0 else rem + ctas
    return min(ctas, tiles * kt), tiles


def gemm_stream_chunks(tiles: int, kt: int, ctas: int, sk_tiles: int) -> list[list[tuple[int, int, int]]]:
    """The work of each CTA of the stream-K schedule as gemm.cu runs it (tests and docs): per CTA b, its segments
    (tile, first k-tile, k-tiles) in order: its chunk [⌊b·I/ctas⌋, ⌊(b+1)·I/ctas⌋) of the I = sk_tiles·kt iterations
    g = tile·kt + k of the stream-K tiles, then the whole tiles sk_tiles + b, sk_tiles + b + ctas, …"""
    iters = sk_tiles * kt
    work = []
    for b in range(ctas):
        segments = []
        g, end = b * iters // ctas, (b + 1) * iters // ctas
        while g < end:
            tile, k = divmod(g, kt)
            count = min(kt - k, end - g)
            segments.append((tile, k, count))
            g += count
        segments += [(t, 0, kt) for t in range(sk_tiles + b, tiles, ctas)]
        work.append(segments)
    return work


def gemm_splits(bm: int, M: int, N: int, K: int, sm_count: int, tiles: dict | None = None) -> int:
    """The grid split-K count for a caller that wants K split into partial sums (gemm(..., splits=...)), and the
    plan of the v1 kernels (tiles=GEMM_V1_TILES): as many shares as fit one wave of CTAS_PER_SM CTAs per
    multiprocessor, each streaming ≥ GEMM_MIN_KTILES_PER_SPLIT k-tiles, the partials' traffic (written, then read back
    by the consumer: 8·splits·M·N bytes) at most the weights' (2·N·K), and no split left empty."""
    tile = (tiles or GEMM_TILES)[bm]
    ktiles = math.ceil(K / tile.bk)
    ctas = math.ceil(N / tile.bn) * math.ceil(M / bm)
    if ctas >= CTAS_PER_SM * sm_count:
        return 1
    splits = min(CTAS_PER_SM * sm_count // ctas, ktiles // GEMM_MIN_KTILES_PER_SPLIT, GEMM_MAX_SPLITS, K // (4 * M))
    if splits <= 1:
        return 1
    return math.ceil(ktiles / math.ceil(ktiles / splits))


def gemm_v1_plan(M: int, N: int, K: int, sm_count: int, silu: bool = False) -> tuple[int, int]:
    """(bm, splits) the previous GEMM (gemm_v1.cu) was run with: its tile for M and its grid split-K count."""
    bm = gemm_tile(M, GEMM_V1_TILES)
    return bm, 1 if silu else gemm_splits(bm, M, N, K, sm_count, GEMM_V1_TILES)


def gemm_ktiles_per_split(bm: int, K: int, splits: int, tiles: dict | None = None) -> int:
    """k-tiles of each split's share (the kernel's ktiles_per_split)."""
    return math.ceil(math.ceil(K / (tiles or GEMM_TILES)[bm].bk) / splits)


def kernel_smem(hopper: bool = False) -> dict[str, int]:
    """Dynamic shared memory of every kernel that takes some (the limit its launches raise), by kernel name; the
    Hopper GEMMs' (up to 201 KB, over sm_80's limit) and prefill attention's only with hopper."""
    smem = {}
    if hopper:
        for bm, tile in GEMM90_TILES.items():
            smem[f"gemm90_bf16_bm{bm}"] = smem[f"gemm90_bf16_silu_bm{bm}"] = tile.smem
        for d in HEAD_DIMS_SM90:
            smem[f"paged_prefill90_d{d}"] = prefill90_smem(d)
        for bm, tile in GEMM90T_TILES.items():
            smem[f"gemm90tma_bf16_bm{bm}"] = smem[f"gemm90tma_bf16_silu_bm{bm}"] = tile.smem
        for kind in ("q8", "q4"):
            smem[f"gemm90tma_{kind}"] = smem[f"gemm90tma_{kind}_silu"] = q8t_smem()
    for bm, tile in GEMM_TILES.items():
        smem[f"gemm_bf16_bm{bm}"] = smem[f"gemm_bf16_silu_bm{bm}"] = tile.smem
    for bm, tile in GEMM_V1_TILES.items():
        smem[f"gemm_v1_bf16_bm{bm}"] = smem[f"gemm_v1_bf16_silu_bm{bm}"] = tile.smem
    for d in HEAD_DIMS:
        for g in DECODE_GROUPS:
            smem[f"paged_decode_d{d}_g{g}"] = decode_smem(d)
    for silu in ("", "_silu"):
        for nt in Q4_NT:
            smem[f"q8_mma{silu}_n{nt}"] = q8_smem(nt)
    return smem


def norm_slices(rows: int, D: int, sm_count: int) -> int:
    """Blocks per row for the norms: a few rows (decode) spread over several multiprocessors, up to one slice per
    1024 elements, but never more blocks than multiprocessors: every block reads its whole row for the norm, so two
    blocks on one multiprocessor read the row's partials twice through the same port (7B at 64 rows of 8 o_proj
    partials, H200: 5.4 µs with 4 slices; 4.6 µs with 2 and the weights fetched early, one run each).

    >>> norm_slices(1, 4096, 132), norm_slices(64, 4096, 132), norm_slices(64, 2048, 132), norm_slices(512, 4096, 132)
    (4, 2, 2, 1)
    """
    most = math.ceil(D / 1024)
    return max(1, min(most, sm_count // rows))


def decode_group(H: int, Hkv: int) -> int:
    """paged_decode's group instantiation: H/Hkv rounded up to 1, 2, 4 or 8."""
    if Hkv < 1 or H % Hkv:
        raise DeviceError(f"attention: {H} query heads do not split into {Hkv} kv heads")
    for g in DECODE_GROUPS:
        if H // Hkv <= g:
            return g
    raise DeviceError(f"attention: {H // Hkv} query heads per kv head (at most {DECODE_GROUPS[-1]} are supported)")


def decode_splits(B: int, Hkv: int, sm_count: int, max_blocks: int) -> int:
    """Splits of each sequence's blocks for paged_decode: as many as fit one wave of CTAS_PER_SM CTAs (B·Hkv·splits)
    per multiprocessor, to fill the chip at small B, every warp of a split with at least one block (max_blocks: the most visible blocks of any sequence); 1 at large B.

    >>> decode_splits(1, 32, 132, 32), decode_splits(64, 32, 132, 32)
    (8, 1)
    """
    ctas = B * Hkv
    if ctas >= CTAS_PER_SM * sm_count:
        return 1
    return max(1, min(CTAS_PER_SM * sm_count // ctas, max_blocks // DECODE_WARPS, DECODE_MAX_SPLITS))


def prefill_tiles(first_row, rows, decode_seqs: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seq, tile_first_row) int32 for paged_prefill: the 64-row tiles of every sequence after the first
    decode_seqs, the longest sequences first and, within one, its last tile (the most keys) first.

    >>> prefill_tiles([0, 1], [1, 70], decode_seqs=1)
    (array([1, 1], dtype=int32), array([65,  1], dtype=int32))
    """
    first_row, rows = np.asarray(first_row, np.int64), np.asarray(rows, np.int64)
    order = sorted(range(decode_seqs, len(rows)), key=lambda s: (-int(rows[s]), s))
    seqs, starts = [], []
    for s in order:
        for i in reversed(range(math.ceil(int(rows[s]) / FA_QUERIES))):
            seqs.append(s)
            starts.append(int(first_row[s]) + i * FA_QUERIES)
    return np.asarray(seqs, np.int32), np.asarray(starts, np.int32)


def gemv_split(pairs: int, sm_count: int) -> int:
    """Warps per GEMV row pair (1, 2, 4 or 8): more when there are too few pairs to keep the chip streaming."""
    split = 1
    while split < GEMV_WARPS and pairs * split < sm_count * GEMV_WARPS_PER_SM:
        split *= 2
    return split


def q4_tiles(M: int) -> int:
    """The n8 token tiles of the int4 kernel for M rows: 1, 2, 4 or 8 (M ≤ 8, 16, 32, 64)."""
    for nt in Q4_NT:
        if M <= 8 * nt:
            return nt
    raise DeviceError(f"int4 mma: {M} rows (at most {Q4_MAX_ROWS}; more: dequantize_q4, then gemm)")


def q4_units(K: int, group: int, nt: int) -> int:
    """Work units of one 16-row tile along K, as gemm_quant.cu's int4 slices share them: whole steps of the unroll's
    chunks, then the leftover chunks in whole groups (the int8 kernels share single chunks)."""
    unroll = Q4_SMALL_UNROLL if nt <= 2 else Q4_MID_UNROLL if nt == 4 else Q4_WIDE_UNROLL
    per_group = max(1, group // Q4_CHUNK)
    chunks = K // Q4_CHUNK
    return chunks // unroll + (chunks % unroll) // per_group


# Warps of the int4/int8 kernels resident per multiprocessor, by NT (256-thread blocks; registers from ptxas -v on
# sm_90: about 100 for NT ≤ 2 → 2 blocks, 140 … 185 for NT 4, 8 → 1 block). Host-side: refresh when the kernels change.
Q4_RESIDENT_WARPS = {1: 16, 2: 16, 4: 8, 8: 8}
# The int8 kernels (sm_90): 72, 80, 80, 128 registers (the activations a stage ahead up to NT = 2; NT 4 and 8 held to
# 3 and 2 blocks by their launch bounds) and 68, 40, 48, 64 KB of dynamic shared memory (q8_smem): 3, 3, 3, 2 blocks.
# tests/test_cuda_quant_kernels.py checks this table against the loaded cubins' registers and shared memory.
Q8_RESIDENT_WARPS = {1: 24, 2: 24, 4: 24, 8: 16}


def q4_split(tiles: int, units: int, sm_count: int, resident_warps: int = 16) -> int:
    """Warps per 16-row tile (1, 2, 4, 8) for gemm_quant.cu: the most that keep every warp of the launch resident at
    once (a second, partial wave would stream its bytes with a fraction of the chip's loads in flight) while every
    slice still gets at least one unit of K.

    >>> q4_split(1376, 8, 132), q4_split(768, 8, 132), q4_split(128, 4, 132)
    (1, 2, 4)
    """
    split = 1
    while split < Q4_WARPS and tiles * split * 2 <= sm_count * resident_warps and units >= 2 * split:
        split *= 2
    return split


def q8_split(tiles: int, chunks: int, sm_count: int, resident_warps: int) -> int:
    """Warps per 16-row tile (1, 2, 4, 8) for the int8 kernels: the most whose blocks fit one resident wave, give or
    take a sixteenth of it, while every slice still gets four chunks. A second wave of a few blocks costs a block's
    whole time with the chip nearly idle (7B qkv at M = 1 on an H200: 768 blocks for 660 slots, 25.1 µs at split 8
    against 18.2 at 4), while gate_up's 688 blocks for 660 ran as fast as in one wave (32.1 µs; split 2: 37.7).

    >>> q8_split(768, 128, 132, 40), q8_split(1376, 128, 132, 40), q8_split(256, 344, 132, 40)
    (4, 4, 8)
    """
    slots = sm_count * (resident_warps // Q4_WARPS)
    split = 1
    while split < Q4_WARPS and math.ceil(tiles * 2 * split / Q4_WARPS) * 16 <= slots * 17 and chunks >= 4 * split:
        split *= 2
    return split


# ── shape checks ─────────────────────────────────────────────────────────────────────────────────────
def _expect(buffer: DeviceBuffer | None, what: str, dtype: str, shape: tuple[int, ...], min_rows: int | None = None):
    """Refuse a launch whose buffer has the wrong type or shape (min_rows: a matrix with at least that many rows)."""
    if buffer is None:
        raise DeviceError(f"{what}: buffer missing")
    if buffer.dtype != dtype:
        raise DeviceError(f"{what}: expected {dtype}, found {buffer.dtype}")
    if min_rows is not None:
        ok = tuple(buffer.shape[1:]) == tuple(shape[1:]) and buffer.shape[0] >= min_rows
    else:
        ok = tuple(buffer.shape) == tuple(shape)
    if not ok:
        raise DeviceError(f"{what}: expected shape {list(shape)}, found {list(buffer.shape)}")


def _expect_elements(buffer: DeviceBuffer | None, what: str, dtype: str, elements: int, last_dim: int | None = None):
    """Refuse a flat region (split-K partials) of the wrong type, last dimension, or fewer than `elements` elements."""
    if buffer is None:
        raise DeviceError(f"{what}: buffer missing")
    if buffer.dtype != dtype:
        raise DeviceError(f"{what}: expected {dtype}, found {buffer.dtype}")
    if last_dim is not None and buffer.shape[-1] != last_dim:
        raise DeviceError(f"{what}: expected rows of {last_dim}, found shape {list(buffer.shape)}")
    if math.prod(buffer.shape) < elements:
        raise DeviceError(f"{what}: {math.prod(buffer.shape)} elements, {elements} needed")


def _check_parts(what: str, parts: int, part_stride: int, used: int) -> None:
    if parts < 1:
        raise DeviceError(f"{what}: {parts} partial sums")
    if parts > 1 and (part_stride < used or part_stride % 4):
        raise DeviceError(f"{what}: part stride {part_stride} (rows need {used}, and a multiple of 4)")


def _check_count(what: str, count: int) -> None:
    if count < 1:
        raise DeviceError(f"{what}: nothing to launch ({count})")


def _ptr(buffer: DeviceBuffer | None) -> int:
    return 0 if buffer is None else buffer.ptr


class Kernels:
    """Every kernel, loaded for this GPU's architecture, with shape-checked launchers on one stream.

    >>> kernels = Kernels(cuda, cuda.Device(0), cuda.Stream()); kernels.gemv(w, None, x, y, 1)
    """

    def __init__(self, driver, device, stream):
        self.cuda = driver  # the pycuda.driver module
        self.stream = stream
        self.arch = arch_of(device.compute_capability())
        self.hopper = self.arch == "sm_90"  # gemm_sm90.cu runs here (built for sm_90a)
        self.programmatic = PDL and device.compute_capability() >= (9, 0)  # graphs' edges: see CudaGraph
        self.sm_count = device.get_attribute(driver.device_attribute.MULTIPROCESSOR_COUNT)
        sources = sorted({source for source, _ in SIGNATURES.values()})
        with ThreadPoolExecutor() as pool:  # nvcc runs, one per file, in parallel at first use
            cubins = dict(zip(sources, pool.map(
                lambda source: compile_kernel(source, build_arch(source, self.arch)), sources)))
        modules = {}
        for source, cubin in cubins.items():
            try:
                modules[source] = driver.module_from_file(str(cubin))
            except driver.Error as exc:
                raise DeviceError(f"cuda/{source}: cannot load the {self.arch} cubin ({exc})") from None
        self.functions = {}
        for name, (source, argtypes) in SIGNATURES.items():
            if "s" in argtypes:  # a struct by value (a TMA map): the driver places the parameters (DriverFunction)
                self.functions[name] = DriverFunction(cubins[source], name, argument_codes(argtypes))
                continue
            function = modules[source].get_function(name)
            function.prepare(argtypes)
            self.functions[name] = function
        self._modules = modules  # keep them loaded
        self._configure()

    def _configure(self) -> None:
        """Raise the dynamic shared memory limits, and make the stream-K GEMM's scratch: a ticket per CTA (zero
        between launches: each launch leaves them zero) and two partial-tile slots per CTA of the largest tile."""
        self.smem = kernel_smem(self.hopper)  # kernel name → dynamic shared memory bytes
        for name, nbytes in self.smem.items():
            self.functions[name].set_attribute(self.cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
        self.gemm_ctas = self.sm_count  # the persistent grid: one CTA per multiprocessor
        slot = max(tile.slot_floats for tile in GEMM_TILES.values())
        self._gemm_tickets = self.cuda.mem_alloc(4 * self.gemm_ctas)
        self.cuda.memset_d32(int(self._gemm_tickets), 0, self.gemm_ctas)
        self._gemm_slots = self.cuda.mem_alloc(4 * 2 * self.gemm_ctas * slot)
        self.tensor_maps = TensorMaps()  # gemm_sm90_tma.cu's maps, encoded once per (buffer, shape, box)

    def plan(self, M: int, N: int, K: int, silu: bool = False, int8: bool = False) -> GemmPlan:
        """gemm_plan for this GPU: the Hopper GEMM only on sm_90 with GEMM_HOPPER on, the skinny plan with GEMM_SKINNY."""
        hopper = self.hopper and GEMM_HOPPER
        return gemm_plan(M, N, K, self.sm_count, silu=silu, hopper=hopper, int8=int8, skinny=GEMM_SKINNY,
                         tma=hopper and GEMM_TMA)

    @property
    def quant_in_loop(self) -> bool:
        """Whether packed int8/int4 projections past 64 rows run gemm_q8_tma / gemm_q4_tma here (sm_90 with
        GEMM_HOPPER, GEMM_TMA and GEMM_QUANT_TMA on)."""
        return self.hopper and GEMM_HOPPER and GEMM_TMA and GEMM_QUANT_TMA

    def workspace(self, shapes, max_rows: int, int8: bool = False) -> int:
        """gemm_workspace under this GPU's plan (Kernels.plan): f32 elements of projection output or partials."""
        return gemm_workspace(shapes, max_rows, self.sm_count, hopper=self.hopper and GEMM_HOPPER, int8=int8,
                              skinny=GEMM_SKINNY)

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args, smem: int = 0) -> None:
        """One asynchronous launch; a refusal (bad configuration, earlier fault) becomes a DeviceError."""
        if min(grid) < 1:
            raise DeviceError(f"{name}: empty grid {grid}")
        if any(extent > 65535 for extent in grid[1:]):
            raise DeviceError(f"{name}: grid {grid} beyond 65535 in y or z")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        try:
            self.functions[name].prepared_async_call(grid, block, self.stream, *args, shared_size=smem)
        except self.cuda.Error as exc:
            raise DeviceError(f"CUDA error launching {name}: {exc}") from None

    # ── step input: token ids, seen sets, embedding ──────────────────────────────────────────────────────
    def prepare_tokens(self, ids: DeviceBuffer, last_sampled: DeviceBuffer, token_state: DeviceBuffer,
                       seen: DeviceBuffer, tokens: int) -> None:
        """ids [≥T] (negative: last_sampled[token_state[t]]), then marks each id in seen [states, words]."""
        _check_count("prepare_tokens", tokens)
        _expect(ids, "step token ids", "i32", (tokens,), min_rows=tokens)
        _expect(token_state, "token states", "i32", (tokens,), min_rows=tokens)
        _expect(last_sampled, "last sampled tokens", "i32", (seen.shape[0],))
        _expect(seen, "seen-token bitsets", "i32", (seen.shape[0], seen.shape[-1]))
        self.launch("prepare_tokens", (math.ceil(tokens / 256),), (256, 1, 1), ids.ptr, last_sampled.ptr,
                    token_state.ptr, seen.ptr, seen.shape[1], tokens)

    def mark_seen(self, ids: DeviceBuffer, states: DeviceBuffer, seen: DeviceBuffer, count: int) -> None:
        """Marks ids[i] [≥n] seen for states[i] [≥n] in seen [states, words] (history from the prefix cache)."""
        _check_count("mark_seen", count)
        _expect(ids, "seen ids", "i32", (count,), min_rows=count)
        _expect(states, "seen id states", "i32", (count,), min_rows=count)
        _expect(seen, "seen-token bitsets", "i32", (seen.shape[0], seen.shape[-1]))
        self.launch("mark_seen", (math.ceil(count / 256),), (256, 1, 1), ids.ptr, states.ptr, seen.ptr,
                    seen.shape[1], count)

    def embedding(self, table: DeviceBuffer, scales: DeviceBuffer | None, ids: DeviceBuffer, h: DeviceBuffer,
                  h_bf16: DeviceBuffer | None, tokens: int) -> None:
        """h[t] = table[ids[t]] (f32), and a bf16 copy when h_bf16 is given.  table [V, D], ids [≥T], h [≥T, D]."""
        V, D = table.shape
        _check_count("embedding", tokens)
        _expect(ids, "embedding ids", "i32", (tokens,), min_rows=tokens)
        _expect(h, "embedding output", "f32", (tokens, D), min_rows=tokens)
        if h_bf16 is not None:
            _expect(h_bf16, "embedding bf16 output", "bf16", (tokens, D), min_rows=tokens)
        if table.dtype == "i8":
            _expect(scales, "embedding scales", "f32", (V,))
            self.launch("embedding_gather_int8", (tokens,), (256, 1, 1), table.ptr, scales.ptr, ids.ptr, h.ptr,
                        _ptr(h_bf16), D, V)
        else:
            _expect(table, "embedding table", "bf16", (V, D))
            self.launch("embedding_gather_bf16", (tokens,), (256, 1, 1), table.ptr, ids.ptr, h.ptr, _ptr(h_bf16), D, V)

    # ── norms ──────────────────────────────────────────────────────────────────────────────────────────
    def _slices(self, rows: int, D: int) -> int:
        """Blocks per row for the norms (norm_slices on this GPU)."""
        return norm_slices(rows, D, self.sm_count)

    def residual_norm(self, h: DeviceBuffer, a: DeviceBuffer, parts: int, part_stride: int, weight: DeviceBuffer,
                      h_bf16: DeviceBuffer | None, rows: int, eps: float) -> None:
        """h [≥rows, D] += RMSNorm(Σ_p a[p]) · weight; a: parts × [rows, D] f32 at part_stride; h_bf16 gets the new h."""
        D = weight.shape[0]
        _check_count("residual norm", rows)
        if D % 4 or D > 4 * NORM_ITEMS * NORM_THREADS:
            raise DeviceError(f"residual norm: D = {D} (a multiple of 4, at most {4 * NORM_ITEMS * NORM_THREADS})")
        _check_parts("residual norm", parts, part_stride, rows * D)
        _expect(weight, "residual norm weight", "f32", (D,))
        _expect(h, "residual", "f32", (rows, D), min_rows=rows)
        _expect_elements(a, "residual update", "f32", (parts - 1) * part_stride + rows * D, last_dim=D)
        if h_bf16 is not None:
            _expect(h_bf16, "residual bf16 copy", "bf16", (rows, D), min_rows=rows)
        self.launch("residual_rmsnorm_add", (rows, self._slices(rows, D)), (NORM_THREADS, 1, 1), h.ptr, a.ptr, parts,
                    part_stride, weight.ptr, _ptr(h_bf16), D, eps)

    def rmsnorm_rows(self, x: DeviceBuffer, rows: DeviceBuffer, weight: DeviceBuffer, out: DeviceBuffer, count: int,
                     eps: float) -> None:
        """out[r] = bf16(RMSNorm(x[rows[r]])·weight) for r < count: x [T, D] f32, rows [≥count] i32, out [≥count, D]."""
        D = weight.shape[0]
        _check_count("rmsnorm rows", count)
        if D % 4:
            raise DeviceError(f"rmsnorm: D = {D} is not a multiple of 4")
        _expect(weight, "final norm weight", "f32", (D,))
        _expect(x, "rmsnorm input", "f32", (x.shape[0], D))
        _expect(rows, "rmsnorm row indices", "i32", (count,), min_rows=count)
        _expect(out, "rmsnorm output", "bf16", (count, D), min_rows=count)
        self.launch("rmsnorm_rows_bf16", (count, self._slices(count, D)), (NORM_THREADS, 1, 1), x.ptr, rows.ptr,
                    weight.ptr, out.ptr, D, eps)

    # ── QK-norm, RoPE, cache append ─────────────────────────────────────────────────────────────────────
    def qk_norm_rope_append(self, qkv: DeviceBuffer, parts: int, part_stride: int, q_norm: DeviceBuffer,
                            k_norm: DeviceBuffer, inv_freq: DeviceBuffer, q_out: DeviceBuffer, k_pool: DeviceBuffer,
                            v_pool: DeviceBuffer, positions: DeviceBuffer, slots: DeviceBuffer, tokens: int,
                            eps: float, per_head: bool | None = None) -> None:
        """QK-norm + RoPE of qkv (parts × [T, (H+2Hkv)·d] f32): q → q_out [≥T, H, d], k, v → pools [blocks, Hkv, 16, d]
        at slots[t] [≥T], rotated at positions[t] [≥T]. per_head: one block per (token, head); default for few rows."""
        _check_count("qk_norm_rope_append", tokens)
        num_blocks, Hkv, block, d = k_pool.shape
        if block != BLOCK_SIZE or d % 8:
            raise DeviceError(f"qk_norm_rope_append: KV pool {list(k_pool.shape)} (blocks of {BLOCK_SIZE}, d % 8 == 0)")
        H = q_norm.shape[0] // d
        if max(H, Hkv) * d > 8 * ROPE_ITEMS * ROPE_THREADS:
            raise DeviceError(f"qk_norm_rope_append: {max(H, Hkv)} heads of {d} (at most {8 * ROPE_ITEMS * ROPE_THREADS} "
                              "elements per vector)")
        width = (H + 2 * Hkv) * d
        _check_parts("qkv", parts, part_stride, tokens * width)
        _expect_elements(qkv, "qkv", "f32", (parts - 1) * part_stride + tokens * width, last_dim=width)
        _expect(q_norm, "q_norm", "f32", (H * d,))
        _expect(k_norm, "k_norm", "f32", (Hkv * d,))
        _expect(inv_freq, "inv_freq", "f32", (d // 2,))
        _expect(q_out, "rotated q", "bf16", (tokens, H, d), min_rows=tokens)
        _expect(k_pool, "k pool", "bf16", (num_blocks, Hkv, BLOCK_SIZE, d))
        _expect(v_pool, "v pool", "bf16", (num_blocks, Hkv, BLOCK_SIZE, d))
        _expect(positions, "positions", "i32", (tokens,), min_rows=tokens)
        _expect(slots, "cache slots", "i32", (tokens,), min_rows=tokens)
        if per_head is None:
            per_head = tokens <= ROPE_PER_HEAD_MAX_TOKENS
        args = (qkv.ptr, parts, part_stride, q_norm.ptr, k_norm.ptr, inv_freq.ptr, q_out.ptr, k_pool.ptr, v_pool.ptr,
                positions.ptr, slots.ptr, H, Hkv, d, eps)
        if per_head:
            self.launch("qk_norm_rope_append_heads", (tokens, H + Hkv), (ROPE_HEAD_THREADS, 1, 1), *args)
        else:
            self.launch("qk_norm_rope_append", (tokens, 2), (ROPE_THREADS, 1, 1), *args)

    # ── projections ───────────────────────────────────────────────────────────────────────────────────
    def gemv(self, weight: DeviceBuffer, scales: DeviceBuffer | None, x: DeviceBuffer, y: DeviceBuffer, rows: int,
             silu: bool = False, split: int | None = None, static_weights: bool = True) -> None:
        """y = x·Wᵀ for 1 … 4 rows: x [≥rows, K] bf16, W [N, K] bf16/int8; y [≥rows, N] f32, or silu: [≥rows, N/2] bf16.
        static_weights as gemm's."""
        N, K = weight.shape
        if not 1 <= rows <= GEMV_MAX_ROWS:
            raise DeviceError(f"gemv: {rows} rows (1 … {GEMV_MAX_ROWS}; more go to gemm)")
        if weight.dtype not in ("bf16", "i8"):
            raise DeviceError(f"gemv: weights must be bf16 or int8, found {weight.dtype}")
        step = 16 if weight.dtype == "i8" else 8
        if K % step:
            raise DeviceError(f"gemv: K = {K} is not a multiple of {step}")
        if silu and N % 2:
            raise DeviceError(f"gemv silu: N = {N} is not even ([gate; up])")
        if scales is not None:
            _expect(scales, "gemv scales", "f32", (N,))
        _expect(x, "gemv input", "bf16", (rows, K), min_rows=rows)
        if silu:
            _expect(y, "gemv silu output", "bf16", (rows, N // 2), min_rows=rows)
        else:
            _expect(y, "gemv output", "f32", (rows, N), min_rows=rows)
        pairs = N // 2 if silu else (N + 1) // 2
        split = split or gemv_split(pairs, self.sm_count)
        if split not in (1, 2, 4, 8):
            raise DeviceError(f"gemv: split {split} (1, 2, 4 or 8)")
        kind = "int8" if weight.dtype == "i8" else "bf16"
        name = f"gemv_{kind}{'_silu' if silu else ''}_m{rows}"
        self.launch(name, (math.ceil(pairs / (GEMV_WARPS // split)),), (32 * GEMV_WARPS, 1, 1), weight.ptr,
                    _ptr(scales), x.ptr, y.ptr, N, K, split, int(static_weights))

    def gemm(self, a: DeviceBuffer, weight: DeviceBuffer, scales: DeviceBuffer | None, c: DeviceBuffer, rows: int,
             silu: bool = False, splits: int = 1, bm: int | None = None, variant: str = "stream",
             ctas: int | None = None, static_weights: bool = True) -> None:
        """C = A·Wᵀ on the tensor cores, A [≥rows, K] bf16, W [N, K] bf16: C holds splits × [rows, N] f32 partials
        (part stride rows·N), or with silu C [≥rows, N/2] bf16 = SiLU(gate)·up. variant (gemm_plan chooses it for
        the runtime): "stream" (gemm.cu; bm default gemm_stream_tile's): splits = 1 runs the stream-K schedule on
        `ctas` persistent CTAs (default: one per multiprocessor), more splits the grid over K into partial sums;
        "v1": gemm_v1.cu's grid split-K kernels (bm default its gemm_tile); "sm90": the Hopper wgmma kernels
        (sm_90 GPUs; bm 64 or 128 rows × 256 columns, default gemm90_tile's; grid split-K as v1's); "tma": the same
        tiles fed by TMA copies through an mbarrier pipeline (gemm_sm90_tma.cu), persistent over the tiles.
        static_weights: no kernel writes W (the model's weights), so the v1, sm90 and tma kernels copy their first
        weight stages before their grid dependency wait, while the previous kernel of a programmatic graph drains;
        False for a scratch an earlier kernel filled (int8 widened, int4 dequantized), read only after the wait."""
        N, K = weight.shape
        _check_count("gemm", rows)
        if weight.dtype != "bf16":
            raise DeviceError(f"gemm: weights must be bf16 (widen int8 first), found {weight.dtype}")
        if K % 8:
            raise DeviceError(f"gemm: K = {K} is not a multiple of 8")
        if variant not in GEMM_VARIANTS:
            raise DeviceError(f"gemm: variant {variant!r} (one of {GEMM_VARIANTS})")
        if variant in ("sm90", "tma"):
            if not self.hopper:
                raise DeviceError(f"gemm: the {variant} (wgmma) kernels need an sm_90 GPU, this is {self.arch}")
            bm = bm or gemm90_tile(rows)
            if bm not in GEMM90_TILES:
                raise DeviceError(f"gemm {variant}: tile {bm} (one of {sorted(GEMM90_TILES)})")
        tiles_of = GEMM_V1_TILES if variant == "v1" else GEMM_TILES
        bm = bm or (gemm_tile(rows, GEMM_V1_TILES) if variant == "v1" else gemm_stream_tile(rows, N, K, self.sm_count))
        if variant not in ("sm90", "tma") and bm not in tiles_of:
            raise DeviceError(f"gemm: tile {bm} (one of {sorted(tiles_of)})")
        if (max(rows, N) + 256) * K >= 2**31:  # a tile's rows past the end are addressed too (and not read)
            raise DeviceError(f"gemm: {max(rows, N)} × {K} elements (the kernels index below 2^31)")
        if scales is not None:
            _expect(scales, "gemm scales", "f32", (N,))
        _expect(a, "gemm input", "bf16", (rows, K), min_rows=rows)
        if silu:
            if splits != 1 or N % 2:
                raise DeviceError(f"gemm silu: splits {splits}, N = {N} (one split, N even)")
            _expect(c, "gemm silu output", "bf16", (rows, N // 2), min_rows=rows)
        else:
            if not 1 <= splits <= 64:
                raise DeviceError(f"gemm: {splits} splits")
            _expect_elements(c, "gemm output" if splits == 1 else "gemm partials", "f32", splits * rows * N, last_dim=N)
        if variant == "tma":
            return self._gemm_tma(a, weight, scales, c, rows, silu, splits, bm, ctas, static_weights)
        if variant == "sm90":
            tile = GEMM90_TILES[bm]
            grid = (math.ceil(rows / bm) * math.ceil(N / GEMM90_BN), splits)
            if silu:
                self.launch(f"gemm90_bf16_silu_bm{bm}", grid[:1], (tile.threads, 1, 1), a.ptr, weight.ptr,
                            _ptr(scales), c.ptr, rows, N, K, int(static_weights), smem=tile.smem)
            else:
                self.launch(f"gemm90_bf16_bm{bm}", grid, (tile.threads, 1, 1), a.ptr, weight.ptr, _ptr(scales), c.ptr,
                            rows, N, K, math.ceil(math.ceil(K / GEMM90_BK) / splits), int(static_weights),
                            smem=tile.smem)
            return
        tile = tiles_of[bm]
        if variant == "v1":
            grid = (math.ceil(N / tile.bn), math.ceil(rows / bm))
            if silu:
                self.launch(f"gemm_v1_bf16_silu_bm{bm}", grid, (tile.threads, 1, 1), a.ptr, weight.ptr, _ptr(scales),
                            c.ptr, rows, N, K, int(static_weights), smem=tile.smem)
            else:
                self.launch(f"gemm_v1_bf16_bm{bm}", (*grid, splits), (tile.threads, 1, 1), a.ptr, weight.ptr,
                            _ptr(scales), c.ptr, rows, N, K, gemm_ktiles_per_split(bm, K, splits, GEMM_V1_TILES),
                            int(static_weights), smem=tile.smem)
            return
        tiles = math.ceil(rows / bm) * math.ceil(N / tile.bn)
        kt = math.ceil(K / tile.bk)
        if ctas is not None and not 1 <= ctas <= self.gemm_ctas:
            raise DeviceError(f"gemm: {ctas} CTAs (1 … {self.gemm_ctas})")
        if splits == 1:
            grid_x, sk_tiles = gemm_stream_plan(tiles, kt, ctas or self.gemm_ctas)
            kps = kt
        else:
            grid_x, sk_tiles, kps = tiles, 0, gemm_ktiles_per_split(bm, K, splits)
        scratch = (int(self._gemm_tickets), int(self._gemm_slots))
        if silu:
            self.launch(f"gemm_bf16_silu_bm{bm}", (grid_x,), (tile.threads, 1, 1), a.ptr, weight.ptr, _ptr(scales),
                        c.ptr, rows, N, K, sk_tiles, *scratch, smem=tile.smem)
        else:
            self.launch(f"gemm_bf16_bm{bm}", (grid_x, splits), (tile.threads, 1, 1), a.ptr, weight.ptr, _ptr(scales),
                        c.ptr, rows, N, K, kps, sk_tiles, *scratch, smem=tile.smem)

    def _gemm_tma(self, a: DeviceBuffer, weight: DeviceBuffer, scales: DeviceBuffer | None, c: DeviceBuffer,
                  rows: int, silu: bool, splits: int, bm: int, ctas: int | None, static_weights: bool) -> None:
        """gemm_sm90_tma.cu (shapes checked by gemm): A's map [rows, K] in boxes of bm rows; W's two maps (W itself
        twice in 128-row boxes, or its gate and up halves in 64-row boxes); a persistent grid of `ctas` CTAs (default
        one per multiprocessor), never more than the tiles × splits (a last round of at most half the grid runs as
        half tiles: gemm90t_schedule)."""
        N, K = weight.shape
        if ctas is not None and not 1 <= ctas <= self.sm_count:
            raise DeviceError(f"gemm tma: {ctas} CTAs (1 … {self.sm_count})")
        tile, maps = GEMM90T_TILES[bm], self.tensor_maps
        a_map = maps.bf16(a.ptr, rows, K, bm)
        if silu:
            half = N // 2
            w_maps = (maps.bf16(weight.ptr, half, K, GEMM90T_GATE_BOX),
                      maps.bf16(weight.ptr + half * K * 2, half, K, GEMM90T_GATE_BOX))
        else:
            w_maps = (maps.bf16(weight.ptr, N, K, GEMM90T_WBOX),) * 2
        units = math.ceil(rows / bm) * math.ceil(N / GEMM90T_BN) * splits
        grid = (min(units, ctas or self.sm_count),)
        if silu:
            self.launch(f"gemm90tma_bf16_silu_bm{bm}", grid, (tile.threads, 1, 1), a_map, *w_maps, _ptr(scales), c.ptr,
                        rows, N, K, int(static_weights), smem=tile.smem)
        else:
            kps = math.ceil(math.ceil(K / GEMM90T_BK) / splits)
            self.launch(f"gemm90tma_bf16_bm{bm}", grid, (tile.threads, 1, 1), a_map, *w_maps, _ptr(scales), c.ptr,
                        rows, N, K, kps, splits, int(static_weights), smem=tile.smem)

    def silu_mul_parts(self, parts_buffer: DeviceBuffer, parts: int, part_stride: int, out: DeviceBuffer,
                       rows: int) -> None:
        """out [≥rows, I] bf16 = SiLU(Σ gate)·Σ up from parts × [rows, 2I] f32 partials of [gate; up] at part_stride."""
        _check_count("silu_mul_parts", rows)
        I = out.shape[-1]
        if I % 4:
            raise DeviceError(f"silu_mul_parts: I = {I} is not a multiple of 4")
        _check_parts("silu_mul_parts", parts, part_stride, rows * 2 * I)
        _expect_elements(parts_buffer, "gate/up partials", "f32", (parts - 1) * part_stride + rows * 2 * I,
                         last_dim=2 * I)
        _expect(out, "silu output", "bf16", (rows, I), min_rows=rows)
        self.launch("silu_mul_parts", (math.ceil(rows * I / 1024),), (256, 1, 1), parts_buffer.ptr, parts, part_stride,
                    out.ptr, rows, I)

    def widen_int8(self, q: DeviceBuffer, out: DeviceBuffer) -> None:
        """out (bf16) = q (int8), elementwise and exact; out may be larger than q."""
        n = math.prod(q.shape)
        if q.dtype != "i8" or out.dtype != "bf16" or n % 16 or out.nbytes < 2 * n:
            raise DeviceError(f"widen_int8: {n} {q.dtype} elements into {out.nbytes} bytes of {out.dtype}")
        self.launch("widen_int8", (math.ceil(n / 4096),), (256, 1, 1), q.ptr, out.ptr, n)

    # ── int4 weights (gemm_quant.cu; device layout: quant_layout.pack_q4) ────────────────────────────────────
    def _q4_shapes(self, what: str, qweight: DeviceBuffer, scales: DeviceBuffer, zeros: DeviceBuffer | None,
                   N: int) -> tuple[int, int]:
        """(K, group) after checking an int4 matrix of N rows in the device layout: qweight u8 [Np, K/2],
        scales f16 [Np, K/G], zeros u8 [Np/2, K/G] or None (symmetric), Np = ⌈N/16⌉·16."""
        if len(qweight.shape) != 2 or len(scales.shape) != 2:
            raise DeviceError(f"{what}: qweight {list(qweight.shape)}, scales {list(scales.shape)} (matrices)")
        Np, K = qweight.shape[0], 2 * qweight.shape[1]
        if not 1 <= N or math.ceil(N / Q4_TILE_ROWS) * Q4_TILE_ROWS != Np:
            raise DeviceError(f"{what}: {N} rows in a device matrix of {Np} (⌈N/16⌉·16 expected)")
        groups = scales.shape[1]
        if groups < 1 or K % groups or K // groups not in Q4_GROUPS or K % Q4_CHUNK:
            raise DeviceError(f"{what}: K = {K} in {groups} groups (group size one of {Q4_GROUPS}, K % {Q4_CHUNK} == 0)")
        _expect(qweight, f"{what} qweight", "u8", (Np, K // 2))
        _expect(scales, f"{what} scales", "f16", (Np, groups))
        if zeros is not None:
            _expect(zeros, f"{what} zeros", "u8", (Np // 2, groups))
        return K, K // groups

    def gemm_q4(self, x: DeviceBuffer, qweight: DeviceBuffer, scales: DeviceBuffer, zeros: DeviceBuffer | None,
                y: DeviceBuffer, rows: int, N: int, silu: bool = False, split: int | None = None) -> None:
        """y = x·Wᵀ for 1 … 64 rows with W int4 in the device layout (pack_q4; silu: packed with pairs=True):
        x [≥rows, K] bf16; y [≥rows, N] f32, or silu [≥rows, N/2] bf16 = SiLU(gate)·up. split: warps per 16-row tile
        (default q4_split's). No workspace."""
        _check_count("gemm_q4", rows)
        K, group = self._q4_shapes("gemm_q4", qweight, scales, zeros, N)
        nt = q4_tiles(rows)
        _expect(x, "gemm_q4 input", "bf16", (rows, K), min_rows=rows)
        if silu:
            if N % (2 * 8):
                raise DeviceError(f"gemm_q4 silu: N = {N} is not 2·I with I a multiple of 8 (pairs layout)")
            _expect(y, "gemm_q4 silu output", "bf16", (rows, N // 2), min_rows=rows)
        else:
            _expect(y, "gemm_q4 output", "f32", (rows, N), min_rows=rows)
        tiles = qweight.shape[0] // Q4_TILE_ROWS
        split = split or q4_split(tiles, q4_units(K, group, nt), self.sm_count, Q4_RESIDENT_WARPS[nt])
        if split not in (1, 2, 4, 8):
            raise DeviceError(f"gemm_q4: split {split} (1, 2, 4 or 8)")
        name = f"q4_mma{'_silu' if silu else ''}_g{group}_n{nt}"
        self.launch(name, (math.ceil(tiles / (Q4_WARPS // split)),), (32 * Q4_WARPS, 1, 1), qweight.ptr, scales.ptr,
                    _ptr(zeros), x.ptr, y.ptr, rows, N, K, split)

    def gemv_q4(self, qweight: DeviceBuffer, scales: DeviceBuffer, zeros: DeviceBuffer | None, x: DeviceBuffer,
                y: DeviceBuffer, rows: int, N: int, silu: bool = False, split: int | None = None) -> None:
        """The int4 projection of 1 … 4 rows (decode), gemv's argument order: gemm_q4 with its smallest token tile."""
        if not 1 <= rows <= GEMV_MAX_ROWS:
            raise DeviceError(f"gemv_q4: {rows} rows (1 … {GEMV_MAX_ROWS}; more go to gemm_q4)")
        self.gemm_q4(x, qweight, scales, zeros, y, rows, N, silu=silu, split=split)

    def _q8_shapes(self, what: str, qweight: DeviceBuffer, scales: DeviceBuffer, N: int) -> tuple[int, int]:
        """(Np, K) after checking an int8 matrix of N rows in the device layout: qweight i8 [Np, K], scales f32 [Np],
        Np = ⌈N/16⌉·16, K % 32 == 0."""
        if len(qweight.shape) != 2:
            raise DeviceError(f"{what}: qweight {list(qweight.shape)} (a matrix)")
        Np, K = qweight.shape
        if not 1 <= N or math.ceil(N / Q4_TILE_ROWS) * Q4_TILE_ROWS != Np or K % Q8_CHUNK:
            raise DeviceError(f"{what}: {N} rows in a device matrix of {Np} × {K} (⌈N/16⌉·16, K % {Q8_CHUNK} == 0)")
        _expect(qweight, f"{what} qweight", "i8", (Np, K))
        _expect(scales, f"{what} scales", "f32", (Np,))
        return Np, K

    def gemm_q8(self, x: DeviceBuffer, qweight: DeviceBuffer, scales: DeviceBuffer, y: DeviceBuffer, rows: int,
                N: int, silu: bool = False, split: int | None = None) -> None:
        """y = x·Wᵀ for 1 … 64 rows with W int8 in the device layout (pack_q8; silu: pairs=True), row scales f32:
        qweight i8 [Np, K] (Np = ⌈N/16⌉·16, K % 32 == 0), scales f32 [Np]; x [≥rows, K] bf16; y [≥rows, N] f32, or
        silu [≥rows, N/2] bf16. No workspace."""
        _check_count("gemm_q8", rows)
        Np, K = self._q8_shapes("gemm_q8", qweight, scales, N)
        nt = q4_tiles(rows)
        _expect(x, "gemm_q8 input", "bf16", (rows, K), min_rows=rows)
        if silu:
            if N % 16:
                raise DeviceError(f"gemm_q8 silu: N = {N} is not 2·I with I a multiple of 8 (pairs layout)")
            _expect(y, "gemm_q8 silu output", "bf16", (rows, N // 2), min_rows=rows)
        else:
            _expect(y, "gemm_q8 output", "f32", (rows, N), min_rows=rows)
        tiles = Np // Q4_TILE_ROWS
        split = split or q8_split(tiles, K // Q8_CHUNK, self.sm_count, Q8_RESIDENT_WARPS[nt])
        if split not in (1, 2, 4, 8):
            raise DeviceError(f"gemm_q8: split {split} (1, 2, 4 or 8)")
        name = f"q8_mma{'_silu' if silu else ''}_n{nt}"
        self.launch(name, (math.ceil(tiles / (Q4_WARPS // split)),), (32 * Q4_WARPS, 1, 1), qweight.ptr, scales.ptr,
                    x.ptr, y.ptr, rows, N, K, split, smem=self.smem[name])

    def gemm_q8_tma(self, x: DeviceBuffer, qweight: DeviceBuffer, scales: DeviceBuffer, y: DeviceBuffer, rows: int,
                    N: int, silu: bool = False, splits: int = 1, pairs: bool = False, ctas: int | None = None) -> None:
        """y = x·Wᵀ with W int8 in the device layout (pack_q8) widened inside the Hopper TMA GEMM's main loop
        (gemm_sm90_tma.cu, sm_90): any number of rows (gemm_q8 is faster up to 64). qweight i8 [Np, K], scales f32
        [Np]; x [≥rows, K] bf16. Plain: y holds splits × [rows, N] f32 partials (part stride rows·N) with columns in
        the canonical row order (pairs: W was packed with pairs=True, the [gate; up] layout); silu (pairs packing,
        one split): y [≥rows, N/2] bf16 = SiLU(gate)·up. A persistent grid of `ctas` CTAs (default one per
        multiprocessor), never more than the work units."""
        _check_count("gemm_q8_tma", rows)
        Np, K = self._q8_shapes("gemm_q8_tma", qweight, scales, N)
        w_map = self.tensor_maps.bf16(qweight.ptr, Np * K // 128, 64, 8)  # 128-byte rows: a tile's k-tile is 8
        self._quant_tma("q8", (scales.ptr,), w_map, x, y, rows, N, K, silu, splits, pairs, ctas)

    def gemm_q4_tma(self, x: DeviceBuffer, qweight: DeviceBuffer, scales: DeviceBuffer, zeros: DeviceBuffer | None,
                    y: DeviceBuffer, rows: int, N: int, silu: bool = False, splits: int = 1, pairs: bool = False,
                    ctas: int | None = None) -> None:
        """gemm_q8_tma for W int4 in the device layout (pack_q4: qweight u8 [Np, K/2], scales f16 [Np, K/G], zeros
        u8 [Np/2, K/G] or None), dequantized in the main loop to bf16((q − z)·s), dequantize_q4's weights."""
        _check_count("gemm_q4_tma", rows)
        K, group = self._q4_shapes("gemm_q4_tma", qweight, scales, zeros, N)
        Np = qweight.shape[0]
        w_map = self.tensor_maps.bf16(qweight.ptr, Np * K // 256, 64, 4)  # 128-byte rows: a tile's k-tile is 4
        self._quant_tma("q4", (scales.ptr, _ptr(zeros)), w_map, x, y, rows, N, K, silu, splits, pairs, ctas,
                        log2g=group.bit_length() - 1)

    def _quant_tma(self, kind: str, weight_args: tuple, w_map: bytes, x: DeviceBuffer, y: DeviceBuffer, rows: int,
                   N: int, K: int, silu: bool, splits: int, pairs: bool, ctas: int | None, log2g: int | None = None):
        """The launch of gemm_sm90_tma.cu's int8/int4 kernels after their weights were checked: x, y, splits, CTAs."""
        what = f"gemm_{kind}_tma"
        if not self.hopper:
            raise DeviceError(f"{what}: the wgmma kernels need an sm_90 GPU, this is {self.arch}")
        if (silu or pairs) and N % 16:
            raise DeviceError(f"{what}: N = {N} is not 2·I with I a multiple of 8 (pairs layout)")
        _expect(x, f"{what} input", "bf16", (rows, K), min_rows=rows)
        ktiles = math.ceil(K / GEMM90T_BK)
        if silu:
            if splits != 1:
                raise DeviceError(f"{what} silu: {splits} splits (one)")
            _expect(y, f"{what} silu output", "bf16", (rows, N // 2), min_rows=rows)
        else:
            if not 1 <= splits <= min(ktiles, 64):
                raise DeviceError(f"{what}: {splits} splits (1 … {min(ktiles, 64)})")
            _expect_elements(y, f"{what} output", "f32", splits * rows * N, last_dim=N)
        if ctas is not None and not 1 <= ctas <= self.sm_count:
            raise DeviceError(f"{what}: {ctas} CTAs (1 … {self.sm_count})")
        x_map = self.tensor_maps.bf16(x.ptr, rows, K, Q8T_TOKENS)
        Np = math.ceil(N / Q4_TILE_ROWS) * Q4_TILE_ROWS
        units = math.ceil(rows / Q8T_TOKENS) * math.ceil(Np / Q8T_ROWS) * splits
        grid, block = (min(units, ctas or self.sm_count),), (128 * (1 + Q8T_ROWS // 64), 1, 1)
        group = () if log2g is None else (log2g,)
        name = f"gemm90tma_{kind}{'_silu' if silu else ''}"
        if silu:
            self.launch(name, grid, block, x_map, w_map, *weight_args, y.ptr, rows, N, K, *group, smem=self.smem[name])
        else:
            self.launch(name, grid, block, x_map, w_map, *weight_args, y.ptr, rows, N, K, *group,
                        math.ceil(ktiles / splits), splits, int(pairs), smem=self.smem[name])

    def dequantize_q8(self, qweight: DeviceBuffer, scales: DeviceBuffer, out: DeviceBuffer, out_scales: DeviceBuffer,
                      N: int, pairs: bool = False) -> None:
        """out [N, K] bf16 = q (exact) and out_scales [N] f32 = the row scales, both in the canonical row order
        ([gate; up] for a pairs-packed matrix), from pack_q8's layout: gemm(x, out, out_scales, …) at M > 64 rows;
        out and out_scales may be larger (a per-layer scratch)."""
        if len(qweight.shape) != 2:
            raise DeviceError(f"dequantize_q8: qweight {list(qweight.shape)} (a matrix)")
        Np, K = qweight.shape
        if not 1 <= N or math.ceil(N / Q4_TILE_ROWS) * Q4_TILE_ROWS != Np or K % Q8_CHUNK or (pairs and N % 16):
            raise DeviceError(f"dequantize_q8: {N} rows in a device matrix of {Np} × {K}")
        _expect(qweight, "dequantize_q8 qweight", "i8", (Np, K))
        _expect(scales, "dequantize_q8 scales", "f32", (Np,))
        if out.dtype != "bf16" or len(out.shape) != 2 or out.shape[1] != K or out.shape[0] < N:
            raise DeviceError(f"dequantize_q8: output {out.dtype} {list(out.shape)}, expected bf16 [≥{N}, {K}]")
        if out_scales.dtype != "f32" or math.prod(out_scales.shape) < N:
            raise DeviceError(f"dequantize_q8: output scales {out_scales.dtype} {list(out_scales.shape)} (f32, ≥ {N})")
        units = Np // Q4_TILE_ROWS * (K // Q8_CHUNK)
        self.launch("dequantize_q8", (math.ceil(units / Q4_WARPS),), (32 * Q4_WARPS, 1, 1), qweight.ptr, scales.ptr,
                    out.ptr, out_scales.ptr, N, K, int(pairs))

    def dequantize_q4(self, qweight: DeviceBuffer, scales: DeviceBuffer, zeros: DeviceBuffer | None,
                      out: DeviceBuffer, N: int, pairs: bool = False) -> None:
        """out [N, K] bf16 = bf16((q − z)·s) in the canonical row order ([gate; up] for a pairs-packed matrix), for
        gemm at more than 64 rows; out may have more rows (a per-layer scratch of the largest matrix)."""
        K, group = self._q4_shapes("dequantize_q4", qweight, scales, zeros, N)
        if pairs and N % 16:
            raise DeviceError(f"dequantize_q4: pairs layout with N = {N} (2·I, I a multiple of 8)")
        if out.dtype != "bf16" or len(out.shape) != 2 or out.shape[1] != K or out.shape[0] < N:
            raise DeviceError(f"dequantize_q4: output {out.dtype} {list(out.shape)}, expected bf16 [≥{N}, {K}]")
        units = qweight.shape[0] // Q4_TILE_ROWS * (K // Q4_CHUNK)
        self.launch("dequantize_q4", (math.ceil(units / Q4_WARPS),), (32 * Q4_WARPS, 1, 1), qweight.ptr, scales.ptr,
                    _ptr(zeros), out.ptr, N, K, group, int(pairs))

    # ── attention ─────────────────────────────────────────────────────────────────────────────────────────
    def _attention_shapes(self, what: str, q: DeviceBuffer, k_pool: DeviceBuffer, v_pool: DeviceBuffer,
                          out: DeviceBuffer, context_len: DeviceBuffer, block_tables: DeviceBuffer,
                          seqs: int) -> tuple[int, int, int, int]:
        """(H, Hkv, d, table_width) after checking the buffers every attention launch shares."""
        num_blocks, Hkv, block, d = k_pool.shape
        if block != BLOCK_SIZE or d not in HEAD_DIMS:
            raise DeviceError(f"{what}: KV pool {list(k_pool.shape)} (blocks of {BLOCK_SIZE}, d in {HEAD_DIMS})")
        if len(q.shape) != 3 or q.shape[2] != d:
            raise DeviceError(f"{what}: q {list(q.shape)}, expected [T, H, {d}]")
        H = q.shape[1]
        decode_group(H, Hkv)
        _expect(q, f"{what} q", "bf16", q.shape)
        _expect(k_pool, f"{what} k pool", "bf16", (num_blocks, Hkv, BLOCK_SIZE, d))
        _expect(v_pool, f"{what} v pool", "bf16", (num_blocks, Hkv, BLOCK_SIZE, d))
        _expect(out, f"{what} output", "bf16", (q.shape[0], H * d), min_rows=q.shape[0])
        _expect(context_len, f"{what} context lengths", "i32", (seqs,), min_rows=seqs)
        if len(block_tables.shape) != 2:
            raise DeviceError(f"{what}: block tables {list(block_tables.shape)}, expected [B, table_width]")
        _expect(block_tables, f"{what} block tables", "i32", (seqs, block_tables.shape[1]), min_rows=seqs)
        return H, Hkv, d, block_tables.shape[1]

    def paged_prefill(self, q: DeviceBuffer, k_pool: DeviceBuffer, v_pool: DeviceBuffer, out: DeviceBuffer,
                      tile_seq: DeviceBuffer, tile_first_row: DeviceBuffer, first_row: DeviceBuffer,
                      rows: DeviceBuffer, context_len: DeviceBuffer, block_tables: DeviceBuffer, n_tiles: int,
                      window: int = 0, variant: str | None = None) -> None:
        """Causal attention of the prefill rows of q [T, H, d] over the paged cache → out [≥T, H·d] bf16; tiles from
        prefill_tiles (tile_seq, tile_first_row [≥n_tiles]); per-sequence arrays [B], block_tables [B, width].
        variant: "sm90" (attention_sm90.cu, wgmma: sm_90 GPUs, d = 64 or 128), "mma" (attention.cu), or None for
        prefill_kernel's choice (sm90 where it runs, unless ATTENTION_HOPPER is off)."""
        _check_count("paged_prefill", n_tiles)
        seqs = first_row.shape[0]
        H, Hkv, d, width = self._attention_shapes("paged_prefill", q, k_pool, v_pool, out, context_len,
                                                  block_tables, seqs)
        _expect(first_row, "first rows", "i32", (seqs,))
        _expect(rows, "rows per sequence", "i32", (seqs,), min_rows=seqs)
        _expect(tile_seq, "tile sequences", "i32", (n_tiles,), min_rows=n_tiles)
        _expect(tile_first_row, "tile first rows", "i32", (n_tiles,), min_rows=n_tiles)
        if window < 0:
            raise DeviceError(f"paged_prefill: window {window}")
        if variant is None:
            name = prefill_kernel(d, self.hopper and ATTENTION_HOPPER)
        elif variant == "sm90":
            if not self.hopper or d not in HEAD_DIMS_SM90:
                raise DeviceError(f"paged_prefill: the sm90 (wgmma) kernel needs an sm_90 GPU and d in {HEAD_DIMS_SM90}"
                                  f" (this is {self.arch}, d = {d})")
            name = prefill_kernel(d, True)
        elif variant == "mma":
            name = prefill_kernel(d, False)
        else:
            raise DeviceError(f"paged_prefill: variant {variant!r} (sm90, mma or None)")
        args = (q.ptr, k_pool.ptr, v_pool.ptr, out.ptr, tile_seq.ptr, tile_first_row.ptr, first_row.ptr, rows.ptr,
                context_len.ptr, block_tables.ptr, width, H, Hkv, window)
        if name.startswith("paged_prefill90"):  # a CTA per pair of tiles
            self.launch(name, (-(-n_tiles // 2), H), (FA90_THREADS, 1, 1), *args, n_tiles, smem=self.smem[name])
        else:
            self.launch(name, (n_tiles, H), (FA_THREADS, 1, 1), *args)

    def paged_decode(self, q: DeviceBuffer, k_pool: DeviceBuffer, v_pool: DeviceBuffer, out: DeviceBuffer,
                     part_o: DeviceBuffer | None, part_ml: DeviceBuffer | None, counters: DeviceBuffer | None,
                     context_len: DeviceBuffer, block_tables: DeviceBuffer, seqs: int, splits: int = 1,
                     window: int = 0) -> None:
        """Flash-decoding of the seqs decode rows of q [≥B, H, d] → out rows 0 … B−1 [T, H·d] bf16; with splits > 1,
        part_o [≥B, H, splits, d], part_ml [≥B, H, splits, 2] f32 and counters [≥B·Hkv] i32 (zero; left zero)."""
        _check_count("paged_decode", seqs)
        H, Hkv, d, width = self._attention_shapes("paged_decode", q, k_pool, v_pool, out, context_len, block_tables,
                                                  seqs)
        if q.shape[0] < seqs:
            raise DeviceError(f"paged_decode: q has {q.shape[0]} rows for {seqs} decode sequences")
        if not 1 <= splits <= 65535 or window < 0:
            raise DeviceError(f"paged_decode: splits {splits}, window {window}")
        if splits > 1:
            _expect(part_o, "decode partials", "f32", (seqs, H, splits, d), min_rows=seqs)
            _expect(part_ml, "decode partial max/sum", "f32", (seqs, H, splits, 2), min_rows=seqs)
            _expect(counters, "decode merge counters", "i32", (seqs * Hkv,), min_rows=seqs * Hkv)
        name = f"paged_decode_d{d}_g{decode_group(H, Hkv)}"
        self.launch(name, (seqs, Hkv, splits), (DECODE_THREADS, 1, 1), q.ptr, k_pool.ptr, v_pool.ptr, out.ptr,
                    _ptr(part_o), _ptr(part_ml), _ptr(counters), context_len.ptr, block_tables.ptr, width, H, Hkv,
                    splits, window, smem=self.smem[name])

    def copy_blocks(self, pool: DeviceBuffer, pairs: DeviceBuffer, n_pairs: int) -> None:
        """Copy-on-write: block pairs[i][0] → pairs[i][1] ([≥n_pairs, 2] i32) in every plane of pool [L, 2, blocks, Hkv, 16, d]."""
        _check_count("copy_blocks", n_pairs)
        if len(pool.shape) != 6 or pool.shape[1] != 2 or pool.shape[4] != BLOCK_SIZE:
            raise DeviceError(f"copy_blocks: pool {list(pool.shape)}, expected [L, 2, blocks, Hkv, {BLOCK_SIZE}, d]")
        _expect(pool, "KV pool", "bf16", pool.shape)
        _expect(pairs, "block pairs", "i32", (n_pairs, 2), min_rows=n_pairs)
        L, _, num_blocks, Hkv, _, d = pool.shape
        block_elems = Hkv * BLOCK_SIZE * d
        if block_elems % 8:
            raise DeviceError(f"copy_blocks: {block_elems} elements per block (a multiple of 8)")
        self.launch("copy_blocks", (n_pairs, 2 * L), (COPY_THREADS, 1, 1), pool.ptr, pairs.ptr, n_pairs,
                    num_blocks * block_elems, 2 * L, block_elems)

    # ── sampling ──────────────────────────────────────────────────────────────────────────────────────
    def penalize_rows(self, logits: DeviceBuffer, penalty: DeviceBuffer, presence: DeviceBuffer,
                      frequency: DeviceBuffer, row_state: DeviceBuffer, seen: DeviceBuffer, counts: DeviceBuffer,
                      rows: int) -> None:
        """logits [≥R, V] in place: per row, the repetition penalty on its state's seen ids, then presence and
        frequency penalties from its generated-token counts [states, V] (each [≥R]; 1, 0, 0 = off)."""
        _check_count("penalize_rows", rows)
        V = logits.shape[-1]
        _expect(logits, "logits", "f32", (rows, V), min_rows=rows)
        for buffer, what in ((penalty, "penalties"), (presence, "presence penalties"), (frequency, "frequency penalties")):
            _expect(buffer, what, "f32", (rows,), min_rows=rows)
        _expect(row_state, "row states", "i32", (rows,), min_rows=rows)
        _expect(seen, "seen-token bitsets", "i32", (seen.shape[0], seen.shape[-1]))
        _expect(counts, "generated-token counts", "i32", (seen.shape[0], V))
        words = seen.shape[1]
        self.launch("penalize_rows", (rows, math.ceil(words / 256)), (256, 1, 1), logits.ptr, V, penalty.ptr,
                    presence.ptr, frequency.ptr, row_state.ptr, seen.ptr, words, counts.ptr)

    def count_tokens(self, ids: DeviceBuffer, states: DeviceBuffer, counts: DeviceBuffer, count: int) -> None:
        """counts[states[i], ids[i]] += 1 for i < count (generated tokens returning as history)."""
        _check_count("count_tokens", count)
        _expect(ids, "counted ids", "i32", (count,), min_rows=count)
        _expect(states, "counted id states", "i32", (count,), min_rows=count)
        self.launch("count_tokens", (math.ceil(count / 256),), (256, 1, 1), ids.ptr, states.ptr, counts.ptr,
                    counts.shape[-1], count)

    def row_logprobs(self, logits: DeviceBuffer, vocab_limit: int, tokens: DeviceBuffer, k: int,
                     logprob: DeviceBuffer, top_ids: DeviceBuffer | None, top_logprobs: DeviceBuffer | None,
                     rows: int) -> None:
        """Log-softmax over the real vocabulary of raw logits [≥R, V]: logprob [≥R] of tokens [≥R], and the k best
        (top_ids i32, top_logprobs f32 [≥R, TOP_LOGPROBS]; None when k = 0). Prompt scoring calls it with
        vocab_limit = V and each row's target as its token."""
        _check_count("row_logprobs", rows)
        V = logits.shape[-1]
        if not 0 <= k <= TOP_LOGPROBS or not 1 <= vocab_limit <= V:
            raise DeviceError(f"row_logprobs: k {k} (at most {TOP_LOGPROBS}), vocabulary {vocab_limit} of {V}")
        _expect(logits, "raw logits", "f32", (rows, V), min_rows=rows)
        _expect(tokens, "sampled tokens", "i32", (rows,), min_rows=rows)
        _expect(logprob, "logprobs", "f32", (rows,), min_rows=rows)
        if k or top_ids is not None or top_logprobs is not None:
            _expect(top_ids, "top ids", "i32", (rows, TOP_LOGPROBS), min_rows=rows)
            _expect(top_logprobs, "top logprobs", "f32", (rows, TOP_LOGPROBS), min_rows=rows)
        self.launch("row_logprobs", (rows,), (SAMPLE_THREADS, 1, 1), logits.ptr, V, vocab_limit, tokens.ptr, k,
                    logprob.ptr, _ptr(top_ids), _ptr(top_logprobs))

    def sample_rows(self, logits: DeviceBuffer, vocab_limit: int, temperature: DeviceBuffer, top_k: DeviceBuffer,
                    top_p: DeviceBuffer, u: DeviceBuffer, row_state: DeviceBuffer, tokens_out: DeviceBuffer,
                    last_sampled: DeviceBuffer, counts: DeviceBuffer, rows: int) -> None:
        """tokens_out[r] and last_sampled[row_state[r]] = row r's next token of logits [≥R, V], by sampler.py's rules,
        each row with its own temperature, top_k, top_p and uniform u ([≥R] each); the token's count in
        counts [states, V] goes up by one. A row that cannot be sampled gets SAMPLE_NAN or SAMPLE_NO_MASS."""
        _check_count("sample_rows", rows)
        V = logits.shape[-1]
        if not 1 <= vocab_limit <= V:
            raise DeviceError(f"sample_rows: vocabulary of {vocab_limit} in logits rows of {V}")
        _expect(logits, "logits", "f32", (rows, V), min_rows=rows)
        for buffer, what, dtype in ((temperature, "temperatures", "f32"), (top_k, "top-k", "i32"),
                                    (top_p, "top-p", "f32"), (u, "uniforms", "f32"), (row_state, "row states", "i32"),
                                    (tokens_out, "sampled tokens", "i32")):
            _expect(buffer, what, dtype, (rows,), min_rows=rows)
        _expect(last_sampled, "last sampled tokens", "i32", last_sampled.shape[:1])
        _expect(counts, "generated-token counts", "i32", (last_sampled.shape[0], V))
        self.launch("sample_rows", (rows,), (SAMPLE_THREADS, 1, 1), logits.ptr, V, vocab_limit, temperature.ptr,
                    top_k.ptr, top_p.ptr, u.ptr, row_state.ptr, tokens_out.ptr, last_sampled.ptr, counts.ptr)


__all__ = ["BLOCK_SIZE", "GEMV_MAX_ROWS", "HEAD_DIMS", "DECODE_GROUPS", "GEMM_TILES", "GEMM_V1_TILES", "GEMM_VARIANTS",
           "GEMM_HOPPER", "ATTENTION_HOPPER", "GEMM_TMA", "GEMM90_TILES", "GEMM90T_TILES", "GEMM90T_MIN_STREAM_KTILES",
           "SIGNATURES", "argument_codes", "gemm90_tma_wins", "MIRRORED", "DeviceBuffer", "ITEMSIZE", "Kernels",
           "decode_group",
           "decode_smem", "decode_splits", "norm_slices", "gemm_cost", "gemm_plan", "GemmPlan", "gemm_stream_tile", "gemm_workspace", "gemm_splits", "gemm_stream_chunks",
           "gemm_stream_plan", "gemm_tile", "gemm90_tile", "gemm90_splits", "GEMM_SKINNY", "gemm_ktiles_per_split", "gemm_v1_plan", "gemv_split", "kernel_smem",
           "prefill_kernel", "prefill90_smem", "prefill_tiles", "q4_split", "q4_tiles", "q4_units", "q8_split"]
