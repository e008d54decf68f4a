//! `fcd detect`: FLAIR + T1 slices in, pseudo-healthy FLAIR and anomaly maps out.

use anyhow::Result;
use clap::Args;
use fcd::config::Config;
use fcd::engine::{DetectOptions, Device, Progress, Weights};
use fcd::inputs;
use fcd::outputs::{Noise, Output, Run};
use fcd::precision::Precision;
use fcd::sampler::Phase;
use fcd::slices::SliceRange;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct DetectArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// FLAIR: a NIfTI volume (.nii, .nii.gz), a PNG slice, or .npy slices
    /// (B,1,H,W), (B,H,W) or (H,W).
    #[arg(long)]
    flair: PathBuf,
    /// T1 on the same grid as the FLAIR, in the same format.
    #[arg(long)]
    t1: PathBuf,
    /// Lesion mask on the same grid (NIfTI or PNG input): outlined in the overlays.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Axial slices of a NIfTI volume, inclusive.
    #[arg(long, default_value_t = SliceRange::default())]
    slices: SliceRange,
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
    /// Classifier guidance scale s (default: the config's guide_w); may be negative.
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f64>,
    /// Skip histogram matching (the released code's default).
    #[arg(long)]
    no_hist_match: bool,
    #[arg(long, value_parser = super::choice(&Device::ALL, Device::label), default_value_t = Device::Auto)]
    device: Device,
    /// Slices per sampler run (default: on a GPU, as many as fit in 80% of
    /// its free memory, at most 64; on the CPU, all). Results depend on it only through float32 rounding.
    #[arg(long)]
    batch: Option<usize>,
    /// Arithmetic of the networks: fp32 (the parity mode), or bf16 / fp16 on
    /// tensor cores (GPU only).
    #[arg(long, value_parser = super::choice(&Precision::ALL, Precision::label), default_value_t = Precision::Fp32)]
    precision: Precision,
}

pub fn run(args: DetectArgs) -> Result<()> {
    let t_start = Instant::now();
    // Named here, as the flag it is; the engine's own check cannot know where 0 came from.
    anyhow::ensure!(args.batch != Some(0), "--batch must be at least 1");
    // The inputs are checked before the networks load: a bad file fails in milliseconds.
    let size = Config::load(&args.model.config)?.unet.image_size;
    let inputs = inputs::read(
        &args.flair,
        &args.t1,
        args.mask.as_deref(),
        args.slices,
        size,
    )?;
    let noise = args
        .init_noise
        .as_deref()
        .map(|p| inputs::read_noise(p, &inputs.flair.shape))
        .transpose()?;

    let t_load = Instant::now();
    let engine = args.model.engine(args.device, args.precision)?.build()?;
    let load_s = t_load.elapsed().as_secs_f64();

    // Fail on an unwritable output before the long part, not after it.
    let output = Output::create(&args.out)?;
    for line in output.recovered() {
        eprintln!("note: {line}");
    }

    let bar = super::progress_bar("{msg:>10} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})")?;
    let mut progress = |p: Progress| {
        bar.set_length(p.total as u64);
        bar.set_message(match p.phase {
            Phase::Inversion => "inversion",
            Phase::Guided => "guided",
        });
        bar.set_position(p.done as u64);
        // A SIGINT / SIGTERM stops the run here, and unwinding removes the staging folder.
        fcd::io::atomic::interrupted()
    };
    let t_sample = Instant::now();
    let det = engine.detect_prepared(
        &inputs,
        DetectOptions {
            steps: args.steps,
            guidance: args.guidance,
            seed: args.seed,
            noise,
            hist_match: !args.no_hist_match,
            batch: args.batch,
            progress: Some(&mut progress),
            ..Default::default()
        },
    )?;
    bar.finish_and_clear();
    let sample_s = t_sample.elapsed().as_secs_f64();

    let s = inputs.slices();
    let run = Run {
        files: vec![
            ("config", Some(args.model.config.clone())),
            ("unet", Some(file(engine.unet_weights()))),
            ("classifier", Some(file(engine.classifier_weights()))),
            ("flair", Some(args.flair.clone())),
            ("t1", Some(args.t1.clone())),
            ("mask", args.mask.clone()),
        ],
        noise: match &args.init_noise {
            Some(p) => Noise::File(p.clone()),
            None => Noise::Seed(args.seed),
        },
        device: engine.device(),
        timings_s: vec![("load", load_s), ("sample", sample_s)],
        started: Some(t_start),
    };
    output.finish(&inputs, det, &run)?;
    eprintln!(
        "wrote {s} slices to {} in {:.1} s",
        args.out.display(),
        t_start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The checkpoint of weights the engine loaded.
fn file(weights: &Weights) -> PathBuf {
    match weights {
        Weights::File(p) => p.clone(),
        Weights::Random(_) => "random weights".into(),
    }
}
