// A CPU emulation of the CUDA subset olmoscope's kernels use (x86-64, g++ -std=c++20): every CUDA thread of a block
// is a fiber on one OS thread, scheduled round-robin; blocks run one at a time, so `static` stands in for __shared__;
// __syncthreads/__syncwarp are barriers that yield; warp collectives (shuffles, ballots, ldmatrix, mma) go through a
// per-warp exchange buffer; cp.async copies land only at the wait_group that retires them (a legal, adversarial
// schedule: a missing wait shows); ldmatrix and mma.sync m16n8k16 follow the PTX fragment layouts (checked by
// running main's hardware-verified flash_prefill on it). Shared memory starts as 0xff bytes (NaN) in every block.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

// ── vector types ──
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct char4 { int8_t x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }

// ── bf16 ──
struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline uint16_t emu_f2bf(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
inline __nv_bfloat16 __float2bfloat16(float f) { return {emu_f2bf(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {{emu_f2bf(lo)}, {emu_f2bf(hi)}}; }

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline void sincosf(float a, float* s, float* c) { *s = std::sin(a); *c = std::cos(a); }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; i++) r |= (uint32_t)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline int __ffs(unsigned x) { return x ? __builtin_ctz(x) + 1 : 0; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { T v; std::memcpy(&v, (const void*)p, sizeof(T)); return v; }  // vectors too

// ── atomics ──
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
template <class T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p); T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p); T old = a.load();
    while (old > v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ── fibers: every CUDA thread of a block is a fiber on one OS thread; barriers yield to the scheduler ──
inline int emu_lane, emu_warp;
void emu_yield();
struct EmuBarrier {
    int expected = 0, count = 0;
    long generation = 0;
    void arrive_and_wait() {
        const long gen = generation;
        if (++count == expected) { count = 0; generation++; return; }
        while (generation == gen) emu_yield();
    }
    void arrive_and_drop() {
        expected--;
        if (count > 0 && count == expected) { count = 0; generation++; }
    }
};
struct EmuWarp {
    EmuBarrier bar;
    uint64_t slot[32][8];  // exchange: up to 8 words per lane
};
struct EmuBlock {
    EmuBarrier bar;
    std::vector<EmuWarp> warps;
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warps[emu_warp].bar.arrive_and_wait(); }

template <class T>
inline uint64_t emu_bits(T v) { uint64_t u = 0; std::memcpy(&u, &v, sizeof(T)); return u; }
template <class T>
inline T emu_from(uint64_t u) { T v; std::memcpy(&v, &u, sizeof(T)); return v; }

// All 32 lanes publish n words, then each reads what it needs.
inline void emu_publish(const uint64_t* words, int n) {
    EmuWarp& w = emu_block->warps[emu_warp];
    w.bar.arrive_and_wait();  // everyone is done reading the previous exchange
    for (int i = 0; i < n; i++) w.slot[emu_lane][i] = words[i];
    w.bar.arrive_and_wait();
}
inline uint64_t emu_read(int lane, int i) { return emu_block->warps[emu_warp].slot[lane][i]; }

template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) {
    uint64_t b = emu_bits(v); emu_publish(&b, 1); return emu_from<T>(emu_read(emu_lane ^ o, 0));
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) {
    uint64_t b = emu_bits(v); emu_publish(&b, 1); return emu_from<T>(emu_read(src & 31, 0));
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int d) {
    uint64_t b = emu_bits(v); emu_publish(&b, 1); return emu_lane >= d ? emu_from<T>(emu_read(emu_lane - d, 0)) : v;
}
inline unsigned __ballot_sync(unsigned, int pred) {
    uint64_t b = pred != 0; emu_publish(&b, 1);
    unsigned r = 0; for (int l = 0; l < 32; l++) r |= (unsigned)emu_read(l, 0) << l; return r;
}
inline bool __all_sync(unsigned m, int pred) { return __ballot_sync(m, pred) == 0xffffffffu; }

// ── dynamic shared memory: the emulator's buffer, and the bytes the current launch asked for ──
inline std::vector<unsigned char> emu_dynamic(256 * 1024);
inline unsigned char* emu_dynamic_smem = emu_dynamic.data();
inline size_t emu_dynamic_bytes = 256 * 1024;  // set per launch (emu_set_dynamic_smem); accesses past it abort
extern "C" __attribute__((used)) void emu_set_dynamic_smem(unsigned bytes) { emu_dynamic_bytes = bytes; }
// A 16-byte access of dynamic shared memory at p (pointers elsewhere, static __shared__ or global, are not checked).
inline void emu_check_dynamic(const void* p, const char* what) {
    const unsigned char* c = (const unsigned char*)p;
    if (c >= emu_dynamic_smem && c < emu_dynamic_smem + emu_dynamic.size() &&
        (size_t)(c - emu_dynamic_smem) + 16 > emu_dynamic_bytes) {
        std::fprintf(stderr, "emulator: %s at dynamic shared memory offset %zu, past the launch's %zu bytes\n", what,
                     (size_t)(c - emu_dynamic_smem), emu_dynamic_bytes);
        std::abort();
    }
}

// ── cp.async: queued per thread, performed at the wait that retires its group ──
struct EmuCopy { void* dst; const void* src; int bytes; };
struct EmuWgmma {
    float* d; uint64_t desc_a, desc_b; int accumulate;
    std::function<void()> form;  // set: another shape or form (the attention block below), run in place of m64n256k16
};
struct EmuQueues {
    std::vector<std::vector<EmuCopy>> groups;
    std::vector<EmuCopy> open;
    std::vector<std::vector<EmuWgmma>> wg_groups;  // wgmma: committed groups, and the one being issued
    std::vector<EmuWgmma> wg_open;
};
inline EmuQueues* emu_q = nullptr;  // the running fiber's cp.async queues
// EMU_CP_ASYNC_EAGER=1: copies land when issued instead (the other extreme: a stage refilled while something may
// still read it shows; the default, landing at the wait, shows a read before the wait).
inline const bool emu_eager = std::getenv("EMU_CP_ASYNC_EAGER") && std::getenv("EMU_CP_ASYNC_EAGER")[0] == '1';
#define emu_groups (emu_q->groups)
#define emu_open (emu_q->open)
inline void emu_do(const EmuCopy& c) {
    std::memset(c.dst, 0, 16);
    if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
}

// IEEE half → float, exactly (normal, subnormal, zero, inf, NaN).
inline float emu_f16(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 0x400), (int)e - 25);
    return __uint_as_float(__float_as_uint(v) | sign);
}

