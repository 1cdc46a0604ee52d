// Hopper-only prefill attention (sm_90a: wgmma), which Kernels.paged_prefill launches on sm_90 GPUs for d = 64 and
// 128 (ATTENTION_HOPPER, on by default); the same semantics as attention.cu's paged_prefill: causal attention of the
// rows of each prefill chunk over their cached prefix and themselves through the block tables, GQA (query head j
// reads kv head j / (H/Hkv)), optional sliding window w > 0 (a query at position p sees keys max(0, p − w + 1) … p),
// softmax in f32 with exp2 (scores scaled by log2(e)/√d), P rounded to bf16 for P·V.
//
// One CTA of 256 threads (2 warpgroups) per (pair of 64-row tiles of prefill_tiles, query head): warpgroup w owns
// tile 2·blockIdx.x + w, as 64 rows of a wgmma m64 tile. Consecutive tiles of one sequence (prefill_tiles lists them
// adjacently) share one stream of K/V tiles: the union of the two key ranges, each warpgroup skipping the key tiles
// that none of its rows sees. Tiles of two sequences (or a lone last tile) run one after the other, the idle
// warpgroup only copying.
//   S = Q·Kᵀ:  wgmma m64n128k16, Q [64 × d] and K [128 keys × d] both K-major in shared memory (descriptors);
//   P·V:       wgmma m64n{d}k16 with P from registers (the S accumulator layout is the A fragment layout, rounded to
//              bf16) and V [128 keys × d] from shared memory as an N-major ("transposed") B operand;
//   softmax:   online, in registers; the causal / window mask only on the tiles that cross a row's edge.
// Intra-warpgroup overlap (FlashAttention-3's): in step t a warpgroup issues S(t) and then P(t−1)·V(t−1), does the
// softmax of S(t) while the tensor cores run P(t−1)·V(t−1), then waits, rescales O and packs P(t) for step t + 1.
// K/V tiles of 128 keys (8 blocks of 16 through the block table, one per warp) go through 3-stage cp.async rings:
// K two tiles ahead (K(t + 2) into K(t − 1)'s stage at the top of step t), V one tile ahead (V(t + 1) into V(t − 2)'s:
// V(t − 1) is read by the P·V that step t issues); one barrier per step, after the wait for K(t) and V(t − 1).
// Shared memory: Q [2 warpgroups][d/64][64 rows][128 B], then 3 × (K, V) [d/64][128 keys][128 B]; every 8-row block
// of 128-byte rows 1024-byte aligned, the 16-byte chunk c of row r at c ^ (r mod 8) (the 128-byte swizzle the
// descriptors name), so the copies and the tensor cores are free of bank conflicts. d = 128: 225 KB, one CTA per SM.
// Not done (FA3 has them): a producer warp with TMA and mbarriers in place of the copies by every thread and the
// per-step barrier (on an H200 the copies inside the loop cost 17 % at 7B × 2048 tokens, measured by leaving them
// out), ping-pong ordering of the two warpgroups' softmax against each other's wgmma, and packing the query heads of
// a GQA group into M (OLMo-2 1B and 7B have H = Hkv).
// Built for compute_90a only (runtime/cuda/build.py ARCH_FILES); for other targets the entries are empty (the same
// entry points in every build, tests/test_kernel_mirror.py) and the host never launches them there. The CPU emulator
// runs them with its model of wgmma (tests/cuda_emulator/emu.h: m64nNk16 from descriptors, A from registers,
// N-major B).
#include "common.cuh"

constexpr int FA90_BQ = 128;      // query rows per CTA: two 64-row tiles (kernels.py FA_QUERIES), one per warpgroup
constexpr int FA90_BKV = 128;     // keys per step
constexpr int FA90_STAGES = 3;    // K/V ring stages
constexpr int FA90_THREADS = 256;

template <int D>
struct Fa90Layout {
    static constexpr int Q_BYTES = FA90_BQ / 2 * D * 2;    // one warpgroup's Q tile (64 rows)
    static constexpr int PLANE_BYTES = FA90_BKV * D * 2;   // one K (or V) tile
    static constexpr int HALF_BYTES = FA90_BKV * 128;      // one 64-column half of a K/V tile
    static constexpr int STAGE_BYTES = 2 * PLANE_BYTES;    // K then V
    static constexpr int SMEM = 2 * Q_BYTES + FA90_STAGES * STAGE_BYTES + 1024;  // + slack to align to 1 KB
    static_assert(D % 64 == 0 && SMEM <= 227 * 1024, "64-column swizzle atoms, sm_90's shared memory");
};

