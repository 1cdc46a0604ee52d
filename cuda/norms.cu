// RMSNorm, alone (final norm) and fused with OLMo 2's post-norm residual update h = h + RMSNorm(a)·w.
// RMSNorm: x·rsqrt(mean(x²) + eps), multiplied by the weight in f32.
#include "common.cuh"

// Σ x² over one row of D floats (D % 4 == 0), 16-byte loads, reduced over the block.
OS_DEVICE float row_sum_squares(const float* __restrict__ row, int D, float* scratch) {
    const float4* v = reinterpret_cast<const float4*>(row);
    float ss = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
        const float4 x = v[i];
        ss += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    return block_sum(ss, scratch);
}

// Grid: (T, slices) — block (t, s) updates the s-th of `slices` equal slices of row t (every block of a row
// computes the row's norm itself, so a single row can be spread over several multiprocessors in decode).
// Block: 256 threads, 4 elements (16 bytes) each per step. D % 4 == 0.
// h [T, D] f32 residual (updated in place); a [T, D] f32 (projection output); w [D] f32;
// h_bf16 [T, D] bf16 copy of the new h for the next GEMM, or null (decode feeds GEMVs f32 directly).
extern "C" __global__ void residual_rmsnorm_add(float* __restrict__ h, const float* __restrict__ a,
                                                const float* __restrict__ w, bf16* __restrict__ h_bf16, int D,
                                                float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * D;
    const float r = rsqrtf(row_sum_squares(a + base, D, scratch) / D + eps);
    const int per_slice = (D / 4 + gridDim.y - 1) / gridDim.y;
    const int end = min(D / 4, (int)(blockIdx.y + 1) * per_slice);
    for (int i = blockIdx.y * per_slice + threadIdx.x; i < end; i += blockDim.x) {
        float4 x = reinterpret_cast<float4*>(h + base)[i];
        const float4 y = reinterpret_cast<const float4*>(a + base)[i];
        const float4 g = reinterpret_cast<const float4*>(w)[i];
        x.x += y.x * r * g.x;
        x.y += y.y * r * g.y;
        x.z += y.z * r * g.z;
        x.w += y.w * r * g.w;
        reinterpret_cast<float4*>(h + base)[i] = x;
        if (h_bf16) {
            reinterpret_cast<uint2*>(h_bf16 + base)[i] = make_uint2(pack_bf16x2(x.x, x.y), pack_bf16x2(x.z, x.w));
        }
    }
}

// Grid: (T, slices) as above; block: 256 threads. x [T, D] f32; w [D] f32; out [T, D] f32 or bf16. D % 4 == 0.
template <bool BF16_OUT>
OS_DEVICE void rmsnorm_body(const float* __restrict__ x, const float* __restrict__ w, void* __restrict__ out, int D,
                            float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * D;
    const float r = rsqrtf(row_sum_squares(x + base, D, scratch) / D + eps);
    const int per_slice = (D / 4 + gridDim.y - 1) / gridDim.y;
    const int end = min(D / 4, (int)(blockIdx.y + 1) * per_slice);
    for (int i = blockIdx.y * per_slice + threadIdx.x; i < end; i += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(x + base)[i];
        const float4 g = reinterpret_cast<const float4*>(w)[i];
        const float4 y = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
        if (BF16_OUT) {
            reinterpret_cast<uint2*>(reinterpret_cast<bf16*>(out) + base)[i] =
                make_uint2(pack_bf16x2(y.x, y.y), pack_bf16x2(y.z, y.w));
        } else {
            reinterpret_cast<float4*>(reinterpret_cast<float*>(out) + base)[i] = y;
        }
    }
}

extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, int D, float eps) {
    rmsnorm_body<false>(x, w, out, D, eps);
}
// The input of the prefill lm_head GEMM.
extern "C" __global__ void rmsnorm_bf16(const float* x, const float* w, bf16* out, int D, float eps) {
    rmsnorm_body<true>(x, w, out, D, eps);
}
