// Projections with int4 (and int8, below) weights for 1 … 64 token rows: y = x·Wᵀ with W dequantized in registers
// straight into mma.sync m16n8k16 fragments, bf16 activations, f32 accumulation. Decode is memory-bound: a weight
// byte is read once per step for all M rows, so the kernel streams W like a GEMV (no shared-memory staging, 16-byte
// loads, U of them per lane in flight) and lets the tensor cores do the dot products, which keeps the instructions
// per weight low enough (≈ 2.2 per int4 weight at G = 128, 3.1 at G = 32; 2.0 per int8 weight, from the SASS) to
// reach copy bandwidth; up to M ≈ 16 the work per byte hardly grows (one mma per 8 token rows).
//
// W is the *weights* operand A (16 weight rows per warp tile), x the B operand (n8 = 8 token rows per mma), so small M
// wastes no tensor work on padding: NT = ⌈M/8⌉ n8 tiles (1, 2, 4, 8) per instantiation.
// Device layout (runtime/cuda/quant_layout.py, which repacks the canonical engine layout):
//   qweight [Np/16 tiles][K/64 chunks][32 lanes] uint4: lane 4g + c holds tile rows g, g+8 at k 8c … 8c+7 and
//           32+8c … 32+8c+7 of the chunk, word j (k16 block j: k 32·(j>>1) + 8c + 4·(j&1) … +3) as nibbles such
//           that (word >> 4r) & 0x000F000F is A register r (each k16 block inside one half chunk: one group);
//   scales  [tiles][K/G][8 g] of two f16 (rows g, g+8), zeros [tiles][K/G][8 g] bytes (z_g | z_{g+8} << 4) or null
//           (symmetric: zero 8). The k order inside a chunk is permuted consistently for A and B: thread c's B
//           fragments of blocks j, j+1 (j even) are x[token][64·chunk + 32·(j>>1) + 8c … +7], one 16-byte load.
// Per group of G weights of a row: the mma accumulates Σ (q − z)·x exactly (q − z is exact in bf16, the products
// are exact in f32) into a temporary, scaled by the f32 group scale into the accumulators: no rounding of weights.
#include "common.cuh"

constexpr int Q4_WARPS = 8;        // warps per block
constexpr int Q4_TILE_ROWS = 16;   // weight rows per warp tile (the m16 of the mma)
constexpr int Q4_CHUNK = 64;       // k per 16-byte lane load (32 nibbles: 2 rows × 16 k)
constexpr int Q4_MIN_GROUP = 32;   // a k16 block lies in one half chunk
constexpr int Q4_MAX_ROWS = 64;    // token rows: NT ≤ 8 n8 tiles (more: dequantize_q4 + the bf16 GEMM)
constexpr int Q4_SMALL_UNROLL = 8; // chunks per step (16-byte loads in flight per lane) for NT ≤ 2
constexpr int Q4_MID_UNROLL = 4;   // NT = 4 (more accumulators live)
constexpr int Q4_WIDE_UNROLL = 2;  // NT = 8 (the tensor cores set the pace there, not the loads in flight)

// bf16 128.0 has an ulp of 1: 0x4300 | q is exactly 128 + q for a nibble q in the low mantissa bits.
constexpr uint32_t BF16X2_128 = 0x43004300u;
constexpr uint32_t BF16X2_ONE = 0x3F803F80u;
constexpr uint32_t BF16X2_MINUS_128 = 0xC300C300u;  // | z·0x10001: −(128 + z) in both halves

// −(128 + z) in both bf16 halves for the zero of tile row g (low nibble of zb) and of row g + 8 (high nibble).
struct Q4Zero {
    uint32_t g, g8;
    OS_DEVICE explicit Q4Zero(uint32_t zb)
        : g(BF16X2_MINUS_128 | ((zb & 15u) * 0x10001u)), g8(BF16X2_MINUS_128 | (((zb >> 4) & 15u) * 0x10001u)) {}
};

// One device word (8 nibbles) → the four A registers of a k16 block, q − z exact: (128 + q)·1 − (128 + z).
OS_DEVICE void q4_dequant(uint32_t w, const Q4Zero& z, uint32_t (&a)[4]) {
    constexpr uint32_t LOW_NIBBLES = 0x000F000Fu;
    a[0] = fma_bf16x2(and_or(w, LOW_NIBBLES, BF16X2_128), BF16X2_ONE, z.g);         // row g,   k +0 +1
    a[1] = fma_bf16x2(and_or(w >> 4, LOW_NIBBLES, BF16X2_128), BF16X2_ONE, z.g8);   // row g+8, k +0 +1
    a[2] = fma_bf16x2(and_or(w >> 8, LOW_NIBBLES, BF16X2_128), BF16X2_ONE, z.g);    // row g,   k +2 +3
    a[3] = fma_bf16x2(and_or(w >> 12, LOW_NIBBLES, BF16X2_128), BF16X2_ONE, z.g8);  // row g+8, k +2 +3
}

