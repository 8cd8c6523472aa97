// Streaming scan for a few queries (NQ of 1, 4, 8 or 16) over bf16 rows: every warp of the grid reads
// its own contiguous run of rows once, two lanes per row, each lane one 16-byte half of every 32-byte
// sector (so a warp's loads use whole sectors), with the next sector's load in flight while the current
// one is scored. Each lane keeps a register micro-tile of its two rows x NQ queries; the queries are
// float32 in shared memory, laid out so the two halves of a pair read different banks. After a run of
// 32 rows the lane pairs add their halves, and a query's list is offered the rows only when one of
// them beats its running kp-th key (one warp-wide OR of a per-query bit mask, select.cuh's lists).
//
// mode: 0 dot q.x, 1 l2 2 q.x - |x|^2, 2 l1 -sum|q - x| (keys: larger is better). Queries are float32
// (already rounded to bf16 for a shortlist, so every product is exact). Needs dim % 8 == 0 and
// 16-byte aligned rows. Output: (Q, splits, kp) keys and rows, best first, padded with -inf / -1,
// one split per warp of rows_per_warp rows (a multiple of 32).
#include "select.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)

__device__ __forceinline__ void few_unpack(uint4 v, float* out) {  // 8 bf16
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <int MODE>
__device__ __forceinline__ float few_term(float acc, float q, float x) {
    if constexpr (MODE == 2) return acc + fabsf(q - x);
    else return fmaf(q, x, acc);
}

__device__ __forceinline__ uint4 few_load(const unsigned short* p, bool inside) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (inside) v = __ldg(reinterpret_cast<const uint4*>(p));
    return v;
}

// Floats of the query block: two halves (dims 16c..16c+7 and 16c+8..16c+15 of every chunk c), each
// chunks x 8 x NQ, the second 4 floats after the first ends (their banks differ).
__host__ __device__ constexpr int few_half_stride(int chunks, int nq) { return chunks * 8 * nq + 4; }

template <int NQ, int MODE>
__device__ __forceinline__ void few_body(const float* __restrict__ queries, const unsigned short* __restrict__ rows,
                                         const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim,
                                         int rows_per_warp, int kp, int cap, float* __restrict__ out_keys,
                                         int* __restrict__ out_rows) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int chunks = (dim + 15) / 16;
    const int half_stride = few_half_stride(chunks, NQ);
    float* q_s = reinterpret_cast<float*>(smem);
    float* list_keys = q_s + 2 * half_stride;
    int* list_rows = reinterpret_cast<int*>(list_keys + WARPS * NQ * cap);
    int* list_count = list_rows + WARPS * NQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + WARPS * NQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int half = lane & 1;
    const int split = blockIdx.x * WARPS + warp;
    const int splits = gridDim.x * WARPS;
    for (int i = threadIdx.x; i < 2 * half_stride; i += THREADS) {
        const int h = i / half_stride, rest = i % half_stride;
        const int c = rest / (8 * NQ), e = (rest / NQ) % 8, qi = rest % NQ;
        const int d = 16 * c + 8 * h + e;
        q_s[i] = (rest < chunks * 8 * NQ && qi < n_queries && d < dim) ? queries[(long long)qi * dim + d] : 0.f;
    }
    __syncthreads();
    auto list_of = [&](int qi) {
        const int slot = warp * NQ + qi;
        return CandidateList{list_keys + slot * cap, list_rows + slot * cap, list_count + slot, list_threshold + slot};
    };
