//! One detection call: normalisation, the guided sampler and the anomaly maps on the
//! device, in batches of slices, and the strongest peaks.

use super::Loaded;
use crate::backend::{Anomaly, Backend};
use crate::config::{Config, MAX_GUIDANCE};
use crate::ddim::alphas_cumprod;
use crate::inputs::{self, Prepared};
use crate::metrics;
use crate::model::NetSpec;
use crate::sampler::{Phase, Sampler};
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::borrow::Cow;

/// Per-call settings of [`super::Engine::detect`]. `Default` gives the config's noise level
/// and guidance, seed 0, histogram matching, and the engine's batch.
pub struct DetectOptions<'a> {
    /// Noise level N: inversion steps and guided steps (default: the config's `noise_level`).
    pub steps: Option<usize>,
    /// Classifier guidance scale s (default: the config's `guide_w`).
    pub guidance: Option<f64>,
    /// Seed of the initial noise (a standard normal over all slices), unless `noise` is given.
    pub seed: u64,
    /// The initial noise itself, `[S, H, W, 1]` like the slices.
    pub noise: Option<Tensor>,
    /// Histogram-match the pseudo-healthy FLAIR to the input before the difference.
    pub hist_match: bool,
    /// Slices per sampler run (default: [`super::Engine::auto_batch`] on a GPU, all slices
    /// on the CPU). Results depend on it only through float32 rounding (the CPU's matrix
    /// products may split rows differently; rel-L2 about 1e-6).
    pub batch: Option<usize>,
    /// How many peaks [`Detection::peaks`] keeps: at most `per_slice` of each slice, `most`
    /// in all, each suppressing a disc of `radius` pixels.
    pub peaks: PeakOptions,
    /// Called after every sampler step; an error it returns stops the run with that error.
    pub progress: Option<&'a mut dyn FnMut(Progress) -> Result<()>>,
}

impl Default for DetectOptions<'_> {
    fn default() -> Self {
        DetectOptions {
            steps: None,
            guidance: None,
            seed: 0,
            noise: None,
            hist_match: true,
            batch: None,
            peaks: PeakOptions::default(),
            progress: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakOptions {
    pub per_slice: usize,
    pub most: usize,
    pub radius: f64,
}

impl Default for PeakOptions {
    fn default() -> Self {
        PeakOptions {
            per_slice: 3,
            most: 20,
            radius: 10.0,
        }
    }
}

/// Where a detection call is: `done` of `total` sampler steps (N inversion and N guided
/// steps per batch of slices).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
}

/// A peak of an anomaly map on the network's grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    pub slice: usize,
    pub row: usize,
    pub col: usize,
    /// The anomaly map there (every slice's map is normalised to [0, 1] on its own).
    pub score: f32,
    /// [`crate::post::difference`] there: what ranks peaks of different slices.
    pub strength: f32,
}

/// What a detection call returns, on the network's grid.
#[derive(Clone, Debug)]
pub struct Detection {
    /// The raw sampler output `[S, H, W, 1]`, in the normalised range [-1, 1].
    pub pseudo_healthy: Tensor,
    /// Anomaly maps `[S, H, W]` in [0, 1].
    pub anomaly: Tensor,
    /// The strongest peaks of all slices, by strength.
    pub peaks: Vec<Peak>,
    /// The settings used (the defaults resolved).
    pub steps: usize,
    pub guidance: f64,
    pub batch: usize,
    pub hist_match: bool,
}

/// Beyond this, larger batches stop paying on one GPU and only delay the first results.
pub const MAX_AUTO_BATCH: usize = 64;

/// The most slices one sampler run should take on a device with `free` bytes: 80% of them
/// over the per-slice activation bound of both networks (`NetSpec::activation_bytes`), at
/// least 1 and at most [`MAX_AUTO_BATCH`].
pub(super) fn auto_batch(unet: &NetSpec, classifier: &NetSpec, free: usize) -> usize {
    let per_slice = unet.activation_bytes().max(classifier.activation_bytes());
    let fit = (0.8 * free as f64 / per_slice).floor() as usize;
    fit.clamp(1, MAX_AUTO_BATCH)
}

