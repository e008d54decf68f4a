// Fused multi-head attention forward on tensor cores (FlashAttention-2
// style) for the bf16 / fp16 precision modes, and a float32-accurate 3xTF32
// variant of it for the fp32 mode (attn_flash_tf32x3*, described in its own
// section below the 16-bit kernel). Launcher: src/backend/cuda/flash.rs;
// float32 oracle: attn_fwd in attention.cu; CPU twin: forward in
// src/backend/cpu/attention.rs.
//
// Conventions as attention.cu: qkv is [b, t, 3c] float32, the output
// [b, t, c] float32; head h has d = c / heads channels; legacy order: q, k, v
// of head h at channels h*3d, h*3d + d, h*3d + 2d, otherwise q, k, v are the
// thirds (q at h*d, k at c + h*d, v at 2c + h*d). Output head h at h*d.
//   S_ij = (q_i s) . (k_j s) with s = d^(-1/4),  W = softmax_j(S),
//   A_i = sum_j W_ij v_j.
//
// Arithmetic. q, k and v are rounded (round to nearest even) from float32 to
// the 16-bit type T as they are, unscaled; the scale is folded into the
// logits: S_ij = (q16_i . k16_j) * d^(-1/2), formed in the log2 domain as
// x_ij = (q16_i . k16_j) * (log2(e) / sqrt(d)) (the launcher passes that
// factor), so exp(S - m) = exp2(x - m2). Products of two 16-bit values are
// exact in float32 and the mma accumulates in float32. The online softmax
// (running max, rescale, row sums) is float32. The unnormalised weights
// p = exp2(x - m_running) are rounded to T to feed the P.V mma, and the row
// sum l adds those rounded p, so the weights that multiply v sum to one
// exactly: A_i = (sum_j p16_ij v16_j) / (sum_j p16_ij). Scores never leave
// registers.
//
// Tiling. Grid (ceil(t / 64), heads, b), 128 threads = 4 warps; warp w owns
// query rows 64 * blockIdx.x + 16 w .. + 16. The block walks the keys in
// tiles of 64: all 128 threads stage the tile's K and V (float32 from
// global, float4 loads, converted to T) in shared memory, rows padded to
// dp + 8 elements (dp = d rounded up to 16; columns d..dp zero), then each
// warp forms its 16 x 64 block of S with mma (k = dp), applies the online
// softmax, converts P to mma A fragments in registers and accumulates
// O += P V (16 x dp per warp). Keys >= t get -inf before the softmax (their
// K and V rows are staged as zeros so P V sees 0 * 0); query rows >= t are
// computed from zero q and never stored; a warp whose 16 rows all lie past t
// skips the arithmetic but still stages tiles and meets the barriers.
// Q fragments are loaded straight from global memory into registers once.
//
// Fragment layouts of mma.sync.aligned.m16n8k16 (.bf16 / .f16 operands, f32
// accumulators), PTX ISA "Matrix Fragments for mma.m16n8k16". With
// lane = threadIdx.x % 32, g = lane / 4 (groupID), q = lane % 4
// (threadID_in_group); a .b32 register holds two 16-bit elements, the one
// of lower column (A, C) or lower k (B) in its low half:
//   A (16 x 16, row major), a0..a3:  a0 = A[g    ][2q, 2q+1]
//                                    a1 = A[g + 8][2q, 2q+1]
//                                    a2 = A[g    ][2q+8, 2q+9]
//                                    a3 = A[g + 8][2q+8, 2q+9]
//   B (16 x 8, k x n, "col"), b0, b1: b0 = B[2q, 2q+1  ][g]
//                                    b1 = B[2q+8, 2q+9][g]
//   C/D (16 x 8 f32), c0..c3:        c0, c1 = C[g    ][2q, 2q+1]
//                                    c2, c3 = C[g + 8][2q, 2q+1]
//
// S = Q K^T: A = Q (rows = queries, k = head channel), B[k][n] = K[n][k]
// (n = key). K sits in shared memory as [key][channel], so b0 = K[g][2q,
// 2q+1] is a row-major 8 x 8 tile read by a plain ldmatrix (thread i gets
// row i/4, columns 2(i%4), 2(i%4)+1). One ldmatrix.x4 fetches, for channel
// chunk kk (16 channels) and key n-tiles 2np, 2np+1: matrix 0 = keys 16np +
// 0..7 x channels 16kk + 0..7 (b0 of n-tile 2np), matrix 1 = same keys x
// channels 16kk + 8..15 (b1), matrices 2, 3 the same for keys 16np + 8..15.
//
// P fragments (the FlashAttention-2 register trick): the S accumulators of
// n-tiles 2j and 2j+1 (keys 16j + 0..7 and 16j + 8..15) give, unchanged in
// position, the A operand of the P.V mma for key chunk j (k = key):
//   a0 = A[g    ][2q, 2q+1]    = keys 16j + 2q, +1      = S tile 2j,   c0 c1
//   a1 = A[g + 8][2q, 2q+1]    = same keys, row g + 8   = S tile 2j,   c2 c3
//   a2 = A[g    ][2q+8, 2q+9]  = keys 16j + 8 + 2q, +1  = S tile 2j+1, c0 c1
//   a3 = A[g + 8][2q+8, 2q+9]  = row g + 8              = S tile 2j+1, c2 c3
// so each register is pack(lo = c0 or c2, hi = c1 or c3) of the right tile.
//
// O = P V: B[k][n] = V[key k][channel n], b0 = V[2q, 2q+1][g]: two rows, one
// column of V as stored ([key][channel]), which is what ldmatrix .trans
// gives (thread i gets elements [2(i%4)][i/4] and [2(i%4)+1][i/4] of the 8 x
// 8 tile whose rows it addresses). One ldmatrix.x4.trans fetches, for key
// chunk j and output n-tiles 2p, 2p+1: matrix 0 = keys 16j + 0..7 x channels
// 16p + 0..7 (b0 of n-tile 2p), matrix 1 = keys 16j + 8..15 x same channels
// (b1), matrices 2, 3 the same for channels 16p + 8..15.
//
// ldmatrix.x4 takes the row addresses of matrix m from lanes 8m..8m+7, so
// lane i addresses row (i % 8) of matrix i / 8.
//
// Shared memory: rows of dp + 8 elements = (dp/8 + 1) 16-byte units, an odd
// number since dp is a multiple of 16, so the 8 rows of each 8 x 8 ldmatrix
// tile fall on 8 distinct 16-byte bank groups: no bank conflicts. Static
// shared memory: 2 * 64 * (DMAX + 8) * 2 bytes = 18 KiB (DMAX 64) or 34 KiB
// (DMAX 128). Every shared access is inside row 0..63, columns 0..dp-1.
//
// Global accesses: q, k, v rows are read as float2 / float4 at channel
// offsets that are multiples of 8 (d and c are multiples of 8, as the
// launcher checks), only for rows < t and columns < d; the output is written
// as float2 for rows < t and columns < d. A 16-byte aligned base pointer is
// assumed (every cudarc allocation is).

