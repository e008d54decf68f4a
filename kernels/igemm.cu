// Implicit-GEMM 'same' convolution (k = 1 or 3, stride 1) on tensor cores,
// bf16 / fp16 operands (below) or float32 as three TF32 products (the fp32
// mode, further down) or one (the tf32 mode), with the producer's elementwise work folded in:
//   prologue: y = a[b,c] * x + s[b,c] (GroupNorm apply with scale/shift,
//             see norm.rs group_norm_affine), then SiLU, then nearest 2x
//             up-sampling or 2x2 average pooling of the result;
//   epilogue: + bias[n] + bvec[b, n] + res[m, n].
// CPU twin: `crate::backend::compose_conv_fused` (group_norm, upsample2 /
// avg_pool2, conv, add), which the float32 mode also runs.
//
// GEMM view: M = b*h*w output pixels, N = cout, K = k*k*cin ordered
// (ky, kx, ci) like the im2col rows of conv.cu. A (pixels x K) is gathered
// from the float32 NHWC source, transformed, and rounded to T once, in
// shared memory; zero padding is applied after the prologue (the network
// pads the normalised activation, not x). B is the weight matrix repacked
// at load time as T [cout][kp], K contiguous and zero-padded to kp (a
// multiple of BK), which is the "col" operand of mma.sync.
//
// 16-bit kernels: block tile BM x BN x BK = 128 x 128 x 32, 8 warps as 2 (M) x 4 (N), each
// warp 64 x 32 = 4 x 4 m16n8k16 tiles. Two shared-memory stages: the global
// loads of tile k+1 are issued before the mma of tile k and stored after it.

#include "conv_prologue.cuh"
#include "tensor_core.cuh"

#define BM 128
#define BN 128
#define BK 32
// Shared rows of BK + 8 halves (80 bytes): 16-byte aligned for ldmatrix and
// uint4 stores, and the 8 row addresses of one ldmatrix phase fall in 8
// distinct 16-byte bank groups.
#define SROW 40
#define THREADS 256

// Accumulator (mt, nt) of a warp holds rows g and g + 8, columns 2 (lane % 4)
// and +1 of its 16 x 8 tile, g = lane / 4; the warp's tile starts at
// (wm0, wn0).
__device__ __forceinline__ void epilogue(const ConvArgs& p, const float (&acc)[4][4][4], int wm0,
                                         int wn0, int lane) {
    const int hw = p.h * p.w;
    const int m_total = p.b * hw;
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = wm0 + mt * 16 + g + 8 * half;
            if (m >= m_total) continue;
            const int bi = m / hw;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int n = wn0 + nt * 8 + 2 * t4 + e;
                    if (n >= p.cout) continue;
                    float v = acc[mt][nt][2 * half + e] + p.bias[n];
                    if (p.has_bvec) v += p.bvec[(size_t)bi * p.cout + n];
                    const size_t o = (size_t)m * p.cout + n;
                    if (p.has_res) v += p.res[o];
                    p.y[o] = v;
                }
            }
        }
    }
}

// The A operand's share of one thread in one K tile of width BKT: NR rows,
// rows[i] = t / (BKT / 4) + (THREADS / (BKT / 4)) i, columns 4 (t % (BKT / 4))
// .. +3 (the caller decodes `rows` to match), gathered with zero padding and
// the prologue (GroupNorm apply, SiLU, resampling; deferred to value() for
// raw VEC loads). Both precisions stage A through this; they differ only in
// how value() is stored (rounded to T, or as float32) and in the B tile.
template <int RS, bool VEC, int BKT, int NR>
struct StageA {
    float4 av[NR];  // A values: raw x (VEC, RS != DOWN) or transformed
    int ain[NR];    // A row inside the image for this tile's tap (VEC)
    int aci;        // first channel of the thread's A columns (VEC)

