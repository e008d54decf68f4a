// Tensor-core building blocks shared by the mma.sync kernels (igemm.cu,
// flash.cu): 16-bit packing, mma.sync m16n8k16 (bf16 / fp16) and m16n8k8
// (TF32), ldmatrix, and the TF32 split of the 3xTF32 float32 mode.
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 / k8"; the
// kernels' headers spell out the ones they rely on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Two floats rounded (to nearest even) to T, lo in the low half: the
// register layout of a 16-bit mma operand pair.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// The two values of a pack2 register, back in float32 (exact).
template <typename T>
__device__ __forceinline__ float2 unpack2(unsigned u);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(unsigned u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
}

// The mma wrappers are plain (not volatile) asm: they only read and write
// registers, so the compiler may schedule them freely.

// c += a * b for one m16n8k16 tile, T operands, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                             unsigned b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4],
                                                            unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const unsigned (&a)[4],
                                                     unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b for one m16n8k8 TF32 tile. A: a0 (row g, k q), a1 (g + 8, q),
// a2 (g, q + 4), a3 (g + 8, q + 4); B: b0 (k q, n g), b1 (k q + 4, n g);
// C as m16n8k16's; g = lane / 4, q = lane % 4.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&c)[4], const unsigned (&a)[4],
                                                 unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 tiles of 16-bit elements from shared memory; lane l gives the
// address (16-byte aligned) of row l % 8 of tile l / 8 and receives, of
// tile i, row l / 4, columns 2 (l % 4) and +1 in r[i] (.trans: column l / 4,
// rows 2 (l % 4) and +1).
// "memory": the asm reads shared memory the compiler cannot see, so without
// the clobber it may move the read across the staging stores and
// __syncthreads that guard it.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const unsigned short* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const unsigned short* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// ---- 3xTF32: x = big + small + r with big = tf32(x), small = tf32(x - big)
// (cvt.rna: to nearest, ties away, 10 fraction bits), so |r| <= 2^-22 |x|;
// x y ~ small_x big_y + big_x small_y + big_x big_y.

__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void split_tf32(float x, unsigned& big, unsigned& small) {
    big = to_tf32(x);
    small = to_tf32(__fsub_rn(x, __uint_as_float(big)));  // exact: x - big fits float32
}

// c += a * b in 3xTF32, a = (ab, as) and b = (bb0 + bs0, bb1 + bs1) split
// as above; the small cross terms first, the big product last. Callers
// start c from zero and add it to their running sum themselves: the tensor
// cores' float32 accumulation truncates, and a long chain of mma on one
// accumulator drifts.
__device__ __forceinline__ void mma_m16n8k8_tf32x3(float (&c)[4], const unsigned (&ab)[4],
                                                   const unsigned (&as)[4], unsigned bb0,
                                                   unsigned bb1, unsigned bs0, unsigned bs1) {
    mma_m16n8k8_tf32(c, as, bb0, bb1);
    mma_m16n8k8_tf32(c, ab, bs0, bs1);
    mma_m16n8k8_tf32(c, ab, bb0, bb1);
}

// ---- cp.async (sm_80+): 16 bytes from global to shared memory without
// passing through registers. src_bytes = 0 writes 16 zero bytes and reads
// nothing (src must still be a valid address): the convolutions' padding.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in
// flight; other threads' copies need a __syncthreads after it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
