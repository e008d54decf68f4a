//! The guided sampler of SPEC section 6, written once against the backend:
//! noise the FLAIR to `abar[0]`, DDIM-invert for N steps, then N
//! classifier-guided DDIM steps back.

use crate::backend::Backend;
use crate::ddim::DdimCoefs;
use crate::model::Net;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// Everything a run needs besides the images.
pub struct Sampler<'a, B: Backend> {
    pub backend: &'a B,
    pub unet: &'a Net<B>,
    pub classifier: &'a Net<B>,
    /// `alphas_cumprod` of the schedule.
    pub abar: Vec<f32>,
    /// Noise level N: steps of inversion and of guided denoising.
    pub steps: usize,
    pub guidance: f32,
}

/// Where the sampler is, for progress reports.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    Inversion,
    Guided,
}

impl<B: Backend> Sampler<'_, B> {
    fn labels(&self, x: &B::T) -> Vec<usize> {
        vec![0; self.backend.dims(x)[0]]
    }

    /// One inversion step at `t` on state `x` (`[B,H,W,1]`) with condition `cond`.
    pub fn inversion_step(&self, x: &mut B::T, cond: &B::T, t: usize) -> Result<()> {
        let b = self.backend;
        let y = self.labels(x);
        let eps = self.unet.unet(b, &b.concat(x, cond)?, &vec![t; y.len()], &y)?;
        b.ddim_invert(x, &eps, DdimCoefs::inversion(&self.abar, t))
    }

    /// One guided denoising step at `t`.
    pub fn guided_step(&self, x: &mut B::T, cond: &B::T, t: usize) -> Result<()> {
        let b = self.backend;
        let y = self.labels(x);
        let ts = vec![t; y.len()];
        let eps = self.unet.unet(b, &b.concat(x, cond)?, &ts, &y)?;
        b.ddim_denoise(x, &eps, DdimCoefs::denoising(&self.abar, t))?;
        let (_, g) = self.classifier.classifier_grad(b, x, &ts, &y)?;
        b.axpy(x, self.guidance, &g)
    }

    /// The pseudo-healthy FLAIR for normalised FLAIR `x0` and T1 `cond`
    /// (both `[B,H,W,1]`) from initial noise `noise`. `progress` is called
    /// after every network step.
    pub fn run(&self, x0: &Tensor, cond: &Tensor, noise: &Tensor, mut progress: impl FnMut(Phase, usize)) -> Result<Tensor> {
        ensure!(x0.shape == cond.shape && x0.shape == noise.shape, "FLAIR {:?}, T1 {:?} and noise {:?} differ in shape", x0.shape, cond.shape, noise.shape);
        ensure!(self.steps >= 1 && self.steps <= self.abar.len(), "steps {} must be in 1..={}", self.steps, self.abar.len());
        let b = self.backend;
        let (sa, s1a) = (self.abar[0].sqrt(), (1.0 - self.abar[0]).sqrt());
        let xt: Vec<f32> = x0.data.iter().zip(&noise.data).map(|(&x, &n)| sa * x + s1a * n).collect();
        let mut x = b.upload(&Tensor::new(x0.shape.clone(), xt)?)?;
        let cond = b.upload(cond)?;
        for t in 0..self.steps {
            self.inversion_step(&mut x, &cond, t)?;
            progress(Phase::Inversion, t);
        }
        for t in (0..self.steps).rev() {
            self.guided_step(&mut x, &cond, t)?;
            progress(Phase::Guided, t);
        }
        b.download(&x)
    }
}
