// The convolutions' operand prologue, shared by the implicit-GEMM kernels
// (igemm.cu, which applies it while staging A) and the v2 preparation pass
// (igemm2.cu, which applies it once per layer): the source [x, x2] in
// float32 NHWC, the GroupNorm affine a x + s, SiLU, and nearest 2x
// up-sampling or 2x2 average pooling of the result.
#pragma once

enum Resample { RS_SAME = 0, RS_UP = 1, RS_DOWN = 2 };

struct ConvArgs {
    const float* x;            // source NHWC [b, sh, sw, cin]; (sh, sw) = (h, w), (h/2, w/2) up, (2h, 2w) down
    const void* wt;            // T [cout][kp] (16-bit types), or float [cout][kp]
    const float* bias;         // [cout]
    const float* affine;       // [b][2][cin] (a then s), read when has_affine
    const float* bvec;         // [b][cout], read when has_bvec
    const float* res;          // [b*h*w][cout], read when has_res
    float* y;                  // [b*h*w][cout]
    int b, h, w, cin, cout, k, kp;
    int has_affine, silu, has_bvec, has_res;
    // The input is the channel concatenation [x, x2]: x holds c1 channels,
    // x2 the other cin - c1 (c1 = cin and x2 unread for one tensor).
    const float* x2;
    int c1;
};

// Address of channel ci of source pixel pix (counted over the batch) of the
// input [x, x2]. On the float4 path a K tile never straddles c1 (c1 is a
// multiple of the tile), so four channels come from one half.
__device__ __forceinline__ const float* src_at(const ConvArgs& p, size_t pix, int ci) {
    return ci < p.c1 ? p.x + pix * p.c1 + ci : p.x2 + pix * (p.cin - p.c1) + (ci - p.c1);
}

__device__ __forceinline__ float prologue(float v, float a, float s, int has_affine, int silu) {
    if (has_affine) v = a * v + s;
    if (silu) v = v / (1.0f + expf(-v));
    return v;
}

// prologue() on channels ci..ci+3 of sample bi.
__device__ __forceinline__ float4 prologue4(const ConvArgs& p, int bi, int ci, float4 v) {
    float4 a = make_float4(1.f, 1.f, 1.f, 1.f), s = make_float4(0.f, 0.f, 0.f, 0.f);
    if (p.has_affine) {
        a = *reinterpret_cast<const float4*>(p.affine + (size_t)(2 * bi) * p.cin + ci);
        s = *reinterpret_cast<const float4*>(p.affine + (size_t)(2 * bi + 1) * p.cin + ci);
    }
    return make_float4(prologue(v.x, a.x, s.x, p.has_affine, p.silu),
                       prologue(v.y, a.y, s.y, p.has_affine, p.silu),
                       prologue(v.z, a.z, s.z, p.has_affine, p.silu),
                       prologue(v.w, a.w, s.w, p.has_affine, p.silu));
}

// One output pixel's coordinates, decoded once per thread and row.
struct Row {
    int valid, bi, oy, ox;
};

// The transformed source value(s) at output-grid position (sy, sx) (inside
// the image), channels ci..ci+3 (VEC) of sample bi.
template <int RS>
__device__ __forceinline__ float4 gather4(const ConvArgs& p, int bi, int sy, int sx, int ci) {
    if (RS == RS_DOWN) {
        const int sw = 2 * p.w, sh = 2 * p.h;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int yy = 2 * sy + (u >> 1), xx = 2 * sx + (u & 1);
            const float4 v = prologue4(
                p, bi, ci,
                *reinterpret_cast<const float4*>(src_at(p, (size_t)(bi * sh + yy) * sw + xx, ci)));
            acc.x += v.x;
            acc.y += v.y;
            acc.z += v.z;
            acc.w += v.w;
        }
        return make_float4(acc.x * 0.25f, acc.y * 0.25f, acc.z * 0.25f, acc.w * 0.25f);
    }
    size_t pix;
    if (RS == RS_UP)
        pix = (size_t)(bi * (p.h >> 1) + (sy >> 1)) * (p.w >> 1) + (sx >> 1);
    else
        pix = (size_t)(bi * p.h + sy) * p.w + sx;
    return *reinterpret_cast<const float4*>(src_at(p, pix, ci));
}

// Scalar twin of gather4 with the prologue applied, for input channels
// that are not a multiple of the K tile.
template <int RS>
__device__ __forceinline__ float gather1(const ConvArgs& p, int bi, int sy, int sx, int ci) {
    float a = 1.f, s = 0.f;
    if (p.has_affine) {
        a = p.affine[(size_t)(2 * bi) * p.cin + ci];
        s = p.affine[(size_t)(2 * bi + 1) * p.cin + ci];
    }
    if (RS == RS_DOWN) {
        const int sw = 2 * p.w, sh = 2 * p.h;
        float acc = 0.f;
        for (int u = 0; u < 4; ++u) {
            const int yy = 2 * sy + (u >> 1), xx = 2 * sx + (u & 1);
            acc += prologue(*src_at(p, (size_t)(bi * sh + yy) * sw + xx, ci), a, s, p.has_affine,
                            p.silu);
        }
        return acc * 0.25f;
    }
    size_t pix;
    if (RS == RS_UP)
        pix = (size_t)(bi * (p.h >> 1) + (sy >> 1)) * (p.w >> 1) + (sx >> 1);
    else
        pix = (size_t)(bi * p.h + sy) * p.w + sx;
    return prologue(*src_at(p, pix, ci), a, s, p.has_affine, p.silu);
}

// The transformed values of channels ci..ci+3 of sample bi at output-grid
// position (sy, sx) (inside the image): gather4 with its prologue applied.
template <int RS>
__device__ __forceinline__ float4 transformed4(const ConvArgs& p, int bi, int sy, int sx, int ci) {
    const float4 v = gather4<RS>(p, bi, sy, sx, ci);
    return RS == RS_DOWN || !(p.has_affine || p.silu) ? v : prologue4(p, bi, ci, v);
}

// Rows of the output (pixels) a thread stages, decoded once.
__device__ __forceinline__ Row decode_row(const ConvArgs& p, int m) {
    const int hw = p.h * p.w;
    Row r;
    r.valid = m < p.b * hw;
    const int mm = r.valid ? m : 0;
    r.bi = mm / hw;
    const int rem = mm - r.bi * hw;
    r.oy = rem / p.w;
    r.ox = rem - r.oy * p.w;
    return r;
}

