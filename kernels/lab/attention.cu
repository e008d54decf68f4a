// Multi-head attention over a token sequence, forward and input gradient.
// CPU twins: forward / backward in src/backend/cpu/attention.rs.
//
// qkv is [b, t, 3c], the output [b, t, c]; head h has d = c / heads channels.
// legacy order: q, k, v of head h at channels h*3d, h*3d + d, h*3d + 2d;
// otherwise q, k, v are the thirds and head h sits at h*d inside each.
// Output head h is at channels h*d. With s = d^(-1/4):
//   S_ij = (q_i s) . (k_j s),  W = softmax_j(S),  A_i = sum_j W_ij v_j.
//
// Every kernel runs one block per (batch, head, row) with a block size that
// is a multiple of 32, and keeps one or two per-row vectors of t floats in
// dynamic shared memory (sized by the launcher). Logits and dA . v products
// are always formed by warp_dot, so the forward-like pass of the backward
// and its per-key pass compute bit-identical weights.

#include "reduce.cuh"

struct Head {
    unsigned long long qkv_row0;  // flat index of (batch, token 0) in qkv
    unsigned long long out_row0;  // flat index of (batch, token 0) in out / dout
    unsigned qo, ko, vo, oo;      // channel offsets of q, k, v and the output
};

__device__ __forceinline__ Head head_of(unsigned bi, unsigned h, unsigned t, unsigned c,
                                        unsigned d, int legacy) {
    Head r;
    r.qkv_row0 = (unsigned long long)bi * t * 3 * c;
    r.out_row0 = (unsigned long long)bi * t * c;
    if (legacy) {
        r.qo = h * 3 * d;
        r.ko = h * 3 * d + d;
        r.vo = h * 3 * d + 2 * d;
    } else {
        r.qo = h * d;
        r.ko = c + h * d;
        r.vo = 2 * c + h * d;
    }
    r.oo = h * d;
    return r;
}

// (a sa) . (b sb) over d elements by one whole warp; the result is valid in
// lane 0. Each factor is rounded after scaling, as the CPU twin gathers the
// scaled q and k before its matmul.
__device__ __forceinline__ float warp_dot(const float* a, float sa, const float* b, float sb,
                                          unsigned d, unsigned lane) {
    float acc = 0.0f;
    for (unsigned k = lane; k < d; k += 32) acc = fmaf(__fmul_rn(a[k], sa), __fmul_rn(b[k], sb), acc);
    return warp_sum_f(acc);
}

// Fills w[0..t) with the softmax weights of query row i (logits formed
// from q_i against every key), and returns (through m, r) the row maximum
// and the reciprocal of the sum of exponentials, so w_j = exp(S_j - m) * r.
__device__ void softmax_row(const float* __restrict__ qkv, const Head& hd, unsigned i, unsigned t,
                            unsigned c, unsigned d, float s, float* w, float* fscratch,
                            double* dscratch, float* m_out, float* r_out) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned nwarps = blockDim.x >> 5;
    const float* q = qkv + hd.qkv_row0 + (unsigned long long)i * 3 * c + hd.qo;
    for (unsigned j = warp; j < t; j += nwarps) {
        const float* k = qkv + hd.qkv_row0 + (unsigned long long)j * 3 * c + hd.ko;
        const float logit = warp_dot(q, s, k, s, d, lane);
        if (lane == 0) w[j] = logit;
    }
    __syncthreads();

    float mx = __int_as_float(0xff800000);
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) mx = fmaxf(mx, w[j]);
    const float m = block_max_f(mx, fscratch);

    double sum = 0.0;
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) {
        const float e = expf(__fsub_rn(w[j], m));
        w[j] = e;
        sum += (double)e;
    }
    const float r = (float)(1.0 / block_sum_d(sum, dscratch));
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) w[j] = __fmul_rn(w[j], r);
    __syncthreads();
    *m_out = m;
    *r_out = r;
}

// out[b, i, h*d .. h*d+d) = sum_j W_ij v_j. Grid: b * heads * t blocks;
// dynamic shared memory: t floats.
extern "C" __global__ void attn_fwd(const float* __restrict__ qkv, float* __restrict__ out,
                                    unsigned b, unsigned t, unsigned c, unsigned heads,
                                    int legacy, float s) {
    extern __shared__ float w[];
    __shared__ float fscratch[33];
    __shared__ double dscratch[33];
    const unsigned long long blk = blockIdx.x;
    if (blk >= (unsigned long long)b * heads * t) return;
    const unsigned i = (unsigned)(blk % t);
    const unsigned h = (unsigned)((blk / t) % heads);
    const unsigned bi = (unsigned)(blk / t / heads);
    const unsigned d = c / heads;
    const Head hd = head_of(bi, h, t, c, d, legacy);

    float m, r;
    softmax_row(qkv, hd, i, t, c, d, s, w, fscratch, dscratch, &m, &r);

    float* o = out + hd.out_row0 + (unsigned long long)i * c + hd.oo;
    for (unsigned k = threadIdx.x; k < d; k += blockDim.x) {
        const float* v = qkv + hd.qkv_row0 + hd.vo + k;
        float acc = 0.0f;
        for (unsigned j = 0; j < t; ++j) acc = fmaf(w[j], v[(unsigned long long)j * 3 * c], acc);
        o[k] = acc;
    }
}

