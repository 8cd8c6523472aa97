// Register-blocked exact l1 scan for many queries over float32 rows: a 128-query x 128-row block tile per
// CTA, each of its 256 threads an 8 x 8 micro-tile (two 4-wide halves 64 apart, so the float4 reads of
// the k-major operand tiles are free of bank conflicts), operands double-buffered in shared memory with
// the next k-step's loads in flight during the current products, and one flow of k-steps across the
// split's row tiles. Epilogue: a query's keys (-l1) reach shared memory only when one of them beats its
// running kp-th key, and only those queries' lists are offered the tile (select.cuh).
//
// Grid: x = query tiles of BQ queries, y = row splits of rows_per_split rows (a multiple of BN).
// Output: (Q, splits, kp) keys and rows, best first, padded with -inf / -1. Needs dim % 4 == 0 and
// 16-byte aligned operands.
#include "select.cuh"

#define BQ 128
#define BN 128
#define BK 8
#define LDS (BQ + 4)
#define LDC (BN + 4)
#define THREADS 256
#define WARPS (THREADS / 32)
#define QUERIES_PER_WARP (BQ / WARPS)

// This thread's 16-byte pieces of k-step s: one of the query tile, one of the row tile (zero past the ends).
__device__ __forceinline__ void l1_fetch(float4& a, float4& b, const float* __restrict__ queries,
                                         const float* __restrict__ rows, int q0, int n_queries, int r_begin, int r_end,
                                         int dim, int per_tile, int s) {
    const int r = threadIdx.x >> 1, d = (s % per_tile) * BK + (threadIdx.x & 1) * 4;
    const int row = r_begin + (s / per_tile) * BN + r;
    a = make_float4(0.f, 0.f, 0.f, 0.f);
    b = a;
    if (q0 + r < n_queries && d < dim) a = __ldg(reinterpret_cast<const float4*>(queries + (long long)(q0 + r) * dim + d));
    if (row < r_end && d < dim) b = __ldg(reinterpret_cast<const float4*>(rows + (long long)row * dim + d));
}

// Stores the pieces k-major: a_s[k][query], b_s[k][row].
__device__ __forceinline__ void l1_store(float* a_s, float* b_s, float4 a, float4 b) {
    const int r = threadIdx.x >> 1, k = (threadIdx.x & 1) * 4;
    a_s[(k + 0) * LDS + r] = a.x;
    a_s[(k + 1) * LDS + r] = a.y;
    a_s[(k + 2) * LDS + r] = a.z;
    a_s[(k + 3) * LDS + r] = a.w;
    b_s[(k + 0) * LDS + r] = b.x;
    b_s[(k + 1) * LDS + r] = b.y;
    b_s[(k + 2) * LDS + r] = b.z;
    b_s[(k + 3) * LDS + r] = b.w;
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
l1_tile_wide(const float* __restrict__ queries, const float* __restrict__ rows, int n_queries, int n_rows, int dim,
             int rows_per_split, int kp, int cap, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* operands = reinterpret_cast<float*>(smem);  // [buffer][a, b][BK][LDS]
    float* c_s = operands + 2 * 2 * BK * LDS;
    float* list_keys = c_s + BQ * LDC;
    int* list_rows = reinterpret_cast<int*>(list_keys + BQ * cap);
    int* list_count = list_rows + BQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + BQ);
    int* flags = reinterpret_cast<int*>(list_threshold + BQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int q0 = blockIdx.x * BQ;
    const int splits = gridDim.y, split = blockIdx.y;
    const int r_begin = split * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);
    if (threadIdx.x < BQ) flags[threadIdx.x] = 0;
    for (int i = 0; i < QUERIES_PER_WARP; ++i) {
        const int q = warp * QUERIES_PER_WARP + i;
        reset(CandidateList{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q});
    }
    const int per_tile = (dim + BK - 1) / BK;
    const int total = r_end > r_begin ? (r_end - r_begin + BN - 1) / BN * per_tile : 0;
    float4 next_a, next_b;
    if (total > 0) {
        l1_fetch(next_a, next_b, queries, rows, q0, n_queries, r_begin, r_end, dim, per_tile, 0);
        l1_store(operands, operands + BK * LDS, next_a, next_b);
    }
    __syncthreads();
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (int s = 0; s < total; ++s) {
        const float* a_s = operands + (s & 1) * 2 * BK * LDS;
        const float* b_s = a_s + BK * LDS;
        if (s + 1 < total) l1_fetch(next_a, next_b, queries, rows, q0, n_queries, r_begin, r_end, dim, per_tile, s + 1);
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            const float4 a0 = *reinterpret_cast<const float4*>(a_s + k * LDS + ty * 4);
            const float4 a1 = *reinterpret_cast<const float4*>(a_s + k * LDS + 64 + ty * 4);
            const float4 b0 = *reinterpret_cast<const float4*>(b_s + k * LDS + tx * 4);
            const float4 b1 = *reinterpret_cast<const float4*>(b_s + k * LDS + 64 + tx * 4);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] += fabsf(a[i] - b[j]);
        }
        if (s + 1 < total) {
            float* other = operands + ((s + 1) & 1) * 2 * BK * LDS;
            l1_store(other, other + BK * LDS, next_a, next_b);
        }
        if (s % per_tile == per_tile - 1) {
            // Epilogue of row tile `tile`: keys -l1, -inf past the split's rows; flag the queries a key may enter.
            const int tile = r_begin + (s / per_tile) * BN;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int q = (i >> 2) * 64 + ty * 4 + (i & 3);
                const float threshold = list_threshold[q];
                bool passes = false;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int n = (j >> 2) * 64 + tx * 4 + (j & 3);
                    acc[i][j] = tile + n < r_end ? -acc[i][j] : GPURAG_NEG_INF;
                    passes |= acc[i][j] > threshold;
                }
                if (passes) flags[q] = 1;
            }
            __syncthreads();
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int q = (i >> 2) * 64 + ty * 4 + (i & 3);
                if (flags[q]) {
                    *reinterpret_cast<float4*>(c_s + q * LDC + tx * 4) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
                    *reinterpret_cast<float4*>(c_s + q * LDC + 64 + tx * 4) =
                        make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
                }
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
            }
            __syncthreads();
            for (int j = 0; j < QUERIES_PER_WARP; ++j) {
                const int q = warp * QUERIES_PER_WARP + j;
                if (q0 + q >= n_queries) break;
                if (!flags[q]) continue;
                __syncwarp();
                if (lane == 0) flags[q] = 0;
                CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
#pragma unroll
                for (int c = 0; c < BN; c += 32) {
                    const int r = tile + c + lane;
                    offer(list, kp, cap, c_s[q * LDC + c + lane], r, r < r_end);
                }
            }
        }
        __syncthreads();
    }
    for (int j = 0; j < QUERIES_PER_WARP; ++j) {
        const int q = warp * QUERIES_PER_WARP + j;
        if (q0 + q >= n_queries) break;
        CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
        const long long at = ((long long)(q0 + q) * splits + split) * kp;
        flush(list, kp, cap, out_keys + at, out_rows + at);
    }
}
