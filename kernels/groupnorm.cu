// GroupNorm (32 groups, eps 1e-5, affine), optional scale/shift and SiLU, on
// NHWC activations [b, hw, c], and its input gradient.
// CPU twins: forward / backward in src/backend/cpu/norm.rs.
//
// Statistics and the backward's group sums are accumulated in double, as the
// CPU twin does; the per-element float math of the forward goes through
// explicitly rounded intrinsics so that NVRTC cannot fuse it into FMAs the
// CPU does not perform.
//
// Launch shapes (src/backend/cuda/norm.rs): the statistics and the backward's group
// sums run as split reductions (gn_stats_partial, gn_stats_combine;
// gn_bwd_partial, gn_bwd_combine; see there) of the same launch plan; the
// apply kernels and gn_affine are grid-stride.

#define GN_GROUPS 32
#define GN_EPS 1e-5

#include "reduce.cuh"

// ---- Statistics: a split, coalesced, deterministic two-level reduction ----
//
// Output of the pair: stats[2 * (bi * 32 + g)] = mean, [.. + 1] =
// 1 / sqrt(var + eps), as the CPU's stats_exact (variance around the mean).
// One block per (sample, group) left most SMs idle and read a group with
// stride C; instead every block takes a contiguous run of pixels of one
// sample with all its channels, so each warp reads 32 consecutive floats of
// a pixel row, and a second tiny kernel merges the runs.
//
// Accuracy: a one-pass sum of squares loses digits when the mean is large
// against the spread (the CPU's reason for stats_exact). So each tile of a
// run gets an exact two-pass (mean, M2) in double -- the tile is small
// enough (~16 KiB) that its second sweep hits L1 -- and tiles, then runs,
// are merged with Chan's formula. Its term d^2 n_a n_b / n takes the
// difference d of two rounded means, which is as exact as those means are
// against d: so every value is first shifted by a pivot, the group's first
// element in the sample, which leaves means of the order of the spread
// (rounding errors ~1e-16 of it, not of the mean) and is added back last.
// Determinism: every sum and merge has a fixed order; no atomics.

// Merge (nb, mb, m2b) into the running (n, mean, m2): Chan et al.'s
// pairwise update. Empty operands (n = 0) merge as identities.
__device__ __forceinline__ void gn_chan_merge(double& n, double& mean, double& m2, double nb,
                                              double mb, double m2b) {
    if (nb == 0.0) return;
    if (n == 0.0) {
        n = nb;
        mean = mb;
        m2 = m2b;
        return;
    }
    const double tot = n + nb;
    const double d = mb - mean;
    mean += d * (nb / tot);
    m2 += m2b + d * d * (n * (nb / tot));
    n = tot;
}

// Slot of channel ch in a row of `chan`: groups lie gs = cg | 1 doubles
// apart, an odd stride, so the 32 lanes of gn_group_total, one per group,
// hit distinct shared-memory banks (a stride of cg = 48 would put them all
// in one).
__device__ __forceinline__ unsigned gn_slot(unsigned ch, unsigned cg, unsigned gs) {
    const unsigned g = ch / cg;
    return g * gs + (ch - g * cg);
}

// Total over group (threadIdx.x & 31) of `chan` ([rows_par][32 gs] per-thread
// channel partials, laid out by gn_slot), valid in threads 0..31 (thread g
// gets group g). All warps take a strided share of every group, then warp 0
// adds the shares in warp order. Its one barrier follows every read of
// `chan`, so the caller may rewrite `chan` at once; `red` is read by warp 0
// after it, so the caller must barrier before the next call.
__device__ double gn_group_total(const double* chan, double* red, unsigned cg, unsigned gs,
                                 unsigned rows_par) {
    const unsigned g = threadIdx.x & 31u;
    const unsigned w = threadIdx.x >> 5;
    const unsigned nw = blockDim.x >> 5;
    const unsigned per = rows_par * cg;
    double s = 0.0;
    for (unsigned j = w; j < per; j += nw) {
        const unsigned r = j / cg;
        const unsigned k = j - r * cg;
        s += chan[r * (GN_GROUPS * gs) + g * gs + k];
    }
    red[w * 32u + g] = s;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x < 32u)
        for (unsigned i = 0; i < nw; ++i) total += red[i * 32u + threadIdx.x];
    return total;
}

