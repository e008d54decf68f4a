//! The guided sampler of SPEC section 6, written once against the backend:
//! noise the FLAIR to `abar[0]`, DDIM-invert for N steps, then N
//! classifier-guided DDIM steps back.

use crate::backend::Backend;
use crate::ddim::DdimCoefs;
use crate::model::Net;
use anyhow::{bail, ensure, Result};

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

/// `repeat` keys of the two recorded bodies of a step.
const UNET_PASS: usize = 0;
const CLASSIFIER_PASS: usize = 1;

/// The long-lived buffers a recorded step reads and writes: the embeddings
/// of the step's timestep (copied in before each step), the UNet's noise
/// prediction and the classifier's gradient.
struct Slots<T> {
    unet_emb: T,
    cls_emb: T,
    eps: T,
    grad: T,
}

/// Drops the backend's recordings however the run ends, before the buffers
/// they name.
struct Recordings<'a, B: Backend>(&'a B);

impl<B: Backend> Drop for Recordings<'_, B> {
    fn drop(&mut self) {
        self.0.end_repeats();
    }
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
    ///
    /// The same operations as `inversion_step` and `guided_step`, arranged
    /// so that each network pass is the same device work on the same
    /// buffers at every step (`Backend::repeat`): the timestep embeddings of
    /// all steps are made first, and each step copies its own into a slot.
    pub fn run(
        &self,
        x0: &B::T,
        cond: &B::T,
        noise: &B::T,
        mut progress: impl FnMut(Phase, usize) -> Result<()>,
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
        let y = self.labels(x0);
        let mut unet_embs = Vec::with_capacity(self.steps);
        let mut cls_embs = Vec::with_capacity(self.steps);
        for t in 0..self.steps {
            let ts = vec![t; y.len()];
            unet_embs.push(self.unet.embed(b, &ts, Some(&y))?);
            cls_embs.push(self.classifier.embed(b, &ts, None)?);
        }
        let mut x = b.axpby(self.abar[0].sqrt(), x0, (1.0 - self.abar[0]).sqrt(), noise)?;
        let mut slots = Slots {
            unet_emb: b.duplicate(&unet_embs[0])?,
            cls_emb: b.duplicate(&cls_embs[0])?,
            eps: b.duplicate(&x)?,
            grad: b.duplicate(&x)?,
        };
        let _recordings = Recordings(b);
        for (t, emb) in unet_embs.iter().enumerate() {
            b.copy_into(&mut slots.unet_emb, emb)?;
            self.unet_pass(&x, cond, &mut slots)?;
            self.finite(&slots.eps, || format!("the UNet at inversion step {t}"))?;
            b.ddim_invert(&mut x, &slots.eps, DdimCoefs::inversion(&self.abar, t))?;
            progress(Phase::Inversion, t)?;
        }
        for t in (0..self.steps).rev() {
            b.copy_into(&mut slots.unet_emb, &unet_embs[t])?;
            b.copy_into(&mut slots.cls_emb, &cls_embs[t])?;
            self.unet_pass(&x, cond, &mut slots)?;
            self.finite(&slots.eps, || format!("the UNet at guided step {t}"))?;
            b.ddim_denoise(&mut x, &slots.eps, DdimCoefs::denoising(&self.abar, t))?;
            self.classifier_pass(&x, &y, &mut slots)?;
            self.finite(&slots.grad, || {
                format!("the classifier gradient at guided step {t}")
            })?;
            b.axpy(&mut x, self.guidance, &slots.grad)?;
            self.finite(&x, || format!("the guided update at step {t}"))?;
            progress(Phase::Guided, t)?;
        }
        Ok(x)
    }

    /// The DDIM updates clip their prediction to [-1, 1], which turns an infinite noise
    /// prediction into a plausible image: every network output, and the guided update (a
    /// finite gradient times the guidance may overflow), is checked where that is free (see
    /// `Backend::cheap_non_finite`). Finite inputs to an inversion step give a finite state.
    fn finite(&self, t: &B::T, stage: impl FnOnce() -> String) -> Result<()> {
        match self.backend.cheap_non_finite(t) {
            None => Ok(()),
            found => refuse_non_finite(found, self.backend.dims(t), &stage()),
        }
    }

    /// `slots.eps = unet([x, cond], slots.unet_emb)`.
    fn unet_pass(&self, x: &B::T, cond: &B::T, slots: &mut Slots<B::T>) -> Result<()> {
        let b = self.backend;
        let Slots { unet_emb, eps, .. } = slots;
        b.repeat(UNET_PASS, &mut || {
            let e = self.unet.unet_embedded(b, &b.concat(x, cond)?, unet_emb)?;
            b.copy_into(eps, &e)
        })
    }

    /// `slots.grad` = the classifier's input gradient at `x`.
    fn classifier_pass(&self, x: &B::T, y: &[usize], slots: &mut Slots<B::T>) -> Result<()> {
        let b = self.backend;
        let Slots { cls_emb, grad, .. } = slots;
        b.repeat(CLASSIFIER_PASS, &mut || {
            let (_, g) = self.classifier.classifier_grad_embedded(b, x, cls_emb, y)?;
            b.copy_into(grad, &g)
        })
    }
}

/// An error naming `stage` when `found` holds the first non-finite value (index, value) of
/// a tensor of `shape` that stage produced.
pub fn refuse_non_finite(found: Option<(usize, f32)>, shape: &[usize], stage: &str) -> Result<()> {
    match found {
        None => Ok(()),
        Some((i, v)) => {
            bail!("{stage} produced a non-finite value ({v} at index {i} of shape {shape:?})")
        }
    }
}
