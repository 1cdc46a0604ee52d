// Choosing the next token on the GPU, so that only its id crosses to the host. The rules are runtime/sampler.py's:
// repetition penalty on the distinct ids seen; greedy (temperature 0): argmax, lowest id on ties; otherwise
// logits / temperature, top-k (ties with the k-th stay), softmax, top-p (the smallest most-likely set reaching
// p of the mass, ties at its edge stay), then one inverse-CDF draw with the host's uniform u: walking the kept ids
// in ascending order, the first whose running sum exceeds u·(their sum). f32 sums: a draw right at a boundary may
// differ from NumPy's f64.
//
// One block per row of a [R, V] logits matrix, each row with its own parameters (sample_rows).
//
// How, in one block: the first 8-bit pass of a radix selection over the whole vocabulary finds the byte of the
// top-k (or top-p) threshold; the logits at or above that byte are few for any peaked distribution, and are
// gathered in id order into shared memory, sorted there, and both thresholds and the draw come from that list.
// When they are too many (a very flat distribution, a large k), the radix selection runs all four passes over
// the whole vocabulary instead, and the draw walks it.
#include "common.cuh"

constexpr float LOG2E_F = 1.4426950408889634f;
constexpr int SAMPLE_THREADS = 1024;
constexpr int TOP_LOGPROBS = 20;  // row_logprobs: the most alternatives a row may ask for (OpenAI's limit)
constexpr int SAMPLE_NAN = -1;    // sample_rows' token for a row whose real logits hold NaN (an error, not a token)
constexpr int SAMPLE_NO_MASS = -2;  // … whose real logits are all −inf

// exp((l − max)/temperature) as exp2((l − m)·inv_temp), exact at the maximum: 1 there even when m is +inf (a tiny
// repetition penalty overflowed a seen logit) or inv_temp is +inf (a subnormal temperature), where the product
// would be NaN; 0 for everything below the maximum in those cases (sampler.py's candidate_probabilities).
OS_DEVICE float prob_weight(float l, float m, float inv_temp) { return l == m ? 1.f : exp2f((l - m) * inv_temp); }
constexpr int CANDIDATES = 4096;  // the shared-memory list's capacity (a power of two, for the bitonic sort)

// Float → uint32 whose unsigned order is the float order.
OS_DEVICE uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Warp-wide argmax of (value, index), lowest index winning ties; every lane ends with the winner.
OS_DEVICE void warp_argmax(float& v, int& idx) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

// Block-wide argmax of (value, index), lowest index winning ties. `sv`/`si` hold 32 entries.
OS_DEVICE int block_argmax(float v, int idx, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(v, idx);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
        idx = lane < (int)(blockDim.x >> 5) ? si[lane] : 0x7fffffff;
        warp_argmax(v, idx);
        if (lane == 0) si[0] = idx;
    }
    __syncthreads();
    return si[0];
}

// Inclusive prefix sum over the block (one value per thread, in thread order); `buf` holds blockDim.x floats.
OS_DEVICE float block_scan(float v, float* buf) {
    __syncthreads();  // a previous scan's results may still be being read
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {  // Hillis–Steele
        const float add = (int)threadIdx.x >= o ? buf[threadIdx.x - o] : 0.f;
        __syncthreads();
        buf[threadIdx.x] += add;
        __syncthreads();
    }
    return buf[threadIdx.x];
}

// ── radix selection over the whole vocabulary ─────────────────────────────────────────────────────
struct SelectState {
    uint32_t prefix;
    float above;  // weight of keys whose chosen digits are greater than the prefix's
};

// One 256-bin histogram per warp (no two warps ever add to the same word), summed into `total` before each scan.
struct SelectScratch {
    float warp_hist[SAMPLE_THREADS / 32][256];
    float total[256];
    SelectState state;
};

// The gathered candidates: logits and ids in ascending id order, and their positions sorted by logit.
struct CandidateList {
    float logit[CANDIDATES];
    int id[CANDIDATES];
    unsigned short by_logit[CANDIDATES];  // list positions, largest logit first (ties: lower id first)
};

union SampleScratch {
    SelectScratch select;
    CandidateList list;
};