OS_DEVICE uint32_t word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// The per-warp state of one tile's dot products: where its weights, scales and activations are.
template <int NT>
struct Q4Warp {
    const uint4* w;          // this lane's first chunk of the tile
    const uint32_t* scale;   // this lane's scale pair of group 0 (stride 8 per group)
    const uint8_t* zero;     // this lane's zero byte of group 0, or null
    // activations of token 8n + g at this lane's k offset 8c; a token ≥ M reads row M − 1 instead (its mma column
    // is never stored), so no load is predicated
    const bf16* x[NT];
    int K;
};

// The weight loads of C consecutive chunks q0 … q0+C−1 of a tile, all in flight at once (q4_math uses them).
template <int C>
OS_DEVICE void quant_load(const uint4* __restrict__ w_lane, int q0, uint4 (&w)[C]) {
#pragma unroll
    for (int i = 0; i < C; i++) w[i] = load_stream16(w_lane + (size_t)(q0 + i) * 32);
}

// C consecutive chunks q0 … q0+C−1 of a tile (C·64/G whole groups) from their loaded weights w: the scale loads,
// then per group a temporary mma sum over its G/16 k16 blocks, scaled into acc.
template <int NT, int G, int C>
OS_DEVICE void q4_math(const Q4Warp<NT>& p, int q0, const uint4 (&w)[C], float (&acc)[NT][4]) {
    constexpr int GROUPS = C * Q4_CHUNK / G, BLOCKS = G / 16;
    static_assert(GROUPS >= 1 && (C * Q4_CHUNK) % G == 0, "whole groups per step");
    // Every weight load in flight before the first mma: ptxas would otherwise sink each load to just before its use
    // (fewer live registers, one load in flight per warp). A dependency of the first zero point on all of them,
    // through a value that is 0 at run time but unknown to the compiler, keeps them together at no cost in bytes.
    uint32_t all = 0;
#pragma unroll
    for (int i = 0; i < C; i++) all |= w[i].x;
    const uint32_t hold = all & ((uint32_t)p.K >> 31);  // K < 2^31: zero
    const int group0 = q0 * Q4_CHUNK / G;
    uint32_t sc[GROUPS], zb[GROUPS];
#pragma unroll
    for (int i = 0; i < GROUPS; i++) {
        sc[i] = __ldg(p.scale + (size_t)(group0 + i) * 8);
        zb[i] = p.zero ? (uint32_t)__ldg(p.zero + (size_t)(group0 + i) * 8) : 0x88u;
    }
#pragma unroll
    for (int gi = 0; gi < GROUPS; gi++) {
        const Q4Zero z(gi == 0 ? zb[0] | hold : zb[gi]);
        float t[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) t[n][0] = t[n][1] = t[n][2] = t[n][3] = 0.f;
#pragma unroll
        for (int b = 0; b < BLOCKS; b += 2) {  // k16 blocks j, j + 1 of one half chunk: x[k 8c … 8c+7], one load
            const int kb = gi * BLOCKS + b, chunk = kb >> 2, j = kb & 3;
            uint32_t a0[4], a1[4];
            q4_dequant(word_of(w[chunk], j), z, a0);
            q4_dequant(word_of(w[chunk], j + 1), z, a1);
            const size_t k = (size_t)(q0 + chunk) * Q4_CHUNK + 32 * (j >> 1);
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(p.x[n] + k));
                mma_bf16_16816(t[n], a0, xv.x, xv.y);
                mma_bf16_16816(t[n], a1, xv.z, xv.w);
            }
        }
        const float2 s = f16x2_to_float2(sc[gi]);  // rows g, g+8
#pragma unroll
        for (int n = 0; n < NT; n++) {
            acc[n][0] = fmaf(t[n][0], s.x, acc[n][0]);
            acc[n][1] = fmaf(t[n][1], s.x, acc[n][1]);
            acc[n][2] = fmaf(t[n][2], s.y, acc[n][2]);
            acc[n][3] = fmaf(t[n][3], s.y, acc[n][3]);
        }
    }
}

