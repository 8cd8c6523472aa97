// Fused tensor-core scan for dot / l2 / cosine: bf16 inputs, fp32 accumulation (mma.sync m16n8k16),
// oriented scores (dot: q.x; l2: 2 q.x - |x|^2) selected in the GEMM epilogue against each query's
// running threshold, so no Q x N score matrix reaches memory.
//
// Grid: x = query tiles of BQ queries, y = row splits of rows_per_split rows (a multiple of BN).
// Output: (Q, splits, kp) keys and rows, the kp best of each (query, split), best first; fewer real
// rows than kp are padded with -inf and row -1.
#include "select.cuh"

#define BQ 64
#define BN 128
#define BK 32
#define LDA (BK + 8)
#define LDC (BN + 4)
#define THREADS 256
#define STAGES 4
#define STAGE_ELEMENTS ((BQ + BN) * LDA)
// Bytes before the candidate lists: the operand stages, or the score tile where larger.
#define OPERAND_BYTES (STAGES * STAGE_ELEMENTS * 2 > BQ * LDC * 4 ? STAGES * STAGE_ELEMENTS * 2 : BQ * LDC * 4)
// 16-byte vectors of one stage each thread copies: A then B.
#define A_VECTORS (BQ * BK / 8 / THREADS)
#define B_VECTORS (BN * BK / 8 / THREADS)

__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Copies a (tile_rows x BK) bf16 block starting at (row0, k0) of a (n, dim) matrix into smem, zero-filled.
__device__ __forceinline__ void load_tile(unsigned short* dst, const unsigned short* __restrict__ src, int row0,
                                          int row_end, int k0, int dim, int tile_rows, bool vec) {
    if (vec) {
        for (int idx = threadIdx.x; idx < tile_rows * (BK / 8); idx += THREADS) {
            int r = idx / (BK / 8), c = (idx % (BK / 8)) * 8;
            int gr = row0 + r, gk = k0 + c;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (gr < row_end && gk < dim) v = *reinterpret_cast<const uint4*>(src + (long long)gr * dim + gk);
            *reinterpret_cast<uint4*>(dst + r * LDA + c) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < tile_rows * BK; idx += THREADS) {
            int r = idx / BK, c = idx % BK;
            int gr = row0 + r, gk = k0 + c;
            dst[r * LDA + c] = (gr < row_end && gk < dim) ? src[(long long)gr * dim + gk] : (unsigned short)0;
        }
    }
}

__device__ __forceinline__ unsigned shared_address(const void* pointer) {
    unsigned address;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(address) : "l"(pointer));
    return address;
}

// Starts the asynchronous copy of this thread's 16-byte vectors of the (A, B) stage at k0 into `stage`,
// zero-filled past the ends (a zero-byte copy reads nothing).
__device__ __forceinline__ void issue_stage(unsigned short* stage, const unsigned short* __restrict__ queries,
                                            const unsigned short* __restrict__ rows, int q0, int n_queries,
                                            int tile, int r_end, int k0, int dim) {
#pragma unroll
    for (int i = 0; i < A_VECTORS + B_VECTORS; ++i) {
        bool is_a = i < A_VECTORS;
        int idx = threadIdx.x + (is_a ? i : i - A_VECTORS) * THREADS;
        int r = idx / (BK / 8), c = (idx % (BK / 8)) * 8;
        int gr = (is_a ? q0 : tile) + r, gk = k0 + c;
        bool inside = gr < (is_a ? n_queries : r_end) && gk < dim;
        const unsigned short* base = is_a ? queries : rows;
        const unsigned short* src = inside ? base + (long long)gr * dim + gk : base;
        unsigned short* dst = stage + ((is_a ? 0 : BQ) + r) * LDA + c;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                     "r"(inside ? 16 : 0));
    }
}

