// Causal self-attention over the paged KV cache, softmax(q·kᵀ/√d)·v in f32 with exp2 (scores pre-scaled by
// log2(e)/√d), GQA: query head j reads kv head j / (H/Hkv). Optional sliding window w > 0: a query at position p
// sees keys max(0, p − w + 1) … p.
//   paged_prefill: FlashAttention-style, 64 queries × 64 keys (4 blocks of 16 through the block table) per step on
//                  the tensor cores, online softmax; one CTA per (64-row tile of a prefill sequence, query head).
//   paged_decode:  flash-decoding over the block tables, one CTA per (decode sequence, kv head, split): the group's
//                  query heads are the rows of one m16 mma tile, so every K/V byte is read once for all of them;
//                  each warp streams its own blocks through a cp.async ring; splits are merged by the last CTA.
// KV pool planes: [num_blocks, Hkv, 16, d] bf16; block_tables [B, table_width] int32 (entries past a sequence's
// blocks are never read). The cache already holds this step's keys and values (qk_norm_rope_append runs first).
#include "common.cuh"

constexpr float LOG2E = 1.4426950408889634f;
constexpr int KV_PAD = 8;  // smem pitch d + 8 bf16: 16 extra bytes per row keep ldmatrix conflict-free

// ── prefill ───────────────────────────────────────────────────────────────────────────────────────
constexpr int FA_BQ = 64, FA_BKV = 64, FA_THREADS = 128;

// One 64-key tile (keys kv0 … kv0 + 63, kv0 % 16 == 0) of one plane into smem [64][LD]: 4 blocks through the block
// table; keys ≥ n_keys are zeros (their table entries may be garbage, and 0·NaN would poison v).
template <int D>
OS_DEVICE void load_kv_tile(bf16* dst, const bf16* __restrict__ pool, const int* __restrict__ table, int kvh, int Hkv,
                            int kv0, int n_keys) {
    constexpr int LD = D + KV_PAD, CPR = D / 8;
    for (int chunk = threadIdx.x; chunk < FA_BKV * CPR; chunk += FA_THREADS) {
        const int row = chunk / CPR, col = (chunk % CPR) * 8;
        const int key = kv0 + row;
        const bool ok = key < n_keys;
        const bf16* src = pool;
        if (ok) src = pool + kv_offset(__ldg(table + (key >> KV_BLOCK_SHIFT)), kvh, Hkv, key & (KV_BLOCK - 1), D) + col;
        cp_async16(dst + row * LD + col, src, ok ? 16 : 0);
    }
}

