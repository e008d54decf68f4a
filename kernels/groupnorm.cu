// GroupNorm (32 groups, eps 1e-5, affine), optional scale/shift and SiLU, on
// NHWC activations [b, hw, c], and its input gradient.
// CPU twins: forward / backward in src/backend/cpu/norm.rs.
//
// Statistics and the backward's group sums are accumulated in double, as the
// CPU twin does; the per-element float math of the forward goes through
// explicitly rounded intrinsics so that NVRTC cannot fuse it into FMAs the
// CPU does not perform.
//
// Launch shapes (src/cuda/norm.rs): the two reductions run one block per
// (sample, group) with a block size that is a multiple of 32; the two apply
// kernels are grid-stride over every element.

#define GN_GROUPS 32
#define GN_EPS 1e-5

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch` holds 33
// doubles; the trailing barrier lets the next call reuse it.
__device__ double block_sum_d(double v, double* scratch) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned nwarps = (blockDim.x + 31u) >> 5;
    v = warp_sum_d(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double t = lane < nwarps ? scratch[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    const double total = scratch[32];
    __syncthreads();
    return total;
}

// Flat index of the j-th element (pixel-major, then channel) of group g of
// the sample starting at `base`.
__device__ __forceinline__ unsigned long long group_index(unsigned long long base,
                                                          unsigned long long j, unsigned cg,
                                                          unsigned c, unsigned g) {
    const unsigned long long p = j / cg;
    const unsigned k = (unsigned)(j - p * cg);
    return base + p * c + (unsigned long long)g * cg + k;
}

// stats[2 * (bi * 32 + g)] = mean, [.. + 1] = 1 / sqrt(var + eps), variance
// taken around the mean in a second pass (as the CPU's stats_exact).
// Grid: b * 32 blocks.
extern "C" __global__ void gn_stats(const float* __restrict__ x, double* __restrict__ stats,
                                    unsigned b, unsigned long long hw, unsigned c) {
    __shared__ double scratch[33];
    const unsigned blk = blockIdx.x;
    if (blk >= b * GN_GROUPS) return;
    const unsigned bi = blk / GN_GROUPS;
    const unsigned g = blk % GN_GROUPS;
    const unsigned cg = c / GN_GROUPS;
    const unsigned long long n = hw * cg;
    const unsigned long long base = (unsigned long long)bi * hw * c;

    double s = 0.0;
    for (unsigned long long j = threadIdx.x; j < n; j += blockDim.x)
        s += (double)x[group_index(base, j, cg, c, g)];
    const double mean = block_sum_d(s, scratch) / (double)n;

    double sq = 0.0;
    for (unsigned long long j = threadIdx.x; j < n; j += blockDim.x) {
        const double dv = (double)x[group_index(base, j, cg, c, g)] - mean;
        sq += dv * dv;
    }
    const double var = block_sum_d(sq, scratch) / (double)n;
    if (threadIdx.x == 0) {
        stats[2 * (unsigned long long)blk] = mean;
        stats[2 * (unsigned long long)blk + 1] = 1.0 / sqrt(var + GN_EPS);
    }
}

// y = silu?( (xhat * gamma + beta) * (1 + scale) + shift ), n = b * hw * c.
// `ss` is [b, 2c] (scale then shift) and read only when has_ss != 0.
extern "C" __global__ void gn_apply(const float* __restrict__ x, float* __restrict__ y,
                                    const double* __restrict__ stats,
                                    const float* __restrict__ gamma,
                                    const float* __restrict__ beta, const float* __restrict__ ss,
                                    int has_ss, int silu, unsigned long long hw, unsigned c,
                                    unsigned long long n) {
    const unsigned cg = c / GN_GROUPS;
    const unsigned long long per = hw * c;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const unsigned ch = (unsigned)(i % c);
        const unsigned long long bi = i / per;
        const unsigned long long sg = 2 * (bi * GN_GROUPS + ch / cg);
        const double mean = stats[sg];
        const double inv = stats[sg + 1];
        const float xhat = (float)(((double)x[i] - mean) * inv);
        float z = __fadd_rn(__fmul_rn(xhat, gamma[ch]), beta[ch]);
        if (has_ss) {
            const float* s = ss + bi * 2 * c;
            z = __fadd_rn(__fmul_rn(z, __fadd_rn(1.0f, s[ch])), s[c + ch]);
        }
        if (silu) z = __fmul_rn(z, __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z))));
        y[i] = z;
    }
}

// d(loss)/d(xhat) of one element, in double as the CPU twin.
__device__ __forceinline__ double gn_dxhat(double xhat, float dy, float gamma, float beta,
                                           const float* s, int silu, unsigned c, unsigned ch) {
    double g = (double)dy;
    double z = xhat * (double)gamma + (double)beta;
    double mul = 1.0;
    if (s) {
        mul = 1.0 + (double)s[ch];
        z = z * mul + (double)s[c + ch];
    }
    if (silu) {
        const double sg = 1.0 / (1.0 + exp(-z));
        g *= sg * (1.0 + z * (1.0 - sg));
    }
    return g * mul * (double)gamma;
}

// sums[2 * (bi * 32 + g)] = sum dxhat, [.. + 1] = sum dxhat * xhat over the
// group. Grid: b * 32 blocks.
extern "C" __global__ void gn_bwd_sums(const float* __restrict__ x, const float* __restrict__ dy,
                                       const double* __restrict__ stats,
                                       const float* __restrict__ gamma,
                                       const float* __restrict__ beta,
                                       const float* __restrict__ ss, int has_ss, int silu,
                                       double* __restrict__ sums, unsigned b,
                                       unsigned long long hw, unsigned c) {
    __shared__ double scratch[33];
    const unsigned blk = blockIdx.x;
    if (blk >= b * GN_GROUPS) return;
    const unsigned bi = blk / GN_GROUPS;
    const unsigned g = blk % GN_GROUPS;
    const unsigned cg = c / GN_GROUPS;
    const unsigned long long n = hw * cg;
    const unsigned long long base = (unsigned long long)bi * hw * c;
    const double mean = stats[2 * (unsigned long long)blk];
    const double inv = stats[2 * (unsigned long long)blk + 1];
    const float* s = has_ss ? ss + (unsigned long long)bi * 2 * c : nullptr;

    double s1 = 0.0, s2 = 0.0;
    for (unsigned long long j = threadIdx.x; j < n; j += blockDim.x) {
        const unsigned long long i = group_index(base, j, cg, c, g);
        const unsigned ch = (unsigned)(i % c);
        const double xhat = ((double)x[i] - mean) * inv;
        const double d = gn_dxhat(xhat, dy[i], gamma[ch], beta[ch], s, silu, c, ch);
        s1 += d;
        s2 += d * xhat;
    }
    s1 = block_sum_d(s1, scratch);
    s2 = block_sum_d(s2, scratch);
    if (threadIdx.x == 0) {
        sums[2 * (unsigned long long)blk] = s1;
        sums[2 * (unsigned long long)blk + 1] = s2;
    }
}

// dx = inv * (dxhat - s1 / n - xhat * s2 / n), n = hw * c / 32 per group;
// `count` = b * hw * c elements.
extern "C" __global__ void gn_bwd_apply(const float* __restrict__ x,
                                        const float* __restrict__ dy, float* __restrict__ dx,
                                        const double* __restrict__ stats,
                                        const double* __restrict__ sums,
                                        const float* __restrict__ gamma,
                                        const float* __restrict__ beta,
                                        const float* __restrict__ ss, int has_ss, int silu,
                                        unsigned long long hw, unsigned c,
                                        unsigned long long count) {
    const unsigned cg = c / GN_GROUPS;
    const unsigned long long per = hw * c;
    const double n = (double)(hw * cg);
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < count; i += stride) {
        const unsigned ch = (unsigned)(i % c);
        const unsigned long long bi = i / per;
        const unsigned long long sg = 2 * (bi * GN_GROUPS + ch / cg);
        const double mean = stats[sg];
        const double inv = stats[sg + 1];
        const float* s = has_ss ? ss + bi * 2 * c : nullptr;
        const double xhat = ((double)x[i] - mean) * inv;
        const double d = gn_dxhat(xhat, dy[i], gamma[ch], beta[ch], s, silu, c, ch);
        dx[i] = (float)(inv * (d - sums[sg] / n - xhat * sums[sg + 1] / n));
    }
}
