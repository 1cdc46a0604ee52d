// Hopper-only projection GEMM (sm_90a: wgmma), which kernels.py gemm_plan picks on sm_90 GPUs (GEMM_HOPPER, on by
// default). C = A·Wᵀ, A [M, K] bf16 activations, W [N, K] bf16 weights, f32 accumulation.
//
// Two tiles, one template, 256 threads (2 warpgroups) that all issue the copies:
//   bm128: 128 × 256 × 64, both warpgroups issue wgmma.mma_async m64n256k16 on 64 rows each (prefill, large decode
//          batches); 4 stages, 2 k-tiles in flight, the wgmma of one k-tile still running while the next is issued.
//   bm64:  64 × 256 × 64 for skinny M (decode batches of ≤ 64 rows, where the projection is bound by streaming W):
//          warpgroup 0 issues the wgmma on the whole tile, warpgroup 1 only copies (the tensor cores of the
//          multiprocessor are shared: one warpgroup's m64n256k16 keeps them as busy as two); 5 stages of 40 KB, 4 k-tiles
//          (160 KB) in flight per multiprocessor, the wgmma waited for at once (its stage is refilled next k-tile).
// A and W come straight from shared memory through matrix descriptors (K-major, 128-byte swizzle: the layout gemm.cu's
// copies write, here on 1024-byte aligned stages as the hardware swizzle needs); the accumulators (128 f32 per thread)
// never leave registers. One barrier per k-tile: a stage is refilled once every warpgroup retired the wgmma that read it.
// Grid split-K (blockIdx.y = split z: k-tiles [z·kps, (z+1)·kps), the partial at C + z·M·N, summed by the consumers)
// spreads the few 256-column tiles of a skinny product over the chip: every weight byte is still read once, by one
// CTA. One whole tile per CTA, M-tile fastest (the CTAs sharing a weight tile run together).
// Built for compute_90a only (runtime/cuda/build.py ARCH_FILES); for other targets the kernels are empty, so every
// build has the same entries (tests/test_kernel_mirror.py) and the host never launches them there. The CPU emulator
// runs them with its model of wgmma (deferred to the wait that retires it; descriptors and swizzle as documented).
#include "common.cuh"

constexpr int GEMM90_BM = 128, GEMM90_BN = 256, GEMM90_BK = 64, GEMM90_STAGES = 4, GEMM90_THREADS = 256;  // bm128
constexpr int GEMM90_BM64_STAGES = 5;  // bm64: shallower stages (no second 64 rows of A), one more of them

// The tile configuration: BM rows (64 or 128), STAGES shared-memory stages, LAG k-tiles of wgmma left running past the
// k-tile that issued them (1: overlap with the next k-tile's barrier; 0: wait at once, one more stage of copies ahead).
template <int BM_, int STAGES_, int LAG_>
struct Gemm90Config {
    static constexpr int BM = BM_, STAGES = STAGES_, LAG = LAG_;
    static constexpr int MMA_WARPGROUPS = BM / 64;                      // warpgroups issuing wgmma (64 rows each)
    static constexpr int STAGE_BYTES = (BM + GEMM90_BN) * GEMM90_BK * 2;  // A [BM][64] then W [256][64] bf16
    static constexpr int AHEAD = STAGES - 1 - LAG;                        // k-tiles of copies in flight
    static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;              // + slack to align the stages to 1 KB
    static_assert(BM % 64 == 0 && MMA_WARPGROUPS <= GEMM90_THREADS / 128, "64-row warpgroup tiles");
    static_assert(STAGE_BYTES % 1024 == 0 && SMEM <= 227 * 1024 && AHEAD >= 1, "aligned stages, sm_90's shared memory");
};
using Gemm90BM128 = Gemm90Config<GEMM90_BM, GEMM90_STAGES, 1>;  // 193 KB
using Gemm90BM64 = Gemm90Config<64, GEMM90_BM64_STAGES, 0>;      // 201 KB

#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(OS_EMULATE_SM90)
#define OS_GEMM90 1  // the CPU emulator defines OS_EMULATE_SM90: common.cuh's wgmma helpers are emulated there