/// The noise level and guidance of a call: the given ones or the config's, checked.
pub(super) fn resolve(
    cfg: &Config,
    steps: Option<usize>,
    guidance: Option<f64>,
) -> Result<(usize, f64)> {
    // Name where a bad value came from: the flag, or the config (checked at load).
    let (steps, steps_from) = match steps {
        Some(s) => (s, "--steps"),
        None => (cfg.defaults.noise_level, "the config's noise_level"),
    };
    let (guidance, guidance_from) = match guidance {
        Some(g) => (g, "--guidance"),
        None => (cfg.defaults.guidance, "the config's guide_w"),
    };
    ensure!(
        (1..=cfg.schedule.timesteps).contains(&steps),
        "{steps_from} {steps} must be in 1..={} (the config's timesteps)",
        cfg.schedule.timesteps
    );
    ensure!(
        guidance.is_finite(),
        "{guidance_from} {guidance} is not a finite number"
    );
    ensure!(
        guidance.abs() <= MAX_GUIDANCE,
        "{guidance_from} {guidance} is outside -{MAX_GUIDANCE}..={MAX_GUIDANCE} (the guided \
         step would overflow float32 and the sampler's clipping would hide it)"
    );
    Ok((steps, guidance))
}

/// Standard normal noise from a seed, reproducible across platforms.
pub fn seeded_noise(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

pub(super) fn run<B: Backend>(
    nets: &Loaded<B>,
    cfg: &Config,
    inputs: &Prepared,
    options: DetectOptions,
) -> Result<Detection> {
    let DetectOptions {
        steps,
        guidance,
        seed,
        noise,
        hist_match,
        batch,
        peaks,
        mut progress,
    } = options;
    let (steps, guidance) = resolve(cfg, steps, guidance)?;
    let size = cfg.unet.image_size;
    ensure!(
        cfg.classifier.image_size == size,
        "the UNet's image_size {size} and the classifier's {} differ",
        cfg.classifier.image_size
    );
    let shape = &inputs.flair.shape;
    ensure!(
        shape[1] == size && shape[2] == size,
        "slices of {} x {} do not match the config's image_size {size}",
        shape[1],
        shape[2]
    );
    let noise = match noise {
        None => seeded_noise(shape, seed),
        Some(n) => {
            inputs::check_noise(&n, shape, "the initial noise")?;
            n
        }
    };
    let n = shape[0];
    let batch = match batch {
        Some(b) => b,
        None => nets.auto_batch()?.unwrap_or(n).max(1),
    };
    ensure!(batch >= 1, "a batch must be at least 1 slice");
    let total = 2 * steps * n.div_ceil(batch);
    let mut done = 0;
    let mut report = |phase: Phase| -> Result<()> {
        done += 1;
        match progress.as_mut() {
            Some(p) => p(Progress { phase, done, total }),
            None => Ok(()),
        }
    };
    let sampler = Sampler {
        backend: &nets.backend,
        unet: &nets.unet,
        classifier: &nets.classifier,
        abar: alphas_cumprod(&cfg.schedule),
        steps,
        guidance: guidance as f32,
    };
    let (mut healthy, mut anomaly, mut difference) = (Vec::new(), Vec::new(), Vec::new());
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let whole = batch >= n;
        let (x, a) = sample(
            &sampler,
            [
                &*slices_of(&inputs.flair, start, end)?,
                &*slices_of(&inputs.t1, start, end)?,
                &*slices_of(&noise, start, end)?,
            ],
            hist_match,
            &mut report,
        )
        .with_context(|| {
            if whole {
                "sampling".to_string()
            } else {
                format!("slices {start}..{end}")
            }
        })?;
        healthy.extend(x.data);
        anomaly.extend(a.map.data);
        difference.extend(a.difference.data);
    }
    let pseudo_healthy = Tensor::new(shape.clone(), healthy)?;
    let anomaly = Tensor::new(shape[..3].to_vec(), anomaly)?;
    let peaks = strongest_peaks(&anomaly.data, &difference, size, peaks);
    Ok(Detection {
        pseudo_healthy,
        anomaly,
        peaks,
        steps,
        guidance,
        batch,
        hist_match,
    })
}

/// Slices `start..end` of `t` (`[S, ...]`), borrowed when that is all of them.
fn slices_of(t: &Tensor, start: usize, end: usize) -> Result<Cow<'_, Tensor>> {
    if start == 0 && end == t.shape[0] {
        return Ok(Cow::Borrowed(t));
    }
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = end - start;
    Ok(Cow::Owned(Tensor::new(
        shape,
        t.data[start * per..end * per].to_vec(),
    )?))
}

