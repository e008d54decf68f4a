//! `fcd detect`: FLAIR + T1 slices in, pseudo-healthy FLAIR and anomaly maps out.

use super::Device;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::config::Config;
use crate::cuda::{self, backend::Cuda};
use crate::io::{atomic::Staged, npy};
use crate::model::NetKind;
use crate::pipeline;
use crate::post;
use crate::sampler::Phase;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct DetectArgs {
    /// The diffusion YAML config (unet_config and classifier_config).
    #[arg(long)]
    config: PathBuf,
    /// UNet checkpoint (.pt or .safetensors).
    #[arg(long)]
    unet: PathBuf,
    /// Classifier checkpoint (default: the config's classifier ckpt_path).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// FLAIR slices: .npy float array (B,1,H,W), (B,H,W) or (H,W).
    #[arg(long)]
    flair: PathBuf,
    /// T1 slices on the same grid as the FLAIR.
    #[arg(long)]
    t1: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Initial noise n of the sampler (.npy, the FLAIR's shape); overrides --seed.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Noise level N: inversion steps and guided steps (default: the config's noise_level).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier guidance scale s (default: the config's guide_w).
    #[arg(long)]
    guidance: Option<f64>,
    /// Skip histogram matching (the released code's default).
    #[arg(long)]
    no_hist_match: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

fn read_pair(args: &DetectArgs) -> Result<(npy::Slices, npy::Slices)> {
    let flair = npy::read_slices(&args.flair)?;
    let t1 = npy::read_slices(&args.t1)?;
    ensure!(
        (flair.b, flair.h, flair.w) == (t1.b, t1.h, t1.w),
        "FLAIR {} ({} slices of {} x {}) and T1 {} ({} slices of {} x {}) are not on the same grid",
        args.flair.display(),
        flair.b,
        flair.h,
        flair.w,
        args.t1.display(),
        t1.b,
        t1.h,
        t1.w
    );
    Ok((flair, t1))
}

fn noise(args: &DetectArgs, shape: &[usize]) -> Result<Tensor> {
    let Some(path) = &args.init_noise else {
        return Ok(pipeline::seeded_noise(shape, args.seed));
    };
    let n = npy::read_slices(path)?;
    ensure!(
        [n.b, n.h, n.w, 1] == shape,
        "{}: noise of {} slices of {} x {} for {} slices of {} x {}",
        path.display(),
        n.b,
        n.h,
        n.w,
        shape[0],
        shape[1],
        shape[2]
    );
    if let Some(i) = n.data.iter().position(|v| !v.is_finite()) {
        bail!("{}: non-finite noise value at index {i}", path.display());
    }
    Tensor::new(shape.to_vec(), n.data)
}

fn classifier_path(args: &DetectArgs, cfg: &Config) -> Result<PathBuf> {
    if let Some(p) = &args.classifier {
        return Ok(p.clone());
    }
    match &cfg.classifier.ckpt_path {
        Some(p) => Ok(PathBuf::from(p)),
        None => bail!(
            "no --classifier given and {} has no classifier ckpt_path",
            args.config.display()
        ),
    }
}

pub fn run(args: DetectArgs) -> Result<()> {
    let t_start = Instant::now();
    let cfg = Config::load(&args.config)?;
    let steps = args.steps.unwrap_or(cfg.defaults.noise_level);
    let guidance = args.guidance.unwrap_or(cfg.defaults.guidance);
    ensure!(
        steps >= 1 && steps <= cfg.schedule.timesteps,
        "--steps {steps} must be in 1..={}",
        cfg.schedule.timesteps
    );
    ensure!(
        guidance.is_finite(),
        "--guidance {guidance} is not a finite number"
    );
    let (flair, t1) = read_pair(&args)?;
    let (b, h, w) = (flair.b, flair.h, flair.w);
    let size = cfg.unet.image_size;
    ensure!(
        h == size && w == size,
        "{}: slices of {h} x {w}, but the config's image_size is {size} (resample the input first)",
        args.flair.display()
    );
    // Normalisation runs on the device; checking here too makes a constant
    // or NaN slice fail in milliseconds, before the networks are loaded.
    for (s, path) in [(&flair, &args.flair), (&t1, &args.t1)] {
        post::normalize_batch(&s.data, h * w).with_context(|| path.display().to_string())?;
    }
    let shape = vec![b, h, w, 1];
    let flair_t = Tensor::new(shape.clone(), flair.data)?;
    let t1_t = Tensor::new(shape.clone(), t1.data)?;
    let noise = noise(&args, &shape)?;
    let job = Job {
        args: &args,
        cfg: &cfg,
        flair: flair_t,
        t1: t1_t,
        noise,
        steps,
        guidance,
        t_start,
    };
    match args.device {
        Device::Cpu => execute(&Cpu, "cpu", job),
        Device::Cuda => {
            let gpu = Cuda::new(0).context("--device cuda")?;
            let name = format!("cuda:0 ({})", gpu.gpu().name());
            execute(&gpu, &name, job)
        }
        Device::Auto if cuda::cuda_available() => {
            let gpu = Cuda::new(0).context(
                "--device auto found a GPU but could not use it (--device cpu runs on the CPU)",
            )?;
            let name = format!("cuda:0 ({})", gpu.gpu().name());
            execute(&gpu, &name, job)
        }
        Device::Auto => execute(&Cpu, "cpu", job),
    }
}

/// Validated inputs of a detection run.
struct Job<'a> {
    args: &'a DetectArgs,
    cfg: &'a Config,
    flair: Tensor,
    t1: Tensor,
    noise: Tensor,
    steps: usize,
    guidance: f64,
    t_start: Instant,
}

fn execute<B: Backend>(backend: &B, device: &str, job: Job) -> Result<()> {
    let Job {
        args,
        cfg,
        flair,
        t1,
        noise,
        steps,
        guidance,
        t_start,
    } = job;
    let (b, h, w) = (flair.shape[0], flair.shape[1], flair.shape[2]);
    let t_load = Instant::now();
    let unet = pipeline::load_net(backend, &cfg.unet, NetKind::Unet, &args.unet)?;
    let cls_path = classifier_path(args, cfg)?;
    let classifier = pipeline::load_net(backend, &cfg.classifier, NetKind::Classifier, &cls_path)?;
    let load_s = t_load.elapsed().as_secs_f64();

    // Fail on an unwritable output before the long part, not after it.
    let mut staged = Staged::new(&args.out).with_context(|| {
        format!(
            "{}: cannot prepare the output directory",
            args.out.display()
        )
    })?;

    let bar = ProgressBar::new(2 * steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})",
    )?);
    let t_sample = Instant::now();
    let det = pipeline::detect(
        backend,
        cfg,
        &unet,
        &classifier,
        &flair,
        &t1,
        &noise,
        steps,
        guidance as f32,
        !args.no_hist_match,
        |phase, _| {
            bar.set_message(match phase {
                Phase::Inversion => "inversion",
                Phase::Guided => "guided",
            });
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    let sample_s = t_sample.elapsed().as_secs_f64();

    staged.write(
        "pseudo_healthy.npy",
        &npy::encode_f32(&[b, 1, h, w], &det.pseudo_healthy.data)?,
    )?;
    staged.write(
        "anomaly.npy",
        &npy::encode_f32(&[b, h, w], &det.anomaly.data)?,
    )?;
    let summary = json!({
        "fcd_version": env!("CARGO_PKG_VERSION"),
        "inputs": {
            "config": abs(&args.config), "unet": abs(&args.unet), "classifier": abs(&cls_path),
            "flair": abs(&args.flair), "t1": abs(&args.t1),
            "slices": b, "height": h, "width": w,
        },
        "settings": {
            "steps": steps, "guidance": guidance, "hist_match": !args.no_hist_match,
            "noise": match &args.init_noise { Some(p) => json!({"file": abs(p)}), None => json!({"seed": args.seed}) },
            "device": device, "threads": rayon::current_num_threads(),
            "label": 0,
        },
        "timings_s": { "load": load_s, "sample": sample_s, "total": t_start.elapsed().as_secs_f64() },
        "outputs": { "pseudo_healthy": "pseudo_healthy.npy", "anomaly": "anomaly.npy" },
    });
    staged.write(
        "summary.json",
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    staged.commit()?;
    eprintln!(
        "wrote {} slices to {} in {:.1} s",
        b,
        args.out.display(),
        t_start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn abs(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
