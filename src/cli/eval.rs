//! `fcd eval`: a dataset in, per-slice results and the set's metrics (SPEC 8) out; also a
//! shard of it, the merge of the shards, and their status.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use fcd::config::Config;
use fcd::engine::{self, Device};
use fcd::eval::{self, Event, Job, Maps, Sampling, Settings, Shard};
use fcd::metrics::Evaluation;
use fcd::precision::Precision;
use fcd::slices::SliceRange;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Args)]
// The FLAIR baseline runs no network: --unet is checked here for the diffusion model only.
#[command(mut_arg("unet", |a| a.required(false)))]
pub struct EvalArgs {
    // Absent with --merge and --status, which are exclusive and so waive required arguments.
    #[command(flatten)]
    model: Option<super::ModelArgs>,
    /// Dataset: one folder per slice (*T1w*.png, *FLAIR*.png, optional *roi*.png) or
    /// sub-*/anat/ with *T1w.nii.gz, *FLAIR.nii.gz and optional *FLAIR_roi.nii.gz.
    #[arg(long, required = true)]
    data: Option<PathBuf>,
    /// Output directory: slices.csv, metrics.json, records.jsonl (resumable), run.json.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Run shard K (0-based) of N: only the cases whose id hashes to K (FNV-1a mod N), with
    /// the results in OUT/shards/K-of-N. Default inside a Slurm job array: the array task's
    /// shard.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Merge the finished shards of the sharded evaluation in DIR into DIR/slices.csv and
    /// DIR/metrics.json.
    #[arg(long, value_name = "DIR", exclusive = true)]
    merge: Option<PathBuf>,
    /// Say how far each shard of the sharded evaluation in DIR got.
    #[arg(long, value_name = "DIR", exclusive = true)]
    status: Option<PathBuf>,
    /// The anomaly maps evaluated: the guided diffusion model's, or the naive baseline's,
    /// the FLAIR itself min-max normalised per slice on the network's grid (no checkpoints;
    /// the sampler's flags are ignored).
    #[arg(long, value_enum, default_value_t = AnomalyMap::Diffusion)]
    anomaly_map: AnomalyMap,
    /// Noise level N (default: the config's noise_level).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier guidance scale s (default: the config's guide_w).
    #[arg(long, allow_negative_numbers = true)]
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
    #[arg(long, value_parser = super::choice(&Device::ALL, Device::label), default_value_t = Device::Auto)]
    device: Device,
    /// One sampling worker per entry: `all` (every GPU), GPU ordinals (`0,1,3`), or `cpu`
    /// repeated (`cpu,cpu`: two CPU workers). Results do not depend on it.
    #[arg(long, value_name = "LIST", conflicts_with = "device")]
    devices: Option<Devices>,
    /// Arithmetic of the networks: fp32 (the parity mode), or bf16 / fp16 on
    /// tensor cores (GPU only).
    #[arg(long, value_parser = super::choice(&Precision::ALL, Precision::label), default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Discard the results already in --out instead of resuming.
    #[arg(long)]
    restart: bool,
    /// Also write each slice's anomaly map to OUT/maps/<id>.npy.
    #[arg(long)]
    save_maps: bool,
}

/// `--anomaly-map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AnomalyMap {
    Diffusion,
    Flair,
}

/// `--devices`: where the sampling workers run. CPU and GPU workers are not mixed: their
/// results differ in the last bits, and a run's results must not depend on its workers.
#[derive(Clone, Debug, PartialEq)]
enum Devices {
    AllGpus,
    Gpus(Vec<usize>),
    Cpus(usize),
}

impl FromStr for Devices {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Devices> {
        if s == "all" {
            return Ok(Devices::AllGpus);
        }
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        if entries.iter().all(|e| *e == "cpu") {
            return Ok(Devices::Cpus(entries.len()));
        }
        entries
            .iter()
            .map(|e| e.parse::<usize>())
            .collect::<Result<_, _>>()
            .map(Devices::Gpus)
            .map_err(|_| {
                anyhow::anyhow!(
                    "{s:?}: expected all, GPU ordinals (0,1) or cpu entries (cpu,cpu), not a mix"
                )
            })
    }
}