    __device__ __forceinline__ void load(const ConvArgs& p, const Row* rows, int k0, int tid) {
        const int q = tid & (BKT / 4 - 1);
        const int pad = p.k >> 1;
        if (VEC) {
            // BKT divides cin, so the tile's columns share one tap.
            const int tap = k0 / p.cin;
            const int ky = tap / p.k, kx = tap - (tap / p.k) * p.k;
            aci = k0 - tap * p.cin + 4 * q;
#pragma unroll
            for (int i = 0; i < NR; ++i) {
                const Row r = rows[i];
                const int sy = r.oy + ky - pad, sx = r.ox + kx - pad;
                ain[i] = r.valid && sy >= 0 && sy < p.h && sx >= 0 && sx < p.w;
                av[i] = ain[i] ? gather4<RS>(p, r.bi, sy, sx, aci)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
            }
        } else {
            const int kk = p.k * p.k * p.cin;
#pragma unroll
            for (int i = 0; i < NR; ++i) {
                const Row r = rows[i];
                float v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int kidx = k0 + 4 * q + j;
                    v[j] = 0.f;
                    if (r.valid && kidx < kk) {
                        const int tap = kidx / p.cin;
                        const int ci = kidx - tap * p.cin;
                        const int ky = tap / p.k, kx = tap - (tap / p.k) * p.k;
                        const int sy = r.oy + ky - pad, sx = r.ox + kx - pad;
                        if (sy >= 0 && sy < p.h && sx >= 0 && sx < p.w)
                            v[j] = gather1<RS>(p, r.bi, sy, sx, ci);
                    }
                }
                av[i] = make_float4(v[0], v[1], v[2], v[3]);
            }
        }
    }

    // Row i's four values, ready to store. The raw VEC loads get their
    // prologue here, after the mma of the previous tile has hidden the load
    // latency.
    __device__ __forceinline__ float4 value(const ConvArgs& p, const Row* rows, int i) const {
        float4 v = av[i];
        if (VEC && RS != RS_DOWN && ain[i] && (p.has_affine || p.silu))
            v = prologue4(p, rows[i].bi, aci, v);
        return v;
    }
};

// 16-bit tiles: thread t stages rows t/8 + 32 i (i < 4) of A, columns
// 4 (t % 8) .. +3, and rows t/4 + 64 j (j < 2) of B, columns 8 (t % 4) .. +7.
template <typename T, int RS, bool VEC>
struct Stage {
    StageA<RS, VEC, BK, 4> a;
    uint4 bv[2];

    __device__ __forceinline__ void load(const ConvArgs& p, const Row* rows, int k0, int n0,
                                         int tid) {
        a.load(p, rows, k0, tid);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int n = n0 + (tid >> 2) + 64 * j;
            bv[j] = n < p.cout ? *reinterpret_cast<const uint4*>(
                                     static_cast<const unsigned short*>(p.wt) + (size_t)n * p.kp + k0 + 8 * (tid & 3))
                               : make_uint4(0u, 0u, 0u, 0u);
        }
    }

    __device__ __forceinline__ void store(const ConvArgs& p, const Row* rows,
                                          unsigned short (*as)[SROW],
                                          unsigned short (*bs)[SROW], int tid) {
        const int q = tid & 7;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float4 v = a.value(p, rows, i);
            const uint2 packed = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
            *reinterpret_cast<uint2*>(&as[(tid >> 3) + 32 * i][4 * q]) = packed;
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
            *reinterpret_cast<uint4*>(&bs[(tid >> 2) + 64 * j][8 * (tid & 3)]) = bv[j];
    }
};

template <typename T, int RS, bool VEC>
__device__ __forceinline__ void igemm(const ConvArgs& p) {
    __shared__ __align__(16) unsigned short As[2][BM][SROW];
    __shared__ __align__(16) unsigned short Bs[2][BN][SROW];

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1, wn = warp >> 1;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;

    Row rows[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) rows[i] = decode_row(p, m0 + (tid >> 3) + 32 * i);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int ktiles = p.kp / BK;
    Stage<T, RS, VEC> st;
    st.load(p, rows, 0, n0, tid);
    st.store(p, rows, As[0], Bs[0], tid);
    __syncthreads();

    for (int kt = 0; kt < ktiles; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < ktiles;
        if (more) st.load(p, rows, (kt + 1) * BK, n0, tid);
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned af[4][4], bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldmatrix_x4(af[mt], &As[cur][wm * 64 + mt * 16 + (lane & 15)][ks + 8 * (lane >> 4)]);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                unsigned r[4];
                ldmatrix_x4(r, &Bs[cur][wn * 32 + np * 16 + (lane & 7) + 8 * (lane >> 4)]
                                  [ks + 8 * ((lane >> 3) & 1)]);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
        }
        if (more) st.store(p, rows, As[cur ^ 1], Bs[cur ^ 1], tid);
        __syncthreads();
    }

    epilogue(p, acc, m0 + wm * 64, n0 + wn * 32, lane);
}

// ---- float32 mode: the same kernel shape on TF32 tensor cores, 3 products
// per tile (the "3xTF32" split): x = big + small with big = tf32(x) and
// small = tf32(x - big); x y ~ big_x big_y + big_x small_y + small_x big_y,
// whose dropped terms are ~2^-22 relative, near float32's own 2^-24. BK is
// 16 here so that two float32 stages of A and B fit 48 KiB.

