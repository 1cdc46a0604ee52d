// OLMo 2's attention input: QK-norm over the whole q (H·d) and k (Hkv·d) vectors, RoPE (rotate-half, f32
// angles, exact sincosf), then k and v written to their slots of this layer's paged KV cache.
//   qk_norm_rope_append:       two blocks per token, one for q and one for k and v (many rows).
//   qk_norm_rope_append_heads: one block per (token, head), each recomputing its vector's norm (a few rows:
//                              H + Hkv blocks per row share the work a single block would do alone).
// The fused projection's output may be split-K partials: row t = Σ_p qkv[p·part_stride + t·(H + 2Hkv)·d + j].
#include "common.cuh"

constexpr int ROPE_THREADS = 256;
constexpr int ROPE_ITEMS = 4;  // qk_norm_rope_append: rotation pairs per thread, H·d ≤ 8192
constexpr int ROPE_HEAD_THREADS = 128;

// Pool address of element 0 of (slot, kv head): plane [num_blocks, Hkv, KV_BLOCK, d].
OS_DEVICE size_t pool_offset(int slot, int head, int Hkv, int d) {
    const int block = slot >> KV_BLOCK_SHIFT, offset = slot & (KV_BLOCK - 1);
    return (((size_t)block * Hkv + head) * KV_BLOCK + offset) * d;
}

// Rotate four pairs (x0[e], x1[e]) = (x[i+e], x[i+e+d/2]) of one head by pos·f[e] (f = inv_freq[i … i+3]), then
// store them as bf16: dst[i…i+3] and dst[i+d/2 …] (8-byte stores; i % 4 == 0).
OS_DEVICE void rotate_store4(float4 x0, float4 x1, int pos, float4 f, bf16* dst, int i, int half) {
    const float a[4] = {x0.x, x0.y, x0.z, x0.w}, b[4] = {x1.x, x1.y, x1.z, x1.w};
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

// Grid: (T, 2): block (t, 0) norms and rotates token t's q, block (t, 1) its k, and appends k and v to the cache.
// Block: ROPE_THREADS threads; thread j holds the vector's rotation pairs (i … i+3, i+d/2 …) number j, j +
// ROPE_THREADS, … (at most ROPE_ITEMS) in registers, and v's quads likewise: every load of a part is issued before
// the first is used (one memory latency per part, not one per loop step).
// qkv: parts × [T, (H + 2Hkv)·d] f32 (q; k; v per row), part p at qkv + p·part_stride; q_norm [H·d], k_norm [Hkv·d]
// f32; inv_freq [d/2] f32 (θ^(−2i/d), computed on the host exactly as the reference does); q_out [T, H, d] bf16;
// k_pool, v_pool [num_blocks, Hkv, 16, d] bf16 (this layer's planes); positions [T], slots [T] int32: row t is at
// position positions[t] and goes to cache slot slots[t] (padding rows: a slot of the null block 0).
// Needs d % 8 == 0, part_stride % 4 == 0 (16-byte loads) and H·d ≤ 8·ROPE_ITEMS·ROPE_THREADS.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    qk_norm_rope_append(const float* __restrict__ qkv, int parts, long long part_stride,
                        const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                        const float* __restrict__ inv_freq, bf16* __restrict__ q_out, bf16* __restrict__ k_pool,
                        bf16* __restrict__ v_pool, const int* __restrict__ positions, const int* __restrict__ slots,
                        int H, int Hkv, int d, float eps) {
    grid_dependency_sync();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    const bool is_q = blockIdx.y == 0;
    const int pos = positions[t], slot = slots[t];
    const int Hd = H * d, Hkvd = Hkv * d, half = d / 2, quads = half / 4;
    const float* row = qkv + (size_t)t * (Hd + 2 * Hkvd);
    const float* x = is_q ? row : row + Hd;
    const float* w = is_q ? q_norm : k_norm;
    const int width = is_q ? Hd : Hkvd, pairs = width / 8;
    // Pair j: head j / quads, offset i = (j % quads)·4 within it; its halves are quads 2·head·quads + j % quads and
    // that plus quads of the vector: gather them from the parts as rows of quads.
    float4 lo[ROPE_ITEMS], hi[ROPE_ITEMS], v[2 * ROPE_ITEMS];
#pragma unroll
    for (int k = 0; k < ROPE_ITEMS; k++) lo[k] = hi[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int p = 0; p < parts; p++) {
        const float4* part = reinterpret_cast<const float4*>(x + p * part_stride);
#pragma unroll
        for (int k = 0; k < ROPE_ITEMS; k++) {
            const int j = threadIdx.x + k * ROPE_THREADS;
            if (j < pairs) {
                const int q0 = (j / quads) * 2 * quads + j % quads;
                add4(lo[k], part[q0]);
                add4(hi[k], part[q0 + quads]);
            }
        }
    }
    if (!is_q) load_quads<2 * ROPE_ITEMS, ROPE_THREADS>(v, row + Hd + Hkvd, parts, part_stride, Hkvd / 4);
    float4 w0[ROPE_ITEMS], w1[ROPE_ITEMS], f[ROPE_ITEMS];  // the norm weights and angles, fetched during the reduction
#pragma unroll
    for (int k = 0; k < ROPE_ITEMS; k++) {
        const int j = threadIdx.x + k * ROPE_THREADS;
        if (j >= pairs) continue;
        const int i = (j % quads) * 4, j0 = (j / quads) * d + i;
        w0[k] = *reinterpret_cast<const float4*>(w + j0);
        w1[k] = *reinterpret_cast<const float4*>(w + j0 + half);
        f[k] = *reinterpret_cast<const float4*>(inv_freq + i);
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < ROPE_ITEMS; k++) ss += dot4(lo[k], lo[k]) + dot4(hi[k], hi[k]);
    const float r = rsqrtf(block_sum(ss, scratch) / width + eps);
#pragma unroll
    for (int k = 0; k < ROPE_ITEMS; k++) {
        const int j = threadIdx.x + k * ROPE_THREADS;
        if (j >= pairs) continue;
        const int head = j / quads, i = (j % quads) * 4;
        bf16* dst = is_q ? q_out + (size_t)t * Hd + head * d : k_pool + pool_offset(slot, head, Hkv, d);
        rotate_store4(scale4(lo[k], r, w0[k]), scale4(hi[k], r, w1[k]), pos, f[k], dst, i, half);
    }
    if (is_q) return;
#pragma unroll
    for (int k = 0; k < 2 * ROPE_ITEMS; k++) {
        const int j = (threadIdx.x + k * ROPE_THREADS) * 4;
        if (j < Hkvd) store_bf16x4(v_pool + pool_offset(slot, j / d, Hkv, d) + j % d, v[k]);
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
        rotate_store4(x0, x1, pos, *reinterpret_cast<const float4*>(inv_freq + i), dst, i, half);
    }
    if (!is_q) {
        const float* v = row + Hd + Hkvd + head * d;
        bf16* vdst = v_pool + pool_offset(slot, head, Hkv, d);
        for (int i = threadIdx.x * 4; i < d; i += blockDim.x * 4)
            store_bf16x4(vdst + i, sum_parts4(v, parts, part_stride, i));
    }
}
