//! The noise schedule (SPEC section 5) and the two DDIM updates (SPEC section 6).
//!
//! These are the CPU twins of `kernels/ddim.cu`: same operations in the same
//! order, all in float32, as the float32 PyTorch code computes them.

use crate::config::Schedule;

/// Cumulative products of `alpha = 1 - beta`, `beta` a float32 linspace,
/// reproducing torch bit for bit: `torch.linspace` in float32 computes
/// `start + step * i` (first half) and `end - step * (n - 1 - i)` (second
/// half) with one rounding, and `torch.cumprod` on float32 accumulates in
/// float64. Checked against the table torch wrote (`schedule_abar.npy`).
pub fn alphas_cumprod(s: &Schedule) -> Vec<f32> {
    let n = s.timesteps;
    let (start, end) = (s.linear_start as f32, s.linear_end as f32);
    let step = if n > 1 {
        (end - start) / (n - 1) as f32
    } else {
        0.0
    };
    let mut abar = Vec::with_capacity(n);
    let mut acc = 1.0f64;
    for i in 0..n {
        let beta = if i < n / 2 {
            (start as f64 + step as f64 * i as f64) as f32
        } else {
            (end as f64 - step as f64 * (n - 1 - i) as f64) as f32
        };
        acc *= (1.0 - beta) as f64;
        abar.push(acc as f32);
    }
    abar
}

/// `abar[t]`, with `abar[-1] = 1` (`set_alpha_to_one`).
pub fn abar_at(abar: &[f32], t: isize) -> f32 {
    if t < 0 {
        1.0
    } else {
        abar[t as usize]
    }
}

/// Per-step scalars, f32, as the float32 PyTorch code computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdimCoefs {
    pub sqrt_a: f32,
    pub sqrt_1ma: f32,
    pub sqrt_a_next: f32,
    pub sqrt_1ma_next: f32,
}

impl DdimCoefs {
    pub fn new(a: f32, a_next: f32) -> Self {
        Self {
            sqrt_a: a.sqrt(),
            sqrt_1ma: (1.0 - a).sqrt(),
            sqrt_a_next: a_next.sqrt(),
            sqrt_1ma_next: (1.0 - a_next).sqrt(),
        }
    }

    /// Inversion step at `t`: from `abar[t-1]` to `abar[t]`.
    pub fn inversion(abar: &[f32], t: usize) -> Self {
        Self::new(abar_at(abar, t as isize - 1), abar_at(abar, t as isize))
    }

    /// Denoising step at `t`: from `abar[t]` to `abar[t-1]`.
    pub fn denoising(abar: &[f32], t: usize) -> Self {
        Self::new(abar_at(abar, t as isize), abar_at(abar, t as isize - 1))
    }
}

/// `p = clamp((x - sqrt(1-a) eps) / sqrt(a), -1, 1)`; `x = sqrt(a') p + sqrt(1-a') eps`.
pub fn invert_step(x: &mut [f32], eps: &[f32], c: DdimCoefs) {
    for (x, &e) in x.iter_mut().zip(eps) {
        let p = ((*x - c.sqrt_1ma * e) / c.sqrt_a).clamp(-1.0, 1.0);
        *x = c.sqrt_a_next * p + c.sqrt_1ma_next * e;
    }
}

/// As `invert_step` towards `a'`, with the noise re-derived from the clipped
/// prediction ("clipped model output") and the result clipped to [-1, 1].
pub fn denoise_step(x: &mut [f32], eps: &[f32], c: DdimCoefs) {
    for (x, &e) in x.iter_mut().zip(eps) {
        let p = ((*x - c.sqrt_1ma * e) / c.sqrt_a).clamp(-1.0, 1.0);
        let e2 = (*x - c.sqrt_a * p) / c.sqrt_1ma;
        *x = (c.sqrt_a_next * p + c.sqrt_1ma_next * e2).clamp(-1.0, 1.0);
    }
}