// Grid: (n_tiles, H); block: 128 threads, warp w owns query rows [16w, 16w + 16) of the tile.
// Tile i is 64 query rows starting at global row tile_first_row[i] of sequence s = tile_seq[i] (rows past the
// sequence's end are skipped). Row r of sequence s is at position context_len[s] − rows[s] + (r − first_row[s]) and
// attends the visible keys of its cached prefix and of this step, causally (and within the window).
// q [T, H, d] bf16 (normed, rotated); out [T, H·d] bf16 (the o_proj input); per-sequence first_row, rows,
// context_len [B] int32; block_tables [B, table_width] int32.
template <int D>
OS_DEVICE void paged_prefill_body(const bf16* __restrict__ q, const bf16* __restrict__ k_pool,
                                  const bf16* __restrict__ v_pool, bf16* __restrict__ out,
                                  const int* __restrict__ tile_seq, const int* __restrict__ tile_first_row,
                                  const int* __restrict__ first_row, const int* __restrict__ rows,
                                  const int* __restrict__ context_len, const int* __restrict__ block_tables,
                                  int table_width, int H, int Hkv, int window) {
    constexpr int LD = D + KV_PAD;
    __shared__ __align__(16) bf16 Ks[FA_BKV * LD];
    __shared__ __align__(16) bf16 Vs[FA_BKV * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int s = tile_seq[blockIdx.x], r_begin = tile_first_row[blockIdx.x];
    const int fr = first_row[s], n_rows = rows[s];
    const int r_end = min(r_begin + FA_BQ, fr + n_rows);        // exclusive
    const int pos_begin = context_len[s] - n_rows + (r_begin - fr);  // position of the tile's first row
    const int n_keys = pos_begin + (r_end - r_begin);              // keys the tile's last row can see: 0 … n_keys − 1
    const int k_lo = window > 0 ? max(0, pos_begin - window + 1) : 0;  // the first key any row of the tile sees
    const int* table = block_tables + (size_t)s * table_width;
    const float scale = rsqrtf((float)D) * LOG2E;

    // This warp's 16 query rows as mma A fragments, straight from global memory; rows past the tile see no key.
    uint32_t qf[D / 16][4];
    const int qr0 = r_begin + warp * 16 + g, qr1 = qr0 + 8;
    const bool ok0 = qr0 < r_end, ok1 = qr1 < r_end;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        const int col = ks * 16 + 2 * c;
        const uint32_t* p0 = reinterpret_cast<const uint32_t*>(q + ((size_t)qr0 * H + h) * D + col);
        const uint32_t* p1 = reinterpret_cast<const uint32_t*>(q + ((size_t)qr1 * H + h) * D + col);
        qf[ks][0] = ok0 ? p0[0] : 0u;
        qf[ks][1] = ok1 ? p1[0] : 0u;
        qf[ks][2] = ok0 ? p0[4] : 0u;
        qf[ks][3] = ok1 ? p1[4] : 0u;
    }
    const int qpos0 = ok0 ? pos_begin + warp * 16 + g : -1, qpos1 = ok1 ? qpos0 + 8 : -1;
    const int lo0 = window > 0 ? qpos0 - window + 1 : 0, lo1 = window > 0 ? qpos1 - window + 1 : 0;

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g+8: running max and (partial) sum

    // K and V ping-pong through two commit groups: K(t+1) loads during softmax and P·V of tile t, V(t+1) during
    // Q·Kᵀ of tile t+1. Every wait leaves exactly the other plane's newest group in flight.
    const int kv_begin = k_lo & ~(KV_BLOCK - 1);
    load_kv_tile<D>(Ks, k_pool, table, kvh, Hkv, kv_begin, n_keys);
    cp_async_commit();
    load_kv_tile<D>(Vs, v_pool, table, kvh, Hkv, kv_begin, n_keys);
    cp_async_commit();

    for (int kv0 = kv_begin; kv0 < n_keys; kv0 += FA_BKV) {
        const bool more = kv0 + FA_BKV < n_keys;
        cp_async_wait<1>();
        __syncthreads();  // K(t) landed for every thread

        // S = Q·Kᵀ: 16 × 64 per warp, eight n8 tiles.
        float sc[FA_BKV / 8][4];
#pragma unroll
        for (int i = 0; i < FA_BKV / 8; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
            for (int np = 0; np < FA_BKV / 16; np++) {
                uint32_t r[4];
                ldmatrix_x4(r, Ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
                mma_bf16_16816(sc[2 * np], qf[ks], r[0], r[1]);
                mma_bf16_16816(sc[2 * np + 1], qf[ks], r[2], r[3]);
            }
        }
        __syncthreads();  // everyone is done with Ks
        if (more) load_kv_tile<D>(Ks, k_pool, table, kvh, Hkv, kv0 + FA_BKV, n_keys);
        cp_async_commit();

        // Causal (and window) mask, then the online softmax update of each row's max and sum.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int ni = 0; ni < FA_BKV / 8; ni++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = kv0 + ni * 8 + 2 * c + e;
                sc[ni][e] = key <= qpos0 && key >= lo0 ? sc[ni][e] * scale : -INFINITY;
                sc[ni][2 + e] = key <= qpos1 && key >= lo1 ? sc[ni][2 + e] * scale : -INFINITY;
                mx0 = fmaxf(mx0, sc[ni][e]);
                mx1 = fmaxf(mx1, sc[ni][2 + e]);
            }
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        // A window can mask a row's whole first tiles: rescale against 0 then, so no −inf − −inf appears.
        const float base0 = safe_max(mx0), base1 = safe_max(mx1);
        const float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
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
            const float p0 = exp2f(sc[ni][0] - base0), p1 = exp2f(sc[ni][1] - base0);
            const float p2 = exp2f(sc[ni][2] - base1), p3 = exp2f(sc[ni][3] - base1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pf[ni / 2][(ni & 1) * 2 + 0] = pack_bf16x2(p0, p1);
            pf[ni / 2][(ni & 1) * 2 + 1] = pack_bf16x2(p2, p3);
        }

        cp_async_wait<1>();
        __syncthreads();  // V(t) landed for every thread
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
        __syncthreads();  // everyone is done with Vs
        if (more) load_kv_tile<D>(Vs, v_pool, table, kvh, Hkv, kv0 + FA_BKV, n_keys);
        cp_async_commit();
    }
    cp_async_wait<0>();

    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;  // a real row always sees itself: l > 0
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        const int col = h * D + i * 8 + 2 * c;
        if (ok0)
            *reinterpret_cast<uint32_t*>(out + (size_t)qr0 * H * D + col) = pack_bf16x2(o[i][0] * inv0, o[i][1] * inv0);
        if (ok1)
            *reinterpret_cast<uint32_t*>(out + (size_t)qr1 * H * D + col) = pack_bf16x2(o[i][2] * inv1, o[i][3] * inv1);
    }
}

