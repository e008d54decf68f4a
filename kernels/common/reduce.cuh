// Warp and block reductions shared by the kernels. The tree shapes are part
// of the numerics (float sums are not associative): a kernel whose CPU twin
// or GPU test pins an order keeps using the one it was validated with.
#pragma once

// Sum / max over a whole warp by halving (shfl_down); valid in lane 0 only.
// Every lane of the warp must call it (full mask).
__device__ __forceinline__ float warp_sum_f(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, off));
    return v;
}

// Max / sum over the 4 lanes of an mma quad (lanes 4g .. 4g + 3, which hold
// one accumulator row between them), returned to all four. The sum is
// explicitly rounded so that no contraction can reorder it.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return v;
}

__device__ __forceinline__ float quad_sum(float v) {
    v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return v;
}

// Sum / max over the block (blockDim.x a multiple of 32), returned to every
// thread: warp trees, then warp 0 over the warp results. `scratch` holds 33
// values; the trailing barrier lets the next call reuse it.
__device__ double block_sum_d(double v, double* scratch) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned nwarps = (blockDim.x + 31u) >> 5;
    v = warp_sum_d(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double r = lane < nwarps ? scratch[lane] : 0.0;
        r = warp_sum_d(r);
        if (lane == 0) scratch[32] = r;
    }
    __syncthreads();
    const double total = scratch[32];
    __syncthreads();
    return total;
}

__device__ float block_max_f(float v, float* scratch) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned nwarps = (blockDim.x + 31u) >> 5;
    v = warp_max_f(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float r = lane < nwarps ? scratch[lane] : __int_as_float(0xff800000);
        r = warp_max_f(r);
        if (lane == 0) scratch[32] = r;
    }
    __syncthreads();
    const float total = scratch[32];
    __syncthreads();
    return total;
}