#include "reduce.cuh"
#include "tensor_core.cuh"

namespace flash {

// (An enum rather than constexpr variables, which NVRTC emits as globals.)
enum : int {
    BM = 64,        // query rows per block (4 warps x 16)
    BN = 64,        // keys per tile
    THREADS = 128,  // 4 warps
    PAD = 8,        // elements of padding at the end of a shared row
};

// Channel offsets of head h's q, k and v inside a qkv row (layouts above).
struct QkvOffsets {
    unsigned q, k, v;
};

__device__ __forceinline__ QkvOffsets qkv_offsets(unsigned h, unsigned c, unsigned d, int legacy) {
    QkvOffsets o;
    if (legacy) {
        o.q = h * 3u * d;
        o.k = o.q + d;
        o.v = o.q + 2u * d;
    } else {
        o.q = h * d;
        o.k = c + h * d;
        o.v = 2u * c + h * d;
    }
    return o;
}

// The K / V staging of both kernels: rows key0 .. of the tile, channels
// 0 .. 4 per_row - 1, read from global memory as float4 slots spread evenly
// over the block, slot tid + it * THREADS in iteration it. Slots of keys
// >= t or channels >= d read as zeros and are still stored, so that the
// padding the mma reads is zero. `put(r, col, in, k, v)` stores one slot
// of row r, channels col .. col + 3: the conversion to the kernel's
// shared-memory type is all that differs between the kernels.
// WHOLE: `used` counts the iterations in use, each a whole THREADS slots (a
// warp-uniform test, which costs the 16-bit kernel fewer registers than a
// per-thread one); else `used` counts the slots.
template <int ITERS, bool WHOLE, typename Put>
__device__ __forceinline__ void stage_kv(const float* base, unsigned c3, const QkvOffsets& off,
                                         unsigned key0, unsigned t, unsigned d, unsigned per_row,
                                         unsigned used, unsigned tid, Put put) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        const unsigned idx = tid + (unsigned)it * THREADS;
        if (WHOLE ? it < (int)used : idx < used) {
            const unsigned r = idx / per_row;
            const unsigned col = (idx - r * per_row) * 4u;
            const unsigned key = key0 + r;
            const bool in = key < t && col < d;
            float4 kx = make_float4(0.f, 0.f, 0.f, 0.f);
            float4 vx = make_float4(0.f, 0.f, 0.f, 0.f);
            if (in) {
                const float* rowp = base + (unsigned long long)key * c3;
                kx = *reinterpret_cast<const float4*>(rowp + off.k + col);
                vx = *reinterpret_cast<const float4*>(rowp + off.v + col);
            }
            put(r, col, in, kx, vx);
        }
    }
}

