// k-selection of gpurag-cupy: a radix select (three histogram passes of 11, 11 and 10 bits, then
// one gather), for any k, many blocks per query, and no sort of the scores.
//
// Every candidate has an order-preserving 32-bit key, larger is better: either computed from a
// float32 score tile as key(score * mul[j] + add[j]) (the metric's epilogue, fused into the read),
// or read from an earlier selection's output. Per query the state is four u32, zero to start:
// `prefix` (the key bits of the k-th best found so far), `above` (how many keys are known to beat
// the k-th: those in bins above it), and two gather counters. `radix_pick` refines the first two
// after each histogram pass.

typedef unsigned int u32;
typedef long long i64;

#define RADIX_BINS 2048

__device__ __forceinline__ u32 ordered_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <bool SCORES>
__device__ __forceinline__ u32 load_key(const void* src, i64 ld, int q, i64 j, const float* mul, const float* add) {
    if (SCORES) {
        float s = static_cast<const float*>(src)[q * ld + j];
        if (mul != nullptr) s *= mul[j];
        if (add != nullptr) s += add[j];
        return ordered_key(s);
    }
    return static_cast<const u32*>(src)[q * ld + j];
}

// Adds to hist[q] (RADIX_BINS bins) the digit (key >> shift) & (2^bits - 1) of every key of query q
// whose bits above shift + bits equal those of prefix[q]. Grid: (blocks per query, queries). AGGREGATE:
// warp-aggregated shared atomics (one per distinct bin of a warp) rather than one per key.
template <bool SCORES, bool AGGREGATE>
__global__ void radix_histogram(const void* src, i64 ld, i64 n, const float* mul, const float* add,
                                const u32* state, int shift, int bits, u32* hist, const u32* filtered, u32 slots) {
    __shared__ u32 local[RADIX_BINS];
    const int q = blockIdx.y;
    if (filtered != nullptr && filtered[q] <= slots) return;  // threshold_gather took this query's keys
    const int bins = 1 << bits;
    for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0u;
    __syncthreads();
    const int top = shift + bits;
    const u32 high = top >= 32 ? 0u : (0xffffffffu << top);
    const u32 want = state[4 * q] & high;
    const u32 digit_mask = static_cast<u32>(bins) - 1u;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 j = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += step) {
        const u32 key = load_key<SCORES>(src, ld, q, j, mul, add);
        if ((key & high) == want) {
            const u32 bin = (key >> shift) & digit_mask;
            if (AGGREGATE) {  // one atomic per distinct bin of the warp
                const unsigned peers = __match_any_sync(__activemask(), bin);
                if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&local[bin], static_cast<u32>(__popc(peers)));
            } else {
                atomicAdd(&local[bin], 1u);
            }
        }
    }
    __syncthreads();
    u32* out = hist + static_cast<i64>(q) * RADIX_BINS;
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
        if (local[b] != 0u) atomicAdd(&out[b], local[b]);
    }
}

// One block of 256 threads per query: finds the bin holding the (k - above)-th best key among those
// matching the prefix, ORs its digit into the prefix, adds the keys of the bins above it to `above`,
// and zeroes hist[q] for the next pass.
__global__ void radix_pick(u32* hist, u32* state, u32 k_total, int shift, int bits, const u32* filtered, u32 slots) {
    __shared__ u32 sums[256];
    const int q = blockIdx.x;
    const int t = threadIdx.x;
    if (filtered != nullptr && filtered[q] <= slots) return;
    const u32 k = k_total - state[4 * q + 1];  // read before any thread can write it
    const int bins = 1 << bits;
    const int per = bins / 256;
    u32* h = hist + static_cast<i64>(q) * RADIX_BINS;
    u32 counts[8];
    u32 total = 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // thread t holds bins from the top: bins - 1 - (t * per + i)
        counts[i] = i < per ? h[bins - 1 - (t * per + i)] : 0u;
        total += counts[i];
    }
    sums[t] = total;
    __syncthreads();
    for (int offset = 1; offset < 256; offset <<= 1) {
        const u32 v = t >= offset ? sums[t - offset] : 0u;
        __syncthreads();
        sums[t] += v;
        __syncthreads();
    }
    const u32 before = sums[t] - total;
    if (before < k && sums[t] >= k) {
        u32 acc = before;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (i < per && acc + counts[i] >= k) {
                state[4 * q] |= static_cast<u32>(bins - 1 - (t * per + i)) << shift;
                state[4 * q + 1] += acc;
                break;
            }
            acc += counts[i];
        }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (i < per) h[bins - 1 - (t * per + i)] = 0u;
    }
}

// Writes the k best keys of query q (any order) and their rows to out_keys/out_rows[q, offset:offset+k]:
// every key above the prefix and the first (k - above) keys equal to it. With take_all, every key
// (n <= k). Rows are src_rows[q, j] when given, else row_offset + j. Grid: (blocks per query, queries).
template <bool SCORES>
__global__ void radix_gather(const void* src, i64 ld, i64 n, const float* mul, const float* add,
                             const i64* src_rows, i64 row_offset, u32* state, int k, int take_all,
                             u32* out_keys, i64* out_rows, i64 out_ld, i64 out_offset, const u32* filtered,
                             u32 slots) {
    const int q = blockIdx.y;
    if (filtered != nullptr) {
        if (filtered[q] <= slots) return;
        // threshold_gather filled slots k..slots-1 too: empty them (key 0 is below every real key)
        if (blockIdx.x == 0) {
            for (u32 s = static_cast<u32>(k) + threadIdx.x; s < slots; s += blockDim.x) {
                out_keys[q * out_ld + out_offset + s] = 0u;
            }
        }
    }
    const u32 kth = take_all ? 0u : state[4 * q];
    const u32 above = take_all ? 0u : state[4 * q + 1];
    const u32 ties = static_cast<u32>(k) - above;
    u32* counters = state + 4 * q + 2;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 j = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += step) {
        const u32 key = load_key<SCORES>(src, ld, q, j, mul, add);
        u32 slot;
        if (take_all || key > kth) {
            slot = atomicAdd(&counters[0], 1u);
        } else if (key == kth) {
            const u32 tie = atomicAdd(&counters[1], 1u);
            if (tie >= ties) continue;
            slot = above + tie;
        } else {
            continue;
        }
        const i64 at = q * out_ld + out_offset + slot;
        out_keys[at] = key;
        out_rows[at] = src_rows != nullptr ? src_rows[q * ld + j] : row_offset + j;
    }
}

// The cheap pass for a tile once a threshold is known (a k-th best key of rows already seen, so no
// key below it can be among the k best): every key of query q at or above threshold[q] is written to
// out_keys/out_rows[q, out_offset + slot] for slot < slots, and counted in filtered[q]. Where the count
// is at most `slots` this is the tile's whole contribution (the slots it leaves hold key 0, below any
// real key); where it exceeds them, the radix passes run for that query alone (they skip the others).
__global__ void threshold_gather(const float* src, i64 ld, i64 n, const float* mul, const float* add,
                                 i64 row_offset, const u32* threshold, int slots, u32* filtered, u32* out_keys,
                                 i64* out_rows, i64 out_ld, i64 out_offset) {
    const int q = blockIdx.y;
    const u32 least = threshold[q];
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 j = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += step) {
        const u32 key = load_key<true>(src, ld, q, j, mul, add);
        if (key < least) continue;
        const u32 slot = atomicAdd(&filtered[q], 1u);
        if (slot < static_cast<u32>(slots)) {
            const i64 at = q * out_ld + out_offset + slot;
            out_keys[at] = key;
            out_rows[at] = row_offset + j;
        }
    }
}
