//! The guided sampler of SPEC section 6, written once against the backend:
//! noise the FLAIR to `abar[0]`, DDIM-invert for N steps, then N
//! classifier-guided DDIM steps back.

use crate::backend::{Backend, MAX_FLAG};
use crate::config::MAX_TIMESTEPS;
use crate::ddim::DdimCoefs;
use crate::model::Net;
use crate::tensor::Tensor;
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

    /// The pseudo-healthy FLAIR for normalised FLAIR `x0` and T1 `cond`
    /// (both `[B,H,W,1]`, on the device) from initial noise `noise`.
    /// `progress` is called after every network step.
    ///
    /// Each network pass is the same device work on the same buffers at
    /// every step (`Backend::repeat`): the timestep embeddings of all steps
    /// are made first, and each step copies its own into a slot.
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
        // The DDIM updates clip their prediction to [-1, 1], which turns an infinite noise
        // prediction into a plausible image: every network output, and the guided update
        // (a finite gradient times the guidance may overflow), is flagged, and the flag is
        // read after each phase. Finite inputs to an inversion step give a finite state.
        let mut flag = b.upload(&Tensor::zeros(&[1]))?;
        let _recordings = Recordings(b);
        for (t, emb) in unet_embs.iter().enumerate() {
            b.copy_into(&mut slots.unet_emb, emb)?;
            self.unet_pass(&x, cond, &mut slots)?;
            b.flag_non_finite(&slots.eps, &mut flag, Check::InversionUnet.stage(t))?;
            b.ddim_invert(&mut x, &slots.eps, DdimCoefs::inversion(&self.abar, t))?;
            progress(Phase::Inversion, t)?;
        }
        self.refuse_flagged(&flag)?;
        for t in (0..self.steps).rev() {
            b.copy_into(&mut slots.unet_emb, &unet_embs[t])?;
            b.copy_into(&mut slots.cls_emb, &cls_embs[t])?;
            self.unet_pass(&x, cond, &mut slots)?;
            b.flag_non_finite(&slots.eps, &mut flag, Check::GuidedUnet.stage(t))?;
            b.ddim_denoise(&mut x, &slots.eps, DdimCoefs::denoising(&self.abar, t))?;
            self.classifier_pass(&x, &y, &mut slots)?;
            b.flag_non_finite(&slots.grad, &mut flag, Check::Gradient.stage(t))?;
            b.axpy(&mut x, self.guidance, &slots.grad)?;
            b.flag_non_finite(&x, &mut flag, Check::GuidedUpdate.stage(t))?;
            progress(Phase::Guided, t)?;
        }
        self.refuse_flagged(&flag)?;
        Ok(x)
    }

    /// An error naming the first stage `flag` holds, if any.
    fn refuse_flagged(&self, flag: &B::T) -> Result<()> {
        let stage = self.backend.download(flag)?.data[0];
        ensure!(
            stage == 0.0,
            "{} produced a non-finite value",
            Check::describe(stage as u32)
        );
        Ok(())
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

/// What the sampler flags non-finite values of (`Backend::flag_non_finite`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    InversionUnet,
    GuidedUnet,
    Gradient,
    GuidedUpdate,
}

/// Stages of one check kind: more than any timestep the config allows.
const STAGES_PER_CHECK: u32 = 1 << 17;
const _: () = assert!(MAX_TIMESTEPS < STAGES_PER_CHECK as usize);
const _: () = assert!(4 * STAGES_PER_CHECK <= MAX_FLAG);

impl Check {
    const ALL: [Check; 4] = [
        Check::InversionUnet,
        Check::GuidedUnet,
        Check::Gradient,
        Check::GuidedUpdate,
    ];

    /// The flag value of this check at timestep `t` (never 0).
    fn stage(self, t: usize) -> u32 {
        self as u32 * STAGES_PER_CHECK + t as u32 + 1
    }

    /// Words for a flag value `stage` made by [`Check::stage`].
    fn describe(stage: u32) -> String {
        let (kind, t) = (
            (stage - 1) / STAGES_PER_CHECK,
            (stage - 1) % STAGES_PER_CHECK,
        );
        match Check::ALL.get(kind as usize) {
            Some(Check::InversionUnet) => format!("the UNet at inversion step {t}"),
            Some(Check::GuidedUnet) => format!("the UNet at guided step {t}"),
            Some(Check::Gradient) => format!("the classifier gradient at guided step {t}"),
            Some(Check::GuidedUpdate) => format!("the guided update at step {t}"),
            None => format!("an unknown stage {stage}"),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu_ref::CpuRef;

    #[test]
    fn every_stage_is_named_back() {
        for check in Check::ALL {
            for t in [0, 1, 99, MAX_TIMESTEPS - 1] {
                let words = Check::describe(check.stage(t));
                assert!(
                    words.ends_with(&format!("step {t}")),
                    "{check:?} {t}: {words}"
                );
            }
        }
        assert_eq!(
            Check::describe(Check::Gradient.stage(7)),
            "the classifier gradient at guided step 7"
        );
    }

    #[test]
    fn the_flag_keeps_the_first_bad_stage() -> Result<()> {
        let cpu = CpuRef;
        let mut flag = Tensor::zeros(&[1]);
        let good = Tensor::new(vec![3], vec![1.0, -2.0, 0.0])?;
        let nan = Tensor::new(vec![3], vec![1.0, f32::NAN, 0.0])?;
        let inf = Tensor::new(vec![3], vec![f32::NEG_INFINITY, 0.0, 0.0])?;
        cpu.flag_non_finite(&good, &mut flag, 5)?;
        assert_eq!(flag.data[0], 0.0);
        cpu.flag_non_finite(&nan, &mut flag, 6)?;
        cpu.flag_non_finite(&inf, &mut flag, 7)?;
        assert_eq!(flag.data[0], 6.0);
        assert!(cpu.flag_non_finite(&nan, &mut flag, 0).is_err());
        assert!(cpu.flag_non_finite(&nan, &mut flag, MAX_FLAG + 1).is_err());
        Ok(())
    }
}