// One block of 64 query rows of one (batch, head). DMAX: the largest padded
// head dim this instantiation handles (register arrays and shared memory
// are sized for it; loops run over the actual dp with warp-uniform guards).
template <typename T, int DMAX>
__device__ __forceinline__ void attn_flash(const float* __restrict__ qkv, float* __restrict__ out,
                                           unsigned t, unsigned c, unsigned d, int legacy,
                                           float scale_log2) {
    static_assert(DMAX % 16 == 0 && DMAX <= 128, "DMAX: a multiple of 16, at most 128");
    constexpr int KD = DMAX / 16;  // max channel chunks (Q K^T k-steps, P V n-tile pairs)
    constexpr int NT = BN / 8;     // key n-tiles of S per tile
    __shared__ __align__(16) unsigned short ks[BN * (DMAX + PAD)];
    __shared__ __align__(16) unsigned short vs[BN * (DMAX + PAD)];

    const unsigned dp = (d + 15u) & ~15u;  // padded head dim
    // The launcher guarantees 8 <= d <= DMAX, d % 8 == 0; the guard is uniform.
    if (d == 0 || dp > (unsigned)DMAX || (d & 7u) != 0) return;
    const unsigned nk = dp / 16;   // channel chunks in use
    const unsigned ld = dp + PAD;  // shared row stride, elements
    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31u;
    const unsigned warp = tid >> 5;
    const unsigned g = lane >> 2;
    const unsigned qd = lane & 3u;
    const unsigned h = blockIdx.y;
    const unsigned bi = blockIdx.z;
    const unsigned c3 = 3u * c;
    const QkvOffsets off = qkv_offsets(h, c, d, legacy);
    const float* base = qkv + (unsigned long long)bi * t * c3;
    const unsigned row0 = blockIdx.x * BM + warp * 16u;  // first query row of this warp
    const bool active = row0 < t;                         // uniform per warp
    const unsigned r0 = row0 + g;                         // rows of c0 c1 / c2 c3
    const unsigned r1 = r0 + 8u;

    // Q A-fragments of every channel chunk, zero for rows >= t and
    // channels >= d.
    unsigned qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        if (kk < (int)nk && active) {
            const unsigned col = kk * 16u + 2u * qd;
            float2 x[4] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f),
                           make_float2(0.f, 0.f)};
            // Columns col, col+1 lie in one 8-channel group, col+8, col+9 in
            // the next: each pair is wholly inside d or wholly outside.
            const bool lo_in = col < d;
            const bool hi_in = col + 8u < d;
            if (r0 < t) {
                const float* p = base + (unsigned long long)r0 * c3 + off.q + col;
                if (lo_in) x[0] = *reinterpret_cast<const float2*>(p);
                if (hi_in) x[2] = *reinterpret_cast<const float2*>(p + 8);
            }
            if (r1 < t) {
                const float* p = base + (unsigned long long)r1 * c3 + off.q + col;
                if (lo_in) x[1] = *reinterpret_cast<const float2*>(p);
                if (hi_in) x[3] = *reinterpret_cast<const float2*>(p + 8);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) qf[kk][e] = pack2<T>(x[e].x, x[e].y);
        }
    }

    float o[2 * KD][4];
