// Direct float32 re-scoring of candidate rows: one warp per (query, candidate) pair sums the metric's
// terms over the dimension (l2: squared differences; l1: absolute differences; dot: products) and
// writes the sum. Candidates are int64 row positions, (Q, M); a negative one (a list's padding, which only a
// non-finite query leaves in a shortlist, and which its search's flags reject) reads nothing and scores NaN.
#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS)
rescore(const float* __restrict__ queries, const float* __restrict__ rows, const long long* __restrict__ candidates,
        int n_queries, int per_query, int dim, int term, float* __restrict__ out) {
    const long long pair = (long long)blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (pair >= (long long)n_queries * per_query) return;
    const long long q = pair / per_query;
    const float* qv = queries + q * dim;
    const long long candidate = candidates[pair];
    if (candidate < 0) {
        if (lane == 0) out[pair] = __int_as_float(0x7fc00000);
        return;
    }
    const float* xv = rows + candidate * dim;
    float acc = 0.f;
    for (int d = lane; d < dim; d += 32) {
        float a = qv[d], b = xv[d];
        float diff = a - b;
        acc += term == 0 ? diff * diff : (term == 1 ? fabsf(diff) : a * b);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[pair] = acc;
}