__device__ __forceinline__ void commit_stages() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void wait_stages() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// Tensor-core products of one stage into the warp's 32 x 32 accumulators.
__device__ __forceinline__ void mma_stage(float (*acc)[4][4], const unsigned short* a_s, const unsigned short* b_s,
                                          int wq, int wn, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[2][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const unsigned short* base = a_s + (wq + mi * 16 + g) * LDA + kk + 2 * t;
            a[mi][0] = *reinterpret_cast<const unsigned*>(base);
            a[mi][1] = *reinterpret_cast<const unsigned*>(base + 8 * LDA);
            a[mi][2] = *reinterpret_cast<const unsigned*>(base + 8);
            a[mi][3] = *reinterpret_cast<const unsigned*>(base + 8 * LDA + 8);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const unsigned short* base = b_s + (wn + ni * 8 + g) * LDA + kk + 2 * t;
            b[ni][0] = *reinterpret_cast<const unsigned*>(base);
            b[ni][1] = *reinterpret_cast<const unsigned*>(base + 8);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
                mma_bf16(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][0], b[ni][1]);
    }
}

__device__ __forceinline__ void ldmatrix_x4_tc(unsigned* d, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(shared_address(p)));
}

// The same products with ldmatrix-fed fragments: per 16-wide k step two ldmatrix.x4 for A, two for B.
__device__ __forceinline__ void mma_stage_ldm(float (*acc)[4][4], const unsigned short* a_s, const unsigned short* b_s,
                                              int wq, int wn, int lane) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[2][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
            ldmatrix_x4_tc(a[mi], a_s + (wq + mi * 16 + (lane & 15)) * LDA + kk + (lane >> 4) * 8);
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
            unsigned d[4];
            const int m = lane >> 3;
            ldmatrix_x4_tc(d, b_s + (wn + nj * 16 + (m >> 1) * 8 + (lane & 7)) * LDA + kk + (m & 1) * 8);
            b[2 * nj][0] = d[0];
            b[2 * nj][1] = d[1];
            b[2 * nj + 1][0] = d[2];
            b[2 * nj + 1][1] = d[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
                mma_bf16(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][0], b[ni][1]);
    }
}

// Epilogue: the warp's accumulators as oriented scores into the tile c_s, -inf past the split's rows;
// a query's flag is set when one of them passes its threshold (above it, or at least it with `inclusive`).
__device__ __forceinline__ void write_scores(float (*acc)[4][4], float* c_s, const float* __restrict__ sq_norms,
                                             int tile, int r_end, int l2, const float* thresholds, int* flags,
                                             bool inclusive, int wq, int wn, int g, int t) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int q = wq + mi * 16 + g + (e >> 1) * 8;
                int n = wn + ni * 8 + 2 * t + (e & 1);
                int r = tile + n;
                float v = acc[mi][ni][e];
                if (l2 && r < r_end) v = 2.f * v - sq_norms[r];
                v = r < r_end ? v : GPURAG_NEG_INF;
                c_s[q * LDC + n] = v;
                const float threshold = thresholds[q];
                if (v > threshold || (inclusive && v >= threshold)) flags[q] = 1;
            }
}