/// One sampler run on `[flair, t1, noise]` (raw `[B,H,W,1]`), everything after the upload
/// on the device: the pseudo-healthy FLAIR `[B,H,W,1]`, and the anomaly maps `[B,H,W,1]`
/// with their differences.
fn sample<B: Backend>(
    sampler: &Sampler<B>,
    [flair, t1, noise]: [&Tensor; 3],
    hist_match: bool,
    report: &mut impl FnMut(Phase) -> Result<()>,
) -> Result<(Tensor, Anomaly<Tensor>)> {
    let b = sampler.backend;
    let x0 = b.normalize(&b.upload(flair)?).context("FLAIR")?;
    let cond = b.normalize(&b.upload(t1)?).context("T1")?;
    let noise = b.upload(noise)?;
    let xhat = sampler.run(&x0, &cond, &noise, |phase, _| report(phase))?;
    let a = b.anomaly(&x0, &xhat, hist_match)?;
    let xhat = b.download(&xhat)?;
    let a = Anomaly {
        map: b.download(&a.map)?,
        difference: b.download(&a.difference)?,
    };
    // A NaN would otherwise pass as a result: NaN-blind maxima make the maps look normal.
    let g = sampler.guidance;
    all_finite(
        &xhat,
        &format!("the guided sampler (guidance {g}, weights or inputs out of range?)"),
    )?;
    all_finite(&a.map, "the anomaly maps")?;
    Ok((xhat, a))
}

fn all_finite(t: &Tensor, stage: &str) -> Result<()> {
    crate::sampler::refuse_non_finite(t.first_non_finite(), &t.shape, stage)
}

/// The peaks of every slice of `anomaly` (`size x size` maps), ranked across slices by
/// `difference` (the maps before their per-slice normalisation): each slice's map peaks at
/// 1, so the maps alone cannot say which slice holds the strongest anomaly.
fn strongest_peaks(anomaly: &[f32], difference: &[f32], size: usize, o: PeakOptions) -> Vec<Peak> {
    let hw = size * size;
    let mut all: Vec<Peak> = anomaly
        .chunks(hw)
        .zip(difference.chunks(hw))
        .enumerate()
        .flat_map(|(slice, (a, d))| {
            metrics::peaks(a, size, size, o.per_slice, o.radius)
                .into_iter()
                .map(move |(row, col)| Peak {
                    slice,
                    row,
                    col,
                    score: a[row * size + col],
                    strength: d[row * size + col],
                })
        })
        .collect();
    all.sort_by(|a, b| {
        b.strength
            .total_cmp(&a.strength)
            .then(a.slice.cmp(&b.slice))
    });
    all.truncate(o.most);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NetKind;
    use std::path::Path;

    #[test]
    fn non_finite_results_name_the_stage() {
        let t = Tensor::new(vec![1, 2], vec![0.5, f32::NAN]).unwrap();
        let e = all_finite(&t, "the anomaly maps").unwrap_err().to_string();
        assert!(
            e.starts_with("the anomaly maps produced a non-finite value (NaN at index 1"),
            "{e}"
        );
        let ok = Tensor::new(vec![2], vec![0.5, -1.0]).unwrap();
        assert!(all_finite(&ok, "x").is_ok());
    }

    #[test]
    fn auto_batch_of_the_paper_model() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/published/config_t1_cond_multiclass_cg.yaml");
        let cfg = Config::load(&path).unwrap();
        let unet = NetSpec::build(&cfg.unet, NetKind::Unet);
        let cls = NetSpec::build(&cfg.classifier, NetKind::Classifier);
        // The UNet's bound dominates: its 256 x 256 levels carry 96..192 channels.
        let per_slice = unet.activation_bytes();
        assert!(per_slice > cls.activation_bytes());
        assert!(
            (0.2e9..2e9).contains(&per_slice),
            "{per_slice} bytes per slice"
        );
        let gib = 1usize << 30;
        let h100 = auto_batch(&unet, &cls, 78 * gib);
        assert!((16..=MAX_AUTO_BATCH).contains(&h100), "{h100}");
        assert_eq!(auto_batch(&unet, &cls, 1 << 20), 1);
        assert_eq!(auto_batch(&unet, &cls, usize::MAX / 2), MAX_AUTO_BATCH);
        let b = auto_batch(&unet, &cls, 8 * gib);
        assert_eq!(b, (0.8 * (8 * gib) as f64 / per_slice) as usize);
    }
}
