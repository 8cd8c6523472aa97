// Scoring kernels of gpurag-cupy: l1 and Hamming score tiles for the selection, the direct float64
// re-scoring of selected rows, and the direct pairwise matrix.

typedef long long i64;

#define METRIC_DOT 0
#define METRIC_L2 1
#define METRIC_COSINE 2
#define METRIC_L1 3

// out[q, j] = -sum_d |x[j, d] - queries[q, d]| for QB queries per block row (grid.y over query groups),
// one warp per database row, lanes striding the dimension (coalesced); the database streams once
// per query group. Queries are read through the cache (every warp reads the same ones).
template <int QB>
__global__ void l1_scores(const float* __restrict__ queries, int n_queries, const float* __restrict__ vectors,
                          i64 n, int dim, float* out, i64 ld) {
    const int q0 = blockIdx.y * QB;
    const int nq = min(QB, n_queries - q0);
    const int lane = threadIdx.x & 31;
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < n; row += warps) {
        const float* x = vectors + row * dim;
        float acc[QB];
#pragma unroll
        for (int i = 0; i < QB; ++i) acc[i] = 0.f;
        for (int d = lane; d < dim; d += 32) {
            const float v = __ldg(x + d);
#pragma unroll
            for (int i = 0; i < QB; ++i) {
                if (i < nq) acc[i] += fabsf(v - __ldg(queries + static_cast<i64>(q0 + i) * dim + d));
            }
        }
#pragma unroll
        for (int i = 0; i < QB; ++i) {
            if (i < nq) {
                float s = acc[i];
#pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
                if (lane == 0) out[static_cast<i64>(q0 + i) * ld + row] = -s;
            }
        }
    }
}

// As l1_scores, with each lane's share of the QB queries held in registers: lane l keeps elements
// l, l + 32, ... (DMAX of them, dim <= 32 * DMAX), so a database row costs its own loads only.
template <int QB, int DMAX>
__global__ void l1_scores_registers(const float* __restrict__ queries, int n_queries,
                                    const float* __restrict__ vectors, i64 n, int dim, float* out, i64 ld) {
    const int q0 = blockIdx.y * QB;
    const int nq = min(QB, n_queries - q0);
    const int lane = threadIdx.x & 31;
    float held[QB][DMAX];
#pragma unroll
    for (int i = 0; i < QB; ++i) {
#pragma unroll
        for (int t = 0; t < DMAX; ++t) {
            const int d = lane + 32 * t;
            held[i][t] = (i < nq && d < dim) ? queries[static_cast<i64>(q0 + i) * dim + d] : 0.f;
        }
    }
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < n; row += warps) {
        const float* x = vectors + row * dim;
        float acc[QB];
#pragma unroll
        for (int i = 0; i < QB; ++i) acc[i] = 0.f;
#pragma unroll
        for (int t = 0; t < DMAX; ++t) {
            const int d = lane + 32 * t;
            if (d < dim) {
                const float v = __ldg(x + d);
#pragma unroll
                for (int i = 0; i < QB; ++i) acc[i] += fabsf(v - held[i][t]);
            }
        }
#pragma unroll
        for (int i = 0; i < QB; ++i) {
            if (i < nq) {
                float s = acc[i];
#pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
                if (lane == 0) out[static_cast<i64>(q0 + i) * ld + row] = -s;
            }
        }
    }
}

