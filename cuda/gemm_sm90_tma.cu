// Hopper projection GEMM fed by the Tensor Memory Accelerator (sm_90a: TMA bulk tensor copies, mbarriers, wgmma):
// C = A·Wᵀ, A [M, K] bf16 activations, W [N, K] bf16 weights, f32 accumulation. gemm_sm90.cu's tiles and epilogues,
// with the copies taken off the math warps (and, at the end of the file, the same pipeline for packed int8 and int4
// weights, dequantized in the main loop):
//
//   warpgroup 0 (producer): one thread issues the TMA copies of each k-tile into a ring of STAGES shared-memory stages
//     (A's box of BM rows × 64 columns, W's 256 rows × 64 in boxes of 128 rows, or of 64 for silu), arming the stage's
//     `full` mbarrier with the stage's byte count (expect_tx); it refills a stage once its `empty` mbarrier says every
//     consumer warp retired the wgmma that read it. It gives its registers to the consumers (setmaxnreg.dec) and does
//     nothing else.
//   warpgroups 1 … (consumers, 64 rows each): wait for a stage's `full` phase, issue wgmma.mma_async m64n256k16 × 4
//     on it straight from shared memory, and release the stage of the k-tile before (wgmma_wait<1>: the wgmma of
//     one k-tile runs while the next one's copies are waited for).
//
// Tiles: bm128 (two consumer warpgroups, 4 stages of 48 KB: prefill) and bm64 (one consumer, 5 stages of 40 KB: skinny
// decode batches, where the projection streams W). The 128-byte swizzle is the TMA's own (boxes 128 bytes wide,
// stages 1024-byte aligned), the layout the wgmma descriptors read, as in gemm_sm90.cu.
// Persistent: a grid of at most one CTA per multiprocessor walks the work units u = z·tiles + t (split z, tile t,
// M-tile fastest) with stride gridDim.x; the producer runs ahead into the next unit while the consumers store the
// last one's accumulators (the epilogue is hidden behind the next tile's copies). A last round of at most half the
// grid runs as half tiles of 128 columns (gemm90t_schedule).
// silu: W = [gate; up] as two tensor maps (gate rows, up rows): a tile's W boxes are gate rows n … n+127 and the same
// up rows, so its accumulator columns 0 … 127 are gate and 128 … 255 the matching up, and one thread holds both
// halves of each output: C [M, N/2] bf16 = SiLU(gate)·up, no interleaving. Plain: both boxes from W, rows n0 … +255.
// Out-of-range rows and columns are the TMA's zero fill (no masking on the loads; the epilogue masks the stores).
// The tensor maps are kernel parameters (`const __grid_constant__`): the driver keeps them in the constant bank with
// the other arguments, no fence or global copy, and a CUDA graph captures them with the launch. ptxas aligns them to
// 64 bytes in the constant bank, shifting every parameter (48 bytes on sm_90), so the host launches these kernels
// with one pointer per argument (runtime/cuda/driver.py DriverFunction), never a packed buffer.
// Built for compute_90a only (runtime/cuda/build.py ARCH_FILES); for other targets the kernels are empty. The CPU
// emulator (tests/cuda_emulator/emu.h) models the mbarriers, the bulk copies (landing when the barrier's phase
// completes, swizzled, zero-filled) and its own layout of the 128-byte map (plugin.py encodes it).
#include "common.cuh"

constexpr int GEMM90T_BN = 256, GEMM90T_BK = 64, GEMM90T_WBOX = 128;  // tile columns, k-tile, rows of one W box
constexpr int GEMM90T_GATE_BOX = 64;  // silu: rows of one gate (or up) box, two per tile, one per half tile
constexpr int GEMM90T_BM128_STAGES = 4, GEMM90T_BM64_STAGES = 5;
constexpr int GEMM90T_PRODUCER_REGS = 40, GEMM90T_CONSUMER_REGS = 232;  // setmaxnreg (bm128: 128·40 + 256·232 ≤ 64 K)

// A CUtensorMap, encoded on the host (runtime/cuda/tensor_map.py): opaque here, 64-byte aligned as the driver's.
struct alignas(64) TensorMap {
    unsigned char bytes[128];
};

template <int BM_, int STAGES_>
struct Gemm90TConfig {
    static constexpr int BM = BM_, STAGES = STAGES_;
    static constexpr int CONSUMERS = BM / 64;                       // consumer warpgroups, 64 rows each
    static constexpr int THREADS = 128 * (1 + CONSUMERS);           // + the producer warpgroup
    static constexpr int A_BYTES = BM * GEMM90T_BK * 2;             // A box [BM][64] bf16
    static constexpr int STAGE_BYTES = A_BYTES + GEMM90T_BN * GEMM90T_BK * 2;  // then W's two boxes [128][64]
    static constexpr int SMEM = STAGES * STAGE_BYTES + 1024 + 2 * STAGES * 8;  // 1 KB alignment slack, mbarriers
    static_assert(A_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzled boxes start 1024-byte aligned");
    static_assert(SMEM <= 227 * 1024, "sm_90's shared memory per block");
};
using Gemm90TBM128 = Gemm90TConfig<128, GEMM90T_BM128_STAGES>;  // 193 KB
using Gemm90TBM64 = Gemm90TConfig<64, GEMM90T_BM64_STAGES>;     // 201 KB

#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(OS_EMULATE_SM90)
#define OS_GEMM90T 1

#ifndef OS_EMULATE_SM90  // the emulator has its own models of these (emu.h, "Hopper TMA and mbarriers")
// Box (x = column, y = row) of the 2-D tensor `map` into shared memory at `dst`, completing `bar`'s transactions.
OS_DEVICE void tma_load_2d(uint32_t dst, const TensorMap* map, uint32_t bar, int x, int y) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(x), "r"(y)
        : "memory");
}
OS_DEVICE void tma_prefetch_map(const TensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
template <int REGS>
OS_DEVICE void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REGS)); }
template <int REGS>
OS_DEVICE void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REGS)); }
#endif

