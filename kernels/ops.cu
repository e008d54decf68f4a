// Elementwise and data-movement ops of the Backend trait; launchers in
// src/backend/cuda/ops.rs, CPU twins in src/backend/cpu/mod.rs. Tensors are NHWC,
// token sequences [B, 1, T, C].
//
// Arithmetic goes through explicitly rounded intrinsics (__fadd_rn, ...) so
// that NVRTC cannot contract a*b+c into an FMA: the CPU twin rounds after each
// operation, and the sampler, which runs these ops, is chaotic enough that the
// two must agree bit for bit.

#define GRID_STRIDE(i, n)                                                                      \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;     \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void fill(float* __restrict__ y, float v, unsigned long long n) {
    GRID_STRIDE(i, n) { y[i] = v; }
}

// z * sigmoid(z), sigmoid(z) = 1 / (1 + exp(-z)) as the CPU writes it.
extern "C" __global__ void silu(const float* __restrict__ x, float* __restrict__ y,
                                unsigned long long n) {
    GRID_STRIDE(i, n) {
        const float z = x[i];
        y[i] = __fmul_rn(z, __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z))));
    }
}

extern "C" __global__ void add(const float* __restrict__ a, const float* __restrict__ b,
                               float* __restrict__ y, unsigned long long n) {
    GRID_STRIDE(i, n) { y[i] = __fadd_rn(a[i], b[i]); }
}

// y = a + v broadcast over the hw pixels of each batch item: a [B, hw, c], v [B, c].
extern "C" __global__ void add_bcast(const float* __restrict__ a, const float* __restrict__ v,
                                     float* __restrict__ y, unsigned long long n,
                                     unsigned long long hwc, unsigned long long c) {
    GRID_STRIDE(i, n) { y[i] = __fadd_rn(a[i], v[(i / hwc) * c + i % c]); }
}

// x [b, 2ho, 2wo, c] -> y [b, ho, wo, c]; the four taps summed in the CPU's
// order (starting from 0), then scaled.
extern "C" __global__ void avg_pool2(const float* __restrict__ x, float* __restrict__ y,
                                     unsigned long long b, unsigned long long ho,
                                     unsigned long long wo, unsigned long long c) {
    const unsigned long long n = b * ho * wo * c;
    const unsigned long long w = 2 * wo;
    const unsigned long long h = 2 * ho;
    GRID_STRIDE(i, n) {
        const unsigned long long ch = i % c;
        const unsigned long long px = i / c;
        const unsigned long long xx = px % wo;
        const unsigned long long yy = (px / wo) % ho;
        const unsigned long long bi = px / (wo * ho);
        const unsigned long long top = ((bi * h + 2 * yy) * w + 2 * xx) * c + ch;
        const unsigned long long bottom = top + w * c;
        float s = 0.0f;
        s = __fadd_rn(s, x[top]);
        s = __fadd_rn(s, x[top + c]);
        s = __fadd_rn(s, x[bottom]);
        s = __fadd_rn(s, x[bottom + c]);
        y[i] = __fmul_rn(s, 0.25f);
    }
}

// Nearest-neighbour x [b, h, w, c] -> y [b, 2h, 2w, c], times scale (1 for
// upsampling, 1/4 for the gradient of avg_pool2).
extern "C" __global__ void upsample2(const float* __restrict__ x, float* __restrict__ y,
                                     unsigned long long b, unsigned long long h,
                                     unsigned long long w, unsigned long long c, float scale) {
    const unsigned long long ho = 2 * h;
    const unsigned long long wo = 2 * w;
    const unsigned long long n = b * ho * wo * c;
    GRID_STRIDE(i, n) {
        const unsigned long long ch = i % c;
        const unsigned long long px = i / c;
        const unsigned long long xo = px % wo;
        const unsigned long long yo = (px / wo) % ho;
        const unsigned long long bi = px / (wo * ho);
        y[i] = __fmul_rn(x[((bi * h + yo / 2) * w + xo / 2) * c + ch], scale);
    }
}

// Per pixel, the ca channels of a then the cb channels of b.
extern "C" __global__ void concat(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ y, unsigned long long pixels,
                                  unsigned long long ca, unsigned long long cb) {
    const unsigned long long ct = ca + cb;
    const unsigned long long n = pixels * ct;
    GRID_STRIDE(i, n) {
        const unsigned long long p = i / ct;
        const unsigned long long ch = i % ct;
        y[i] = ch < ca ? a[p * ca + ch] : b[p * cb + (ch - ca)];
    }
}

// y[bi] = x[bi] + table[rows[bi]] for x [b, dim], table [k, dim]. The host
// checks the rows; an out-of-range one gives NaN rather than a stray read.
// y [b, dim]: [cos(t f_i) .., sin(t f_i) ..], f_i = exp(-ln(10000) i / half),
// in double and rounded once, as the CPU twin (Backend::timestep_embedding).
extern "C" __global__ void timestep_embedding(const unsigned int* __restrict__ ts,
                                              float* __restrict__ y, unsigned long long b,
                                              unsigned long long half) {
    const unsigned long long n = b * 2 * half;
    GRID_STRIDE(i, n) {
        const unsigned long long bi = i / (2 * half);
        const unsigned long long j = i % (2 * half);
        const unsigned long long k = j < half ? j : j - half;
        const double f = exp(-log(10000.0) * (double)k / (double)half);
        const double a = (double)ts[bi] * f;
        y[i] = (float)(j < half ? cos(a) : sin(a));
    }
}

