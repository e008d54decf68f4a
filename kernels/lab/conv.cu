// Helpers of the GEMM convolutions in src/backend/cuda/conv.rs (CPU twin:
// conv_nhwc in src/backend/cpu/conv.rs). x is NHWC; a 'same' k x k
// convolution, stride 1, is one GEMM of the im2col matrix (one row per
// output pixel, (ky, kx, ci) along the row) with the (k*k*cin) x cout weights.

// cols[i, (ky*k + kx)*cin + ci] = x[pixel p0 + i shifted by (ky - k/2, kx - k/2), ci],
// zero outside the image; np pixels starting at p0.
extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ cols,
                                  unsigned long long p0, unsigned long long np,
                                  unsigned long long h, unsigned long long w,
                                  unsigned long long cin, unsigned long long k) {
    const unsigned long long kk = k * k * cin;
    const unsigned long long n = np * kk;
    const long long pad = (long long)(k / 2);
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const unsigned long long row = i / kk;
        const unsigned long long r = i - row * kk;
        const unsigned long long tap = r / cin;
        const unsigned long long ci = r - tap * cin;
        const unsigned long long ky = tap / k;
        const unsigned long long kx = tap - ky * k;
        const unsigned long long p = p0 + row;
        const unsigned long long bi = p / (h * w);
        const unsigned long long yy = (p / w) % h;
        const unsigned long long xx = p % w;
        const long long sy = (long long)yy + (long long)ky - pad;
        const long long sx = (long long)xx + (long long)kx - pad;
        float v = 0.0f;
        if (sy >= 0 && sy < (long long)h && sx >= 0 && sx < (long long)w) {
            v = x[((bi * h + (unsigned long long)sy) * w + (unsigned long long)sx) * cin + ci];
        }
        cols[i] = v;
    }
}

// y[p, c] = bias[c] for rows pixels: the GEMM then accumulates onto it (beta = 1).
extern "C" __global__ void broadcast_rows(float* __restrict__ y, const float* __restrict__ bias,
                                          unsigned long long rows, unsigned long long c) {
    const unsigned long long n = rows * c;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        y[i] = bias[i % c];
    }
}