// Radix select, 8 bits a pass from the top down to `last_shift`: the largest key t (its bits below last_shift
// zero) with Σ weight(i) over {key_i ≥ t, key_i ≥ floor} ≥ target. weight: 1 for a count (top-k), the
// unnormalised probability exp((l − max)/temperature) for a mass (top-p).
template <bool MASS>
OS_DEVICE uint32_t select_threshold(const float* __restrict__ logits, int n, uint32_t floor, float target, float m,
                                    float inv_temp, int last_shift, SelectScratch& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* hist = sm.warp_hist[warp];
    if (threadIdx.x == 0) sm.state = {0u, 0.f};
    for (int shift = 24; shift >= last_shift; shift -= 8) {
        const uint32_t high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        for (int i = lane; i < 256; i += 32) hist[i] = 0.f;
        __syncthreads();  // also publishes the state the last pass chose
        const uint32_t prefix = sm.state.prefix;
        for (int base = 0; base < n; base += blockDim.x) {  // whole warps step together: they vote below
            const int i = base + threadIdx.x;
            int bin = -1;
            float weight = 0.f;
            if (i < n) {
                const float l = logits[i];
                const uint32_t key = order_key(l);
                if (key >= floor && (key & high) == prefix) {
                    bin = (key >> shift) & 255u;
                    weight = MASS ? prob_weight(l, m, inv_temp) : 1.f;
                }
            }
            // Neighbouring logits often share a bin (the first pass sees sign and exponent only): one add per
            // warp when all agree, else each lane adds to its own warp's histogram.
            const int first = __shfl_sync(0xffffffffu, bin, 0);
            if (__all_sync(0xffffffffu, bin == first)) {
                const float total = warp_sum(weight);
                if (lane == 0 && first >= 0) atomicAdd(&hist[first], total);
            } else if (bin >= 0) {
                atomicAdd(&hist[bin], weight);
            }
        }
        __syncthreads();
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            float t = 0.f;
#pragma unroll 8
            for (int w = 0; w < SAMPLE_THREADS / 32; w++) t += sm.warp_hist[w][b];
            sm.total[b] = t;
        }
        __syncthreads();
        if (warp == 0) {
            // Lane j owns bins 255 − 8j … 248 − 8j, scanned from the top.
            float local[8], sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                local[j] = sm.total[255 - 8 * lane - j];
                sum += local[j];
            }
            float incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float t = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += t;
            }
            const float above = sm.state.above, before = incl - sum;
            const unsigned hit = __ballot_sync(0xffffffffu, above + incl >= target);
            // Rounding can leave the target unreached: then take the lowest bin (keeps more, never fewer).
            const int owner = hit ? __ffs(hit) - 1 : 31;
            if (lane == owner) {
                int bin = 248 - 8 * lane;
                float acc = above + before, new_above = acc;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    if (acc + local[j] >= target || j == 7) {
                        bin = 255 - 8 * lane - j;
                        new_above = acc;
                        break;
                    }
                    acc += local[j];
                }
                sm.state.prefix = prefix | ((uint32_t)bin << shift);
                sm.state.above = new_above;
            }
        }
    }
    __syncthreads();
    const uint32_t result = sm.state.prefix;
    __syncthreads();  // everyone has read it before the scratch is reused
    return result;
}

// exp((l − max)/temperature) for a kept logit (key ≥ floor), else 0.
OS_DEVICE float kept_probability(float l, uint32_t floor, float m, float inv_temp) {
    return order_key(l) >= floor ? prob_weight(l, m, inv_temp) : 0.f;
}

// logits[i … i+3] (i % 4 == 0) with one 16-byte load when all four are below `end` and the row is 16-byte aligned
// (a row of an odd-width logits matrix is not); past `end`: −inf (never kept).
OS_DEVICE bool aligned16(const float* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
OS_DEVICE void load_four(const float* __restrict__ logits, int i, int end, float (&four)[4]) {
    if (i + 4 <= end && aligned16(logits)) {
        const float4 v = *reinterpret_cast<const float4*>(logits + i);
        four[0] = v.x, four[1] = v.y, four[2] = v.z, four[3] = v.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) four[e] = i + e < end ? logits[i + e] : -INFINITY;
    }
}