#define BK32 16
// Rows of BK32 + 4 floats: the fragment loads of 8 rows g (stride 20 words)
// and 4 columns t land in 32 distinct banks; rows stay 16-byte aligned.
#define SROW32 20

// Thread t stages rows t/4 + 64 i (i < 2) of A and of B, columns 4 (t % 4) .. +3.
template <int RS, bool VEC>
struct StageF32 {
    StageA<RS, VEC, BK32, 2> a;
    float4 bv[2];

    __device__ __forceinline__ void load(const ConvArgs& p, const Row* rows, int k0, int n0,
                                         int tid) {
        a.load(p, rows, k0, tid);
        const int q = tid & 3;
        const float* w = static_cast<const float*>(p.wt);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int n = n0 + (tid >> 2) + 64 * j;
            bv[j] = n < p.cout ? *reinterpret_cast<const float4*>(w + (size_t)n * p.kp + k0 + 4 * q)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }

    __device__ __forceinline__ void store(const ConvArgs& p, const Row* rows, float (*as)[SROW32],
                                          float (*bs)[SROW32], int tid) {
        const int q = tid & 3;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            *reinterpret_cast<float4*>(&as[(tid >> 2) + 64 * i][4 * q]) = a.value(p, rows, i);
            *reinterpret_cast<float4*>(&bs[(tid >> 2) + 64 * i][4 * q]) = bv[i];
        }
    }
};