#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(OS_EMULATE_SM90)
#define OS_FA90 1

constexpr float FA90_LOG2E = 1.4426950408889634f;

#if !defined(OS_EMULATE_SM90)
// The register-A wgmma forms used here (the emulator has its own, emu.h; S (+)= Q·Kᵀ is common.cuh's
// wgmma_ss_m64n128k16). O += P·V: D[64 × N] f32, A = P from four bf16x2 registers, B N-major (imm-trans-b = 1).
OS_DEVICE void wgmma_rs_m64n128k16_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{" WGMMA_D64 "}, "
        "{%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
        : WGMMA_D64_OPERANDS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

OS_DEVICE void wgmma_rs_m64n64k16_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
        : WGMMA_D32(d, 0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
#endif

// O += P·V for one k16 slice of keys, N = d.
template <int D>
OS_DEVICE void wgmma_pv(float (&o)[D / 2], const uint32_t (&p)[4], uint64_t desc_v) {
    if constexpr (D == 128) wgmma_rs_m64n128k16_tb(o, p, desc_v);
    else wgmma_rs_m64n64k16_tb(o, p, desc_v);
}

// Matrix descriptor of a bf16 operand at shared address `addr` in 128-byte-swizzled 8-row blocks of 1024 bytes:
// start address, leading byte offset `lbo` (K-major: unused, 1; N-major: the next 64 columns of N), stride byte offset
// 1024 (the next 8 rows: of M/N when K-major, of K when N-major), 128-byte swizzle mode.
OS_DEVICE uint64_t fa90_desc(uint32_t addr, uint32_t lbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

// A K/V tile (keys kv0 … kv0 + 127, kv0 % 16 == 0) is 8 cache blocks: warp w of the CTA copies block w, so each
// thread needs one block-table entry per tile (read a tile ahead, off the copies' critical path). The entry of this
// warp's block of the tile at kv0; 0 (never read) past the keys.
OS_DEVICE int fa90_block(const int* __restrict__ table, int kv0, int n_keys) {
    const int key0 = kv0 + KV_BLOCK * (threadIdx.x >> 5);
    return key0 < n_keys ? __ldg(table + (key0 >> KV_BLOCK_SHIFT)) : 0;
}

// This warp's block (physical id `block`, the tile's keys from kv0) of one plane into `dst` ([d/64][128 keys][128 B],
// swizzled); keys ≥ n_keys are zeros (0·NaN would poison o).
template <int D>
OS_DEVICE void fa90_load_kv(uint32_t dst, const bf16* __restrict__ pool, int block, int kvh, int Hkv, int kv0,
                            int n_keys) {
    constexpr int CPR = D / 8, STEP = 32 / CPR;  // 16-byte chunks per key; rows of the block per pass of the warp
    const int lane = threadIdx.x & 31, b = threadIdx.x >> 5, c = lane % CPR, half = c >> 3, cc = c & 7;
    const int key0 = kv0 + KV_BLOCK * b;
    const bf16* base = pool + kv_offset(block, kvh, Hkv, 0, D) + c * 8;
#pragma unroll
    for (int i = 0; i < KV_BLOCK / STEP; i++) {
        const int r = lane / CPR + STEP * i, row = KV_BLOCK * b + r;
        const bool ok = key0 + r < n_keys;
        cp_async16_s(dst + half * Fa90Layout<D>::HALF_BYTES + row * 128 + ((cc ^ (row & 7)) << 4),
                     ok ? base + r * D : pool, ok ? 16 : 0);
    }
}

// One warpgroup's 64 query rows r_begin … (rows ≥ r_end are zeros) of head h into `dst` ([d/64][64][128 B]).
template <int D>
OS_DEVICE void fa90_load_q(uint32_t dst, const bf16* __restrict__ q, int r_begin, int r_end, int h, int H) {
    constexpr int CPR = D / 8, ROWS_PER_PASS = 128 / CPR;
    const int t = threadIdx.x & 127, c = t % CPR, half = c >> 3, cc = c & 7;
#pragma unroll
    for (int i = 0; i < 64 / ROWS_PER_PASS; i++) {
        const int row = t / CPR + i * ROWS_PER_PASS, r = r_begin + row;
        const bool ok = r < r_end;
        cp_async16_s(dst + half * 64 * 128 + row * 128 + ((cc ^ (row & 7)) << 4),
                     ok ? q + ((size_t)r * H + h) * D + c * 8 : q, ok ? 16 : 0);
    }
}

// A 64-row tile of one sequence: its rows r_begin … r_end − 1 are at positions pos_begin …; it sees keys
// lo … hi (lo: the window's start for its first row, hi: its last row's position); seq < 0: no tile.
struct Fa90Tile {
    int seq, r_begin, r_end, pos_begin, lo, hi;
};

OS_DEVICE Fa90Tile fa90_tile(int i, int n_tiles, const int* tile_seq, const int* tile_first_row, const int* first_row,
                             const int* rows, const int* context_len, int window) {
    Fa90Tile t{-1, 0, 0, 0, 0, -1};
    if (i >= n_tiles) return t;
    t.seq = tile_seq[i];
    t.r_begin = tile_first_row[i];
    const int fr = first_row[t.seq], n_rows = rows[t.seq];
    t.r_end = min(t.r_begin + 64, fr + n_rows);
    t.pos_begin = context_len[t.seq] - n_rows + (t.r_begin - fr);
    t.hi = t.pos_begin + (t.r_end - t.r_begin) - 1;
    t.lo = window > 0 ? max(0, t.pos_begin - window + 1) : 0;
    return t;
}

// 2^x by the multi-function unit alone (ex2.approx.ftz: relative error 2^-22, results below 2^-126 flushed to 0,
// which P rounded to bf16 and its f32 row sums do not miss); exp2f elsewhere, as on the emulator.
#if defined(OS_EMULATE_SM90)
OS_DEVICE float fa90_exp2(float x) { return exp2f(x); }
#else
OS_DEVICE float fa90_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

// Grid: (ceil(n_tiles / 2), H); block: 256 threads; dynamic shared memory Fa90Layout<D>::SMEM. Arguments as
// attention.cu's paged_prefill (tiles from prefill_tiles, 64 rows each) plus n_tiles.
template <int D>
OS_DEVICE void paged_prefill90_body(const bf16* __restrict__ q, const bf16* __restrict__ k_pool,
                                    const bf16* __restrict__ v_pool, bf16* __restrict__ out,
                                    const int* __restrict__ tile_seq, const int* __restrict__ tile_first_row,
                                    const int* __restrict__ first_row, const int* __restrict__ rows,
                                    const int* __restrict__ context_len, const int* __restrict__ block_tables,
                                    int table_width, int H, int Hkv, int window, int n_tiles) {
    using L = Fa90Layout<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t smem0 = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t ring = smem0 + 2 * L::Q_BYTES;
    // The warpgroup index through a shuffle: ptxas then knows it (and every branch on it) is warp-uniform, and does
    // not serialise the wgmma behind the branches that skip a warpgroup's tiles.
    const int wg = __shfl_sync(0xffffffffu, (int)threadIdx.x >> 7, 0);
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const float scale = rsqrtf((float)D) * FA90_LOG2E;

    const Fa90Tile t0 = fa90_tile(2 * blockIdx.x, n_tiles, tile_seq, tile_first_row, first_row, rows, context_len, window);
    const Fa90Tile t1 = fa90_tile(2 * blockIdx.x + 1, n_tiles, tile_seq, tile_first_row, first_row, rows, context_len,
                                  window);
    const bool shared_kv = t1.seq == t0.seq;  // one K/V stream for both warpgroups
    const int passes = t1.seq < 0 || shared_kv ? 1 : 2;
    const Fa90Tile mine = wg == 0 ? t0 : t1;
    const uint32_t q_smem = smem0 + wg * L::Q_BYTES;

    // This thread's two rows (16·warp + g and + 8 of the warpgroup's 64): positions, or −1 past the tile's end.
    const int row0 = mine.r_begin + 16 * warp + g, row1 = row0 + 8;
    const int qpos0 = row0 < mine.r_end ? mine.pos_begin + 16 * warp + g : -1;
    const int qpos1 = row1 < mine.r_end ? qpos0 + 8 : -1;
    const int lo0 = window > 0 ? qpos0 - window + 1 : 0, lo1 = window > 0 ? qpos1 - window + 1 : 0;

    for (int pass = 0; pass < passes; pass++) {
        // The warpgroups of this pass, its sequence and its keys: kv_begin … n_keys − 1 in steps of 128.
        const bool active = mine.seq >= 0 && (wg == 0 ? pass == 0 : (shared_kv ? pass == 0 : pass == 1));
        const Fa90Tile lead = pass == 0 ? t0 : t1;
        const bool both = passes == 1 && t1.seq >= 0;
        const int k_lo = both ? min(t0.lo, t1.lo) : lead.lo;
        const int n_keys = (both ? max(t0.hi, t1.hi) : lead.hi) + 1;
        const int kv_begin = k_lo & ~(KV_BLOCK - 1);
        const int steps = (n_keys - kv_begin + FA90_BKV - 1) / FA90_BKV;
        const int* table = block_tables + (size_t)lead.seq * table_width;

        // Commit groups: {Q, K(0), V(0)}, {K(1)}, then in step t {K(t + 2), V(t + 1)}: the top of step t waits for
        // all but the newest, i.e. for K(t) and V(t − 1). b1, b2: this warp's block ids of tiles t + 1, t + 2.
        __syncthreads();  // the previous pass is done with every stage
        if (active) fa90_load_q<D>(q_smem, q, mine.r_begin, mine.r_end, h, H);
        const int b0 = fa90_block(table, kv_begin, n_keys);
        int b1 = fa90_block(table, kv_begin + FA90_BKV, n_keys), b2 = fa90_block(table, kv_begin + 2 * FA90_BKV, n_keys);
        fa90_load_kv<D>(ring, k_pool, b0, kvh, Hkv, kv_begin, n_keys);
        fa90_load_kv<D>(ring + L::PLANE_BYTES, v_pool, b0, kvh, Hkv, kv_begin, n_keys);
        cp_async_commit();
        if (steps > 1) fa90_load_kv<D>(ring + L::STAGE_BYTES, k_pool, b1, kvh, Hkv, kv_begin + FA90_BKV, n_keys);
        cp_async_commit();

        float o[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] = 0.f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows 0 and 1: running max, partial sum
        uint32_t p[FA90_BKV / 16][4];                                // P(t − 1) as A fragments, per k16 slice
        int pending = -1;                                            // the stage of P's V, −1: none

        // O += P·V(stage) over the tile's 8 k16 slices, asynchronous (committed, not waited for).
        auto issue_pv = [&](int stage) {
            const uint32_t v_smem = ring + stage * L::STAGE_BYTES + L::PLANE_BYTES;
#pragma unroll
            for (int kk = 0; kk < FA90_BKV / 16; kk++)
                wgmma_pv<D>(o, p[kk], fa90_desc(v_smem + kk * 16 * 128, L::HALF_BYTES));
        };

        for (int t = 0; t < steps; t++) {
            const int kv0 = kv_begin + t * FA90_BKV, stage = t % FA90_STAGES;
            cp_async_wait<1>();
            fence_proxy_async();
            __syncthreads();  // K(t), V(t − 1) landed for everyone; S(t − 1) and P(t − 2)·V(t − 2) retired everywhere
            if (t + 2 < steps)  // into K(t − 1)'s stage
                fa90_load_kv<D>(ring + ((t + 2) % FA90_STAGES) * L::STAGE_BYTES, k_pool, b2, kvh, Hkv,
                                kv0 + 2 * FA90_BKV, n_keys);
            if (t + 1 < steps)  // into V(t − 2)'s stage
                fa90_load_kv<D>(ring + ((t + 1) % FA90_STAGES) * L::STAGE_BYTES + L::PLANE_BYTES, v_pool, b1, kvh,
                                Hkv, kv0 + FA90_BKV, n_keys);
            cp_async_commit();
            b1 = b2;
            b2 = t + 3 < steps ? fa90_block(table, kv0 + 3 * FA90_BKV, n_keys) : 0;
            // Does any of this warpgroup's rows see a key of the tile? (uniform over the warpgroup)
            const bool sees = active && kv0 <= mine.hi && kv0 + FA90_BKV - 1 >= mine.lo;
            if (!sees) {
                if (pending >= 0) {  // past the warpgroup's last tile: finish the P·V in flight
                    wgmma_fence();
                    issue_pv(pending);
                    wgmma_commit();
                    wgmma_wait<0>();
                    pending = -1;
                }
                continue;
            }

            // S = Q·K(t)ᵀ, then P(t − 1)·V(t − 1) behind it on the tensor cores.
            float s[FA90_BKV / 2];
            const uint32_t k_smem = ring + stage * L::STAGE_BYTES;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++) {
                const uint32_t off = (ks >> 2) * 64 * 128 + (ks & 3) * 32, koff = (ks >> 2) * L::HALF_BYTES + (ks & 3) * 32;
                wgmma_ss_m64n128k16(s, fa90_desc(q_smem + off, 16), fa90_desc(k_smem + koff, 16), ks > 0);
            }
            wgmma_commit();
            if (pending >= 0) issue_pv(pending);
            wgmma_commit();
            wgmma_wait<1>();  // S landed; P·V may still run

            // Mask (only on tiles crossing an edge of some row's keys), then the new row maxima.
            if (kv0 + FA90_BKV - 1 > mine.pos_begin || (window > 0 && kv0 < mine.hi - window + 1)) {
#pragma unroll
                for (int i = 0; i < FA90_BKV / 2; i++) {
                    const int key = kv0 + 8 * (i >> 2) + 2 * c + (i & 1);
                    const bool ok = i & 2 ? key <= qpos1 && key >= lo1 : key <= qpos0 && key >= lo0;
                    if (!ok) s[i] = -INFINITY;
                }
            }
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int i = 0; i < FA90_BKV / 2; i++) {
                if (i & 2) mx1 = fmaxf(mx1, s[i]);
                else mx0 = fmaxf(mx0, s[i]);
            }
            mx0 = quad_max(mx0);
            mx1 = quad_max(mx1);
            const float base0 = safe_max(mx0) * scale, base1 = safe_max(mx1) * scale;
            const float corr0 = fa90_exp2(m0 * scale - base0), corr1 = fa90_exp2(m1 * scale - base1);
            m0 = mx0;
            m1 = mx1;
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int i = 0; i < FA90_BKV / 2; i++) {
                if (i & 2) {
                    s[i] = fa90_exp2(fmaf(s[i], scale, -base1));
                    sum1 += s[i];
                } else {
                    s[i] = fa90_exp2(fmaf(s[i], scale, -base0));
                    sum0 += s[i];
                }
            }
            l0 = l0 * corr0 + sum0;
            l1 = l1 * corr1 + sum1;

            wgmma_wait<0>();  // P(t − 1)·V(t − 1) retired: O and the P registers are free
#pragma unroll
            for (int i = 0; i < D / 2; i++) o[i] *= i & 2 ? corr1 : corr0;
#pragma unroll
            for (int kk = 0; kk < FA90_BKV / 16; kk++)
#pragma unroll
                for (int r = 0; r < 4; r++) p[kk][r] = pack_bf16x2(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
            pending = stage;
        }
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // the last V landed for everyone
        if (pending >= 0) {
            wgmma_fence();
            issue_pv(pending);
            wgmma_commit();
            wgmma_wait<0>();
        }
        if (!active) continue;

        // Normalise and write this warpgroup's rows (a real row always sees itself: l > 0).
        l0 = quad_sum(l0);
        l1 = quad_sum(l1);
        const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            const int col = h * D + 8 * j + 2 * c;
            if (qpos0 >= 0)
                *reinterpret_cast<uint32_t*>(out + (size_t)row0 * H * D + col) =
                    pack_bf16x2(o[4 * j] * inv0, o[4 * j + 1] * inv0);
            if (qpos1 >= 0)
                *reinterpret_cast<uint32_t*>(out + (size_t)row1 * H * D + col) =
                    pack_bf16x2(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
        }
    }
}
#endif

#ifndef OS_FA90
template <int D>  // other targets: the entries exist, empty (never launched there)
OS_DEVICE void paged_prefill90_body(const bf16*, const bf16*, const bf16*, bf16*, const int*, const int*, const int*,
                                    const int*, const int*, const int*, int, int, int, int, int) {}
#endif

// One entry point per head size: d = 64, 128.
#define PAGED_PREFILL90(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(FA90_THREADS, 1) paged_prefill90_d##D(                           \
        const bf16* q, const bf16* k_pool, const bf16* v_pool, bf16* out, const int* tile_seq,                    \
        const int* tile_first_row, const int* first_row, const int* rows, const int* context_len,                 \
        const int* block_tables, int table_width, int H, int Hkv, int window, int n_tiles) {                      \
        grid_dependency_sync();                                                                                   \
        paged_prefill90_body<D>(q, k_pool, v_pool, out, tile_seq, tile_first_row, first_row, rows, context_len,   \
                                block_tables, table_width, H, Hkv, window, n_tiles);                              \
    }
PAGED_PREFILL90(64)
PAGED_PREFILL90(128)
