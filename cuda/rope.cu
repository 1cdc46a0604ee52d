// OLMo 2's attention input: QK-norm over the whole q (H·d) and k (Hkv·d) vectors, RoPE (rotate-half, f32
// angles, exact sincosf), then k and v written to their slots of this layer's paged KV cache.
//   qk_norm_rope_append:       one block per token (many rows: prefill).
//   qk_norm_rope_append_heads: one block per (token, head), each recomputing its vector's norm (a few rows:
//                              H + Hkv blocks per row share the work a single block would do alone).
// The fused projection's output may be split-K partials: row t = Σ_p qkv[p·part_stride + t·(H + 2Hkv)·d + j].
#include "common.cuh"

constexpr int ROPE_THREADS = 256;
constexpr int ROPE_HEAD_THREADS = 128;

// Pool address of element 0 of (slot, kv head): plane [num_blocks, Hkv, KV_BLOCK, d].
OS_DEVICE size_t pool_offset(int slot, int head, int Hkv, int d) {
    const int block = slot >> KV_BLOCK_SHIFT, offset = slot & (KV_BLOCK - 1);
    return (((size_t)block * Hkv + head) * KV_BLOCK + offset) * d;
}

// Rotate four pairs (x0[e], x1[e]) = (x[i+e], x[i+e+d/2]) of one head by pos·inv_freq[i+e], then store them as bf16:
// dst[i…i+3] and dst[i+d/2 …] (8-byte stores; i % 4 == 0).
OS_DEVICE void rotate_store4(float4 x0, float4 x1, int pos, const float* __restrict__ inv_freq, bf16* dst, int i,
                             int half) {
    const float a[4] = {x0.x, x0.y, x0.z, x0.w}, b[4] = {x1.x, x1.y, x1.z, x1.w};
    const float4 f = *reinterpret_cast<const float4*>(inv_freq + i);
    const float freq[4] = {f.x, f.y, f.z, f.w};
    float lo[4], hi[4];
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float s, c;
        sincosf(static_cast<float>(pos) * freq[e], &s, &c);
        lo[e] = a[e] * c - b[e] * s;
        hi[e] = b[e] * c + a[e] * s;
    }
    *reinterpret_cast<uint2*>(dst + i) = make_uint2(pack_bf16x2(lo[0], lo[1]), pack_bf16x2(lo[2], lo[3]));
    *reinterpret_cast<uint2*>(dst + i + half) = make_uint2(pack_bf16x2(hi[0], hi[1]), pack_bf16x2(hi[2], hi[3]));
}

OS_DEVICE float4 scale4(float4 x, float r, float4 w) {
    return make_float4(x.x * r * w.x, x.y * r * w.y, x.z * r * w.z, x.w * r * w.w);
}

OS_DEVICE void store_bf16x4(bf16* dst, float4 v) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
}

// Σ x² over n floats (n % 4 == 0) of a partial-summed row, reduced over the block.
OS_DEVICE float sum_squares(const float* __restrict__ x, int parts, long long part_stride, int n, float* scratch) {
    float ss = 0.f;

    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
        const float4 v = sum_parts4(x, parts, part_stride, (size_t)i * 4);
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    return block_sum(ss, scratch);
}