#pragma unroll
    for (int n = 0; n < 2 * KD; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const float ninf = __int_as_float(0xff800000);
    float m0 = ninf, m1 = ninf;  // running max (log2 domain) of rows r0, r1
    float l0 = 0.f, l1 = 0.f;    // this thread's part of the row sums

    // ldmatrix addressing: lane gives row (lane % 8) of tile (lane / 8).
    const unsigned lm_tile = lane >> 3;
    const unsigned lm_row = lane & 7u;
    const unsigned per_row = dp / 4;  // float4 per staged row
    const unsigned ntiles = (t + BN - 1) / BN;

    for (unsigned kt = 0; kt < ntiles; ++kt) {
        const unsigned key0 = kt * BN;
        __syncthreads();  // every warp is done reading the previous tile
        // Stage K and V rows key0 .. key0+63, channels 0..dp, as T. The
        // 64 * dp / 4 float4 slots split evenly: dp / 8 per thread.
        stage_kv<DMAX / 8, true>(base, c3, off, key0, t, d, per_row, dp / 8, tid,
                           [&](unsigned r, unsigned col, bool in, float4 kx, float4 vx) {
                               uint2 kw = make_uint2(0u, 0u);
                               uint2 vw = make_uint2(0u, 0u);
                               if (in) {
                                   kw = make_uint2(pack2<T>(kx.x, kx.y), pack2<T>(kx.z, kx.w));
                                   vw = make_uint2(pack2<T>(vx.x, vx.y), pack2<T>(vx.z, vx.w));
                               }
                               *reinterpret_cast<uint2*>(&ks[r * ld + col]) = kw;
                               *reinterpret_cast<uint2*>(&vs[r * ld + col]) = vw;
                           });
        __syncthreads();
        if (!active) continue;

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                if (kk < (int)nk) {
                    unsigned b[4];
                    const unsigned key = np * 16u + (lm_tile >> 1) * 8u + lm_row;
                    const unsigned col = kk * 16u + (lm_tile & 1u) * 8u;
                    ldmatrix_x4(b, &ks[key * ld + col]);
                    mma_m16n8k16<T>(s[2 * np], qf[kk], b[0], b[1]);
                    mma_m16n8k16<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
                }
            }
        }

        // Log2-domain logits; keys >= t masked to -inf (element e of n-tile
        // n is key key0 + 8n + 2q + (e & 1)).
        const bool tail = key0 + BN > t;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] *= scale_log2;
                if (tail && key0 + n * 8u + 2u * qd + (e & 1) >= t) s[n][e] = ninf;
            }
        }

        // Row maxima over the tile: rows r0 (e = 0, 1) and r1 (e = 2, 3),
        // spread over the 4 threads of a group (lanes 4g .. 4g+3).
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        // Every tile holds key key0 < t, so mx is finite (for finite inputs)
        // and the first tile's alpha is exp2(-inf) = 0.
        const float alpha0 = exp2f(m0 - mx0);
        const float alpha1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
#pragma unroll
        for (int n = 0; n < 2 * KD; ++n) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }

        // P = exp2(x - m) rounded to T, packed straight into A fragments
        // (see the header), then O += P V per 16-key chunk.
        float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            unsigned pf[4];
            pf[0] = pack2<T>(exp2f(s[2 * j][0] - mx0), exp2f(s[2 * j][1] - mx0));
            pf[1] = pack2<T>(exp2f(s[2 * j][2] - mx1), exp2f(s[2 * j][3] - mx1));
            pf[2] = pack2<T>(exp2f(s[2 * j + 1][0] - mx0), exp2f(s[2 * j + 1][1] - mx0));
            pf[3] = pack2<T>(exp2f(s[2 * j + 1][2] - mx1), exp2f(s[2 * j + 1][3] - mx1));
            float2 u = unpack2<T>(pf[0]);
            ls0 += u.x + u.y;
            u = unpack2<T>(pf[2]);
            ls0 += u.x + u.y;
            u = unpack2<T>(pf[1]);
            ls1 += u.x + u.y;
            u = unpack2<T>(pf[3]);
            ls1 += u.x + u.y;
#pragma unroll
            for (int p = 0; p < KD; ++p) {
                if (p < (int)nk) {
                    unsigned b[4];
                    const unsigned key = j * 16u + (lm_tile & 1u) * 8u + lm_row;
                    const unsigned col = p * 16u + (lm_tile >> 1) * 8u;
                    ldmatrix_x4_trans(b, &vs[key * ld + col]);
                    mma_m16n8k16<T>(o[2 * p], pf, b[0], b[1]);
                    mma_m16n8k16<T>(o[2 * p + 1], pf, b[2], b[3]);
                }
            }
        }
        l0 = fmaf(l0, alpha0, ls0);
        l1 = fmaf(l1, alpha1, ls1);
    }
    if (!active) return;  // no barrier follows

    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    // l >= 1: the row maximum's own p is exp2(0) = 1.
    const float inv0 = 1.f / l0;
    const float inv1 = 1.f / l1;
    float* ob = out + (unsigned long long)bi * t * c + h * d;
#pragma unroll
    for (int n = 0; n < 2 * KD; ++n) {
        const unsigned col = n * 8u + 2u * qd;
        if (n < (int)(2 * nk) && col < d) {
            if (r0 < t)
                *reinterpret_cast<float2*>(ob + (unsigned long long)r0 * c + col) =
                    make_float2(o[n][0] * inv0, o[n][1] * inv0);
            if (r1 < t)
                *reinterpret_cast<float2*>(ob + (unsigned long long)r1 * c + col) =
                    make_float2(o[n][2] * inv1, o[n][3] * inv1);
        }
    }
}

