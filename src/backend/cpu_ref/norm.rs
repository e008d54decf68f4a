//! GroupNorm (+ scale/shift, + SiLU) forward and input gradient, NHWC.
//! Statistics are accumulated in float64.

use rayon::prelude::*;

use crate::backend::shapes::GROUPS;

pub const EPS: f64 = 1e-5;

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Per-sample view of the operands.
pub struct GnArgs<'a> {
    pub hw: usize,
    pub c: usize,
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    /// `[B, 2C]`: scale then shift.
    pub ss: Option<&'a [f32]>,
    pub silu: bool,
}

/// Mean and 1/sigma of each group of one sample.
fn stats(x: &[f32], a: &GnArgs) -> Vec<(f64, f64)> {
    let cg = a.c / GROUPS;
    let mut sum = vec![0f64; GROUPS];
    let mut sq = vec![0f64; GROUPS];
    for px in x.chunks(a.c) {
        for (ch, &v) in px.iter().enumerate() {
            let v = v as f64;
            sum[ch / cg] += v;
            sq[ch / cg] += v * v;
        }
    }
    let n = (a.hw * cg) as f64;
    (0..GROUPS)
        .map(|g| {
            let mean = sum[g] / n;
            let var = (sq[g] / n - mean * mean).max(0.0);
            (mean, 1.0 / (var + EPS).sqrt())
        })
        .collect()
}

/// Two-pass statistics: the one-pass form above loses digits when the mean is
/// large against the spread; recompute the variance around the mean.
fn stats_exact(x: &[f32], a: &GnArgs) -> Vec<(f64, f64)> {
    let cg = a.c / GROUPS;
    let rough = stats(x, a);
    let mut sq = vec![0f64; GROUPS];
    for px in x.chunks(a.c) {
        for (ch, &v) in px.iter().enumerate() {
            let d = v as f64 - rough[ch / cg].0;
            sq[ch / cg] += d * d;
        }
    }
    let n = (a.hw * cg) as f64;
    (0..GROUPS)
        .map(|g| (rough[g].0, 1.0 / (sq[g] / n + EPS).sqrt()))
        .collect()
}

/// GroupNorm (+ optional scale/shift) folded into a per-(sample, channel)
/// affine map `y = a * x + s`; CPU twin of
/// `crate::backend::cuda::norm::group_norm_affine`. Returns `[b, 2, c]`: `a` then `s`
/// per sample, with `m`, `r` the two-pass mean and 1/sigma of the channel's
/// group (as `forward`), `a = r gamma (1 + scale)` and `s = (beta - m r
/// gamma) (1 + scale) + shift` (scale = shift = 0 without `ss`), in double
/// and rounded once. An empty sample (`hw = 0`) has no statistics and gives
/// NaN.
///
/// # Panics
///
/// If `c` is not a positive multiple of 32 or a slice's length does not
/// match `b`, `hw` and `c` (x `[b, hw, c]`, gamma and beta `[c]`, ss
/// `[b, 2c]`).
pub fn group_norm_affine(
    x: &[f32],
    b: usize,
    hw: usize,
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    ss: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        c > 0 && c.is_multiple_of(GROUPS),
        "group_norm_affine: {c} channels are not a positive multiple of {GROUPS}"
    );
    assert_eq!(
        x.len(),
        b * hw * c,
        "group_norm_affine: x for {b} x {hw} x {c}"
    );
    assert!(
        gamma.len() == c && beta.len() == c,
        "group_norm_affine: gamma / beta of {} / {} for {c} channels",
        gamma.len(),
        beta.len()
    );
    if let Some(ss) = ss {
        assert_eq!(
            ss.len(),
            2 * b * c,
            "group_norm_affine: scale/shift for [{b}, 2 * {c}]"
        );
    }
    let args = GnArgs {
        hw,
        c,
        gamma,
        beta,
        ss,
        silu: false,
    };
    let per = hw * c;
    let cg = c / GROUPS;
    let mut out = vec![0f32; 2 * b * c];
    for (bi, o) in out.chunks_mut(2 * c).enumerate() {
        let st = stats_exact(&x[bi * per..(bi + 1) * per], &args);
        let (oa, os) = o.split_at_mut(c);
        for ch in 0..c {
            let (m, r) = st[ch / cg];
            // The operation order of gn_affine in kernels/groupnorm.cu, so
            // that equal statistics give equal floats.
            let rg = r * gamma[ch] as f64;
            let mut av = rg;
            let mut sv = beta[ch] as f64 - m * rg;
            if let Some(ss) = ss {
                let mul = 1.0 + ss[bi * 2 * c + ch] as f64;
                av *= mul;
                sv = sv * mul + ss[bi * 2 * c + c + ch] as f64;
            }
            oa[ch] = av as f32;
            os[ch] = sv as f32;
        }
    }
    out
}

