// Embedding gather: the first step of the forward pass, h[t] = embedding[ids[t]].
#include "common.cuh"

// Grid: (T) blocks, one per token. Block: any multiple of 32 threads, striding over D in 8-element chunks.
// table [V, D] bf16; ids [T] int32 read from device memory (a captured decode step reads the current token);
// h [T, D] f32 residual stream; h_bf16 [T, D] bf16 copy for the next GEMM, or null. Needs D % 8 == 0.
extern "C" __global__ void embedding_gather_bf16(const bf16* __restrict__ table, const int* __restrict__ ids,
                                                 float* __restrict__ h, bf16* __restrict__ h_bf16, int D, int V) {
    const int t = blockIdx.x;
    const int id = min(max(ids[t], 0), V - 1);  // the host validates ids; clamping keeps a bad one in bounds
    const uint4* row = reinterpret_cast<const uint4*>(table + (size_t)id * D);
    for (int v = threadIdx.x; v < D / 8; v += blockDim.x) {
        const uint4 w = row[v];
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        float* out = h + (size_t)t * D + v * 8;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            out[2 * i] = bf16_lo(words[i]);
            out[2 * i + 1] = bf16_hi(words[i]);
        }
        if (h_bf16) reinterpret_cast<uint4*>(h_bf16 + (size_t)t * D)[v] = w;
    }
}

// As above for int8 engine files: table [V, D] int8 with one f32 scale per row. Needs D % 16 == 0.
extern "C" __global__ void embedding_gather_int8(const int8_t* __restrict__ table, const float* __restrict__ scales,
                                                 const int* __restrict__ ids, float* __restrict__ h,
                                                 bf16* __restrict__ h_bf16, int D, int V) {
    const int t = blockIdx.x;
    const int id = min(max(ids[t], 0), V - 1);
    const float s = scales[id];
    const int8_t* row = table + (size_t)id * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float x = s * static_cast<float>(row[i]);
        h[(size_t)t * D + i] = x;
        if (h_bf16) h_bf16[(size_t)t * D + i] = __float2bfloat16(x);
    }
}
