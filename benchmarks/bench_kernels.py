"""Kernel micro-benchmark at OLMo-2-1B and 7B shapes: each kernel alone, timed with CUDA events over CUDA-graph
replays (no host launch cost), inputs rotated over enough copies that together they are larger than the L2
cache (so weights come from DRAM, as in a real step), median of several replays.

- projections (qkv N = 3·H·d, o_proj, gate_up with SiLU, down_proj): GEMV at M = 1 … 4 against the tensor-core
  GEMM at M = 1, 2, 3, 4, 8, 16, 32, 64, 128, 256: gemm.cu's stream-K kernels with each tile bm16/32/64/128/256 up to
  twice the rows, the planned tile also with grid split-K (column "split": gemm_splits' count, partials summed by
  the consumer, SiLU through silu_mul_parts), on sm_90 the wgmma kernel (gemm_sm90.cu) as first measured from M = 64
  (column "sm90": bm128, one split) and from M = 8 with grid split-K (column "sm90k": bm64 up to 64 rows, else
  bm128, gemm90_splits' count; "sm90k alt": two waves' worth of splits), the same three on gemm_sm90_tma.cu (TMA
  copies by a producer warp into an mbarrier ring, persistent CTAs: "tma", "tmak", "tmak alt"), and gemm_v1.cu
  with its own tile and split count (column "v1"); µs, % of the measured device copy bandwidth (read + write) for the
  bytes a projection must move (weights + x + y); * marks what Kernels.plan (gemm_plan) chooses
  (OLMOSCOPE_GEMM_SKINNY=0: the measured plan);
- prefill projections at M = 512 and 2048: gemm.cu bm256 and bm128 (stream-K) against gemm_v1.cu bm128 and,
  on sm_90, gemm_sm90.cu (wgmma) and gemm_sm90_tma.cu (TMA + wgmma), TFLOP/s;
- paged decode attention at B = 1, 8, 16, 32, 64, 128 with contexts uniform in [128, 512]: µs and KV GB/s;
- paged prefill of 2048 tokens (one prompt, and 4 × 512): µs and TFLOP/s (causal: the visible keys only) of
  attention.cu's mma.sync kernel and, on sm_90, attention_sm90.cu's wgmma kernel (* = what Kernels.paged_prefill runs);
- QK-norm + RoPE + append, both variants, at T = 1 … 256; sampling rows (greedy, top-k/top-p) at R = 1, 8, 64;
- on sm_90, int8 and int4 (g128 asym) projections at M = 128 … 2048: bf16, dequantize_q8/q4 + the bf16 GEMM (the
  old path), and the wgmma kernels that dequantize in their main loop (gemm_sm90_tma.cu gemm90tma_q8, _q4);
- quantized projections (gemm_quant.cu) at M = 1, 2, 4, 8, 16, 32, 64 next to bf16 (gemv / planned gemm): int4
  (group 128 symmetric and asymmetric, group 32 asymmetric), int8 on the tensor cores (q8) and the int8 GEMV (M ≤ 4);
  µs and % of copy bandwidth of the bytes each must move (weights + scales + zeros + x + y), and the speed-up of
  int4 g128 over bf16.

    python3 benchmarks/bench_kernels.py [--models 1b,7b] [--out DIR] [--quick] [--gemm-only | --quant-only |
                                        --attention-only | --small-only | --quant-prefill-only |
                                        --prefill-gemm-only] [--random]

Prints one compact table; with --out writes DIR/bench_kernels.json. Finishes in a few minutes on an H200 (--gemm-only: the GEMM tables alone;
--quant-only: the quantized projections alone, about a minute; --attention-only: the paged prefill alone; --small-only:
paged decode and QK-norm + RoPE alone; --prefill-gemm-only: the bf16 prefill GEMMs at M = 512 and 2048 alone).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pycuda.driver as cuda
from tabulate import tabulate

from olmoscope.runtime.cuda import kernels as K
from olmoscope.runtime.cuda.driver import CudaGraph, DeviceBuffer

MODELS = {  # D, H, Hkv, d, I (docs: OLMO2.md); "tiny" is a smoke run of the script itself
    "1b": dict(D=2048, H=16, Hkv=16, d=128, I=8192),
    "7b": dict(D=4096, H=32, Hkv=32, d=128, I=11008),
    "tiny": dict(D=256, H=4, Hkv=2, d=64, I=512),
}
GEMM_ROWS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256)
PREFILL_GEMM_ROWS = (512, 2048)
PREFILL_VARIANTS = (("stream", 256), ("stream", 128), ("v1", 128))  # (Kernels.gemm variant, bm)
DECODE_BATCHES = (1, 8, 16, 32, 64, 128)
ROPE_ROWS = (1, 4, 8, 16, 32, 64, 256)
SAMPLE_ROWS = (1, 8, 64)
VOCAB, VOCAB_LIMIT = 100352, 100278
REPLAYS = 7  # graph replays timed; the median is reported


class Bench:
    """A context, a stream, the kernels, and device buffers freed at the end."""

    def __init__(self, random: bool = False):
        cuda.init()
        self.random = random  # bf16 inputs Gaussian instead of one constant (tensor cores draw more power on them)
        self.device = cuda.Device(0)
        self.context = self.device.retain_primary_context()
        self.context.push()
        self.stream = cuda.Stream()
        started = time.perf_counter()
        self.kernels = K.Kernels(cuda, self.device, self.stream)
        self.compile_s = time.perf_counter() - started
        self.sm = self.kernels.sm_count
        self.l2 = self.device.get_attribute(cuda.device_attribute.L2_CACHE_SIZE)
        self.buffers: list[DeviceBuffer] = []
        self.rng = np.random.default_rng(0)

    def alloc(self, shape, dtype: str, fill=None) -> DeviceBuffer:
        nbytes = max(1, math.prod(shape) * {"bf16": 2, "f32": 4, "i8": 1, "i32": 4, "u8": 1, "f16": 2}[dtype])
        allocation = cuda.mem_alloc(nbytes)
        buffer = DeviceBuffer(int(allocation), tuple(shape), dtype, allocation)
        self.buffers.append(buffer)
        if fill is None and self.random and dtype == "bf16":
            fill = self.rng.standard_normal(math.prod(shape), dtype=np.float32).reshape(shape)
        if fill is not None:
            self.upload(buffer, fill)
        else:  # a small non-zero constant, written on the device (timings here do not depend on the values)
            count = math.prod(shape)
            if dtype == "bf16":
                cuda.memset_d16(buffer.ptr, 0x3C00, count)  # 2^-7
            elif dtype in ("i8", "u8"):
                cuda.memset_d8(buffer.ptr, 5 if dtype == "i8" else 0x9A, count)
            elif dtype == "f16":
                cuda.memset_d16(buffer.ptr, 0x2000, count)  # 2^-7
            elif dtype == "f32":
                cuda.memset_d32(buffer.ptr, 0x3C23D70A, count)  # 0.01
            else:
                cuda.memset_d32(buffer.ptr, 0, count)
        return buffer

    def upload(self, buffer: DeviceBuffer, array) -> None:
        numpy_type = {"bf16": ml_dtypes.bfloat16, "f32": np.float32, "i8": np.int8, "i32": np.int32, "u8": np.uint8,
                      "f16": np.float16}[buffer.dtype]
        cuda.memcpy_htod(buffer.ptr, np.ascontiguousarray(np.broadcast_to(array, buffer.shape), dtype=numpy_type))

    def free(self) -> None:
        for buffer in self.buffers:
            buffer.free()
        self.buffers = []

    def close(self) -> None:
        self.free()
        self.context.pop()

    def copies(self, nbytes: int) -> int:
        """How many copies of an input of nbytes make more than twice the L2 cache."""
        return max(1, min(64, math.ceil(2 * self.l2 / max(nbytes, 1))))

    def time_us(self, launches) -> float:
        """µs per launch: the launches captured in one graph, replayed REPEATS times, the median replay."""
        graph = CudaGraph(self.stream)
        graph.capture(lambda: [launch() for launch in launches])
        start, end = cuda.Event(), cuda.Event()
        try:
            graph.launch()  # warm-up
            times = []
            for _ in range(REPLAYS):
                start.record(self.stream)
                graph.launch()
                end.record(self.stream)
                end.synchronize()
                times.append(end.time_since(start) * 1e3 / len(launches))
        finally:
            graph.close()
        return statistics.median(times)

    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
        src, dst = cuda.mem_alloc(nbytes), cuda.mem_alloc(nbytes)
        start, end = cuda.Event(), cuda.Event()
        times = []
        try:
            for i in range(6):
                start.record(self.stream)
                cuda.memcpy_dtod_async(dst, src, nbytes, self.stream)
                end.record(self.stream)
                end.synchronize()
                if i:
                    times.append(end.time_since(start) / 1e3)
        finally:
            src.free()
            dst.free()
        return 2 * nbytes / statistics.median(times)


# ── projections ────────────────────────────────────────────────────────────────────────────────────
def projections(cfg: dict) -> dict[str, tuple[int, int, bool]]:
    D, H, Hkv, d, I = cfg["D"], cfg["H"], cfg["Hkv"], cfg["d"], cfg["I"]
    return {"qkv": ((H + 2 * Hkv) * d, D, False), "o_proj": (D, H * d, False), "gate_up": (2 * I, D, True),
            "down_proj": (D, I, False)}


def bench_projections(b: Bench, model: str, cfg: dict, bandwidth: float, rows_list) -> list[dict]:
    k = b.kernels
    results = []
    for name, (N, Kdim, silu) in projections(cfg).items():
        weight_bytes = N * Kdim * 2
        n_copies = b.copies(weight_bytes)
        weights = [b.alloc((N, Kdim), "bf16") for _ in range(n_copies)]
        M_max = max(rows_list)
        x = b.alloc((M_max, Kdim), "bf16")
        out_cols = N // 2 if silu else N
        y = b.alloc((M_max, out_cols), "bf16" if silu else "f32")
        part_rows = max(K.gemm_splits(bm, M, N, Kdim, b.sm, tiles) * M for M in rows_list
                        for tiles in (K.GEMM_TILES, K.GEMM_V1_TILES) for bm in tiles)
        part_rows = max(part_rows, *(max(skinny_splits(b, M, N, Kdim, silu)) * M for M in rows_list))
        parts = b.alloc((part_rows, N), "f32")  # room for any split's partials
        for M in rows_list:
            moved = weight_bytes + M * Kdim * 2 + M * out_cols * (2 if silu else 4)
            plan = k.plan(M, N, Kdim, silu=silu)
            plan_bm = K.gemm_stream_tile(M, N, Kdim, b.sm)  # the stream-K columns' own choice of tile
            variants = []  # (label, launch(w), planned, column, splits)
            if M <= K.GEMV_MAX_ROWS:
                variants.append(("gemv", lambda w, M=M: k.gemv(w, None, x, y, M, silu=silu), plan.variant == "gemv",
                                 "gemv", 1))
            for bm in K.GEMM_TILES:
                if bm > 2 * max(M, 32):  # a tile more than twice the rows: wasted work, not worth timing
                    continue
                variants.append((f"gemm bm{bm} stream-K" + (" silu" if silu else ""),
                                 lambda w, M=M, bm=bm: k.gemm(x, w, None, y, M, silu=silu, bm=bm),
                                 plan == ("stream", bm, 1), f"bm{bm}", 1))
            # the stream-K tile with grid split-K instead (what the old plan did, on the new kernels)
            splits = K.gemm_splits(plan_bm, M, N, Kdim, b.sm)
            if splits > 1:
                if silu:
                    launch = lambda w, M=M, bm=plan_bm, splits=splits: (  # noqa: E731
                        k.gemm(x, w, None, parts, M, splits=splits, bm=bm), k.silu_mul_parts(parts, splits, M * N, y, M))
                else:
                    launch = lambda w, M=M, bm=plan_bm, splits=splits: k.gemm(x, w, None, parts, M, splits=splits,  # noqa: E731
                                                                             bm=bm)
                variants.append((f"gemm bm{plan_bm} ×{splits}", launch, False, "split", splits))
            if b.kernels.hopper:  # the wgmma kernels, fed by cp.async (gemm_sm90.cu) and by TMA (gemm_sm90_tma.cu)
                skinny = skinny_splits(b, M, N, Kdim, silu)
                for variant in ("sm90", "tma"):
                    variants += wgmma_variants(k, x, y, parts, M, N, Kdim, silu, plan, skinny, variant)
            # the previous kernels with their own plan (gemm_v1_plan)
            v1_bm, v1_splits = K.gemm_v1_plan(M, N, Kdim, b.sm, silu=silu)
            target = y if v1_splits == 1 else parts
            variants.append((f"gemm v1 bm{v1_bm} ×{v1_splits}",
                             lambda w, M=M, bm=v1_bm, s=v1_splits, target=target: k.gemm(
                                 x, w, None, target, M, silu=silu, splits=s, bm=bm, variant="v1"),
                             plan == ("v1", v1_bm, v1_splits), "v1", v1_splits))
            for label, launch, planned, column, splits in variants:
                launches = [lambda w=w, launch=launch: launch(w) for w in weights]
                launches = launches * max(1, 8 // len(launches))
                us = b.time_us(launches)
                results.append(dict(kind="projection", model=model, name=name, N=N, K=Kdim, M=M, variant=label,
                                    column=column, splits=splits, planned=planned, us=us, gbps=moved / us / 1e3,
                                    pct_copy=moved / us / 1e3 / (bandwidth / 1e9)))
        b.free()
    return results


def wgmma_variants(k, x, y, parts, M: int, N: int, Kdim: int, silu: bool, plan, skinny, variant: str) -> list[tuple]:
    """One wgmma feed's columns (variant "sm90": gemm_sm90.cu, "tma": gemm_sm90_tma.cu): VARIANT (bm128, one split,
    as first measured) from M = 64, VARIANTk (gemm90_tile's tile with the skinny split counts) from M = 8, and
    "VARIANTk alt" (two waves' worth of splits)."""
    variants = []
    if M >= 64:
        variants.append((f"gemm {variant}" + (" silu" if silu else ""),
                         lambda w, M=M: k.gemm(x, w, None, y, M, silu=silu, bm=K.GEMM90_BM, variant=variant),
                         plan == (variant, K.GEMM90_BM, 1), variant, 1))
    if M >= 8:
        bm = K.gemm90_tile(M)
        for column, s in zip((f"{variant}k", f"{variant}k alt"), skinny):
            if column.endswith("alt") and s == skinny[0]:
                continue
            if s == 1:
                launch = lambda w, M=M, bm=bm: k.gemm(x, w, None, y, M, silu=silu, bm=bm, variant=variant)  # noqa: E731
            elif silu:
                launch = lambda w, M=M, bm=bm, s=s: (  # noqa: E731
                    k.gemm(x, w, None, parts, M, splits=s, bm=bm, variant=variant),
                    k.silu_mul_parts(parts, s, M * N, y, M))
            else:
                launch = lambda w, M=M, bm=bm, s=s: k.gemm(x, w, None, parts, M, splits=s, bm=bm,  # noqa: E731
                                                           variant=variant)
            variants.append((f"gemm {variant} bm{bm} ×{s}", launch, plan == (variant, bm, s), column, s))
    return variants


def skinny_splits(b: Bench, M: int, N: int, Kdim: int, silu: bool) -> tuple[int, int]:
    """The wgmma kernel's split counts to time at M rows: gemm90_splits' (one resident wave of CTAs), and the
    alternative of two waves (twice the CTAs); for gate_up, whose fused SiLU keeps it whole from
    GEMM90_FUSED_SILU_CTAS tiles, the alternative is the one wave of splits through partials and silu_mul_parts."""
    bm = K.gemm90_tile(M)
    planned = K.gemm90_splits(bm, M, N, Kdim, b.sm, silu)
    return planned, K.gemm90_splits(bm, M, N, Kdim, b.sm) if silu else K.gemm90_splits(bm, M, N, Kdim, 2 * b.sm)


def prefill_variants(b: Bench) -> tuple[tuple[str, int], ...]:
    """PREFILL_VARIANTS, and the Hopper wgmma kernels (gemm_sm90.cu, gemm_sm90_tma.cu: their 128 × 256 tile) on an
    sm_90 GPU."""
    return PREFILL_VARIANTS + ((("sm90", K.GEMM90_BM), ("tma", K.GEMM90_BM)) if b.kernels.hopper else ())


def bench_prefill_gemm(b: Bench, model: str, cfg: dict, rows_list=PREFILL_GEMM_ROWS) -> list[dict]:
    """The projections at prefill sizes: compute-bound, TFLOP/s (2·M·N·K per launch)."""
    k = b.kernels
    results = []
    for name, (N, Kdim, silu) in projections(cfg).items():
        M_max = max(rows_list)
        weights = [b.alloc((N, Kdim), "bf16") for _ in range(b.copies(N * Kdim * 2 + M_max * N * 4))]
        x = b.alloc((M_max, Kdim), "bf16")
        y = b.alloc((M_max, N // 2), "bf16") if silu else b.alloc((M_max, N), "f32")
        for M in rows_list:
            plan = k.plan(M, N, Kdim, silu=silu)
            planned = (plan.variant, plan.bm)
            for variant, bm in prefill_variants(b):
                us = b.time_us([lambda w=w, M=M, variant=variant, bm=bm: k.gemm(x, w, None, y, M, silu=silu, bm=bm,
                                                                                variant=variant) for w in weights] * 2)
                results.append(dict(kind="gemm_prefill", model=model, name=name, N=N, K=Kdim, M=M,
                                    variant=f"{variant} bm{bm}", planned=(variant, bm) == planned,
                                    us=us, tflops=2 * M * N * Kdim / us / 1e6))
        b.free()
    return results


QUANT_PREFILL_ROWS = (128, 256, 512, 2048)


def bench_quant_prefill(b: Bench, model: str, cfg: dict, rows_list=QUANT_PREFILL_ROWS) -> list[dict]:
    """Packed int8 and int4 (g128 asymmetric) projections past 64 rows, sm_90, in one run: "bf16" (the same shape's
    planned bf16 GEMM), "q8/q4 scratch" (dequantize_q8/q4 into a bf16 copy, then the planned GEMM: the path before
    the in-loop kernels), "q8/q4 in-loop" (gemm_q8_tma, gemm_q4_tma: dequantized in the TMA GEMM's main loop, the
    plan's split count); µs and TFLOP/s (2·M·N·K), the weight copies together larger than the L2."""
    k = b.kernels
    results = []
    for name, (N, Kdim, silu) in projections(cfg).items():
        M_max = max(rows_list)
        x = b.alloc((M_max, Kdim), "bf16")
        y = b.alloc((M_max, N // 2), "bf16") if silu else b.alloc((M_max, N), "f32")
        most = max(k.plan(M, N, Kdim, silu=silu).splits for M in rows_list)
        parts = b.alloc((most * M_max, N), "f32")
        widened, row_scales = b.alloc((N, Kdim), "bf16"), b.alloc((N,), "f32")
        bf = [b.alloc((N, Kdim), "bf16") for _ in range(b.copies(N * Kdim * 2))]
        q8 = [(b.alloc((N, Kdim), "i8"), b.alloc((N,), "f32")) for _ in range(b.copies(N * Kdim))]
        one = quant_weights(b, N, Kdim, "q4", 128, True)
        q4 = [one[0]] + [quant_weights(b, N, Kdim, "q4", 128, True)[0] for _ in range(b.copies(one[1]) - 1)]

        def gemm(M, w, scales, static, plan):
            if plan.splits == 1:
                return k.gemm(x, w, scales, y, M, silu=silu, bm=plan.bm, variant=plan.variant, static_weights=static)
            target = DeviceBuffer(parts.ptr, (plan.splits * M, N), "f32")
            k.gemm(x, w, scales, target, M, splits=plan.splits, bm=plan.bm, variant=plan.variant, static_weights=static)
            if silu:
                k.silu_mul_parts(target, plan.splits, M * N, y, M)

        def in_loop(M, launch, plan):
            if silu and plan.splits == 1:
                return launch(y, silu=True)
            target = DeviceBuffer(parts.ptr, (plan.splits * M, N), "f32")
            launch(target, splits=plan.splits, pairs=silu)
            if silu:
                k.silu_mul_parts(target, plan.splits, M * N, y, M)

        def q8_scratch(M, q, s, plan):
            k.dequantize_q8(q, s, widened, row_scales, N, pairs=silu)
            gemm(M, widened, row_scales, False, plan)

        def q4_scratch(M, w, plan):
            k.dequantize_q4(*w, widened, N, pairs=silu)
            gemm(M, widened, None, False, plan)

        for M in rows_list:
            plan = k.plan(M, N, Kdim, silu=silu)
            ways = {"bf16": [lambda w=w: gemm(M, w, None, True, plan) for w in bf],
                    "q8 scratch": [lambda q=q, s=s: q8_scratch(M, q, s, plan) for q, s in q8],
                    "q8 in-loop": [lambda q=q, s=s: in_loop(M, lambda out, **kw: k.gemm_q8_tma(x, q, s, out, M, N, **kw),
                                                            plan) for q, s in q8],
                    "q4 scratch": [lambda w=w: q4_scratch(M, w, plan) for w in q4],
                    "q4 in-loop": [lambda w=w: in_loop(M, lambda out, **kw: k.gemm_q4_tma(x, *w, out, M, N, **kw), plan)
                                   for w in q4]}
            for variant, launches in ways.items():
                us = b.time_us(launches * max(1, 8 // len(launches)))
                results.append(dict(kind="gemm_prefill", model=model, name=name, N=N, K=Kdim, M=M, variant=variant,
                                    planned=variant.endswith("in-loop"), us=us, tflops=2 * M * N * Kdim / us / 1e6))
        b.free()
    return results


def bench_int8_gemv(b: Bench, model: str, cfg: dict, bandwidth: float) -> list[dict]:
    """The int8 GEMV (M = 1 … 4) on the largest projection: weight bytes are half of bf16's."""
    k = b.kernels
    N, Kdim = 2 * cfg["I"], cfg["D"]
    weight_bytes = N * Kdim + N * 4
    ws = [(b.alloc((N, Kdim), "i8"), b.alloc((N,), "f32")) for _ in range(b.copies(weight_bytes))]
    x, y = b.alloc((4, Kdim), "bf16"), b.alloc((4, N // 2), "bf16")
    results = []
    for M in range(1, K.GEMV_MAX_ROWS + 1):
        moved = weight_bytes + M * Kdim * 2 + M * N
        us = b.time_us([lambda w=w, s=s, M=M: k.gemv(w, s, x, y, M, silu=True) for w, s in ws] * max(1, 8 // len(ws)))
        results.append(dict(kind="projection", model=model, name="gate_up int8", N=N, K=Kdim, M=M,
                            variant="gemv int8 silu", column="gemv", splits=1, planned=True, us=us, gbps=moved / us / 1e3,
                            pct_copy=moved / us / 1e3 / (bandwidth / 1e9)))
    b.free()
    return results


# ── quantized projections (gemm_quant.cu) ─────────────────────────────────────────────────────────────────
QUANT_ROWS = (1, 2, 4, 8, 16, 32, 64)
QUANT_INT4 = (("q4 g128", 128, False), ("q4 g128 asym", 128, True), ("q4 g32 asym", 32, True))  # label, G, zeros


def quant_weights(b: Bench, N: int, Kdim: int, kind: str, group: int = 0, asym: bool = False):
    """(buffers, bytes) of one weight matrix in a kernel's layout (the values do not matter for the timing)."""
    if kind == "bf16":
        return (b.alloc((N, Kdim), "bf16"),), N * Kdim * 2
    if kind == "q8":
        return (b.alloc((N, Kdim), "i8"), b.alloc((N,), "f32")), N * Kdim + N * 4
    groups = Kdim // group
    zeros = b.alloc((N // 2, groups), "u8") if asym else None
    return ((b.alloc((N, Kdim // 2), "u8"), b.alloc((N, groups), "f16"), zeros),
            N * Kdim // 2 + N * groups * 2 + (N * groups // 2 if asym else 0))


def quant_launch(b: Bench, kind: str, w, x, y, M: int, N: int, silu: bool, split: int | None = None, parts=None):
    """One projection as the runtime runs it; bf16 follows Kernels.plan (split partials, then silu_mul_parts)."""
    k = b.kernels
    if kind == "bf16":
        plan = k.plan(M, N, x.shape[1], silu=silu)
        if plan.variant == "gemv":
            return lambda: k.gemv(w[0], None, x, y, M, silu=silu)
        if plan.splits == 1:
            return lambda: k.gemm(x, w[0], None, y, M, silu=silu, bm=plan.bm, variant=plan.variant)
        target = DeviceBuffer(parts.ptr, (plan.splits * M, N), "f32")
        if silu:
            return lambda: (k.gemm(x, w[0], None, target, M, splits=plan.splits, bm=plan.bm, variant=plan.variant),
                            k.silu_mul_parts(target, plan.splits, M * N, y, M))
        return lambda: k.gemm(x, w[0], None, target, M, splits=plan.splits, bm=plan.bm, variant=plan.variant)
    if kind == "q8 gemv":
        return lambda: k.gemv(w[0], w[1], x, y, M, silu=silu)
    if kind == "q8":
        return lambda: k.gemm_q8(x, w[0], w[1], y, M, N, silu=silu, split=split)
    return lambda: k.gemm_q4(x, w[0], w[1], w[2], y, M, N, silu=silu, split=split)


def bench_quant(b: Bench, model: str, cfg: dict, bandwidth: float, rows_list=QUANT_ROWS) -> list[dict]:
    """Each projection in bf16, int8 and int4 at decode batch sizes: µs and % of copy bandwidth of its own bytes."""
    results = []
    for name, (N, Kdim, silu) in projections(cfg).items():
        M_max = max(rows_list)
        out_cols = N // 2 if silu else N
        kinds = [("bf16", "bf16", 0, False), ("q8 gemv", "q8", 0, False), ("q8", "q8", 0, False),
                 *((label, "q4", group, asym) for label, group, asym in QUANT_INT4)]
        for label, storage, group, asym in kinds:  # one kind's copies on the device at a time
            x = b.alloc((M_max, Kdim), "bf16")
            y = b.alloc((M_max, out_cols), "bf16" if silu else "f32")
            most = max(b.kernels.plan(M, N, Kdim, silu=silu).splits for M in rows_list)
            parts = b.alloc((most * M_max, N), "f32") if label == "bf16" and most > 1 else None  # split partials
            one = quant_weights(b, N, Kdim, storage, group, asym)
            copies = [one] + [quant_weights(b, N, Kdim, storage, group, asym) for _ in range(b.copies(one[1]) - 1)]
            for M in rows_list:
                if label == "q8 gemv" and M > K.GEMV_MAX_ROWS:
                    continue
                moved = one[1] + M * Kdim * 2 + M * out_cols * (2 if silu else 4)
                # q8 and q4 g128 at M = 1 and 16 also with every split forced (the planner's choice is a model)
                splits = [None] + ([1, 2, 4, 8] if label in ("q8", "q4 g128") and M in (1, 16) else [])
                for split in splits:
                    launches = [quant_launch(b, label, w, x, y, M, N, silu, split, parts) for w, _ in copies]
                    us = b.time_us(launches * max(1, 8 // len(launches)))
                    results.append(dict(kind="quant", model=model, name=name, N=N, K=Kdim, M=M,
                                        variant=label if split is None else f"{label} ×{split}", us=us,
                                        gbps=moved / us / 1e3, pct_copy=moved / us / 1e3 / (bandwidth / 1e9)))
            b.free()
    return results


# ── attention ───────────────────────────────────────────────────────────────────────────────────────
def paged_tables(b: Bench, contexts, instances: int) -> tuple[list[DeviceBuffer], int]:
    """`instances` disjoint sets of block tables for the contexts (shuffled block ids), and the pool's block count."""
    need = [math.ceil(c / K.BLOCK_SIZE) for c in contexts]
    width = max(need)
    total = sum(need)
    num_blocks = 1 + total * instances
    ids = b.rng.permutation(np.arange(1, num_blocks)).astype(np.int32)
    tables = []
    for i in range(instances):
        table = np.zeros((len(contexts), width), np.int32)
        at = i * total
        for s, n in enumerate(need):
            table[s, :n] = ids[at:at + n]
            at += n
        tables.append(b.alloc(table.shape, "i32", table))
    return tables, num_blocks


def bench_decode(b: Bench, model: str, cfg: dict, bandwidth: float, batches, also=(1,)) -> list[dict]:
    """paged_decode at each batch over contexts uniform in [128, 512], with the planned split count and those in also."""
    k = b.kernels
    H, Hkv, d = cfg["H"], cfg["Hkv"], cfg["d"]
    results = []
    for B in batches:
        contexts = b.rng.integers(128, 513, B)
        kv_bytes = int(contexts.sum()) * Hkv * d * 2 * 2
        instances = b.copies(kv_bytes)
        tables, num_blocks = paged_tables(b, contexts, instances)
        kp = b.alloc((num_blocks, Hkv, K.BLOCK_SIZE, d), "bf16")
        vp = b.alloc((num_blocks, Hkv, K.BLOCK_SIZE, d), "bf16")
        q, out = b.alloc((B, H, d), "bf16"), b.alloc((B, H * d), "bf16")
        ctx = b.alloc((B,), "i32", contexts)
        max_blocks = math.ceil(int(contexts.max()) / K.BLOCK_SIZE)
        planned = K.decode_splits(B, Hkv, b.sm, max_blocks)
        for splits in sorted({*also, planned}):
            po = b.alloc((B, H, splits, d), "f32") if splits > 1 else None
            pml = b.alloc((B, H, splits, 2), "f32") if splits > 1 else None
            counters = b.alloc((B * Hkv,), "i32") if splits > 1 else None
            launches = [lambda t=t, splits=splits, po=po, pml=pml, counters=counters:
                        k.paged_decode(q, kp, vp, out, po, pml, counters, ctx, t, B, splits) for t in tables]
            us = b.time_us(launches * max(1, 8 // len(launches)))
            results.append(dict(kind="decode", model=model, B=B, context=f"{int(contexts.min())}-{int(contexts.max())}",
                                splits=splits, planned=splits == planned, us=us, gbps=kv_bytes / us / 1e3,
                                pct_copy=kv_bytes / us / 1e3 / (bandwidth / 1e9)))
        b.free()
    return results


def bench_prefill(b: Bench, model: str, cfg: dict) -> list[dict]:
    k = b.kernels
    H, Hkv, d = cfg["H"], cfg["Hkv"], cfg["d"]
    results = []
    for label, lengths in (("1 × 2048", [2048]), ("4 × 512", [512] * 4)):
        rows = np.asarray(lengths, np.int32)
        first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int32)
        T = int(rows.sum())
        tables, num_blocks = paged_tables(b, lengths, 1)
        kp = b.alloc((num_blocks, Hkv, K.BLOCK_SIZE, d), "bf16")
        vp = b.alloc((num_blocks, Hkv, K.BLOCK_SIZE, d), "bf16")
        q, out = b.alloc((T, H, d), "bf16"), b.alloc((T, H * d), "bf16")
        tile_seq, tile_first = K.prefill_tiles(first, rows)
        args = (b.alloc(tile_seq.shape, "i32", tile_seq), b.alloc(tile_first.shape, "i32", tile_first),
                b.alloc(first.shape, "i32", first), b.alloc(rows.shape, "i32", rows),
                b.alloc(rows.shape, "i32", rows), tables[0], len(tile_seq))
        flops = sum(4 * H * d * n * (n + 1) / 2 for n in lengths)
        planned = K.prefill_kernel(d, k.hopper and K.ATTENTION_HOPPER)
        for variant in ("mma", "sm90") if k.hopper and d in K.HEAD_DIMS_SM90 else ("mma",):
            us = b.time_us([lambda: k.paged_prefill(q, kp, vp, out, *args, variant=variant)] * 4)
            results.append(dict(kind="prefill", model=model, batch=label, tokens=T, variant=variant, us=us,
                                tflops=flops / us / 1e6, planned=planned == K.prefill_kernel(d, variant == "sm90")))
        b.free()
    return results


# ── small kernels ─────────────────────────────────────────────────────────────────────────────────────
def bench_rope(b: Bench, model: str, cfg: dict, rows_list) -> list[dict]:
    k = b.kernels
    H, Hkv, d = cfg["H"], cfg["Hkv"], cfg["d"]
    width = (H + 2 * Hkv) * d
    T_max = max(rows_list)
    qkv = b.alloc((T_max, width), "f32")
    qn, kn = b.alloc((H * d,), "f32"), b.alloc((Hkv * d,), "f32")
    inv = b.alloc((d // 2,), "f32", 1.0 / 500000.0 ** (np.arange(0, d, 2) / d))
    q_out = b.alloc((T_max, H, d), "bf16")
    blocks = T_max // K.BLOCK_SIZE + 2
    kp, vp = b.alloc((blocks, Hkv, K.BLOCK_SIZE, d), "bf16"), b.alloc((blocks, Hkv, K.BLOCK_SIZE, d), "bf16")
    pos = b.alloc((T_max,), "i32", np.arange(T_max) + 100)
    slots = b.alloc((T_max,), "i32", np.arange(T_max) + K.BLOCK_SIZE)
    results = []
    for T in rows_list:
        for per_head in (False, True):
            us = b.time_us([lambda T=T, per_head=per_head: k.qk_norm_rope_append(
                qkv, 1, T * width, qn, kn, inv, q_out, kp, vp, pos, slots, T, 1e-6, per_head=per_head)] * 8)
            results.append(dict(kind="rope", model=model, T=T, variant="per head" if per_head else "per token",
                                planned=per_head == (T <= K.ROPE_PER_HEAD_MAX_TOKENS), us=us))
    b.free()
    return results


def bench_sampling(b: Bench) -> list[dict]:
    k = b.kernels
    results = []
    R_max = max(SAMPLE_ROWS)
    logits = b.alloc((R_max, VOCAB), "f32", (3 * b.rng.standard_normal(VOCAB)).astype(np.float32))
    u, states = b.alloc((R_max,), "f32", 0.37), b.alloc((R_max,), "i32", np.arange(R_max))
    tokens, last = b.alloc((R_max,), "i32"), b.alloc((R_max,), "i32")
    counts = b.alloc((R_max, VOCAB), "i32", 0)
    for label, temperature, top_k, top_p in (("greedy", 0.0, 0, 1.0), ("t 0.8, top-k 40, top-p 0.9", 0.8, 40, 0.9),
                                             ("t 1.0, top-p 0.95", 1.0, 0, 0.95)):
        tb, kb, pb = (b.alloc((R_max,), "f32", temperature), b.alloc((R_max,), "i32", top_k),
                      b.alloc((R_max,), "f32", top_p))
        for R in SAMPLE_ROWS:
            us = b.time_us([lambda R=R: k.sample_rows(logits, VOCAB_LIMIT, tb, kb, pb, u, states, tokens, last, counts, R)] * 4)
            results.append(dict(kind="sampling", rows=R, variant=label, us=us))
    b.free()
    return results


def _cell(r: dict, with_pct: bool = True) -> str:
    """µs, % of copy bandwidth, the split count when > 1, and * for what the planner picks."""
    text = f"{r['us']:.1f}"
    if with_pct and "pct_copy" in r:
        text += f" {r['pct_copy']:.0%}"
    if r.get("splits", 1) > 1:
        text += f" ×{r['splits']}"
    return text + (" *" if r.get("planned") else "")


def report(results: list[dict]) -> str:
    """Pivoted tables: one row per shape, one column per kernel variant; cells are "µs % of copy [×splits] [*]"."""
    sections = []
    proj = [r for r in results if r["kind"] == "projection"]
    if proj:
        columns = ["gemv", *(f"bm{bm}" for bm in K.GEMM_TILES), "split", "sm90", "sm90k", "sm90k alt", "tma", "tmak",
                   "tmak alt", "v1"]
        columns += sorted({r["column"] for r in proj} - set(columns))
        rows = {}
        for r in proj:
            rows.setdefault((r["model"], r["name"], f"{r['N']}×{r['K']}", r["M"]), {})[r["column"]] = _cell(r)
        table = [[*key, *(cells.get(c, "") for c in columns)] for key, cells in rows.items()]
        sections.append("projections: µs, % of copy bandwidth (weights + x + y bytes), ×splits, * = plan; bm…: "
                        "stream-K (gemm.cu), split: the planned tile with grid split-K, sm90: gemm_sm90.cu (wgmma) bm128 "
                        "one split, sm90k: gemm_sm90.cu bm64 (M ≤ 64) / bm128 with gemm90_splits, sm90k alt: two waves of "
                        "splits, tma/tmak/tmak alt: the same on gemm_sm90_tma.cu (TMA producer, mbarrier ring), "
                        "v1: gemm_v1.cu with gemm_v1_plan\n" + tabulate(table, headers=["model", "proj", "N×K", "M", *columns], tablefmt="github"))
    quant = [r for r in results if r["kind"] == "quant"]
    if quant:
        variants = list(dict.fromkeys(r["variant"] for r in quant))
        rows = {}
        for r in quant:
            rows.setdefault((r["model"], r["name"], f"{r['N']}×{r['K']}", r["M"]), {})[r["variant"]] = r
        table = []
        for key, cells in rows.items():
            speedup = (f"{cells['bf16']['us'] / cells['q4 g128']['us']:.2f}×"
                       if "bf16" in cells and "q4 g128" in cells else "")
            table.append([*key, *(f"{cells[v]['us']:.1f} {cells[v]['pct_copy']:.0%}" if v in cells else "" for v in variants),
                          speedup])
        sections.append("quantized projections: µs, % of copy bandwidth (weights + scales + zeros + x + y bytes); "
                        "bf16: gemv (M ≤ 4) or the planned gemm; q8 gemv: gemv.cu; q8, q4: gemm_quant.cu\n" + tabulate(
                            table, headers=["model", "proj", "N×K", "M", *variants, "bf16/q4 g128"], tablefmt="github"))
    pg = [r for r in results if r["kind"] == "gemm_prefill"]
    if pg:
        rows = {}
        for r in pg:
            rows.setdefault((r["model"], r["name"], f"{r['N']}×{r['K']}", r["M"]), {})[r["variant"]] = (
                f"{r['us']:.1f} µs {r['tflops']:.0f}" + (" *" if r["planned"] else ""))
        variants = list(dict.fromkeys(r["variant"] for r in pg))
        table = [[*key, *(cells.get(v, "") for v in variants)] for key, cells in rows.items()]
        sections.append("prefill projections: µs, TFLOP/s, * = plan\n" + tabulate(
            table, headers=["model", "proj", "N×K", "M", *variants], tablefmt="github"))
    dec = [r for r in results if r["kind"] == "decode"]
    if dec:
        rows = {}
        for r in dec:
            cells = rows.setdefault((r["model"], r["B"], r["context"]), {})
            cells["1" if r["splits"] == 1 else "split"] = _cell(r)
            if r["planned"]:
                cells["plan"] = f"{r['splits']}"
        table = [[*key, cells.get("1", ""), cells.get("split", ""), cells.get("plan", "")] for key, cells in rows.items()]
        sections.append("paged decode: µs, % of copy bandwidth (KV bytes)\n" + tabulate(
            table, headers=["model", "B", "contexts", "1 split", "planned splits", "plan"], tablefmt="github"))
    pre = [r for r in results if r["kind"] == "prefill"]
    if pre:
        rows = {}
        for r in pre:
            rows.setdefault((r["model"], r["batch"], r["tokens"]), {})[r["variant"]] = r
        table = []
        for key, cells in rows.items():
            row = [*key]
            for variant in ("mma", "sm90"):
                r = cells.get(variant)
                row += [f"{r['us']:.1f}" + (" *" if r["planned"] else "") if r else "", f"{r['tflops']:.0f}" if r else ""]
            row.append(f"{cells['mma']['us'] / cells['sm90']['us']:.2f}×" if "sm90" in cells else "")
            table.append(row)
        sections.append("paged prefill attention: µs, TFLOP/s, * = what Kernels.paged_prefill runs; mma: attention.cu "
                        "(mma.sync), sm90: attention_sm90.cu (wgmma)\n" + tabulate(
                            table, headers=["model", "batch", "tokens", "mma µs", "mma TFLOP/s", "sm90 µs",
                                            "sm90 TFLOP/s", "speed-up"], tablefmt="github"))
    rope = [r for r in results if r["kind"] == "rope"]
    if rope:
        rows = {}
        for r in rope:
            rows.setdefault((r["model"], r["T"]), {})[r["variant"]] = _cell(r, False)
        table = [[*key, cells.get("per token", ""), cells.get("per head", "")] for key, cells in rows.items()]
        sections.append("qk_norm_rope_append: µs, * = plan\n" + tabulate(
            table, headers=["model", "rows", "per token", "per head"], tablefmt="github"))
    samp = [r for r in results if r["kind"] == "sampling"]
    if samp:
        rows = {}
        for r in samp:
            rows.setdefault(r["variant"], {})[r["rows"]] = f"{r['us']:.1f}"
        counts = sorted({r["rows"] for r in samp})
        table = [[variant, *(cells.get(n, "") for n in counts)] for variant, cells in rows.items()]
        sections.append(f"sample_rows over {VOCAB_LIMIT:,} ids: µs\n" + tabulate(
            table, headers=["parameters", *(f"{n} rows" for n in counts)], tablefmt="github"))
    return "\n\n".join(sections)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--out", type=Path, help="directory for bench_kernels.json")
    parser.add_argument("--quick", action="store_true", help="fewer rows and batches (a smoke run)")
    parser.add_argument("--gemm-only", action="store_true", help="the projections and prefill GEMMs only")
    parser.add_argument("--quant-only", action="store_true", help="the quantized projections (int4, int8) only")
    parser.add_argument("--quant-prefill-only", action="store_true", help="int8/int4 projections past 64 rows only "
                        "(sm_90): bf16, the dequantize-then-GEMM scratch paths and the in-loop wgmma kernels")
    parser.add_argument("--prefill-gemm-only", action="store_true", help="the bf16 prefill GEMMs (M = 512, 2048) "
                        "only")
    parser.add_argument("--attention-only", action="store_true", help="the paged prefill attention only")
    parser.add_argument("--small-only", action="store_true", help="the small per-layer kernels only: paged decode "
                        "attention (splits 1, 2 and the planned count at every batch) and qk_norm_rope_append")
    parser.add_argument("--random", action="store_true", help="fill bf16 inputs with N(0, 1) values, not 2^-7 "
                        "(slower to set up; the tensor cores' clocks may drop on random bits)")
    args = parser.parse_args()
    started = time.perf_counter()
    b = Bench(random=args.random)
    results: list[dict] = []
    try:
        bandwidth = b.copy_bandwidth()
        name = b.device.name()
        print(f"{name}: {b.sm} SMs, L2 {b.l2 / 2**20:.0f} MiB, copy bandwidth {bandwidth / 1e9:,.0f} GB/s "
              f"(read + write); kernels loaded in {b.compile_s:.1f} s", file=sys.stderr, flush=True)
        rows = (1, 4, 16, 64) if args.quick else GEMM_ROWS
        for model in args.models.split(","):
            cfg = MODELS[model]
            quant_rows = (1, 4, 16, 64) if args.quick else QUANT_ROWS
            stages = [("projections", lambda: bench_projections(b, model, cfg, bandwidth, rows)),
                      ("prefill GEMM", lambda: bench_prefill_gemm(b, model, cfg,
                                                                  (512,) if args.quick else PREFILL_GEMM_ROWS))]
            if args.quant_only:
                stages = []
            if not args.gemm_only:
                stages += [("quantized projections", lambda: bench_quant(b, model, cfg, bandwidth, quant_rows))]
            if not (args.gemm_only or args.quant_only):
                stages += [("int8 gemv", lambda: bench_int8_gemv(b, model, cfg, bandwidth)),
                           ("paged decode", lambda: bench_decode(b, model, cfg, bandwidth,
                                                                 (1, 64) if args.quick else DECODE_BATCHES)),
                           ("paged prefill", lambda: bench_prefill(b, model, cfg)),
                           ("qk_norm_rope_append", lambda: bench_rope(b, model, cfg, ROPE_ROWS))]
            if args.attention_only:
                stages = [("paged prefill", lambda: bench_prefill(b, model, cfg))]
            if args.quant_prefill_only:
                stages = [("quantized prefill GEMM", lambda: bench_quant_prefill(b, model, cfg))]
            elif args.prefill_gemm_only:
                stages = [("prefill GEMM", lambda: bench_prefill_gemm(b, model, cfg))]
            elif b.kernels.hopper and not (args.attention_only or args.small_only or args.quick or
                                           args.prefill_gemm_only):
                stages += [("quantized prefill GEMM", lambda: bench_quant_prefill(b, model, cfg))]
            if args.small_only:
                stages = [("paged decode", lambda: bench_decode(b, model, cfg, bandwidth, DECODE_BATCHES, (1, 2))),
                          ("qk_norm_rope_append", lambda: bench_rope(b, model, cfg, ROPE_ROWS))]
            for stage, run in stages:
                results += run()
                print(f"  {model} {stage} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if not (args.gemm_only or args.quant_only or args.attention_only or args.small_only or args.quant_prefill_only
                or args.prefill_gemm_only):
            results += bench_sampling(b)
    finally:
        b.close()
    text = report(results)
    print(f"\n{name}, copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write), {time.perf_counter() - started:.0f} s\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_kernels.json").write_text(json.dumps(
            {"device": name, "sm_count": b.sm, "l2_bytes": b.l2, "copy_bandwidth": bandwidth, "results": results},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
