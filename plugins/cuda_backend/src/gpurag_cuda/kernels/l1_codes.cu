// l1 shortlist scan over byte codes (gpurag_torch.l1_codes): rows and queries as signed bytes, four to a
// 32-bit word. Each lane scores 4 consecutive rows against the NQ queries of its block: one VABSDIFF4
// (four absolute byte differences added to an accumulator, exact integers) per word, query and row, so a
// word of a row read once serves NQ queries; the query words come from shared memory as 16-byte
// broadcasts. Each warp reads its own run of rows (coalesced: a warp's lanes read 32 x 4 adjacent rows of
// one word), the next PREFETCH words in flight while the current ones are summed (8 for up to 16 queries, whose
// few sums per word leave the loads less time; 4 for 32); after every 128 rows a
// query's list is offered them only when one beats its running kp-th key (select.cuh).
//
// Rows: column-major (words, row_stride) int32 words; queries: (n_queries, words) int32 words. Keys: -SAD
// (exact in float32 for SAD < 2^24). Grid: x = query groups of NQ, y = row splits of WARPS runs of
// rows_per_warp rows (a multiple of 128). Output: (Q, gridDim.y * WARPS, kp) keys and rows, best first,
// padded with -inf / -1. vec: rows 16-byte aligned with row_stride a multiple of 4 (uint4 loads).
#include "select.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)
#define ROWS_PER_LANE 4
#define ROWS_PER_BATCH (32 * ROWS_PER_LANE)

