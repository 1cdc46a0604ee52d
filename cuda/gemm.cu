// Projections on the tensor cores for any number of token rows M: C = A·Wᵀ with A [M, K] bf16 activations and
// W [N, K] bf16 weights, f32 accumulation through mma.sync m16n8k16 (sm_80+).
//
// One template family, 8 warps per CTA, one CTA per multiprocessor:
//   bm16/32/64:  decode batches, BM × 128 tiles, k-tiles of 128 (each stage reads 256 contiguous bytes of every one
//                of its 128 weight rows: long runs keep DRAM pages open), 4 or 3 stages: ~100 KB of weights in
//                flight per multiprocessor, so the weight stream alone sets the pace up to M ≈ 64.
//   bm128:       large decode batches and short chunks (M 65 … 256), 128 × 128 tiles, k-tiles of 64, 4 stages,
//                2 × 4 warps of 64 × 32 (a 64 KB partial tile: stream-K's cut tiles stay cheap).
//   bm256:       prefill, 256 × 128 tiles, k-tiles of 64, 3 stages, 4 × 2 warps of 64 × 64 (the largest warp tile
//                the register file holds: 8 ldmatrix feed 32 mma per k16 step).
// Shared memory holds 128-byte rows (64 bf16) with the XOR swizzle (no padding: ldmatrix and cp.async are free of
// bank conflicts); fragments are double-buffered in registers, so the ldmatrix of k16 step s + 1 is in flight while
// the mma of step s issues, and one barrier guards each k-tile.
//
// Work is scheduled stream-K (kernels.py gemm_stream_plan and gemm_stream_chunks mirror it): a persistent grid of
// `ctas` CTAs (one per multiprocessor) shares the tiles' k-iterations evenly, so no multiprocessor idles in a last,
// partial wave whatever the tile count (qkv 7B: 96 tiles of 128 columns; gate_up: 172). Whole waves stay whole:
//   - tiles [0, sk_tiles): their sk_tiles·kt k-tiles split into ctas equal, contiguous chunks, done first; a tile
//     cut by chunk boundaries is summed by the last of its CTAs to finish (a ticket in `counters`), which reads the
//     others' partial tiles from `slots` in CTA order (a fixed order: the sum does not depend on timing);
//   - tiles [sk_tiles, tiles): whole tiles, CTA b taking sk_tiles + b, sk_tiles + b + ctas, …
// Each CTA runs one continuous cp.async pipeline across all its tiles (the loads of the next tile overlap the last
// k-tiles and the epilogue of the current one). The host's grid split-K (blockIdx.y = split z, partials at
// C + z·M·N) is the same code with one whole tile per CTA and a k-range per z.
#include "common.cuh"

constexpr int GEMM_THREADS = 256;     // every variant: 8 warps
constexpr int GEMM_SMALL_BN = 128;    // bm16/32/64: weight rows (output columns) per tile
constexpr int GEMM_SMALL_BK = 128;    // bm16/32/64: k-tile (two 64-column k-blocks per stage)
constexpr int GEMM_SMALL_STAGES = 4;  // bm16, bm32
constexpr int GEMM_BM64_STAGES = 3;   // bm64
constexpr int GEMM_MID_BN = 128, GEMM_MID_BK = 64, GEMM_MID_STAGES = 4;        // bm128
constexpr int GEMM_LARGE_BN = 128, GEMM_LARGE_BK = 64, GEMM_LARGE_STAGES = 3;  // bm256

