//! The detection job as a library call: load both networks, normalise the
//! slices, sample, and turn the result into anomaly maps.

use crate::backend::Backend;
use crate::config::{Config, NetConfig};
use crate::ddim::alphas_cumprod;
use crate::io::checkpoint;
use crate::model::{weights, Net, NetKind, NetSpec};
use crate::sampler::{Phase, Sampler};
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// Reads a checkpoint and binds it as the network `cfg` describes.
pub fn load_net<B: Backend>(
    backend: &B,
    cfg: &NetConfig,
    kind: NetKind,
    path: &Path,
) -> Result<Net<B>> {
    let spec = NetSpec::build(cfg, kind);
    let tensors = checkpoint::load(path)?;
    let tensors = if kind == NetKind::Unet {
        weights::strip_model_prefix(tensors)
    } else {
        tensors
    };
    let what = format!(
        "{} ({})",
        path.display(),
        if kind == NetKind::Unet {
            "UNet"
        } else {
            "classifier"
        }
    );
    let w = weights::bind(backend, &spec, &tensors, &what)?;
    Ok(Net { spec, w })
}

/// The most slices one sampler call should take on a device with `free`
/// bytes: 80% of them over the per-slice activation bound of both networks
/// (`NetSpec::activation_bytes`), at least 1 and at most `MAX_AUTO_BATCH`.
pub fn auto_batch(unet: &NetSpec, classifier: &NetSpec, free: usize) -> usize {
    let per_slice = unet.activation_bytes().max(classifier.activation_bytes());
    let fit = (0.8 * free as f64 / per_slice).floor() as usize;
    fit.clamp(1, MAX_AUTO_BATCH)
}

/// Beyond this, larger batches stop paying on one GPU and only delay the
/// first results.
pub const MAX_AUTO_BATCH: usize = 64;

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

pub struct Detection {
    /// The raw sampler output `[B,H,W,1]`.
    pub pseudo_healthy: Tensor,
    /// Anomaly maps `[B,H,W]` in [0, 1].
    pub anomaly: Tensor,
}

/// Runs normalisation, the sampler and post-processing on the device:
/// raw FLAIR `flair` and T1 `t1` slices and the initial noise `noise` (all
/// `[B,H,W,1]`) in, everything after the upload on `backend`.
#[allow(clippy::too_many_arguments)]
pub fn detect<B: Backend>(
    backend: &B,
    cfg: &Config,
    unet: &Net<B>,
    classifier: &Net<B>,
    flair: &Tensor,
    t1: &Tensor,
    noise: &Tensor,
    steps: usize,
    guidance: f32,
    hist_match: bool,
    progress: impl FnMut(Phase, usize),
) -> Result<Detection> {
    let size = cfg.unet.image_size;
    ensure!(
        flair.shape[1] == size && flair.shape[2] == size,
        "slices of {} x {} do not match the config's image_size {size}",
        flair.shape[1],
        flair.shape[2]
    );
    ensure!(
        cfg.classifier.image_size == size,
        "the UNet's image_size {size} and the classifier's {} differ",
        cfg.classifier.image_size
    );
    let b = backend;
    let x0 = b.normalize(&b.upload(flair)?).context("FLAIR")?;
    let cond = b.normalize(&b.upload(t1)?).context("T1")?;
    let noise = b.upload(noise)?;
    let sampler = Sampler {
        backend,
        unet,
        classifier,
        abar: alphas_cumprod(&cfg.schedule),
        steps,
        guidance,
    };
    let xhat = sampler.run(&x0, &cond, &noise, progress)?;
    let a = b.anomaly(&x0, &xhat, hist_match)?;
    let mut anomaly = b.download(&a)?;
    anomaly.shape.pop();
    Ok(Detection {
        pseudo_healthy: b.download(&xhat)?,
        anomaly,
    })
}

/// `detect` on at most `batch` slices per sampler run: the sampler treats
/// slices independently, so the results are those of one run on all of them.
#[allow(clippy::too_many_arguments)]
pub fn detect_batched<B: Backend>(
    backend: &B,
    cfg: &Config,
    unet: &Net<B>,
    classifier: &Net<B>,
    flair: &Tensor,
    t1: &Tensor,
    noise: &Tensor,
    steps: usize,
    guidance: f32,
    hist_match: bool,
    batch: usize,
    mut progress: impl FnMut(Phase, usize),
) -> Result<Detection> {
    ensure!(batch >= 1, "a batch of zero slices");
    let n = flair.shape[0];
    if batch >= n {
        return detect(
            backend, cfg, unet, classifier, flair, t1, noise, steps, guidance, hist_match, progress,
        );
    }
    let part = |t: &Tensor, start: usize, end: usize| -> Result<Tensor> {
        let per: usize = t.shape[1..].iter().product();
        let mut shape = t.shape.clone();
        shape[0] = end - start;
        Tensor::new(shape, t.data[start * per..end * per].to_vec())
    };
    let (mut healthy, mut anomaly) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let d = detect(
            backend,
            cfg,
            unet,
            classifier,
            &part(flair, start, end)?,
            &part(t1, start, end)?,
            &part(noise, start, end)?,
            steps,
            guidance,
            hist_match,
            &mut progress,
        )
        .with_context(|| format!("slices {start}..{end}"))?;
        healthy.extend(d.pseudo_healthy.data);
        anomaly.extend(d.anomaly.data);
    }
    let mut shape = flair.shape.clone();
    let pseudo_healthy = Tensor::new(shape.clone(), healthy)?;
    shape.pop();
    Ok(Detection {
        pseudo_healthy,
        anomaly: Tensor::new(shape, anomaly)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
