// Version 2 of the implicit-GEMM 'same' convolution (bf16 / fp16), beside
// version 1 (igemm.cu) for the kernel tournament (`fcd bench --kernels`).
// Version 1 recomputes the operand prologue (GroupNorm affine, SiLU,
// resampling) for every tap and every N tile inside the GEMM's k-loop;
// here a memory-bound pass (conv_prep) writes the transformed input once
// per layer as 16-bit NHWC, and the GEMM (igemm2) has no prologue: its
// operands go from global to shared memory with cp.async, STAGES deep.
// CPU twin: `crate::backend::compose_conv_fused`, as for version 1.
//
// GEMM view as in igemm.cu: M = b*h*w output pixels, N = cout, K = k*k*cin
// ordered (ky, kx, ci); B is the packed [cout][kp] weight matrix of
// igemm.cu's pack_weights. cin must be a multiple of BK, so that a K tile
// is one tap and each 16-byte copy is 8 channels of one pixel (kp = K).
//
// Tiles: BM = 128 rows, BN = 128, 64 or 32 columns (the layers' cout runs
// from 32 to 768), BK = 32; 8 warps as WARPS_M x (8 / WARPS_M), each warp
// MT x NT tiles of m16n8k16. Split-K: blockIdx.z takes tiles_per_split K
// tiles; with PARTIAL the raw sums go to y as [splits][m][cout] and
// igemm2_reduce adds them in split order and applies the epilogue.

#include "conv_prologue.cuh"
#include "tensor_core.cuh"

#define BM 128
#define BK 32
#define SROW 40  // as igemm.cu: 80-byte rows, 16-byte aligned, conflict-free ldmatrix
#define THREADS 256
#define STAGES 3

// out[m][ci..ci+3] = T(transformed4(x)) for every output pixel m of the
// [b, h, w] grid; cin and c1 multiples of 4. The GEMM pads with zeros, which
// is what the network does to the transformed tensor.
template <typename T, int RS>
__device__ __forceinline__ void conv_prep(const ConvArgs& p, unsigned short* out) {
    const int cq = p.cin >> 2;
    const int hw = p.h * p.w;
    const size_t n = (size_t)p.b * hw * cq;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / cq;
        const int ci = 4 * (int)(i - m * cq);
        const int bi = (int)(m / hw);
        const int rem = (int)(m - (size_t)bi * hw);
        const int oy = rem / p.w, ox = rem - (rem / p.w) * p.w;
        const float4 v = transformed4<RS>(p, bi, oy, ox, ci);
        *reinterpret_cast<uint2*>(out + m * p.cin + ci) =
            make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
    }
}

#define PREP_KERNEL(NAME, T, RS)                                                              \
    extern "C" __global__ void NAME(const float* x, const float* affine, unsigned short* out,   \
                                    int b, int h, int w, int cin, int has_affine, int silu,    \
                                    const float* x2, int c1) {                                 \
        ConvArgs p = {};                                                                       \
        p.x = x;                                                                               \
        p.affine = affine;                                                                     \
        p.b = b;                                                                               \
        p.h = h;                                                                               \
        p.w = w;                                                                               \
        p.cin = cin;                                                                           \
        p.has_affine = has_affine;                                                             \
        p.silu = silu;                                                                         \
        p.x2 = x2;                                                                             \
        p.c1 = c1;                                                                             \
        conv_prep<T, RS>(p, out);                                                              \
    }

PREP_KERNEL(conv_prep_bf16_same, __nv_bfloat16, RS_SAME)
PREP_KERNEL(conv_prep_bf16_up, __nv_bfloat16, RS_UP)
PREP_KERNEL(conv_prep_bf16_down, __nv_bfloat16, RS_DOWN)
PREP_KERNEL(conv_prep_f16_same, __half, RS_SAME)
PREP_KERNEL(conv_prep_f16_up, __half, RS_UP)
PREP_KERNEL(conv_prep_f16_down, __half, RS_DOWN)