// Matrix descriptor of a K-major bf16 operand at shared address `addr` (1024-byte aligned blocks of 8 rows × 128
// bytes, the 16-byte chunks of row r XOR-swizzled by r mod 8): start address, leading byte offset (unused with a
// swizzle: 1), stride byte offset 1024 (the next 8 rows), 128-byte swizzle mode. A k16 step further along the
// 64-column block starts 32 bytes later (the hardware applies the swizzle to the address).
OS_DEVICE uint64_t wgmma_desc(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

// One k-tile (A rows m0 … +BM, W rows n0 … +256, columns k0 … +64) into the stage at shared address `stage`:
// A [BM][64] then W [256][64], rows of 128 bytes, chunk c of row r at chunk c ^ (r mod 8); rows and columns out of
// range read zeros. silu_pair: tile column j is gate[(n0 + j)/2] (j even) or up[(n0 + j)/2] (j odd). A and W are
// issued apart so that W's first stages may be copied before the grid dependency wait.
template <int BM>
OS_DEVICE void load_a90(uint32_t stage, const bf16* __restrict__ A, int M, int K, int m0, int k0) {
    const int row0 = threadIdx.x >> 3, c = threadIdx.x & 7;  // 32 rows × 8 chunks per pass
    const int k = k0 + c * 8;
    const uint32_t off = row0 * 128 + ((c ^ (row0 & 7)) << 4);
#pragma unroll
    for (int i = 0; i < BM / 32; i++) {
        const int m = m0 + row0 + 32 * i;
        const bool ok = k < K && m < M;
        cp_async16_s(stage + off + i * 32 * 128, ok ? A + (size_t)m * K + k : A, ok ? 16 : 0);
    }
}
template <int BM, bool SILU_PAIR>
OS_DEVICE void load_w90(uint32_t stage, const bf16* __restrict__ W, int N, int K, int n0, int k0) {
    const int row0 = threadIdx.x >> 3, c = threadIdx.x & 7;
    const int k = k0 + c * 8;
    const uint32_t off = row0 * 128 + ((c ^ (row0 & 7)) << 4);
#pragma unroll
    for (int i = 0; i < GEMM90_BN / 32; i++) {
        const int n = n0 + row0 + 32 * i;
        const int wrow = SILU_PAIR ? ((n & 1) * (N / 2) + (n >> 1)) : n;
        const bool ok = k < K && n < N;
        cp_async16_s(stage + BM * 128 + off + i * 32 * 128, ok ? W + (size_t)wrow * K + k : W, ok ? 16 : 0);
    }
}

// The CTA's tile (blockIdx.x: M-tile fastest) over its split's k-tiles (blockIdx.y = z: [z·kps, min((z+1)·kps, kt)),
// an empty split writes zeros); outputs as the kernels below.
template <class C, bool SILU_PAIR>
OS_DEVICE void gemm90_body(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ scales,
                           void* __restrict__ out, int M, int N, int K, int ktiles_per_split, bool w_early) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t smem0 = (smem_u32(smem_raw) + 1023) & ~1023u;
    const int m_tiles = (M + C::BM - 1) / C::BM;
    const int m0 = (blockIdx.x % m_tiles) * C::BM, n0 = (blockIdx.x / m_tiles) * GEMM90_BN;
    const int ktiles = (K + GEMM90_BK - 1) / GEMM90_BK, z = blockIdx.y;
    const int kbegin = min(ktiles, z * ktiles_per_split), kt = min(ktiles, kbegin + ktiles_per_split) - kbegin;
    const int wg = threadIdx.x >> 7;  // warpgroup: rows wg·64 … +64 of the tile (bm64: warpgroup 1 only copies)
    const bool mma = wg < C::MMA_WARPGROUPS;

    // The first AHEAD k-tiles: W's copies (w_early: before the wait, while the previous kernel drains), then A's,
    // one commit group per k-tile (the first one holds every early W copy).
    if (w_early) {
#pragma unroll
        for (int s = 0; s < C::AHEAD; s++)
            if (s < kt)
                load_w90<C::BM, SILU_PAIR>(smem0 + s * C::STAGE_BYTES, W, N, K, n0, (kbegin + s) * GEMM90_BK);
    }
    grid_dependency_wait();
#pragma unroll
    for (int s = 0; s < C::AHEAD; s++) {
        if (s < kt) {
            if (!w_early)
                load_w90<C::BM, SILU_PAIR>(smem0 + s * C::STAGE_BYTES, W, N, K, n0, (kbegin + s) * GEMM90_BK);
            load_a90<C::BM>(smem0 + s * C::STAGE_BYTES, A, M, K, m0, (kbegin + s) * GEMM90_BK);
        }
        cp_async_commit();
    }
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++) acc[i] = 0.f;

    for (int i = 0; i < kt; i++) {
        cp_async_wait<C::AHEAD - 1>();  // k-tile i landed (this thread's copies)
        fence_proxy_async();
        __syncthreads();  // everyone's copies of k-tile i; every warpgroup retired the wgmma of k-tile i − 1 − LAG
        const int next = i + C::AHEAD;  // into the stage of k-tile i − 1 − LAG
        if (next < kt) {
            const uint32_t stage = smem0 + (next % C::STAGES) * C::STAGE_BYTES;
            load_a90<C::BM>(stage, A, M, K, m0, (kbegin + next) * GEMM90_BK);
            load_w90<C::BM, SILU_PAIR>(stage, W, N, K, n0, (kbegin + next) * GEMM90_BK);
        }
        cp_async_commit();
        if (mma) {
            const uint32_t stage = smem0 + (i % C::STAGES) * C::STAGE_BYTES;
            const uint64_t da = wgmma_desc(stage + wg * 64 * 128), db = wgmma_desc(stage + C::BM * 128);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < GEMM90_BK / 16; j++) wgmma_m64n256k16(acc, da + 2 * j, db + 2 * j, 1);  // +32 bytes
            wgmma_commit();
            wgmma_wait<C::LAG>();  // the k-tile LAG before this one is done: its stage may be refilled after the barrier
        }
    }
    if (mma) wgmma_wait<0>();
    cp_async_wait<0>();
    if (!mma) return;

    // Accumulator layout (m64nNk16): warp w of the warpgroup holds rows 16w … 16w + 15; acc[4j + e] is row
    // 16w + lane/4 + 8·(e/2), column 8j + 2·(lane mod 4) + (e mod 2), as the m16n8 D fragment, for n8 block j.
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, g = lane >> 2, c2 = 2 * (lane & 3);
    float* Cf = reinterpret_cast<float*>(out) + (size_t)z * M * N;