// The end of a tile shared by `split` warps (slices) of a block: their accumulators meet in shared memory, added in
// slice order (the same result every run), and slice 0 stores them, times the row scales s_g, s_g8 (int8; 1 for
// int4, whose group scales are already in). The accumulator of (n8 tile n, e) is token 8n + 2c + (e & 1), tile row
// g + 8·(e >> 1):
//   plain: y [M, N] f32, rows n of the tile in order;
//   silu:  the tile is gate rows 8t … 8t+7 then up rows I+8t … (pairs layout), y [M, N/2] bf16 = SiLU(gate)·up.
template <int NT, bool SILU>
OS_DEVICE void quant_finish(float (&acc)[NT][4], float (&partial)[Q4_WARPS][NT * 4][32], int split, bool active,
                            int tile, void* __restrict__ y, int M, int N, float s_g, float s_g8) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3, slice = warp % split;
    if (split > 1) {
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) partial[warp][n * 4 + e][lane] = acc[n][e];
        __syncthreads();
        if (slice != 0) return;
        for (int s = 1; s < split; s++)
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[n][e] += partial[warp + s][n * 4 + e][lane];
    }
    if (!active) return;
#pragma unroll
    for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int token = n * 8 + 2 * c + e;
            if (token >= M) continue;
            const float lo = acc[n][e] * s_g, hi = acc[n][e + 2] * s_g8;
            if (SILU) {
                reinterpret_cast<bf16*>(y)[(size_t)token * (N / 2) + tile * 8 + g] = __float2bfloat16(silu(lo) * hi);
            } else {
                float* out = reinterpret_cast<float*>(y) + (size_t)token * N;
                const int row = tile * Q4_TILE_ROWS + g;
                if (row < N) out[row] = lo;
                if (row + 8 < N) out[row + 8] = hi;
            }
        }
    }
}

// A warp's ring of R stages in dynamic shared memory, stage s holding chunks sC … sC+C−1 of the warp's slice (a
// contiguous run of its tile's K): on sm_90 one bulk copy per stage (lane 0 issues it, the stage's mbarrier counts
// its bytes in), before that a 16-byte cp.async per lane and chunk (a commit group per stage). Loads are issued R
// stages ahead of use, so each warp keeps (R − 1)·C·512 bytes in flight while it computes a stage, whatever phase
// the other warps are in. A register buffer instead (load U chunks, wait for all, compute) leaves the memory
// system idle between steps with every warp in the same phase, and ptxas sinks register loads meant to run ahead
// to just before their use: two thirds of bandwidth at four steps per warp, measured.
#ifndef OS_RING_BULK  // (the emulator's tests also build the cp.async form: tests/test_kernel_emulation.py)
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(OS_EMULATE_SM90)
#define OS_RING_BULK 1
#else
#define OS_RING_BULK 0
#endif
#endif
template <int C, int R>
struct WeightRing {
    uint4* stages;      // this warp's [R][C][32] uint4
    uint32_t base;      // the shared address of stages (sm_90)
    uint32_t bars;      // this warp's R mbarriers (sm_90), 8 bytes apart
    const uint4* src;   // chunk 0 of the slice (chunk q: + 32q)
    int chunks;         // of the slice

    OS_DEVICE uint4* slot(int r) const { return stages + r * C * 32; }
    OS_DEVICE uint4* stage(int s) const { return slot(s % R); }
    // Stage s on its way into slot r = s % R (nothing past the slice's end); dep is 0 at run time, a value the refill
    // must wait for.
    OS_DEVICE void issue_into(int r, int s, uint32_t dep) const {
        const int n = min(C, chunks - s * C), lane = threadIdx.x & 31;
#if OS_RING_BULK
        if (n > 0 && lane == 0) {
            const uint32_t bar = bars + 8 * r;
            mbar_arrive_expect_tx(bar, n * 512);
            bulk_copy_g2s(base + r * C * 512, reinterpret_cast<const char*>(src) + (s * C * 512 + dep), n * 512, bar);
        }
#else
        for (int i = 0; i < n; i++) cp_async16(slot(r) + i * 32 + lane, src + ((size_t)s * C + i) * 32 + lane + dep, 16);
        cp_async_commit();  // empty groups too: stage s is always group s
#endif
    }
    OS_DEVICE void issue(int s, uint32_t dep) const { issue_into(s % R, s, dep); }
    // Until the stage in slot r has landed (its phase `parity`: stage s is slot s % R, parity (s / R) & 1).
    OS_DEVICE void wait_slot(int r, int parity) const {
#if OS_RING_BULK
        mbar_wait(bars + 8 * r, parity);
#else
        cp_async_wait<R - 1>();
        __syncwarp();  // (and the compiler reads the stage after the wait)
#endif
    }
    OS_DEVICE void wait(int s) const { wait_slot(s % R, (s / R) & 1); }
};