struct Conv2Args {
    const unsigned short* xp;  // [b*h*w][cin], T
    const unsigned short* wt;  // [cout][kp], T
    const float* bias;         // [cout]
    const float* bvec;         // [b][cout], read when has_bvec
    const float* res;          // [b*h*w][cout], read when has_res
    float* y;                  // [m][cout], or [splits][m][cout] (PARTIAL)
    int b, h, w, cin, cout, k, kp, has_bvec, has_res, tiles_per_split;
};

template <typename T, int BN, int WARPS_M, bool PARTIAL>
__device__ __forceinline__ void igemm2(const Conv2Args& p) {
    constexpr int WARPS_N = 8 / WARPS_M;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0, "warp tile");
    // 16-byte chunks per stage: BM * 4 of A (2 per thread), BN * 4 of B.
    constexpr int A_IT = BM * 4 / THREADS;
    constexpr int B_IT = (BN * 4 + THREADS - 1) / THREADS;

    extern __shared__ __align__(16) unsigned short smem[];
    auto As = reinterpret_cast<unsigned short (*)[BM][SROW]>(smem);
    auto Bs = reinterpret_cast<unsigned short (*)[BN][SROW]>(smem + STAGES * BM * SROW);

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int hw = p.h * p.w;
    const int m_total = p.b * hw;
    const int pad = p.k >> 1;
    const int q = tid & 3;

    // Thread t copies chunk q = t % 4 (channels 8q .. 8q+7 of the tile) of
    // A rows t/4 + 64 i and of B rows t/4 + 64 j.
    int abase[A_IT], aoy[A_IT], aox[A_IT];
#pragma unroll
    for (int i = 0; i < A_IT; ++i) {
        const int m = m0 + (tid >> 2) + 64 * i;
        const int bi = m / hw, rem = m - (m / hw) * hw;
        aoy[i] = m < m_total ? rem / p.w : -(1 << 20);  // never inside the image
        aox[i] = rem - (rem / p.w) * p.w;
        abase[i] = bi * hw;
    }

    const int ktiles = p.kp / BK;
    const int kt0 = blockIdx.z * p.tiles_per_split;
    const int nk = min(p.tiles_per_split, ktiles - kt0);

    auto load = [&](int kt, int slot) {
        const int k0 = kt * BK;
        const int tap = k0 / p.cin;
        const int ky = tap / p.k, kx = tap - (tap / p.k) * p.k;
        const int ci = k0 - tap * p.cin + 8 * q;
#pragma unroll
        for (int i = 0; i < A_IT; ++i) {
            const int sy = aoy[i] + ky - pad, sx = aox[i] + kx - pad;
            const bool in = sy >= 0 && sy < p.h && sx >= 0 && sx < p.w;
            const unsigned short* src =
                in ? p.xp + (size_t)(abase[i] + sy * p.w + sx) * p.cin + ci : p.xp;
            cp_async16(&As[slot][(tid >> 2) + 64 * i][8 * q], src, in ? 16 : 0);
        }
#pragma unroll
        for (int j = 0; j < B_IT; ++j) {
            const int r = (tid >> 2) + 64 * j;
            if (r < BN) {
                const int n = n0 + r;
                const unsigned short* src = n < p.cout ? p.wt + (size_t)n * p.kp + k0 + 8 * q : p.wt;
                cp_async16(&Bs[slot][r][8 * q], src, n < p.cout ? 16 : 0);
            }
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // One commit per slot and per iteration, empty or not, so that
    // wait<STAGES - 2> at iteration i always means "tile i has landed".
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load(kt0 + s, s);
        cp_async_commit();
    }
    for (int i = 0; i < nk; ++i) {
        cp_async_wait<STAGES - 2>();
        // Tile i is visible to all, and every warp is done with the slot
        // that the load below overwrites (read at iteration i - 1).
        __syncthreads();
        if (i + STAGES - 1 < nk) load(kt0 + i + STAGES - 1, (i + STAGES - 1) % STAGES);
        cp_async_commit();
        const int cur = i % STAGES;
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned af[MT][4], bf[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(af[mt], &As[cur][wm * WTM + mt * 16 + (lane & 15)][ks + 8 * (lane >> 4)]);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned r[4];
                ldmatrix_x4(r, &Bs[cur][wn * WTN + np * 16 + (lane & 7) + 8 * (lane >> 4)]
                                  [ks + 8 * ((lane >> 3) & 1)]);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
        }
    }
    cp_async_wait<0>();

    // Accumulator (mt, nt): rows g and g + 8, columns 2 (lane % 4) and +1 of
    // its 16 x 8 tile (igemm.cu's epilogue, for any MT x NT).
    const int g = lane >> 2, t4 = lane & 3;
    float* y = PARTIAL ? p.y + (size_t)blockIdx.z * m_total * p.cout : p.y;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm * WTM + mt * 16 + g + 8 * half;
            if (m >= m_total) continue;
            const int bi = m / hw;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int n = n0 + wn * WTN + nt * 8 + 2 * t4 + e;
                    if (n >= p.cout) continue;
                    const size_t o = (size_t)m * p.cout + n;
                    float v = acc[mt][nt][2 * half + e];
                    if (!PARTIAL) {
                        v += p.bias[n];
                        if (p.has_bvec) v += p.bvec[(size_t)bi * p.cout + n];
                        if (p.has_res) v += p.res[o];
                    }
                    y[o] = v;
                }
            }
        }
    }
}

