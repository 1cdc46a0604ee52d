// Projections on the tensor cores for any number of token rows M: C = A·Wᵀ with A [M, K] bf16 activations and
// W [N, K] bf16 weights, f32 accumulation through mma.sync m16n8k16, tiles fed by cp.async with a STAGES-deep ring
// of shared-memory buffers so the loads of tile k + STAGES − 1 overlap the math on tile k.
//   bm128:        prefill (M in the hundreds or thousands), 128 × 128 × 32 tiles, 8 warps: compute-bound.
//   bm16/32/64:   decode batches (5 … a few hundred rows), BM × 128 × 64 tiles, 4 warps each owning 32 columns:
//                 the weight read dominates, so each CTA keeps 4 stages of 16 KB weight tiles in flight, and the
//                 host splits K across CTAs (blockIdx.z) until the grid fills the chip (gemm_plan in kernels.py).
// CTAs are rastered M-tile-fastest, so the CTAs that share a weight tile run together and read it from DRAM once.
#include "common.cuh"

constexpr int GEMM_BN = 128;  // every variant: 128 weight rows (output columns) per CTA
constexpr int GEMM_PAD = 8;   // smem row pitch BK + 8 bf16: ldmatrix's 8 row reads land on distinct banks
constexpr int GEMM_LARGE_BK = 32;
constexpr int GEMM_LARGE_STAGES = 3;
constexpr int GEMM_LARGE_THREADS = 256;
constexpr int GEMM_SMALL_BK = 64;
constexpr int GEMM_SMALL_STAGES = 4;
constexpr int GEMM_SMALL_THREADS = 128;

template <int BM_, int BK_, int STAGES_, int WARPS_M_, int WARPS_N_>
struct GemmConfig {
    static constexpr int BM = BM_, BN = GEMM_BN, BK = BK_, STAGES = STAGES_;
    static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;             // m16 × n8 mma tiles per warp
    static constexpr int LDS = BK + GEMM_PAD;
    static constexpr int STAGE_ELEMS = (BM + BN) * LDS;
    static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;  // dynamic shared memory (the host raises the limit)
    static_assert(NI % 2 == 0 && WM % 16 == 0 && BK % 16 == 0, "ldmatrix pairs of n8 tiles, whole k16 steps");
};
using GemmBM128 = GemmConfig<128, GEMM_LARGE_BK, GEMM_LARGE_STAGES, 2, 4>;  // 2 × 4 warps of 64 × 32
using GemmBM64 = GemmConfig<64, GEMM_SMALL_BK, GEMM_SMALL_STAGES, 1, 4>;    // 1 × 4 warps of 64 × 32
using GemmBM32 = GemmConfig<32, GEMM_SMALL_BK, GEMM_SMALL_STAGES, 1, 4>;    // 1 × 4 warps of 32 × 32
using GemmBM16 = GemmConfig<16, GEMM_SMALL_BK, GEMM_SMALL_STAGES, 1, 4>;    // 1 × 4 warps of 16 × 32
static_assert(GemmBM128::THREADS == GEMM_LARGE_THREADS && GemmBM16::THREADS == GEMM_SMALL_THREADS, "thread counts");

