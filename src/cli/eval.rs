//! `fcd eval`: a dataset in, per-slice results and the set's metrics (SPEC 8) out.

use crate::engine::Device;
use crate::eval::{self, Job, Settings};
use crate::precision::Precision;
use crate::slices::SliceRange;
use anyhow::{ensure, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Dataset: one folder per slice (*T1w*.png, *FLAIR*.png, optional *roi*.png) or
    /// sub-*/anat/ with *T1w.nii.gz, *FLAIR.nii.gz and optional *FLAIR_roi.nii.gz.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: slices.csv, metrics.json, records.jsonl (resumable), run.json.
    #[arg(long)]
    out: PathBuf,
    /// Noise level N (default: the config's noise_level).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier guidance scale s (default: the config's guide_w).
    #[arg(long)]
    guidance: Option<f64>,
    /// Dice threshold on the anomaly maps (default: the config's th).
    #[arg(long)]
    threshold: Option<f64>,
    /// Peak suppression and recall radius, in pixels of the network grid.
    #[arg(long, default_value_t = 10.0)]
    radius: f64,
    /// Slices per sampler call (default: on a GPU, as many as fit in 80% of
    /// its free memory, at most 64; on the CPU, 8). Results depend on it only through float32 rounding.
    #[arg(long)]
    batch: Option<usize>,
    /// Seed of the initial noise (each slice's noise is seeded by it and the slice id).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Axial slices FIRST:LAST (inclusive) of NIfTI volumes.
    #[arg(long, default_value_t = SliceRange::default())]
    slices: SliceRange,
    /// Skip histogram matching (the released code's default).
    #[arg(long)]
    no_hist_match: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Arithmetic of the networks: fp32 (the parity mode), or bf16 / fp16 on
    /// tensor cores (GPU only).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Discard the results already in --out instead of resuming.
    #[arg(long)]
    restart: bool,
    /// Also write each slice's anomaly map to OUT/maps/<id>.npy.
    #[arg(long)]
    save_maps: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let engine = args.model.engine(args.device, args.precision).build()?;
    let (steps, guidance) = engine.resolve(args.steps, args.guidance)?;
    let threshold = args.threshold.unwrap_or(engine.config().defaults.threshold);
    ensure!(
        (0.0..=1.0).contains(&threshold),
        "--threshold {threshold} must be in [0, 1] (anomaly maps are)"
    );
    ensure!(
        args.radius.is_finite() && args.radius >= 0.0,
        "--radius {} must be a finite number >= 0",
        args.radius
    );
    let job = Job {
        data: &args.data,
        out: &args.out,
        settings: Settings {
            steps,
            guidance,
            hist_match: !args.no_hist_match,
            threshold,
            radius: args.radius,
            seed: args.seed,
            slices: args.slices,
            batch: args.batch,
        },
        restart: args.restart,
        save_maps: args.save_maps,
    };
    let report = eval::run(&engine, &job)?;
    let e = &report.evaluation;
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    println!(
        "evaluated {} slices ({} recorded earlier), {} bad cases skipped",
        report.evaluated,
        report.earlier,
        report.bad_cases.len()
    );
    println!(
        "{} slices, {} with a lesion: R@1 {}, R@5 {}, R@10 {}, Dice@{} {}, best Dice {} at {}",
        e.n_slices,
        e.n_lesion_slices,
        show(e.r_at_1),
        show(e.r_at_5),
        show(e.r_at_10),
        e.threshold,
        show(e.dice_at_threshold),
        show(e.dice_best),
        show(e.best_threshold),
    );
    println!("wrote {}", args.out.join(eval::METRICS_FILE).display());
    Ok(())
}