impl Devices {
    /// One (device, GPU ordinal) per worker.
    fn workers(&self) -> Result<Vec<(Device, usize)>> {
        Ok(match self {
            Devices::AllGpus => {
                let n = engine::gpu_count().context("--devices all")?;
                ensure!(n > 0, "--devices all: the CUDA driver reports no devices");
                (0..n).map(|i| (Device::Cuda, i)).collect()
            }
            Devices::Gpus(ordinals) => ordinals.iter().map(|&i| (Device::Cuda, i)).collect(),
            Devices::Cpus(n) => vec![(Device::Cpu, 0); *n],
        })
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    if let Some(dir) = &args.status {
        return status(dir);
    }
    if let Some(dir) = &args.merge {
        let merged = eval::merge(dir)?;
        println!(
            "merged the shards of {}: {} bad cases",
            dir.display(),
            merged.bad_cases.len()
        );
        summary(&merged.evaluation);
        println!("wrote {}", dir.join(eval::METRICS_FILE).display());
        return Ok(());
    }
    let (Some(model), Some(data), Some(out)) = (&args.model, &args.data, &args.out) else {
        bail!("fcd eval needs --config, --data and --out (or --merge / --status)");
    };
    ensure!(
        args.radius.is_finite() && args.radius >= 0.0,
        "--radius {} must be a finite number >= 0",
        args.radius
    );
    let shard = match args.shard {
        Some(shard) => Some(shard),
        None => Shard::from_slurm(|name| std::env::var(name).ok())?,
    };
    let mut engines = Vec::new();
    let (maps, default_threshold) = match args.anomaly_map {
        AnomalyMap::Diffusion => {
            let workers = match &args.devices {
                Some(list) => list.workers()?,
                None => vec![(args.device, 0)],
            };
            for (device, gpu) in workers {
                engines.push(model.engine(device, args.precision)?.gpu(gpu).build()?);
            }
            let threshold = engines[0].config().defaults.threshold;
            let (steps, guidance) = engines[0].resolve(args.steps, args.guidance)?;
            let sampling = Sampling {
                steps,
                guidance,
                hist_match: !args.no_hist_match,
                seed: args.seed,
            };
            (
                Maps::Diffusion {
                    engines: &mut engines,
                    sampling,
                },
                threshold,
            )
        }
        AnomalyMap::Flair => {
            let config = Config::load(&model.config)?;
            let maps = Maps::Flair {
                config: &model.config,
                image_size: config.unet.image_size,
            };
            (maps, config.defaults.threshold)
        }
    };
    let threshold = args.threshold.unwrap_or(default_threshold);
    ensure!(
        (0.0..=1.0).contains(&threshold),
        "--threshold {threshold} must be in [0, 1] (anomaly maps are)"
    );
    let bar = super::progress_bar("[{bar:40}] {pos}/{len} slices, {elapsed} (eta {eta})")?;
    let job = Job {
        data,
        out,
        settings: Settings {
            threshold,
            radius: args.radius,
            slices: args.slices,
            batch: args.batch,
        },
        restart: args.restart,
        save_maps: args.save_maps,
        shard,
        events: &|e: Event| match e {
            Event::Start { slices } => bar.set_length(slices as u64),
            Event::Skipped {
                case,
                reason,
                slices,
            } => {
                bar.suspend(|| eprintln!("skipped {case}: {reason}"));
                bar.set_length(bar.length().unwrap_or(0).saturating_sub(slices as u64));
            }
            Event::Done { slices } => bar.inc(slices as u64),
            Event::Note(note) => bar.suspend(|| eprintln!("note: {note}")),
        },
    };
    let report = eval::run(maps, &job);
    bar.finish_and_clear();
    let report = report?;
    if let Some(shard) = shard {
        print!("shard {shard}: ");
    }
    println!(
        "evaluated {} slices ({} recorded earlier), {} bad cases skipped",
        report.evaluated,
        report.earlier,
        report.bad_cases.len()
    );
    summary(&report.evaluation);
    println!("wrote {}", job.dir().join(eval::METRICS_FILE).display());
    Ok(())
}

fn summary(e: &Evaluation) {
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
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
}

/// One line per shard, then a total.
fn status(dir: &Path) -> Result<()> {
    let shards = eval::status(dir)?;
    for s in &shards {
        let state = if s.complete {
            "complete"
        } else if s.started {
            "incomplete (running, or stopped: rerun it)"
        } else {
            "not started"
        };
        println!(
            "shard {}: {}/{} slices, {} bad cases, {state}",
            s.shard,
            s.done,
            s.expected,
            s.bad_cases.len()
        );
    }
    let complete = shards.iter().filter(|s| s.complete).count();
    println!(
        "{complete} of {} shards complete{}",
        shards.len(),
        if complete == shards.len() {
            format!(": merge with fcd eval --merge {}", dir.display())
        } else {
            String::new()
        }
    );
    Ok(())
}
