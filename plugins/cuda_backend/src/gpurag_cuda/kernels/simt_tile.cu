// Tiled SIMT scans with fused selection: l1 over float32 rows (exact) and Hamming over packed codes.
// A block scores a BQ x BN tile (each thread a 4 x 4 micro-tile, operands staged k-major in shared
// memory), writes the oriented scores (-distance) to a shared tile, and its warps offer them to each
// query's candidate list against its running threshold.
//
// Grid: x = query tiles, y = row splits of rows_per_split rows (a multiple of BN).
// Output: (Q, splits, kp) keys and rows, best first, padded with -inf / -1.
#include "select.cuh"

#define BQ 64
#define BN 64
#define BK 16
#define LDS (BQ + 4)
#define LDC (BN + 4)
#define THREADS 256

struct L1Op {
    typedef float T;
    __device__ static float zero() { return 0.f; }
    __device__ static float step(float acc, float q, float x) { return acc + fabsf(q - x); }
    __device__ static float key(float acc) { return -acc; }
};
struct HammingOp {
    typedef unsigned T;
    __device__ static unsigned zero() { return 0u; }
    __device__ static unsigned step(unsigned acc, unsigned q, unsigned x) { return acc + __popc(q ^ x); }
    __device__ static float key(unsigned acc) { return -(float)acc; }
};

template <typename T>
__device__ __forceinline__ void stage(T* dst, const T* __restrict__ src, int row0, int row_end, int k0, int dim) {
    // dst is k-major: dst[k * LDS + row]
    for (int idx = threadIdx.x; idx < BQ * BK; idx += THREADS) {
        int r = idx / BK, c = idx % BK;
        int gr = row0 + r, gk = k0 + c;
        dst[c * LDS + r] = (gr < row_end && gk < dim) ? src[(long long)gr * dim + gk] : (T)0;
    }
}

template <typename Op>
__device__ void tile_body(const typename Op::T* __restrict__ queries, const typename Op::T* __restrict__ rows,
                          int n_queries, int n_rows, int dim, int rows_per_split, int kp, int cap,
                          float* __restrict__ out_keys, int* __restrict__ out_rows) {
    typedef typename Op::T T;
    extern __shared__ __align__(16) unsigned char smem[];
    T* q_s = reinterpret_cast<T*>(smem);
    T* x_s = q_s + BK * LDS;
    float* c_s = reinterpret_cast<float*>(x_s + BK * LDS);
    float* list_keys = c_s + BQ * LDC;
    int* list_rows = reinterpret_cast<int*>(list_keys + BQ * cap);
    int* list_count = list_rows + BQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + BQ);
    int* flags = reinterpret_cast<int*>(list_threshold + BQ);  // a key of the tile may enter the list

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int q0 = blockIdx.x * BQ;
    const int splits = gridDim.y, split = blockIdx.y;
    const int r_begin = split * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);

    for (int i = 0; i < 8; ++i) {
        int q = warp * 8 + i;
        reset(CandidateList{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q});
    }
    if (threadIdx.x < BQ) flags[threadIdx.x] = 0;
    for (int tile = r_begin; tile < r_end; tile += BN) {
        T acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = Op::zero();
        for (int k0 = 0; k0 < dim; k0 += BK) {
            stage(q_s, queries, q0, n_queries, k0, dim);
            stage(x_s, rows, tile, r_end, k0, dim);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < BK; ++k) {
                T a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    a[i] = q_s[k * LDS + ty * 4 + i];
                    b[i] = x_s[k * LDS + tx * 4 + i];
                }
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = Op::step(acc[i][j], a[i], b[j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float threshold = list_threshold[ty * 4 + i];
            bool passes = false;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int n = tx * 4 + j;
                float key = tile + n < r_end ? Op::key(acc[i][j]) : GPURAG_NEG_INF;
                c_s[(ty * 4 + i) * LDC + n] = key;
                passes |= key > threshold;
            }
            if (passes) flags[ty * 4 + i] = 1;
        }
        __syncthreads();
        for (int i = 0; i < 8; ++i) {
            int q = warp * 8 + i;
            if (q0 + q >= n_queries) break;
            if (!flags[q]) continue;
            __syncwarp();
            if (lane == 0) flags[q] = 0;
            CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
#pragma unroll
            for (int c = 0; c < BN; c += 32) {
                int r = tile + c + lane;
                offer(list, kp, cap, c_s[q * LDC + c + lane], r, r < r_end);
            }
        }
        __syncthreads();
    }
    for (int i = 0; i < 8; ++i) {
        int q = warp * 8 + i;
        if (q0 + q >= n_queries) break;
        CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
        long long at = ((long long)(q0 + q) * splits + split) * kp;
        flush(list, kp, cap, out_keys + at, out_rows + at);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
l1_tile(const float* __restrict__ queries, const float* __restrict__ rows, int n_queries, int n_rows, int dim,
        int rows_per_split, int kp, int cap, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    tile_body<L1Op>(queries, rows, n_queries, n_rows, dim, rows_per_split, kp, cap, out_keys, out_rows);
}

// Codes as 32-bit words (Q, words) and (N, words); trailing bytes past the codes are zero.
extern "C" __global__ void __launch_bounds__(THREADS)
hamming_tile(const unsigned* __restrict__ queries, const unsigned* __restrict__ rows, int n_queries, int n_rows,
             int words, int rows_per_split, int kp, int cap, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    tile_body<HammingOp>(queries, rows, n_queries, n_rows, words, rows_per_split, kp, cap, out_keys, out_rows);
}
