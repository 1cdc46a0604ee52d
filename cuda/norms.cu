// RMSNorm fused with OLMo 2's post-norm residual update h = h + RMSNorm(a)·w, and the final norm of the rows
// that need logits. RMSNorm: x·rsqrt(mean(x²) + eps), multiplied by the weight in f32.
// The projection output a may arrive as split-K partial sums: a_row = Σ_p a[p·part_stride + row], summed in the
// order p = 0, 1, … (sum_parts4), so every run gives the same bits.
#include "common.cuh"

constexpr int NORM_THREADS = 256;
constexpr int NORM_ITEMS = 8;  // residual_rmsnorm_add: quads per thread, D ≤ 8192

// Σ x² over one row of D floats (D % 4 == 0) given as n_parts partials, 16-byte loads, reduced over the block.
OS_DEVICE float row_sum_squares(const float* __restrict__ row, int n_parts, long long part_stride, int D,
                                float* scratch) {
    float ss = 0.f;

    for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
        const float4 x = sum_parts4(row, n_parts, part_stride, (size_t)i * 4);
        ss += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    return block_sum(ss, scratch);
}

// Grid: (T, slices) — block (t, s) updates the s-th of `slices` equal slices of row t (every block of a row
// computes the row's norm itself, so a few rows can be spread over several multiprocessors in decode).
// Block: NORM_THREADS threads; thread j holds the row's 16-byte quads j, j + NORM_THREADS, … (at most NORM_ITEMS) in
// registers: every load of a part is issued before the first is used, so a row costs about one memory latency per
// part instead of one per loop step (H200, 7B decode at batch 64, 8 partials: 7.5 → 4.6 µs).
// D % 4 == 0, D ≤ 4·NORM_ITEMS·NORM_THREADS, part_stride % 4 == 0.
// h [T, D] f32 residual (updated in place); a: parts × [T, D] f32 partials, part p at a + p·part_stride;
// w [D] f32; h_bf16 [T, D] bf16 copy of the new h for the next projection, or null.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    residual_rmsnorm_add(float* __restrict__ h, const float* __restrict__ a, int parts, long long part_stride,
                         const float* __restrict__ w, bf16* __restrict__ h_bf16, int D, float eps) {
    grid_dependency_sync();
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * D;
    const int quads = D / 4, per_slice = (quads + gridDim.y - 1) / gridDim.y;
    const int first = blockIdx.y * per_slice, end = min(quads, first + per_slice);
    float4 y[NORM_ITEMS], x[NORM_ITEMS], g[NORM_ITEMS];
    load_quads<NORM_ITEMS, NORM_THREADS>(y, a + base, parts, part_stride, quads);
#pragma unroll
    for (int k = 0; k < NORM_ITEMS; k++) {  // this slice's residual and weights, fetched while the norm is reduced
        const int i = threadIdx.x + k * NORM_THREADS;
        if (i >= first && i < end) {
            x[k] = reinterpret_cast<const float4*>(h + base)[i];
            g[k] = reinterpret_cast<const float4*>(w)[i];
        }
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_ITEMS; k++) ss += dot4(y[k], y[k]);
    const float r = rsqrtf(block_sum(ss, scratch) / D + eps);
#pragma unroll
    for (int k = 0; k < NORM_ITEMS; k++) {
        const int i = threadIdx.x + k * NORM_THREADS;
        if (i < first || i >= end) continue;
        add4(x[k], scale4(y[k], r, g[k]));
        reinterpret_cast<float4*>(h + base)[i] = x[k];
        if (h_bf16) {
            reinterpret_cast<uint2*>(h_bf16 + base)[i] =
                make_uint2(pack_bf16x2(x[k].x, x[k].y), pack_bf16x2(x[k].z, x[k].w));
        }
    }
}

// Grid: (R, slices) as above; block: 256 threads. The final norm of just the rows that need logits:
// out[r] = bf16(RMSNorm(x[rows[r]])·w), x [T, D] f32 (the residual stream), rows [R] int32 (row indices into x),
// w [D] f32, out [R, D] bf16 (the lm_head projection's input). D % 4 == 0.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_rows_bf16(const float* __restrict__ x, const int* __restrict__ rows, const float* __restrict__ w,
                      bf16* __restrict__ out, int D, float eps) {
    grid_dependency_sync();
    __shared__ float scratch[32];
    const float* row = x + (size_t)rows[blockIdx.x] * D;
    const float r = rsqrtf(row_sum_squares(row, 1, 0, D, scratch) / D + eps);
    const int per_slice = (D / 4 + gridDim.y - 1) / gridDim.y;
    const int end = min(D / 4, (int)(blockIdx.y + 1) * per_slice);
    for (int i = blockIdx.y * per_slice + threadIdx.x; i < end; i += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(row)[i];
        const float4 g = reinterpret_cast<const float4*>(w)[i];
        reinterpret_cast<uint2*>(out + (size_t)blockIdx.x * D)[i] =
            make_uint2(pack_bf16x2(v.x * r * g.x, v.y * r * g.y), pack_bf16x2(v.z * r * g.z, v.w * r * g.w));
    }
}