// ---- float32 mode: 3xTF32 ----------------------------------------------
//
// The same algorithm (grid, 4 warps of 16 query rows, online softmax over
// key tiles staged in shared memory) with float32 operands on the TF32
// tensor cores, mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, each
// product done in three (the "3xTF32" split of igemm.cu): an operand x is
// x = big + small + r with big = tf32(x), small = tf32(x - big)
// (cvt.rna.tf32.f32: round to nearest, ties away, to 10 fraction bits), so
// |x - big| <= 2^-11 |x| and |r| <= 2^-22 |x|; x y is taken as
// small_x big_y + big_x small_y + big_x big_y (the small cross terms first
// into a zero accumulator, then the big product), which drops
// small_x small_y and the r terms: ~2^-21 |x y| at worst, random in sign,
// against float32's own 2^-24 rounding of the sums. Nothing is rounded to
// a narrower type on the way: q, k, v and the softmax weights p reach the
// tensor cores through their splits. (One TF32 product instead of three:
// rel-L2 4e-4 .. 1e-3 from float64 in the emulation below.)
//
// Logits. S_ij = (q_i . k_j) / sqrt(d) is formed in the log2 domain as in
// the 16-bit kernel, x_ij = fl(q_i . k_j) * fl(log2(e) / sqrt(d)): one
// rounding of the folded constant (systematic, <= 2^-24 relative) and one
// of the product per logit. The CPU twin's (q s) . (k s), s = fl(d^(-1/4)),
// rounds every scaled q and k element and carries s's rounding twice, so
// the folded form has the fewer roundings; measured on the emulated kernel
// against float64 the two are equal within noise (rel-L2 RMS 1.83e-7 folded
// vs 1.89e-7 prescaled at std-1 inputs, 4.08e-7 both at std 3): the error
// is the float32 rounding of x itself (~2^-24 |x|), common to both.
// p = exp2f(x - m) (exp(S - m) to exp2f's 2 ulp), the running max, the
// rescale and the row sums are float32, as in the 16-bit kernel; the row
// sum adds the p's split, big + small, which is what multiplies v, and the
// output is o / l rounded once (__fdiv_rn).
//
// Accumulation. Every mma here starts from a zero accumulator: the three
// products of one 8-channel step of S (or one 8-key group of P V) go into a
// fresh C, which is then added to the running s (or o) with a float32 FADD
// (round to nearest). The tensor cores' own float32 accumulation is not
// IEEE: on A100 (Fasi et al., "Numerical behavior of NVIDIA tensor cores",
// PeerJ CS 2021) the addends are aligned with truncation and the sum is
// normalised toward zero, so a long chain of mma on one accumulator (O
// over t / 8 key groups x 3 products) drifts: in a lane-level emulation of
// this kernel with the mma rounding toward zero, rel-L2 to float64 is
// ~1e-5 at t = 1000 that way, growing with t, against ~2e-7 with the fresh
// accumulators (chains of 3 mma, then one correctly rounded add per
// group), the same as with round to nearest. Cost: 4 FADD per 3 mma.
//
// Fragment layouts of m16n8k8 .tf32 (PTX ISA "Matrix Fragments for
// mma.m16n8k8"), one element per .b32 register, g = lane / 4, q = lane % 4:
//   A (16 x 8, row major): a0 = A[g][q],  a1 = A[g + 8][q],
//                          a2 = A[g][q + 4], a3 = A[g + 8][q + 4]
//   B (8 x 8, k x n):      b0 = B[q][g],  b1 = B[q + 4][g]
//   C/D (16 x 8 f32):      c0, c1 = C[g][2q, 2q+1], c2, c3 = C[g + 8][2q, 2q+1]
//
// Permuted k. An mma sums over k, and any permutation of k applied to both
// A's columns and B's rows gives the same sum, so each product picks the k
// order that suits its operands (no shuffles, no staging of P):
//  - S = Q K^T, k = channel: within an 8-channel step kk, k-index q holds
//    channel 8kk + 2q and k-index q + 4 channel 8kk + 2q + 1, so a thread's
//    a0/a2 (row g) and a1/a3 (row g + 8) are float2 pairs of Q in global
//    memory and its b0/b1 = K[key 8n + g][8kk + 2q, +1] one float2 of
//    shared memory.
//  - O = P V, k = key: S's accumulator of key group j (keys 8j + 0..7 of
//    the tile) holds c0, c1 = P[g][8j + 2q, +1] and c2, c3 = P[g + 8][same];
//    taking k-index q as key 8j + 2q and k-index q + 4 as key 8j + 2q + 1,
//    A = P is a0 = c0, a1 = c2, a2 = c1, a3 = c3 of the same thread, and
//    b0 = V[key 8j + 2q][8n + g], b1 = V[key 8j + 2q + 1][8n + g].
// The output tile n (channels 8n..8n+7) is C's layout: c0, c1 at row g,
// channels 8n + 2q, +1, stored as a float2.
//
// Tiling. Grid (ceil(t / 64), heads, b), 128 threads, warp w owns query
// rows 64 * blockIdx.x + 16 w .. + 16 as before; key tiles of KN keys
// (64 for d <= 64, 32 for d <= 128) are staged as float32, K in rows of
// ldk floats and V in rows of ldv floats, columns 0..d-1 written (float4)
// and read, the padding never touched. Keys >= t are staged as zeros and
// masked to -inf; query rows >= t have zero q and are not stored; a warp
// whose rows all lie past t only stages and meets the barriers. Q stays in
// registers as float32 (d / 2 per thread) and is split per key tile (once
// per channel step, shared by the tile's KN / 8 key groups).
//
// Shared memory banks (32 banks of 4 bytes). K: a half warp's float2 reads
// cover rows g = 0..3 (or 4..7) x 8 consecutive floats; ldk = d or d + 8,
// whichever has ldk / 8 odd, puts the 4 rows 8 banks apart (ldk = 8 or 24
// mod 32; 4 ldk = 0 mod 32). V: b0 reads rows 2q (q = 0..3) x channels g:
// ldv = d + 4 gives 2 ldv = 8 or 24 mod 32, 4 distinct groups of 8 banks;
// b1 is the same shifted by one row. Rows stay 16-byte aligned (ldk, ldv
// multiples of 4). Static shared memory: KN * (ldk_max + ldv_max) * 4 =
// 64 * (72 + 68) * 4 = 35 KiB (DMAX 64) or 32 * (136 + 132) * 4 = 33.5 KiB
// (DMAX 128), under the 48 KiB static limit.
//
// Global accesses: q is read as float2 at channel offsets 8kk + 2q (even),
// k and v as float4 at multiples of 4, all inside rows < t, columns < d of
// the head; the output as float2, rows < t, columns < d. With d and c
// multiples of 8 every such offset is aligned for its width on a 16-byte
// aligned base.