// Shared words of the draws.
struct DrawState {
    int chosen;     // the lowest id whose running sum crossed the target
    int last_kept;  // the highest id with a probability: the answer when rounding leaves the target uncrossed
    int position;   // a position found by one thread, for all
};

// The inverse-CDF draw over `count` entries in ascending id order: entry j has logit logit_of(j) and id id_of(j).
// Thread t owns entries [t·span, (t+1)·span), span a multiple of 4; the per-thread sums are scanned, then the
// thread holding u·total walks its entries.
template <class Entries>
OS_DEVICE int draw(const Entries& entries, int count, uint32_t floor, float m, float inv_temp, float u, float* scan,
                   DrawState& st) {
    const int span = ((count + (int)blockDim.x - 1) / (int)blockDim.x + 3) & ~3;
    const int lo = min(count, (int)threadIdx.x * span), hi = min(count, lo + span);
    float local = 0.f;
    int my_last = -1;
    for (int j = lo; j < hi; j += 4) {
        float four[4];
        entries.load_four(j, hi, four);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float p = kept_probability(four[e], floor, m, inv_temp);
            local += p;
            if (p > 0.f) my_last = j + e;
        }
    }
    if (threadIdx.x == 0) st.chosen = st.last_kept = -1;
    const float incl = block_scan(local, scan);  // its barriers also publish the reset above
    const float target = u * scan[blockDim.x - 1];
    if (my_last >= 0) atomicMax(&st.last_kept, my_last);
    float running = incl - local;
    if (local > 0.f && running <= target && target < incl) {  // exactly one thread, unless rounding says none
        int pick = my_last;  // if this thread's own rounding never crosses the target: its last kept entry
        bool found = false;
        for (int j = lo; j < hi && !found; j += 4) {
            float four[4];
            entries.load_four(j, hi, four);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                running += kept_probability(four[e], floor, m, inv_temp);
                if (!found && running > target) {  // only a kept entry (p > 0) can make the sum cross
                    pick = j + e;
                    found = true;
                }
            }
        }
        atomicMax(&st.chosen, pick);
    }
    __syncthreads();
    const int entry = st.chosen >= 0 ? st.chosen : st.last_kept;
    return entries.id(entry);
}

// The whole vocabulary as draw entries: entry j is id j.
struct Vocabulary {
    const float* logits;
    OS_DEVICE void load_four(int j, int end, float (&four)[4]) const { ::load_four(logits, j, end, four); }
    OS_DEVICE int id(int j) const { return j; }
};

// The gathered candidates as draw entries, in ascending id order.
struct Candidates {
    const CandidateList& list;
    OS_DEVICE void load_four(int j, int end, float (&four)[4]) const {
#pragma unroll
        for (int e = 0; e < 4; e++) four[e] = j + e < end ? list.logit[j + e] : -INFINITY;
    }
    OS_DEVICE int id(int j) const { return list.id[j]; }
};

// Gather, in id order, the logits whose key ≥ low into the list; returns how many there are (when more than
// CANDIDATES, nothing is gathered).
OS_DEVICE int gather_candidates(const float* __restrict__ logits, int n, uint32_t low, CandidateList& list,
                                float* scan) {
    const int span = ((n + (int)blockDim.x - 1) / (int)blockDim.x + 3) & ~3;
    const int lo = min(n, (int)threadIdx.x * span), hi = min(n, lo + span);
    int count = 0;
    for (int i = lo; i < hi; i += 4) {
        float four[4];
        load_four(logits, i, hi, four);
#pragma unroll
        for (int e = 0; e < 4; e++) count += i + e < hi && order_key(four[e]) >= low;
    }
    const float incl = block_scan((float)count, scan);  // counts ≤ 2^24: exact in f32
    const int total = (int)scan[blockDim.x - 1];
    if (total > CANDIDATES) return total;
    int at = (int)incl - count;
    for (int i = lo; i < hi; i += 4) {
        float four[4];
        load_four(logits, i, hi, four);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (i + e < hi && order_key(four[e]) >= low) {
                list.logit[at] = four[e];
                list.id[at] = i + e;
                at++;
            }
        }
    }
    __syncthreads();
    return total;
}

