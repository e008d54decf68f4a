//! Timing the guided sampler on random inputs, for `fcd bench`.
//!
//! Work per slice: 2N UNet forwards plus N classifier forward + input gradient. The input
//! gradient of a convolution or linear layer is one more product of the forward's size (no
//! weight gradients are taken), so the classifier counts as 2 forwards per step, as SPEC
//! section 6's "about 67 TFLOP at N = 100" does.

use super::detect::seeded_noise;
use super::Loaded;
use crate::backend::Backend;
use crate::config::Config;
use crate::ddim::alphas_cumprod;
use crate::sampler::Sampler;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use std::time::Instant;

/// What to time.
#[derive(Clone, Copy, Debug)]
pub struct BenchSetup {
    /// Slices per run (default: the engine's auto batch on a GPU, 1 on the CPU).
    pub batch: Option<usize>,
    /// Noise level N of the timed run.
    pub steps: usize,
    /// Noise level of an untimed warm-up run (0: none).
    pub warmup: usize,
}

/// One timed sampler run.
#[derive(Clone, Debug)]
pub struct BenchRun {
    pub batch: usize,
    /// The sampler and the download of its result, which also waits for the device.
    pub seconds: f64,
    pub tflop_per_slice: f64,
    /// The run's anomaly maps (histogram-matched), for comparing precisions.
    pub anomaly: Tensor,
}

pub(super) fn run<B: Backend>(
    nets: &Loaded<B>,
    cfg: &Config,
    setup: &BenchSetup,
) -> Result<BenchRun> {
    for (what, n) in [("steps", setup.steps), ("warm-up steps", setup.warmup)] {
        ensure!(
            n <= cfg.schedule.timesteps,
            "{n} {what} exceed the schedule's {} timesteps",
            cfg.schedule.timesteps
        );
    }
    ensure!(setup.steps >= 1, "the timed run needs at least 1 step");
    let backend = &nets.backend;
    let batch = match setup.batch {
        Some(b) => b,
        None => nets.auto_batch()?.unwrap_or(1),
    };
    ensure!(batch >= 1, "a batch must be at least 1 slice");
    let s = cfg.unet.image_size;
    let shape = [batch, s, s, 1];
    // Inputs live on the device before the clock starts. Noise slices normalised as FLAIR and
    // T1 are.
    let x0 = backend.normalize(&backend.upload(&seeded_noise(&shape, 31))?)?;
    let cond = backend.normalize(&backend.upload(&seeded_noise(&shape, 32))?)?;
    let noise = backend.upload(&seeded_noise(&shape, 33))?;
    let abar = alphas_cumprod(&cfg.schedule);
    let sampler = |steps| Sampler {
        backend,
        unet: &nets.unet,
        classifier: &nets.classifier,
        abar: abar.clone(),
        steps,
        guidance: cfg.defaults.guidance as f32,
    };
    if setup.warmup > 0 {
        backend.download(&sampler(setup.warmup).run(&x0, &cond, &noise, |_, _| Ok(()))?)?;
    }
    let t0 = Instant::now();
    let xhat = sampler(setup.steps).run(&x0, &cond, &noise, |_, _| Ok(()))?;
    let out = backend.download(&xhat)?;
    let seconds = t0.elapsed().as_secs_f64();
    ensure!(
        out.data.iter().all(|v| v.is_finite()),
        "the sampler produced non-finite values"
    );
    let anomaly = backend.download(&backend.anomaly(&x0, &xhat, true)?.map)?;
    let n = setup.steps as f64;
    Ok(BenchRun {
        batch,
        seconds,
        tflop_per_slice: (2.0 * n * nets.unet.spec.forward_flops()
            + 2.0 * n * nets.classifier.spec.forward_flops())
            / 1e12,
        anomaly,
    })
}
