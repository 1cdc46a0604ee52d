// Prefill projections on the tensor cores: C = A·Wᵀ with A [M, K] bf16 activations (M = tokens) and
// W [N, K] bf16 weights, f32 accumulation through mma.sync m16n8k16, tiles fed by cp.async with a
// STAGES-deep ring of shared-memory buffers so loads of tile k+2 overlap the math on tile k.
#include "common.cuh"

constexpr int BM = 128, BN = 128, BK = 32;  // block tile
constexpr int WM = 64, WN = 32;             // warp tile: 2×4 warps, each 4 m16 × 4 n8 mma tiles
constexpr int THREADS = 256;
constexpr int STAGES = 3;
constexpr int LDS = BK + 8;  // smem row pitch in bf16: 80 bytes keeps ldmatrix's 8 row reads on distinct banks
constexpr int STAGE_ELEMS = (BM + BN) * LDS;
// Dynamic shared memory per block: STAGES · (BM + BN) · LDS · 2 bytes = 61,440 (the host raises the limit).

// One k-tile of A and W into stage `s`: 2 × 512 16-byte chunks, 4 per thread; rows out of range read zeros.
// In SILU_PAIR mode tile column j holds weight row gate[i] (j even) or up[i] (j odd), i = (n0 + j) / 2,
// so each thread's accumulator pair (c0, c1) is (gate, up) of one intermediate index.
template <bool SILU_PAIR>
OS_DEVICE void load_tile(bf16* stage, const bf16* __restrict__ A, const bf16* __restrict__ W, int M, int N, int K,
                         int m0, int n0, int k0) {
    bf16* As = stage;
    bf16* Ws = stage + BM * LDS;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int chunk = threadIdx.x + i * THREADS;  // 0 … 511
        const int row = chunk >> 2, col = (chunk & 3) * 8;
        const bool kin = k0 + col < K;
        {
            const int m = m0 + row;
            const bool ok = kin && m < M;
            cp_async16(As + row * LDS + col, ok ? A + (size_t)m * K + k0 + col : A, ok ? 16 : 0);
        }
        {
            const int n = n0 + row;
            const int wrow = SILU_PAIR ? ((n & 1) * (N / 2) + (n >> 1)) : n;
            const bool ok = kin && n < N;
            cp_async16(Ws + row * LDS + col, ok ? W + (size_t)wrow * K + k0 + col : W, ok ? 16 : 0);
        }
    }
}

// Grid: (ceil(N / 128), ceil(M / 128)); block: 256 threads (8 warps as 2 × 4 over the 128 × 128 tile).
// Needs K % 8 == 0 (and N even in silu_pair mode). scales [N] f32 per weight row (int8 engines; the weights were widened exactly)
// or null. Outputs:
//   plain:     C [M, N] f32
//   silu_pair: C [M, N/2] bf16 = SiLU(A·gateᵀ)·(A·upᵀ), W being the fused [gate; up] matrix (N = 2I)
template <bool SILU_PAIR>
OS_DEVICE void gemm_body(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ scales,
                         void* __restrict__ C, int M, int N, int K) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* smem = reinterpret_cast<bf16*>(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int ktiles = (K + BK - 1) / BK;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) load_tile<SILU_PAIR>(smem + s * STAGE_ELEMS, A, W, M, N, K, m0, n0, s * BK);
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt landed for every thread, and everyone is done reading the stage refilled next
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_tile<SILU_PAIR>(smem + (next % STAGES) * STAGE_ELEMS, A, W, M, N, K, m0, n0, next * BK);
        cp_async_commit();

        const bf16* As = smem + (kt % STAGES) * STAGE_ELEMS;
        const bf16* Ws = As + BM * LDS;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
            uint32_t a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
                ldmatrix_x4(a[mi], As + (wm * WM + mi * 16 + (lane & 15)) * LDS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 2; np++) {
                uint32_t r[4];
                ldmatrix_x4(r, Ws + (wn * WN + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + ks * 16 +
                                   ((lane >> 3) & 1) * 8);
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_bf16_16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
        }
    }
    cp_async_wait<0>();

    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            const int col = n0 + wn * WN + ni * 8 + 2 * c;  // even: (col, col+1) are this thread's pair
            if (col >= N) continue;
            float s0 = 1.f, s1 = 1.f;
            if (scales) {
                s0 = scales[SILU_PAIR ? col / 2 : col];
                s1 = scales[SILU_PAIR ? N / 2 + col / 2 : min(col + 1, N - 1)];
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = m0 + wm * WM + mi * 16 + g + half * 8;
                if (row >= M) continue;
                const float v0 = acc[mi][ni][2 * half] * s0, v1 = acc[mi][ni][2 * half + 1] * s1;
                if (SILU_PAIR) {
                    reinterpret_cast<bf16*>(C)[(size_t)row * (N / 2) + col / 2] = __float2bfloat16(silu(v0) * v1);
                } else if ((N & 1) == 0) {  // even N: (row·N + col) is even, so the pair is 8-byte aligned
                    *reinterpret_cast<float2*>(reinterpret_cast<float*>(C) + (size_t)row * N + col) =
                        make_float2(v0, v1);
                } else {  // odd N (a vocabulary): scalar stores
                    float* out = reinterpret_cast<float*>(C) + (size_t)row * N + col;
                    out[0] = v0;
                    if (col + 1 < N) out[1] = v1;
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) gemm_bf16(const bf16* A, const bf16* W, const float* scales,
                                                                float* C, int M, int N, int K) {
    gemm_body<false>(A, W, scales, C, M, N, K);
}
extern "C" __global__ void __launch_bounds__(THREADS) gemm_bf16_silu(const bf16* A, const bf16* W,
                                                                     const float* scales, bf16* C, int M, int N,
                                                                     int K) {
    gemm_body<true>(A, W, scales, C, M, N, K);
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