// Grid: (T) blocks, one per token. Block: 256 threads, each rotating four pairs (i … i+3, i+d/2 …) of one head per step.
// qkv: parts × [T, (H + 2Hkv)·d] f32 (q; k; v per row), part p at qkv + p·part_stride; q_norm [H·d], k_norm [Hkv·d]
// f32; inv_freq [d/2] f32 (θ^(−2i/d), computed on the host exactly as the reference does); q_out [T, H, d] bf16;
// k_pool, v_pool [num_blocks, Hkv, 16, d] bf16 (this layer's planes); positions [T], slots [T] int32: row t is at
// position positions[t] and goes to cache slot slots[t] (padding rows: a slot of the null block 0).
// Needs d % 8 == 0 and part_stride % 4 == 0 (16-byte loads).
extern "C" __global__ void __launch_bounds__(ROPE_THREADS, 1)
    qk_norm_rope_append(const float* __restrict__ qkv, int parts, long long part_stride,
                        const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                        const float* __restrict__ inv_freq, bf16* __restrict__ q_out, bf16* __restrict__ k_pool,
                        bf16* __restrict__ v_pool, const int* __restrict__ positions, const int* __restrict__ slots,
                        int H, int Hkv, int d, float eps) {
    grid_dependency_sync();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    const int pos = positions[t], slot = slots[t];
    const int Hd = H * d, Hkvd = Hkv * d, half = d / 2, quads = half / 4;
    const float* q = qkv + (size_t)t * (Hd + 2 * Hkvd);
    const float* k = q + Hd;
    const float* v = k + Hkvd;
    const float rq = rsqrtf(sum_squares(q, parts, part_stride, Hd, scratch) / Hd + eps);
    const float rk = rsqrtf(sum_squares(k, parts, part_stride, Hkvd, scratch) / Hkvd + eps);

    for (int p = threadIdx.x; p < (H + Hkv) * quads; p += blockDim.x) {
        const bool is_q = p < H * quads;
        const int pp = is_q ? p : p - H * quads;
        const int head = pp / quads, i = (pp % quads) * 4;
        const int j0 = head * d + i, j1 = j0 + half;
        const float* x = is_q ? q : k;
        const float* w = is_q ? q_norm : k_norm;
        const float r = is_q ? rq : rk;
        const float4 x0 = scale4(sum_parts4(x, parts, part_stride, j0), r, *reinterpret_cast<const float4*>(w + j0));
        const float4 x1 = scale4(sum_parts4(x, parts, part_stride, j1), r, *reinterpret_cast<const float4*>(w + j1));
        bf16* dst = is_q ? q_out + (size_t)t * Hd + head * d : k_pool + pool_offset(slot, head, Hkv, d);
        rotate_store4(x0, x1, pos, inv_freq, dst, i, half);
    }
    for (int j = threadIdx.x * 4; j < Hkvd; j += blockDim.x * 4) {
        const int head = j / d, i = j % d;
        store_bf16x4(v_pool + pool_offset(slot, head, Hkv, d) + i, sum_parts4(v, parts, part_stride, j));
    }
}

// Grid: (T, H + Hkv): block (t, j) handles query head j (j < H) or kv head j − H of token t (and that kv head's v).
// Block: 128 threads. Arguments and requirements as qk_norm_rope_append.
extern "C" __global__ void __launch_bounds__(ROPE_HEAD_THREADS, 1)
    qk_norm_rope_append_heads(const float* __restrict__ qkv, int parts, long long part_stride,
                              const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                              const float* __restrict__ inv_freq, bf16* __restrict__ q_out,
                              bf16* __restrict__ k_pool, bf16* __restrict__ v_pool,
                              const int* __restrict__ positions, const int* __restrict__ slots, int H, int Hkv,
                              int d, float eps) {
    grid_dependency_sync();
    __shared__ float scratch[32];
    const int t = blockIdx.x, j = blockIdx.y;
    const int pos = positions[t], slot = slots[t];
    const int Hd = H * d, Hkvd = Hkv * d, half = d / 2;
    const bool is_q = j < H;
    const int head = is_q ? j : j - H;
    const float* row = qkv + (size_t)t * (Hd + 2 * Hkvd);
    const float* x = is_q ? row : row + Hd;  // the whole q (or k) vector: the norm spans all heads
    const int width = is_q ? Hd : Hkvd;
    const float r = rsqrtf(sum_squares(x, parts, part_stride, width, scratch) / width + eps);
    const float* w = is_q ? q_norm : k_norm;
    bf16* dst = is_q ? q_out + (size_t)t * Hd + head * d : k_pool + pool_offset(slot, head, Hkv, d);
    for (int i = threadIdx.x * 4; i < half; i += blockDim.x * 4) {
        const int j0 = head * d + i, j1 = j0 + half;
        const float4 x0 = scale4(sum_parts4(x, parts, part_stride, j0), r, *reinterpret_cast<const float4*>(w + j0));
        const float4 x1 = scale4(sum_parts4(x, parts, part_stride, j1), r, *reinterpret_cast<const float4*>(w + j1));
        rotate_store4(x0, x1, pos, inv_freq, dst, i, half);
    }
    if (!is_q) {
        const float* v = row + Hd + Hkvd + head * d;
        bf16* vdst = v_pool + pool_offset(slot, head, Hkv, d);
        for (int i = threadIdx.x * 4; i < d; i += blockDim.x * 4)
            store_bf16x4(vdst + i, sum_parts4(v, parts, part_stride, i));
    }
}