// Scores the (BQ x BN) tile of queries q0.. against rows tile.. into c_s (oriented keys, -inf past
// r_end); every thread of the block calls it, and c_s is complete when it returns. A query's flag is
// set when any of its keys passes its threshold (above it, or at least it with `inclusive`), so the
// selection skips the queries (most, once the lists are full) that no key of the tile can enter.
template <bool LDM>
__device__ __forceinline__ void score_tile(float* c_s, unsigned short* stages, const unsigned short* __restrict__ queries,
                                           const unsigned short* __restrict__ rows,
                                           const float* __restrict__ sq_norms, int q0, int n_queries, int tile,
                                           int r_end, int dim, int l2, int vec, const float* thresholds,
                                           int* flags, bool inclusive) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wq = (warp >> 2) * 32, wn = (warp & 3) * 32;
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    if (vec) {  // STAGES-deep pipeline of asynchronous copies: stage kt + STAGES - 1 loads during kt's products
        const int stages_in_tile = (dim + BK - 1) / BK;
#pragma unroll
        for (int kt = 0; kt < STAGES - 1; ++kt) {
            if (kt < stages_in_tile)
                issue_stage(stages + kt * STAGE_ELEMENTS, queries, rows, q0, n_queries, tile, r_end, kt * BK, dim);
            commit_stages();
        }
        for (int kt = 0; kt < stages_in_tile; ++kt) {
            wait_stages<STAGES - 2>();  // this thread's copies of stage kt have landed
            __syncthreads();            // everyone's have, and stage kt - 1 is no longer read
            const int next = kt + STAGES - 1;
            if (next < stages_in_tile)
                issue_stage(stages + (next % STAGES) * STAGE_ELEMENTS, queries, rows, q0, n_queries, tile, r_end,
                            next * BK, dim);
            commit_stages();
            unsigned short* stage = stages + (kt % STAGES) * STAGE_ELEMENTS;
            if constexpr (LDM)
                mma_stage_ldm(acc, stage, stage + BQ * LDA, wq, wn, threadIdx.x & 31);
            else
                mma_stage(acc, stage, stage + BQ * LDA, wq, wn, g, t);
        }
        wait_stages<0>();
        __syncthreads();  // the score tile below reuses the stages
    } else {
        for (int k0 = 0; k0 < dim; k0 += BK) {
            load_tile(stages, queries, q0, n_queries, k0, dim, BQ, false);
            load_tile(stages + BQ * LDA, rows, tile, r_end, k0, dim, BN, false);
            __syncthreads();
            mma_stage(acc, stages, stages + BQ * LDA, wq, wn, g, t);
            __syncthreads();
        }
    }

    write_scores(acc, c_s, sq_norms, tile, r_end, l2, thresholds, flags, inclusive, wq, wn, g, t);
    __syncthreads();
}