#define OS_EMU_HELPERS                                                                                         \
    OS_DEVICE uint4 load_stream16(const void* p) { return *reinterpret_cast<const uint4*>(p); }                \
    OS_DEVICE void cp_async16(void* smem, const void* gmem, int src_bytes) {                                   \
        emu_check_dynamic(smem, "cp.async");                                                                    \
        if (emu_eager) return emu_do({smem, gmem, src_bytes});                                                  \
        emu_open.push_back({smem, gmem, src_bytes});                                                            \
    }                                                                                                          \
    OS_DEVICE uint32_t smem_u32(const void* smem) { /* offsets into the dynamic buffer */                     \
        const unsigned char* c = (const unsigned char*)smem;                                                    \
        if (c < emu_dynamic_smem || c >= emu_dynamic_smem + emu_dynamic.size()) {                               \
            std::fprintf(stderr, "emulator: smem_u32 of a pointer outside dynamic shared memory\n");            \
            std::abort();                                                                                       \
        }                                                                                                       \
        return (uint32_t)(c - emu_dynamic_smem);                                                                \
    }                                                                                                          \
    OS_DEVICE void cp_async16_s(uint32_t s, const void* gmem, int src_bytes) {                                 \
        cp_async16(emu_dynamic_smem + s, gmem, src_bytes);                                                      \
    }                                                                                                          \
    OS_DEVICE void cp_async_commit() { emu_groups.push_back(std::move(emu_open)); emu_open.clear(); }           \
    template <int N>                                                                                           \
    OS_DEVICE void cp_async_wait() {                                                                           \
        while ((int)emu_groups.size() > N) {                                                                    \
            for (auto& c : emu_groups.front()) emu_do(c);                                                       \
            emu_groups.erase(emu_groups.begin());                                                               \
        }                                                                                                      \
    }                                                                                                          \
    OS_DEVICE void emu_ldmatrix(uint32_t (&r)[4], const void* smem, bool trans) {                               \
        emu_check_dynamic(smem, "ldmatrix");                                                                    \
        uint64_t a = (uint64_t)(uintptr_t)smem;                                                                 \
        emu_publish(&a, 1);                                                                                     \
        const int l = emu_lane;                                                                                 \
        for (int i = 0; i < 4; i++) {                                                                           \
            if (!trans) {                                                                                       \
                const uint16_t* row = (const uint16_t*)(uintptr_t)emu_read(8 * i + l / 4, 0);                  \
                r[i] = row[2 * (l % 4)] | ((uint32_t)row[2 * (l % 4) + 1] << 16);                               \
            } else {                                                                                            \
                const uint16_t* r0 = (const uint16_t*)(uintptr_t)emu_read(8 * i + 2 * (l % 4), 0);             \
                const uint16_t* r1 = (const uint16_t*)(uintptr_t)emu_read(8 * i + 2 * (l % 4) + 1, 0);         \
                r[i] = r0[l / 4] | ((uint32_t)r1[l / 4] << 16);                                                 \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                          \
    OS_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu_ldmatrix(r, smem, false); }          \
    OS_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emu_ldmatrix(r, smem, true); }     \
    OS_DEVICE void ldmatrix_x4_s(uint32_t (&r)[4], uint32_t s) { emu_ldmatrix(r, emu_dynamic_smem + s, false); } \
    OS_DEVICE float emu_bf(uint32_t w, int hi) { return __uint_as_float(hi ? (w & 0xffff0000u) : (w << 16)); } \
    OS_DEVICE uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) { /* one rounding: exact in double */   \
        const double lo = (double)emu_bf(a, 0) * emu_bf(b, 0) + emu_bf(c, 0);                                   \
        const double hi = (double)emu_bf(a, 1) * emu_bf(b, 1) + emu_bf(c, 1);                                   \
        return (uint32_t)emu_f2bf((float)lo) | ((uint32_t)emu_f2bf((float)hi) << 16);                          \
    }                                                                                                          \
    OS_DEVICE uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }                    \
    OS_DEVICE float2 f16x2_to_float2(uint32_t h) { return {emu_f16(h & 0xffffu), emu_f16(h >> 16)}; }       \
    OS_DEVICE void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {           \
        uint64_t mine[7] = {a[0], a[1], a[2], a[3], b0, b1, 0};                                                 \
        emu_publish(mine, 6);                                                                                   \
        float A[16][16], B[16][8];                                                                              \
        for (int l = 0; l < 32; l++) {                                                                          \
            const int g = l / 4, c = l % 4;                                                                     \
            uint32_t r[6];                                                                                      \
            for (int i = 0; i < 6; i++) r[i] = (uint32_t)emu_read(l, i);                                        \
            A[g][2 * c] = emu_bf(r[0], 0); A[g][2 * c + 1] = emu_bf(r[0], 1);                                   \
            A[g + 8][2 * c] = emu_bf(r[1], 0); A[g + 8][2 * c + 1] = emu_bf(r[1], 1);                           \
            A[g][2 * c + 8] = emu_bf(r[2], 0); A[g][2 * c + 9] = emu_bf(r[2], 1);                               \
            A[g + 8][2 * c + 8] = emu_bf(r[3], 0); A[g + 8][2 * c + 9] = emu_bf(r[3], 1);                       \
            B[2 * c][g] = emu_bf(r[4], 0); B[2 * c + 1][g] = emu_bf(r[4], 1);                                   \
            B[2 * c + 8][g] = emu_bf(r[5], 0); B[2 * c + 9][g] = emu_bf(r[5], 1);                               \
        }                                                                                                       \
        const int g = emu_lane / 4, c = emu_lane % 4;                                                           \
        for (int e = 0; e < 4; e++) {                                                                           \
            const int row = g + (e >> 1) * 8, col = 2 * c + (e & 1);                                            \
            float s = d[e];                                                                                     \
            for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];                                            \
            d[e] = s;                                                                                           \
        }                                                                                                       \
    }

