// Wide-tile tensor-core scan for dot / l2 / cosine: a 128-query x 128-row block tile per CTA, eight warps
// each computing a 64 x 32 warp tile (4 x 4 mma.sync m16n8k16, bf16 in, fp32 accumulate) from
// ldmatrix-fed fragments, one STAGES-deep cp.async pipeline that flows across the split's row tiles
// (the next tile's operands load during this tile's epilogue), and a threshold-filtered epilogue:
// a query's scores reach shared memory only when one of them beats its running kp-th key, and only
// those queries' lists are offered the tile (select.cuh). Shared rows are padded to 40 bf16 (80 bytes),
// which keeps both the cp.async stores and the ldmatrix reads free of bank conflicts.
//
// Grid: x = query tiles of BQ queries, y = row splits of rows_per_split rows (a multiple of BN).
// Output: (Q, splits, kp) keys and rows, the kp best of each (query, split), best first; fewer real
// rows than kp are padded with -inf and row -1. Needs dim % 8 == 0 and 16-byte aligned operands.
#include "select.cuh"

#define BQ 128
#define BN 128
#define BK 32
#define LDA (BK + 8)
#define LDC (BN + 4)
#define THREADS 256
#define WARPS (THREADS / 32)
#define STAGES 4
#define STAGE_ELEMENTS ((BQ + BN) * LDA)
#define VECTORS ((BQ + BN) * BK / 8 / THREADS)  // 16-byte copies per thread per stage
#define QUERIES_PER_WARP (BQ / WARPS)

__device__ __forceinline__ unsigned wide_shared_address(const void* pointer) {
    unsigned address;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(address) : "l"(pointer));
    return address;
}

__device__ __forceinline__ void wide_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* d, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(wide_shared_address(p)));
}

// Starts the copy of the (A: queries q0.., B: rows tile..) operands of columns k0..k0+BK into `stage`;
// what lies past the queries, the split's rows or the dimension is zero-filled (a 0-byte copy).
__device__ __forceinline__ void wide_issue(unsigned short* stage, const unsigned short* __restrict__ queries,
                                           const unsigned short* __restrict__ rows, int q0, int n_queries, int tile,
                                           int r_end, int k0, int dim) {
#pragma unroll
    for (int i = 0; i < VECTORS; ++i) {
        const int idx = threadIdx.x + i * THREADS;  // BK / 8 = 4 vectors per operand row
        const int r = idx >> 2, c = (idx & 3) * 8;
        const bool is_a = r < BQ;
        const int gr = is_a ? q0 + r : tile + r - BQ;
        const int gk = k0 + c;
        const bool inside = gr < (is_a ? n_queries : r_end) && gk < dim;
        const unsigned short* base = is_a ? queries : rows;
        const unsigned short* src = inside ? base + (long long)gr * dim + gk : base;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(wide_shared_address(stage + r * LDA + c)),
                     "l"(src), "r"(inside ? 16 : 0));
    }
}

// RESIDENT: the rows-only stage (BN x BK) of row tile `tile`, and the whole query tile (BQ x ldr, once).
__device__ __forceinline__ void wide_issue_rows(unsigned short* stage, const unsigned short* __restrict__ rows,
                                                int tile, int r_end, int k0, int dim) {
#pragma unroll
    for (int i = 0; i < BN * BK / 8 / THREADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        const int r = idx >> 2, c = (idx & 3) * 8;
        const int gr = tile + r, gk = k0 + c;
        const bool inside = gr < r_end && gk < dim;
        const unsigned short* src = inside ? rows + (long long)gr * dim + gk : rows;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(wide_shared_address(stage + r * LDA + c)),
                     "l"(src), "r"(inside ? 16 : 0));
    }
}

__device__ __forceinline__ void wide_issue_queries(unsigned short* a_res, const unsigned short* __restrict__ queries,
                                                   int q0, int n_queries, int dim, int ldr) {
    const int per_row = (ldr - 8) / 8;
    for (int idx = threadIdx.x; idx < BQ * per_row; idx += THREADS) {
        const int r = idx / per_row, c = (idx % per_row) * 8;
        const bool inside = q0 + r < n_queries && c < dim;
        const unsigned short* src = inside ? queries + (long long)(q0 + r) * dim + c : queries;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(wide_shared_address(a_res + r * ldr + c)),
                     "l"(src), "r"(inside ? 16 : 0));
    }
}