// One block of 64 query rows of one (batch, head), float32 operands.
// DMAX: the largest head dim this instantiation handles (register arrays
// and shared memory are sized for it; loops run over the actual d with
// warp-uniform guards); KN: keys per staged tile.
template <int DMAX, int KN>
__device__ __forceinline__ void attn_flash_tf32x3(const float* __restrict__ qkv,
                                                  float* __restrict__ out, unsigned t,
                                                  unsigned c, unsigned d, int legacy,
                                                  float scale_log2) {
    static_assert(DMAX % 8 == 0 && DMAX <= 128, "DMAX: a multiple of 8, at most 128");
    static_assert(KN % 8 == 0 && KN <= 64, "KN: a multiple of 8, at most 64");
    constexpr int KD = DMAX / 8;  // max channel steps (S k-steps, O n-tiles)
    constexpr int NT = KN / 8;    // key groups per tile (S n-tiles, P V k-steps)
    constexpr int STAGE_IT = (KN * DMAX / 4 + THREADS - 1) / THREADS;
    __shared__ __align__(16) float ks[KN * (DMAX + 8)];
    __shared__ __align__(16) float vs[KN * (DMAX + 4)];

    // The launcher guarantees 8 <= d <= DMAX, d % 8 == 0; the guard is uniform.
    if (d == 0 || d > (unsigned)DMAX || (d & 7u) != 0) return;
    const unsigned nk = d / 8;                     // channel steps in use
    const unsigned ldk = (nk & 1u) ? d : d + 8u;  // ldk / 8 odd, <= DMAX + 8
    const unsigned ldv = d + 4u;                   // ldv = 4 mod 8
    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31u;
    const unsigned warp = tid >> 5;
    const unsigned g = lane >> 2;
    const unsigned qd = lane & 3u;
    const unsigned h = blockIdx.y;
    const unsigned bi = blockIdx.z;
    const unsigned c3 = 3u * c;
    const QkvOffsets off = qkv_offsets(h, c, d, legacy);
    const float* base = qkv + (unsigned long long)bi * t * c3;
    const unsigned row0 = blockIdx.x * BM + warp * 16u;  // first query row of this warp
    const bool active = row0 < t;                         // uniform per warp
    const unsigned r0 = row0 + g;                         // rows of c0 c1 / c2 c3
    const unsigned r1 = r0 + 8u;

    // Q A-fragments (float32, split per tile) of every channel step, zero
    // for rows >= t: a0, a2 = q[r0][8kk + 2q, +1], a1, a3 = q[r1][same].
    float qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        qf[kk][0] = qf[kk][1] = qf[kk][2] = qf[kk][3] = 0.f;
        if (kk < (int)nk && active) {
            const unsigned col = kk * 8u + 2u * qd;  // col + 1 < d
            if (r0 < t) {
                const float2 x = *reinterpret_cast<const float2*>(
                    base + (unsigned long long)r0 * c3 + off.q + col);
                qf[kk][0] = x.x;
                qf[kk][2] = x.y;
            }
            if (r1 < t) {
                const float2 x = *reinterpret_cast<const float2*>(
                    base + (unsigned long long)r1 * c3 + off.q + col);
                qf[kk][1] = x.x;
                qf[kk][3] = x.y;
            }
        }
    }

    float o[KD][4];