// Matrix descriptor of a K-major bf16 operand at shared address `addr` (as gemm_sm90.cu's: 1024-byte blocks of 8 rows
// × 128 bytes, 128-byte swizzle, stride byte offset 1024; a k16 step is +32 bytes, i.e. +2 in the descriptor).
OS_DEVICE uint64_t wgmma_desc_tma(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

// One work unit: tile t (BM rows of M × BN of N) of the M-tile-fastest order, split z's k-tiles [kbegin, kbegin + kt),
// all of the tile's columns (half < 0) or one half of them (half 0 or 1: gemm90t_schedule).
struct Gemm90TUnit {
    int m0, n_tile, kbegin, kt, z;
    int half = -1;
};
template <int BM, int BN>
OS_DEVICE Gemm90TUnit gemm90t_unit(int u, int M, int N, int K, int kps) {
    const int m_tiles = (M + BM - 1) / BM, tiles = m_tiles * ((N + BN - 1) / BN);
    const int ktiles = (K + GEMM90T_BK - 1) / GEMM90T_BK, z = u / tiles, t = u % tiles;
    const int kbegin = min(ktiles, z * kps);
    return {(t % m_tiles) * BM, t / m_tiles, kbegin, min(ktiles, kbegin + kps) - kbegin, z};
}

// The schedule of gemm90t_unit's units: a last round of r ≤ gridDim.x / 2 tiles (one split, tiles mod grid = r) goes
// as 2r half-width units, one per CTA: that round then takes about half a tile's time where a whole tile's would
// leave the other multiprocessors idle (7B gate_up at 2048 tokens: 1376 tiles, 10 rounds of 132 and one of 56).
// Units [0, full) are whole tiles, [full, units) the halves, tile full + (u − full)/2. narrow: every unit is the
// first half of its tile (the int8/int4 kernels' tiles for at most 128 tokens: their second half would be empty).
struct Gemm90TSchedule {
    int full, units;
    bool narrow;
};
OS_DEVICE Gemm90TSchedule gemm90t_schedule(int tiles, int splits, bool narrow = false) {
    if (narrow) return {0, tiles * splits, true};
    const int last = tiles % (int)gridDim.x;
    if (splits == 1 && last > 0 && 2 * last <= (int)gridDim.x) return {tiles - last, tiles + last, false};
    return {tiles * splits, tiles * splits, false};
}
template <int BM, int BN>
OS_DEVICE Gemm90TUnit gemm90t_unit_of(int u, const Gemm90TSchedule& schedule, int M, int N, int K, int kps) {
    if (u < schedule.full || schedule.narrow) {
        Gemm90TUnit unit = gemm90t_unit<BM, BN>(u, M, N, K, kps);
        if (schedule.narrow) unit.half = 0;
        return unit;
    }
    Gemm90TUnit unit = gemm90t_unit<BM, BN>(schedule.full + (u - schedule.full) / 2, M, N, K, kps);
    unit.half = (u - schedule.full) & 1;
    return unit;
}

// Arm stage `stage`'s full barrier `full` with the stage's bytes and issue k-tile i's W boxes of `unit` (A's box,
// issued apart, completes the same phase). plain: rows n0 … n0 + 255 of W in boxes of 128 (a half tile: one box);
// silu: gate rows n_tile·128 … + 127, then the same up rows (two maps), in boxes of 64 (a half tile: one of each), so
// the gate and up rows of a tile or a half always lie together as one wgmma B operand.
template <class C, bool SILU_PAIR>
OS_DEVICE void gemm90t_load_w(uint32_t stage, uint32_t full, const TensorMap* tmW0, const TensorMap* tmW1,
                              const Gemm90TUnit& unit, int i) {
    const int k = (unit.kbegin + i) * GEMM90T_BK, half = unit.half;
    const uint32_t w = stage + C::A_BYTES;
    if (SILU_PAIR) {
        const int rows = half < 0 ? GEMM90T_WBOX : GEMM90T_GATE_BOX;  // of gate, and as many of up
        const int r0 = unit.n_tile * GEMM90T_WBOX + (half < 0 ? 0 : GEMM90T_GATE_BOX * half);
        mbar_arrive_expect_tx(full, C::A_BYTES + 2 * rows * 128);
        for (int b = 0; b < rows; b += GEMM90T_GATE_BOX) {
            tma_load_2d(w + b * 128, tmW0, full, k, r0 + b);
            tma_load_2d(w + (rows + b) * 128, tmW1, full, k, r0 + b);
        }
    } else {
        const int boxes = half < 0 ? 2 : 1, r0 = unit.n_tile * GEMM90T_BN + GEMM90T_WBOX * max(half, 0);
        mbar_arrive_expect_tx(full, C::A_BYTES + boxes * GEMM90T_WBOX * 128);
        for (int b = 0; b < boxes; b++) tma_load_2d(w + b * GEMM90T_WBOX * 128, tmW0, full, k, r0 + b * GEMM90T_WBOX);
    }
}

// The stores of one unit's accumulators (warpgroup rows m0 + 64·cw …; layout as gemm_sm90.cu's: warp w holds rows
// 16w … 16w + 15, acc[4j + e] at row 16w + lane/4 + 8·(e/2), column 8j + 2·(lane mod 4) + (e mod 2)), COLS output
// columns from col0 (plain: 256, a half tile 128; silu: 128 gate columns then as many up, a half tile 64).
template <bool SILU_PAIR, int COLS>
OS_DEVICE void gemm90t_store(const float (&acc)[SILU_PAIR ? COLS : COLS / 2], const float* __restrict__ scales,
                             void* __restrict__ out, int M, int N, int row0, int col0, int z) {
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, g = lane >> 2, c2 = 2 * (lane & 3);
    if (SILU_PAIR) {  // accumulator columns 0 … COLS − 1 gate, COLS … 2·COLS − 1 up: output col0 + (column mod COLS)
        const int I = N / 2;
        bf16* o = reinterpret_cast<bf16*>(out);
#pragma unroll
        for (int j = 0; j < COLS / 8; j++) {
            const int col = col0 + 8 * j + c2;
            if (col >= I) continue;
            float sg0 = 1.f, sg1 = 1.f, su0 = 1.f, su1 = 1.f;
            if (scales) {
                sg0 = scales[col], su0 = scales[I + col];
                sg1 = scales[min(col + 1, I - 1)], su1 = scales[I + min(col + 1, I - 1)];
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = row0 + 16 * w + g + 8 * half;
                if (row >= M) continue;
                const int e = 4 * j + 2 * half, eu = e + 4 * (COLS / 8);
                const float v0 = silu(acc[e] * sg0) * (acc[eu] * su0);
                const float v1 = silu(acc[e + 1] * sg1) * (acc[eu + 1] * su1);
                bf16* p = o + (size_t)row * I + col;
                if ((I & 1) == 0) {  // even I: the pair is 4-byte aligned and col + 1 < I
                    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
                } else {
                    p[0] = __float2bfloat16(v0);
                    if (col + 1 < I) p[1] = __float2bfloat16(v1);
                }
            }
        }
        return;
    }
    float* Cf = reinterpret_cast<float*>(out) + (size_t)z * M * N;
#pragma unroll
    for (int j = 0; j < COLS / 8; j++) {
        const int col = col0 + 8 * j + c2;
        if (col >= N) continue;
        float s0 = 1.f, s1 = 1.f;
        if (scales) s0 = scales[col], s1 = scales[min(col + 1, N - 1)];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = row0 + 16 * w + g + 8 * half;
            if (row >= M) continue;
            const float v0 = acc[4 * j + 2 * half] * s0, v1 = acc[4 * j + 2 * half + 1] * s1;
            float* p = Cf + (size_t)row * N + col;
            if ((N & 1) == 0) {  // even N: z·M·N + row·N + col is even, the pair 8-byte aligned
                *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
            } else {
                p[0] = v0;
                if (col + 1 < N) p[1] = v1;
            }
        }
    }
}

