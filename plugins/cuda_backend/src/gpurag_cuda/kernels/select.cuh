// Warp-level candidate selection shared by every scan kernel.
//
// Each (query, scan unit) keeps a candidate list of up to `cap` (key, row) pairs in shared memory,
// keys being oriented scores (larger is better), and a running threshold: the kp-th best key kept
// so far once the list was last compacted (-inf before). A key at or below the threshold can never
// enter the kp best, so it is dropped before it reaches memory; when a batch would overflow the list
// the warp sorts it, keeps the kp best and raises the threshold (the spirit of FAISS's WarpSelect).
// cap is a power of two >= kp + 32, so a batch of 32 always fits after compaction.
#pragma once

#define GPURAG_FULL_MASK 0xffffffffu
#define GPURAG_NEG_INF __int_as_float(0xff800000)

// Sorts keys[0..n) (n a power of two) in descending order with their rows; the whole warp calls it.
__device__ __noinline__ void warp_sort_desc(float* keys, int* rows, int n) {
    const int lane = threadIdx.x & 31;
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncwarp();
            for (int t = lane; t < (n >> 1); t += 32) {
                int i = 2 * t - (t & (stride - 1));  // lower element of the pair
                int j = i + stride;
                bool descending = (i & size) == 0;
                float a = keys[i], b = keys[j];
                int ra = rows[i], rb = rows[j];
                // Order: larger key first; among equal keys the lower row first (rows -1 last).
                bool a_first = (a > b) || (a == b && (unsigned)ra <= (unsigned)rb);
                if (a_first != descending) {
                    keys[i] = b; keys[j] = a;
                    rows[i] = rb; rows[j] = ra;
                }
            }
        }
    }
    __syncwarp();
}

// The list's state: count of entries and threshold, kept in shared memory by the owning warp.
struct CandidateList {
    float* keys;
    int* rows;
    int* count;
    float* threshold;
};

// Sorts the list, keeps its kp best and sets the threshold to the kp-th (or -inf when fewer).
__device__ __noinline__ void compact(CandidateList list, int kp, int cap) {
    const int lane = threadIdx.x & 31;
    int n = *list.count;
    for (int i = n + lane; i < cap; i += 32) {
        list.keys[i] = GPURAG_NEG_INF;
        list.rows[i] = -1;
    }
    warp_sort_desc(list.keys, list.rows, cap);
    if (lane == 0) {
        *list.count = n < kp ? n : kp;
        *list.threshold = n < kp ? GPURAG_NEG_INF : list.keys[kp - 1];
    }
    __syncwarp();
}

// Offers one candidate per lane (valid lanes only); the whole warp calls it.
__device__ __forceinline__ void offer(CandidateList list, int kp, int cap, float key, int row, bool valid) {
    const int lane = threadIdx.x & 31;
    bool take = valid && key > *list.threshold;
    unsigned mask = __ballot_sync(GPURAG_FULL_MASK, take);
    if (mask == 0) return;
    int count = *list.count;
    if (count + __popc(mask) > cap) {
        __syncwarp();
        compact(list, kp, cap);
        take = valid && key > *list.threshold;
        mask = __ballot_sync(GPURAG_FULL_MASK, take);
        count = *list.count;
    }
    if (take) {
        int at = count + __popc(mask & ((1u << lane) - 1u));
        list.keys[at] = key;
        list.rows[at] = row;
    }
    __syncwarp();
    if (lane == 0) *list.count = count + __popc(mask);
    __syncwarp();
}

// Writes the list's kp best (padding with -inf and row -1) to out_keys/out_rows[0..kp).
__device__ __forceinline__ void flush(CandidateList list, int kp, int cap, float* out_keys, int* out_rows) {
    const int lane = threadIdx.x & 31;
    compact(list, kp, cap);
    for (int i = lane; i < kp; i += 32) {
        out_keys[i] = list.keys[i];
        out_rows[i] = list.rows[i];
    }
}

// Initialises an empty list.
__device__ __forceinline__ void reset(CandidateList list) {
    if ((threadIdx.x & 31) == 0) {
        *list.count = 0;
        *list.threshold = GPURAG_NEG_INF;
    }
    __syncwarp();
}