#pragma unroll
    for (int n = 0; n < KD; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const float ninf = __int_as_float(0xff800000);
    float m0 = ninf, m1 = ninf;  // running max (log2 domain) of rows r0, r1
    float l0 = 0.f, l1 = 0.f;    // this thread's part of the row sums

    const unsigned per_row = d / 4;  // float4 per staged row
    const unsigned slots = KN * per_row;
    const unsigned ntiles = (t + KN - 1) / KN;

    for (unsigned kt = 0; kt < ntiles; ++kt) {
        const unsigned key0 = kt * KN;
        __syncthreads();  // every warp is done reading the previous tile
        // Stage K and V rows key0 .. key0 + KN - 1, channels 0..d-1, as they are.
        stage_kv<STAGE_IT, false>(base, c3, off, key0, t, d, per_row, slots, tid,
                           [&](unsigned r, unsigned col, bool, float4 kx, float4 vx) {
                               *reinterpret_cast<float4*>(&ks[r * ldk + col]) = kx;
                               *reinterpret_cast<float4*>(&vs[r * ldv + col]) = vx;
                           });
        __syncthreads();
        if (!active) continue;

        // S = Q K^T for this warp's 16 rows and the tile's KN keys; n-tile n
        // is keys 8n..8n+7 of the tile.
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            if (kk < (int)nk) {
                unsigned ab[4], as[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    // An empty asm that "changes" q: keeps the compiler from
                    // hoisting the loop-invariant split out of the tile loop,
                    // which would hold both halves of Q (d registers) live.
                    asm volatile("" : "+f"(qf[kk][e]));
                    split_tf32(qf[kk][e], ab[e], as[e]);
                }
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const unsigned ka = (n * 8u + g) * ldk + kk * 8u + 2u * qd;
                    const float2 kv = *reinterpret_cast<const float2*>(&ks[ka]);
                    unsigned bb0, bs0, bb1, bs1;
                    split_tf32(kv.x, bb0, bs0);
                    split_tf32(kv.y, bb1, bs1);
                    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // fresh: see "Accumulation"
                    mma_m16n8k8_tf32x3(acc, ab, as, bb0, bb1, bs0, bs1);
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[n][e] = __fadd_rn(s[n][e], acc[e]);
                }
            }
        }

        // Log2-domain logits; keys >= t masked to -inf (element e of n-tile
        // n is key key0 + 8n + 2q + (e & 1)).
        const bool tail = key0 + KN > t;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = __fmul_rn(s[n][e], scale_log2);
                if (tail && key0 + n * 8u + 2u * qd + (e & 1) >= t) s[n][e] = ninf;
            }
        }

        // Row maxima over the tile (rows r0: e = 0, 1; r1: e = 2, 3) over
        // the 4 threads of a group.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        // Key key0 < t is in every tile: mx is finite (for finite inputs)
        // and the first tile's alpha is exp2(-inf) = 0.
        const float alpha0 = exp2f(__fsub_rn(m0, mx0));
        const float alpha1 = exp2f(__fsub_rn(m1, mx1));
        m0 = mx0;
        m1 = mx1;
#pragma unroll
        for (int n = 0; n < KD; ++n) {
            o[n][0] = __fmul_rn(o[n][0], alpha0);
            o[n][1] = __fmul_rn(o[n][1], alpha0);
            o[n][2] = __fmul_rn(o[n][2], alpha1);
            o[n][3] = __fmul_rn(o[n][3], alpha1);
        }

        // P = exp2(x - m), split; O += P V per key group j with the
        // permuted k (header): a0 = p(c0), a1 = p(c2), a2 = p(c1), a3 = p(c3).
        float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            unsigned pb[4], ps[4];
            split_tf32(exp2f(__fsub_rn(s[j][0], mx0)), pb[0], ps[0]);
            split_tf32(exp2f(__fsub_rn(s[j][2], mx1)), pb[1], ps[1]);
            split_tf32(exp2f(__fsub_rn(s[j][1], mx0)), pb[2], ps[2]);
            split_tf32(exp2f(__fsub_rn(s[j][3], mx1)), pb[3], ps[3]);
            float w[4];  // the weights as the mma sees them, big + small