template <int BM_, int BN_, int BK_, int STAGES_, int WARPS_M_>
struct GemmConfig {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_, THREADS = GEMM_THREADS;
    static constexpr int WARPS_M = WARPS_M_, WARPS_N = THREADS / 32 / WARPS_M_;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;             // m16 × n8 mma tiles per warp
    static constexpr int KS = BK / 16;                          // k16 steps per k-tile
    static constexpr int CPR = BK / 8;                          // 16-byte chunks per row of a k-tile
    static constexpr int A_ELEMS = BM * BK, STAGE_ELEMS = (BM + BN) * BK;
    static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;  // dynamic shared memory (the host raises the limit)
    static constexpr int SLOT_FLOATS = BM * BN;                  // one partial tile in `slots`
    static_assert(WARPS_M * WARPS_N * 32 == THREADS && WM % 16 == 0 && NI % 2 == 0, "whole m16 / n16 warp tiles");
    static_assert(BK % 64 == 0 && KS % 2 == 0, "whole 128-byte k-blocks, an even number of k16 steps");
    static_assert((BM * CPR) % THREADS == 0 && (BN * CPR) % THREADS == 0, "every thread copies as many chunks");
};
using GemmBM16 = GemmConfig<16, GEMM_SMALL_BN, GEMM_SMALL_BK, GEMM_SMALL_STAGES, 1>;   // 1 × 8 warps of 16 × 16
using GemmBM32 = GemmConfig<32, GEMM_SMALL_BN, GEMM_SMALL_BK, GEMM_SMALL_STAGES, 2>;   // 2 × 4 warps of 16 × 32
using GemmBM64 = GemmConfig<64, GEMM_SMALL_BN, GEMM_SMALL_BK, GEMM_BM64_STAGES, 2>;    // 2 × 4 warps of 32 × 32
using GemmBM128 = GemmConfig<128, GEMM_MID_BN, GEMM_MID_BK, GEMM_MID_STAGES, 2>;       // 2 × 4 warps of 64 × 32
using GemmBM256 = GemmConfig<256, GEMM_LARGE_BN, GEMM_LARGE_BK, GEMM_LARGE_STAGES, 4>; // 4 × 2 warps of 64 × 64