// Does list entry a come before entry b in by_logit order (larger logit first, then lower id; padding last)?
OS_DEVICE bool comes_first(const CandidateList& list, int a, int b, int count) {
    if (a >= count) return false;
    if (b >= count) return true;
    return list.logit[a] > list.logit[b] || (list.logit[a] == list.logit[b] && a < b);
}

// Bitonic sort of the list's positions by logit, padded to a power of two.
OS_DEVICE void sort_by_logit(CandidateList& list, int count) {
    int size_all = 1;
    while (size_all < count) size_all <<= 1;
    for (int i = threadIdx.x; i < size_all; i += blockDim.x) list.by_logit[i] = (unsigned short)i;
    __syncthreads();
    for (int size = 2; size <= size_all; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < size_all; i += blockDim.x) {
                const int j = i ^ stride;
                if (j <= i) continue;
                const int a = list.by_logit[i], b = list.by_logit[j];
                const bool ascending = (i & size) == 0;  // this run wants by_logit order; the other run, reversed
                if (ascending == comes_first(list, b, a, count)) {
                    list.by_logit[i] = (unsigned short)b;
                    list.by_logit[j] = (unsigned short)a;
                }
            }
            __syncthreads();
        }
    }
}

// Top-k and top-p thresholds from the sorted list, then the draw over it. z_all: the whole vocabulary's mass
// (used when there is no top-k: the top-p target is a share of everything).
OS_DEVICE int sample_from_list(CandidateList& list, int count, bool use_k, int top_k, bool use_p, float top_p,
                               float z_all, float m, float inv_temp, float u, float* scan, float* sv,
                               DrawState& st) {
    sort_by_logit(list, count);
    uint32_t floor = 0u;
    int kept = count;  // the kept set is the first `kept` entries of by_logit order
    if (use_k) {
        floor = order_key(list.logit[list.by_logit[top_k - 1]]);
        float ties = 0.f;
        for (int r = threadIdx.x; r < count; r += blockDim.x) ties += order_key(list.logit[list.by_logit[r]]) >= floor;
        kept = (int)block_sum(ties, sv);
    }
    if (use_p) {
        // running sums in by_logit order; the first position reaching top_p·z sets the threshold
        const int lo = min(kept, 4 * (int)threadIdx.x), hi = min(kept, lo + 4);
        float local = 0.f;
        for (int r = lo; r < hi; r++) local += prob_weight(list.logit[list.by_logit[r]], m, inv_temp);
        const float incl = block_scan(local, scan);
        const float z = use_k ? scan[blockDim.x - 1] : z_all;
        const float target = top_p * z;
        if (threadIdx.x == 0) st.position = kept - 1;  // rounding leaves the target unreached: keep everything
        __syncthreads();
        float running = incl - local;
        if (lo < hi && running < target && incl >= target) {
            int at = hi - 1;
            for (int r = lo; r < hi; r++) {
                running += prob_weight(list.logit[list.by_logit[r]], m, inv_temp);
                if (running >= target) {
                    at = r;
                    break;
                }
            }
            atomicMin(&st.position, at);
        }
        if (threadIdx.x == 0 && target <= 0.f) st.position = 0;
        __syncthreads();
        floor = max(floor, order_key(list.logit[list.by_logit[st.position]]));
    }
    return draw(Candidates{list}, count, floor, m, inv_temp, u, scan, st);
}

