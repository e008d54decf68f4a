// Row-wise softmax of attention logits and its backward, for the GEMM form
// of attention's input gradient (src/backend/cuda/attention_gemm.rs); CPU twin:
// backward in src/backend/cpu/attention.rs. One block per row of t values,
// a multiple of 32 threads; sums in float (the CPU's are double: ~1e-7).

// NVRTC has no math.h INFINITY.
#define NEG_INF (-__int_as_float(0x7f800000))

// max (is_max) or sum of v over the block, returned to every thread. `red`
// holds 33 floats; the trailing barrier lets the next call reuse it.
__device__ float block_reduce(float v, float* red, bool is_max) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned nwarps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float r = lane < nwarps ? red[lane] : (is_max ? NEG_INF : 0.0f);
        for (int off = 16; off > 0; off >>= 1) {
            const float o = __shfl_xor_sync(0xffffffffu, r, off);
            r = is_max ? fmaxf(r, o) : r + o;
        }
        if (lane == 0) red[32] = r;
    }
    __syncthreads();
    const float r = red[32];
    __syncthreads();
    return r;
}

// s[row, :] = softmax(s[row, :]) in place, row = blockIdx.x.
extern "C" __global__ void softmax_rows(float* __restrict__ s, unsigned t) {
    __shared__ float red[33];
    float* row = s + (unsigned long long)blockIdx.x * t;
    float m = NEG_INF;
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_reduce(m, red, true);
    float sum = 0.0f;
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) {
        const float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    const float inv = 1.0f / block_reduce(sum, red, false);
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) row[j] *= inv;
}

// dp[row, :] = p (dp - sum_j p_j dp_j) in place: the logits' gradient from
// the weights' gradient dp and the weights p.
extern "C" __global__ void softmax_bwd_rows(const float* __restrict__ p, float* __restrict__ dp,
                                            unsigned t) {
    __shared__ float red[33];
    const unsigned long long o = (unsigned long long)blockIdx.x * t;
    float dot = 0.0f;
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) dot += p[o + j] * dp[o + j];
    dot = block_reduce(dot, red, false);
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) dp[o + j] = p[o + j] * (dp[o + j] - dot);
}