template <bool LDM>
__device__ __forceinline__ void scan_tc_body(const unsigned short* __restrict__ queries,
                                             const unsigned short* __restrict__ rows,
                                             const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim,
                                             int rows_per_split, int l2, int kp, int cap, int vec,
                                             float* __restrict__ out_keys, int* __restrict__ out_rows) {
    extern __shared__ __align__(16) unsigned char smem[];
    // Two stages of (A, B) operand tiles; the score tile reuses their space once a row tile is scored.
    unsigned short* stages = reinterpret_cast<unsigned short*>(smem);
    float* c_s = reinterpret_cast<float*>(smem);
    float* list_keys = reinterpret_cast<float*>(smem + OPERAND_BYTES);
    int* list_rows = reinterpret_cast<int*>(list_keys + BQ * cap);
    int* list_count = list_rows + BQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + BQ);
    int* flags = reinterpret_cast<int*>(list_threshold + BQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * BQ;
    const int splits = gridDim.y, split = blockIdx.y;
    if (threadIdx.x < BQ) flags[threadIdx.x] = 0;
    const int r_begin = split * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);

    for (int i = 0; i < 8; ++i) {
        int q = warp * 8 + i;
        reset(CandidateList{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q});
    }
    for (int tile = r_begin; tile < r_end; tile += BN) {
        score_tile<LDM>(c_s, stages, queries, rows, sq_norms, q0, n_queries, tile, r_end, dim, l2, vec, list_threshold,
                   flags, false);
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

extern "C" __global__ void __launch_bounds__(THREADS, 2)
scan_bf16_tc(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
             const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim, int rows_per_split, int l2,
             int kp, int cap, int vec, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    scan_tc_body<false>(queries, rows, sq_norms, n_queries, n_rows, dim, rows_per_split, l2, kp, cap, vec, out_keys,
                        out_rows);
}

// The same scan with ldmatrix-fed fragments (fewer shared-memory instructions per product).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
scan_bf16_tc_ldm(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
                 const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim, int rows_per_split, int l2,
                 int kp, int cap, int vec, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    scan_tc_body<true>(queries, rows, sq_norms, n_queries, n_rows, dim, rows_per_split, l2, kp, cap, vec, out_keys,
                       out_rows);
}

// The same scan for any k: every row whose key reaches its query's threshold is appended to that
// query's buffer of `capacity` entries (keys, rows); counts[q] ends as the number of such rows, past
// `capacity` when the buffer overflowed (the entries past it are dropped).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
collect_bf16_tc(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
                const float* __restrict__ sq_norms, const float* __restrict__ thresholds, int n_queries, int n_rows,
                int dim, int rows_per_split, int l2, int vec, int capacity, float* __restrict__ out_keys,
                int* __restrict__ out_rows, int* __restrict__ counts) {
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned short* stages = reinterpret_cast<unsigned short*>(smem);
    float* c_s = reinterpret_cast<float*>(smem);
    float* threshold_s = reinterpret_cast<float*>(smem + OPERAND_BYTES);
    int* flags = reinterpret_cast<int*>(threshold_s + BQ);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * BQ;
    const int r_begin = blockIdx.y * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);
    if (threadIdx.x < BQ) {
        flags[threadIdx.x] = 0;
        threshold_s[threadIdx.x] = q0 + threadIdx.x < n_queries ? thresholds[q0 + threadIdx.x] : GPURAG_NEG_INF;
    }
    for (int tile = r_begin; tile < r_end; tile += BN) {
        score_tile<false>(c_s, stages, queries, rows, sq_norms, q0, n_queries, tile, r_end, dim, l2, vec, threshold_s, flags,
                   true);
        for (int i = 0; i < 8; ++i) {
            int q = warp * 8 + i;
            if (q0 + q >= n_queries) break;
            if (!flags[q]) continue;
            __syncwarp();
            if (lane == 0) flags[q] = 0;
            const float threshold = threshold_s[q];
#pragma unroll
            for (int c = 0; c < BN; c += 32) {
                int r = tile + c + lane;
                float key = c_s[q * LDC + c + lane];
                bool take = r < r_end && key >= threshold;
                unsigned mask = __ballot_sync(GPURAG_FULL_MASK, take);
                if (mask == 0) continue;
                int base = 0;
                if (lane == 0) base = atomicAdd(counts + q0 + q, __popc(mask));
                base = __shfl_sync(GPURAG_FULL_MASK, base, 0);
                int at = base + __popc(mask & ((1u << lane) - 1u));
                if (take && at < capacity) {
                    out_keys[(long long)(q0 + q) * capacity + at] = key;
                    out_rows[(long long)(q0 + q) * capacity + at] = r;
                }
            }
        }
        __syncthreads();
    }
}

#define FLOW_STAGES 3

// The same scan with one copy pipeline across all of the split's row tiles (vector loads only): the next
// tile's first stages load during this tile's last products, epilogue and selection, so a small D (few
// stages per tile) does not wait out the copy latency at every tile. The score tile has its own space.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
scan_bf16_tc_flow(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
                  const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim, int rows_per_split, int l2,
                  int kp, int cap, int vec, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned short* stages = reinterpret_cast<unsigned short*>(smem);
    float* c_s = reinterpret_cast<float*>(stages + FLOW_STAGES * STAGE_ELEMENTS);
    float* list_keys = c_s + BQ * LDC;
    int* list_rows = reinterpret_cast<int*>(list_keys + BQ * cap);
    int* list_count = list_rows + BQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + BQ);
    int* flags = reinterpret_cast<int*>(list_threshold + BQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wq = (warp >> 2) * 32, wn = (warp & 3) * 32;
    const int q0 = blockIdx.x * BQ;
    const int splits = gridDim.y, split = blockIdx.y;
    if (threadIdx.x < BQ) flags[threadIdx.x] = 0;
    const int r_begin = split * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);
    for (int i = 0; i < 8; ++i) {
        int q = warp * 8 + i;
        reset(CandidateList{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q});
    }
    const int per_tile = (dim + BK - 1) / BK;
    const int total = r_end > r_begin ? (r_end - r_begin + BN - 1) / BN * per_tile : 0;
    // Stage i of the flow: row tile r_begin + (i / per_tile) * BN, columns (i % per_tile) * BK.