// One unit's main loop on a consumer warpgroup (rows 64·cw … of the stage's A box): the wgmma of each k-tile on
// B's first WN rows (a whole tile's 256, a half tile's 128) into acc, zeroed first; the stages go back to the producer
// as their wgmma retire (wgmma_wait<1>: the wgmma of one k-tile runs while the next one's copies are waited for).
template <class C, int WN>
OS_DEVICE void gemm90t_consume(float (&acc)[WN / 2], int kt, uint32_t smem0, uint32_t bars, int cw, int& s,
                               int& phase) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < WN / 2; i++) acc[i] = 0.f;
    int held = -1;  // the stage whose wgmma may still be running
    for (int i = 0; i < kt; i++) {
        mbar_wait(bars + 8 * s, phase);
        const uint32_t stage = smem0 + s * C::STAGE_BYTES;
        const uint64_t da = wgmma_desc_tma(stage + cw * 64 * 128), db = wgmma_desc_tma(stage + C::A_BYTES);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < GEMM90T_BK / 16; j++) {
            if constexpr (WN == 256) wgmma_m64n256k16(acc, da + 2 * j, db + 2 * j, 1);
            else wgmma_ss_m64n128k16(acc, da + 2 * j, db + 2 * j, 1);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (held >= 0) {
            __syncwarp();
            if (lane == 0) mbar_arrive(bars + 8 * (C::STAGES + held));
        }
        held = s;
        if (++s == C::STAGES) s = 0, phase ^= 1;
    }
    wgmma_wait<0>();
    if (held >= 0) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bars + 8 * (C::STAGES + held));
    }
}

template <class C, bool SILU_PAIR>
OS_DEVICE void gemm90t_body(const TensorMap* tmA, const TensorMap* tmW0, const TensorMap* tmW1,
                            const float* __restrict__ scales, void* __restrict__ out, int M, int N, int K, int kps,
                            int splits, bool w_early) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t smem0 = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t bars = smem0 + C::STAGES * C::STAGE_BYTES;  // full[s] at bars + 8s, empty[s] at +8·(STAGES + s)
    const Gemm90TSchedule schedule =
        gemm90t_schedule((M + C::BM - 1) / C::BM * ((N + GEMM90T_BN - 1) / GEMM90T_BN), splits);
    const int units = schedule.units, wg = threadIdx.x >> 7;
    if (threadIdx.x == 0) {
        for (int s = 0; s < C::STAGES; s++) {
            mbar_init(bars + 8 * s, 1);                                   // the producer's arrive (+ the bytes)
            mbar_init(bars + 8 * (C::STAGES + s), 4 * C::CONSUMERS);      // one arrive per consumer warp
        }
        fence_proxy_async();  // the initialised barriers, visible to the TMA unit's complete_tx
    }
    __syncthreads();

    if (wg == 0) {  // ── producer ──
        if constexpr (C::CONSUMERS > 1) setmaxnreg_dec<GEMM90T_PRODUCER_REGS>();
        if (threadIdx.x != 0) return;
        tma_prefetch_map(tmA), tma_prefetch_map(tmW0), tma_prefetch_map(tmW1);
        // w_early: the W boxes of the first unit's first STAGES k-tiles go before the wait (the stages are fresh),
        // streaming while the previous kernel drains; their A boxes follow it.
        int early = 0;
        if (w_early && (int)blockIdx.x < units) {
            const Gemm90TUnit unit = gemm90t_unit_of<C::BM, GEMM90T_BN>(blockIdx.x, schedule, M, N, K, kps);
            early = min(unit.kt, C::STAGES);
            for (int i = 0; i < early; i++)
                gemm90t_load_w<C, SILU_PAIR>(smem0 + i * C::STAGE_BYTES, bars + 8 * i, tmW0, tmW1, unit, i);
        }
        grid_dependency_wait();
        int s = 0, phase = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x) {
            const Gemm90TUnit unit = gemm90t_unit_of<C::BM, GEMM90T_BN>(u, schedule, M, N, K, kps);
            for (int i = 0; i < unit.kt; i++) {
                const uint32_t full = bars + 8 * s, stage = smem0 + s * C::STAGE_BYTES;
                if (u != (int)blockIdx.x || i >= early) {
                    mbar_wait(bars + 8 * (C::STAGES + s), phase ^ 1);  // the consumers released this stage
                    gemm90t_load_w<C, SILU_PAIR>(stage, full, tmW0, tmW1, unit, i);
                }
                tma_load_2d(stage, tmA, full, (unit.kbegin + i) * GEMM90T_BK, unit.m0);
                if (++s == C::STAGES) s = 0, phase ^= 1;
            }
        }
        return;
    }

    // ── consumers: warpgroup cw = wg − 1 computes rows 64·cw … + 63 of each tile ──
    if constexpr (C::CONSUMERS > 1) setmaxnreg_inc<GEMM90T_CONSUMER_REGS>();
    grid_dependency_wait();  // before the stores (the previous kernel may still read the output buffer)
    const int cw = wg - 1;
    int s = 0, phase = 0;
    constexpr int COLS = SILU_PAIR ? GEMM90T_WBOX : GEMM90T_BN;  // output columns of a whole tile
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const Gemm90TUnit unit = gemm90t_unit_of<C::BM, GEMM90T_BN>(u, schedule, M, N, K, kps);
        const int row0 = unit.m0 + 64 * cw, col0 = unit.n_tile * COLS;
        if (unit.half < 0) {
            float acc[128];
            gemm90t_consume<C, GEMM90T_BN>(acc, unit.kt, smem0, bars, cw, s, phase);
            gemm90t_store<SILU_PAIR, COLS>(acc, scales, out, M, N, row0, col0, unit.z);
        } else {  // a half tile: 128 columns of B, half the accumulators
            float acc[64];
            gemm90t_consume<C, GEMM90T_BN / 2>(acc, unit.kt, smem0, bars, cw, s, phase);
            gemm90t_store<SILU_PAIR, COLS / 2>(acc, scales, out, M, N, row0, col0 + COLS / 2 * unit.half, unit.z);
        }
    }
}
#endif

