//! GroupNorm (+ scale/shift, + SiLU) forward and input gradient, NHWC.
//! Statistics are accumulated in float64.

use rayon::prelude::*;

pub const GROUPS: usize = 32;
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
