// Embedding gather: the first step of the forward pass, h[t] = embedding[ids[t]].
#include "common.cuh"

// Grid: (T) blocks, one per token. Block: any multiple of 32 threads, striding over D in 8-element chunks.
// table [V, D] bf16; ids [T] int32 read from device memory (a captured decode step reads the current token);
// h [T, D] f32 residual stream; h_bf16 [T, D] bf16 copy for the next GEMM, or null. Needs D % 8 == 0.
extern "C" __global__ void embedding_gather_bf16(const bf16* __restrict__ table, const int* __restrict__ ids,
                                                 float* __restrict__ h, bf16* __restrict__ h_bf16, int D, int V) {
    grid_dependency_sync();
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
    grid_dependency_sync();
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

// ── the step's token ids and the per-sequence "seen" sets (repetition penalty) ──────────────────────
// seen [states, seen_words] uint32 bitsets, seen_words = ceil(V / 32): bit id % 32 of word id / 32 is set once
// token id has been part of that state's sequence (prompt or generated). Ids outside [0, 32·seen_words) and
// negative states (padding rows) mark nothing.
OS_DEVICE void mark_one(unsigned* __restrict__ seen, int seen_words, int state, int id) {
    if (state < 0 || id < 0 || id >= 32 * seen_words) return;
    atomicOr(&seen[(size_t)state * seen_words + (id >> 5)], 1u << (id & 31));
}

// Grid: (ceil(T / 256)); block: 256 threads, one row each.
// ids [T] int32, changed in place: a negative id is a decode row fed with its sequence's previous sample,
// ids[t] = last_sampled[token_state[t]] (no host round trip between steps); then the id is marked seen.
// last_sampled [states] int32 (written by sample_rows); token_state [T] int32: the row's sequence state.
extern "C" __global__ void prepare_tokens(int* __restrict__ ids, const int* __restrict__ last_sampled,
                                          const int* __restrict__ token_state, unsigned* __restrict__ seen,
                                          int seen_words, int T) {
    grid_dependency_sync();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int state = token_state[t];
    int id = ids[t];
    if (id < 0 && state >= 0) {
        id = last_sampled[state];
        ids[t] = id;
    }
    mark_one(seen, seen_words, state, id);
}

// Grid: (ceil(n / 256)); block: 256 threads, one id each. ids [n], states [n] int32: marks ids[i] seen for
// states[i] (a history reused from the prefix cache, which never went through prepare_tokens).
extern "C" __global__ void mark_seen(const int* __restrict__ ids, const int* __restrict__ states,
                                     unsigned* __restrict__ seen, int seen_words, int n) {
    grid_dependency_sync();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) mark_one(seen, seen_words, states[i], ids[i]);
}

// Grid: (ceil(n / 256)); block: 256 threads, one id each. ids [n], states [n] int32: counts[states[i]·V + ids[i]] += 1
// in counts [states, V] int32 (the presence/frequency penalties' generated-token counts), for a sequence whose
// generated tokens come back as history (recomputed after preemption) instead of being sampled again.
extern "C" __global__ void count_tokens(const int* __restrict__ ids, const int* __restrict__ states,
                                        int* __restrict__ counts, int V, int n) {
    grid_dependency_sync();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int state = states[i], id = ids[i];
    if (state >= 0 && id >= 0 && id < V) atomicAdd(&counts[(size_t)state * V + id], 1);
}