// Channel ch of pixel pix (counted over the whole batch) of the channel
// concatenation [x, x2]: x holds c1 channels, x2 the other c - c1 (c1 = c
// and x2 unread for a single tensor). Reading the two halves in place spares
// the skip concatenation of the UNet's output blocks a copy.
__device__ __forceinline__ float gn_at(const float* __restrict__ x, const float* __restrict__ x2,
                                       unsigned c1, unsigned c, unsigned long long pix,
                                       unsigned ch) {
    return ch < c1 ? x[pix * c1 + ch] : x2[pix * (c - c1) + (ch - c1)];
}

// Partial statistics of pixel run blockIdx.x of sample blockIdx.y: the run
// is pixels [blockIdx.x * span, min(hw, (blockIdx.x + 1) * span)), taken in
// tiles of `tile` pixels. Writes part[2 * ((bi * gridDim.x + run) * 32 + g)]
// = mean of the run's group g less the pivot x[bi, 0, g * cg], [.. + 1] =
// its M2 (sum of squared deviations from the mean); the count is implied
// by span and hw.
//
// Block layout (chosen by the launcher, src/backend/cuda/norm.rs): blockDim.x =
// rows_par * cw threads with cw a multiple of 32, cw <= c; thread t reads
// channels t % cw + k * cw of the rows t / cw + i * rows_par of a tile, so
// a warp reads 32 consecutive floats. Dynamic shared memory: rows_par * 32 *
// (cg | 1) + blockDim.x doubles (per-thread channel partials, then per-warp
// shares).
extern "C" __global__ void gn_stats_partial(const float* __restrict__ x,
                                            double* __restrict__ part, unsigned long long hw,
                                            unsigned c, unsigned cw, unsigned tile,
                                            unsigned long long span,
                                            const float* __restrict__ x2, unsigned c1) {
    extern __shared__ double gn_sh[];
    __shared__ double gmean[GN_GROUPS];
    __shared__ double pivot[GN_GROUPS];
    const unsigned t = threadIdx.x;
    const unsigned rows_par = blockDim.x / cw;
    const unsigned cg = c / GN_GROUPS;
    const unsigned gs = cg | 1u;
    const unsigned row = GN_GROUPS * gs;
    double* chan = gn_sh;
    double* red = gn_sh + rows_par * row;
    const unsigned ch0 = t % cw;
    const unsigned r0 = t / cw;
    const unsigned long long p_begin = (unsigned long long)blockIdx.x * span;
    const unsigned long long p_end = min(hw, p_begin + span);
    const unsigned long long pix0 = (unsigned long long)blockIdx.y * hw;
    if (t < 32u) pivot[t] = (double)gn_at(x, x2, c1, c, pix0, t * cg);
    __syncthreads();

    // The run's merged state of group t, kept by threads 0..31.
    double run_n = 0.0, run_mean = 0.0, run_m2 = 0.0;
    for (unsigned long long p0 = p_begin; p0 < p_end; p0 += tile) {
        const unsigned rows = (unsigned)min((unsigned long long)tile, p_end - p0);
        // Every (r0, ch) slot of chan is written, zero where r0 >= rows, so
        // the group totals never read a stale tile.
        for (unsigned ch = ch0; ch < c; ch += cw) {
            const double k = pivot[ch / cg];
            double s = 0.0;
#pragma unroll 4
            for (unsigned r = r0; r < rows; r += rows_par)
                s += (double)gn_at(x, x2, c1, c, pix0 + p0 + r, ch) - k;
            chan[r0 * row + gn_slot(ch, cg, gs)] = s;
        }
        __syncthreads();
        const double n_tile = (double)rows * (double)cg;
        const double sum = gn_group_total(chan, red, cg, gs, rows_par);
        if (t < 32u) gmean[t] = sum / n_tile;
        __syncthreads();
        for (unsigned ch = ch0; ch < c; ch += cw) {
            const double k = pivot[ch / cg];
            const double m = gmean[ch / cg];
            double q = 0.0;
#pragma unroll 4
            for (unsigned r = r0; r < rows; r += rows_par) {
                const double d = ((double)gn_at(x, x2, c1, c, pix0 + p0 + r, ch) - k) - m;
                q += d * d;
            }
            chan[r0 * row + gn_slot(ch, cg, gs)] = q;
        }
        __syncthreads();
        const double m2 = gn_group_total(chan, red, cg, gs, rows_par);
        if (t < 32u) gn_chan_merge(run_n, run_mean, run_m2, n_tile, gmean[t], m2);
        // The next tile writes chan after the barrier in gn_group_total, red
        // and gmean after the barrier that ends its first sweep.
    }
    if (t < 32u) {
        const unsigned long long o =
            2 * (((unsigned long long)blockIdx.y * gridDim.x + blockIdx.x) * GN_GROUPS + t);
        part[o] = run_mean;
        part[o + 1] = run_m2;
    }
}

