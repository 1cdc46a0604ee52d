// Projections for 1 … GEMV_MAX_ROWS token rows (small decode batches): y = x·Wᵀ, bf16 or int8 weights, bf16
// activations, f32 accumulation. Memory-bound: every weight byte is read once per step for all M rows through
// 16-byte streaming loads, with UNROLL loads per row in flight per lane so the whole chip keeps enough bytes moving
// to reach bandwidth; the M rows of x (a few KB) come from L1.
#include "common.cuh"

constexpr int UNROLL = 4;         // 16-byte loads in flight per weight row per lane (two rows per warp: 8 in flight)
constexpr int GEMV_WARPS = 8;     // warps per block
constexpr int GEMV_MAX_ROWS = 4;  // M = 1 … 4 (runtime/cuda/kernels.py: larger batches go to the tensor-core GEMM)

// 8 bf16 weights (one 16-byte vector) dotted with the matching 8 bf16 activations (one 16-byte vector).
OS_DEVICE float dot8_bf16(uint4 w, uint4 x) {
    float acc = bf16_lo(w.x) * bf16_lo(x.x);
    acc = fmaf(bf16_hi(w.x), bf16_hi(x.x), acc);
    acc = fmaf(bf16_lo(w.y), bf16_lo(x.y), acc);
    acc = fmaf(bf16_hi(w.y), bf16_hi(x.y), acc);
    acc = fmaf(bf16_lo(w.z), bf16_lo(x.z), acc);
    acc = fmaf(bf16_hi(w.z), bf16_hi(x.z), acc);
    acc = fmaf(bf16_lo(w.w), bf16_lo(x.w), acc);
    acc = fmaf(bf16_hi(w.w), bf16_hi(x.w), acc);
    return acc;
}

// Four int8 weights widened without the quarter-rate int→float instruction: byte q + 128 placed in the low
// mantissa bits of 2^23 is the float 2^23 + 128 + q, exactly; subtracting 2^23 + 128 leaves q.
OS_DEVICE void widen4_int8(uint32_t w, float (&q)[4]) {
    const uint32_t u = w ^ 0x80808080u;  // each byte q + 128, unsigned
    constexpr float OFFSET = 8388736.f;  // 2^23 + 128
    q[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - OFFSET;
    q[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - OFFSET;
    q[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - OFFSET;
    q[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - OFFSET;
}

// One 16-byte weight vector widened to f32: 8 bf16 or 16 int8 elements.
template <typename W>
struct Widened;
template <>
struct Widened<bf16> {
    static constexpr int N = 8;
    float v[8];
    OS_DEVICE explicit Widened(uint4 w) {
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = bf16_lo(words[i]);
            v[2 * i + 1] = bf16_hi(words[i]);
        }
    }
};
template <>
struct Widened<int8_t> {
    static constexpr int N = 16;
    float v[16];
    OS_DEVICE explicit Widened(uint4 w) {
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float q[4];
            widen4_int8(words[i], q);
#pragma unroll
            for (int e = 0; e < 4; e++) v[4 * i + e] = q[e];
        }
    }
};

// acc0 += w0·x, acc1 += w1·x for the activations x of one row at element offset e (EPV elements).
template <typename W>
OS_DEVICE void dot_pair(uint4 a, uint4 b, const bf16* __restrict__ x, float& acc0, float& acc1) {
    if constexpr (sizeof(W) == 2) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x));
        acc0 += dot8_bf16(a, xv);
        acc1 += dot8_bf16(b, xv);
    } else {
        const Widened<int8_t> wa(a), wb(b);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x) + h);
            const uint32_t words[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float x0 = bf16_lo(words[i]), x1 = bf16_hi(words[i]);
                acc0 = fmaf(wa.v[8 * h + 2 * i], x0, acc0);
                acc0 = fmaf(wa.v[8 * h + 2 * i + 1], x1, acc0);
                acc1 = fmaf(wb.v[8 * h + 2 * i], x0, acc1);
                acc1 = fmaf(wb.v[8 * h + 2 * i + 1], x1, acc1);
            }
        }
    }
}