// Dynamic shared memory of the int8 kernels: the rings, their mbarriers, the split-K partials (kernels.py q8_smem).
template <int NT, int C, int R>
struct RingSmem {
    static constexpr int RING = Q4_WARPS * R * C * 512, BARS = Q4_WARPS * R * 8, PARTIAL = Q4_WARPS * NT * 4 * 32 * 4;
    static constexpr int BYTES = RING + BARS + PARTIAL;
};

// This warp's ring over its slice of a tile (`first` … `first + chunks − 1` of its `tile_chunks`), in smem_raw laid
// out as RingSmem; the barriers initialised.
template <int C, int R>
OS_DEVICE WeightRing<C, R> warp_ring(unsigned char* smem_raw, const uint4* qweight, int tile, int tile_chunks,
                                     int first, int chunks) {
    using S = RingSmem<1, C, R>;  // (the rings' place does not depend on NT)
    const int warp = threadIdx.x >> 5;
    WeightRing<C, R> ring;
    ring.stages = reinterpret_cast<uint4*>(smem_raw) + warp * R * C * 32;
    ring.base = smem_u32(ring.stages);
    ring.bars = smem_u32(smem_raw + S::RING) + warp * R * 8;
    ring.src = qweight + ((size_t)tile * tile_chunks + first) * 32;
    ring.chunks = chunks;
#if OS_RING_BULK
    if ((threadIdx.x & 31) == 0) {
        for (int r = 0; r < R; r++) mbar_init(ring.bars + 8 * r, 1);
        fence_proxy_async();  // the barriers, initialised, before the copies that complete them
    }
    __syncwarp();
#endif
    return ring;
}

template <int NT, int C, int R>
OS_DEVICE float (&ring_partial(unsigned char* smem_raw))[Q4_WARPS][NT * 4][32] {
    using S = RingSmem<NT, C, R>;
    return *reinterpret_cast<float(*)[Q4_WARPS][NT * 4][32]>(smem_raw + S::RING + S::BARS);
}

