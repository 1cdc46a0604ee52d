// The previous generation of the tensor-core projection GEMM, kept as it was (kernels renamed gemm_v1_*) so that
// benchmarks/bench_kernels.py can time it next to gemm.cu's kernels on the same GPU in the same run; the runtime
// calls it only when asked (Kernels.gemm(..., variant="v1")). Delete this file once the new family has been measured.
//
// C = A·Wᵀ with A [M, K] bf16 activations and W [N, K] bf16 weights, f32 accumulation through mma.sync m16n8k16,
// tiles fed by cp.async with a STAGES-deep ring of padded shared-memory buffers.
//   bm128:        128 × 128 × 32 tiles, 8 warps.
//   bm16/32/64:   BM × 128 × 64 tiles, 4 warps each owning 32 columns, the host splitting K across CTAs (blockIdx.z).
// CTAs are rastered M-tile-fastest, so the CTAs that share a weight tile run together and read it from DRAM once.
#include "common.cuh"

constexpr int GEMM_V1_BN = 128;  // every variant: 128 weight rows (output columns) per CTA
constexpr int GEMM_V1_PAD = 8;   // smem row pitch BK + 8 bf16: ldmatrix's 8 row reads land on distinct banks
constexpr int GEMM_V1_LARGE_BK = 32;
constexpr int GEMM_V1_LARGE_STAGES = 3;
constexpr int GEMM_V1_LARGE_THREADS = 256;
constexpr int GEMM_V1_SMALL_BK = 64;
constexpr int GEMM_V1_SMALL_STAGES = 4;
constexpr int GEMM_V1_SMALL_THREADS = 128;

template <int BM_, int BK_, int STAGES_, int WARPS_M_, int WARPS_N_>
struct GemmV1Config {
    static constexpr int BM = BM_, BN = GEMM_V1_BN, BK = BK_, STAGES = STAGES_;
    static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;             // m16 × n8 mma tiles per warp
    static constexpr int LDS = BK + GEMM_V1_PAD;
    static constexpr int STAGE_ELEMS = (BM + BN) * LDS;
    static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;  // dynamic shared memory (the host raises the limit)
    static_assert(NI % 2 == 0 && WM % 16 == 0 && BK % 16 == 0, "ldmatrix pairs of n8 tiles, whole k16 steps");
};
using GemmV1BM128 = GemmV1Config<128, GEMM_V1_LARGE_BK, GEMM_V1_LARGE_STAGES, 2, 4>;  // 2 × 4 warps of 64 × 32
using GemmV1BM64 = GemmV1Config<64, GEMM_V1_SMALL_BK, GEMM_V1_SMALL_STAGES, 1, 4>;    // 1 × 4 warps of 64 × 32
using GemmV1BM32 = GemmV1Config<32, GEMM_V1_SMALL_BK, GEMM_V1_SMALL_STAGES, 1, 4>;    // 1 × 4 warps of 32 × 32
using GemmV1BM16 = GemmV1Config<16, GEMM_V1_SMALL_BK, GEMM_V1_SMALL_STAGES, 1, 4>;    // 1 × 4 warps of 16 × 32
static_assert(GemmV1BM128::THREADS == GEMM_V1_LARGE_THREADS && GemmV1BM16::THREADS == GEMM_V1_SMALL_THREADS,
              "thread counts");