// ── Hopper wgmma (m64n256k16, bf16 → f32, A and B K-major in shared memory): each thread's part is done at the
// wgmma_wait that retires its group, reading shared memory then (the latest a real one could: a stage refilled
// too early, or accumulators read before the wait, show). Descriptors as the PTX ISA defines them: start address
// (bits 0-13, 16-byte units), stride byte offset (bits 32-45: the next 8 rows), swizzle mode (bits 62-63: only
// 1 = 128-byte is modelled, its 16-byte chunk index XOR the row within 8 rows: address bits 4-6 ^= bits 7-9, on
// shared-window offsets). Accumulator fragment: warp w of the warpgroup holds rows 16w …, d[4j + e] at row
// 16w + lane/4 + 8·(e/2), column 8j + 2·(lane mod 4) + (e mod 2). ──
inline float emu_wgmma_elem(uint64_t desc, int row, int k) {
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
        std::fprintf(stderr, "emulator: wgmma descriptor %llx: only the 128-byte swizzle at base offset 0 is modelled\n",
                     (unsigned long long)desc);
        std::abort();
    }
    uint32_t a = start + (uint32_t)(row >> 3) * sbo + (uint32_t)(row & 7) * 128 + (uint32_t)k * 2;
    a ^= ((a >> 7) & 7) << 4;
    emu_check_dynamic(emu_dynamic_smem + (a & ~15u), "wgmma");
    uint16_t bits;
    std::memcpy(&bits, emu_dynamic_smem + a, 2);
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline void emu_wgmma_run(const EmuWgmma& op) {
    if (op.form) return op.form();
    const int t = threadIdx.x % 128, w = t / 32, l = t % 32;
    for (int j = 0; j < 32; j++)
        for (int e = 0; e < 4; e++) {
            const int row = 16 * w + l / 4 + 8 * (e / 2), col = 8 * j + 2 * (l % 4) + (e % 2);
            float s = 0.f;
            for (int k = 0; k < 16; k++) s += emu_wgmma_elem(op.desc_a, row, k) * emu_wgmma_elem(op.desc_b, col, k);
            op.d[4 * j + e] = op.accumulate ? op.d[4 * j + e] + s : s;
        }
}
inline void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu_q->wg_open.push_back({d, desc_a, desc_b, accumulate});
}
inline void wgmma_fence() {}
inline void wgmma_commit() { emu_q->wg_groups.push_back(std::move(emu_q->wg_open)); emu_q->wg_open.clear(); }
template <int N>
inline void wgmma_wait() {
    while ((int)emu_q->wg_groups.size() > N) {
        for (auto& op : emu_q->wg_groups.front()) emu_wgmma_run(op);
        emu_q->wg_groups.erase(emu_q->wg_groups.begin());
    }
}
inline void fence_proxy_async() {}