// Grid: (min(units, multiprocessors)), units = ceil(M / BM) · ceil(N / 256) · splits; block: Gemm90TConfig::THREADS
// (384 for bm128, 256 for bm64); dynamic shared memory Gemm90TConfig::SMEM. Tensor maps (bf16, 128-byte swizzle):
// A [M, K] box 64 × BM; plain: W0 = W1 = W [N, K] box 64 × 128; silu: W0 = gate [N/2, K], W1 = up [N/2, K] (rows
// N/2 … of W), box 64 × 64 (GEMM90T_GATE_BOX). The grid sets the schedule (gemm90t_schedule). scales [N] f32 or
// null. Plain: split z covers k-tiles [z·kps, min((z+1)·kps, ceil(K / 64))) and writes its partial sum to C + z·M·N
// (C [splits, M, N] f32; an empty split writes zeros). Silu: one split, C [M, N/2] bf16 = SiLU(A·gateᵀ)·(A·upᵀ).
// w_early: 1 when no kernel writes W (the model's weights): its first stages are copied before the grid dependency
// wait (common.cuh); 0 for a scratch an earlier kernel filled (runtime/cuda/kernels.py Kernels.gemm static_weights).
#ifndef OS_GEMM90T
template <class C, bool SILU_PAIR>  // other targets: the entries exist, empty (never launched there)
OS_DEVICE void gemm90t_body(const TensorMap*, const TensorMap*, const TensorMap*, const float*, void*, int, int, int,
                            int, int, bool) {
    grid_dependency_wait();
}
#endif
#define GEMM90T_KERNEL(BMV)                                                                                        \
    extern "C" __global__ void __launch_bounds__(Gemm90TBM##BMV::THREADS, 1)                                       \
        gemm90tma_bf16_bm##BMV(const __grid_constant__ TensorMap tmA, const __grid_constant__ TensorMap tmW0,      \
                               const __grid_constant__ TensorMap tmW1, const float* scales, float* C, int M, int N, \
                               int K, int ktiles_per_split, int splits, int w_early) {                             \
        grid_dependents_launch();                                                                                  \
        gemm90t_body<Gemm90TBM##BMV, false>(&tmA, &tmW0, &tmW1, scales, C, M, N, K, ktiles_per_split, splits,      \
                                            w_early);                                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(Gemm90TBM##BMV::THREADS, 1)                                       \
        gemm90tma_bf16_silu_bm##BMV(const __grid_constant__ TensorMap tmA, const __grid_constant__ TensorMap tmW0, \
                                    const __grid_constant__ TensorMap tmW1, const float* scales, bf16* C, int M,   \
                                    int N, int K, int w_early) {                                                   \
        grid_dependents_launch();                                                                                  \
        gemm90t_body<Gemm90TBM##BMV, true>(&tmA, &tmW0, &tmW1, scales, C, M, N, K, 1 << 30, 1, w_early);           \
    }
GEMM90T_KERNEL(64)
GEMM90T_KERNEL(128)

// ── int8 weights in the main loop ────────────────────────────────────────────────────────────────────────────────
// y = x·Wᵀ for W int8 in pack_q8's layout (runtime/cuda/quant_layout.py: 16-row tiles, 512-byte chunks of 32 k, lane
// 4g + c's 16 bytes rows g, g+8 at k 8c … 8c+7) with f32 row scales, past the 64 rows of gemm_quant.cu's kernels
// (prefill): computed as Dᵀ = W·xᵀ, the weights wgmma's A operand from registers (m64: 64 weight rows per consumer
// warpgroup, warp w one device tile of 16) and the activations its B operand from shared memory (n256: 256 tokens,
// K-major, the 128-byte swizzle), so the int8 bytes are what the copies move and the widening to bf16 is a few ALU
// operations per register on the consumers, next to the asynchronous wgmma (Machete's and CUTLASS's mixed-input
// GEMMs make the same choice: the narrow operand through registers).
//   The producer copies, per k-tile of 64, x's box [256 tokens][64] (32 KB) and each of the 8 device tiles' 1 KB
//   (2 chunks) as a box of 8 rows × 128 bytes of the matrix viewed as [Np·K/128][128 bytes], with the TMA's 128-byte
//   swizzle: the 16-byte unit (g, c') of chunk h lands in 128-byte row 4h + g/2 at slot (4·(g mod 2) + c') ^ row.
//   A consumer warp takes its tile's chunk with one ldmatrix.x4 (matrix i = the units (g, i), g = 0 … 7: one per bank
//   group thanks to the swizzle) → word c of unit (g, i): rows g (c even) or g + 8 (c odd), k 8i + 4·(c/2) … +3.
//   The wgmma fragment of lane 4g + c needs rows g and g + 8 at k 2c, 2c+1 of each 8: its partner lane c ^ 1 holds
//   the other row's word (one shuffle), and one byte permute gathers the two rows' k pair into bytes 0, 2 (row g) and
//   1, 3 (row g + 8), which q8_pair widens exactly. The row scale goes in the epilogue (the product of q and x is
//   exact in f32, as in gemm_quant.cu): out = scale·Σ q·x.
// Fragments are double-buffered in registers: a k-tile's are written while the wgmma of the one before still reads
// the other set (wgmma_wait<1> retires that one before its registers are rewritten).
// int4 (pack_q4's layout: a device tile's 64-k chunk is 512 bytes, lane 4g + c's word j rows g and g + 8 at k
// 32·(j/2) + 8c + 4·(j mod 2) … +3 as nibbles) on the same pipeline: a k-tile of a device tile is one chunk, copied
// as 4 rows of 128 bytes into the first half of its 1 KB slot. The fragment of lane 4g + c for k16 block b needs word
// 2·(b/2) + c/2 of the units (g, 2·(b mod 2)) and (g, 2·(b mod 2) + 1): one 32-bit load each (conflict-free: the 8
// rows g sit in 8 distinct 16-byte bank groups after the swizzle), shifted by 8·(c mod 2) to the k pair of this lane,
// q − z exactly in bf16 (gemm_quant.cu's trick), then times the group's f16 scale split in two bf16 parts and
// rounded once (q4t_weight): the weights dequantize_q4 writes, bit for bit, so the result is the scratch path's up
// to the order of the sums. The group scales and zeros of a k-tile are read from global memory (L1/L2) before the
// wait for its stage.
// Plain: C [splits, M, N] f32 partials (columns in the canonical row order: pairs maps the [gate; up] tile rows
// back); silu (pairs layout, one split): C [M, N/2] bf16 = SiLU(gate)·up, both halves of an output in one thread.
constexpr int Q8T_TOKENS = 256;  // tokens per tile (the wgmma's n)
constexpr int Q8T_ROWS = 128;    // weight rows per tile: 2 consumer warpgroups × 64 (8 device tiles of 16 rows)
constexpr int Q8T_STAGES = 5;