// A k-tile of R rows × BK columns in shared memory: BK/64 k-blocks of R rows of 128 bytes each (k-block major); the
// 16-byte chunk c of row r (c = 0 … BK/8 − 1) sits at chunk (c mod 8) XOR (r mod 8) of its k-block row, so the 8
// rows one ldmatrix phase reads and the 8 chunks of a row one cp.async wavefront writes fall on distinct banks.
// Offsets are bytes from the start of the stage's A (R = BM) or W (R = BN) part.
template <int R>
OS_DEVICE uint32_t swizzled(int row, int chunk) {
    return (uint32_t)((chunk >> 3) * (R * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Per-thread constants of the copies and the fragment reads (all shared memory as 32-bit shared-window offsets).
//   copies: thread t copies the 16-byte chunk col/8 of rows row0 + i·ROW_STEP of every k-tile (consecutive threads on
//           consecutive chunks of a row: a warp reads whole 256- or 128-byte row segments); the chunk of row
//           row0 + i·ROW_STEP sits at a_off/w_off + i·ROW_STEP·128 (ROW_STEP is a multiple of 8: same swizzle).
//   fragments: the warp's ldmatrix rows for k16 step 0 of k-block 0; step s reads at (fa XOR (s mod 4)·32) +
//           (s div 4)·R·128 (the XOR moves the chunk pair 2(s mod 4), 2(s mod 4) + 1 under the row's swizzle).
template <class C>
struct GemmLanes {
    static constexpr int ROW_STEP = C::THREADS / C::CPR;
    int row0, col;
    uint32_t a_off, w_off, fa, fb;

    OS_DEVICE GemmLanes(int wm, int wn, int lane) {
        row0 = threadIdx.x / C::CPR;
        const int chunk = threadIdx.x % C::CPR;
        col = chunk * 8;
        a_off = swizzled<C::BM>(row0, chunk);
        w_off = C::A_ELEMS * 2 + swizzled<C::BN>(row0, chunk);
        // A x4: lanes 0-15 address rows 0-15 at the step's first 8 columns, lanes 16-31 the next 8 (matrices a0 a1
        // a2 a3 = rows 0-7/8-15 × k 0-7, then × k 8-15: the mma A fragment order).
        fa = swizzled<C::BM>(wm * C::WM + (lane & 15), lane >> 4);
        // W x4 (rows are n): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15): b0 b1 of
        // n8 tile 2·np, then of tile 2·np + 1.
        fb = C::A_ELEMS * 2 + swizzled<C::BN>(wn * C::WN + (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
    }
};

// Keeps x in a register as computed here: the copies' address chains are rebuilt per k-tile instead of being hoisted
// out of the main loop as a dozen live 64-bit addresses (bm128 would not fit its 255 registers otherwise).
OS_DEVICE int opaque(int x) {
    asm volatile("" : "+r"(x));
    return x;
}

// One k-tile of A (rows m0 …) and W (rows n0 …) into the stage at shared offset `stage`, by 16-byte cp.async; rows
// and columns out of range read zeros. In SILU_PAIR mode tile column j holds weight row gate[i] (j even) or up[i]
// (j odd), i = (n0 + j) / 2, so each thread's accumulator pair (c0, c1) is (gate, up) of one intermediate index.
// Element offsets are 32-bit: the launcher keeps M·K and N·K below 2^31.
template <class C, bool SILU_PAIR>
OS_DEVICE void load_tile(uint32_t stage, const GemmLanes<C>& ln, const bf16* __restrict__ A,
                         const bf16* __restrict__ W, int M, int N, int K, int m0, int n0, int k0) {
    constexpr int RS = GemmLanes<C>::ROW_STEP;
    const int k = k0 + ln.col;
    const bool k_ok = k < K;
    int rows_left = M - m0 - ln.row0, off = (m0 + ln.row0) * K + k;
#pragma unroll
    for (int i = 0; i < C::BM / RS; i++) {
        const bool ok = k_ok && i * RS < rows_left;
        cp_async16_s(stage + ln.a_off + i * RS * 128, A + (ok ? off : 0), ok ? 16 : 0);
        off = opaque(off + RS * K);
    }
    // W rows n0 + row0 + i·RS (silu: n even ↔ gate row n/2, odd ↔ up row N/2 + n/2; RS is even, so every chunk of
    // this thread is on the same side and its weight rows step by RS/2)
    const int n = n0 + ln.row0;
    const int wrow = SILU_PAIR ? ((n & 1) * (N / 2) + (n >> 1)) : n;
    rows_left = N - n;
    off = wrow * K + k;
#pragma unroll
    for (int i = 0; i < C::BN / RS; i++) {
        const bool ok = k_ok && i * RS < rows_left;
        cp_async16_s(stage + ln.w_off + i * RS * 128, W + (ok ? off : 0), ok ? 16 : 0);
        off = opaque(off + (SILU_PAIR ? RS / 2 : RS) * K);
    }
}

// One k16 step's fragments of a warp: A (MI m16 tiles) and W (NI n8 tiles) from the stage at shared offset `stage`.
template <class C>
struct Frags {
    uint32_t a[C::MI][4];
    uint32_t b[C::NI][2];
};

template <class C>
OS_DEVICE void load_frags(Frags<C>& f, uint32_t stage, const GemmLanes<C>& ln, int ks) {
    const uint32_t swz = (uint32_t)(ks & 3) << 5, kb = ks >> 2;
    const uint32_t a = stage + (ln.fa ^ swz) + kb * (C::BM * 128);
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++) ldmatrix_x4_s(f.a[mi], a + mi * 16 * 128);
    const uint32_t w = stage + (ln.fb ^ swz) + kb * (C::BN * 128);
#pragma unroll
    for (int np = 0; np < C::NI / 2; np++) {
        uint32_t r[4];
        ldmatrix_x4_s(r, w + np * 16 * 128);
        f.b[2 * np][0] = r[0];
        f.b[2 * np][1] = r[1];
        f.b[2 * np + 1][0] = r[2];
        f.b[2 * np + 1][1] = r[3];
    }
}

// Which k-tiles a CTA runs, in order: first its stream-K chunk [sk_begin, sk_end) of the iteration space of tiles
// [0, sk_tiles) (iteration g = tile·kt + k), then its whole tiles sk_tiles + b + i·ctas with k-tiles
// [kbegin, kbegin + kcount). A segment is one tile's run of consecutive k-tiles; `left` counts the k-tiles left in
// the current one (0: nothing left). Every thread of a CTA holds the same cursor.
struct GemmCursor {
    int tile, k, left;  // the current k-tile and the k-tiles left in its segment, itself included
    int seg_k0;         // the segment's first k-tile
    int sk_left;        // stream-K k-tiles after the current segment
    int next_tile;      // the next whole tile
    bool stream;        // the current segment is part of the stream-K chunk

    OS_DEVICE void next_segment(int kt, int tiles, int ctas, int kbegin, int kcount) {
        if (sk_left > 0) {
            tile += 1;
            k = seg_k0 = 0;
            left = min(kt, sk_left);
            sk_left -= left;
            stream = true;
        } else if (next_tile < tiles && kcount > 0) {
            tile = next_tile;
            next_tile += ctas;
            k = seg_k0 = kbegin;
            left = kcount;
            stream = false;
        } else {
            left = 0;
        }
    }
    OS_DEVICE void advance(int kt, int tiles, int ctas, int kbegin, int kcount) {
        if (--left > 0) {
            k++;
        } else {
            next_segment(kt, tiles, ctas, kbegin, kcount);
        }
    }
};

// Start of CTA c's stream-K chunk: floor(c·I / ctas) of I = sk_tiles·kt iterations (the launcher keeps I ≥ ctas, so
// no chunk is empty), and the CTA whose chunk holds iteration g.
OS_DEVICE long long sk_chunk_start(int c, long long iters, int ctas) { return (long long)c * iters / ctas; }
OS_DEVICE int sk_owner(long long g, long long iters, int ctas) { return (int)(((g + 1) * ctas - 1) / iters); }

// One finished fragment (mi, ni) of tile (m0, n0) (v = rows g and g + 8, columns 2c and 2c + 1 of the m16 × n8 tile):
// plain → C [M, N] f32 at split z (C + z·M·N); silu_pair → C [M, N/2] bf16. scales [N] f32 per weight row (int8
// engines: the weights were widened exactly) or null. Rows ≥ M and columns ≥ N are not written.
template <class C, bool SILU_PAIR>
OS_DEVICE void store_frag(float4 v, int mi, int ni, void* __restrict__ out, const float* __restrict__ scales, int M,
                          int N, int m0, int n0, int z, int wm, int wn, int lane) {
    const int g = lane >> 2, c = lane & 3;
    const int col = n0 + wn * C::WN + ni * 8 + 2 * c;  // even: (col, col+1) are this thread's pair
    if (col >= N) return;
    float s0 = 1.f, s1 = 1.f;
    if (scales) {
        s0 = scales[SILU_PAIR ? col / 2 : col];
        s1 = scales[SILU_PAIR ? N / 2 + col / 2 : min(col + 1, N - 1)];
    }
    float* Cf = reinterpret_cast<float*>(out) + (size_t)z * M * N;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = m0 + wm * C::WM + mi * 16 + g + half * 8;
        if (row >= M) continue;
        const float v0 = (half ? v.z : v.x) * s0, v1 = (half ? v.w : v.y) * s1;
        if (SILU_PAIR) {
            reinterpret_cast<bf16*>(out)[(size_t)row * (N / 2) + col / 2] = __float2bfloat16(silu(v0) * v1);
        } else if ((N & 1) == 0) {  // even N: (z·M·N + row·N + col) is even, so the pair is 8-byte aligned
            *reinterpret_cast<float2*>(Cf + (size_t)row * N + col) = make_float2(v0, v1);
        } else {  // odd N (a vocabulary): scalar stores
            float* o = Cf + (size_t)row * N + col;
            o[0] = v0;
            if (col + 1 < N) o[1] = v1;
        }
    }
}

template <class C, bool SILU_PAIR>
OS_DEVICE void store_tile(const float (&acc)[C::MI][C::NI][4], void* __restrict__ out,
                          const float* __restrict__ scales, int M, int N, int m0, int n0, int z, int wm, int wn,
                          int lane) {
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < C::NI; ni++)
            store_frag<C, SILU_PAIR>(make_float4(acc[mi][ni][0], acc[mi][ni][1], acc[mi][ni][2], acc[mi][ni][3]),
                                     mi, ni, out, scales, M, N, m0, n0, z, wm, wn, lane);
}

// A partial tile in its slot, in the threads' own fragment order: float4 j = mi·NI + ni of thread t at
// slot[j·THREADS + t] (each float4 store of the CTA is 4 KB contiguous); every CTA of a launch has the same fragment
// layout, so the summing CTA reads the others' slots the way it writes its own.
template <class C>
OS_DEVICE void save_partial(const float (&acc)[C::MI][C::NI][4], float* __restrict__ slot) {
    float4* s = reinterpret_cast<float4*>(slot) + threadIdx.x;
#pragma unroll
    for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
        for (int ni = 0; ni < C::NI; ni++)
            s[(mi * C::NI + ni) * C::THREADS] =
                make_float4(acc[mi][ni][0], acc[mi][ni][1], acc[mi][ni][2], acc[mi][ni][3]);
}

// The sum of the slots of CTAs first … last (in that order) stored as the finished tile, U fragments at a time
// (U·(last − first + 1) loads in flight; the accumulators are not held, so this costs no registers in the main loop).
template <class C, bool SILU_PAIR, class SlotOf>
OS_DEVICE void store_summed(SlotOf slot_of, int first, int last, void* __restrict__ out,
                            const float* __restrict__ scales, int M, int N, int m0, int n0, int wm, int wn, int lane) {
    constexpr int J = C::MI * C::NI, U = J < 8 ? J : 8;
#pragma unroll 1
    for (int j0 = 0; j0 < J; j0 += U) {
        float4 v[U];
        const float4* s = reinterpret_cast<const float4*>(slot_of(first)) + j0 * C::THREADS + threadIdx.x;
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = __ldcg(s + u * C::THREADS);  // L2: written by other multiprocessors
        for (int c = first + 1; c <= last; c++) {
            s = reinterpret_cast<const float4*>(slot_of(c)) + j0 * C::THREADS + threadIdx.x;
#pragma unroll
            for (int u = 0; u < U; u++) {
                const float4 w = __ldcg(s + u * C::THREADS);
                v[u].x += w.x;
                v[u].y += w.y;
                v[u].z += w.z;
                v[u].w += w.w;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
            store_frag<C, SILU_PAIR>(v[u], (j0 + u) / C::NI, (j0 + u) % C::NI, out, scales, M, N, m0, n0, 0, wm, wn,
                                     lane);
    }
}

// The GEMM of one CTA over its schedule (see the top of the file). Needs K % 8 == 0 (and N even in silu_pair mode).
// ktiles_per_split: the k-tiles of split z = blockIdx.y (grid split-K; ≥ kt when gridDim.y == 1); sk_tiles: the
// stream-K tiles (0 with gridDim.y > 1); counters [≥ ctas] int, zero before and after; slots [2·ctas, BM·BN] f32.
template <class C, bool SILU_PAIR>
OS_DEVICE void gemm_body(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ scales,
                         void* __restrict__ out, int M, int N, int K, int ktiles_per_split, int sk_tiles,
                         int* __restrict__ counters, float* __restrict__ slots) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ int last_flag;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;

    const int m_tiles = (M + C::BM - 1) / C::BM, tiles = m_tiles * ((N + C::BN - 1) / C::BN);
    const int kt = (K + C::BK - 1) / C::BK;
    const int ctas = gridDim.x, b = blockIdx.x, z = blockIdx.y;
    const int kbegin = min(kt, z * ktiles_per_split), kcount = min(kt, kbegin + ktiles_per_split) - kbegin;
    const long long sk_iters = (long long)sk_tiles * kt;
    const long long sk_begin = sk_chunk_start(b, sk_iters, ctas), sk_end = sk_chunk_start(b + 1, sk_iters, ctas);

    float acc[C::MI][C::NI][4];
#pragma unroll
    for (int i = 0; i < C::MI; i++)
#pragma unroll
        for (int j = 0; j < C::NI; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;

    if (kcount == 0) {  // an empty split (grid split-K past the last k-tile): its partials are zeros
        for (int t = b; t < tiles; t += ctas)
            store_tile<C, SILU_PAIR>(acc, out, nullptr, M, N, (t % m_tiles) * C::BM, (t / m_tiles) * C::BN, z, wm,
                                     wn, lane);
        return;
    }

    GemmCursor cur;
    cur.next_tile = sk_tiles + b;
    if (sk_end > sk_begin) {
        cur.tile = (int)(sk_begin / kt);
        cur.k = cur.seg_k0 = (int)(sk_begin - (long long)cur.tile * kt);
        cur.left = (int)min((long long)(kt - cur.k), sk_end - sk_begin);
        cur.sk_left = (int)(sk_end - sk_begin) - cur.left;
        cur.stream = true;
    } else {
        cur.sk_left = 0;
        cur.next_segment(kt, tiles, ctas, kbegin, kcount);
    }
    GemmCursor ld = cur;  // the loads run STAGES − 1 k-tiles ahead of the math
    const GemmLanes<C> ln(wm, wn, lane);
    const uint32_t smem0 = smem_u32(smem_raw);
    constexpr uint32_t STAGE_BYTES = C::STAGE_ELEMS * 2;

#pragma unroll
    for (int s = 0; s < C::STAGES - 1; s++) {
        if (ld.left > 0) {
            load_tile<C, SILU_PAIR>(smem0 + s * STAGE_BYTES, ln, A, W, M, N, K, (ld.tile % m_tiles) * C::BM,
                                    (ld.tile / m_tiles) * C::BN, ld.k * C::BK);
            ld.advance(kt, tiles, ctas, kbegin, kcount);
        }
        cp_async_commit();
    }
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();

    Frags<C> frag[2];
    load_frags<C>(frag[0], smem0, ln, 0);
    uint32_t read_stage = smem0, write_stage = smem0 + (C::STAGES - 1) * STAGE_BYTES;
    const uint32_t last_stage = smem0 + (C::STAGES - 1) * STAGE_BYTES;

    while (cur.left > 0) {
#pragma unroll
        for (int ks = 0; ks < C::KS; ks++) {
            if (ks == C::KS - 1) {
                // The next k-tile landed for every thread, and every warp is done reading the stage refilled next
                // (its last fragments were loaded one step ago).
                cp_async_wait<C::STAGES - 2>();
                __syncthreads();
                read_stage = read_stage == last_stage ? smem0 : read_stage + STAGE_BYTES;
            }
            if (ks == 0) {  // refill the stage read last k-tile (before the next fragments: fewer registers live)
                if (ld.left > 0) {
                    load_tile<C, SILU_PAIR>(write_stage, ln, A, W, M, N, K, (ld.tile % m_tiles) * C::BM,
                                            (ld.tile / m_tiles) * C::BN, ld.k * C::BK);
                    ld.advance(kt, tiles, ctas, kbegin, kcount);
                }
                cp_async_commit();
                write_stage = write_stage == last_stage ? smem0 : write_stage + STAGE_BYTES;
            }
            load_frags<C>(frag[(ks + 1) & 1], read_stage, ln, (ks + 1) % C::KS);
#pragma unroll
            for (int mi = 0; mi < C::MI; mi++)
#pragma unroll
                for (int ni = 0; ni < C::NI; ni++)
                    mma_bf16_16816(acc[mi][ni], frag[ks & 1].a[mi], frag[ks & 1].b[ni][0], frag[ks & 1].b[ni][1]);
        }

        if (cur.left == 1) {  // the segment's last k-tile: finish the tile (or hand in this CTA's part of it)
            const int t = cur.tile, m0 = (t % m_tiles) * C::BM, n0 = (t / m_tiles) * C::BN;
            if (!cur.stream || (cur.seg_k0 == 0 && cur.k == kt - 1)) {
                store_tile<C, SILU_PAIR>(acc, out, scales, M, N, m0, n0, z, wm, wn, lane);
            } else {
                // A tile cut by stream-K chunk boundaries: CTAs first … last share it, each with a slot (its first
                // tile's part in slot 2c, its last tile's in slot 2c + 1); the last to arrive adds them in CTA order.
                const int first = sk_owner((long long)t * kt, sk_iters, ctas);
                const int last = sk_owner((long long)(t + 1) * kt - 1, sk_iters, ctas);
                auto slot_of = [&](int c) {
                    const bool first_tile = sk_chunk_start(c, sk_iters, ctas) / kt == t;
                    return slots + (size_t)(2 * c + (first_tile ? 0 : 1)) * C::SLOT_FLOATS;
                };
                save_partial<C>(acc, slot_of(b));
                __threadfence();  // this thread's part is visible on the device before the ticket is taken
                __syncthreads();
                if (threadIdx.x == 0) last_flag = atomicAdd(counters + first, 1) == last - first;
                __syncthreads();
                if (last_flag) {
                    __threadfence();
                    store_summed<C, SILU_PAIR>(slot_of, first, last, out, scales, M, N, m0, n0, wm, wn, lane);
                    if (threadIdx.x == 0) counters[first] = 0;  // ready for the next launch (graph replays too)
                }
            }
#pragma unroll
            for (int i = 0; i < C::MI; i++)
#pragma unroll
                for (int j = 0; j < C::NI; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;
            // The next k-tile's first fragments again: not holding them across the epilogue leaves it registers.
            load_frags<C>(frag[0], read_stage, ln, 0);
        }
        cur.advance(kt, tiles, ctas, kbegin, kcount);
    }
    cp_async_wait<0>();
}

// Grid: (ctas, splits); block: 256 threads; dynamic shared memory GemmBM<BM>::SMEM_BYTES (128 … 160 KB).
// A [M, K] bf16, W [N, K] bf16 (K % 8 == 0), scales [N] f32 or null. Tiles: BM rows × BN columns, M-tile fastest
// (tile t = (m = t mod ceil(M/BM), n = t div ceil(M/BM))).
//   splits == 1: stream-K over `ctas` persistent CTAs (ctas ≤ sk_tiles·kt when sk_tiles > 0), C [M, N] f32;
//                ktiles_per_split ≥ ceil(K / BK).
//   splits > 1:  sk_tiles = 0, ctas = number of tiles: CTA (t, z) sums k-tiles [z·kps, min((z+1)·kps, kt)) of tile t
//                into the partial C + z·M·N (an empty split writes zeros).
// counters [≥ ctas] int32 (zero; left zero), slots [2·ctas, BM·BN] f32 scratch.
#define GEMM_KERNEL(BMV)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1)                                                 \
        gemm_bf16_bm##BMV(const bf16* A, const bf16* W, const float* scales, float* C, int M, int N, int K,       \
                          int ktiles_per_split, int sk_tiles, int* counters, float* slots) {                      \
        grid_dependency_sync();                                                                                   \
        gemm_body<GemmBM##BMV, false>(A, W, scales, C, M, N, K, ktiles_per_split, sk_tiles, counters, slots);     \
    }                                                                                                             \
    /* Grid: (ctas); C [M, N/2] bf16 = SiLU(A·gateᵀ)·(A·upᵀ), W = [gate; up] (N = 2I, even); stream-K as above. */ \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1)                                                 \
        gemm_bf16_silu_bm##BMV(const bf16* A, const bf16* W, const float* scales, bf16* C, int M, int N, int K,   \
                               int sk_tiles, int* counters, float* slots) {                                       \
        grid_dependency_sync();                                                                                   \
        gemm_body<GemmBM##BMV, true>(A, W, scales, C, M, N, K, 1 << 30, sk_tiles, counters, slots);               \
    }
GEMM_KERNEL(16)
GEMM_KERNEL(32)
GEMM_KERNEL(64)
GEMM_KERNEL(128)
GEMM_KERNEL(256)

// The SwiGLU product from the plain GEMM's split-K partials of [gate; up] (when the fused silu epilogue cannot be
// used because K is split): out[m, i] = bf16(SiLU(Σ_p parts[p][m][i])·Σ_p parts[p][m][I + i]), parts summed in
// order p = 0, 1, ….
// Grid: (ceil(M·I / 1024)); block: 256 threads, 4 consecutive i each. parts: n_parts × [M, 2I] f32, part p at
// parts + p·part_stride; out [M, I] bf16. Needs I % 4 == 0 and part_stride % 4 == 0.
extern "C" __global__ void silu_mul_parts(const float* __restrict__ parts, int n_parts, long long part_stride,
                                          bf16* __restrict__ out, int M, int I) {
    grid_dependency_sync();
    const long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (e >= (long long)M * I) return;
    const int m = (int)(e / I), i = (int)(e % I);
    const size_t row = (size_t)m * 2 * I;
    const float4 g = sum_parts4(parts, n_parts, part_stride, row + i);
    const float4 u = sum_parts4(parts, n_parts, part_stride, row + I + i);
    *reinterpret_cast<uint2*>(out + e) =
        make_uint2(pack_bf16x2(silu(g.x) * u.x, silu(g.y) * u.y), pack_bf16x2(silu(g.z) * u.z, silu(g.w) * u.w));
}

// int8 engines at prefill: widen a weight matrix to bf16 (exact: |q| ≤ 127 fits bf16's 8-bit significand) into a
// scratch buffer, then run the GEMMs above with the per-row scales in their epilogue.
// Grid: (ceil(n / 4096)); block: 256 threads, 16 elements each. q [n] int8, out [n] bf16, n % 16 == 0.
extern "C" __global__ void widen_int8(const int8_t* __restrict__ q, bf16* __restrict__ out, long long n) {
    grid_dependency_sync();
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (i >= n) return;
    const uint4 w = *reinterpret_cast<const uint4*>(q + i);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    uint32_t packed[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const char4 c = *reinterpret_cast<const char4*>(&words[j]);
        packed[2 * j] = pack_bf16x2(c.x, c.y);
        packed[2 * j + 1] = pack_bf16x2(c.z, c.w);
    }
    uint4* o = reinterpret_cast<uint4*>(out + i);
    o[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    o[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}