// out[q, j] = alpha * queries[q] · vectors[j] (float32 products summed in float32), for few queries:
// one warp per row, each lane holding its share of the QB queries in registers, as
// l1_scores_registers; the database streams once per query group.
template <int QB, int DMAX>
__global__ void dot_scores_registers(const float* __restrict__ queries, int n_queries,
                                     const float* __restrict__ vectors, i64 n, int dim, float alpha, float* out,
                                     i64 ld) {
    const int q0 = blockIdx.y * QB;
    const int nq = min(QB, n_queries - q0);
    const int lane = threadIdx.x & 31;
    float held[QB][DMAX];
#pragma unroll
    for (int i = 0; i < QB; ++i) {
#pragma unroll
        for (int t = 0; t < DMAX; ++t) {
            const int d = lane + 32 * t;
            held[i][t] = (i < nq && d < dim) ? queries[static_cast<i64>(q0 + i) * dim + d] : 0.f;
        }
    }
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < n; row += warps) {
        const float* x = vectors + row * dim;
        float acc[QB];
#pragma unroll
        for (int i = 0; i < QB; ++i) acc[i] = 0.f;
#pragma unroll
        for (int t = 0; t < DMAX; ++t) {
            const int d = lane + 32 * t;
            if (d < dim) {
                const float v = __ldg(x + d);
#pragma unroll
                for (int i = 0; i < QB; ++i) acc[i] = fmaf(v, held[i][t], acc[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < QB; ++i) {
            if (i < nq) {
                float s = acc[i];
#pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
                if (lane == 0) out[static_cast<i64>(q0 + i) * ld + row] = alpha * s;
            }
        }
    }
}

// out[q, j] = -popcount(codes[q] ^ database[j]) over `width` bytes. Grid: (row blocks, queries).
__global__ void hamming_scores(const unsigned char* codes, const unsigned char* database, int width, i64 n,
                               float* out, i64 ld) {
    const int q = blockIdx.y;
    const i64 j = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const unsigned char* a = codes + static_cast<i64>(q) * width;
    const unsigned char* b = database + j * width;
    int distance = 0;
    for (int w = 0; w < width; ++w) distance += __popc(static_cast<unsigned>(a[w] ^ b[w]));
    out[static_cast<i64>(q) * ld + j] = -static_cast<float>(distance);
}

// out[q, c] = the metric between queries[q] and vectors[rows[q, c]], summed directly in float64
// (l2 over squared differences, l1 over absolute ones; cosine 0 where either vector is zero).
// One warp per (query, candidate).
__global__ void rescore(const float* __restrict__ queries, const float* __restrict__ vectors, int dim,
                        const i64* rows, int width, int n_queries, int metric, float* out) {
    const i64 warp = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= static_cast<i64>(n_queries) * width) return;
    const i64 q = warp / width;
    const float* a = queries + q * dim;
    const float* b = vectors + rows[warp] * dim;
    double acc = 0.0, aa = 0.0, bb = 0.0;
    for (int d = lane; d < dim; d += 32) {
        const double x = b[d], y = a[d];
        if (metric == METRIC_L2) {
            acc = fma(x - y, x - y, acc);
        } else if (metric == METRIC_L1) {
            acc += fabs(x - y);
        } else {
            acc = fma(x, y, acc);
            aa = fma(y, y, aa);
            bb = fma(x, x, bb);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        aa += __shfl_xor_sync(0xffffffffu, aa, offset);
        bb += __shfl_xor_sync(0xffffffffu, bb, offset);
    }
    if (lane == 0) {
        if (metric == METRIC_COSINE) {
            const double den = sqrt(aa) * sqrt(bb);
            acc = den > 0.0 ? acc / den : 0.0;
        }
        out[warp] = static_cast<float>(acc);
    }
}

// out[q, j] = the metric between queries[q] and vectors[j], summed directly in float64. Grid: (row
// blocks, queries).
__global__ void pairwise_direct(const float* queries, const float* vectors, int dim, i64 n, int metric, float* out) {
    const int q = blockIdx.y;
    const i64 j = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const float* a = queries + static_cast<i64>(q) * dim;
    const float* b = vectors + j * dim;
    double acc = 0.0, aa = 0.0, bb = 0.0;
    for (int d = 0; d < dim; ++d) {
        const double x = b[d], y = a[d];
        if (metric == METRIC_L2) {
            acc = fma(x - y, x - y, acc);
        } else if (metric == METRIC_L1) {
            acc += fabs(x - y);
        } else {
            acc = fma(x, y, acc);
            aa = fma(y, y, aa);
            bb = fma(x, x, bb);
        }
    }
    if (metric == METRIC_COSINE) {
        const double den = sqrt(aa) * sqrt(bb);
        acc = den > 0.0 ? acc / den : 0.0;
    }
    out[static_cast<i64>(q) * n + j] = static_cast<float>(acc);
}

#define SORTED_MAX 1024

// Block-wide: scores query `a` against the k rows row_of[0..k) (shared memory) directly, float64 sums
// as `rescore`, into score[0..k) (shared), then writes them best first (ties by row) to
// out_scores/out_rows[0..k). k <= SORTED_MAX; `higher` says whether a larger score is better; the rows
// are distinct, so every rank is taken once. Every thread of the block calls it.
__device__ void score_and_order(const float* __restrict__ a, const float* __restrict__ vectors, int dim,
                                const i64* row_of, float* score, int k, int metric, int higher, float* out_scores,
                                i64* out_rows) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int c = threadIdx.x >> 5; c < k; c += warps) {
        const float* b = vectors + row_of[c] * dim;
        double acc = 0.0, aa = 0.0, bb = 0.0;
        for (int d = lane; d < dim; d += 32) {
            const double x = b[d], y = a[d];
            if (metric == METRIC_L2) {
                acc = fma(x - y, x - y, acc);
            } else if (metric == METRIC_L1) {
                acc += fabs(x - y);
            } else {
                acc = fma(x, y, acc);
                aa = fma(y, y, aa);
                bb = fma(x, x, bb);
            }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            acc += __shfl_xor_sync(0xffffffffu, acc, offset);
            aa += __shfl_xor_sync(0xffffffffu, aa, offset);
            bb += __shfl_xor_sync(0xffffffffu, bb, offset);
        }
        if (lane == 0) {
            if (metric == METRIC_COSINE) {
                const double den = sqrt(aa) * sqrt(bb);
                acc = den > 0.0 ? acc / den : 0.0;
            }
            score[c] = static_cast<float>(acc);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        const float s = score[c];
        const i64 r = row_of[c];
        int rank = 0;
        for (int o = 0; o < k; ++o) {
            const float t = score[o];
            rank += (higher ? t > s : t < s) || (t == s && row_of[o] < r);
        }
        out_scores[rank] = s;
        out_rows[rank] = r;
    }
}

// One block per query: scores its k candidate rows directly (float64 sums, as `rescore`), then writes
// them best first (ties by row) to out_scores/out_rows[q, :k]. k <= SORTED_MAX.
__global__ void rescore_sorted(const float* __restrict__ queries, const float* __restrict__ vectors, int dim,
                               const i64* rows, int k, int metric, int higher, float* out_scores, i64* out_rows) {
    __shared__ float score[SORTED_MAX];
    __shared__ i64 row_of[SORTED_MAX];
    const int q = blockIdx.x;
    for (int c = threadIdx.x; c < k; c += blockDim.x) row_of[c] = rows[static_cast<i64>(q) * k + c];
    __syncthreads();
    score_and_order(queries + static_cast<i64>(q) * dim, vectors, dim, row_of, score, k, metric, higher,
                    out_scores + static_cast<i64>(q) * k, out_rows + static_cast<i64>(q) * k);
}

// out[j] = alpha * query · vectors[j] for one query (float32 products summed in float32), D % 4 == 0 and
// 16-byte aligned rows: one warp per row, lane l reading float4s l, l + 32, ... (W of them, D <= 128 W)
// with its share of the query in registers; the rows stream once, in 16-byte loads.
template <int W>
__global__ void dot_one_query_vec4(const float4* __restrict__ query, const float4* __restrict__ vectors, i64 n,
                                   int quads, float alpha, float* out) {
    const int lane = threadIdx.x & 31;
    float4 held[W];
#pragma unroll
    for (int t = 0; t < W; ++t) {
        const int d = lane + 32 * t;
        const float4 zero = {0.f, 0.f, 0.f, 0.f};
        held[t] = d < quads ? query[d] : zero;
    }
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < n; row += warps) {
        const float4* x = vectors + row * quads;
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < W; ++t) {
            const int d = lane + 32 * t;
            if (d < quads) {
                const float4 v = __ldg(x + d);
                acc = fmaf(v.x, held[t].x, acc);
                acc = fmaf(v.y, held[t].y, acc);
                acc = fmaf(v.z, held[t].z, acc);
                acc = fmaf(v.w, held[t].w, acc);
            }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (lane == 0) out[row] = alpha * acc;
    }
}