// One k-tile of A and W into stage `s`: BM·BK/8 + BN·BK/8 16-byte chunks; rows and columns out of range read zeros.
// In SILU_PAIR mode tile column j holds weight row gate[i] (j even) or up[i] (j odd), i = (n0 + j) / 2,
// so each thread's accumulator pair (c0, c1) is (gate, up) of one intermediate index.
template <class C, bool SILU_PAIR>
OS_DEVICE void load_tile(bf16* stage, const bf16* __restrict__ A, const bf16* __restrict__ W, int M, int N, int K,
                         int m0, int n0, int k0) {
    constexpr int CPR = C::BK / 8;  // chunks per row
    bf16* As = stage;
    bf16* Ws = stage + C::BM * C::LDS;
#pragma unroll
    for (int i = 0; i < (C::BM * CPR + C::THREADS - 1) / C::THREADS; i++) {
        const int chunk = threadIdx.x + i * C::THREADS;
        if ((C::BM * CPR) % C::THREADS == 0 || chunk < C::BM * CPR) {
            const int row = chunk / CPR, col = (chunk % CPR) * 8;
            const int m = m0 + row;
            const bool ok = k0 + col < K && m < M;
            cp_async16(As + row * C::LDS + col, ok ? A + (size_t)m * K + k0 + col : A, ok ? 16 : 0);
        }
    }
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
OS_DEVICE void gemm_body(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ scales,
                         void* __restrict__ out, int M, int N, int K, int ktiles_per_split) {
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

#pragma unroll
    for (int s = 0; s < C::STAGES - 1; s++) {
        if (s < count) load_tile<C, SILU_PAIR>(smem + s * C::STAGE_ELEMS, A, W, M, N, K, m0, n0, (kt_begin + s) * C::BK);
        cp_async_commit();
    }

    for (int kt = 0; kt < count; kt++) {
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();  // tile kt landed for every thread, and everyone is done reading the stage refilled next
        const int next = kt + C::STAGES - 1;
        if (next < count)
            load_tile<C, SILU_PAIR>(smem + (next % C::STAGES) * C::STAGE_ELEMS, A, W, M, N, K, m0, n0,
                                    (kt_begin + next) * C::BK);
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
// GemmBM<BM>::SMEM_BYTES. Split z covers k-tiles [z·kps, min((z+1)·kps, ceil(K / BK))) and writes its partial sum to
// C + z·M·N (splits = 1: C [M, N] is the result). A [M, K] bf16, W [N, K] bf16, scales [N] f32 or null.
#define GEMM_KERNEL(BMV)                                                                                           \
    extern "C" __global__ void __launch_bounds__(GemmBM##BMV::THREADS)                                             \
        gemm_bf16_bm##BMV(const bf16* A, const bf16* W, const float* scales, float* C, int M, int N, int K,        \
                          int ktiles_per_split) {                                                                  \
        gemm_body<GemmBM##BMV, false>(A, W, scales, C, M, N, K, ktiles_per_split);                                 \
    }                                                                                                              \
    /* Grid: (ceil(N / 128), ceil(M / BM)); C [M, N/2] bf16 = SiLU(gate)·up, W = [gate; up] (N = 2I, even). */      \
    extern "C" __global__ void __launch_bounds__(GemmBM##BMV::THREADS)                                             \
        gemm_bf16_silu_bm##BMV(const bf16* A, const bf16* W, const float* scales, bf16* C, int M, int N, int K) {  \
        gemm_body<GemmBM##BMV, true>(A, W, scales, C, M, N, K, 1 << 30);                                           \
    }
GEMM_KERNEL(16)
GEMM_KERNEL(32)
GEMM_KERNEL(64)
GEMM_KERNEL(128)

// The SwiGLU product from the plain GEMM's split-K partials of [gate; up] (when the fused silu epilogue cannot be
// used because K is split): out[m, i] = bf16(SiLU(Σ_p parts[p][m][i])·Σ_p parts[p][m][I + i]), parts summed in
// order p = 0, 1, ….
// Grid: (ceil(M·I / 1024)); block: 256 threads, 4 consecutive i each. parts: n_parts × [M, 2I] f32, part p at
// parts + p·part_stride; out [M, I] bf16. Needs I % 4 == 0 and part_stride % 4 == 0.
extern "C" __global__ void silu_mul_parts(const float* __restrict__ parts, int n_parts, long long part_stride,
                                          bf16* __restrict__ out, int M, int I) {
    const long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (e >= (long long)M * I) return;
    const int m = (int)(e / I), i = (int)(e % I);
    const size_t row = (size_t)m * 2 * I;
    const float4 g = sum_parts4(parts, n_parts, part_stride, row + i);
    const float4 u = sum_parts4(parts, n_parts, part_stride, row + I + i);
    *reinterpret_cast<uint2*>(out + e) =
        make_uint2(pack_bf16x2(silu(g.x) * u.x, silu(g.y) * u.y), pack_bf16x2(silu(g.z) * u.z, silu(g.w) * u.w));
}

// int8 engines at prefill: widen a weight matrix to bf16 (exact: |q| ≤ 127 fits bf16's 8-bit significand) into a
// scratch buffer, then run the GEMMs above with the per-row scales in their epilogue.
// Grid: (ceil(n / 4096)); block: 256 threads, 16 elements each. q [n] int8, out [n] bf16, n % 16 == 0.
extern "C" __global__ void widen_int8(const int8_t* __restrict__ q, bf16* __restrict__ out, long long n) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (i >= n) return;
    const uint4 w = *reinterpret_cast<const uint4*>(q + i);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    uint32_t packed[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const char4 c = *reinterpret_cast<const char4*>(&words[j]);
        packed[2 * j] = pack_bf16x2(c.x, c.y);
        packed[2 * j + 1] = pack_bf16x2(c.z, c.w);
    }
    uint4* o = reinterpret_cast<uint4*>(out + i);
    o[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    o[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}
