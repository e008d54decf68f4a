//! The guided sampler of SPEC section 6, written once against the backend:
//! noise the FLAIR to `abar[0]`, DDIM-invert for N steps, then N
//! classifier-guided DDIM steps back.

use crate::backend::Backend;
use crate::ddim::DdimCoefs;
use crate::model::Net;
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
        let eps = self
            .unet
            .unet(b, &b.concat(x, cond)?, &vec![t; y.len()], &y)?;
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
    /// (both `[B,H,W,1]`, on the device) from initial noise `noise`.
    /// `progress` is called after every network step.
    pub fn run(
        &self,
        x0: &B::T,
        cond: &B::T,
        noise: &B::T,
        mut progress: impl FnMut(Phase, usize),
    ) -> Result<B::T> {
        let b = self.backend;
        let (d0, dc, dn) = (b.dims(x0), b.dims(cond), b.dims(noise));
        ensure!(
            d0 == dc && d0 == dn,
            "FLAIR {d0:?}, T1 {dc:?} and noise {dn:?} differ in shape"
        );
        ensure!(
            self.steps >= 1 && self.steps <= self.abar.len(),
            "steps {} must be in 1..={}",
            self.steps,
            self.abar.len()
        );
        let mut x = b.axpby(self.abar[0].sqrt(), x0, (1.0 - self.abar[0]).sqrt(), noise)?;
        for t in 0..self.steps {
            self.inversion_step(&mut x, cond, t)?;
            progress(Phase::Inversion, t);
        }
        for t in (0..self.steps).rev() {
            self.guided_step(&mut x, cond, t)?;
            progress(Phase::Guided, t);
        }
        Ok(x)
    }
}
