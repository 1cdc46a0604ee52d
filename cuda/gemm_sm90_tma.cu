// Hopper projection GEMM fed by the Tensor Memory Accelerator (sm_90a: TMA bulk tensor copies, mbarriers, wgmma):
// C = A·Wᵀ, A [M, K] bf16 activations, W [N, K] bf16 weights, f32 accumulation. gemm_sm90.cu's tiles and epilogues,
// with the copies taken off the math warps:
//
//   warpgroup 0 (producer): one thread issues the TMA copies of each k-tile into a ring of STAGES shared-memory stages
//     (A's box of BM rows × 64 columns, W's two boxes of 128 rows × 64), arming the stage's `full` mbarrier with the
//     stage's byte count (expect_tx); it refills a stage once its `empty` mbarrier says every consumer warp retired
//     the wgmma that read it. It gives its registers to the consumers (setmaxnreg.dec) and does nothing else.
//   warpgroups 1 … (consumers, 64 rows each): wait for a stage's `full` phase, issue wgmma.mma_async m64n256k16 × 4
//     on it straight from shared memory, and release the stage of the k-tile before (wgmma_wait<1>: the wgmma of
//     one k-tile runs while the next one's copies are waited for).
//
// Tiles: bm128 (two consumer warpgroups, 4 stages of 48 KB: prefill) and bm64 (one consumer, 5 stages of 40 KB: skinny
// decode batches, where the projection streams W). The 128-byte swizzle is the TMA's own (boxes 128 bytes wide,
// stages 1024-byte aligned), the layout the wgmma descriptors read, as in gemm_sm90.cu.
// Persistent: a grid of at most one CTA per multiprocessor walks the work units u = z·tiles + t (split z, tile t,
// M-tile fastest) with stride gridDim.x; the producer runs ahead into the next unit while the consumers store the
// last one's accumulators (the epilogue is hidden behind the next tile's copies).
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

// One work unit: tile t of the M-tile-fastest order, split z's k-tiles [kbegin, kbegin + kt).
struct Gemm90TUnit {
    int m0, n_tile, kbegin, kt, z;
};
template <class C>
OS_DEVICE Gemm90TUnit gemm90t_unit(int u, int M, int N, int K, int kps) {
    const int m_tiles = (M + C::BM - 1) / C::BM, tiles = m_tiles * ((N + GEMM90T_BN - 1) / GEMM90T_BN);
    const int ktiles = (K + GEMM90T_BK - 1) / GEMM90T_BK, z = u / tiles, t = u % tiles;
    const int kbegin = min(ktiles, z * kps);
    return {(t % m_tiles) * C::BM, t / m_tiles, kbegin, min(ktiles, kbegin + kps) - kbegin, z};
}

// Arm stage `stage`'s full barrier `full` with the whole stage's bytes and issue k-tile i's W boxes of `unit` (A's
// box, issued apart, completes the same phase). plain: rows n0 … n0 + 255 of W; silu: gate and up rows n_tile·128 …
// + 127 (two maps).
template <class C, bool SILU_PAIR>
OS_DEVICE void gemm90t_load_w(uint32_t stage, uint32_t full, const TensorMap* tmW0, const TensorMap* tmW1,
                              const Gemm90TUnit& unit, int i) {
    const int w0 = unit.n_tile * (SILU_PAIR ? GEMM90T_WBOX : GEMM90T_BN), w1 = w0 + (SILU_PAIR ? 0 : GEMM90T_WBOX);
    const int k = (unit.kbegin + i) * GEMM90T_BK;
    mbar_arrive_expect_tx(full, C::STAGE_BYTES);
    tma_load_2d(stage + C::A_BYTES, tmW0, full, k, w0);
    tma_load_2d(stage + C::A_BYTES + GEMM90T_WBOX * 128, tmW1, full, k, w1);
}