// One entry point per head size: d = 16, 32, 64, 128.
#define PAGED_PREFILL(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) paged_prefill_d##D(                               \
        const bf16* q, const bf16* k_pool, const bf16* v_pool, bf16* out, const int* tile_seq,                 \
        const int* tile_first_row, const int* first_row, const int* rows, const int* context_len,              \
        const int* block_tables, int table_width, int H, int Hkv, int window) {                                \
        grid_dependency_sync();                                                                                \
        paged_prefill_body<D>(q, k_pool, v_pool, out, tile_seq, tile_first_row, first_row, rows, context_len,  \
                              block_tables, table_width, H, Hkv, window);                                      \
    }
PAGED_PREFILL(16)
PAGED_PREFILL(32)
PAGED_PREFILL(64)
PAGED_PREFILL(128)

// ── decode (flash-decoding over block tables) ──────────────────────────────────────────────────────
constexpr int DEC_THREADS = 128;
constexpr int DEC_WARPS = 4;
constexpr int DEC_STAGES = 3;  // blocks in each warp's cp.async ring (two in flight while one is used)

// One KV block (16 keys) of one plane into smem [16][D + 8]; keys outside [lo, hi] are zeros (never stale data).
template <int D>
OS_DEVICE void load_kv_block(bf16* dst, const bf16* __restrict__ pool, int block, int kvh, int Hkv, int key0, int lo,
                             int hi, int lane) {
    constexpr int LD = D + KV_PAD, CPR = D / 8;
    const bf16* base = pool + kv_offset(block, kvh, Hkv, 0, D);
#pragma unroll
    for (int chunk = lane; chunk < KV_BLOCK * CPR; chunk += 32) {
        const int row = chunk / CPR, col = (chunk % CPR) * 8;
        const int key = key0 + row;
        const bool ok = key >= lo && key <= hi;
        cp_async16(dst + row * LD + col, ok ? base + row * D + col : base, ok ? 16 : 0);
    }
}

