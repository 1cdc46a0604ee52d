// Decode projections: y = W·x for one token (batch 1), bf16 or int8 weights, f32 accumulation.
// Memory-bound: every weight byte is read once per step through 16-byte streaming loads, with UNROLL
// loads per row in flight per lane so the whole chip keeps enough bytes moving to reach bandwidth.
#include "common.cuh"

constexpr int UNROLL = 4;      // 16-byte loads in flight per row per lane (two rows per warp: 8 in flight)
constexpr int GEMV_WARPS = 8;  // warps per block

// 16 bytes of weights dotted with the matching x: 8 bf16 or 16 int8 elements.
OS_DEVICE float dot16(uint4 w, const float* __restrict__ x, bf16) {
    const float4 x0 = __ldg(reinterpret_cast<const float4*>(x));
    const float4 x1 = __ldg(reinterpret_cast<const float4*>(x) + 1);
    return bf16_lo(w.x) * x0.x + bf16_hi(w.x) * x0.y + bf16_lo(w.y) * x0.z + bf16_hi(w.y) * x0.w +
           bf16_lo(w.z) * x1.x + bf16_hi(w.z) * x1.y + bf16_lo(w.w) * x1.z + bf16_hi(w.w) * x1.w;
}

// Four int8 weights dotted with x, widened without the quarter-rate int→float instruction: byte q + 128 placed in
// the low mantissa bits of 2^23 is the float 2^23 + 128 + q, exactly; subtracting 2^23 + 128 leaves q.
OS_DEVICE float dot4_int8(uint32_t w, float4 x) {
    const uint32_t u = w ^ 0x80808080u;  // each byte q + 128, unsigned
    constexpr float OFFSET = 8388736.f;  // 2^23 + 128
    const float q0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - OFFSET;
    const float q1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - OFFSET;
    const float q2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - OFFSET;
    const float q3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - OFFSET;
    return q0 * x.x + q1 * x.y + q2 * x.z + q3 * x.w;
}

OS_DEVICE float dot16(uint4 w, const float* __restrict__ x, int8_t) {
    const float4* xv = reinterpret_cast<const float4*>(x);
    return dot4_int8(w.x, __ldg(xv)) + dot4_int8(w.y, __ldg(xv + 1)) + dot4_int8(w.z, __ldg(xv + 2)) +
           dot4_int8(w.w, __ldg(xv + 3));
}

// Each row pair (r0, r1) is dotted with x by `split` warps (1, 2, 4 or 8) of one block, which share its K range
// interleaved by 32·split vectors and add their partials through shared memory; splitting K keeps enough warps
// streaming when N is small (o_proj, down_proj) and costs nothing when N is large (split 1).
//   plain:     rows (2p, 2p+1), y[r] = acc·scale[r]                       y [N] f32
//   silu_pair: rows (p, I+p) of the fused [gate; up] matrix, y[p] = SiLU(gate)·up   y [I] f32, N = 2I
// so the SwiGLU product is formed where gate and up are computed, and never round-trips through memory.
template <typename W, bool SILU_PAIR>
OS_DEVICE void gemv_body(const W* __restrict__ weight, const float* __restrict__ scales,
                         const float* __restrict__ x, float* __restrict__ y, int N, int K, int split) {
    constexpr int EPV = 16 / sizeof(W);  // elements per 16-byte vector
    __shared__ float partial[GEMV_WARPS][2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int pair = blockIdx.x * (GEMV_WARPS / split) + warp / split;
    const int slice = warp % split, stride = 32 * split;
    const int pairs = SILU_PAIR ? N / 2 : (N + 1) / 2;
    const bool active = pair < pairs;
    const int r0 = SILU_PAIR ? pair : 2 * pair;
    const int r1 = SILU_PAIR ? pair + N / 2 : min(2 * pair + 1, N - 1);  // odd N: the last pair reads r0 twice

    float acc0 = 0.f, acc1 = 0.f;
    if (active) {
        const uint4* w0 = reinterpret_cast<const uint4*>(weight + (size_t)r0 * K);
        const uint4* w1 = reinterpret_cast<const uint4*>(weight + (size_t)r1 * K);
        const int nvec = K / EPV;
        int v = slice * 32 + lane;
        for (; v + stride * (UNROLL - 1) < nvec; v += stride * UNROLL) {
            uint4 a[UNROLL], b[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                a[u] = load_stream16(w0 + v + stride * u);
                b[u] = load_stream16(w1 + v + stride * u);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const float* xs = x + (size_t)(v + stride * u) * EPV;
                acc0 += dot16(a[u], xs, W());
                acc1 += dot16(b[u], xs, W());
            }
        }
        for (; v < nvec; v += stride) {
            const float* xs = x + (size_t)v * EPV;
            acc0 += dot16(load_stream16(w0 + v), xs, W());
            acc1 += dot16(load_stream16(w1 + v), xs, W());
        }
    }
    acc0 = warp_sum(acc0);
    acc1 = warp_sum(acc1);
    if (lane == 0) {
        partial[warp][0] = acc0;
        partial[warp][1] = acc1;
    }
    __syncthreads();
    if (!active || slice != 0 || lane != 0) return;
    for (int s = 1; s < split; s++) {
        acc0 += partial[warp + s][0];
        acc1 += partial[warp + s][1];
    }
    if (scales) {
        acc0 *= scales[r0];
        acc1 *= scales[r1];
    }
    if (SILU_PAIR) {
        y[pair] = silu(acc0) * acc1;
    } else {
        y[r0] = acc0;
        if (r1 != r0) y[r1] = acc1;
    }
}

// Grid: (ceil(pairs / (8 / split))); block: 256 threads; split ∈ {1, 2, 4, 8} warps per row pair.
// weight [N, K] (bf16: K % 8 == 0; int8: K % 16 == 0, 16-byte aligned rows); scales [N] f32 or null (int8 only);
// x [K] f32; y as listed at gemv_body.
#define GEMV_KERNEL(NAME, W, SILU)                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                              \
        NAME(const W* w, const float* scales, const float* x, float* y, int N, int K, int split) {              \
        gemv_body<W, SILU>(w, scales, x, y, N, K, split);                                                      \
    }
GEMV_KERNEL(gemv_bf16, bf16, false)
GEMV_KERNEL(gemv_bf16_silu, bf16, true)
GEMV_KERNEL(gemv_int8, int8_t, false)
GEMV_KERNEL(gemv_int8_silu, int8_t, true)
