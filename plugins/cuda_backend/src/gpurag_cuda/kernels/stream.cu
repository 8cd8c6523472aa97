// Streaming scan for few queries: every warp of the grid reads its own contiguous run of rows once,
// scores them against all (at most MAX_QUERIES) queries, and keeps each query's kp best against a
// running threshold. One warp's run of rows is one split of the output.
//
// Rows are bf16 (stream_bf16: dot / l2 oriented scores from a bf16 copy, a shortlist) or float32
// (stream_f32: exact dot / l2 / l1). Queries are float32 (for bf16 rows already rounded to bf16, so
// every product is exact). mode: 0 dot q.x, 1 l2 2 q.x - |x|^2, 2 l1 -sum|q - x|.
// Output: (Q, splits, kp) keys and rows, best first, padded with -inf / -1.
#include "select.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)
#define MAX_QUERIES 8
#define GROUP 4

__device__ __forceinline__ void unpack(uint4 v, float* out) {  // 8 bf16
    unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack(float4 v, float* out) {
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
__device__ __forceinline__ float element(const unsigned short* p, long long i) { return __uint_as_float((unsigned)p[i] << 16); }
__device__ __forceinline__ float element(const float* p, long long i) { return p[i]; }

template <typename V> struct Lanes;
// N: elements per 16-byte vector; REG: vectors per lane a single query keeps in registers (D up to 768
// either way); ROWS: rows whose loads a warp has in flight at once (within 128 registers).
template <> struct Lanes<uint4> { static constexpr int N = 8, REG = 3, ROWS = 4; };
template <> struct Lanes<float4> { static constexpr int N = 4, REG = 6, ROWS = 2; };

__device__ __forceinline__ float term(float acc, float q, float x, int mode) {
    return mode == 2 ? acc + fabsf(q - x) : fmaf(q, x, acc);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(GPURAG_FULL_MASK, v, o);
    return v;
}

// T: element type of the rows; V: their 16-byte vector (uint4 of 8 bf16, float4 of 4 floats).
// ONE: a single query with vector loads, its elements in registers; else up to MAX_QUERIES from shared memory.
template <typename T, typename V, bool ONE>
__device__ __forceinline__ void stream_body(const float* __restrict__ queries, const T* __restrict__ rows,
                            const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim,
                            int rows_per_warp, int mode, int kp, int cap, int vec, float* __restrict__ out_keys,
                            int* __restrict__ out_rows) {
    constexpr int L = Lanes<V>::N, REG_CHUNKS = Lanes<V>::REG, ROWS_AT_ONCE = Lanes<V>::ROWS;
    extern __shared__ __align__(16) unsigned char smem[];
    float* q_s = reinterpret_cast<float*>(smem);
    const int dim_pad = (dim + 3) & ~3;
    float* list_keys = q_s + MAX_QUERIES * dim_pad;
    int* list_rows = reinterpret_cast<int*>(list_keys + WARPS * MAX_QUERIES * cap);
    int* list_count = list_rows + WARPS * MAX_QUERIES * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + WARPS * MAX_QUERIES);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x * WARPS + warp;
    const int splits = gridDim.x * WARPS;
    for (int i = threadIdx.x; i < n_queries * dim; i += THREADS) q_s[(i / dim) * dim_pad + i % dim] = queries[i];
    __syncthreads();

    // Query qi's candidate list of this warp.
    auto list_of = [&](int qi) {
        int slot = warp * MAX_QUERIES + qi;
        return CandidateList{list_keys + slot * cap, list_rows + slot * cap, list_count + slot, list_threshold + slot};
    };
#pragma unroll
    for (int qi = 0; qi < MAX_QUERIES; ++qi) reset(list_of(qi));
    const int r_begin = split * rows_per_warp;
    const int r_end = min(n_rows, r_begin + rows_per_warp);
    const int chunks = dim / L;
    // One query with vector loads: its elements stay in registers.
    float q_reg[REG_CHUNKS][L];
    if constexpr (ONE) {
#pragma unroll
        for (int c = 0; c < REG_CHUNKS; ++c)
#pragma unroll
            for (int e = 0; e < L; ++e) {
                int d = (c * 32 + lane) * L + e;
                q_reg[c][e] = d < dim ? q_s[d] : 0.f;
            }
    }

    for (int base = r_begin; base < r_end; base += 32) {
        float mine[MAX_QUERIES];
#pragma unroll
        for (int qi = 0; qi < MAX_QUERIES; ++qi) mine[qi] = GPURAG_NEG_INF;
        const int count = min(32, r_end - base);
        if constexpr (ONE) {  // ROWS_AT_ONCE rows at a time: all their loads in flight together
            for (int j = 0; j < count; j += ROWS_AT_ONCE) {
                V v[ROWS_AT_ONCE][REG_CHUNKS];
#pragma unroll
                for (int u = 0; u < ROWS_AT_ONCE; ++u) {
                    const int row = base + min(j + u, count - 1);  // past the batch: the last row again
                    const V* src = reinterpret_cast<const V*>(rows + (long long)row * dim);
#pragma unroll
                    for (int c = 0; c < REG_CHUNKS; ++c) {
                        int chunk = c * 32 + lane;
                        if (chunk < chunks) v[u][c] = src[chunk];
                    }
                }
#pragma unroll
                for (int u = 0; u < ROWS_AT_ONCE; ++u) {
                    float acc = 0.f;
#pragma unroll
                    for (int c = 0; c < REG_CHUNKS; ++c) {
                        int chunk = c * 32 + lane;
                        if (chunk < chunks) {
                            float x[L];
                            unpack(v[u][c], x);
#pragma unroll
                            for (int e = 0; e < L; ++e) acc = term(acc, q_reg[c][e], x[e], mode);
                        }
                    }
                    float score = warp_sum(acc);
                    const int row = base + min(j + u, count - 1);
                    if (mode == 1) score = 2.f * score - sq_norms[row];
                    else if (mode == 2) score = -score;
                    if (j + u < count && lane == j + u) mine[0] = score;
                }
            }
        }
        // Rows of at most 32 vectors: GROUP rows' loads are issued together before any is scored.
        const bool short_rows = vec && chunks <= 32;
        for (int j0 = 0; j0 < count && !ONE; j0 += GROUP) {
            V ahead[GROUP];
            if (short_rows) {
#pragma unroll
                for (int u = 0; u < GROUP; ++u) {
                    const long long r = base + min(j0 + u, count - 1);
                    if (lane < chunks) ahead[u] = reinterpret_cast<const V*>(rows + r * dim)[lane];
                }
            }
#pragma unroll
            for (int u = 0; u < GROUP; ++u) {
            const int j = j0 + u;
            if (j >= count) break;
            const long long r = base + j;
            float acc[MAX_QUERIES];
#pragma unroll
            for (int qi = 0; qi < MAX_QUERIES; ++qi) acc[qi] = 0.f;
            if (short_rows) {
                if (lane < chunks) {
                    float x[L];
                    unpack(ahead[u], x);
#pragma unroll
                    for (int qi = 0; qi < MAX_QUERIES; ++qi) {
                        if (qi < n_queries) {
                            const float* q = q_s + qi * dim_pad + lane * L;
#pragma unroll
                            for (int e = 0; e < L; ++e) acc[qi] = term(acc[qi], q[e], x[e], mode);
                        }
                    }
                }
            } else if (vec) {
                const V* row = reinterpret_cast<const V*>(rows + r * dim);
                for (int chunk = lane; chunk < chunks; chunk += 32) {
                    float x[L];
                    unpack(row[chunk], x);
#pragma unroll
                    for (int qi = 0; qi < MAX_QUERIES; ++qi) {
                        if (qi < n_queries) {
                            const float* q = q_s + qi * dim_pad + chunk * L;
#pragma unroll
                            for (int e = 0; e < L; ++e) acc[qi] = term(acc[qi], q[e], x[e], mode);
                        }
                    }
                }
            } else {
                for (int d = lane; d < dim; d += 32) {
                    float x = element(rows, r * dim + d);
#pragma unroll
                    for (int qi = 0; qi < MAX_QUERIES; ++qi)
                        if (qi < n_queries) acc[qi] = term(acc[qi], q_s[qi * dim_pad + d], x, mode);
                }
            }
            const float norm = mode == 1 ? sq_norms[r] : 0.f;
#pragma unroll
            for (int qi = 0; qi < MAX_QUERIES; ++qi) {
                if (qi < n_queries) {
                    float s = warp_sum(acc[qi]);
                    s = mode == 0 ? s : (mode == 1 ? 2.f * s - norm : -s);
                    if (lane == j) mine[qi] = s;
                }
            }
        }
        }
#pragma unroll
        for (int qi = 0; qi < MAX_QUERIES; ++qi)
            if (qi < n_queries) offer(list_of(qi), kp, cap, mine[qi], base + lane, lane < count);
    }
#pragma unroll
    for (int qi = 0; qi < MAX_QUERIES; ++qi) {
        if (qi < n_queries) {
            long long at = ((long long)qi * splits + split) * kp;
            flush(list_of(qi), kp, cap, out_keys + at, out_rows + at);
        }
    }
}

#define STREAM_ARGS                                                                                              \
    const float *__restrict__ queries, const T *__restrict__ rows, const float *__restrict__ sq_norms, int n_queries, \
        int n_rows, int dim, int rows_per_warp, int mode, int kp, int cap, int vec, float *__restrict__ out_keys,     \
        int *__restrict__ out_rows
#define STREAM_PASS queries, rows, sq_norms, n_queries, n_rows, dim, rows_per_warp, mode, kp, cap, vec, out_keys, out_rows

#define T unsigned short
extern "C" __global__ void __launch_bounds__(THREADS, 2) stream_bf16(STREAM_ARGS) {
    stream_body<T, uint4, false>(STREAM_PASS);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2) stream_one_bf16(STREAM_ARGS) {
    stream_body<T, uint4, true>(STREAM_PASS);
}
#undef T
#define T float
extern "C" __global__ void __launch_bounds__(THREADS, 2) stream_f32(STREAM_ARGS) {
    stream_body<T, float4, false>(STREAM_PASS);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2) stream_one_f32(STREAM_ARGS) {
    stream_body<T, float4, true>(STREAM_PASS);
}
#undef T