// Grid: (R, ceil(seen_words / 256)); block: 256 threads, one 32-id word (32 ids) each.
// logits [R, V] f32, changed in place; per row r (its own parameters, runtime/sampler.py's order): the repetition
// penalty p = penalty[r] on every id its state has seen, prompt or generated (l > 0 ? l / p : l · p, the Hugging Face
// way; seen [states, seen_words] uint32 bitsets), then OpenAI's presence and frequency penalties on the ids it has
// generated, l −= presence[r]·(c > 0) + frequency[r]·c with c = counts[state·V + id] (int32 [states, V]).
// row_state [R] int32 (negative: none). Rows whose three penalties are off return at once.
extern "C" __global__ void penalize_rows(float* __restrict__ logits, int V, const float* __restrict__ penalty,
                                         const float* __restrict__ presence, const float* __restrict__ frequency,
                                         const int* __restrict__ row_state, const unsigned* __restrict__ seen,
                                         int seen_words, const int* __restrict__ counts) {
    grid_dependency_sync();
    const int r = blockIdx.x, word = blockIdx.y * blockDim.x + threadIdx.x;
    const float p = penalty[r], pres = presence[r], freq = frequency[r];
    const int state = row_state[r];
    if ((p == 1.f && pres == 0.f && freq == 0.f) || state < 0 || word >= seen_words) return;
    unsigned bits = seen[(size_t)state * seen_words + word];  // every generated id was fed back, so is seen too
    float* row = logits + (size_t)r * V;
    const int* count = counts + (size_t)state * V;
    while (bits) {
        const int id = word * 32 + __ffs(bits) - 1;
        bits &= bits - 1;
        if (id >= V) break;
        float l = row[id];
        if (p != 1.f) l = l > 0.f ? l / p : l * p;
        const int c = count[id];
        if (c > 0) l -= pres + freq * (float)c;
        row[id] = l;
    }
}

// The next token of one row by sampler.py's rules (see the top of the file); logits [n] f32 with n = the tokenizer's
// vocabulary (padding ids beyond it are never read, so never drawn); temperature ≤ 0: greedy; top_k ≤ 0 or ≥ n and
// top_p ≥ 1 switch those filters off; u ∈ [0, 1) is the host's one uniform for this draw.
OS_DEVICE int sample_row(const float* __restrict__ logits, int n, float temperature, int top_k, float top_p, float u) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float scan[SAMPLE_THREADS];
    __shared__ SampleScratch scratch;
    __shared__ DrawState st;

    // Argmax with 16-byte loads where the row is aligned (n % 4 leftovers by thread 0); each thread sees its ids in
    // ascending order, so its first maximum wins, and block_argmax breaks ties by the lowest id.
    float best = -INFINITY, nans = 0.f;
    int best_i = 0x7fffffff;
    const bool vector = aligned16(logits);
    const int vec_end = vector ? n & ~3 : 0;
    const float4* vec = reinterpret_cast<const float4*>(logits);
#pragma unroll 4
    for (int v = threadIdx.x; v < vec_end / 4; v += blockDim.x) {
        const float4 l = vec[v];
        const float four[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            nans += four[e] != four[e];  // NaN (no fast math: the comparison stays)
            if (four[e] > best) {
                best = four[e];
                best_i = 4 * v + e;
            }
        }
    }
    for (int i = vector ? vec_end + (int)threadIdx.x : (int)threadIdx.x; i < n; i += blockDim.x) {
        nans += logits[i] != logits[i];
        if (logits[i] > best) {  // ascending ids per thread: its first maximum stays
            best = logits[i];
            best_i = i;
        }
    }
    if (block_sum(nans, sv) > 0.f) return SAMPLE_NAN;  // counts ≤ 2^24: exact in f32
    const int argmax = block_argmax(best, best_i, sv, si);
    if (argmax >= n) return SAMPLE_NO_MASS;  // nothing beat −inf: no token can be chosen
    if (temperature <= 0.f) return argmax;
    const float m = logits[argmax];
    const float inv_temp = LOG2E_F / temperature;  // probabilities as exp2((l − max)·inv_temp); may be +inf
    const bool use_k = top_k > 0 && top_k < n, use_p = top_p < 1.f;
    const Vocabulary vocabulary{logits};
    if (!use_k && !use_p) return draw(vocabulary, n, 0u, m, inv_temp, u, scan, st);
    float z_all = 0.f;
    if (!use_k) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) z_all += prob_weight(logits[i], m, inv_temp);
        z_all = block_sum(z_all, sv);
    }
    // The first radix pass: the byte of the threshold, and so the logits that can be kept.
    const uint32_t low = use_k ? select_threshold<false>(logits, n, 0u, (float)top_k, m, inv_temp, 24, scratch.select)
                               : select_threshold<true>(logits, n, 0u, top_p * z_all, m, inv_temp, 24, scratch.select);
    const int count = gather_candidates(logits, n, low, scratch.list, scan);
    if (count <= CANDIDATES)
        return sample_from_list(scratch.list, count, use_k, top_k, use_p, top_p, z_all, m, inv_temp, u, scan, sv, st);
    // Too many to gather: finish the radix selections over the whole vocabulary.
    uint32_t floor = 0u;
    if (use_k) floor = select_threshold<false>(logits, n, 0u, (float)top_k, m, inv_temp, 0, scratch.select);
    if (use_p) {
        float z = z_all;
        if (use_k) {
            z = 0.f;
            for (int i = threadIdx.x; i < n; i += blockDim.x) z += kept_probability(logits[i], floor, m, inv_temp);
            z = block_sum(z, sv);
        }
        floor = max(floor, select_threshold<true>(logits, n, floor, top_p * z, m, inv_temp, 0, scratch.select));
    }
    return draw(vocabulary, n, floor, m, inv_temp, u, scan, st);
}

