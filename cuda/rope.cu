// OLMo 2's attention input: QK-norm over the whole q (H·d) and k (Hkv·d) vectors, RoPE (rotate-half, f32
// angles), then k and v appended to this layer's KV cache.
//   qk_norm_rope_append:       one block per token (prefill: T blocks).
//   qk_norm_rope_append_heads: one block per (token, head), each recomputing its vector's norm (decode: T = 1,
//                              so H + Hkv blocks share the work a single block would do alone).
#include "common.cuh"

// Rotate the pair (x0, x1) = (x[i], x[i + d/2]) of one head by pos·inv_freq[i] and store it as bf16.
OS_DEVICE void rotate_store(float x0, float x1, float angle, bf16* dst, int i, int half) {
    float s, c;
    sincosf(angle, &s, &c);
    dst[i] = __float2bfloat16(x0 * c - x1 * s);
    dst[i + half] = __float2bfloat16(x1 * c + x0 * s);
}

// Grid: (T) blocks, one per token. Block: 256 threads.
// qkv [T, Hd + 2·Hkvd] f32 (the fused projection's rows q;k;v); q_norm [Hd], k_norm [Hkvd] f32;
// inv_freq [d/2] f32 (θ^(−2i/d), computed on the host exactly as the reference does);
// q_out [T, H, d] bf16 (normed, rotated); k_cache, v_cache [Hkv, max_ctx, d] bf16, this layer's;
// start_pos [1] int32 in device memory: token t sits at position start_pos[0] + t (< max_ctx, host-checked).
extern "C" __global__ void qk_norm_rope_append(const float* __restrict__ qkv, const float* __restrict__ q_norm,
                                               const float* __restrict__ k_norm, const float* __restrict__ inv_freq,
                                               bf16* __restrict__ q_out, bf16* __restrict__ k_cache,
                                               bf16* __restrict__ v_cache, const int* __restrict__ start_pos, int H,
                                               int Hkv, int d, int max_ctx, float eps) {
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    const int pos = start_pos[0] + t;
    const int Hd = H * d, Hkvd = Hkv * d, half = d / 2;
    const float* q = qkv + (size_t)t * (Hd + 2 * Hkvd);
    const float* k = q + Hd;
    const float* v = k + Hkvd;

    float ssq = 0.f, ssk = 0.f;
    for (int i = threadIdx.x; i < Hd; i += blockDim.x) ssq += q[i] * q[i];
    for (int i = threadIdx.x; i < Hkvd; i += blockDim.x) ssk += k[i] * k[i];
    const float rq = rsqrtf(block_sum(ssq, scratch) / Hd + eps);
    const float rk = rsqrtf(block_sum(ssk, scratch) / Hkvd + eps);

    // One thread per rotated pair (i, i + d/2) of one head.
    for (int p = threadIdx.x; p < (H + Hkv) * half; p += blockDim.x) {
        const bool is_q = p < H * half;
        const int pp = is_q ? p : p - H * half;
        const int head = pp / half, i = pp % half;
        const int j0 = head * d + i, j1 = j0 + half;
        const float angle = static_cast<float>(pos) * inv_freq[i];
        if (is_q) {
            rotate_store(q[j0] * rq * q_norm[j0], q[j1] * rq * q_norm[j1], angle, q_out + (size_t)t * Hd + head * d, i,
                         half);
        } else {
            rotate_store(k[j0] * rk * k_norm[j0], k[j1] * rk * k_norm[j1], angle,
                         k_cache + ((size_t)head * max_ctx + pos) * d, i, half);
        }
    }
    for (int j = threadIdx.x; j < Hkvd; j += blockDim.x) {
        const int head = j / d, i = j % d;
        v_cache[((size_t)head * max_ctx + pos) * d + i] = __float2bfloat16(v[j]);
    }
}

// Grid: (T, H + Hkv): block (t, j) handles query head j (j < H) or kv head j − H of token t. Block: 128 threads.
// Arguments as qk_norm_rope_append; needs d % 4 == 0 (16-byte loads for the norm).
extern "C" __global__ void qk_norm_rope_append_heads(const float* __restrict__ qkv, const float* __restrict__ q_norm,
                                                     const float* __restrict__ k_norm,
                                                     const float* __restrict__ inv_freq, bf16* __restrict__ q_out,
                                                     bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                                     const int* __restrict__ start_pos, int H, int Hkv, int d,
                                                     int max_ctx, float eps) {
    __shared__ float scratch[32];
    const int t = blockIdx.x, j = blockIdx.y;
    const int pos = start_pos[0] + t;
    const int Hd = H * d, Hkvd = Hkv * d, half = d / 2;
    const bool is_q = j < H;
    const int head = is_q ? j : j - H;
    const float* row = qkv + (size_t)t * (Hd + 2 * Hkvd);
    const float* x = is_q ? row : row + Hd;  // the whole q (or k) vector: the norm spans all heads
    const int width = is_q ? Hd : Hkvd;
    float ss = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < width / 4; i += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(x)[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / width + eps);
    const float* w = is_q ? q_norm : k_norm;
    bf16* dst = is_q ? q_out + (size_t)t * Hd + head * d : k_cache + ((size_t)head * max_ctx + pos) * d;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int j0 = head * d + i, j1 = j0 + half;
        rotate_store(x[j0] * r * w[j0], x[j1] * r * w[j1], static_cast<float>(pos) * inv_freq[i], dst, i, half);
    }
    if (!is_q) {
        const float* v = row + Hd + Hkvd + head * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x)
            v_cache[((size_t)head * max_ctx + pos) * d + i] = __float2bfloat16(v[i]);
    }
}