// PASSES = 3: the split above, the fp32 parity mode. PASSES = 1: one TF32
// product on the rounded operands accumulated in place, the tf32 mode, which
// is what PyTorch's default float32 convolutions (cuDNN, allow_tf32) do.
template <int RS, bool VEC, int PASSES>
__device__ __forceinline__ void igemm_tf32(const ConvArgs& p) {
    __shared__ __align__(16) float As[2][BM][SROW32];
    __shared__ __align__(16) float Bs[2][BN][SROW32];

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1, wn = warp >> 1;
    const int g = lane >> 2, t4 = lane & 3;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;

    Row rows[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) rows[i] = decode_row(p, m0 + (tid >> 2) + 64 * i);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int ktiles = p.kp / BK32;
    StageF32<RS, VEC> st;
    st.load(p, rows, 0, n0, tid);
    st.store(p, rows, As[0], Bs[0], tid);
    __syncthreads();

    for (int kt = 0; kt < ktiles; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < ktiles;
        if (more) st.load(p, rows, (kt + 1) * BK32, n0, tid);
#pragma unroll
        for (int ks = 0; ks < BK32; ks += 8) {
            unsigned ab[4][4], as_[4][4], bb[4][2], bs_[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const int r = wm * 64 + mt * 16 + g;
                split_tf32(As[cur][r][ks + t4], ab[mt][0], as_[mt][0]);
                split_tf32(As[cur][r + 8][ks + t4], ab[mt][1], as_[mt][1]);
                split_tf32(As[cur][r][ks + t4 + 4], ab[mt][2], as_[mt][2]);
                split_tf32(As[cur][r + 8][ks + t4 + 4], ab[mt][3], as_[mt][3]);
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int n = wn * 32 + nt * 8 + g;
                split_tf32(Bs[cur][n][ks + t4], bb[nt][0], bs_[nt][0]);
                split_tf32(Bs[cur][n][ks + t4 + 4], bb[nt][1], bs_[nt][1]);
            }
            if (PASSES == 1) {
                // The small halves are dead here; the compiler drops them.
#pragma unroll
                for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
                        mma_m16n8k8_tf32(acc[mt][nt], ab[mt], bb[nt][0], bb[nt][1]);
                continue;
            }
            // The three products of one k8 step sum into a fresh tile first:
            // the tensor core's internal adder is not IEEE (it truncates), and
            // re-rounding the long running sum three times per step lets the
            // error grow with K (emulated: 3.3e-5 at K = 4608, 25x a float32
            // loop; with the fresh tile ~5e-7).
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    float t[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_m16n8k8_tf32x3(t, ab[mt], as_[mt], bb[nt][0], bb[nt][1], bs_[nt][0],
                                       bs_[nt][1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][nt][e] += t[e];
                }
        }
        if (more) st.store(p, rows, As[cur ^ 1], Bs[cur ^ 1], tid);
        __syncthreads();
    }

    epilogue(p, acc, m0 + wm * 64, n0 + wn * 32, lane);
}

// The kernel's arguments, in launch order (src/backend/cuda/igemm.rs). The scalar
// path exists for the resampling-free case only (input convolutions and
// odd 1x1 layers): every resampling layer of these networks has whole K
// tiles of channels, and the launcher refuses the other combination.
#define IGEMM_KERNEL(NAME, FN)                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS)                                    \
        NAME(const float* x, const void* wt, const float* bias, const float* affine,         \
             const float* bvec, const float* res, float* y, int b, int h, int w, int cin,      \
             int cout, int k, int kp, int has_affine, int silu, int has_bvec, int has_res,    \
             const float* x2, int c1) {                                                      \
        const ConvArgs p = {x,    wt, bias, affine, bvec,       res,  y,        b,       h,  \
                            w,    cin, cout, k,     kp,         has_affine, silu, has_bvec, \
                            has_res, x2, c1};                                                \
        FN(p);                                                                               \
    }

IGEMM_KERNEL(igemm_bf16_same_v, (igemm<__nv_bfloat16, RS_SAME, true>))
IGEMM_KERNEL(igemm_bf16_same_s, (igemm<__nv_bfloat16, RS_SAME, false>))
IGEMM_KERNEL(igemm_bf16_up_v, (igemm<__nv_bfloat16, RS_UP, true>))
IGEMM_KERNEL(igemm_bf16_down_v, (igemm<__nv_bfloat16, RS_DOWN, true>))
IGEMM_KERNEL(igemm_f16_same_v, (igemm<__half, RS_SAME, true>))
IGEMM_KERNEL(igemm_f16_same_s, (igemm<__half, RS_SAME, false>))
IGEMM_KERNEL(igemm_f16_up_v, (igemm<__half, RS_UP, true>))
IGEMM_KERNEL(igemm_f16_down_v, (igemm<__half, RS_DOWN, true>))
IGEMM_KERNEL(igemm_tf32x3_same_v, (igemm_tf32<RS_SAME, true, 3>))
IGEMM_KERNEL(igemm_tf32x3_same_s, (igemm_tf32<RS_SAME, false, 3>))
IGEMM_KERNEL(igemm_tf32x3_up_v, (igemm_tf32<RS_UP, true, 3>))
IGEMM_KERNEL(igemm_tf32x3_down_v, (igemm_tf32<RS_DOWN, true, 3>))
IGEMM_KERNEL(igemm_tf32_same_v, (igemm_tf32<RS_SAME, true, 1>))
IGEMM_KERNEL(igemm_tf32_same_s, (igemm_tf32<RS_SAME, false, 1>))
IGEMM_KERNEL(igemm_tf32_up_v, (igemm_tf32<RS_UP, true, 1>))
IGEMM_KERNEL(igemm_tf32_down_v, (igemm_tf32<RS_DOWN, true, 1>))

// w16[n * kp + j] = w[j * cout + n] rounded to T for j < kk, else 0: the
// (kk x cout) float32 weight matrix of conv.cu transposed and padded.
template <typename T>
__device__ __forceinline__ void pack_weights(const float* __restrict__ w,
                                             unsigned short* __restrict__ w16,
                                             unsigned long long kk, unsigned long long cout,
                                             unsigned long long kp) {
    const unsigned long long n = cout * kp;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const unsigned long long co = i / kp, j = i - co * kp;
        const float v = j < kk ? w[j * cout + co] : 0.0f;
        w16[i] = (unsigned short)(pack2<T>(v, 0.0f) & 0xffffu);
    }
}

extern "C" __global__ void pack_weights_bf16(const float* __restrict__ w,
                                             unsigned short* __restrict__ w16,
                                             unsigned long long kk, unsigned long long cout,
                                             unsigned long long kp) {
    pack_weights<__nv_bfloat16>(w, w16, kk, cout, kp);
}

extern "C" __global__ void pack_weights_f16(const float* __restrict__ w,
                                            unsigned short* __restrict__ w16,
                                            unsigned long long kk, unsigned long long cout,
                                            unsigned long long kp) {
    pack_weights<__half>(w, w16, kk, cout, kp);
}

// w32[n * kp + j] = w[j * cout + n] for j < kk, else 0 (the 3xTF32 kernels').
extern "C" __global__ void pack_weights_f32(const float* __restrict__ w, float* __restrict__ w32,
                                            unsigned long long kk, unsigned long long cout,
                                            unsigned long long kp) {
    const unsigned long long n = cout * kp;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const unsigned long long co = i / kp, j = i - co * kp;
        w32[i] = j < kk ? w[j * cout + co] : 0.0f;
    }
}