// One k-tile of A or W into stage `s` (A's BM·BK/8, W's BN·BK/8 16-byte chunks; issued apart so that W's first
// stages may be copied before the grid dependency wait); rows and columns out of range read zeros.
// In SILU_PAIR mode tile column j holds weight row gate[i] (j even) or up[i] (j odd), i = (n0 + j) / 2,
// so each thread's accumulator pair (c0, c1) is (gate, up) of one intermediate index.
template <class C>
OS_DEVICE void load_a_v1(bf16* stage, const bf16* __restrict__ A, int M, int K, int m0, int k0) {
    constexpr int CPR = C::BK / 8;  // chunks per row
#pragma unroll
    for (int i = 0; i < (C::BM * CPR + C::THREADS - 1) / C::THREADS; i++) {
        const int chunk = threadIdx.x + i * C::THREADS;
        if ((C::BM * CPR) % C::THREADS == 0 || chunk < C::BM * CPR) {
            const int row = chunk / CPR, col = (chunk % CPR) * 8;
            const int m = m0 + row;
            const bool ok = k0 + col < K && m < M;
            cp_async16(stage + row * C::LDS + col, ok ? A + (size_t)m * K + k0 + col : A, ok ? 16 : 0);
        }
    }
}
template <class C, bool SILU_PAIR>
OS_DEVICE void load_w_v1(bf16* stage, const bf16* __restrict__ W, int N, int K, int n0, int k0) {
    constexpr int CPR = C::BK / 8;
    bf16* Ws = stage + C::BM * C::LDS;
#pragma unroll
    for (int i = 0; i < C::BN * CPR / C::THREADS; i++) {
        const int chunk = threadIdx.x + i * C::THREADS;
        const int row = chunk / CPR, col = (chunk % CPR) * 8;
        const int n = n0 + row;
        const int wrow = SILU_PAIR ? ((n & 1) * (N / 2) + (n >> 1)) : n;
        const bool ok = k0 + col < K && n < N;
        cp_async16(Ws + row * C::LDS + col, ok ? W + (size_t)wrow * K + k0 + col : W, ok ? 16 : 0);
    }
}

// Block tile (m0, n0) over k-tiles [kt_begin, kt_end) (split-K: blockIdx.z's share; an empty share writes zeros).
// Needs K % 8 == 0 (and N even in silu_pair mode). scales [N] f32 per weight row (int8 engines: the weights were
// widened exactly) or null. Outputs:
//   plain:     C [M, N] f32, split z's partial at C + z·M·N
//   silu_pair: C [M, N/2] bf16 = SiLU(A·gateᵀ)·(A·upᵀ), W being the fused [gate; up] matrix (N = 2I), no split
template <class C, bool SILU_PAIR>
OS_DEVICE void gemm_body_v1(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ scales,
                         void* __restrict__ out, int M, int N, int K, int ktiles_per_split, bool w_early) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* smem = reinterpret_cast<bf16*>(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    // M-tile-fastest raster over the (N/BN) × (M/BM) grid: consecutive CTAs share a weight tile.
    const int linear = blockIdx.x + gridDim.x * blockIdx.y;
    const int m0 = (linear % gridDim.y) * C::BM, n0 = (linear / gridDim.y) * C::BN;
    const int ktiles = (K + C::BK - 1) / C::BK;
    const int kt_begin = min(ktiles, (int)blockIdx.z * ktiles_per_split);
    const int kt_end = min(ktiles, kt_begin + ktiles_per_split);
    const int count = kt_end - kt_begin;

    float acc[C::MI][C::NI][4];
#pragma unroll
    for (int i = 0; i < C::MI; i++)
#pragma unroll
        for (int j = 0; j < C::NI; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

    // The first STAGES − 1 k-tiles: W's copies (w_early: before the wait, while the previous kernel drains), then
    // A's, one commit group per k-tile (the first one holds every early W copy).
    if (w_early) {
#pragma unroll
        for (int s = 0; s < C::STAGES - 1; s++)
            if (s < count) load_w_v1<C, SILU_PAIR>(smem + s * C::STAGE_ELEMS, W, N, K, n0, (kt_begin + s) * C::BK);
    }
    grid_dependency_wait();
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; s++) {
        if (s < count) {
            if (!w_early) load_w_v1<C, SILU_PAIR>(smem + s * C::STAGE_ELEMS, W, N, K, n0, (kt_begin + s) * C::BK);
            load_a_v1<C>(smem + s * C::STAGE_ELEMS, A, M, K, m0, (kt_begin + s) * C::BK);
        }
        cp_async_commit();
    }

    for (int kt = 0; kt < count; kt++) {
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();  // tile kt landed for every thread, and everyone is done reading the stage refilled next
        const int next = kt + C::STAGES - 1;
        if (next < count) {
            bf16* stage = smem + (next % C::STAGES) * C::STAGE_ELEMS;
            load_a_v1<C>(stage, A, M, K, m0, (kt_begin + next) * C::BK);
            load_w_v1<C, SILU_PAIR>(stage, W, N, K, n0, (kt_begin + next) * C::BK);
        }
        cp_async_commit();

        const bf16* As = smem + (kt % C::STAGES) * C::STAGE_ELEMS;
        const bf16* Ws = As + C::BM * C::LDS;
#pragma unroll
        for (int ks = 0; ks < C::BK / 16; ks++) {
            uint32_t a[C::MI][4], b[C::NI][2];
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++)
                ldmatrix_x4(a[mi], As + (wm * C::WM + mi * 16 + (lane & 15)) * C::LDS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < C::NI / 2; np++) {
                uint32_t r[4];
                ldmatrix_x4(r, Ws + (wn * C::WN + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * C::LDS + ks * 16 +
                                   ((lane >> 3) & 1) * 8);
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++) mma_bf16_16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
        }
    }
    cp_async_wait<0>();
    grid_dependents_launch();  // only now (common.cuh)

    float* Cf = reinterpret_cast<float*>(out) + (size_t)blockIdx.z * M * N;
    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++) {
#pragma unroll
        for (int ni = 0; ni < C::NI; ni++) {
            const int col = n0 + wn * C::WN + ni * 8 + 2 * c;  // even: (col, col+1) are this thread's pair
            if (col >= N) continue;
            float s0 = 1.f, s1 = 1.f;
            if (scales) {
                s0 = scales[SILU_PAIR ? col / 2 : col];
                s1 = scales[SILU_PAIR ? N / 2 + col / 2 : min(col + 1, N - 1)];
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = m0 + wm * C::WM + mi * 16 + g + half * 8;
                if (row >= M) continue;
                const float v0 = acc[mi][ni][2 * half] * s0, v1 = acc[mi][ni][2 * half + 1] * s1;
                if (SILU_PAIR) {
                    reinterpret_cast<bf16*>(out)[(size_t)row * (N / 2) + col / 2] = __float2bfloat16(silu(v0) * v1);
                } else if ((N & 1) == 0) {  // even N: (z·M·N + row·N + col) is even, so the pair is 8-byte aligned
                    *reinterpret_cast<float2*>(Cf + (size_t)row * N + col) = make_float2(v0, v1);
                } else {  // odd N (a vocabulary): scalar stores
                    float* o = Cf + (size_t)row * N + col;
                    o[0] = v0;
                    if (col + 1 < N) o[1] = v1;
                }
            }
        }
    }
}

