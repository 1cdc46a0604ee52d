// Helpers shared by every kernel family: bf16 unpacking, warp/block reductions, cp.async, mma.sync.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define OS_DEVICE __device__ __forceinline__

typedef __nv_bfloat16 bf16;

// Programmatic dependent launch (sm_90+). A decode graph's kernel→kernel edges are programmatic
// (runtime/cuda/driver.py CudaGraph): the next grid may launch while this one still runs, so its CTAs are resident when
// ours drain instead of after our completion plus a launch gap. The trigger lets the next grid launch once every CTA
// of ours has started; the wait holds until the previous grid has completed and its writes are visible. Every kernel
// calls grid_dependency_sync() first, before any early return: a CTA that left without waiting could let this grid
// complete ahead of its predecessor, and the next grid would then read unfinished data. A projection instead issues
// its first weight copies before the wait (model weights are never written inside a graph), so they stream while its
// predecessor drains, and waits before it reads or writes anything else; the decode projections trigger only after
// their main loop (a grid triggered early holds slots for its successor to wait in: docs/QUANT_KERNELS.md). Outside
// such a graph (and before sm_90) both are free.
OS_DEVICE void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
OS_DEVICE void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
OS_DEVICE void grid_dependency_sync() {
    grid_dependents_launch();
    grid_dependency_wait();
}

// The paged KV cache: a block holds KV_BLOCK consecutive positions of one sequence. A pool plane is
// [num_blocks, Hkv, KV_BLOCK, d] bf16 and a cache slot is block·KV_BLOCK + offset (runtime/cuda/kernels.py mirrors it).
constexpr int KV_BLOCK = 16;
constexpr int KV_BLOCK_SHIFT = 4;  // log2(KV_BLOCK)

// Pool address of (physical block, kv head, offset in the block, column 0) in one plane.
OS_DEVICE size_t kv_offset(int block, int head, int Hkv, int offset, int D) {
    return (((size_t)block * Hkv + head) * KV_BLOCK + offset) * D;
}

// ── bf16 unpacking ───────────────────────────────────────────────────────────────────────────
// A bf16 is the high half of a float, so widening is a shift (element 0 is the low half of a word).
OS_DEVICE float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
OS_DEVICE float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

OS_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo sits in the low half
    return *reinterpret_cast<uint32_t*>(&v);
}

// Streaming 16-byte load for weights: read once per step, so keep it out of L1.
OS_DEVICE uint4 load_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// ── reductions ────────────────────────────────────────────────────────────────────────────────
OS_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

