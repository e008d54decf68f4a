//! A convolution on the GPU against its CPU twin on fresh random inputs: the
//! check that tests/cuda_igemm.rs runs on fixed cases and the kernel
//! tournament runs before it times a kernel.
//!
//! The twin is fed what the kernel multiplies: the transformed activation
//! (GroupNorm, SiLU, resampling in float32) and the weights, each rounded
//! once to the mode's operand type (bf16, fp16, TF32; none for 3xTF32).
//! What remains is float32 summation order and the rare element whose
//! rounding flips by one unit because the kernel applies GroupNorm as
//! `a x + s` rather than `(x - mean) rstd gamma + beta`.

use anyhow::{bail, ensure, Result};
use rand::{Rng, RngExt};
use rand_distr::StandardNormal;

use crate::backend::cpu_ref::CpuRef;
use crate::backend::cuda::backend::Cuda;
use crate::backend::{Backend, ConvPost, ConvPre, Norm, Resample};
use crate::precision::{Half, Precision};
use crate::tensor::{rel_l2, Tensor};

/// A random tensor of `shape`, normal with `mean` and `std`.
pub fn random(rng: &mut impl Rng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| mean + std * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::new(shape.to_vec(), data).expect("shape and data agree")
}

/// `t` as precision `p`'s convolution operands hold it: rounded to bf16 or
/// fp16, to TF32 (to nearest, ties away: `cvt.rna.tf32`), or float32
/// itself for 3xTF32.
pub fn round(t: &Tensor, p: Precision) -> Tensor {
    let data = t
        .data
        .iter()
        .map(|&v| match (p.half(), p) {
            (Some(Half::Bf16), _) => half::bf16::from_f32(v).to_f32(),
            (Some(Half::Fp16), _) => half::f16::from_f32(v).to_f32(),
            (None, Precision::Tf32) => f32::from_bits(v.to_bits().wrapping_add(0x1000) & !0x1fff),
            (None, _) => v,
        })
        .collect();
    Tensor::new(t.shape.clone(), data).expect("same shape")
}

/// Relative L2 bound of a mode against its twin. Rounded operands
/// (bf16, fp16, TF32): a fragment-layout or indexing error gives O(1);
/// summation order ~1e-7; a one-unit rounding flip (probability ~2^-16 per
/// element at bf16) adds ~1e-5 at most on these sizes; the tensor cores'
/// truncating adder over K = 4608 adds ~3e-5 (emulated, tools/emulate).
/// 3xTF32 against the unrounded float32 twin: the dropped small*small term
/// and the small parts' rounding are ~2^-22 relative per product, ~3e-7
/// over random-sign sums, the CPU's own float32 sums ~1e-7; the bound
/// leaves 10x (plain TF32 would give ~1e-3). Measured on a GPU: not yet
/// (benches/NOTES.md).
pub fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 3e-6,
        Precision::Tf32 | Precision::Bf16 | Precision::Fp16 => 1e-4,
    }
}

/// One fused convolution: `conv(resample(silu?(GN(x))), w) + bias + e + res`.
#[derive(Clone, Copy, Debug)]
pub struct ConvCase {
    pub b: usize,
    /// Source grid.
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub resample: Resample,
    /// GroupNorm in the prologue: (with scale/shift, SiLU).
    pub norm: Option<(bool, bool)>,
    pub bcast: bool,
    pub residual: bool,
    /// The GPU reads the input as the concatenation of its first `c1`
    /// channels and the rest, from two tensors.
    pub concat: Option<usize>,
}

impl ConvCase {
    /// The output grid.
    pub fn out_hw(&self) -> (usize, usize) {
        match self.resample {
            Resample::None => (self.h, self.w),
            Resample::Up => (2 * self.h, 2 * self.w),
            Resample::Down => (self.h / 2, self.w / 2),
        }
    }
}

/// Fresh random operands of one case and the CPU twin's answer on them in
/// precision `p`, made once for any number of GPU runs (kernel versions).
pub struct ConvTrial {
    case: ConvCase,
    precision: Precision,
    x: Tensor,
    w: Tensor,
    bias: Tensor,
    gamma: Tensor,
    beta: Tensor,
    ss: Tensor,
    e: Tensor,
    res: Tensor,
    want: Tensor,
}

impl ConvTrial {
    pub fn new(c: &ConvCase, p: Precision, rng: &mut impl Rng) -> Result<ConvTrial> {
        let x = random(rng, &[c.b, c.h, c.w, c.cin], 0.5, 2.0);
        let w = random(rng, &[c.cout, c.cin, c.k, c.k], 0.0, 0.1);
        let bias = random(rng, &[c.cout], 0.0, 0.5);
        let gamma = random(rng, &[c.cin], 1.0, 0.3);
        let beta = random(rng, &[c.cin], 0.0, 0.3);
        let ss = random(rng, &[c.b, 1, 1, 2 * c.cin], 0.0, 0.5);
        let (ho, wo) = c.out_hw();
        let e = random(rng, &[c.b, 1, 1, c.cout], 0.0, 1.0);
        let res = random(rng, &[c.b, ho, wo, c.cout], 0.0, 1.0);

        let mut a = x.clone();
        if let Some((with_ss, silu)) = c.norm {
            a = CpuRef.group_norm(&x, &gamma, &beta, with_ss.then_some(&ss), silu)?;
        }
        a = match c.resample {
            Resample::None => a,
            Resample::Up => CpuRef.upsample2(&a)?,
            Resample::Down => CpuRef.avg_pool2(&a)?,
        };
        let cw = CpuRef.prepare_conv(&round(&w, p), &bias)?;
        let post = ConvPost {
            bcast: c.bcast.then_some(&e),
            residual: c.residual.then_some(&res),
        };
        let want = CpuRef.conv_fused(&round(&a, p), &cw, &ConvPre::default(), &post)?;
        Ok(ConvTrial {
            case: *c,
            precision: p,
            x,
            w,
            bias,
            gamma,
            beta,
            ss,
            e,
            res,
            want,
        })
    }