// Grid: (ceil(N / 128), ceil(M / BM), splits); block: 256 threads (bm128) or 128 (bm16/32/64); dynamic shared memory
// GemmV1BM<BM>::SMEM_BYTES. Split z covers k-tiles [z·kps, min((z+1)·kps, ceil(K / BK))) and writes its partial sum to
// C + z·M·N (splits = 1: C [M, N] is the result). A [M, K] bf16, W [N, K] bf16, scales [N] f32 or null.
// w_early: 1 when no kernel writes W (the model's weights): its first stages are copied before the grid dependency
// wait (common.cuh); 0 for a scratch an earlier kernel filled (runtime/cuda/kernels.py Kernels.gemm static_weights).
#define GEMM_V1_KERNEL(BMV)                                                                                           \
    extern "C" __global__ void __launch_bounds__(GemmV1BM##BMV::THREADS)                                              \
        gemm_v1_bf16_bm##BMV(const bf16* A, const bf16* W, const float* scales, float* C, int M, int N, int K,        \
                             int ktiles_per_split, int w_early) {                                                     \
        gemm_body_v1<GemmV1BM##BMV, false>(A, W, scales, C, M, N, K, ktiles_per_split, w_early);                      \
    }                                                                                                                 \
    /* Grid: (ceil(N / 128), ceil(M / BM)); C [M, N/2] bf16 = SiLU(gate)·up, W = [gate; up] (N = 2I, even). */        \
    extern "C" __global__ void __launch_bounds__(GemmV1BM##BMV::THREADS)                                              \
        gemm_v1_bf16_silu_bm##BMV(const bf16* A, const bf16* W, const float* scales, bf16* C, int M, int N, int K,    \
                                  int w_early) {                                                                      \
        gemm_body_v1<GemmV1BM##BMV, true>(A, W, scales, C, M, N, K, 1 << 30, w_early);                                \
    }
GEMM_V1_KERNEL(16)
GEMM_V1_KERNEL(32)
GEMM_V1_KERNEL(64)
GEMM_V1_KERNEL(128)