extern "C" __global__ void add_rows(const float* __restrict__ x, const float* __restrict__ table,
                                    const unsigned int* __restrict__ rows, float* __restrict__ y,
                                    unsigned long long b, unsigned long long dim,
                                    unsigned long long k) {
    const unsigned long long n = b * dim;
    GRID_STRIDE(i, n) {
        const unsigned long long r = rows[i / dim];
        y[i] = r < k ? __fadd_rn(x[i], table[r * dim + i % dim]) : __int_as_float(0x7fc00000);
    }
}

// x [b, t, c] -> y [b, t+1, c]: token 0 the mean over the t tokens (summed in
// double in token order, as the CPU), then the tokens; plus pos [t+1, c].
extern "C" __global__ void prepend_mean(const float* __restrict__ x, const float* __restrict__ pos,
                                        float* __restrict__ y, unsigned long long b,
                                        unsigned long long t, unsigned long long c) {
    const unsigned long long t1 = t + 1;
    const unsigned long long n = b * t1 * c;
    GRID_STRIDE(i, n) {
        const unsigned long long ch = i % c;
        const unsigned long long tok = (i / c) % t1;
        const unsigned long long bi = i / (t1 * c);
        const float* src = x + bi * t * c;
        float v;
        if (tok == 0) {
            double s = 0.0;
            for (unsigned long long j = 0; j < t; ++j) {
                s += (double)src[j * c + ch];
            }
            v = (float)(s / (double)t);
        } else {
            v = src[(tok - 1) * c + ch];
        }
        y[i] = __fadd_rn(v, pos[tok * c + ch]);
    }
}

// dtok [b, t+1, c] -> dx [b, t, c]: each token's own gradient plus token 0's
// share of the mean.
extern "C" __global__ void prepend_mean_bwd(const float* __restrict__ dtok, float* __restrict__ dx,
                                            unsigned long long b, unsigned long long t,
                                            unsigned long long c) {
    const unsigned long long n = b * t * c;
    const float tf = (float)t;
    GRID_STRIDE(i, n) {
        const unsigned long long ch = i % c;
        const unsigned long long tok = (i / c) % t;
        const unsigned long long bi = i / (t * c);
        const float* src = dtok + bi * (t + 1) * c;
        dx[i] = __fadd_rn(src[(tok + 1) * c + ch], __fdiv_rn(src[ch], tf));
    }
}

// x [b, t, c] -> y [b, c], token 0.
extern "C" __global__ void token0(const float* __restrict__ x, float* __restrict__ y,
                                  unsigned long long b, unsigned long long t,
                                  unsigned long long c) {
    const unsigned long long n = b * c;
    GRID_STRIDE(i, n) { y[i] = x[(i / c) * t * c + i % c]; }
}

// d0 [b, c] -> d [b, t, c]: d0 at token 0, zero elsewhere.
extern "C" __global__ void token0_bwd(const float* __restrict__ d0, float* __restrict__ d,
                                      unsigned long long b, unsigned long long t,
                                      unsigned long long c) {
    const unsigned long long n = b * t * c;
    GRID_STRIDE(i, n) {
        const unsigned long long ch = i % c;
        const unsigned long long tok = (i / c) % t;
        const unsigned long long bi = i / (t * c);
        d[i] = tok == 0 ? d0[bi * c + ch] : 0.0f;
    }
}

// g[r, j] = [j == labels[r]] - softmax(logits[r])[j], one thread per row of k
// (k is the number of classes, a handful): max-subtracted, sums in double, as
// the CPU. An out-of-range label (the host checks) gives a row of NaN.
extern "C" __global__ void log_softmax_grad(const float* __restrict__ logits,
                                            const unsigned int* __restrict__ labels,
                                            float* __restrict__ g, unsigned long long b,
                                            unsigned long long k) {
    GRID_STRIDE(r, b) {
        const float* row = logits + r * k;
        float* out = g + r * k;
        const unsigned long long label = labels[r];
        float m = __int_as_float(0xff800000);  // -inf
        for (unsigned long long j = 0; j < k; ++j) {
            m = fmaxf(m, row[j]);
        }
        const double md = (double)m;
        double z = 0.0;
        for (unsigned long long j = 0; j < k; ++j) {
            z += exp((double)row[j] - md);
        }
        for (unsigned long long j = 0; j < k; ++j) {
            const double p = exp((double)row[j] - md) / z;
            out[j] = label < k ? (float)((j == label ? 1.0 : 0.0) - p) : __int_as_float(0x7fc00000);
        }
    }
}

// x += s * g, the product rounded before the sum.
extern "C" __global__ void axpy(float* __restrict__ x, float s, const float* __restrict__ g,
                                unsigned long long n) {
    GRID_STRIDE(i, n) { x[i] = __fadd_rn(x[i], __fmul_rn(s, g[i])); }
}

// flag[0] = stage if flag[0] is still 0 and x holds a NaN or an infinity. The sampler
// flags every network output this way and reads flag once per phase, rather than
// copying each output off the device to look; stream order makes the kept stage the
// first bad one. stage is an integer below 2^24, so exact as a float.
extern "C" __global__ void flag_non_finite(const float* __restrict__ x, float* __restrict__ flag,
                                           float stage, unsigned long long n) {
    GRID_STRIDE(i, n) {
        if (!isfinite(x[i])) {
            atomicCAS(reinterpret_cast<unsigned*>(flag), 0u, __float_as_uint(stage));
            return;
        }
    }
}

// out = a * x + b * y, each product rounded before the sum.
extern "C" __global__ void axpby(float a, const float* __restrict__ x, float b,
                                 const float* __restrict__ y, float* __restrict__ out,
                                 unsigned long long n) {
    GRID_STRIDE(i, n) { out[i] = __fadd_rn(__fmul_rn(a, x[i]), __fmul_rn(b, y[i])); }
}
