// Post-processing of SPEC sections 2 and 7 on stacks of slices [b, hw]:
// min-max normalisation to [-1, 1], and anomaly maps with optional histogram
// matching. CPU twins: normalize_slice, norm01, histogram_match, anomaly_map
// in src/post.rs.
//
// One block per slice. Histogram matching truncates to grey levels, so a
// single rounding difference would move a pixel by a whole level: every float
// operation goes through an explicitly rounded intrinsic (no FMA contraction),
// in the CPU's order, and the results are bit-identical to the CPU twin.
// Min and max are order-independent (fminf/fmaxf ignore NaN like Rust's
// f32::min/max), so the parallel reductions do not break that parity.
//
// The block size must be a multiple of 32 and at most 1024 (the launchers use
// POST_THREADS).

#define POST_THREADS 512
#define MAX_WARPS 32
#define LEVELS 256

#define FULL_MASK 0xffffffffu
#define NO_INDEX 0xffffffffffffffffull

// Block-wide min and max; every thread gets the result. `s_lo` / `s_hi` hold
// MAX_WARPS entries and may be reused by the next call: the leading barrier
// keeps a new write from overtaking a read of the previous result.
__device__ void block_minmax(float& lo, float& hi, float* s_lo, float* s_hi) {
    for (int off = 16; off > 0; off >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(FULL_MASK, lo, off));
        hi = fmaxf(hi, __shfl_xor_sync(FULL_MASK, hi, off));
    }
    const unsigned warp = threadIdx.x >> 5;
    const unsigned lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) {
        s_lo[warp] = lo;
        s_hi[warp] = hi;
    }
    __syncthreads();
    const unsigned warps = blockDim.x >> 5;
    lo = s_lo[0];
    hi = s_hi[0];
    for (unsigned w = 1; w < warps; ++w) {
        lo = fminf(lo, s_lo[w]);
        hi = fmaxf(hi, s_hi[w]);
    }
}

// Block-wide minimum of an index; every thread gets the result.
__device__ unsigned long long block_min_index(unsigned long long v, unsigned long long* s) {
    for (int off = 16; off > 0; off >>= 1) {
        const unsigned long long other = __shfl_xor_sync(FULL_MASK, v, off);
        v = other < v ? other : v;
    }
    const unsigned warp = threadIdx.x >> 5;
    const unsigned lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) {
        s[warp] = v;
    }
    __syncthreads();
    const unsigned warps = blockDim.x >> 5;
    v = s[0];
    for (unsigned w = 1; w < warps; ++w) {
        v = s[w] < v ? s[w] : v;
    }
    return v;
}