// The stores of one unit's accumulators (warpgroup rows m0 + 64·cw …; layout as gemm_sm90.cu's: warp w holds rows
// 16w … 16w + 15, acc[4j + e] at row 16w + lane/4 + 8·(e/2), column 8j + 2·(lane mod 4) + (e mod 2)).
template <bool SILU_PAIR>
OS_DEVICE void gemm90t_store(const float (&acc)[128], const float* __restrict__ scales, void* __restrict__ out,
                             int M, int N, int row0, int n_tile, int z) {
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, g = lane >> 2, c2 = 2 * (lane & 3);
    if (SILU_PAIR) {  // columns 0 … 127 gate, 128 … 255 up, output column n_tile·128 + (column mod 128)
        const int I = N / 2;
        bf16* o = reinterpret_cast<bf16*>(out);
#pragma unroll
        for (int j = 0; j < GEMM90T_WBOX / 8; j++) {
            const int col = n_tile * GEMM90T_WBOX + 8 * j + c2;
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
                const int e = 4 * j + 2 * half, eu = e + 4 * (GEMM90T_WBOX / 8);
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
    for (int j = 0; j < GEMM90T_BN / 8; j++) {
        const int col = n_tile * GEMM90T_BN + 8 * j + c2;
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

template <class C, bool SILU_PAIR>
OS_DEVICE void gemm90t_body(const TensorMap* tmA, const TensorMap* tmW0, const TensorMap* tmW1,
                            const float* __restrict__ scales, void* __restrict__ out, int M, int N, int K, int kps,
                            int splits, bool w_early) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t smem0 = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t bars = smem0 + C::STAGES * C::STAGE_BYTES;  // full[s] at bars + 8s, empty[s] at +8·(STAGES + s)
    const int units = (M + C::BM - 1) / C::BM * ((N + GEMM90T_BN - 1) / GEMM90T_BN) * splits;
    const int wg = threadIdx.x >> 7;
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
            const Gemm90TUnit unit = gemm90t_unit<C>(blockIdx.x, M, N, K, kps);
            early = min(unit.kt, C::STAGES);
            for (int i = 0; i < early; i++)
                gemm90t_load_w<C, SILU_PAIR>(smem0 + i * C::STAGE_BYTES, bars + 8 * i, tmW0, tmW1, unit, i);
        }
        grid_dependency_wait();
        int s = 0, phase = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x) {
            const Gemm90TUnit unit = gemm90t_unit<C>(u, M, N, K, kps);
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
    const int cw = wg - 1, lane = threadIdx.x & 31;
    int s = 0, phase = 0;
    float acc[128];
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const Gemm90TUnit unit = gemm90t_unit<C>(u, M, N, K, kps);
#pragma unroll
        for (int i = 0; i < 128; i++) acc[i] = 0.f;
        int held = -1;  // the stage whose wgmma may still be running
        for (int i = 0; i < unit.kt; i++) {
            mbar_wait(bars + 8 * s, phase);
            const uint32_t stage = smem0 + s * C::STAGE_BYTES;
            const uint64_t da = wgmma_desc_tma(stage + cw * 64 * 128), db = wgmma_desc_tma(stage + C::A_BYTES);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < GEMM90T_BK / 16; j++) wgmma_m64n256k16(acc, da + 2 * j, db + 2 * j, 1);
            wgmma_commit();
            wgmma_wait<1>();  // the previous k-tile's wgmma retired: its stage goes back to the producer
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
        gemm90t_store<SILU_PAIR>(acc, scales, out, M, N, unit.m0 + 64 * cw, unit.n_tile, unit.z);
    }
}
#endif

// Grid: (min(units, multiprocessors)), units = ceil(M / BM) · ceil(N / 256) · splits; block: Gemm90TConfig::THREADS
// (384 for bm128, 256 for bm64); dynamic shared memory Gemm90TConfig::SMEM. Tensor maps (bf16, 128-byte swizzle):
// A [M, K] box 64 × BM; plain: W0 = W1 = W [N, K] box 64 × 128; silu: W0 = gate [N/2, K], W1 = up [N/2, K] (rows
// N/2 … of W), box 64 × 128. scales [N] f32 or null. Plain: split z covers k-tiles [z·kps, min((z+1)·kps,
// ceil(K / 64))) and writes its partial sum to C + z·M·N (C [splits, M, N] f32; an empty split writes zeros). Silu:
// one split, C [M, N/2] bf16 = SiLU(A·gateᵀ)·(A·upᵀ).
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