// Each 16-row tile is taken by `split` warps of one block (1, 2, 4 or 8), slice s taking steps s, s + split, … of
// U chunks and then the leftover chunks in whole groups the same way (quant_finish adds and stores them).
template <int NT, int G, bool SILU>
OS_DEVICE void q4_body(const uint4* __restrict__ qweight, const uint32_t* __restrict__ scales,
                       const uint8_t* __restrict__ zeros, const bf16* __restrict__ x, void* __restrict__ y, int M,
                       int N, int K, int split) {
    constexpr int U = NT <= 2 ? Q4_SMALL_UNROLL : NT == 4 ? Q4_MID_UNROLL : Q4_WIDE_UNROLL;
    constexpr int CPG = G >= Q4_CHUNK ? G / Q4_CHUNK : 1;  // chunks of the smallest whole-group step
    static_assert(G % Q4_MIN_GROUP == 0, "a k16 block must not straddle two groups");
    static_assert(NT * 8 <= Q4_MAX_ROWS, "at most Q4_MAX_ROWS token rows");
    __shared__ float partial[Q4_WARPS][NT * 4][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int tile = blockIdx.x * (Q4_WARPS / split) + warp / split, slice = warp % split;
    const int tiles = (N + Q4_TILE_ROWS - 1) / Q4_TILE_ROWS, chunks = K / Q4_CHUNK, groups = K / G;
    const bool active = tile < tiles;

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    Q4Warp<NT> p;
    p.w = qweight + (size_t)tile * chunks * 32 + lane;
    p.scale = scales + (size_t)tile * groups * 8 + g;
    p.zero = zeros ? zeros + (size_t)tile * groups * 8 + g : nullptr;
#pragma unroll
    for (int n = 0; n < NT; n++) p.x[n] = x + (size_t)min(n * 8 + g, M - 1) * K + 8 * c;
    p.K = K;
    const int steps = chunks / U, rest = (chunks - steps * U) / CPG;
    // The first step's weights are loaded before the grid dependency wait (common.cuh): packed weights are the
    // engine's, never written on the device, and they stream while the previous kernel drains.
    uint4 w[U];
    if (active && slice < steps) quant_load<U>(p.w, slice * U, w);
    grid_dependency_wait();
    if (active) {
        for (int s = slice; s < steps; s += split) {
            if (s != slice) quant_load<U>(p.w, s * U, w);
            q4_math<NT, G, U>(p, s * U, w, acc);
        }
        for (int r = slice; r < rest; r += split) {
            uint4 wr[CPG];
            quant_load<CPG>(p.w, steps * U + r * CPG, wr);
            q4_math<NT, G, CPG>(p, steps * U + r * CPG, wr, acc);
        }
    }
    grid_dependents_launch();  // only now (common.cuh)
    quant_finish<NT, SILU>(acc, partial, split, active, tile, y, M, N, 1.f, 1.f);
}

// Grid: (⌈tiles / (8 / split)⌉); block: 256 threads; split ∈ {1, 2, 4, 8} warps per tile.
// qweight, scales, zeros (or null): the device layout above for Np = 16·tiles ≥ N rows and K % 64 == 0, K % G == 0;
// x [M, K] bf16 (M ≤ 8·NT); y [M, N] f32, or silu (pairs layout, N = 2I, I % 8 == 0): [M, I] bf16.
// Blocks per multiprocessor the launch bounds hold the narrow tiles to (kernels.py Q4_RESIDENT_WARPS): the first
// step's weights live across the grid dependency wait, and without the bound ptxas
// spends registers that cost residency (int4 NT = 2: 102 → 134, one block instead of two). The wide tiles keep one
// block (a bound there makes ptxas take more registers, not fewer).
#define Q4_MIN_BLOCKS(NT) ((NT) <= 2 ? 2 : 0)
#define Q4_KERNEL(G, NT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(Q4_WARPS * 32, Q4_MIN_BLOCKS(NT))                                \
        q4_mma_g##G##_n##NT(const uint4* qweight, const uint32_t* scales, const uint8_t* zeros, const bf16* x,    \
                            float* y, int M, int N, int K, int split) {                                           \
        q4_body<NT, G, false>(qweight, scales, zeros, x, y, M, N, K, split);                                      \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(Q4_WARPS * 32, Q4_MIN_BLOCKS(NT))                                \
        q4_mma_silu_g##G##_n##NT(const uint4* qweight, const uint32_t* scales, const uint8_t* zeros,              \
                                 const bf16* x, bf16* y, int M, int N, int K, int split) {                        \
        q4_body<NT, G, true>(qweight, scales, zeros, x, y, M, N, K, split);                                       \
    }
#define Q4_GROUP(G) Q4_KERNEL(G, 1) Q4_KERNEL(G, 2) Q4_KERNEL(G, 4) Q4_KERNEL(G, 8)
Q4_GROUP(32)
Q4_GROUP(64)
Q4_GROUP(128)

// ── int8 weights (per-row f32 scales), the same scheme ───────────────────────────────────────────────────────
// Device layout (quant_layout.pack_q8): qweight [Np/16 tiles][K/32 chunks][32 lanes] uint4, lane 4g + c, word 2j + h
// = tile row g + 8h at k = 32·chunk + 8c + 4j + e in byte (0, 2, 1, 3)[e] (k16 block j of the chunk; a k pair in
// bytes 0, 2 or 1, 3 is one bf16 pair after a shift, q8_pair); scales [Np] f32 in tile
// row order. An int8 weight is exact in bf16 (8 significant bits), so the mma sums Σ q·x exactly-rounded in f32
// and the row scale is applied once at the end.
constexpr int Q8_CHUNK = 32;  // k per 16-byte lane load (2 rows × 8 k)
constexpr int Q8_STAGE_CHUNKS = 2;     // chunks per ring stage (1 KB per warp; q8_body)
constexpr int Q8_N1_STAGE_CHUNKS = 4;  // and at NT = 1, whose registers allow a stage of 2 KB (half the overhead)
constexpr int Q8_STAGES = 4;           // stages per ring (4 or 8 KB per warp: three stages in flight)

// Two int8 words (tile rows g, g+8 of one k16 block, bytes in the order k +0 +2 +1 +3) → the block's four A
// registers.
OS_DEVICE void q8_widen(uint32_t row_g, uint32_t row_g8, uint32_t (&a)[4]) {
    a[0] = q8_pair(row_g);        // row g,   k +0 +1
    a[1] = q8_pair(row_g8);       // row g+8, k +0 +1
    a[2] = q8_pair(row_g >> 8);   // row g,   k +2 +3
    a[3] = q8_pair(row_g8 >> 8);  // row g+8, k +2 +3
}