// Tested on the bits so that no compiler flag can change what counts as
// finite.
__device__ __forceinline__ bool is_finite_bits(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// Rust's `as u8` for floats: truncation toward zero, saturating, NaN to 0.
__device__ __forceinline__ unsigned sat_u8(float v) {
    if (!(v > 0.0f)) return 0u;
    if (v >= 255.0f) return 255u;
    return (unsigned)v;
}

__device__ __forceinline__ unsigned sat_u8(double v) {
    if (!(v > 0.0)) return 0u;
    if (v >= 255.0) return 255u;
    return (unsigned)v;
}

// norm01 with a slice's min and max: (v - min) / (max - min), zeros for a
// constant slice.
__device__ __forceinline__ float norm01(float v, float lo, float hi) {
    if (lo == hi) return 0.0f;
    return __fdiv_rn(__fsub_rn(v, lo), __fsub_rn(hi, lo));
}

// trunc(norm01(v) * 255) as a grey level.
__device__ __forceinline__ unsigned grey_level(float v, float lo, float hi) {
    return sat_u8(__fmul_rn(norm01(v, lo, hi), 255.0f));
}

// status: 4 words per slice: code (0 ok, 1 constant, 2 non-finite), the bits
// of the offending value (min for a constant slice), the index (low, high).
extern "C" __global__ void __launch_bounds__(POST_THREADS)
    post_normalize(const float* __restrict__ x, float* __restrict__ y,
                   unsigned* __restrict__ status, unsigned long long hw) {
    __shared__ float s_lo[MAX_WARPS];
    __shared__ float s_hi[MAX_WARPS];
    __shared__ unsigned long long s_idx[MAX_WARPS];

    const unsigned long long base = (unsigned long long)blockIdx.x * hw;
    const float* xs = x + base;
    float* ys = y + base;
    unsigned* st = status + 4ull * blockIdx.x;

    float lo = __int_as_float(0x7f800000);
    float hi = -lo;
    unsigned long long bad = NO_INDEX;
    for (unsigned long long i = threadIdx.x; i < hw; i += blockDim.x) {
        const float v = xs[i];
        // i only grows, so the first hit is this thread's smallest index.
        if (bad == NO_INDEX && !is_finite_bits(v)) bad = i;
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    bad = block_min_index(bad, s_idx);
    block_minmax(lo, hi, s_lo, s_hi);

    // bad, lo and hi are the same in every thread, so whole blocks return.
    if (bad != NO_INDEX) {
        if (threadIdx.x == 0) {
            st[0] = 2u;
            st[1] = __float_as_uint(xs[bad]);
            st[2] = (unsigned)(bad & 0xffffffffull);
            st[3] = (unsigned)(bad >> 32);
        }
        return;
    }
    if (lo == hi) {
        if (threadIdx.x == 0) {
            st[0] = 1u;
            st[1] = __float_as_uint(lo);
            st[2] = 0u;
            st[3] = 0u;
        }
        return;
    }
    if (threadIdx.x == 0) {
        st[0] = 0u;
        st[1] = 0u;
        st[2] = 0u;
        st[3] = 0u;
    }
    const float range = __fsub_rn(hi, lo);
    for (unsigned long long i = threadIdx.x; i < hw; i += blockDim.x) {
        ys[i] = __fmul_rn(__fsub_rn(__fdiv_rn(__fsub_rn(xs[i], lo), range), 0.5f), 2.0f);
    }
}

// numpy.interp(x, xp, 0..=255) for a non-decreasing xp of LEVELS points, with
// numpy's defaults outside the range; on a flat run numpy interpolates from the
// last index j with xp[j] <= x (see interp in src/post.rs).
__device__ double interp_levels(double x, const double* xp) {
    if (x != x) return x;
    if (x > xp[LEVELS - 1]) return (double)(LEVELS - 1);
    if (x < xp[0]) return 0.0;
    // xp is non-decreasing, so the count of entries <= x is the partition point.
    int count = 0;
    for (int k = 0; k < LEVELS; ++k) count += xp[k] <= x ? 1 : 0;
    const int j = count - 1;
    if (j == LEVELS - 1 || xp[j] == x) return (double)j;
    const double fj = (double)j;
    const double slope = __ddiv_rn(__dsub_rn((double)(j + 1), fj), __dsub_rn(xp[j + 1], xp[j]));
    return __dadd_rn(__dmul_rn(slope, __dsub_rn(x, xp[j])), fj);
}

// A = norm01(d), d = |norm01(x0) - healed|, healed = norm01(xhat), or with
// hist_match norm01(histogram_match(xhat, x0)); d goes to diff (it ranks
// peaks across slices).
extern "C" __global__ void __launch_bounds__(POST_THREADS)
    post_anomaly(const float* __restrict__ x0, const float* __restrict__ xhat,
                 float* __restrict__ out, float* __restrict__ diff, unsigned long long hw,
                 int hist_match) {
    __shared__ float s_lo[MAX_WARPS];
    __shared__ float s_hi[MAX_WARPS];
    __shared__ unsigned hist_src[LEVELS];
    __shared__ unsigned hist_ref[LEVELS];
    __shared__ double cdf_src[LEVELS];
    __shared__ double cdf_ref[LEVELS];
    __shared__ float lut[LEVELS];
    __shared__ float healed_of_level[LEVELS];

    const unsigned long long base = (unsigned long long)blockIdx.x * hw;
    const float* a = x0 + base;
    const float* h = xhat + base;
    float* o = out + base;
    float* df = diff + base;

    const float inf = __int_as_float(0x7f800000);
    float a_lo = inf, a_hi = -inf, h_lo = inf, h_hi = -inf;
    for (unsigned long long i = threadIdx.x; i < hw; i += blockDim.x) {
        const float va = a[i];
        const float vh = h[i];
        a_lo = fminf(a_lo, va);
        a_hi = fmaxf(a_hi, va);
        h_lo = fminf(h_lo, vh);
        h_hi = fmaxf(h_hi, vh);
    }
    block_minmax(a_lo, a_hi, s_lo, s_hi);
    block_minmax(h_lo, h_hi, s_lo, s_hi);

    if (hist_match) {
        for (unsigned k = threadIdx.x; k < LEVELS; k += blockDim.x) {
            hist_src[k] = 0u;
            hist_ref[k] = 0u;
        }
        __syncthreads();
        for (unsigned long long i = threadIdx.x; i < hw; i += blockDim.x) {
            atomicAdd(&hist_src[grey_level(h[i], h_lo, h_hi)], 1u);
            atomicAdd(&hist_ref[grey_level(a[i], a_lo, a_hi)], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // (cumsum / total) rounded to float32, widened back as numpy.interp
            // does; the counts are exact in double.
            const double total = (double)hw;
            unsigned long long acc_src = 0, acc_ref = 0;
            for (int k = 0; k < LEVELS; ++k) {
                acc_src += hist_src[k];
                acc_ref += hist_ref[k];
                cdf_src[k] = (double)__double2float_rn(__ddiv_rn((double)acc_src, total));
                cdf_ref[k] = (double)__double2float_rn(__ddiv_rn((double)acc_ref, total));
            }
        }
        __syncthreads();
        for (unsigned k = threadIdx.x; k < LEVELS; k += blockDim.x) {
            lut[k] = (float)sat_u8(interp_levels(cdf_src[k], cdf_ref));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // The matched image takes the values lut[k] of the levels present
            // in the source, so its min and max (and those of its norm01) are
            // found over those levels; the CPU applies norm01 twice.
            float m_lo = inf, m_hi = -inf;
            for (int k = 0; k < LEVELS; ++k) {
                if (hist_src[k] != 0u) {
                    m_lo = fminf(m_lo, lut[k]);
                    m_hi = fmaxf(m_hi, lut[k]);
                }
            }
            float n_lo = inf, n_hi = -inf;
            for (int k = 0; k < LEVELS; ++k) {
                const float n = norm01(lut[k], m_lo, m_hi);
                healed_of_level[k] = n;
                if (hist_src[k] != 0u) {
                    n_lo = fminf(n_lo, n);
                    n_hi = fmaxf(n_hi, n);
                }
            }
            for (int k = 0; k < LEVELS; ++k) {
                healed_of_level[k] = norm01(healed_of_level[k], n_lo, n_hi);
            }
        }
        __syncthreads();
    }

    // The difference is recomputed in the last pass rather than stored: the
    // same operations give the same bits.
    float d_lo = inf, d_hi = -inf;
    for (unsigned long long i = threadIdx.x; i < hw; i += blockDim.x) {
        const float vh = h[i];
        const float healed = hist_match ? healed_of_level[grey_level(vh, h_lo, h_hi)]
                                        : norm01(vh, h_lo, h_hi);
        const float d = fabsf(__fsub_rn(norm01(a[i], a_lo, a_hi), healed));
        d_lo = fminf(d_lo, d);
        d_hi = fmaxf(d_hi, d);
    }
    block_minmax(d_lo, d_hi, s_lo, s_hi);
    for (unsigned long long i = threadIdx.x; i < hw; i += blockDim.x) {
        const float vh = h[i];
        const float healed = hist_match ? healed_of_level[grey_level(vh, h_lo, h_hi)]
                                        : norm01(vh, h_lo, h_hi);
        const float d = fabsf(__fsub_rn(norm01(a[i], a_lo, a_hi), healed));
        df[i] = d;
        o[i] = norm01(d, d_lo, d_hi);
    }
}