// Backward, per query row i: recomputes W_i, forms dW_ij = dA_i . v_j,
// D_i = sum_j W_ij dW_ij (double), dS_ij = W_ij (dW_ij - D_i), writes
// dq_i = s * sum_j dS_ij (k_j s) into dqkv, and the row's (max, 1/sum, D)
// into rowstats[3 * row]. Grid: b * heads * t blocks; dynamic shared
// memory: 2t floats.
extern "C" __global__ void attn_bwd_rows(const float* __restrict__ qkv,
                                         const float* __restrict__ dout,
                                         float* __restrict__ dqkv, float* __restrict__ rowstats,
                                         unsigned b, unsigned t, unsigned c, unsigned heads,
                                         int legacy, float s) {
    extern __shared__ float sh[];
    __shared__ float fscratch[33];
    __shared__ double dscratch[33];
    const unsigned long long blk = blockIdx.x;
    if (blk >= (unsigned long long)b * heads * t) return;
    const unsigned i = (unsigned)(blk % t);
    const unsigned h = (unsigned)((blk / t) % heads);
    const unsigned bi = (unsigned)(blk / t / heads);
    const unsigned d = c / heads;
    const Head hd = head_of(bi, h, t, c, d, legacy);
    float* w = sh;
    float* ds = sh + t;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned nwarps = blockDim.x >> 5;

    const float* da = dout + hd.out_row0 + (unsigned long long)i * c + hd.oo;
    for (unsigned j = warp; j < t; j += nwarps) {
        const float* v = qkv + hd.qkv_row0 + (unsigned long long)j * 3 * c + hd.vo;
        const float dw = warp_dot(da, 1.0f, v, 1.0f, d, lane);
        if (lane == 0) ds[j] = dw;
    }
    // softmax_row's first barrier orders these ds writes before the reads below.
    float m, r;
    softmax_row(qkv, hd, i, t, c, d, s, w, fscratch, dscratch, &m, &r);

    double dot = 0.0;
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) dot += (double)w[j] * (double)ds[j];
    const float dd = (float)block_sum_d(dot, dscratch);
    for (unsigned j = threadIdx.x; j < t; j += blockDim.x) ds[j] = __fmul_rn(w[j], __fsub_rn(ds[j], dd));
    __syncthreads();

    float* dq = dqkv + hd.qkv_row0 + (unsigned long long)i * 3 * c + hd.qo;
    for (unsigned k = threadIdx.x; k < d; k += blockDim.x) {
        const float* kk = qkv + hd.qkv_row0 + hd.ko + k;
        float acc = 0.0f;
        for (unsigned j = 0; j < t; ++j)
            acc = fmaf(ds[j], __fmul_rn(kk[(unsigned long long)j * 3 * c], s), acc);
        dq[k] = __fmul_rn(acc, s);
    }
    if (threadIdx.x == 0) {
        float* st = rowstats + 3 * blk;
        st[0] = m;
        st[1] = r;
        st[2] = dd;
    }
}

// Backward, per key row j (after attn_bwd_rows): rebuilds column j of W and
// dS from the row statistics, then writes dv_j = sum_i W_ij dA_i and
// dk_j = s * sum_i dS_ij (q_i s) into dqkv. Grid: b * heads * t blocks;
// dynamic shared memory: 2t floats.
extern "C" __global__ void attn_bwd_cols(const float* __restrict__ qkv,
                                         const float* __restrict__ dout,
                                         const float* __restrict__ rowstats,
                                         float* __restrict__ dqkv, unsigned b, unsigned t,
                                         unsigned c, unsigned heads, int legacy, float s) {
    extern __shared__ float sh[];
    const unsigned long long blk = blockIdx.x;
    if (blk >= (unsigned long long)b * heads * t) return;
    const unsigned j = (unsigned)(blk % t);
    const unsigned h = (unsigned)((blk / t) % heads);
    const unsigned bi = (unsigned)(blk / t / heads);
    const unsigned d = c / heads;
    const Head hd = head_of(bi, h, t, c, d, legacy);
    float* w = sh;
    float* ds = sh + t;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned nwarps = blockDim.x >> 5;
    // Row statistics of (bi, h, row i) live at 3 * (blk - j + i).
    const unsigned long long stats0 = 3 * (blk - j);

    const float* k = qkv + hd.qkv_row0 + (unsigned long long)j * 3 * c + hd.ko;
    const float* v = qkv + hd.qkv_row0 + (unsigned long long)j * 3 * c + hd.vo;
    for (unsigned i = warp; i < t; i += nwarps) {
        const float* q = qkv + hd.qkv_row0 + (unsigned long long)i * 3 * c + hd.qo;
        const float* da = dout + hd.out_row0 + (unsigned long long)i * c + hd.oo;
        const float logit = warp_dot(q, s, k, s, d, lane);
        const float dw = warp_dot(da, 1.0f, v, 1.0f, d, lane);
        if (lane == 0) {
            const float* st = rowstats + stats0 + 3ull * i;
            const float wij = __fmul_rn(expf(__fsub_rn(logit, st[0])), st[1]);
            w[i] = wij;
            ds[i] = __fmul_rn(wij, __fsub_rn(dw, st[2]));
        }
    }
    __syncthreads();

    float* row = dqkv + hd.qkv_row0 + (unsigned long long)j * 3 * c;
    for (unsigned o = threadIdx.x; o < 2 * d; o += blockDim.x) {
        float acc = 0.0f;
        if (o < d) {
            const float* dac = dout + hd.out_row0 + hd.oo + o;
            for (unsigned i = 0; i < t; ++i) acc = fmaf(w[i], dac[(unsigned long long)i * c], acc);
            row[hd.vo + o] = acc;
        } else {
            const unsigned kk = o - d;
            const float* qc = qkv + hd.qkv_row0 + hd.qo + kk;
            for (unsigned i = 0; i < t; ++i)
                acc = fmaf(ds[i], __fmul_rn(qc[(unsigned long long)i * 3 * c], s), acc);
            row[hd.ko + kk] = __fmul_rn(acc, s);
        }
    }
}