struct Q8TConfig {
    static constexpr int CONSUMERS = Q8T_ROWS / 64, THREADS = 128 * (1 + CONSUMERS), STAGES = Q8T_STAGES;
    static constexpr int X_BYTES = Q8T_TOKENS * GEMM90T_BK * 2;  // x box [256][64] bf16
    static constexpr int W_BYTES = Q8T_ROWS * GEMM90T_BK;        // 8 device tiles × 1 KB (int8: all of it)
    static constexpr int STAGE_BYTES = X_BYTES + W_BYTES;
    static constexpr int Q4_TILE_BYTES = 16 * GEMM90T_BK / 2;    // int4: a device tile's chunk, 512 bytes of its slot
    static constexpr int SMEM = STAGES * STAGE_BYTES + 1024 + 2 * STAGES * 8;
    static_assert(STAGE_BYTES % 1024 == 0 && SMEM <= 227 * 1024, "1 KB aligned stages, sm_90's shared memory");
};

#ifdef OS_GEMM90T
#ifndef OS_EMULATE_SM90  // the emulator's model: emu.h, wgmma_rs_m64n256k16
// D[64 × 256] += A[64 × 16]·B[256 × 16]ᵀ: A from four bf16x2 registers per thread (the m16n8k16 A fragment of warp
// w's rows 16w …), B K-major bf16 from a descriptor; asynchronous as wgmma_m64n256k16.
OS_DEVICE void wgmma_rs_m64n256k16(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{" WGMMA_D128 "}, "
        "{%128, %129, %130, %131}, %132, 1, 1, 1, 0;\n"
        : WGMMA_D128_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
// The same for D[64 × 128] (a half tile's 128 tokens).
OS_DEVICE void wgmma_rs_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{" WGMMA_D64 "}, "
        "{%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
        : WGMMA_D64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
#endif

// This lane's ldmatrix row address in a tile's 1 KB for chunk h (lane 8i + g names unit (g, i), swizzled as copied).
OS_DEVICE uint32_t q8t_ldmatrix_offset(int h) {
    const int lane = threadIdx.x & 31, i = lane >> 3, g = lane & 7, row = 4 * h + (g >> 1);
    return 128 * row + 16 * ((4 * (g & 1) + i) ^ row);
}

// The A fragments of one k-tile's four k16 blocks for the warp's device tile (its 1 KB at `tile_smem`).
OS_DEVICE void q8t_fragments(uint32_t tile_smem, uint32_t (&f)[4][4]) {
    const uint32_t sel = (threadIdx.x & 1) ? 0x3715u : 0x6240u;  // bytes 1, 3 (c odd) or 0, 2 of both rows' words
#pragma unroll
    for (int h = 0; h < 2; h++) {
        uint32_t r[4];
        ldmatrix_x4_s(r, tile_smem + q8t_ldmatrix_offset(h));
#pragma unroll
        for (int i = 0; i < 4; i++) {  // unit i: k 8i … 8i+7 of the chunk, the low (i even) or high half of a block
            const uint32_t x = __byte_perm(r[i], __shfl_xor_sync(0xffffffffu, r[i], 1), sel);
            f[2 * h + (i >> 1)][2 * (i & 1)] = q8_pair(x);           // row g
            f[2 * h + (i >> 1)][2 * (i & 1) + 1] = q8_pair(x >> 8);  // row g + 8
        }
    }
}

// An int4 group scale s (f16, exact in f32) as two bf16 parts, s_hi = bf16(s) and s_lo = s − s_hi (at most 3
// significant bits, exact): then for an integer d = q − z (|d| ≤ 15) the bf16 product d·s rounds once as
// fma(d, s_hi, d·s_lo), since d·s_lo is exact in bf16 (≤ 7 bits) and the fused add sees d·s exactly. That is
// dequantize_q4's weight (the f32 product rounded to bf16) bit for bit, in two bf16x2 operations per register
// instead of widening both lanes to f32, scaling and packing them again (five): the int4 consumers' main cost.
struct Q4TScale {
    uint32_t hi_g, lo_g, hi_g8, lo_g8;  // s_hi, s_lo of rows g and g + 8, each in both bf16 lanes
    uint32_t z_g, z_g8;                 // −(128 + z) of rows g and g + 8 in both lanes
};
OS_DEVICE Q4TScale q4t_scale(uint32_t scale, uint32_t zb) {
    const float2 s = f16x2_to_float2(scale);
    const uint32_t hi = pack_bf16x2(s.x, s.y), lo = pack_bf16x2(s.x - bf16_lo(hi), s.y - bf16_hi(hi));
    return {__byte_perm(hi, 0, 0x1010), __byte_perm(lo, 0, 0x1010), __byte_perm(hi, 0, 0x3232),
            __byte_perm(lo, 0, 0x3232), 0xC300C300u | ((zb & 15u) * 0x10001u),
            0xC300C300u | (((zb >> 4) & 15u) * 0x10001u)};
}

// An int4 k-tile's group scales (f16 pair: rows g, g + 8) and zero bytes (z_g | z_g8 << 4) of this lane: the groups
// of k 0 … 31 and 32 … 63 (the same group from G = 64 on, then scaled once). Loaded before the wait for the stage
// and used after it, so the loads are in flight while the copies land.
struct Q4TGroups {
    uint32_t scale[2], zero[2];
    bool one;  // G ≥ 64: one group per k-tile
};
OS_DEVICE Q4TGroups q4t_groups(const uint32_t* __restrict__ scales, const uint8_t* __restrict__ zeros, int tile,
                               int ktile, int K, int log2g) {
    const int g = (threadIdx.x & 31) >> 2, groups = K >> log2g;
    Q4TGroups q;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const size_t at = ((size_t)tile * groups + ((GEMM90T_BK * ktile + 32 * h) >> log2g)) * 8 + g;
        q.scale[h] = __ldg(scales + at);
        q.zero[h] = zeros ? (uint32_t)__ldg(zeros + at) : 0x88u;
    }
    q.one = log2g > 5;
    return q;
}