OS_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Max (or sum) over the four lanes 4g … 4g+3 that share a row of an mma/wgmma accumulator (attention's softmax).
OS_DEVICE float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
OS_DEVICE float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Online-softmax rescale point: the running max, or 0 while a row has seen only masked keys (−inf − −inf is NaN).
OS_DEVICE float safe_max(float m) { return m == -INFINITY ? 0.f : m; }

// Sum over the whole block; `scratch` holds 32 floats. Safe to call repeatedly (syncs before reuse).
OS_DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

OS_DEVICE float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// ── async copies and tensor-core instructions (sm_80+) ─────────────────────────────────────────
// 16-byte global→shared copy; src_bytes 0 fills the destination with zeros (out-of-range rows).
OS_DEVICE void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
OS_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
OS_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Four 8×8 b16 matrices from shared memory; lanes 8i…8i+7 give the row addresses of matrix i.
OS_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
OS_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// The same two copies on 32-bit shared-window addresses, for kernels that keep per-thread offsets into dynamic shared
// memory instead of 64-bit pointers (smem_u32 of a pointer into it; the swizzle of a step is then one XOR).
OS_DEVICE uint32_t smem_u32(const void* smem) { return static_cast<uint32_t>(__cvta_generic_to_shared(smem)); }
OS_DEVICE void cp_async16_s(uint32_t s, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
OS_DEVICE void ldmatrix_x4_s(uint32_t (&r)[4], uint32_t s) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// D = A·B + D for one 16×8×16 tile: A row-major 16×16 bf16 (4 regs), B column-major 16×8 (2 regs), f32 accumulators.
// Fragment layout (g = lane/4, c = lane%4): A {(g,2c),(g+8,2c),(g,2c+8),(g+8,2c+8)}, B {(k=2c,n=g),(k=2c+8,n=g)},
// D {(g,2c..2c+1),(g+8,2c..2c+1)}.
OS_DEVICE void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two bf16 lanes at once, a·b + c rounded once per lane (sm_80+): the int4 kernels' q − z (exact) in one instruction.
OS_DEVICE uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// (a & b) | c in one instruction (nvcc splits it in two when b and c are both immediates): int4 dequantization.
OS_DEVICE uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Two float16 (low half first) widened to f32, exactly: the int4 kernels' group scales.
OS_DEVICE float2 f16x2_to_float2(uint32_t h) {
    float lo, hi;
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}" : "=f"(lo), "=f"(hi) : "r"(h));
    return make_float2(lo, hi);
}

// ── Hopper (sm_90) mbarriers and bulk copies ────────────────────────────────────────────────────
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// mbarriers in shared memory (8 bytes each), addressed by their shared-window offset.
OS_DEVICE void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
OS_DEVICE void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Arrive and add `bytes` to the transaction count the phase waits for (the bulk copies' complete_tx subtract them).
OS_DEVICE void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Until the phase of parity `parity` completed (a fresh barrier counts its phase "before 0", parity 1, as done).
OS_DEVICE void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\nwait_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned) by the copy engine, completing
// `bar`'s transactions.
OS_DEVICE void bulk_copy_g2s(uint32_t dst, const void* src, int bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
// Generic-proxy writes to shared memory (an mbarrier's initialisation, cp.async's landed copies) made visible to
// the async proxy (the copy engine's complete_tx, wgmma's operand reads).
OS_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
#endif

// ── Hopper (sm_90a) warpgroup MMA: asynchronous, operands from shared memory through matrix descriptors ──
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The f32 accumulators of an m64n128 (64 per thread) and an m64n256 wgmma (128): the asm operand lists "%0, … %63"
// and "%0, … %127", and their read-write constraints (the forms below, gemm_sm90_tma.cu's register-A form and
// attention_sm90.cu's).
#define WGMMA_D64                                                                                                   \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                      \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                            \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                            \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WGMMA_D128                                                                                                  \
    WGMMA_D64 ", "                                                                                                  \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                            \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                            \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define WGMMA_D8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                       "+f"(d[i + 6]), "+f"(d[i + 7])
#define WGMMA_D32(d, i) WGMMA_D8(d, i), WGMMA_D8(d, i + 8), WGMMA_D8(d, i + 16), WGMMA_D8(d, i + 24)
#define WGMMA_D64_OPERANDS(d) WGMMA_D32(d, 0), WGMMA_D32(d, 32)
#define WGMMA_D128_OPERANDS(d) WGMMA_D64_OPERANDS(d), WGMMA_D32(d, 64), WGMMA_D32(d, 96)

// D[64 × 256] (+)= A[64 × 16]·B[256 × 16]ᵀ for one warpgroup (f32 accumulators, 128 per thread), A and B K-major
// bf16 in shared memory, given by their matrix descriptors; accumulate = 0 overwrites D. Asynchronous: the result is
// there after wgmma_commit() and a wgmma_wait<N>() that retires its group.
OS_DEVICE void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{"
        WGMMA_D128 "}, "
        "%128, %129, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_D128_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// The same for D[64 × 128] (64 accumulators per thread).
OS_DEVICE void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{" WGMMA_D64 "}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_D64_OPERANDS(d)
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

OS_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
OS_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
OS_DEVICE void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

#endif

OS_DEVICE float silu(float x) { return x / (1.f + __expf(-x)); }

// Two int8 weights, bytes 0 and 2 of w, → a bf16 pair, exactly and without the conversion unit (an eighth of the
// ALU rate, which held the int8 kernels at two thirds of bandwidth): for q = l − 128·s (l its low 7 bits, s its
// sign bit), bf16 0x4300 | l is 128 + l and 0xC300 | s << 7 is −128 − 128·s, whose sum is q (|q| ≤ 128: exact);
// the product by bf16 1.0 (0x3F80) is exact too. The int8 kernels of gemm_quant.cu and gemm_sm90_tma.cu.
OS_DEVICE uint32_t q8_pair(uint32_t w) {
    return fma_bf16x2(and_or(w, 0x007F007Fu, 0x43004300u), 0x3F803F80u, and_or(w, 0x00800080u, 0xC300C300u));
}

// Σ_p parts[p·part_stride + i] in a fixed order (p = 0, 1, …): split-K partial sums, summed the same way on every run.
OS_DEVICE float4 sum_parts4(const float* __restrict__ parts, int n_parts, long long part_stride, size_t i) {
    float4 acc = *reinterpret_cast<const float4*>(parts + i);
    for (int p = 1; p < n_parts; p++) {
        const float4 v = *reinterpret_cast<const float4*>(parts + p * part_stride + i);
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
    }
    return acc;
}
OS_DEVICE void add4(float4& acc, float4 v) {
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
}
OS_DEVICE float4 scale4(float4 x, float r, float4 w) {  // x·r·w, the norms' product order
    return make_float4(x.x * r * w.x, x.y * r * w.y, x.z * r * w.z, x.w * r * w.w);
}
OS_DEVICE float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// Quads i = threadIdx.x + k·THREADS (k < ITEMS, i < quads) of a row given as n_parts partials, summed in the order
// p = 0, 1, … as sum_parts4 does, into out[k] (zeros past the row): the part loop outermost, so the loads of all of a
// thread's quads of one part are in flight together.
template <int ITEMS, int THREADS>
OS_DEVICE void load_quads(float4 (&out)[ITEMS], const float* __restrict__ row, int n_parts, long long part_stride,
                          int quads) {
#pragma unroll
    for (int k = 0; k < ITEMS; k++) {
        const int i = threadIdx.x + k * THREADS;
        out[k] = i < quads ? reinterpret_cast<const float4*>(row)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int p = 1; p < n_parts; p++) {
        const float4* part = reinterpret_cast<const float4*>(row + p * part_stride);
#pragma unroll
        for (int k = 0; k < ITEMS; k++) {
            const int i = threadIdx.x + k * THREADS;
            if (i < quads) add4(out[k], part[i]);
        }
    }
}
OS_DEVICE float sum_parts(const float* __restrict__ parts, int n_parts, long long part_stride, size_t i) {
    float acc = parts[i];
    for (int p = 1; p < n_parts; p++) acc += parts[p * part_stride + i];
    return acc;
}