// Grid: (B, Hkv, splits); block: 128 threads (4 warps); dynamic shared memory DEC_WARPS·DEC_STAGES·2·16·(d + KV_PAD)·2 bytes.
// CTA (b, kvh, z): the query heads kvh·group … kvh·group + group − 1 (group = H/Hkv ≤ G) of decode sequence b, whose
// one query is row b of q at position context_len[b] − 1, over the z-th of `splits` equal contiguous ranges of its
// visible blocks (chunk = ceil(visible blocks / splits); CTAs past the used ranges exit at once). Warp w takes the
// CTA's blocks w, w + 4, …; the warps' (max, sum, o) states are merged through shared memory.
//   splits = 1: out [T, H·d] bf16, rows 0 … B−1, written directly.
//   splits > 1: the CTA's partial (o unnormalised, max, sum) goes to part_o [B, H, splits, d] / part_ml [B, H, splits,
//               2] f32; the last CTA of (b, kvh) to finish (ticket counters[b·Hkv + kvh], zero before, reset to zero
//               after) merges the group's partials into out.
// A sequence with context_len ≤ 0 (padding) gets zero rows. q [T, H, d] bf16; context_len [B], block_tables
// [B, table_width] int32.
template <int D, int G>
OS_DEVICE void paged_decode_body(const bf16* __restrict__ q, const bf16* __restrict__ k_pool,
                                 const bf16* __restrict__ v_pool, bf16* __restrict__ out, float* __restrict__ part_o,
                                 float* __restrict__ part_ml, int* __restrict__ counters,
                                 const int* __restrict__ context_len, const int* __restrict__ block_tables,
                                 int table_width, int H, int Hkv, int splits, int window) {
    static_assert(G >= 1 && G <= 8, "the group's heads are rows 0 … 7 of an m16 tile (rows 8 … 15 stay zero)");
    constexpr int LD = D + KV_PAD;
    constexpr int PLANE = KV_BLOCK * LD;      // one block of one plane in smem, elements
    constexpr int STAGE = 2 * PLANE;          // K then V
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* smem = reinterpret_cast<bf16*>(smem_raw);
    __shared__ bool last;

    const int b = blockIdx.x, kvh = blockIdx.y, z = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int group = H / Hkv;
    const int pos = context_len[b] - 1;  // the query's position: keys lo … pos are visible
    const size_t out_row = (size_t)b * H * D + (size_t)kvh * group * D;
    if (pos < 0) {  // a padding sequence: no keys
        if (z == 0)
            for (int i = threadIdx.x; i < group * D; i += DEC_THREADS) out[out_row + i] = __float2bfloat16(0.f);
        return;
    }
    const int lo = window > 0 ? max(0, pos - window + 1) : 0;
    const int blk_lo = lo >> KV_BLOCK_SHIFT, n_blocks = (pos >> KV_BLOCK_SHIFT) - blk_lo + 1;
    const int chunk = (n_blocks + splits - 1) / splits;
    const int used = (n_blocks + chunk - 1) / chunk;  // splits that have blocks
    if (z >= used) return;
    const int begin = blk_lo + z * chunk;
    const int count = min(chunk, n_blocks - z * chunk);  // this CTA's blocks: begin … begin + count − 1
    const int* table = block_tables + (size_t)b * table_width;
    const float scale = rsqrtf((float)D) * LOG2E;

    // The group's queries as A fragments: row g = head kvh·group + g (zeros for g ≥ group); rows g + 8 are zero.
    uint32_t qf[D / 16][4];
    const bool head_ok = g < group && g < G;
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(q + ((size_t)b * H + kvh * group + g) * D);
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        qf[ks][0] = head_ok ? qrow[ks * 8 + c] : 0u;
        qf[ks][2] = head_ok ? qrow[ks * 8 + c + 4] : 0u;
        qf[ks][1] = qf[ks][3] = 0u;
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m = -INFINITY, l = 0.f;  // row g's running max and (this lane's partial) sum

    bf16* ring = smem + warp * DEC_STAGES * STAGE;
    const int mine = count > warp ? (count - warp + DEC_WARPS - 1) / DEC_WARPS : 0;  // this warp's blocks
    auto issue = [&](int i) {
        const int logical = begin + warp + i * DEC_WARPS;
        const int block = __ldg(table + logical);
        bf16* st = ring + (i % DEC_STAGES) * STAGE;
        load_kv_block<D>(st, k_pool, block, kvh, Hkv, logical * KV_BLOCK, lo, pos, lane);
        load_kv_block<D>(st + PLANE, v_pool, block, kvh, Hkv, logical * KV_BLOCK, lo, pos, lane);
    };
#pragma unroll
    for (int i = 0; i < DEC_STAGES - 1; i++) {
        if (i < mine) issue(i);
        cp_async_commit();
    }
    for (int i = 0; i < mine; i++) {
        cp_async_wait<DEC_STAGES - 2>();
        __syncwarp();  // block i landed for every lane, and every lane is done with the stage refilled next
        if (i + DEC_STAGES - 1 < mine) issue(i + DEC_STAGES - 1);
        cp_async_commit();

        const bf16* Ks = ring + (i % DEC_STAGES) * STAGE;
        const bf16* Vs = Ks + PLANE;
        const int key0 = (begin + warp + i * DEC_WARPS) * KV_BLOCK;
        float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // S: heads × 16 keys, two n8 tiles
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            uint32_t r[4];
            ldmatrix_x4(r, Ks + ((lane & 7) + ((lane >> 4) << 3)) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
            mma_bf16_16816(sc[0], qf[ks], r[0], r[1]);
            mma_bf16_16816(sc[1], qf[ks], r[2], r[3]);
        }
        float mx = m;
#pragma unroll
        for (int ni = 0; ni < 2; ni++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = key0 + ni * 8 + 2 * c + e;
                sc[ni][e] = key >= lo && key <= pos ? sc[ni][e] * scale : -INFINITY;
                mx = fmaxf(mx, sc[ni][e]);
            }
        }
        mx = quad_max(mx);
        const float base = safe_max(mx), corr = exp2f(m - base);
        m = mx;
        l *= corr;
#pragma unroll
        for (int i2 = 0; i2 < D / 8; i2++) {
            o[i2][0] *= corr;
            o[i2][1] *= corr;
        }
        const float p0 = exp2f(sc[0][0] - base), p1 = exp2f(sc[0][1] - base);
        const float p2 = exp2f(sc[1][0] - base), p3 = exp2f(sc[1][1] - base);
        l += (p0 + p1) + (p2 + p3);
        const uint32_t pf[4] = {pack_bf16x2(p0, p1), 0u, pack_bf16x2(p2, p3), 0u};
#pragma unroll
        for (int dp = 0; dp < D / 16; dp++) {
            uint32_t r[4];
            ldmatrix_x4_trans(r, Vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
            mma_bf16_16816(o[2 * dp], pf, r[0], r[1]);
            mma_bf16_16816(o[2 * dp + 1], pf, r[2], r[3]);
        }
    }
    cp_async_wait<0>();
    l = quad_sum(l);

    // Merge the warps: red_o [DEC_WARPS][G][D], red_ml [DEC_WARPS][G][2] f32 over the (now idle) rings.
    __syncthreads();
    float* red_o = reinterpret_cast<float*>(smem_raw);
    float* red_ml = red_o + DEC_WARPS * G * D;
    if (g < G) {
#pragma unroll
        for (int i = 0; i < D / 8; i++)
            *reinterpret_cast<float2*>(red_o + (warp * G + g) * D + i * 8 + 2 * c) = make_float2(o[i][0], o[i][1]);
        if (c == 0) {
            red_ml[(warp * G + g) * 2] = m;
            red_ml[(warp * G + g) * 2 + 1] = l;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < group * D; e += DEC_THREADS) {
        const int hg = e / D, i = e % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) M = fmaxf(M, red_ml[(w * G + hg) * 2]);  // warp 0 always has a block
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) {
            const float wt = exp2f(red_ml[(w * G + hg) * 2] - M);  // an idle warp: 2^−inf = 0
            num += wt * red_o[(w * G + hg) * D + i];
            den += wt * red_ml[(w * G + hg) * 2 + 1];
        }
        if (splits == 1) {
            out[out_row + e] = __float2bfloat16(num / den);
        } else {
            const size_t at = ((size_t)b * H + kvh * group + hg) * splits + z;
            part_o[at * D + i] = num;
            if (i == 0) {
                part_ml[at * 2] = M;
                part_ml[at * 2 + 1] = den;
            }
        }
    }
    if (splits == 1) return;

    // The last of the (b, kvh) CTAs merges (its partials are visible after the fence and the ticket).
    __threadfence();
    __syncthreads();
    int* ticket = counters + (size_t)b * Hkv + kvh;
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1) == used - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int e = threadIdx.x; e < group * D; e += DEC_THREADS) {
        const int hg = e / D, i = e % D;
        const size_t at0 = ((size_t)b * H + kvh * group + hg) * splits;
        float M = -INFINITY;
        for (int zz = 0; zz < used; zz++) M = fmaxf(M, __ldcg(part_ml + (at0 + zz) * 2));
        float num = 0.f, den = 0.f;
        for (int zz = 0; zz < used; zz++) {
            const float wt = exp2f(__ldcg(part_ml + (at0 + zz) * 2) - M);
            num += wt * __ldcg(part_o + (at0 + zz) * D + i);
            den += wt * __ldcg(part_ml + (at0 + zz) * 2 + 1);
        }
        out[out_row + e] = __float2bfloat16(num / den);
    }
    if (threadIdx.x == 0) *ticket = 0;  // ready for the next step (a replayed graph reuses it)
}

// One entry point per (head size, group size rounded up to 1, 2, 4 or 8).
#define PAGED_DECODE(D, G)                                                                                       \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) paged_decode_d##D##_g##G(                          \
        const bf16* q, const bf16* k_pool, const bf16* v_pool, bf16* out, float* part_o, float* part_ml,         \
        int* counters, const int* context_len, const int* block_tables, int table_width, int H, int Hkv,         \
        int splits, int window) {                                                                                \
        grid_dependency_sync();                                                                                  \
        paged_decode_body<D, G>(q, k_pool, v_pool, out, part_o, part_ml, counters, context_len, block_tables,    \
                                table_width, H, Hkv, splits, window);                                            \
    }
#define PAGED_DECODE_GROUPS(D) PAGED_DECODE(D, 1) PAGED_DECODE(D, 2) PAGED_DECODE(D, 4) PAGED_DECODE(D, 8)
PAGED_DECODE_GROUPS(16)
PAGED_DECODE_GROUPS(32)
PAGED_DECODE_GROUPS(64)
PAGED_DECODE_GROUPS(128)