// One chunk of a tile (its loaded weights w, the activations xv[n] of token 8n + g at this lane's k offset): two k16
// blocks straight into the accumulators.
template <int NT>
OS_DEVICE void q8_chunk(uint4 w, const uint4 (&xv)[NT], float (&acc)[NT][4]) {
    uint32_t a0[4], a1[4];
    q8_widen(w.x, w.y, a0);
    q8_widen(w.z, w.w, a1);
#pragma unroll
    for (int n = 0; n < NT; n++) {
        mma_bf16_16816(acc[n], a0, xv[n].x, xv[n].y);
        mma_bf16_16816(acc[n], a1, xv[n].z, xv[n].w);
    }
}

// The activations of chunks q0 … q0+C−1 (token 8n + g at x[row[n]]: one 64-bit address per n8 tile and stage, the
// chunks at immediate offsets from it).
template <int NT, int C>
OS_DEVICE void q8_load_x(const bf16* __restrict__ x, const int (&row)[NT], int q0, uint4 (&xv)[C][NT]) {
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const uint4* at = reinterpret_cast<const uint4*>(x + (row[n] + q0 * Q8_CHUNK));
#pragma unroll
        for (int i = 0; i < C; i++) xv[i][n] = __ldg(at + i * (Q8_CHUNK / 8));
    }
}

// Stage s's chunks from ring slot r into the accumulators, then the slot refilled with stage s + R. `seen` ties the
// refill to the weights read (its address depends on them, a zero at run time), so it cannot overtake the reads.
template <int NT, int C, int R>
OS_DEVICE void q8_stage(const WeightRing<C, R>& ring, int s, int r, const uint4 (&xv)[C][NT], float (&acc)[NT][4],
                        int K) {
    const int lane = threadIdx.x & 31;
    uint32_t seen = 0;
#pragma unroll
    for (int i = 0; i < C; i++) {
        const uint4 w = ring.slot(r)[i * 32 + lane];
        q8_chunk<NT>(w, xv[i], acc);
        seen |= w.x;
    }
    __syncwarp();  // every lane has its weights of the stage in registers: the slot may be refilled
    ring.issue_into(r, s + R, seen & ((uint32_t)K >> 31));
}

// Slice s of `split` takes the contiguous chunks [s·per, (s+1)·per) of its tile, per = ⌈chunks / split⌉ rounded up
// to whole stages, so only a tile's last slice can end in a partial stage: the main loop runs whole stages (a ring's
// worth per trip at NT ≤ 2: the slot, its barrier and its parity then constants), and that partial stage comes after
// it. The per-stage work is most of what is not math: docs/QUANT_KERNELS.md.
template <int NT, bool SILU, bool XP>
OS_DEVICE void q8_body(const uint4* __restrict__ qweight, const float* __restrict__ scales, const bf16* __restrict__ x,
                       void* __restrict__ y, int M, int N, int K, int split) {
    constexpr int C = NT == 1 ? Q8_N1_STAGE_CHUNKS : Q8_STAGE_CHUNKS, R = Q8_STAGES;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int tile = blockIdx.x * (Q4_WARPS / split) + warp / split, slice = warp % split;
    const int tiles = (N + Q4_TILE_ROWS - 1) / Q4_TILE_ROWS, chunks = K / Q8_CHUNK;
    const int per = C * ((chunks + C * split - 1) / (C * split));
    const bool active = tile < tiles;
    const int first = slice * per;
    const WeightRing<C, R> ring =
        warp_ring<C, R>(smem_raw, qweight, tile, chunks, first, active ? max(0, min(per, chunks - first)) : 0);
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float s_g = 0.f, s_g8 = 0.f;
    // The ring's first stages go before the grid dependency wait: packed weights are the engine's, never written on
    // the device, and they stream while the previous kernel drains.
#pragma unroll
    for (int s = 0; s < R; s++) ring.issue(s, 0);
    grid_dependency_wait();
    if (active) {
        int row[NT];  // token 8n + g, or M − 1 past M (as Q4Warp::x), at this lane's k offset and the slice's start
#pragma unroll
        for (int n = 0; n < NT; n++) row[n] = min(n * 8 + g, M - 1) * K + 8 * c + first * Q8_CHUNK;
        const int whole = ring.chunks / C;
        // A stage's activations are loaded a stage ahead, into registers (XP; the last whole stage reloads its own):
        // loaded at their use, every chunk waited on an L1 (or L2) round trip, the first stall of the loop (ncu, H200).
        uint4 xv[C][NT];
        if (XP && whole > 0) q8_load_x<NT, C>(x, row, 0, xv);
        constexpr int U = XP ? R : 1;  // stages per trip: a whole ring's (its slots then constants) where registers allow
        for (int base = 0; base < whole; base += U) {
#pragma unroll
            for (int r = 0; r < U; r++) {
                const int s = base + r;
                if (s >= whole) break;
                uint4 next[C][NT];
                q8_load_x<NT, C>(x, row, (XP ? min(s + 1, whole - 1) : s) * C, XP ? next : xv);
                const int slot = U == R ? r : s % R;
                ring.wait_slot(slot, (s / R) & 1);
                q8_stage<NT, C, R>(ring, s, slot, xv, acc, K);
                if (XP) {
#pragma unroll
                    for (int i = 0; i < C; i++)
#pragma unroll
                        for (int n = 0; n < NT; n++) xv[i][n] = next[i][n];
                }
            }
        }
        if (const int n = ring.chunks - whole * C) {  // the partial stage (n < C chunks): no refill after it
            ring.wait(whole);
#pragma unroll
            for (int i = 0; i < C; i++) {
                if (i < n) {
                    uint4 xi[1][NT];
                    q8_load_x<NT, 1>(x, row, whole * C + i, xi);
                    q8_chunk<NT>(ring.stage(whole)[i * 32 + lane], xi[0], acc);
                }
            }
        }
        s_g = scales[tile * Q4_TILE_ROWS + g];
        s_g8 = scales[tile * Q4_TILE_ROWS + g + 8];
    }
    // The next kernel may launch only now (common.cuh): triggered first thing, a 1B int8 decode step measured 1.02 ms
    // against 0.85 (H200, batch 1; 7B 3.10 against 3.05).
    grid_dependents_launch();
    quant_finish<NT, SILU>(acc, ring_partial<NT, C, R>(smem_raw), split, active, tile, y, M, N, s_g, s_g8);
}