#pragma unroll
    for (int qi = 0; qi < NQ; ++qi) reset(list_of(qi));

    const int r_begin = split * rows_per_warp;
    const int r_end = min(n_rows, r_begin + rows_per_warp);
    const float* q_half = q_s + half * half_stride;
    for (int base = r_begin; base < r_end; base += 32) {
        const int row_a = base + (lane >> 1), row_b = row_a + 16;
        const bool valid_a = row_a < r_end, valid_b = row_b < r_end;
        const unsigned short* p_a = rows + (long long)min(row_a, r_end - 1) * dim + 8 * half;
        const unsigned short* p_b = rows + (long long)min(row_b, r_end - 1) * dim + 8 * half;
        float acc_a[NQ], acc_b[NQ];
#pragma unroll
        for (int qi = 0; qi < NQ; ++qi) acc_a[qi] = acc_b[qi] = 0.f;
        const float norm_a = MODE == 1 && valid_a ? sq_norms[row_a] : 0.f;  // in flight during the products
        const float norm_b = MODE == 1 && valid_b ? sq_norms[row_b] : 0.f;
        // The loads of chunks c .. c + AHEAD are in flight while chunk c is scored (deeper for few queries,
        // whose scoring is short).
        constexpr int AHEAD = NQ <= 4 ? 3 : 1;
        uint4 ring_a[AHEAD + 1], ring_b[AHEAD + 1];
#pragma unroll
        for (int j = 0; j <= AHEAD; ++j) {
            const bool inside = j < chunks && 16 * j + 8 * half < dim;
            ring_a[j] = few_load(p_a + 16 * j, inside);
            ring_b[j] = few_load(p_b + 16 * j, inside);
        }
        for (int c = 0; c < chunks; ++c) {
            float xa[8], xb[8];
            few_unpack(ring_a[0], xa);
            few_unpack(ring_b[0], xb);
#pragma unroll
            for (int j = 0; j < AHEAD; ++j) {
                ring_a[j] = ring_a[j + 1];
                ring_b[j] = ring_b[j + 1];
            }
            const int later = c + AHEAD + 1;
            const bool later_inside = later < chunks && 16 * later + 8 * half < dim;
            ring_a[AHEAD] = few_load(p_a + 16 * later, later_inside);
            ring_b[AHEAD] = few_load(p_b + 16 * later, later_inside);
            const float* qc = q_half + c * 8 * NQ;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                if constexpr (NQ % 4 == 0) {
#pragma unroll
                    for (int q4 = 0; q4 < NQ; q4 += 4) {
                        const float4 qv = *reinterpret_cast<const float4*>(qc + e * NQ + q4);
                        const float qq[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            acc_a[q4 + j] = few_term<MODE>(acc_a[q4 + j], qq[j], xa[e]);
                            acc_b[q4 + j] = few_term<MODE>(acc_b[q4 + j], qq[j], xb[e]);
                        }
                    }
                } else {
#pragma unroll
                    for (int qi = 0; qi < NQ; ++qi) {
                        const float qv = qc[e * NQ + qi];
                        acc_a[qi] = few_term<MODE>(acc_a[qi], qv, xa[e]);
                        acc_b[qi] = few_term<MODE>(acc_b[qi], qv, xb[e]);
                    }
                }
            }
        }
        unsigned want = 0;
#pragma unroll
        for (int qi = 0; qi < NQ; ++qi) {
            float sa = acc_a[qi] + __shfl_xor_sync(GPURAG_FULL_MASK, acc_a[qi], 1);
            float sb = acc_b[qi] + __shfl_xor_sync(GPURAG_FULL_MASK, acc_b[qi], 1);
            if constexpr (MODE == 1) {
                sa = 2.f * sa - norm_a;
                sb = 2.f * sb - norm_b;
            } else if constexpr (MODE == 2) {
                sa = -sa;
                sb = -sb;
            }
            acc_a[qi] = sa;
            acc_b[qi] = sb;
            const float threshold = list_threshold[warp * NQ + qi];
            if (qi < n_queries && ((valid_a && sa > threshold) || (valid_b && sb > threshold))) want |= 1u << qi;
        }
        want = __reduce_or_sync(GPURAG_FULL_MASK, want);
#pragma unroll
        for (int qi = 0; qi < NQ; ++qi) {
            if (want >> qi & 1u) {  // uniform across the warp; the even lane of each pair offers its rows
                offer(list_of(qi), kp, cap, acc_a[qi], row_a, valid_a && half == 0);
                offer(list_of(qi), kp, cap, acc_b[qi], row_b, valid_b && half == 0);
            }
        }
    }
#pragma unroll
    for (int qi = 0; qi < NQ; ++qi) {
        if (qi < n_queries) {
            const long long at = ((long long)qi * splits + split) * kp;
            flush(list_of(qi), kp, cap, out_keys + at, out_rows + at);
        }
    }
}

#define FEW_ARGS                                                                                                   \
    const float *__restrict__ queries, const unsigned short *__restrict__ rows, const float *__restrict__ sq_norms, \
        int n_queries, int n_rows, int dim, int rows_per_warp, int kp, int cap, float *__restrict__ out_keys,      \
        int *__restrict__ out_rows
#define FEW_PASS queries, rows, sq_norms, n_queries, n_rows, dim, rows_per_warp, kp, cap, out_keys, out_rows
// Sixteen queries keep 64 accumulators and a chunk's query values in registers: one block per multiprocessor.
#define FEW_KERNEL(NQ, MODE, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, NQ == 16 ? 1 : 2) NAME(FEW_ARGS) { \
        few_body<NQ, MODE>(FEW_PASS);                                                              \
    }

FEW_KERNEL(1, 0, few_dot_1)
FEW_KERNEL(4, 0, few_dot_4)
FEW_KERNEL(8, 0, few_dot_8)
FEW_KERNEL(16, 0, few_dot_16)
FEW_KERNEL(1, 1, few_l2_1)
FEW_KERNEL(4, 1, few_l2_4)
FEW_KERNEL(8, 1, few_l2_8)
FEW_KERNEL(16, 1, few_l2_16)
FEW_KERNEL(1, 2, few_l1_1)
FEW_KERNEL(4, 2, few_l1_4)
FEW_KERNEL(8, 2, few_l1_8)
FEW_KERNEL(16, 2, few_l1_16)
