// Paged KV cache maintenance: copy-on-write of whole blocks (a forked sequence writes into a shared last block).
#include "common.cuh"

constexpr int COPY_THREADS = 256;

// Grid: (n_pairs, planes); block: 256 threads, 16 bytes each per step.
// pool: the whole cache, planes × [num_blocks, Hkv, 16, d] bf16 (plane p = layer p / 2, K for even p, V for odd),
// plane p at pool + p·plane_elems; pairs [n_pairs, 2] int32 (src, dst) physical block ids; block_elems = Hkv·16·d
// (a multiple of 8). CTA (i, p) copies block pairs[i][0] to block pairs[i][1] in plane p.
extern "C" __global__ void __launch_bounds__(COPY_THREADS)
    copy_blocks(bf16* __restrict__ pool, const int* __restrict__ pairs, int n_pairs, long long plane_elems, int planes,
                int block_elems) {
    grid_dependency_sync();
    if ((int)blockIdx.x >= n_pairs || (int)blockIdx.y >= planes) return;
    const int src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    bf16* plane = pool + blockIdx.y * plane_elems;
    const uint4* from = reinterpret_cast<const uint4*>(plane + (size_t)src * block_elems);
    uint4* to = reinterpret_cast<uint4*>(plane + (size_t)dst * block_elems);
    for (int i = threadIdx.x; i < block_elems / 8; i += COPY_THREADS) to[i] = from[i];
}