    /// `Backend::conv_fused` of `g` (in the trial's precision) against the
    /// twin: the rel-L2 error. Fails where an output is not finite (an
    /// element never written: outputs are poisoned with NaN first).
    pub fn error(&self, g: &Cuda) -> Result<f64> {
        let c = &self.case;
        ensure!(
            g.precision() == self.precision,
            "a {} trial run in {}",
            self.precision,
            g.precision()
        );
        let (xg, gg, bg, sg, eg, rg) = (
            g.upload(&self.x)?,
            g.upload(&self.gamma)?,
            g.upload(&self.beta)?,
            g.upload(&self.ss)?,
            g.upload(&self.e)?,
            g.upload(&self.res)?,
        );
        let halves = match c.concat {
            None => None,
            Some(c1) => {
                let (mut a, mut b2) = (Vec::new(), Vec::new());
                for px in self.x.data.chunks(c.cin) {
                    a.extend_from_slice(&px[..c1]);
                    b2.extend_from_slice(&px[c1..]);
                }
                let shape = |ch| vec![c.b, c.h, c.w, ch];
                Some((
                    g.upload(&Tensor::new(shape(c1), a)?)?,
                    g.upload(&Tensor::new(shape(c.cin - c1), b2)?)?,
                ))
            }
        };
        let gw = g.prepare_conv(&self.w, &self.bias)?;
        let pre = ConvPre {
            skip: halves.as_ref().map(|h| &h.1),
            norm: c.norm.map(|(with_ss, silu)| Norm {
                gamma: &gg,
                beta: &bg,
                ss: with_ss.then_some(&sg),
                silu,
            }),
            resample: c.resample,
        };
        let post = ConvPost {
            bcast: c.bcast.then_some(&eg),
            residual: c.residual.then_some(&rg),
        };
        g.set_poison(true);
        let input = halves.as_ref().map_or(&xg, |h| &h.0);
        let got = g.conv_fused(input, &gw, &pre, &post);
        g.set_poison(false);
        finite_error(&g.download(&got?)?, &self.want)
    }
}

/// The backward-data product (`Backend::conv_bwd`): dy `[b, h, w, cout]`
/// through a `cout x cin` k x k convolution, with the twin's answer.
pub struct ConvBwdTrial {
    precision: Precision,
    wt: Tensor,
    bias: Tensor,
    dy: Tensor,
    want: Tensor,
}

impl ConvBwdTrial {
    pub fn new(
        (b, h, w, cin, cout, k): (usize, usize, usize, usize, usize, usize),
        p: Precision,
        rng: &mut impl Rng,
    ) -> Result<ConvBwdTrial> {
        let wt = random(rng, &[cout, cin, k, k], 0.0, 0.1);
        let bias = random(rng, &[cout], 0.0, 0.5);
        let dy = random(rng, &[b, h, w, cout], 0.0, 1.0);
        let cw = CpuRef.prepare_conv(&round(&wt, p), &bias)?;
        let want = CpuRef.conv_bwd(&round(&dy, p), &cw)?;
        Ok(ConvBwdTrial {
            precision: p,
            wt,
            bias,
            dy,
            want,
        })
    }

    pub fn error(&self, g: &Cuda) -> Result<f64> {
        ensure!(
            g.precision() == self.precision,
            "a {} trial run in {}",
            self.precision,
            g.precision()
        );
        let gw = g.prepare_conv(&self.wt, &self.bias)?;
        g.set_poison(true);
        let got = g.conv_bwd(&g.upload(&self.dy)?, &gw);
        g.set_poison(false);
        finite_error(&g.download(&got?)?, &self.want)
    }
}

/// rel-L2 of `got` to `want`, refusing a shape mismatch or a non-finite
/// output.
fn finite_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    ensure!(
        got.shape == want.shape,
        "shape {:?}, expected {:?}",
        got.shape,
        want.shape
    );
    if let Some(i) = got.data.iter().position(|v| !v.is_finite()) {
        bail!("element {i} is {} (never written?)", got.data[i]);
    }
    Ok(rel_l2(&got.data, &want.data))
}

/// Relative L2 bound of attention against the CPU twin: for bf16 / fp16,
/// twice the operand type's unit roundoff; for the fp32 and tf32 modes
/// (3xTF32), 4e-6. The derivations are beside the attention tests
/// (tests/cuda_flash.rs).
pub fn attention_tolerance(p: Precision) -> f64 {
    match p.half() {
        Some(Half::Bf16) => 2.0 * 2f64.powi(-8),
        Some(Half::Fp16) => 2.0 * 2f64.powi(-11),
        None => 4e-6,
    }
}

/// Relative L2 bound of GroupNorm (+ SiLU) against the CPU twin: float32
/// on both sides with float64 statistics, so float32 rounding, ~1e-7; the
/// bound leaves 10x.
pub const NORM_TOLERANCE: f64 = 1e-6;
