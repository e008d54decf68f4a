// DDIM updates of the sampler state x (SPEC section 6), eta = 0.
// CPU twins: invert_step / denoise_step in src/ddim.rs.
//
// Every operation goes through an explicitly rounded intrinsic so that NVRTC
// cannot contract a*b+c into an FMA: the CPU twin rounds after each operation,
// and the sampler is chaotic, so the two must agree bit for bit.

// As Rust's f32::clamp and torch.clamp: a NaN stays NaN (fminf/fmaxf would
// turn it into -1 and hide a broken network output).
__device__ __forceinline__ float clamp_unit(float v) {
    return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

// p = clamp((x - sqrt(1-a) eps) / sqrt(a), -1, 1)
__device__ __forceinline__ float predict_x0(float x, float e, float sqrt_a, float sqrt_1ma) {
    return clamp_unit(__fdiv_rn(__fsub_rn(x, __fmul_rn(sqrt_1ma, e)), sqrt_a));
}

// x = sqrt(a') p + sqrt(1-a') eps
extern "C" __global__ void ddim_invert_step(float* __restrict__ x, const float* __restrict__ eps,
                                            float sqrt_a, float sqrt_1ma, float sqrt_a_next,
                                            float sqrt_1ma_next, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float xi = x[i];
        const float e = eps[i];
        const float p = predict_x0(xi, e, sqrt_a, sqrt_1ma);
        x[i] = __fadd_rn(__fmul_rn(sqrt_a_next, p), __fmul_rn(sqrt_1ma_next, e));
    }
}

// e2 = (x - sqrt(a) p) / sqrt(1-a); x = clamp(sqrt(a') p + sqrt(1-a') e2, -1, 1)
extern "C" __global__ void ddim_denoise_step(float* __restrict__ x, const float* __restrict__ eps,
                                             float sqrt_a, float sqrt_1ma, float sqrt_a_next,
                                             float sqrt_1ma_next, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float xi = x[i];
        const float p = predict_x0(xi, eps[i], sqrt_a, sqrt_1ma);
        const float e2 = __fdiv_rn(__fsub_rn(xi, __fmul_rn(sqrt_a, p)), sqrt_1ma);
        x[i] = clamp_unit(__fadd_rn(__fmul_rn(sqrt_a_next, p), __fmul_rn(sqrt_1ma_next, e2)));
    }
}
