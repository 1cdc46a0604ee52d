// Causal self-attention over the KV cache, softmax(q·kᵀ/√d)·v in f32, GQA (query head j reads kv head j / (H/Hkv)).
//   prefill: FlashAttention-style, 64 queries × 64 keys per step on the tensor cores, online softmax.
//   decode:  flash-decoding, the context split across blocks, the partial results merged by the last block.
#include "common.cuh"

constexpr float LOG2E = 1.4426950408889634f;

// ── prefill ───────────────────────────────────────────────────────────────────────────────────────
constexpr int FA_BQ = 64, FA_BKV = 64, FA_THREADS = 128;

// Grid: (ceil(T / 64), H); block: 128 threads, warp w owns query rows [16w, 16w + 16) of the block's tile.
// q [T, H, d] bf16 for T new tokens at positions start_pos[0] … start_pos[0] + T − 1, already in the cache;
// k_cache, v_cache [Hkv, max_ctx, d] bf16; out [T, H·d] bf16 (the o_proj GEMM's input).
template <int D>
OS_DEVICE void flash_prefill_body(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                  const bf16* __restrict__ v_cache, bf16* __restrict__ out,
                                  const int* __restrict__ start_pos, int T, int H, int Hkv, int max_ctx) {
    constexpr int LD = D + 8;  // smem pitch: 16 extra bytes per row keep ldmatrix conflict-free
    __shared__ __align__(16) bf16 Ks[FA_BKV * LD];
    __shared__ __align__(16) bf16 Vs[FA_BKV * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int qtile = gridDim.x - 1 - blockIdx.x;  // longest tiles first
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int pos0 = start_pos[0];
    const int q0 = qtile * FA_BQ;
    const int n_keys = pos0 + min(T, q0 + FA_BQ);  // keys the tile's last row can see
    const bf16* kbase = k_cache + (size_t)kvh * max_ctx * D;
    const bf16* vbase = v_cache + (size_t)kvh * max_ctx * D;
    const float scale = rsqrtf((float)D) * LOG2E;  // scores in log2 units: exp2 instead of exp

    // This warp's 16 query rows as mma A fragments, straight from global memory.
    uint32_t qf[D / 16][4];
    const int qr0 = q0 + warp * 16 + g, qr1 = qr0 + 8;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        const int col = ks * 16 + 2 * c;
        const uint32_t* r0 = reinterpret_cast<const uint32_t*>(q + ((size_t)qr0 * H + h) * D + col);
        const uint32_t* r1 = reinterpret_cast<const uint32_t*>(q + ((size_t)qr1 * H + h) * D + col);
        qf[ks][0] = qr0 < T ? r0[0] : 0u;
        qf[ks][1] = qr1 < T ? r1[0] : 0u;
        qf[ks][2] = qr0 < T ? r0[4] : 0u;
        qf[ks][3] = qr1 < T ? r1[4] : 0u;
    }
    const int qpos0 = pos0 + qr0, qpos1 = pos0 + qr1;

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g+8: running max and (partial) sum

    for (int kv0 = 0; kv0 < n_keys; kv0 += FA_BKV) {
        __syncthreads();  // everyone finished with the previous tile
        for (int chunk = threadIdx.x; chunk < FA_BKV * D / 8; chunk += FA_THREADS) {
            const int row = chunk / (D / 8), col = (chunk % (D / 8)) * 8;
            const bool ok = kv0 + row < n_keys;  // beyond: zeros, never stale cache (0·NaN would poison v)
            cp_async16(Ks + row * LD + col, ok ? kbase + (size_t)(kv0 + row) * D + col : kbase, ok ? 16 : 0);
            cp_async16(Vs + row * LD + col, ok ? vbase + (size_t)(kv0 + row) * D + col : vbase, ok ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        // S = Q·Kᵀ: 16 × 64 per warp, eight n8 tiles.
        float s[FA_BKV / 8][4];
#pragma unroll
        for (int i = 0; i < FA_BKV / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
            for (int np = 0; np < FA_BKV / 16; np++) {
                uint32_t r[4];
                ldmatrix_x4(r, Ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
                mma_bf16_16816(s[2 * np], qf[ks], r[0], r[1]);
                mma_bf16_16816(s[2 * np + 1], qf[ks], r[2], r[3]);
            }
        }

        // Causal mask, then the online softmax update of each row's max and sum.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int ni = 0; ni < FA_BKV / 8; ni++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = kv0 + ni * 8 + 2 * c + e;
                s[ni][e] = key <= qpos0 ? s[ni][e] * scale : -INFINITY;
                s[ni][2 + e] = key <= qpos1 ? s[ni][2 + e] * scale : -INFINITY;
                mx0 = fmaxf(mx0, s[ni][e]);
                mx1 = fmaxf(mx1, s[ni][2 + e]);
            }
        }
        // A row's four owners (lanes 4g … 4g+3) agree on its max. Key 0 is in every row's first tile: finite.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float corr0 = exp2f(m0 - mx0), corr1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        l0 *= corr0;
        l1 *= corr1;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= corr0;
            o[i][1] *= corr0;
            o[i][2] *= corr1;
            o[i][3] *= corr1;
        }
        uint32_t pf[FA_BKV / 16][4];  // P as A fragments: the S accumulator layout is the A layout
#pragma unroll
        for (int ni = 0; ni < FA_BKV / 8; ni++) {
            const float p0 = exp2f(s[ni][0] - m0), p1 = exp2f(s[ni][1] - m0);
            const float p2 = exp2f(s[ni][2] - m1), p3 = exp2f(s[ni][3] - m1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pf[ni / 2][(ni & 1) * 2 + 0] = pack_bf16x2(p0, p1);
            pf[ni / 2][(ni & 1) * 2 + 1] = pack_bf16x2(p2, p3);
        }

        // O += P·V: V [keys, d] is k-major, so ldmatrix.trans yields the column-major B fragments.
#pragma unroll
        for (int kk = 0; kk < FA_BKV / 16; kk++) {
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, Vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
                mma_bf16_16816(o[2 * dp], pf[kk], r[0], r[1]);
                mma_bf16_16816(o[2 * dp + 1], pf[kk], r[2], r[3]);
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        const int col = h * D + i * 8 + 2 * c;
        if (qr0 < T)
            *reinterpret_cast<uint32_t*>(out + (size_t)qr0 * H * D + col) = pack_bf16x2(o[i][0] * inv0, o[i][1] * inv0);
        if (qr1 < T)
            *reinterpret_cast<uint32_t*>(out + (size_t)qr1 * H * D + col) = pack_bf16x2(o[i][2] * inv1, o[i][3] * inv1);
    }
}

// One entry point per head size: d = 16, 32, 64, 128.
#define FLASH_PREFILL(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                   \
        flash_prefill_d##D(const bf16* q, const bf16* k, const bf16* v, bf16* out, const int* start_pos, int T, \
                           int H, int Hkv, int max_ctx) {                                                       \
        flash_prefill_body<D>(q, k, v, out, start_pos, T, H, Hkv, max_ctx);                                   \
    }
FLASH_PREFILL(16)
FLASH_PREFILL(32)
FLASH_PREFILL(64)
FLASH_PREFILL(128)

// ── decode (flash-decoding) ─────────────────────────────────────────────────────────────────────
constexpr int FD_SPLIT = 128;  // context positions per block
constexpr int FD_THREADS = 128;

// Grid: (H, max_splits) with max_splits = ceil(max_ctx / 128), fixed so the launch can live in a CUDA graph;
// blocks past the current length (start_pos[0] + 1, read from device memory) exit at once.
// Block: 128 threads; each scores one position (its whole k row in flight as 16-byte loads), then groups of
// d/8 threads accumulate 8 dims of p·v each over a strided share of the positions. The block's partial result
// (unnormalised o, max, sum) goes to partial_o [H, max_splits, d] / partial_ml [H, max_splits, 2] f32; the last
// block of a head to finish (counters [H] int32, zero between steps) merges them:
// out[h·d + i] = Σ_s 2^(m_s − M)·o_s[i] / Σ_s 2^(m_s − M)·l_s, f32 [H·d] (the o_proj GEMV's input).
// q [H, d] bf16; k_cache, v_cache [Hkv, max_ctx, d] bf16.
template <int D>
OS_DEVICE void flash_decode_body(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                 const bf16* __restrict__ v_cache, float* __restrict__ partial_o,
                                 float* __restrict__ partial_ml, float* __restrict__ out, int* __restrict__ counters,
                                 const int* __restrict__ start_pos, int H, int Hkv, int max_ctx) {
    constexpr int GROUP = D / 8;                // threads per position row of v
    constexpr int GROUPS = FD_THREADS / GROUP;  // position strides in the p·v pass
    __shared__ __align__(16) float qs[D];
    __shared__ float p[FD_SPLIT];
    __shared__ float scratch[32];
    __shared__ __align__(16) float acc[GROUPS][D];
    __shared__ bool last;
    const int h = blockIdx.x, split = blockIdx.y, max_splits = gridDim.y;
    const int seq_len = start_pos[0] + 1;
    const int splits = (seq_len + FD_SPLIT - 1) / FD_SPLIT;
    if (split >= splits) return;
    const int begin = split * FD_SPLIT;
    const int n = min(FD_SPLIT, seq_len - begin);
    const int kvh = h / (H / Hkv);
    const bf16* kbase = k_cache + ((size_t)kvh * max_ctx + begin) * D;
    const bf16* vbase = v_cache + ((size_t)kvh * max_ctx + begin) * D;
    const float scale = rsqrtf((float)D) * LOG2E;

    for (int i = threadIdx.x; i < D; i += FD_THREADS) qs[i] = __bfloat162float(q[(size_t)h * D + i]);
    __syncthreads();

    float score = -INFINITY;
    if ((int)threadIdx.x < n) {
        const uint4* kr = reinterpret_cast<const uint4*>(kbase + (size_t)threadIdx.x * D);
        uint4 w[D / 8];
#pragma unroll
        for (int v = 0; v < D / 8; v++) w[v] = kr[v];  // every load in flight before the first use
        float dot = 0.f;
#pragma unroll
        for (int v = 0; v < D / 8; v++) {
            const float* x = qs + v * 8;
            dot += bf16_lo(w[v].x) * x[0] + bf16_hi(w[v].x) * x[1] + bf16_lo(w[v].y) * x[2] + bf16_hi(w[v].y) * x[3] +
                   bf16_lo(w[v].z) * x[4] + bf16_hi(w[v].z) * x[5] + bf16_lo(w[v].w) * x[6] + bf16_hi(w[v].w) * x[7];
        }
        score = dot * scale;
    }
    const float mx = block_max(score, scratch);
    const float e = (int)threadIdx.x < n ? exp2f(score - mx) : 0.f;
    p[threadIdx.x] = e;
    const float sum = block_sum(e, scratch);  // syncs, so p is visible below

    const int lane8 = threadIdx.x % GROUP, grp = threadIdx.x / GROUP;
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int j = grp; j < n; j += GROUPS) {
        const uint4 w = *reinterpret_cast<const uint4*>(vbase + (size_t)j * D + lane8 * 8);
        const float pj = p[j];
        a[0] += pj * bf16_lo(w.x);
        a[1] += pj * bf16_hi(w.x);
        a[2] += pj * bf16_lo(w.y);
        a[3] += pj * bf16_hi(w.y);
        a[4] += pj * bf16_lo(w.z);
        a[5] += pj * bf16_hi(w.z);
        a[6] += pj * bf16_lo(w.w);
        a[7] += pj * bf16_hi(w.w);
    }
#pragma unroll
    for (int i = 0; i < 8; i++) acc[grp][lane8 * 8 + i] = a[i];
    __syncthreads();
    float* mine = partial_o + ((size_t)h * max_splits + split) * D;
    for (int i = threadIdx.x; i < D; i += FD_THREADS) {
        float t = 0.f;
#pragma unroll
        for (int gi = 0; gi < GROUPS; gi++) t += acc[gi][i];
        mine[i] = t;
    }
    if (threadIdx.x == 0) {
        partial_ml[((size_t)h * max_splits + split) * 2] = mx;
        partial_ml[((size_t)h * max_splits + split) * 2 + 1] = sum;
    }

    // The last of the head's blocks merges (its partials are visible after the fence and the ticket).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[h], 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* ml = partial_ml + (size_t)h * max_splits * 2;
    float M = -INFINITY;
    for (int s = 0; s < splits; s++) M = fmaxf(M, __ldcg(ml + 2 * s));
    for (int i = threadIdx.x; i < D; i += FD_THREADS) {
        float num = 0.f, den = 0.f;
        for (int s = 0; s < splits; s++) {
            const float w = exp2f(__ldcg(ml + 2 * s) - M);
            num += w * __ldcg(partial_o + ((size_t)h * max_splits + s) * D + i);
            den += w * __ldcg(ml + 2 * s + 1);
        }
        out[(size_t)h * D + i] = num / den;
    }
    if (threadIdx.x == 0) counters[h] = 0;  // ready for the next step (a replayed graph reuses it)
}

#define FLASH_DECODE(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(FD_THREADS)                                                   \
        flash_decode_d##D(const bf16* q, const bf16* k, const bf16* v, float* po, float* pml, float* out,      \
                          int* counters, const int* start_pos, int H, int Hkv, int max_ctx) {                   \
        flash_decode_body<D>(q, k, v, po, pml, out, counters, start_pos, H, Hkv, max_ctx);                     \
    }
FLASH_DECODE(16)
FLASH_DECODE(32)
FLASH_DECODE(64)
FLASH_DECODE(128)