// Grid: (⌈tiles / (8 / split)⌉); block: 256 threads; split ∈ {1, 2, 4, 8} warps per tile; dynamic shared memory
// RingSmem<NT, C, Q8_STAGES>::BYTES (C: Q8_N1_STAGE_CHUNKS at NT = 1, else Q8_STAGE_CHUNKS).
// qweight, scales: the int8 device layout above (Np = 16·tiles ≥ N rows, K % 32 == 0); x [M, K] bf16 (M ≤ 8·NT);
// y [M, N] f32, or silu (pairs layout, N = 2I, I % 8 == 0): [M, I] bf16.
// Blocks per multiprocessor the launch bounds hold NT 4 and 8 to (kernels.py Q8_RESIDENT_WARPS): unbounded, ptxas
// takes 85 and 132 registers for them, a block fewer each. NT 1 and 2 need no bound: their 72 and 80 registers give
// three blocks, as many as NT 1's shared memory allows.
#define Q8_MIN_BLOCKS(NT) ((NT) == 4 ? 3 : (NT) == 8 ? 2 : 1)
#define Q8_KERNEL(NT, XP)                                                                                         \
    extern "C" __global__ void __launch_bounds__(Q4_WARPS * 32, Q8_MIN_BLOCKS(NT))                                \
        q8_mma_n##NT(const uint4* qweight, const float* scales, const bf16* x, float* y, int M, int N, int K,     \
                     int split) {                                                                                 \
        q8_body<NT, false, XP>(qweight, scales, x, y, M, N, K, split);                                            \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(Q4_WARPS * 32, Q8_MIN_BLOCKS(NT))                                \
        q8_mma_silu_n##NT(const uint4* qweight, const float* scales, const bf16* x, bf16* y, int M, int N, int K, \
                          int split) {                                                                            \
        q8_body<NT, true, XP>(qweight, scales, x, y, M, N, K, split);                                             \
    }
// The activations a stage ahead up to NT = 2 (at NT 4, 8 their registers would halve the resident warps, and each
// load feeds NT mmas there)
Q8_KERNEL(1, true)
Q8_KERNEL(2, true)
Q8_KERNEL(4, false)
Q8_KERNEL(8, false)