// Grid: (R); block: 1024 threads, one row each. logits [R, V] f32 (V may be odd: rows are then not 16-byte aligned);
// vocab_limit ≤ V: ids ≥ it are never chosen; temperature, top_p, u [R] f32 and top_k [R] int32: the row's own
// parameters; row_state [R] int32. Writes tokens_out[r] (SAMPLE_NAN / SAMPLE_NO_MASS when the row cannot be sampled:
// the host turns those into that request's error) and, for a real token and row_state[r] ≥ 0, last_sampled[state]
// (the next step's prepare_tokens feeds it back) and counts[state·V + token] += 1 (the presence/frequency counts).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)  // 1 block per SM: no spills
    sample_rows(const float* __restrict__ logits, int V, int vocab_limit, const float* __restrict__ temperature,
                const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ u,
                const int* __restrict__ row_state, int* __restrict__ tokens_out, int* __restrict__ last_sampled,
                int* __restrict__ counts) {
    grid_dependency_sync();
    const int r = blockIdx.x;
    const int token = sample_row(logits + (size_t)r * V, vocab_limit, temperature[r], top_k[r], top_p[r], u[r]);
    if (threadIdx.x == 0) {
        tokens_out[r] = token;
        const int state = row_state[r];
        if (state >= 0 && token >= 0) {
            last_sampled[state] = token;
            counts[(size_t)state * V + token] += 1;  // one row per state in a step: no race
        }
    }
}

// Grid: (R); block: 1024 threads, one row each. Log-probabilities of row r of raw logits [R, V] f32 (before any
// penalty or temperature) under the softmax over the real vocabulary (ids < vocab_limit): logprob[r] of the
// sampled tokens[r] (0 when the row has no token), and the k ≤ TOP_LOGPROBS best ids with their logprobs, best
// first, the lower id first on ties, into top_ids / top_logprobs [R, TOP_LOGPROBS] (entries ≥ k untouched).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    row_logprobs(const float* __restrict__ logits, int V, int vocab_limit, const int* __restrict__ tokens, int k,
                 float* __restrict__ logprob, int* __restrict__ top_ids, float* __restrict__ top_logprobs) {
    grid_dependency_sync();
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    const float* row = logits + (size_t)r * V;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab_limit; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, sv);
    float z = 0.f;
    for (int i = threadIdx.x; i < vocab_limit; i += blockDim.x) z += expf(row[i] - m);
    const float lse = m + logf(block_sum(z, sv));
    const int token = tokens[r];
    if (threadIdx.x == 0) logprob[r] = token >= 0 && token < vocab_limit ? row[token] - lse : 0.f;
    float prev = INFINITY;
    int prev_id = -1;
    for (int j = 0; j < k; j++) {  // k block argmaxes, each below the last in (logit descending, id ascending) order
        float best = -INFINITY;
        int best_i = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab_limit; i += blockDim.x) {
            const float l = row[i];
            const bool below = l < prev || (l == prev && i > prev_id);
            if (below && (l > best || best_i == 0x7fffffff)) {
                best = l;
                best_i = i;
            }
        }
        const int id = block_argmax(best, best_i, sv, si);
        if (id >= vocab_limit) break;
        prev = row[id];
        prev_id = id;
        if (threadIdx.x == 0) {
            top_ids[(size_t)r * TOP_LOGPROBS + j] = id;
            top_logprobs[(size_t)r * TOP_LOGPROBS + j] = prev - lse;
        }
    }
}