#pragma unroll
    for (int i = 0; i < FLOW_STAGES - 1; ++i) {
        if (i < total)
            issue_stage(stages + i * STAGE_ELEMENTS, queries, rows, q0, n_queries, r_begin + (i / per_tile) * BN,
                        r_end, (i % per_tile) * BK, dim);
        commit_stages();
    }
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    for (int i = 0; i < total; ++i) {
        wait_stages<FLOW_STAGES - 2>();  // this thread's copies of stage i have landed
        __syncthreads();                 // everyone's have; stage i - 1 and the last selection are done
        const int next = i + FLOW_STAGES - 1;
        if (next < total)
            issue_stage(stages + (next % FLOW_STAGES) * STAGE_ELEMENTS, queries, rows, q0, n_queries,
                        r_begin + (next / per_tile) * BN, r_end, (next % per_tile) * BK, dim);
        commit_stages();
        unsigned short* stage = stages + (i % FLOW_STAGES) * STAGE_ELEMENTS;
        mma_stage(acc, stage, stage + BQ * LDA, wq, wn, g, t);
        if (i % per_tile != per_tile - 1) continue;
        const int tile = r_begin + (i / per_tile) * BN;
        write_scores(acc, c_s, sq_norms, tile, r_end, l2, list_threshold, flags, false, wq, wn, g, t);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
        __syncthreads();
        for (int j = 0; j < 8; ++j) {
            int q = warp * 8 + j;
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
    }
    wait_stages<0>();
    for (int j = 0; j < 8; ++j) {
        int q = warp * 8 + j;
        if (q0 + q >= n_queries) break;
        CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
        long long at = ((long long)(q0 + q) * splits + split) * kp;
        flush(list, kp, cap, out_keys + at, out_rows + at);
    }
}

// --- The register-filtered scan ---------------------------------------------------------------------
// The same products and lists with the selection kept out of shared memory: each thread compares its own
// accumulators (oriented keys) with its queries' running thresholds in registers and appends only the keys
// above them to the query's list (a shared-memory atomic per key taken, rare once the lists are full). A
// key that finds its list full stays marked in a per-thread bit mask; when any thread holds one (one
// barrier tells), the block compacts the full lists (keeping their kp best, raising their thresholds) and
// offers the marked keys again, until none is left, so nothing is lost. One copy pipeline flows across the split's row tiles (vector loads only).
// The block tile is (MI x 32) queries by (NI x 32) rows: 8 warps of (MI x 16) x (NI x 8) each.
#define REG_STAGES 4

template <int MI, int NI>
__device__ __forceinline__ void issue_stage_reg(unsigned short* stage, const unsigned short* __restrict__ queries,
                                                const unsigned short* __restrict__ rows, int q0, int n_queries,
                                                int tile, int r_end, int k0, int dim) {
    constexpr int TBQ = MI * 32, TBN = NI * 32;
    constexpr int AV = TBQ * BK / 8 / THREADS, BV = TBN * BK / 8 / THREADS;
#pragma unroll
    for (int i = 0; i < AV + BV; ++i) {
        const bool is_a = i < AV;
        const int idx = threadIdx.x + (is_a ? i : i - AV) * THREADS;
        const int r = idx / (BK / 8), c = (idx % (BK / 8)) * 8;
        const int gr = (is_a ? q0 : tile) + r, gk = k0 + c;
        const bool inside = gr < (is_a ? n_queries : r_end) && gk < dim;
        const unsigned short* base = is_a ? queries : rows;
        const unsigned short* src = inside ? base + (long long)gr * dim + gk : base;
        unsigned short* dst = stage + ((is_a ? 0 : TBQ) + r) * LDA + c;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                     "r"(inside ? 16 : 0));
    }
}