// Merges the `runs` partials of each (sample, group) of gn_stats_partial
// into stats and adds the pivot back. One warp per (sample, group), b * 32
// warps in all: lane l merges runs l, l + 32, ... in order, then the lanes
// merge in a fixed tree.
extern "C" __global__ void gn_stats_combine(const float* __restrict__ x,
                                            const double* __restrict__ part,
                                            double* __restrict__ stats, unsigned b,
                                            unsigned runs, unsigned long long hw, unsigned cg,
                                            unsigned long long span,
                                            const float* __restrict__ x2, unsigned c1) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned long long wid =
        ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    // Whole warps leave together, so the full-mask shuffles below are valid.
    if (wid >= (unsigned long long)b * GN_GROUPS) return;
    const unsigned long long bi = wid / GN_GROUPS;
    const unsigned g = (unsigned)(wid % GN_GROUPS);
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (unsigned k = lane; k < runs; k += 32u) {
        const unsigned long long p0 = (unsigned long long)k * span;
        const double nk = (double)((min(hw, p0 + span) - p0) * cg);
        const unsigned long long o = 2 * ((bi * runs + k) * GN_GROUPS + g);
        gn_chan_merge(n, mean, m2, nk, part[o], part[o + 1]);
    }
    for (unsigned off = 16; off > 0; off >>= 1) {
        const double nb = __shfl_down_sync(0xffffffffu, n, off);
        const double mb = __shfl_down_sync(0xffffffffu, mean, off);
        const double m2b = __shfl_down_sync(0xffffffffu, m2, off);
        if (lane + off < 32u) gn_chan_merge(n, mean, m2, nb, mb, m2b);
    }
    if (lane == 0) {
        stats[2 * wid] = (double)gn_at(x, x2, c1, GN_GROUPS * cg, bi * hw, g * cg) + mean;
        stats[2 * wid + 1] = 1.0 / sqrt(m2 / n + GN_EPS);
    }
}

