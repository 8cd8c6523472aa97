// The few-query path of gpurag-cupy: a query's row of scores is cut into chunks of CHUNK_KEYS; one
// block narrows each chunk to its best k in shared memory (`chunk_select`), then one block per query
// selects the k best of all chunks' winners, scores them again directly (float64 sums) and writes
// them best first (`merge_rescore`). Two launches after the score pass, no host round trip. Also the
// largest magnitude of an array in one launch (`largest_magnitude_bits`).
//
// Keys are `ordered_key`s (select.cu), larger is better; slots a chunk leaves empty hold key 0,
// below every key of a finite score.

#define CHUNK_KEYS 4096
#define FULL_MASK 0xffffffffu

// Block-wide radix select: the k-th best (largest) of keys[0..n), 1 <= k <= n, into result[0], and into
// result[1] how many keys equal to it belong to the k best. Four passes of 8 bits over `keys` (shared or
// global memory), a 256-bin shared histogram aggregated per warp. Every thread of the block calls it.
__device__ void block_kth_key(const u32* keys, int n, u32 k, u32* hist, u32* result) {
    const int t = threadIdx.x;
    if (t == 0) {
        result[0] = 0u;
        result[1] = k;
    }
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        for (int b = t; b < 256; b += blockDim.x) hist[b] = 0u;
        __syncthreads();
        const u32 prefix = result[0];
        const u32 high = pass == 0 ? 0u : (FULL_MASK << (shift + 8));
        for (int i = t; i < n; i += blockDim.x) {
            const u32 key = keys[i];
            if ((key & high) == prefix) {
                const u32 bin = (key >> shift) & 255u;
                const unsigned peers = __match_any_sync(__activemask(), bin);
                if ((t & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<u32>(__popc(peers)));
            }
        }
        __syncthreads();
        if (t < 32) {  // lane l holds bins 255 - 8l - j (j < 8), counted from the top
            u32 counts[8];
            u32 total = 0u;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                counts[j] = hist[255 - 8 * t - j];
                total += counts[j];
            }
            u32 inclusive = total;
#pragma unroll
            for (int offset = 1; offset < 32; offset <<= 1) {
                const u32 v = __shfl_up_sync(FULL_MASK, inclusive, offset);
                if (t >= offset) inclusive += v;
            }
            const u32 remaining = result[1];
            const unsigned reached = __ballot_sync(FULL_MASK, inclusive >= remaining);
            if (t == __ffs(reached) - 1) {
                u32 acc = inclusive - total;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (acc + counts[j] >= remaining) {
                        result[0] = prefix | (static_cast<u32>(255 - 8 * t - j) << shift);
                        result[1] = remaining - acc;
                        break;
                    }
                    acc += counts[j];
                }
            }
        }
        __syncthreads();
    }
}

// Block-wide, after block_kth_key: the k best of keys[0..n) to out_keys/out_rows[0..k) (any order):
// every key above the k-th, then the first result[1] keys equal to it. Rows are rows[i] when given,
// else row_base + i. counters: two shared u32 the caller zeroed (and synchronised) before.
__device__ void block_gather(const u32* keys, const i64* rows, i64 row_base, int n, u32 k, const u32* result,
                             u32* counters, u32* out_keys, i64* out_rows) {
    const u32 kth = result[0];
    const u32 ties = result[1];
    const u32 above = k - ties;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const u32 key = keys[i];
        u32 slot;
        if (key > kth) {
            slot = atomicAdd(&counters[0], 1u);
        } else if (key == kth) {
            const u32 tie = atomicAdd(&counters[1], 1u);
            if (tie >= ties) continue;
            slot = above + tie;
        } else {
            continue;
        }
        if (out_keys != nullptr) out_keys[slot] = key;
        out_rows[slot] = rows != nullptr ? rows[i] : row_base + i;
    }
}