#pragma unroll
            for (int e = 0; e < 4; ++e)
                w[e] = __fadd_rn(__uint_as_float(pb[e]), __uint_as_float(ps[e]));
            ls0 = __fadd_rn(ls0, __fadd_rn(w[0], w[2]));  // row r0
            ls1 = __fadd_rn(ls1, __fadd_rn(w[1], w[3]));  // row r1
#pragma unroll
            for (int n = 0; n < KD; ++n) {
                if (n < (int)nk) {
                    const float* vp = &vs[(j * 8u + 2u * qd) * ldv + n * 8u + g];
                    unsigned vb0, vs0, vb1, vs1;
                    split_tf32(vp[0], vb0, vs0);
                    split_tf32(vp[ldv], vb1, vs1);
                    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // fresh: see "Accumulation"
                    mma_m16n8k8_tf32x3(acc, pb, ps, vb0, vb1, vs0, vs1);
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[n][e] = __fadd_rn(o[n][e], acc[e]);
                }
            }
        }
        l0 = fmaf(l0, alpha0, ls0);
        l1 = fmaf(l1, alpha1, ls1);
    }
    if (!active) return;  // no barrier follows

    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    // l >= 1: the row maximum's own p is exp2(0) = 1.
    float* ob = out + (unsigned long long)bi * t * c + h * d;
#pragma unroll
    for (int n = 0; n < KD; ++n) {
        if (n < (int)nk) {
            const unsigned col = n * 8u + 2u * qd;
            if (r0 < t)
                *reinterpret_cast<float2*>(ob + (unsigned long long)r0 * c + col) =
                    make_float2(__fdiv_rn(o[n][0], l0), __fdiv_rn(o[n][1], l0));
            if (r1 < t)
                *reinterpret_cast<float2*>(ob + (unsigned long long)r1 * c + col) =
                    make_float2(__fdiv_rn(o[n][2], l1), __fdiv_rn(o[n][3], l1));
        }
    }
}

}  // namespace flash

// Entry points: (const float* qkv, float* out, unsigned t, unsigned c,
// unsigned d, int legacy, float scale_log2 = log2(e) / sqrt(d)); grid
// (ceil(t / 64), heads, b), 128 threads, static shared memory only.
// attn_flash_<type> takes 8 <= d <= 64, attn_flash_<type>_d128 takes
// 64 < d <= 128 (d a multiple of 8 in both).

extern "C" __global__ void __launch_bounds__(flash::THREADS)
    attn_flash_bf16(const float* __restrict__ qkv, float* __restrict__ out, unsigned t,
                    unsigned c, unsigned d, int legacy, float scale_log2) {
    flash::attn_flash<__nv_bfloat16, 64>(qkv, out, t, c, d, legacy, scale_log2);
}

extern "C" __global__ void __launch_bounds__(flash::THREADS)
    attn_flash_f16(const float* __restrict__ qkv, float* __restrict__ out, unsigned t, unsigned c,
                   unsigned d, int legacy, float scale_log2) {
    flash::attn_flash<__half, 64>(qkv, out, t, c, d, legacy, scale_log2);
}

extern "C" __global__ void __launch_bounds__(flash::THREADS)
    attn_flash_bf16_d128(const float* __restrict__ qkv, float* __restrict__ out, unsigned t,
                         unsigned c, unsigned d, int legacy, float scale_log2) {
    flash::attn_flash<__nv_bfloat16, 128>(qkv, out, t, c, d, legacy, scale_log2);
}

extern "C" __global__ void __launch_bounds__(flash::THREADS)
    attn_flash_f16_d128(const float* __restrict__ qkv, float* __restrict__ out, unsigned t,
                        unsigned c, unsigned d, int legacy, float scale_log2) {
    flash::attn_flash<__half, 128>(qkv, out, t, c, d, legacy, scale_log2);
}

// attn_flash_tf32x3 takes 8 <= d <= 64 (key tiles of 64), attn_flash_tf32x3_d128
// 64 < d <= 128 (key tiles of 32, so that its shared memory stays static);
// same arguments, grid and block as the 16-bit kernels.

extern "C" __global__ void __launch_bounds__(flash::THREADS)
    attn_flash_tf32x3(const float* __restrict__ qkv, float* __restrict__ out, unsigned t,
                      unsigned c, unsigned d, int legacy, float scale_log2) {
    flash::attn_flash_tf32x3<64, 64>(qkv, out, t, c, d, legacy, scale_log2);
}

extern "C" __global__ void __launch_bounds__(flash::THREADS)
    attn_flash_tf32x3_d128(const float* __restrict__ qkv, float* __restrict__ out, unsigned t,
                           unsigned c, unsigned d, int legacy, float scale_log2) {
    flash::attn_flash_tf32x3<128, 32>(qkv, out, t, c, d, legacy, scale_log2);
}