__device__ __forceinline__ unsigned codes_sad4(unsigned a, unsigned b, unsigned acc) {
    unsigned r;
    asm("vabsdiff4.u32.s32.s32.add %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}

// Word w of rows row0..row0+3 (zero past n_rows).
__device__ __forceinline__ uint4 codes_load(const int* __restrict__ rows, long long row_stride, int w, int row0,
                                            int n_rows, bool vec) {
    const int* p = rows + (long long)w * row_stride + row0;
    if (vec && row0 + ROWS_PER_LANE <= n_rows) return __ldg(reinterpret_cast<const uint4*>(p));
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + 0 < n_rows) v.x = (unsigned)__ldg(p + 0);
    if (row0 + 1 < n_rows) v.y = (unsigned)__ldg(p + 1);
    if (row0 + 2 < n_rows) v.z = (unsigned)__ldg(p + 2);
    if (row0 + 3 < n_rows) v.w = (unsigned)__ldg(p + 3);
    return v;
}

// Offers a lane's 4 keys (rows row0..row0+3) to a list; not inlined, so that each query's epilogue stays a
// few instructions and the kernel's code stays small (inlined, the offers of 8-32 queries made 126-445 KB
// of code, and the scan measured 1.9-3.4x slower as its width, and so its code, grew).
__device__ __noinline__ void codes_offer(CandidateList list, int kp, int cap, float k0, float k1, float k2, float k3,
                                         int row0, int r_end) {
    offer(list, kp, cap, k0, row0, row0 < r_end);
    offer(list, kp, cap, k1, row0 + 1, row0 + 1 < r_end);
    offer(list, kp, cap, k2, row0 + 2, row0 + 2 < r_end);
    offer(list, kp, cap, k3, row0 + 3, row0 + 3 < r_end);
}

template <int NQ, int PREFETCH>
__device__ __forceinline__ void codes_body(const int* __restrict__ queries, const int* __restrict__ rows,
                                           long long row_stride, bool vec, int n_queries, int n_rows, int words,
                                           int rows_per_warp, int kp, int cap, float* __restrict__ out_keys,
                                           int* __restrict__ out_rows) {
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned* q_s = reinterpret_cast<unsigned*>(smem);  // [words][NQ]
    float* list_keys = reinterpret_cast<float*>(q_s + words * NQ);
    int* list_rows = reinterpret_cast<int*>(list_keys + WARPS * NQ * cap);
    int* list_count = list_rows + WARPS * NQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + WARPS * NQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * NQ;
    for (int i = threadIdx.x; i < words * NQ; i += THREADS) {
        const int w = i / NQ, qi = i % NQ;
        q_s[i] = q0 + qi < n_queries ? (unsigned)queries[(long long)(q0 + qi) * words + w] : 0u;
    }
    auto list_of = [&](int qi) {
        const int slot = warp * NQ + qi;
        return CandidateList{list_keys + slot * cap, list_rows + slot * cap, list_count + slot, list_threshold + slot};
    };
    for (int qi = 0; qi < NQ; ++qi) reset(list_of(qi));
    __syncthreads();

    const int splits = gridDim.y * WARPS, split = blockIdx.y * WARPS + warp;
    const int r_begin = split * rows_per_warp;
    const int r_end = min(n_rows, r_begin + rows_per_warp);
    const uint4* q4 = reinterpret_cast<const uint4*>(q_s);
    for (int base = r_begin; base < r_end; base += ROWS_PER_BATCH) {
        const int row0 = base + lane * ROWS_PER_LANE;
        unsigned acc[NQ][ROWS_PER_LANE];
#pragma unroll
        for (int qi = 0; qi < NQ; ++qi)
#pragma unroll
            for (int r = 0; r < ROWS_PER_LANE; ++r) acc[qi][r] = 0u;
        uint4 next[PREFETCH];
#pragma unroll
        for (int p = 0; p < PREFETCH; ++p)
            next[p] = p < words ? codes_load(rows, row_stride, p, row0, n_rows, vec) : make_uint4(0u, 0u, 0u, 0u);
        for (int w0 = 0; w0 < words; w0 += PREFETCH) {
            uint4 x[PREFETCH];
#pragma unroll
            for (int p = 0; p < PREFETCH; ++p) {
                x[p] = next[p];
                const int w = w0 + PREFETCH + p;
                next[p] = w < words ? codes_load(rows, row_stride, w, row0, n_rows, vec) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int p = 0; p < PREFETCH; ++p) {
                if (w0 + p >= words) break;  // past the last word (words not a multiple of PREFETCH)
                const uint4* qw = q4 + (w0 + p) * (NQ / 4);
#pragma unroll
                for (int g = 0; g < NQ / 4; ++g) {
                    const uint4 qv = qw[g];
                    const unsigned qs[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        acc[4 * g + j][0] = codes_sad4(qs[j], x[p].x, acc[4 * g + j][0]);
                        acc[4 * g + j][1] = codes_sad4(qs[j], x[p].y, acc[4 * g + j][1]);
                        acc[4 * g + j][2] = codes_sad4(qs[j], x[p].z, acc[4 * g + j][2]);
                        acc[4 * g + j][3] = codes_sad4(qs[j], x[p].w, acc[4 * g + j][3]);
                    }
                }
            }
        }
        // Offer the batch: a query's list sees it only when one of its 128 keys beats its threshold.
#pragma unroll
        for (int qi = 0; qi < NQ; ++qi) {
            if (q0 + qi >= n_queries) break;
            const CandidateList list = list_of(qi);
            const float threshold = *list.threshold;
            float key[ROWS_PER_LANE];
            bool passes = false;
#pragma unroll
            for (int r = 0; r < ROWS_PER_LANE; ++r) {
                key[r] = row0 + r < r_end ? -(float)acc[qi][r] : GPURAG_NEG_INF;
                passes |= key[r] > threshold;
            }
            if (__any_sync(GPURAG_FULL_MASK, passes)) codes_offer(list, kp, cap, key[0], key[1], key[2], key[3], row0, r_end);
        }
    }
    for (int qi = 0; qi < NQ; ++qi) {
        if (q0 + qi >= n_queries) break;
        const long long at = ((long long)(q0 + qi) * splits + split) * kp;
        flush(list_of(qi), kp, cap, out_keys + at, out_rows + at);
    }
}

#define CODES_KERNEL(NQ, NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                     \
    NAME(const int* __restrict__ queries, const int* __restrict__ rows, long long row_stride, int vec,           \
         int n_queries, int n_rows, int words, int rows_per_warp, int kp, int cap, float* __restrict__ out_keys,  \
         int* __restrict__ out_rows) {                                                                           \
        codes_body<NQ, (NQ > 16 ? 4 : 8)>(queries, rows, row_stride, vec != 0, n_queries, n_rows, words, rows_per_warp, kp, cap,    \
                       out_keys, out_rows);                                                                      \
    }

CODES_KERNEL(8, l1_codes_8)
CODES_KERNEL(16, l1_codes_16)
CODES_KERNEL(32, l1_codes_32)