// ── attention_sm90.cu's wgmma forms (its own block): m64nNk16, bf16 → f32, queued like m64n256k16 above and run at
// the wait that retires them.
//   wgmma_ss_m64n128k16:     A and B K-major from descriptors (128-byte swizzle, as above).
//   wgmma_rs_m64n{64,128}k16_tb: A from four bf16x2 registers per thread (the m16n8k16 A fragment of warp w's rows
//       16w … 16w + 15: a[0] row g cols 2c, 2c+1; a[1] row g + 8; a[2], a[3] the same rows at cols + 8), B N-major
//       (imm-trans-b = 1) from a descriptor: element (n, k) at start + (n / 64)·LBO + (k / 8)·SBO + (k mod 8)·128 +
//       (n mod 64)·2 before the swizzle (LBO: bits 16-29, the next 64 columns of N). The warp's A registers are
//       gathered when issued (through the exchange, as the hardware collects them); a thread that changes its A
//       registers before the wait that retires the wgmma aborts (the PTX ISA leaves the result undefined then). ──
inline void emu_wgmma_check_desc(uint64_t desc) {
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) {
        std::fprintf(stderr, "emulator: wgmma descriptor %llx: only the 128-byte swizzle at base offset 0 is modelled\n",
                     (unsigned long long)desc);
        std::abort();
    }
}
inline float emu_wgmma_smem_bf16(uint32_t a) {  // the bf16 at shared-window offset a, after the 128-byte swizzle
    a ^= ((a >> 7) & 7) << 4;
    emu_check_dynamic(emu_dynamic_smem + (a & ~15u), "wgmma");
    uint16_t bits;
    std::memcpy(&bits, emu_dynamic_smem + a, 2);
    return __uint_as_float((uint32_t)bits << 16);
}
inline float emu_wgmma_elem_nmajor(uint64_t desc, int n, int k) {
    emu_wgmma_check_desc(desc);
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4;
    const uint32_t sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    return emu_wgmma_smem_bf16(start + (uint32_t)(n >> 6) * lbo + (uint32_t)(k >> 3) * sbo + (uint32_t)(k & 7) * 128 +
                               (uint32_t)(n & 63) * 2);
}
template <int N>
inline void emu_wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
    const int t = threadIdx.x % 128, w = t / 32, l = t % 32;
    EmuWgmma op{d, desc_a, desc_b, accumulate};
    op.form = [=] {
        for (int j = 0; j < N / 8; j++)
            for (int e = 0; e < 4; e++) {
                const int row = 16 * w + l / 4 + 8 * (e / 2), col = 8 * j + 2 * (l % 4) + (e % 2);
                float s = 0.f;
                for (int k = 0; k < 16; k++) s += emu_wgmma_elem(desc_a, row, k) * emu_wgmma_elem(desc_b, col, k);
                d[4 * j + e] = accumulate ? d[4 * j + e] + s : s;
            }
    };
    emu_q->wg_open.push_back(std::move(op));
}
template <int N, bool TRANS_B = true>
inline void emu_wgmma_rs_tb(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
    uint64_t mine[4] = {a[0], a[1], a[2], a[3]};
    emu_publish(mine, 4);
    const int l = emu_lane, g = l / 4;
    std::vector<float> A(2 * 16);  // this thread's rows g and g + 8 of its warp's 16, k = 0 … 15
    auto bf = [](uint64_t w, int hi) { return __uint_as_float(hi ? ((uint32_t)w & 0xffff0000u) : ((uint32_t)w << 16)); };
    for (int c = 0; c < 4; c++)
        for (int hi = 0; hi < 2; hi++) {
            A[0 * 16 + 2 * c + hi] = bf(emu_read(4 * g + c, 0), hi);
            A[1 * 16 + 2 * c + hi] = bf(emu_read(4 * g + c, 1), hi);
            A[0 * 16 + 2 * c + 8 + hi] = bf(emu_read(4 * g + c, 2), hi);
            A[1 * 16 + 2 * c + 8 + hi] = bf(emu_read(4 * g + c, 3), hi);
        }
    const uint32_t* regs = a;
    const uint32_t issued[4] = {a[0], a[1], a[2], a[3]};
    EmuWgmma op{d, 0, desc_b, 1};
    op.form = [=] {
        for (int i = 0; i < 4; i++)
            if (regs[i] != issued[i]) {
                std::fprintf(stderr, "emulator: a wgmma's A registers changed before the wait that retires it\n");
                std::abort();
            }
        for (int j = 0; j < N / 8; j++)
            for (int e = 0; e < 4; e++) {
                const int row = e / 2, col = 8 * j + 2 * (l % 4) + (e % 2);
                float s = 0.f;
                for (int k = 0; k < 16; k++)
                    s += A[row * 16 + k] * (TRANS_B ? emu_wgmma_elem_nmajor(desc_b, col, k) : emu_wgmma_elem(desc_b, col, k));
                d[4 * j + e] += s;
            }
    };
    emu_q->wg_open.push_back(std::move(op));
}
inline void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    emu_wgmma_ss<128>(d, desc_a, desc_b, accumulate);
}
inline void wgmma_rs_m64n128k16_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) { emu_wgmma_rs_tb<128>(d, a, desc_b); }
inline void wgmma_rs_m64n64k16_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) { emu_wgmma_rs_tb<64>(d, a, desc_b); }
// gemm_sm90_tma.cu's int8 form: the same A from registers, B K-major (imm-trans-b = 0: element (n, k) as wgmma_m64n256k16's).
inline void wgmma_rs_m64n256k16(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b) {
    emu_wgmma_rs_tb<256, false>(d, a, desc_b);
}
inline void wgmma_rs_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    emu_wgmma_rs_tb<128, false>(d, a, desc_b);
}
// ── Hopper TMA and mbarriers (gemm_sm90_tma.cu; this block is the TMA GEMM's, separate from the wgmma forms) ──
// mbarrier: a side table keyed by the barrier's shared-window offset, (re)set by mbar_init: the arrivals a phase
// expects and still waits for, its transaction count (bytes armed by arrive.expect_tx minus bytes of bulk copies
// issued), its phase bit, and the bulk copies that complete it. A phase completes when no arrival is pending and the
// count is 0; its copies land then, all at once (the latest the hardware could land them: a consumer that reads a
// stage without waiting for its phase sees the 0xff garbage), and try_wait.parity(P) is true once the phase bit
// differs from P (a fresh barrier's phase "before 0", parity 1, counts as complete). With EMU_CP_ASYNC_EAGER=1 a copy
// lands when issued instead (a stage refilled while a wgmma may still read it shows). A wait that fails yields, and
// so does an arrival that completes a phase (its waiters, e.g. a producer refilling the stage, run at once: a stage
// released before the wgmma reading it retired shows). Two million failed waits with no arrival or copy between them
// is a deadlock (a phase that can never complete), reported at once.
// cp.async.bulk.tensor.2d: the box (box_rows × box_cols elements from column x, row y) of the map, written row after
// row of 128 bytes with the hardware's 128-byte swizzle (16-byte chunk index XOR shared-address bits 7-9, the same
// rule the wgmma model reads with) and zeros for every element outside the matrix (negative coordinates too); the
// transaction count drops by the whole box, as the hardware counts it. The map is the emulator's own layout of the
// 128 bytes (EmuTensorMap, written by plugin.py's stand-in for cuTensorMapEncodeTiled), marked by a magic word.
// setmaxnreg is a no-op, fence.proxy.async (above) too: one memory, no proxies.
#define __grid_constant__
struct EmuTensorMap {
    uint64_t magic, address, cols, rows, pitch;  // cols: the contiguous dimension; pitch: bytes between rows
    uint32_t box_cols, box_rows, elem_bytes, swizzle_bytes;
};
constexpr uint64_t EMU_TENSOR_MAP_MAGIC = 0x50414d54554d45ull;  // "EMUTMAP"
struct EmuBulkCopy { uint32_t dst; EmuTensorMap map; int x, y; const void* src = nullptr; int bytes = 0; };  // src: linear
struct EmuMbar {
    int expected = 0, pending = 0, phase = 0;
    long long tx = 0;
    std::vector<EmuBulkCopy> copies;
};
inline std::vector<std::pair<uint32_t, EmuMbar>> emu_mbars;  // few per block: a linear search
inline long emu_mbar_idle_waits = 0;  // failed waits since the last arrival or copy
inline EmuMbar& emu_mbar(uint32_t bar, const char* what) {
    for (auto& [addr, m] : emu_mbars)
        if (addr == bar) return m;
    std::fprintf(stderr, "emulator: %s on shared offset %u, which no mbar_init made a barrier\n", what, bar);
    std::abort();
}
inline void emu_bulk_land(const EmuBulkCopy& c) {
    if (c.src) {  // cp.async.bulk (linear): bytes from src, 16 at a time, each inside the launch's shared memory
        for (int o = 0; o < c.bytes; o += 16) emu_check_dynamic(emu_dynamic_smem + c.dst + o, "cp.async.bulk");
        std::memcpy(emu_dynamic_smem + c.dst, c.src, c.bytes);
        return;
    }
    const EmuTensorMap& m = c.map;
    for (uint32_t r = 0; r < m.box_rows; r++)
        for (uint32_t e = 0; e < m.box_cols; e++) {
            uint32_t o = c.dst + (r * m.box_cols + e) * m.elem_bytes;
            if (m.swizzle_bytes == 128) o ^= ((o >> 7) & 7) << 4;
            emu_check_dynamic(emu_dynamic_smem + (o & ~15u), "cp.async.bulk.tensor");
            const long long col = (long long)c.x + e, row = (long long)c.y + r;
            unsigned char* dst = emu_dynamic_smem + o;
            if (col < 0 || row < 0 || col >= (long long)m.cols || row >= (long long)m.rows)
                std::memset(dst, 0, m.elem_bytes);
            else
                std::memcpy(dst, (const unsigned char*)(uintptr_t)m.address + row * m.pitch + col * m.elem_bytes,
                            m.elem_bytes);
        }
}
inline bool emu_mbar_settle(EmuMbar& m) {  // true when the phase completed
    emu_mbar_idle_waits = 0;
    if (m.pending > 0 || m.tx != 0) return false;
    for (const auto& c : m.copies) emu_bulk_land(c);
    m.copies.clear();
    m.phase ^= 1;
    m.pending = m.expected;
    return true;
}
inline void mbar_init(uint32_t bar, int count) {
    for (auto& [addr, m] : emu_mbars)
        if (addr == bar) { m = EmuMbar{count, count}; return; }
    emu_mbars.push_back({bar, EmuMbar{count, count}});
}
inline void mbar_arrive(uint32_t bar) {
    EmuMbar& m = emu_mbar(bar, "mbarrier.arrive");
    if (--m.pending < 0) { std::fprintf(stderr, "emulator: more arrivals than the mbarrier expects\n"); std::abort(); }
    if (emu_mbar_settle(m)) emu_yield();
}
inline void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
    emu_mbar(bar, "mbarrier.arrive.expect_tx").tx += bytes;
    mbar_arrive(bar);
}
inline bool mbar_try_wait(uint32_t bar, int parity) { return emu_mbar(bar, "mbarrier.try_wait").phase != (parity & 1); }
inline void mbar_wait(uint32_t bar, int parity) {
    while (!mbar_try_wait(bar, parity)) {
        if (++emu_mbar_idle_waits > 2000000) {
            std::fprintf(stderr, "emulator: mbarrier deadlock (a phase no arrival or copy can complete)\n");
            std::abort();
        }
        emu_yield();
    }
}
inline void tma_load_2d(uint32_t dst, const void* map_bytes, uint32_t bar, int x, int y) {
    EmuBulkCopy c{dst, {}, x, y};
    std::memcpy(&c.map, map_bytes, sizeof(EmuTensorMap));
    if (c.map.magic != EMU_TENSOR_MAP_MAGIC || c.map.box_cols * c.map.elem_bytes != c.map.swizzle_bytes ||
        dst % 128) {
        std::fprintf(stderr, "emulator: cp.async.bulk.tensor with a map the stand-in encoder did not make, a box "
                             "row other than the swizzle span, or a destination not 128-byte aligned\n");
        std::abort();
    }
    EmuMbar& m = emu_mbar(bar, "cp.async.bulk.tensor");
    if (emu_eager) emu_bulk_land(c);
    else m.copies.push_back(c);
    m.tx -= (long long)c.map.box_rows * c.map.box_cols * c.map.elem_bytes;
    emu_mbar_settle(m);
}
// cp.async.bulk (linear, gemm_quant.cu's int8 rings): lands with its barrier's phase, like the tensor copies.
inline void bulk_copy_g2s(uint32_t dst, const void* src, int bytes, uint32_t bar) {
    if (bytes <= 0 || bytes % 16 || dst % 16 || (uintptr_t)src % 16) {
        std::fprintf(stderr, "emulator: cp.async.bulk of %d bytes to shared offset %u from %p (16-byte multiples)\n",
                     bytes, dst, src);
        std::abort();
    }
    EmuBulkCopy c{dst, {}, 0, 0, src, bytes};
    EmuMbar& m = emu_mbar(bar, "cp.async.bulk");
    if (emu_eager) emu_bulk_land(c);
    else m.copies.push_back(c);
    m.tx -= bytes;
    emu_mbar_settle(m);
}
inline void tma_prefetch_map(const void*) {}
template <int REGS> inline void setmaxnreg_dec() {}
template <int REGS> inline void setmaxnreg_inc() {}
// ── end of the TMA / mbarrier block ──