// One bf16x2 A register of an int4 row: nibbles (k, k + 1) of w → d = q − z exactly (gemm_quant.cu's trick) → d·s.
OS_DEVICE uint32_t q4t_weight(uint32_t w, uint32_t z, uint32_t hi, uint32_t lo) {
    constexpr uint32_t NEG_ZERO = 0x80008000u;  // −0 + p = p for every p, −0 included: an exact product stays exact
    const uint32_t d = fma_bf16x2(and_or(w, 0x000F000Fu, 0x43004300u), 0x3F803F80u, z);
    return fma_bf16x2(d, hi, fma_bf16x2(d, lo, NEG_ZERO));
}

// The int4 A fragments of one k-tile's four k16 blocks for the warp's device tile (its chunk at `tile`).
OS_DEVICE void q4t_fragments(const unsigned char* tile, const Q4TGroups& q, uint32_t (&f)[4][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, line = g >> 1, shift = 8 * (c & 1);
    const Q4TScale s0 = q4t_scale(q.scale[0], q.zero[0]);
    const Q4TScale s1 = q.one ? s0 : q4t_scale(q.scale[1], q.zero[1]);
#pragma unroll
    for (int b = 0; b < 4; b++) {
        const Q4TScale& s = b < 2 ? s0 : s1;
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {  // unit c' = 2·(b mod 2) + hi: k 8c' … of the block's half chunk
            const int unit = 2 * (b & 1) + hi, j = 2 * (b >> 1) + (c >> 1);
            const int at = 128 * line + 16 * ((4 * (g & 1) + unit) ^ line) + 4 * j;
            const uint32_t w = *reinterpret_cast<const uint32_t*>(tile + at) >> shift;
            f[b][2 * hi] = q4t_weight(w, s.z_g, s.hi_g, s.lo_g);             // row g
            f[b][2 * hi + 1] = q4t_weight(w >> 4, s.z_g8, s.hi_g8, s.lo_g8);  // row g + 8
        }
    }
}

// One k-tile of a consumer warpgroup: its fragments from stage `stage` (int8, or int4 with its groups), then the
// four wgmma (one commit group) on TOKENS of the stage's x box from token `first` (256 from 0, or a half tile's 128).
template <bool Q4, int TOKENS>
OS_DEVICE void q8t_ktile(float (&acc)[TOKENS / 2], uint32_t (&f)[4][4], uint32_t stage, const unsigned char* stage_ptr,
                         int tile_in_unit, const Q4TGroups& groups, int first) {
    if (Q4) q4t_fragments(stage_ptr + Q8TConfig::X_BYTES + 1024 * tile_in_unit, groups, f);
    else q8t_fragments(stage + Q8TConfig::X_BYTES + 1024 * tile_in_unit, f);
    const uint64_t db = wgmma_desc_tma(stage + 128 * first);  // K-major: 128 bytes per token row
    wgmma_fence();  // the fragment registers written above, before the wgmma read them
#pragma unroll
    for (int j = 0; j < GEMM90T_BK / 16; j++) {
        if constexpr (TOKENS == Q8T_TOKENS) wgmma_rs_m64n256k16(acc, f[j], db + 2 * j);
        else wgmma_rs_m64n128k16(acc, f[j], db + 2 * j);
    }
    wgmma_commit();
}

// The stores of one warp's accumulators: device tile `tile` (rows g, g + 8 of this lane: acc[4j + e] and
// acc[4j + 2 + e], e = 0, 1, at token token0 + 8j + 2c + e, TOKENS of them), times the row scales (int8; none: int4).
template <bool SILU, int TOKENS>
OS_DEVICE void q8t_store(const float (&acc)[TOKENS / 2], const float* __restrict__ scales, void* __restrict__ out,
                         int M, int N, int tile, int token0, int z, bool pairs) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c2 = 2 * (lane & 3);
    const float s_g = scales ? scales[16 * tile + g] : 1.f, s_g8 = scales ? scales[16 * tile + g + 8] : 1.f;
    if (SILU) {  // rows g, g + 8: gate and up of intermediate 8·tile + g
        const int I = N / 2, col = 8 * tile + g;
        bf16* o = reinterpret_cast<bf16*>(out);
#pragma unroll
        for (int j = 0; j < TOKENS / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int token = token0 + 8 * j + c2 + e;
                if (token < M)
                    o[(size_t)token * I + col] =
                        __float2bfloat16(silu(acc[4 * j + e] * s_g) * (acc[4 * j + 2 + e] * s_g8));
            }
        return;
    }
    const int n_g = pairs ? 8 * tile + g : 16 * tile + g, n_g8 = pairs ? N / 2 + 8 * tile + g : 16 * tile + 8 + g;
    float* Cf = reinterpret_cast<float*>(out) + (size_t)z * M * N;
#pragma unroll
    for (int j = 0; j < TOKENS / 8; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int token = token0 + 8 * j + c2 + e;
            if (token >= M) continue;
            if (n_g < N) Cf[(size_t)token * N + n_g] = acc[4 * j + e] * s_g;
            if (n_g8 < N) Cf[(size_t)token * N + n_g8] = acc[4 * j + 2 + e] * s_g8;
        }
}