// Grid (chunks, queries), 256 threads. Query q's scores are src[q * ld + j], j < n (a tile whose first
// row is row_offset), ranked by the key of src * mul[j] + add[j] (either optional). Chunk c (tile rows
// c * CHUNK_KEYS onwards) writes its best min(k, rows in it) keys and rows to
// out_keys/out_rows[q * out_ld + (first_chunk + c) * k ...]; slots past its rows get key 0 and row -1.
__global__ void chunk_select(const float* src, i64 ld, i64 n, const float* mul, const float* add, i64 row_offset,
                             int k, u32* out_keys, i64* out_rows, i64 out_ld, i64 first_chunk) {
    __shared__ u32 keys[CHUNK_KEYS];
    __shared__ u32 hist[256];
    __shared__ u32 result[2];
    __shared__ u32 counters[2];
    const int q = blockIdx.y;
    const i64 start = static_cast<i64>(blockIdx.x) * CHUNK_KEYS;
    const int len = static_cast<int>(n - start < CHUNK_KEYS ? n - start : static_cast<i64>(CHUNK_KEYS));
    for (int i = threadIdx.x; i < len; i += blockDim.x) keys[i] = load_key<true>(src, ld, q, start + i, mul, add);
    if (threadIdx.x == 0) {
        counters[0] = 0u;
        counters[1] = 0u;
    }
    const i64 at = static_cast<i64>(q) * out_ld + (first_chunk + blockIdx.x) * k;
    u32* out_k = out_keys + at;
    i64* out_r = out_rows + at;
    if (len <= k) {  // the whole chunk, then empty slots
        __syncthreads();
        for (int i = threadIdx.x; i < k; i += blockDim.x) {
            out_k[i] = i < len ? keys[i] : 0u;
            out_r[i] = i < len ? row_offset + start + i : -1;
        }
        return;
    }
    block_kth_key(keys, len, static_cast<u32>(k), hist, result);  // synchronises before reading keys
    block_gather(keys, nullptr, row_offset + start, len, static_cast<u32>(k), result, counters, out_k, out_r);
}

// One block of 256 threads per query: the k best (k <= SORTED_MAX, k <= m) of the m candidates
// keys/rows[q, :m], scored again directly against queries[q] (float64 sums) and written best first
// (ties by row) to out_scores/out_rows[q, :k].
__global__ void merge_rescore(const u32* keys, const i64* rows, int m, int k, const float* __restrict__ queries,
                              const float* __restrict__ vectors, int dim, int metric, int higher, float* out_scores,
                              i64* out_rows) {
    __shared__ u32 hist[256];
    __shared__ u32 result[2];
    __shared__ u32 counters[2];
    __shared__ float score[SORTED_MAX];
    __shared__ i64 row_of[SORTED_MAX];
    const int q = blockIdx.x;
    const u32* kq = keys + static_cast<i64>(q) * m;
    if (threadIdx.x == 0) {
        counters[0] = 0u;
        counters[1] = 0u;
    }
    block_kth_key(kq, m, static_cast<u32>(k), hist, result);
    block_gather(kq, rows + static_cast<i64>(q) * m, 0, m, static_cast<u32>(k), result, counters, nullptr, row_of);
    __syncthreads();
    score_and_order(queries + static_cast<i64>(q) * dim, vectors, dim, row_of, score, k, metric, higher,
                    out_scores + static_cast<i64>(q) * k, out_rows + static_cast<i64>(q) * k);
}

// *out = the largest bit pattern of |x[i]|, i < n (out zeroed before): as a float, the largest magnitude,
// inf where an entry is infinite, NaN where one is NaN (NaN's patterns are above inf's).
__global__ void largest_magnitude_bits(const float* x, i64 n, u32* out) {
    u32 best = 0u;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
        const u32 bits = __float_as_uint(x[i]) & 0x7fffffffu;
        best = bits > best ? bits : best;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const u32 other = __shfl_xor_sync(FULL_MASK, best, offset);
        best = other > best ? other : best;
    }
    if ((threadIdx.x & 31) == 0 && best != 0u) atomicMax(out, best);
}