// ── the launcher the Python side calls through ctypes ──

extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

struct EmuFiber {
    void* sp = nullptr;
    std::vector<char> stack;
    bool done = false;
    dim3 tid;
    int lane = 0, warp = 0;
    EmuQueues q;
};
inline void* emu_sched_sp = nullptr;
inline EmuFiber* emu_current = nullptr;
inline std::function<void()>* emu_body = nullptr;

inline void emu_yield() { emu_switch(&emu_current->sp, emu_sched_sp); }

inline void emu_fiber_entry() {
    (*emu_body)();
    if (!emu_q->wg_open.empty() || !emu_q->wg_groups.empty()) {
        std::fprintf(stderr, "emulator: a thread exited with wgmma not retired by a wait\n");
        std::abort();
    }
    emu_groups.clear();
    emu_open.clear();
    emu_current->done = true;
    emu_block->warps[emu_warp].bar.arrive_and_drop();
    emu_block->bar.arrive_and_drop();
    emu_switch(&emu_current->sp, emu_sched_sp);
    std::abort();  // never resumed
}

inline void emu_launch(std::function<void()> body, dim3 grid, dim3 block) {
    gridDim = grid;
    blockDim = block;
    const int threads = block.x * block.y * block.z, nwarps = (threads + 31) / 32;
    constexpr size_t STACK = 128 * 1024;
    std::vector<EmuFiber> fibers(threads);
    for (auto& f : fibers) f.stack.resize(STACK);
    emu_body = &body;
    const long total = (long)grid.x * grid.y * grid.z;
    for (long i = 0; i < total; i++) {
        blockIdx = {(unsigned)(i % grid.x), (unsigned)((i / grid.x) % grid.y), (unsigned)(i / ((long)grid.x * grid.y))};
        EmuBlock blk;
        blk.bar.expected = threads;
        blk.warps.assign(nwarps, EmuWarp{});
        for (int w = 0; w < nwarps; w++) blk.warps[w].bar.expected = std::min(32, threads - 32 * w);
        std::memset(emu_dynamic_smem, 0xff, 256 * 1024);  // uninitialised shared memory: NaN-ish garbage
        emu_block = &blk;
        for (int t = 0; t < threads; t++) {
            EmuFiber& f = fibers[t];
            f.done = false;
            f.tid = {(unsigned)(t % block.x), (unsigned)((t / block.x) % block.y), (unsigned)(t / (block.x * block.y))};
            f.lane = t % 32;
            f.warp = t / 32;
            f.q.groups.clear();
            f.q.open.clear();
            f.q.wg_groups.clear();
            f.q.wg_open.clear();
            uintptr_t top = ((uintptr_t)f.stack.data() + STACK) & ~(uintptr_t)15;
            void** sp = (void**)top;
            *--sp = nullptr;  // a fake return address: the entry sees rsp % 16 == 8, as after a call
            *--sp = (void*)&emu_fiber_entry;
            for (int r = 0; r < 6; r++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
            f.sp = sp;
        }
        int alive = threads;
        long idle_rounds = 0;
        while (alive) {
            for (auto& f : fibers) {
                if (f.done) continue;
                emu_current = &f;
                threadIdx = f.tid;
                emu_lane = f.lane;
                emu_warp = f.warp;
                emu_q = &f.q;
                emu_switch(&emu_sched_sp, f.sp);
                if (f.done) alive--;
            }
            if (++idle_rounds > 100000000) { std::fprintf(stderr, "emulator: deadlock?\n"); std::abort(); }
        }
    }
}