pub fn forward(x: &[f32], b: usize, a: &GnArgs) -> Vec<f32> {
    let per = a.hw * a.c;
    let cg = a.c / GROUPS;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(bi, (y, x))| {
            let st = stats_exact(x, a);
            let ss = a.ss.map(|s| &s[bi * 2 * a.c..(bi + 1) * 2 * a.c]);
            for (yp, xp) in y.chunks_mut(a.c).zip(x.chunks(a.c)) {
                for ch in 0..a.c {
                    let (mean, inv) = st[ch / cg];
                    let mut z = (((xp[ch] as f64 - mean) * inv) as f32) * a.gamma[ch] + a.beta[ch];
                    if let Some(ss) = ss {
                        z = z * (1.0 + ss[ch]) + ss[a.c + ch];
                    }
                    yp[ch] = if a.silu { z * sigmoid(z) } else { z };
                }
            }
        });
    debug_assert_eq!(y.len(), b * per);
    y
}

pub fn backward(x: &[f32], dy: &[f32], a: &GnArgs) -> Vec<f32> {
    let per = a.hw * a.c;
    let cg = a.c / GROUPS;
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(dy.par_chunks(per)))
        .enumerate()
        .for_each(|(bi, (dx, (x, dy)))| {
            let st = stats_exact(x, a);
            let ss = a.ss.map(|s| &s[bi * 2 * a.c..(bi + 1) * 2 * a.c]);
            // d(loss)/d(xhat) for every element, and the two group sums the
            // normalisation's gradient needs.
            let mut dxhat = vec![0f64; per];
            let mut s1 = vec![0f64; GROUPS];
            let mut s2 = vec![0f64; GROUPS];
            for p in 0..a.hw {
                for ch in 0..a.c {
                    let i = p * a.c + ch;
                    let (mean, inv) = st[ch / cg];
                    let xhat = (x[i] as f64 - mean) * inv;
                    let mut g = dy[i] as f64;
                    let mut z = xhat * a.gamma[ch] as f64 + a.beta[ch] as f64;
                    let mut mul = 1.0;
                    if let Some(ss) = ss {
                        mul = 1.0 + ss[ch] as f64;
                        z = z * mul + ss[a.c + ch] as f64;
                    }
                    if a.silu {
                        let s = 1.0 / (1.0 + (-z).exp());
                        g *= s * (1.0 + z * (1.0 - s));
                    }
                    let d = g * mul * a.gamma[ch] as f64;
                    dxhat[i] = d;
                    s1[ch / cg] += d;
                    s2[ch / cg] += d * xhat;
                }
            }
            let n = (a.hw * cg) as f64;
            for p in 0..a.hw {
                for ch in 0..a.c {
                    let i = p * a.c + ch;
                    let g = ch / cg;
                    let (mean, inv) = st[g];
                    let xhat = (x[i] as f64 - mean) * inv;
                    dx[i] = (inv * (dxhat[i] - s1[g] / n - xhat * s2[g] / n)) as f32;
                }
            }
        });
    dx
}