// For M > 64 rows (prefill): the matrix dequantized to bf16 in the canonical row order, bf16((q − z)·s) with the
// product in f32 (as NumPy's dequantize_q4 then a cast), for the bf16 GEMM of gemm.cu (scales null).
// Grid: (⌈tiles·K/64 / 8⌉); block: 256 threads, one warp per (tile, chunk), each lane 2 rows × 2 runs of 8 k.
// pairs: the device rows are the [gate; up] pairs layout (N = 2I); out [N, K] bf16.
extern "C" __global__ void dequantize_q4(const uint4* __restrict__ qweight, const uint32_t* __restrict__ scales,
                                         const uint8_t* __restrict__ zeros, bf16* __restrict__ out, int N, int K,
                                         int G, int pairs) {
    grid_dependency_sync();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int chunks = K / Q4_CHUNK, tiles = (N + Q4_TILE_ROWS - 1) / Q4_TILE_ROWS;
    const long long unit = (long long)blockIdx.x * Q4_WARPS + warp;
    if (unit >= (long long)tiles * chunks) return;
    const int tile = (int)(unit / chunks), chunk = (int)(unit % chunks);
    const uint4 v = load_stream16(qweight + (size_t)unit * 32 + lane);
#pragma unroll
    for (int half = 0; half < 2; half++) {  // k run 32·half + 8c … +7: words 2·half, 2·half + 1
        const int k0 = chunk * Q4_CHUNK + 32 * half + 8 * c;
        const size_t at = ((size_t)tile * (K / G) + k0 / G) * 8 + g;
        const float2 s = f16x2_to_float2(scales[at]);
        const uint32_t zb = zeros ? zeros[at] : 0x88u;
#pragma unroll
        for (int h = 0; h < 2; h++) {  // tile row g + 8h
            const int row = pairs ? (h == 0 ? 8 * tile + g : N / 2 + 8 * tile + g) : tile * Q4_TILE_ROWS + g + 8 * h;
            if (row >= N) continue;
            const float scale = h ? s.y : s.x;
            const int z = (int)((zb >> (4 * h)) & 15u);
            uint32_t packed[4];
#pragma unroll
            for (int jl = 0; jl < 2; jl++) {
                const uint32_t w = word_of(v, 2 * half + jl);
                float e4[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int nibble = h + 2 * (e >> 1) + 4 * (e & 1);
                    e4[e] = (float)((int)((w >> (4 * nibble)) & 15u) - z) * scale;
                }
                packed[2 * jl] = pack_bf16x2(e4[0], e4[1]);
                packed[2 * jl + 1] = pack_bf16x2(e4[2], e4[3]);
            }
            *reinterpret_cast<uint4*>(out + (size_t)row * K + k0) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
}

// int8 engines at M > 64 rows: the device-layout matrix widened back to bf16 in the canonical row order (exact: q
// itself), and its row scales in that order too, for gemm.cu with the scales in its epilogue (as widen_int8).
// Grid: (⌈tiles·K/32 / 8⌉); block: 256 threads, one warp per (tile, chunk), each lane 2 rows × 8 k.
// qweight, scales: pack_q8's layout (pairs: [gate; up] tiles, N = 2I); out [N, K] bf16, out_scales [N] f32.
extern "C" __global__ void dequantize_q8(const uint4* __restrict__ qweight, const float* __restrict__ scales,
                                         bf16* __restrict__ out, float* __restrict__ out_scales, int N, int K,
                                         int pairs) {
    grid_dependency_sync();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int chunks = K / Q8_CHUNK, tiles = (N + Q4_TILE_ROWS - 1) / Q4_TILE_ROWS;
    const long long unit = (long long)blockIdx.x * Q4_WARPS + warp;
    if (unit >= (long long)tiles * chunks) return;
    const int tile = (int)(unit / chunks), chunk = (int)(unit % chunks);
    const uint4 v = load_stream16(qweight + (size_t)unit * 32 + lane);
#pragma unroll
    for (int h = 0; h < 2; h++) {  // tile row g + 8h: words h (k 8c … +3) and 2 + h (k 8c+4 … +7)
        const int row = pairs ? (h == 0 ? 8 * tile + g : N / 2 + 8 * tile + g) : tile * Q4_TILE_ROWS + g + 8 * h;
        if (row >= N) continue;
        const uint32_t lo = h ? v.y : v.x, hi = h ? v.w : v.z;
        *reinterpret_cast<uint4*>(out + (size_t)row * K + chunk * Q8_CHUNK + 8 * c) =
            make_uint4(q8_pair(lo), q8_pair(lo >> 8), q8_pair(hi), q8_pair(hi >> 8));
        if (chunk == 0 && c == 0) out_scales[row] = scales[tile * Q4_TILE_ROWS + g + 8 * h];
    }
}