// A warp's (MI x 16) x (NI x 8) products of one stage, fragments fed by ldmatrix.
template <int MI, int NI>
__device__ __forceinline__ void mma_stage_reg(float (*acc)[NI][4], const unsigned short* a_s, const unsigned short* b_s,
                                              int wq, int wn, int lane) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
            ldmatrix_x4_tc(a[mi], a_s + (wq + mi * 16 + (lane & 15)) * LDA + kk + (lane >> 4) * 8);
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
            unsigned d[4];
            const int m = lane >> 3;
            ldmatrix_x4_tc(d, b_s + (wn + nj * 16 + (m >> 1) * 8 + (lane & 7)) * LDA + kk + (m & 1) * 8);
            b[2 * nj][0] = d[0];
            b[2 * nj][1] = d[1];
            b[2 * nj + 1][0] = d[2];
            b[2 * nj + 1][1] = d[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
                mma_bf16(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][0], b[ni][1]);
    }
}

template <int MI, int NI>
__device__ __forceinline__ void scan_reg_body(const unsigned short* __restrict__ queries,
                                              const unsigned short* __restrict__ rows,
                                              const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim,
                                              int rows_per_split, int l2, int kp, int cap,
                                              float* __restrict__ out_keys, int* __restrict__ out_rows) {
    constexpr int TBQ = MI * 32, TBN = NI * 32;
    constexpr int STAGE_E = (TBQ + TBN) * LDA;
    constexpr int MASK_WORDS = (MI * NI * 4 + 31) / 32;
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned short* stages = reinterpret_cast<unsigned short*>(smem);
    float* list_keys = reinterpret_cast<float*>(smem + REG_STAGES * STAGE_E * 2);
    int* list_rows = reinterpret_cast<int*>(list_keys + TBQ * cap);
    int* list_count = list_rows + TBQ * cap;
    float* list_threshold = reinterpret_cast<float*>(list_count + TBQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wq = (warp >> 2) * MI * 16, wn = (warp & 3) * NI * 8;
    const int q0 = blockIdx.x * TBQ;
    const int splits = gridDim.y, split = blockIdx.y;
    const int r_begin = split * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);
    for (int i = threadIdx.x; i < TBQ; i += THREADS) {
        list_count[i] = 0;
        list_threshold[i] = GPURAG_NEG_INF;
    }
    __syncthreads();

    const int per_tile = (dim + BK - 1) / BK;
    const int total = r_end > r_begin ? (r_end - r_begin + TBN - 1) / TBN * per_tile : 0;
#pragma unroll
    for (int i = 0; i < REG_STAGES - 1; ++i) {
        if (i < total)
            issue_stage_reg<MI, NI>(stages + i * STAGE_E, queries, rows, q0, n_queries,
                                    r_begin + (i / per_tile) * TBN, r_end, (i % per_tile) * BK, dim);
        commit_stages();
    }
    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    float norm[NI][2];
    for (int i = 0; i < total; ++i) {
        wait_stages<REG_STAGES - 2>();  // this thread's copies of stage i have landed
        __syncthreads();                // everyone's have; stage i - 1 is no longer read
        const int next = i + REG_STAGES - 1;
        if (next < total)
            issue_stage_reg<MI, NI>(stages + (next % REG_STAGES) * STAGE_E, queries, rows, q0, n_queries,
                                    r_begin + (next / per_tile) * TBN, r_end, (next % per_tile) * BK, dim);
        commit_stages();
        const int tile = r_begin + (i / per_tile) * TBN;
        if (i % per_tile == 0) {  // this tile's norms, read while its products run
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int r = tile + wn + ni * 8 + 2 * t + c;
                    norm[ni][c] = l2 && r < r_end ? sq_norms[r] : 0.f;
                }
        }
        unsigned short* stage = stages + (i % REG_STAGES) * STAGE_E;
        mma_stage_reg<MI, NI>(acc, stage, stage + TBQ * LDA, wq, wn, lane);
        if (i % per_tile != per_tile - 1) continue;

        // Epilogue: oriented keys in place (-inf past the rows or the queries), then offered until all are placed.
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int q = q0 + wq + mi * 16 + g + (e >> 1) * 8;
                    const int r = tile + wn + ni * 8 + 2 * t + (e & 1);
                    const float v = l2 ? 2.f * acc[mi][ni][e] - norm[ni][e & 1] : acc[mi][ni][e];
                    acc[mi][ni][e] = (r < r_end && q < n_queries) ? v : GPURAG_NEG_INF;
                }
        unsigned marked[MASK_WORDS];  // bit (mi * NI + ni) * 4 + e: a key not yet placed or dropped