// What a consumer warp's main loop reads: the stages and their barriers, the int4 groups, its device tile in a unit.
struct Q8TStream {
    uint32_t smem0;
    const unsigned char* smem_ptr;
    uint32_t bars;
    const uint32_t* gscales;
    const uint8_t* zeros;
    int tiles, K, log2g, tile_in_unit;
};

// One unit's main loop on a consumer warpgroup for its device tile `tile`, into acc (zeroed first): TOKENS = 256 (a
// whole tile) or 128 (a half tile, tokens 128·half … of the stage's x box). Fragments alternate between fa and fb: a
// k-tile's are written while the wgmma of the one before still reads the other set (wgmma_wait<1> retires that one
// before its registers are rewritten), and each stage goes back to the producer once its wgmma retired.
template <bool Q4, int TOKENS>
OS_DEVICE void q8t_consume(float (&acc)[TOKENS / 2], uint32_t (&fa)[4][4], uint32_t (&fb)[4][4], const Q8TStream& st,
                           const Gemm90TUnit& unit, int tile, int& s, int& phase) {
    using C = Q8TConfig;
    const int lane = threadIdx.x & 31;
    const int first = unit.half < 0 ? 0 : TOKENS * unit.half;
    auto release = [&](int stage) {
        __syncwarp();
        if (lane == 0) mbar_arrive(st.bars + 8 * (C::STAGES + stage));
    };
#pragma unroll
    for (int i = 0; i < TOKENS / 2; i++) acc[i] = 0.f;
    int held = -1;  // the stage whose wgmma may still be running
    for (int i = 0; i < unit.kt; i++) {
        Q4TGroups groups{};  // int4: loaded before the wait, in flight while the stage's copies land
        if (Q4 && tile < st.tiles) groups = q4t_groups(st.gscales, st.zeros, tile, unit.kbegin + i, st.K, st.log2g);
        mbar_wait(st.bars + 8 * s, phase);
        const uint32_t stage = st.smem0 + s * C::STAGE_BYTES;
        const unsigned char* stage_ptr = st.smem_ptr + s * C::STAGE_BYTES;
        if (i & 1) q8t_ktile<Q4, TOKENS>(acc, fb, stage, stage_ptr, st.tile_in_unit, groups, first);
        else q8t_ktile<Q4, TOKENS>(acc, fa, stage, stage_ptr, st.tile_in_unit, groups, first);
        wgmma_wait<1>();  // the previous k-tile's wgmma retired: its stage and its fragment set are free
        if (held >= 0) release(held);
        held = s;
        if (++s == C::STAGES) s = 0, phase ^= 1;
    }
    wgmma_wait<0>();
    if (held >= 0) release(held);
}

// Units: (token tile, 8-tile weight tile, split) in gemm90t_unit's order (token tiles fastest), over M tokens and the
// Np = 16·tiles device rows. Q4: int4 with group scales gscales, zeros (or null) and group size 2^log2g; else int8
// with the row scales `scales`.
template <bool SILU, bool Q4>
OS_DEVICE void q8t_body(const TensorMap* tmX, const TensorMap* tmW, const float* __restrict__ scales,
                        const uint32_t* __restrict__ gscales, const uint8_t* __restrict__ zeros, int log2g,
                        void* __restrict__ out, int M, int N, int K, int kps, int splits, bool pairs) {
    using C = Q8TConfig;
    // a device tile's k-tile: int8 8 rows of 128 bytes (K/8 per tile), int4 4 rows (K/16)
    constexpr int BOX_ROWS = Q4 ? 4 : 8, TX_BYTES = C::X_BYTES + Q8T_ROWS / 16 * BOX_ROWS * 128;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t smem0 = (smem_u32(smem_raw) + 1023) & ~1023u;
    const unsigned char* smem_ptr = smem_raw + (smem0 - smem_u32(smem_raw));
    const uint32_t bars = smem0 + C::STAGES * C::STAGE_BYTES;  // full[s] at bars + 8s, empty[s] at +8·(STAGES + s)
    const int tiles = (N + 15) / 16, Np = 16 * tiles, lines = K / (Q4 ? 16 : 8);  // rows of 128 bytes per tile
    const Gemm90TSchedule schedule = gemm90t_schedule(
        (M + Q8T_TOKENS - 1) / Q8T_TOKENS * ((Np + Q8T_ROWS - 1) / Q8T_ROWS), splits, M <= Q8T_TOKENS / 2);
    const int units = schedule.units, wg = threadIdx.x >> 7;
    if (threadIdx.x == 0) {
        for (int s = 0; s < C::STAGES; s++) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (C::STAGES + s), 4 * C::CONSUMERS);
        }
        fence_proxy_async();
    }
    __syncthreads();

    if (wg == 0) {  // ── producer ──
        setmaxnreg_dec<GEMM90T_PRODUCER_REGS>();
        if (threadIdx.x != 0) return;
        tma_prefetch_map(tmX), tma_prefetch_map(tmW);
        // the weights of the first unit's first stages before the wait (model weights: no kernel writes them)
        auto load_w = [&](uint32_t stage, uint32_t full, const Gemm90TUnit& unit, int i) {
            mbar_arrive_expect_tx(full, TX_BYTES);
            for (int t = 0; t < Q8T_ROWS / 16; t++)
                tma_load_2d(stage + C::X_BYTES + 1024 * t, tmW, full, 0,
                            (unit.n_tile * (Q8T_ROWS / 16) + t) * lines + BOX_ROWS * (unit.kbegin + i));
        };
        int early = 0;
        if ((int)blockIdx.x < units) {
            const Gemm90TUnit unit = gemm90t_unit_of<Q8T_TOKENS, Q8T_ROWS>(blockIdx.x, schedule, M, Np, K, kps);
            early = min(unit.kt, C::STAGES);
            for (int i = 0; i < early; i++) load_w(smem0 + i * C::STAGE_BYTES, bars + 8 * i, unit, i);
        }
        grid_dependency_wait();
        int s = 0, phase = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x) {
            const Gemm90TUnit unit = gemm90t_unit_of<Q8T_TOKENS, Q8T_ROWS>(u, schedule, M, Np, K, kps);
            for (int i = 0; i < unit.kt; i++) {
                const uint32_t full = bars + 8 * s, stage = smem0 + s * C::STAGE_BYTES;
                if (u != (int)blockIdx.x || i >= early) {
                    mbar_wait(bars + 8 * (C::STAGES + s), phase ^ 1);
                    load_w(stage, full, unit, i);
                }
                tma_load_2d(stage, tmX, full, (unit.kbegin + i) * GEMM90T_BK, unit.m0);
                if (++s == C::STAGES) s = 0, phase ^= 1;
            }
        }
        return;
    }

    // ── consumers: warpgroup cw, warp w: device tile 4·cw + w of the unit's 8 ──
    setmaxnreg_inc<GEMM90T_CONSUMER_REGS>();
    grid_dependency_wait();
    const int cw = wg - 1, tile_in_unit = 4 * cw + ((threadIdx.x >> 5) & 3);
    int s = 0, phase = 0;
    uint32_t fa[4][4], fb[4][4];
    const Q8TStream stream{smem0, smem_ptr, bars, gscales, zeros, tiles, K, log2g, tile_in_unit};
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const Gemm90TUnit unit = gemm90t_unit_of<Q8T_TOKENS, Q8T_ROWS>(u, schedule, M, Np, K, kps);
        const int tile = unit.n_tile * (Q8T_ROWS / 16) + tile_in_unit;
        if (unit.half < 0) {
            float acc[Q8T_TOKENS / 2];
            q8t_consume<Q4, Q8T_TOKENS>(acc, fa, fb, stream, unit, tile, s, phase);
            if (tile < tiles) q8t_store<SILU, Q8T_TOKENS>(acc, scales, out, M, N, tile, unit.m0, unit.z, pairs);
        } else {  // a half tile: tokens m0 + 128·half …
            float acc[Q8T_TOKENS / 4];
            q8t_consume<Q4, Q8T_TOKENS / 2>(acc, fa, fb, stream, unit, tile, s, phase);
            if (tile < tiles)
                q8t_store<SILU, Q8T_TOKENS / 2>(acc, scales, out, M, N, tile, unit.m0 + Q8T_TOKENS / 2 * unit.half,
                                                unit.z, pairs);
        }
    }
}
#else
template <bool SILU, bool Q4>  // other targets: the entries exist, empty (never launched there)
OS_DEVICE void q8t_body(const TensorMap*, const TensorMap*, const float*, const uint32_t*, const uint8_t*, int, void*,
                        int, int, int, int, int, bool) {
    grid_dependency_wait();
}
#endif