#pragma unroll
    for (int j = 0; j < GEMM90_BN / 8; j++) {
        const int col = n0 + 8 * j + c2;
        if (col >= N) continue;
        float s0 = 1.f, s1 = 1.f;
        if (scales) {
            s0 = scales[SILU_PAIR ? col / 2 : col];
            s1 = scales[SILU_PAIR ? N / 2 + col / 2 : min(col + 1, N - 1)];
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = m0 + wg * 64 + 16 * w + g + 8 * half;
            if (row >= M) continue;
            const float v0 = acc[4 * j + 2 * half] * s0, v1 = acc[4 * j + 2 * half + 1] * s1;
            if (SILU_PAIR) {
                reinterpret_cast<bf16*>(out)[(size_t)row * (N / 2) + col / 2] = __float2bfloat16(silu(v0) * v1);
            } else if ((N & 1) == 0) {  // even N: (z·M·N + row·N + col) is even, so the pair is 8-byte aligned
                *reinterpret_cast<float2*>(Cf + (size_t)row * N + col) = make_float2(v0, v1);
            } else {
                float* o = Cf + (size_t)row * N + col;
                o[0] = v0;
                if (col + 1 < N) o[1] = v1;
            }
        }
    }
}
#endif

// Grid: (ceil(M / BM) · ceil(N / 256), splits), tile t = (m = t mod ceil(M/BM), n = t div ceil(M/BM)); block: 256
// threads; dynamic shared memory Gemm90BM<BM>::SMEM (193 / 201 KB). A [M, K] bf16, W [N, K] bf16 (K % 8 == 0),
// scales [N] f32 or null. Plain: split z covers k-tiles [z·kps, min((z+1)·kps, ceil(K / 64))) and writes its partial
// sum to C + z·M·N (C [splits, M, N] f32; splits = 1: the result). Silu: one split (kps ≥ the k-tiles),
// C [M, N/2] bf16 = SiLU(A·gateᵀ)·(A·upᵀ), W = [gate; up] (N even).
// w_early: 1 when no kernel writes W (the model's weights): its first stages are copied before the grid dependency
// wait (common.cuh); 0 for a scratch an earlier kernel filled (runtime/cuda/kernels.py Kernels.gemm static_weights).
#ifndef OS_GEMM90
template <class C, bool SILU_PAIR>  // other targets: the entries exist, empty (never launched there)
OS_DEVICE void gemm90_body(const bf16*, const bf16*, const float*, void*, int, int, int, int, bool) {
    grid_dependency_wait();
}
#endif
#define GEMM90_KERNEL(BMV)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMM90_THREADS, 1)                                                 \
        gemm90_bf16_bm##BMV(const bf16* A, const bf16* W, const float* scales, float* C, int M, int N, int K,       \
                            int ktiles_per_split, int w_early) {                                                    \
        grid_dependents_launch();                                                                                   \
        gemm90_body<Gemm90BM##BMV, false>(A, W, scales, C, M, N, K, ktiles_per_split, w_early);                     \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMM90_THREADS, 1)                                                 \
        gemm90_bf16_silu_bm##BMV(const bf16* A, const bf16* W, const float* scales, bf16* C, int M, int N, int K,   \
                                 int w_early) {                                                                     \
        grid_dependents_launch();                                                                                   \
        gemm90_body<Gemm90BM##BMV, true>(A, W, scales, C, M, N, K, 1 << 30, w_early);                               \
    }
GEMM90_KERNEL(64)
GEMM90_KERNEL(128)