// Launch with STAGES * (BM + BN) * SROW * 2 bytes of dynamic shared memory
// (src/backend/cuda/igemm2.rs).
#define IGEMM2_KERNEL(NAME, T, BN, WARPS_M, PARTIAL)                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                    \
        NAME(const unsigned short* xp, const unsigned short* wt, const float* bias,           \
             const float* bvec, const float* res, float* y, int b, int h, int w, int cin,     \
             int cout, int k, int kp, int has_bvec, int has_res, int tiles_per_split) {       \
        const Conv2Args p = {xp, wt, bias, bvec, res, y, b, h, w, cin, cout, k, kp,         \
                             has_bvec, has_res, tiles_per_split};                            \
        igemm2<T, BN, WARPS_M, PARTIAL>(p);                                                  \
    }

IGEMM2_KERNEL(igemm2_bf16_n128, __nv_bfloat16, 128, 2, false)
IGEMM2_KERNEL(igemm2_bf16_n64, __nv_bfloat16, 64, 4, false)
IGEMM2_KERNEL(igemm2_bf16_n32, __nv_bfloat16, 32, 8, false)
IGEMM2_KERNEL(igemm2_bf16_n128_part, __nv_bfloat16, 128, 2, true)
IGEMM2_KERNEL(igemm2_bf16_n64_part, __nv_bfloat16, 64, 4, true)
IGEMM2_KERNEL(igemm2_bf16_n32_part, __nv_bfloat16, 32, 8, true)
IGEMM2_KERNEL(igemm2_f16_n128, __half, 128, 2, false)
IGEMM2_KERNEL(igemm2_f16_n64, __half, 64, 4, false)
IGEMM2_KERNEL(igemm2_f16_n32, __half, 32, 8, false)
IGEMM2_KERNEL(igemm2_f16_n128_part, __half, 128, 2, true)
IGEMM2_KERNEL(igemm2_f16_n64_part, __half, 64, 4, true)
IGEMM2_KERNEL(igemm2_f16_n32_part, __half, 32, 8, true)

// y[i] = sum over s < splits of part[s][i] (in split order: repeatable)
// + bias[n] + bvec[b][n] + res[i], for i = m * cout + n < m_total * cout.
extern "C" __global__ void igemm2_reduce(const float* part, const float* bias, const float* bvec,
                                         const float* res, float* y, unsigned long long mn,
                                         int cout, int hw, int splits, int has_bvec,
                                         int has_res) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < mn;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < splits; ++s) v += part[(unsigned long long)s * mn + i];
        const unsigned long long m = i / cout;
        const int n = (int)(i - m * cout);
        v += bias[n];
        if (has_bvec) v += bvec[(m / hw) * cout + n];
        if (has_res) v += res[i];
        y[i] = v;
    }
}