// Each row pair (r0, r1) is dotted with the M rows of x by `split` warps (1, 2, 4 or 8) of one block, which share
// its K range interleaved by 32·split vectors and add their partials through shared memory in a fixed order;
// splitting K keeps enough warps streaming when N is small (o_proj, down_proj) and costs nothing when N is large.
//   plain:     rows (2p, 2p+1), y[m, r] = acc·scale[r]                        y [M, N] f32
//   silu_pair: rows (p, I+p) of the fused [gate; up] matrix, y[m, p] = bf16(SiLU(gate)·up)   y [M, I] bf16, N = 2I
// so the SwiGLU product is formed where gate and up are computed, and never round-trips through memory.
template <typename W, int M, bool SILU_PAIR>
OS_DEVICE void gemv_body(const W* __restrict__ weight, const float* __restrict__ scales, const bf16* __restrict__ x,
                         void* __restrict__ y, int N, int K, int split, bool w_early) {
    static_assert(M >= 1 && M <= GEMV_MAX_ROWS, "one to GEMV_MAX_ROWS rows");
    constexpr int EPV = 16 / sizeof(W);  // weight elements per 16-byte vector
    __shared__ float partial[GEMV_WARPS][M][2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int pair = blockIdx.x * (GEMV_WARPS / split) + warp / split;
    const int slice = warp % split, stride = 32 * split;
    const int pairs = SILU_PAIR ? N / 2 : (N + 1) / 2;
    const bool active = pair < pairs;
    const int r0 = SILU_PAIR ? pair : 2 * pair;
    const int r1 = SILU_PAIR ? pair + N / 2 : min(2 * pair + 1, N - 1);  // odd N: the last pair reads r0 twice

    float acc0[M], acc1[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc0[m] = acc1[m] = 0.f;
    const uint4* w0 = reinterpret_cast<const uint4*>(weight + (size_t)r0 * K);
    const uint4* w1 = reinterpret_cast<const uint4*>(weight + (size_t)r1 * K);
    const int nvec = K / EPV;
    int v = slice * 32 + lane;
    // w_early: the first UNROLL loads go before the grid dependency wait (common.cuh), streaming while the previous
    // kernel drains.
    bool loaded = w_early && active && v + stride * (UNROLL - 1) < nvec;
    uint4 a[UNROLL], b[UNROLL];
    if (loaded) {
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            a[u] = load_stream16(w0 + v + stride * u);
            b[u] = load_stream16(w1 + v + stride * u);
        }
    }
    grid_dependency_wait();
    if (active) {
        for (; v + stride * (UNROLL - 1) < nvec; v += stride * UNROLL) {
            if (!loaded) {
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {  // every load in flight before the first use
                    a[u] = load_stream16(w0 + v + stride * u);
                    b[u] = load_stream16(w1 + v + stride * u);
                }
            }
            loaded = false;
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
#pragma unroll
                for (int m = 0; m < M; m++)
                    dot_pair<W>(a[u], b[u], x + (size_t)m * K + (size_t)(v + stride * u) * EPV, acc0[m], acc1[m]);
            }
        }
        for (; v < nvec; v += stride) {
            const uint4 a = load_stream16(w0 + v), b = load_stream16(w1 + v);
#pragma unroll
            for (int m = 0; m < M; m++) dot_pair<W>(a, b, x + (size_t)m * K + (size_t)v * EPV, acc0[m], acc1[m]);
        }
    }
    grid_dependents_launch();  // only now (common.cuh): the next kernel's blocks would wait on ours, holding their slots
#pragma unroll
    for (int m = 0; m < M; m++) {
        acc0[m] = warp_sum(acc0[m]);
        acc1[m] = warp_sum(acc1[m]);
    }
    if (split > 1) {
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < M; m++) {
                partial[warp][m][0] = acc0[m];
                partial[warp][m][1] = acc1[m];
            }
        }
        __syncthreads();
        if (slice != 0) return;
#pragma unroll
        for (int m = 0; m < M; m++) {
            for (int s = 1; s < split; s++) {
                acc0[m] += partial[warp + s][m][0];
                acc1[m] += partial[warp + s][m][1];
            }
        }
    }
    if (!active || lane >= M) return;
    // lane m writes row m of the output (M ≤ 32); acc arrays indexed by constants only (no local memory).
    float s0 = 1.f, s1 = 1.f;
    if (scales) {
        s0 = scales[r0];
        s1 = scales[r1];
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        if (lane != m) continue;
        const float g = acc0[m] * s0, u = acc1[m] * s1;
        if (SILU_PAIR) {
            reinterpret_cast<bf16*>(y)[(size_t)m * (N / 2) + pair] = __float2bfloat16(silu(g) * u);
        } else {
            float* out = reinterpret_cast<float*>(y) + (size_t)m * N;
            out[r0] = g;
            if (r1 != r0) out[r1] = u;
        }
    }
}

// Grid: (ceil(pairs / (8 / split))); block: 256 threads; split ∈ {1, 2, 4, 8} warps per row pair.
// weight [N, K] (bf16: K % 8 == 0; int8: K % 16 == 0), 16-byte aligned rows; scales [N] f32 per weight row, or null;
// x [M, K] bf16 row-major; y [M, N] f32 (plain) or [M, N/2] bf16 (silu, W = [gate; up]).
// w_early: 1 when no kernel writes W (the model's weights): its first stages are copied before the grid dependency
// wait (common.cuh); 0 for a scratch an earlier kernel filled (runtime/cuda/kernels.py Kernels.gemm static_weights).
#define GEMV_KERNEL(NAME, W, M, SILU, YT)                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                  \
        NAME(const W* w, const float* scales, const bf16* x, YT* y, int N, int K, int split, int w_early) {        \
        gemv_body<W, M, SILU>(w, scales, x, y, N, K, split, w_early);                                              \
    }
#define GEMV_FAMILY(M)                                                 \
    GEMV_KERNEL(gemv_bf16_m##M, bf16, M, false, float)                 \
    GEMV_KERNEL(gemv_int8_m##M, int8_t, M, false, float)               \
    GEMV_KERNEL(gemv_bf16_silu_m##M, bf16, M, true, bf16)              \
    GEMV_KERNEL(gemv_int8_silu_m##M, int8_t, M, true, bf16)
GEMV_FAMILY(1)
GEMV_FAMILY(2)
GEMV_FAMILY(3)
GEMV_FAMILY(4)