// Grid: (min(units, multiprocessors)), units = ⌈M/256⌉ · ⌈Np/128⌉ · splits; block: 384 threads; dynamic shared memory
// Q8TConfig::SMEM. tmX: x [M, K] bf16, box 64 × 256; qweight_map: the device matrix (pack_q8, Np = ⌈N/16⌉·16 rows,
// K % 32 == 0) viewed as [Np·K/128, 64] bf16, box 64 × 8; scales [Np] f32 (pack_q8's order). Plain: split z covers
// k-tiles [z·kps, …) into C + z·M·N (C [splits, M, N] f32, columns in canonical order; pairs: a [gate; up] matrix
// packed with pairs=True); silu (pairs=True packing, N = 2I): C [M, I] bf16 = SiLU(x·gateᵀ)·(x·upᵀ).
extern "C" __global__ void __launch_bounds__(Q8TConfig::THREADS, 1)
    gemm90tma_q8(const __grid_constant__ TensorMap tmX, const __grid_constant__ TensorMap qweight_map,
                 const float* scales, float* C, int M, int N, int K, int ktiles_per_split, int splits, int pairs) {
    grid_dependents_launch();
    q8t_body<false, false>(&tmX, &qweight_map, scales, nullptr, nullptr, 0, C, M, N, K, ktiles_per_split, splits,
                           pairs != 0);
}
extern "C" __global__ void __launch_bounds__(Q8TConfig::THREADS, 1)
    gemm90tma_q8_silu(const __grid_constant__ TensorMap tmX, const __grid_constant__ TensorMap qweight_map,
                      const float* scales, bf16* C, int M, int N, int K) {
    grid_dependents_launch();
    q8t_body<true, false>(&tmX, &qweight_map, scales, nullptr, nullptr, 0, C, M, N, K, 1 << 30, 1, true);
}
// int4 (pack_q4's layout, K % 64 == 0, group size 2^log2g ∈ {32, 64, 128}): qweight_map views the device matrix as
// [Np·K/256, 64] bf16, box 64 × 4; scales f16 [Np, K/G] and zeros u8 [Np/2, K/G] (or null: symmetric) in pack_q4's
// order; the rest as the int8 entries (no row scales).
extern "C" __global__ void __launch_bounds__(Q8TConfig::THREADS, 1)
    gemm90tma_q4(const __grid_constant__ TensorMap tmX, const __grid_constant__ TensorMap qweight_map,
                 const uint32_t* scales, const uint8_t* zeros, float* C, int M, int N, int K, int log2g,
                 int ktiles_per_split, int splits, int pairs) {
    grid_dependents_launch();
    q8t_body<false, true>(&tmX, &qweight_map, nullptr, scales, zeros, log2g, C, M, N, K, ktiles_per_split, splits,
                          pairs != 0);
}
extern "C" __global__ void __launch_bounds__(Q8TConfig::THREADS, 1)
    gemm90tma_q4_silu(const __grid_constant__ TensorMap tmX, const __grid_constant__ TensorMap qweight_map,
                      const uint32_t* scales, const uint8_t* zeros, bf16* C, int M, int N, int K, int log2g) {
    grid_dependents_launch();
    q8t_body<true, true>(&tmX, &qweight_map, nullptr, scales, zeros, log2g, C, M, N, K, 1 << 30, 1, true);
}