#pragma unroll
        for (int w = 0; w < MASK_WORDS; ++w) marked[w] = ~0u;
        while (true) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int q = wq + mi * 16 + g + h * 8;
                    const float threshold = list_threshold[q];
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int e = h * 2 + c;
                            const int bit = (mi * NI + ni) * 4 + e;
                            const unsigned flag = 1u << (bit & 31);
                            if (!(marked[bit >> 5] & flag)) continue;
                            const float v = acc[mi][ni][e];
                            if (!(v > threshold)) {
                                marked[bit >> 5] &= ~flag;
                                continue;
                            }
                            const int at = atomicAdd(list_count + q, 1);
                            if (at < cap) {
                                list_keys[q * cap + at] = v;
                                list_rows[q * cap + at] = tile + wn + ni * 8 + 2 * t + c;
                                marked[bit >> 5] &= ~flag;
                            }
                        }
                }
            bool left = false;  // a key of this thread found its list full
#pragma unroll
            for (int w = 0; w < MASK_WORDS; ++w) left |= marked[w] != 0u;
            if (!__syncthreads_or(left)) break;
            for (int q = warp; q < TBQ; q += THREADS / 32) {
                if (list_count[q] <= cap) continue;
                __syncwarp();
                if (lane == 0) list_count[q] = cap;
                __syncwarp();
                compact(CandidateList{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q}, kp,
                        cap);
            }
            __syncthreads();
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    }
    wait_stages<0>();
    for (int q = warp; q < TBQ; q += THREADS / 32) {
        if (q0 + q >= n_queries) break;
        CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
        long long at = ((long long)(q0 + q) * splits + split) * kp;
        flush(list, kp, cap, out_keys + at, out_rows + at);
    }
}

#define SCAN_REG_ARGS                                                                                             \
    const unsigned short *__restrict__ queries, const unsigned short *__restrict__ rows,                          \
        const float *__restrict__ sq_norms, int n_queries, int n_rows, int dim, int rows_per_split, int l2, int kp, \
        int cap, float *__restrict__ out_keys, int *__restrict__ out_rows
#define SCAN_REG_PASS queries, rows, sq_norms, n_queries, n_rows, dim, rows_per_split, l2, kp, cap, out_keys, out_rows

// Kernels by block tile (queries x rows).
extern "C" __global__ void __launch_bounds__(THREADS, 2) scan_bf16_reg64x128(SCAN_REG_ARGS) {
    scan_reg_body<2, 4>(SCAN_REG_PASS);
}
extern "C" __global__ void __launch_bounds__(THREADS, 1) scan_bf16_reg128x128(SCAN_REG_ARGS) {
    scan_reg_body<4, 4>(SCAN_REG_PASS);
}
extern "C" __global__ void __launch_bounds__(THREADS, 1) scan_bf16_reg128x256(SCAN_REG_ARGS) {
    scan_reg_body<4, 8>(SCAN_REG_PASS);
}