// The folded map of GroupNorm + optional scale/shift that a convolution's
// prologue applies as y = a * x + s: out[(bi * 2) * c + ch] = a, [(bi * 2 +
// 1) * c + ch] = s, with a = r gamma (1 + scale), s = (beta - m r gamma)
// (1 + scale) + shift. Double with explicit roundings in the CPU twin's
// order (group_norm_affine in src/backend/cpu/norm.rs), one rounding to
// float at the end; n = b * c, grid-stride.
extern "C" __global__ void gn_affine(const double* __restrict__ stats,
                                     const float* __restrict__ gamma,
                                     const float* __restrict__ beta, const float* __restrict__ ss,
                                     int has_ss, float* __restrict__ out, unsigned c,
                                     unsigned long long n) {
    const unsigned cg = c / GN_GROUPS;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const unsigned long long bi = i / c;
        const unsigned ch = (unsigned)(i - bi * c);
        const unsigned long long sg = 2 * (bi * GN_GROUPS + ch / cg);
        const double m = stats[sg];
        const double r = stats[sg + 1];
        const double rg = __dmul_rn(r, (double)gamma[ch]);
        double a = rg;
        double s = __dsub_rn((double)beta[ch], __dmul_rn(m, rg));
        if (has_ss) {
            const float* sp = ss + bi * 2 * c;
            const double mul = __dadd_rn(1.0, (double)sp[ch]);
            a = __dmul_rn(a, mul);
            s = __dadd_rn(__dmul_rn(s, mul), (double)sp[c + ch]);
        }
        out[bi * 2 * c + ch] = (float)a;
        out[bi * 2 * c + c + ch] = (float)s;
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

// ---- Backward group sums: the statistics' split layout ----
//
// gn_bwd_apply needs, per (sample, group), s1 = sum dxhat and s2 = sum
// dxhat * xhat (dxhat from gn_dxhat, xhat from the forward's stats), in
// double as the CPU twin. One block per (sample, group) read the group with
// stride C and left most SMs idle; as the statistics, every block takes a
// contiguous run of pixels of one sample with all its channels (a warp
// reads 32 consecutive floats of a pixel row of x and of dy), and a second
// kernel adds the runs in a fixed order. A single sweep suffices: the sums
// are plain sums, with no mean to subtract first.

// Partial sums of pixel run blockIdx.x of sample blockIdx.y: the run is
// pixels [blockIdx.x * span, min(hw, (blockIdx.x + 1) * span)). Writes
// part[2 * ((bi * gridDim.x + run) * 32 + g)] = the run's s1 of group g,
// [.. + 1] = its s2.
//
// Block layout as gn_stats_partial's (the same StatsPlan): blockDim.x =
// rows_par * cw threads with cw a multiple of 32, cw <= c; thread t sums
// channels t % cw + k * cw over the rows t / cw + i * rows_par of the run.
// Dynamic shared memory: 2 * (rows_par * 32 * (cg | 1) + blockDim.x)
// doubles (the channel partials of s1, of s2, then the per-warp shares of
// s1, of s2), twice gn_stats_partial's.
extern "C" __global__ void gn_bwd_partial(const float* __restrict__ x,
                                          const float* __restrict__ dy,
                                          const double* __restrict__ stats,
                                          const float* __restrict__ gamma,
                                          const float* __restrict__ beta,
                                          const float* __restrict__ ss, int has_ss, int silu,
                                          double* __restrict__ part, unsigned long long hw,
                                          unsigned c, unsigned cw, unsigned long long span) {
    extern __shared__ double gn_sh[];
    const unsigned t = threadIdx.x;
    const unsigned rows_par = blockDim.x / cw;
    const unsigned cg = c / GN_GROUPS;
    const unsigned gs = cg | 1u;
    const unsigned row = GN_GROUPS * gs;
    double* chan1 = gn_sh;
    double* chan2 = gn_sh + rows_par * row;
    double* red1 = gn_sh + 2 * rows_par * row;
    double* red2 = red1 + blockDim.x;
    const unsigned ch0 = t % cw;
    const unsigned r0 = t / cw;
    const unsigned long long bi = blockIdx.y;
    const unsigned long long p_begin = (unsigned long long)blockIdx.x * span;
    const unsigned long long p_end = min(hw, p_begin + span);
    const unsigned long long pix0 = bi * hw;
    const float* s = has_ss ? ss + bi * 2 * c : nullptr;

    // Every (r0, ch) slot of chan1 / chan2 is written, zero where the run
    // has no row r0.
    for (unsigned ch = ch0; ch < c; ch += cw) {
        const unsigned long long sg = 2 * (bi * GN_GROUPS + ch / cg);
        const double mean = stats[sg];
        const double inv = stats[sg + 1];
        const float ga = gamma[ch];
        const float be = beta[ch];
        double s1 = 0.0, s2 = 0.0;
        for (unsigned long long p = p_begin + r0; p < p_end; p += rows_par) {
            const unsigned long long i = (pix0 + p) * c + ch;
            const double xhat = ((double)x[i] - mean) * inv;
            const double d = gn_dxhat(xhat, dy[i], ga, be, s, silu, c, ch);
            s1 += d;
            s2 += d * xhat;
        }
        const unsigned o = r0 * row + gn_slot(ch, cg, gs);
        chan1[o] = s1;
        chan2[o] = s2;
    }
    __syncthreads();
    // Separate shares (red1, red2), so the second call needs no barrier
    // before it: its barrier follows every write of both.
    const double s1 = gn_group_total(chan1, red1, cg, gs, rows_par);
    const double s2 = gn_group_total(chan2, red2, cg, gs, rows_par);
    if (t < 32u) {
        const unsigned long long o =
            2 * ((bi * gridDim.x + blockIdx.x) * GN_GROUPS + t);
        part[o] = s1;
        part[o + 1] = s2;
    }
}

// Adds the `runs` partials of each (sample, group) of gn_bwd_partial into
// sums[2 * (bi * 32 + g)] = s1, [.. + 1] = s2. One warp per (sample,
// group), b * 32 warps in all: lane l adds runs l, l + 32, ... in order,
// then the lanes add in a fixed tree.
extern "C" __global__ void gn_bwd_combine(const double* __restrict__ part,
                                          double* __restrict__ sums, unsigned b,
                                          unsigned runs) {
    const unsigned long long wid =
        ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    // Whole warps leave together, so the full-mask shuffles below are valid.
    if (wid >= (unsigned long long)b * GN_GROUPS) return;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned long long bi = wid / GN_GROUPS;
    const unsigned g = (unsigned)(wid % GN_GROUPS);
    double s1 = 0.0, s2 = 0.0;
    for (unsigned k = lane; k < runs; k += 32u) {
        const unsigned long long o = 2 * ((bi * runs + k) * GN_GROUPS + g);
        s1 += part[o];
        s2 += part[o + 1];
    }
    s1 = warp_sum_d(s1);
    s2 = warp_sum_d(s2);
    if (lane == 0) {
        sums[2 * wid] = s1;
        sums[2 * wid + 1] = s2;
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