__device__ __forceinline__ void wide_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void wide_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// The warp's 64 x 32 products of one stage: per 16-wide k step, four ldmatrix.x4 for A, two for B.
__device__ __forceinline__ void wide_products(float (*acc)[4][4], const unsigned short* a_s, int lda,
                                              const unsigned short* b_s, int wq, int wn, int lane) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
            ldmatrix_x4(a[mi], a_s + (wq + mi * 16 + (lane & 15)) * lda + kk + (lane >> 4) * 8);
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
            unsigned d[4];
            const int m = lane >> 3;
            ldmatrix_x4(d, b_s + (wn + nj * 16 + (m >> 1) * 8 + (lane & 7)) * LDA + kk + (m & 1) * 8);
            b[2 * nj][0] = d[0];
            b[2 * nj][1] = d[1];
            b[2 * nj + 1][0] = d[2];
            b[2 * nj + 1][1] = d[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) wide_mma(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
}

// The scan of one (query tile, split). SELECT: each query keeps its kp best keys (lists in shared memory,
// written to out_keys / out_rows as (Q, splits, kp)). COLLECT: every key reaching the query's threshold
// is appended to its buffer of `capacity` entries (out_keys / out_rows as (Q, capacity)); counts[q] ends
// as the number of such keys, past `capacity` when the buffer overflowed (the entries past it are dropped).
// RESIDENT (select only): the query tile stays in shared memory for the whole split, read once, and the
// stages carry rows only (rows of ldr = D rounded up to 32, plus 8, bf16).
template <bool COLLECT, bool RESIDENT = false>
__device__ __forceinline__ void wide_body(const unsigned short* __restrict__ queries,
                                          const unsigned short* __restrict__ rows, const float* __restrict__ sq_norms,
                                          const float* __restrict__ thresholds, int n_queries, int n_rows, int dim,
                                          int rows_per_split, int l2, int kp, int cap, float* __restrict__ out_keys,
                                          int* __restrict__ out_rows, int* __restrict__ counts) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int ldr = (dim + 31) / 32 * 32 + 8;
    unsigned short* a_res = reinterpret_cast<unsigned short*>(smem);
    unsigned short* stages = RESIDENT ? a_res + BQ * ldr : a_res;
    constexpr int stage_elements = RESIDENT ? BN * LDA : STAGE_ELEMENTS;
    float* c_s = reinterpret_cast<float*>(stages + STAGES * stage_elements);
    // SELECT: the score tile, then the lists; COLLECT: the thresholds only.
    float* list_keys = c_s + BQ * LDC;
    int* list_rows = reinterpret_cast<int*>(list_keys + BQ * cap);
    int* list_count = list_rows + BQ * cap;
    float* list_threshold = COLLECT ? c_s : reinterpret_cast<float*>(list_count + BQ);
    int* flags = reinterpret_cast<int*>(list_threshold + BQ);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wq = (warp >> 2) * 64, wn = (warp & 3) * 32;
    const int q0 = blockIdx.x * BQ;
    const int splits = gridDim.y, split = blockIdx.y;
    const int r_begin = split * rows_per_split;
    const int r_end = min(n_rows, r_begin + rows_per_split);
    if constexpr (COLLECT) {
        if (threadIdx.x < BQ)
            list_threshold[threadIdx.x] = q0 + threadIdx.x < n_queries ? thresholds[q0 + threadIdx.x] : GPURAG_NEG_INF;
    } else {
        if (threadIdx.x < BQ) flags[threadIdx.x] = 0;
        for (int i = 0; i < QUERIES_PER_WARP; ++i) {
            const int q = warp * QUERIES_PER_WARP + i;
            reset(CandidateList{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q});
        }
    }
    const int per_tile = (dim + BK - 1) / BK;
    const int total = r_end > r_begin ? (r_end - r_begin + BN - 1) / BN * per_tile : 0;
    // Stage i of the flow: row tile r_begin + (i / per_tile) * BN, columns (i % per_tile) * BK.
    if constexpr (RESIDENT) wide_issue_queries(a_res, queries, q0, n_queries, dim, ldr);  // with stage 0's group
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < total) {
            if constexpr (RESIDENT)
                wide_issue_rows(stages + i * stage_elements, rows, r_begin + (i / per_tile) * BN, r_end,
                                (i % per_tile) * BK, dim);
            else
                wide_issue(stages + i * STAGE_ELEMENTS, queries, rows, q0, n_queries, r_begin + (i / per_tile) * BN,
                           r_end, (i % per_tile) * BK, dim);
        }
        wide_commit();
    }
    float acc[4][4][4];
    float norms[4][2] = {};
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
    for (int i = 0; i < total; ++i) {
        wide_wait<STAGES - 2>();  // this thread's copies of stage i have landed
        __syncthreads();          // everyone's have; stage i - 1 and the last selection are done
        const int next = i + STAGES - 1;
        if (next < total) {
            if constexpr (RESIDENT)
                wide_issue_rows(stages + (next % STAGES) * stage_elements, rows, r_begin + (next / per_tile) * BN, r_end,
                                (next % per_tile) * BK, dim);
            else
                wide_issue(stages + (next % STAGES) * STAGE_ELEMENTS, queries, rows, q0, n_queries,
                           r_begin + (next / per_tile) * BN, r_end, (next % per_tile) * BK, dim);
        }
        wide_commit();
        const int tile = r_begin + (i / per_tile) * BN;
        if (l2 && i % per_tile == 0) {  // the tile's squared norms load while its products run
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int r = tile + wn + ni * 8 + 2 * t + j;
                    norms[ni][j] = r < r_end ? sq_norms[r] : 0.f;
                }
        }
        const unsigned short* stage = stages + (i % STAGES) * stage_elements;
        if constexpr (RESIDENT)
            wide_products(acc, a_res + (i % per_tile) * BK, ldr, stage, wq, wn, lane);
        else
            wide_products(acc, stage, LDA, stage + BQ * LDA, wq, wn, lane);
        if (i % per_tile != per_tile - 1) continue;

        // Epilogue of row tile `tile`: oriented keys in registers, -inf past the split's rows.
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int r = tile + wn + ni * 8 + 2 * t + j;
                const float norm = norms[ni][j];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        float& v = acc[mi][ni][2 * h + j];
                        v = r < r_end ? (l2 ? 2.f * v - norm : v) : GPURAG_NEG_INF;
                    }
            }
        if constexpr (COLLECT) {
            // Keys reaching the threshold are rare: each is appended by its own thread.
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int q = wq + mi * 16 + g + 8 * h;
                    const float threshold = list_threshold[q];
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                        for (int j = 0; j < 2; ++j) {
                            const float v = acc[mi][ni][2 * h + j];
                            if (q0 + q < n_queries && v >= threshold && v != GPURAG_NEG_INF) {
                                const int at = atomicAdd(counts + q0 + q, 1);
                                if (at < cap) {
                                    out_keys[(long long)(q0 + q) * cap + at] = v;
                                    out_rows[(long long)(q0 + q) * cap + at] = tile + wn + ni * 8 + 2 * t + j;
                                }
                            }
                        }
                }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
        } else {
        // A query is flagged when one of its keys here beats its threshold.
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int q = wq + mi * 16 + g + 8 * h;
                const float threshold = list_threshold[q];
                bool passes = false;
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
                    passes |= acc[mi][ni][2 * h] > threshold || acc[mi][ni][2 * h + 1] > threshold;
                if (passes) flags[q] = 1;
            }
        __syncthreads();
        // Only flagged queries' keys are written to the score tile.
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int q = wq + mi * 16 + g + 8 * h;
                if (flags[q]) {
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni)
                        *reinterpret_cast<float2*>(c_s + q * LDC + wn + ni * 8 + 2 * t) =
                            make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                }
            }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
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
        // Past the tile's queries (q0 + q >= n_queries) flags may stay set; they are never read for output.
        }
    }
    wide_wait<0>();
    if constexpr (!COLLECT) {
        for (int j = 0; j < QUERIES_PER_WARP; ++j) {
            const int q = warp * QUERIES_PER_WARP + j;
            if (q0 + q >= n_queries) break;
            CandidateList list{list_keys + q * cap, list_rows + q * cap, list_count + q, list_threshold + q};
            const long long at = ((long long)(q0 + q) * splits + split) * kp;
            flush(list, kp, cap, out_keys + at, out_rows + at);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
scan_bf16_wide(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
               const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim, int rows_per_split, int l2,
               int kp, int cap, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    wide_body<false>(queries, rows, sq_norms, nullptr, n_queries, n_rows, dim, rows_per_split, l2, kp, cap, out_keys,
                     out_rows, nullptr);
}

// Any k: every row whose key reaches its query's threshold, appended to that query's buffer of `capacity`.
// Its shared memory is the operand stages and the thresholds: two blocks share a multiprocessor.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
collect_bf16_wide(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
                  const float* __restrict__ sq_norms, const float* __restrict__ thresholds, int n_queries, int n_rows,
                  int dim, int rows_per_split, int l2, int capacity, float* __restrict__ out_keys,
                  int* __restrict__ out_rows, int* __restrict__ counts) {
    wide_body<true>(queries, rows, sq_norms, thresholds, n_queries, n_rows, dim, rows_per_split, l2, 0, capacity,
                    out_keys, out_rows, counts);
}

// The select scan with the query tile resident (D up to what shared memory holds, rows 16-byte aligned).
extern "C" __global__ void __launch_bounds__(THREADS, 1)
scan_bf16_wide_resident(const unsigned short* __restrict__ queries, const unsigned short* __restrict__ rows,
                        const float* __restrict__ sq_norms, int n_queries, int n_rows, int dim, int rows_per_split,
                        int l2, int kp, int cap, float* __restrict__ out_keys, int* __restrict__ out_rows) {
    wide_body<false, true>(queries, rows, sq_norms, nullptr, n_queries, n_rows, dim, rows_per_split, l2, kp, cap,
                           out_keys, out_rows, nullptr);
}
