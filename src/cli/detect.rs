//! `fcd detect`: FLAIR + T1 slices in, pseudo-healthy FLAIR and anomaly maps out.

use super::device::{run_on, OnBackend};
use super::Device;
use crate::backend::Backend;
use crate::config::Config;
use crate::io::volume::{self, Volume};
use crate::io::{atomic::Staged, npy, png};
use crate::metrics;
use crate::model::NetKind;
use crate::overlay;
use crate::pipeline;
use crate::post;
use crate::precision::Precision;
use crate::sampler::Phase;
use crate::slices::{self, SliceRange};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
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
    /// Classifier guidance scale s (default: the config's guide_w).
    #[arg(long)]
    guidance: Option<f64>,
    /// Skip histogram matching (the released code's default).
    #[arg(long)]
    no_hist_match: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Slices per sampler run (default: on a GPU, as many as fit in 80% of
    /// its free memory, at most 64; on the CPU, all). Results do not depend on it.
    #[arg(long)]
    batch: Option<usize>,
    /// Arithmetic of the networks: fp32 (the parity mode), or bf16 / fp16 on
    /// tensor cores (GPU only).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
}

/// The inputs as the network sees them, and where they came from.
enum Source {
    /// `.npy` slices of the network's size: outputs in .npy.
    Npy,
    /// One PNG slice (resized to the network's size): outputs in .npy plus an overlay.
    Png,
    /// Volumes: outputs on the input's grid, with overlays and peaks.
    Nifti {
        flair: Box<Volume>,
        range: SliceRange,
    },
}

struct Inputs {
    source: Source,
    /// `[S, size, size, 1]` raw intensities (normalised on the device).
    flair: Tensor,
    t1: Tensor,
    /// `S * size * size` lesion pixels, for the overlays.
    mask: Option<Vec<bool>>,
}

fn is_nifti(p: &Path) -> bool {
    let s = p.to_string_lossy().to_lowercase();
    s.ends_with(".nii") || s.ends_with(".nii.gz")
}

fn is_png(p: &Path) -> bool {
    p.to_string_lossy().to_lowercase().ends_with(".png")
}

fn read_inputs(args: &DetectArgs, size: usize) -> Result<Inputs> {
    let (f, t) = (&args.flair, &args.t1);
    ensure!(
        is_nifti(f) == is_nifti(t) && is_png(f) == is_png(t),
        "FLAIR {} and T1 {} are not in the same format",
        f.display(),
        t.display()
    );
    let shape = |s: usize| vec![s, size, size, 1];
    if is_nifti(f) {
        let flair = volume::read_volume(f)?;
        let t1 = volume::read_volume(t)?;
        volume::same_grid(&flair, &t1)?;
        let range = args.slices;
        let s = range.count();
        let mask = match &args.mask {
            Some(m) => {
                let mv = volume::read_volume(m)?;
                volume::same_grid(&flair, &mv)?;
                let net = slices::to_network(&mv, range, size)?;
                ensure!(
                    net.iter().any(|&v| v >= 0.5),
                    "{}: the mask is empty in slices {range}",
                    m.display()
                );
                Some(net.iter().map(|&v| v >= 0.5).collect())
            }
            None => None,
        };
        let fd = slices::to_network(&flair, range, size)?;
        let td = slices::to_network(&t1, range, size)?;
        for (data, path) in [(&fd, f), (&td, t)] {
            for (i, sl) in data.chunks(size * size).enumerate() {
                post::normalize_slice(sl).with_context(|| {
                    format!("{}: axial slice {}", path.display(), range.first + i)
                })?;
            }
        }
        return Ok(Inputs {
            source: Source::Nifti {
                flair: Box::new(flair),
                range,
            },
            flair: Tensor::new(shape(s), fd)?,
            t1: Tensor::new(shape(s), td)?,
            mask,
        });
    }
    if is_png(f) {
        let read = |p: &Path| -> Result<Vec<f32>> {
            let (h, w, v) = png::read_gray(p)?;
            Ok(slices::resize_bilinear(&v, h, w, size, size))
        };
        let (fh, fw, _) = png::read_gray(f)?;
        let (th, tw, _) = png::read_gray(t)?;
        ensure!(
            (fh, fw) == (th, tw),
            "FLAIR {} ({fh} x {fw}) and T1 {} ({th} x {tw}) are not on the same grid",
            f.display(),
            t.display()
        );
        let (fd, td) = (read(f)?, read(t)?);
        for (data, path) in [(&fd, f), (&td, t)] {
            post::normalize_slice(data).with_context(|| path.display().to_string())?;
        }
        let mask = match &args.mask {
            Some(m) => {
                let v = read(m)?;
                ensure!(
                    v.iter().any(|&x| x >= 0.5),
                    "{}: the mask is empty",
                    m.display()
                );
                Some(v.iter().map(|&x| x >= 0.5).collect())
            }
            None => None,
        };
        return Ok(Inputs {
            source: Source::Png,
            flair: Tensor::new(shape(1), fd)?,
            t1: Tensor::new(shape(1), td)?,
            mask,
        });
    }
    ensure!(args.mask.is_none(), "--mask needs NIfTI or PNG input");
    let flair = npy::read_slices(f)?;
    let t1 = npy::read_slices(t)?;
    ensure!(
        (flair.b, flair.h, flair.w) == (t1.b, t1.h, t1.w),
        "FLAIR {} ({} slices of {} x {}) and T1 {} ({} slices of {} x {}) are not on the same grid",
        f.display(),
        flair.b,
        flair.h,
        flair.w,
        t.display(),
        t1.b,
        t1.h,
        t1.w
    );
    ensure!(
        flair.h == size && flair.w == size,
        "{}: slices of {} x {}, but the config's image_size is {size} (resample the input first)",
        f.display(),
        flair.h,
        flair.w
    );
    // Normalisation runs on the device; checking here too makes a constant
    // or NaN slice fail in milliseconds, before the networks are loaded.
    for (sl, path) in [(&flair, f), (&t1, t)] {
        post::normalize_batch(&sl.data, size * size).with_context(|| path.display().to_string())?;
    }
    Ok(Inputs {
        source: Source::Npy,
        flair: Tensor::new(shape(flair.b), flair.data)?,
        t1: Tensor::new(shape(t1.b), t1.data)?,
        mask: None,
    })
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

pub fn run(args: DetectArgs) -> Result<()> {
    let t_start = Instant::now();
    let cfg = Config::load(&args.model.config)?;
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
    let inputs = read_inputs(&args, cfg.unet.image_size)?;
    let noise = noise(&args, &inputs.flair.shape)?;
    let (device, precision) = (args.device, args.precision);
    run_on(
        device,
        precision,
        Job {
            args: &args,
            cfg: &cfg,
            inputs,
            noise,
            steps,
            guidance,
            t_start,
        },
    )
}

/// Validated inputs of a detection run.
struct Job<'a> {
    args: &'a DetectArgs,
    cfg: &'a Config,
    inputs: Inputs,
    noise: Tensor,
    steps: usize,
    guidance: f64,
    t_start: Instant,
}

/// The strongest peaks of every slice, as (score, slice index, row, col).
fn strongest_peaks(
    anomaly: &[f32],
    size: usize,
    per_slice: usize,
    most: usize,
) -> Vec<(f32, usize, usize, usize)> {
    let mut all: Vec<(f32, usize, usize, usize)> = anomaly
        .chunks(size * size)
        .enumerate()
        .flat_map(|(s, a)| {
            metrics::peaks(a, size, size, per_slice, 10.0)
                .into_iter()
                .map(move |(r, c)| (a[r * size + c], s, r, c))
        })
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    all.truncate(most);
    all
}

impl OnBackend for Job<'_> {
    type Output = ();

    fn run<B: Backend>(self, backend: &B, device: &str) -> Result<()> {
        let Job {
            args,
            cfg,
            inputs,
            noise,
            steps,
            guidance,
            t_start,
        } = self;
        let size = cfg.unet.image_size;
        let s = inputs.flair.shape[0];
        let t_load = Instant::now();
        let unet = pipeline::load_net(backend, &cfg.unet, NetKind::Unet, &args.model.unet)?;
        let cls_path =
            super::classifier_path(args.model.classifier.as_deref(), cfg, &args.model.config)?;
        let classifier =
            pipeline::load_net(backend, &cfg.classifier, NetKind::Classifier, &cls_path)?;
        let load_s = t_load.elapsed().as_secs_f64();

        // Fail on an unwritable output before the long part, not after it.
        let mut staged = Staged::new(&args.out).with_context(|| {
            format!(
                "{}: cannot prepare the output directory",
                args.out.display()
            )
        })?;

        let batch = match (args.batch, backend.free_bytes()?) {
            (Some(b), _) => b,
            (None, Some(free)) => pipeline::auto_batch(&unet.spec, &classifier.spec, free),
            (None, None) => s.max(1),
        };
        ensure!(batch >= 1, "--batch must be at least 1");
        let runs = s.div_ceil(batch).max(1);
        let bar = ProgressBar::new((2 * steps * runs) as u64);
        bar.set_style(ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} steps, {elapsed} (eta {eta})",
        )?);
        let t_sample = Instant::now();
        let det = pipeline::detect_batched(
            backend,
            cfg,
            &unet,
            &classifier,
            &inputs.flair,
            &inputs.t1,
            &noise,
            steps,
            guidance as f32,
            !args.no_hist_match,
            batch,
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

        let hw = size * size;
        let overlay = |staged: &mut Staged, name: &str, i: usize| -> Result<()> {
            let mask = inputs.mask.as_ref().map(|m| &m[i * hw..(i + 1) * hw]);
            let png = overlay::overlay_png(
                &inputs.flair.data[i * hw..(i + 1) * hw],
                &det.anomaly.data[i * hw..(i + 1) * hw],
                mask,
                size,
                size,
            )?;
            staged.write(name, &png)
        };
        let peaks = strongest_peaks(&det.anomaly.data, size, 3, 20);
        let mut outputs = serde_json::Map::new();
        let peak_list: Vec<serde_json::Value> = match &inputs.source {
            Source::Nifti { flair, range } => {
                let [nx, ny, _] = flair.dims;
                // The pseudo-healthy FLAIR goes back to each slice's intensity
                // range (the inverse of the slice normalisation).
                let mut ph = det.pseudo_healthy.data.clone();
                for (p, raw) in ph.chunks_mut(hw).zip(inputs.flair.data.chunks(hw)) {
                    let (lo, hi) = raw
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                            (a.min(v), b.max(v))
                        });
                    p.iter_mut()
                        .for_each(|v| *v = (*v / 2.0 + 0.5) * (hi - lo) + lo);
                }
                staged.write(
                    "anomaly.nii.gz",
                    &volume::encode_like(
                        flair,
                        &slices::from_network(&det.anomaly.data, size, flair.dims, *range),
                    )?,
                )?;
                staged.write(
                    "pseudo_healthy.nii.gz",
                    &volume::encode_like(
                        flair,
                        &slices::from_network(&ph, size, flair.dims, *range),
                    )?,
                )?;
                for i in 0..s {
                    overlay(
                        &mut staged,
                        &format!("overlays/slice_{:03}.png", range.first + i),
                        i,
                    )?;
                }
                outputs.insert("anomaly".into(), json!("anomaly.nii.gz"));
                outputs.insert("pseudo_healthy".into(), json!("pseudo_healthy.nii.gz"));
                outputs.insert(
                    "overlays".into(),
                    json!("overlays/slice_ZZZ.png (network grid)"),
                );
                peaks
                    .iter()
                    .map(|&(score, i, r, c)| {
                        let z = range.first + i;
                        let (x, y) = slices::network_to_voxel(r, c, size, nx, ny);
                        let w = volume::world(&flair.affine, [x, y, z as f64]);
                        json!({"slice": z, "voxel_x": x, "voxel_y": y, "world_mm": w, "score": score})
                    })
                    .collect()
            }
            Source::Npy | Source::Png => {
                staged.write(
                    "pseudo_healthy.npy",
                    &npy::encode_f32(&[s, 1, size, size], &det.pseudo_healthy.data)?,
                )?;
                staged.write(
                    "anomaly.npy",
                    &npy::encode_f32(&[s, size, size], &det.anomaly.data)?,
                )?;
                outputs.insert("pseudo_healthy".into(), json!("pseudo_healthy.npy"));
                outputs.insert("anomaly".into(), json!("anomaly.npy"));
                if matches!(inputs.source, Source::Png) {
                    overlay(&mut staged, "overlay.png", 0)?;
                    outputs.insert("overlay".into(), json!("overlay.png"));
                }
                peaks
                    .iter()
                    .map(
                        |&(score, i, r, c)| json!({"slice": i, "row": r, "col": c, "score": score}),
                    )
                    .collect()
            }
        };
        let summary = json!({
            "fcd_version": env!("CARGO_PKG_VERSION"),
            "inputs": {
                "config": abs(&args.model.config), "unet": abs(&args.model.unet), "classifier": abs(&cls_path),
                "flair": abs(&args.flair), "t1": abs(&args.t1), "mask": args.mask.as_deref().map(abs),
                "slices": s, "height": size, "width": size,
                "slice_range": match &inputs.source { Source::Nifti { range, .. } => Some(range.to_string()), _ => None },
            },
            "settings": {
                "steps": steps, "guidance": guidance, "hist_match": !args.no_hist_match,
                "noise": match &args.init_noise { Some(p) => json!({"file": abs(p)}), None => json!({"seed": args.seed}) },
                "device": device, "threads": rayon::current_num_threads(), "batch": batch,
                "label": 0,
            },
            "timings_s": { "load": load_s, "sample": sample_s, "total": t_start.elapsed().as_secs_f64() },
            "outputs": outputs,
            "peaks": peak_list,
        });
        staged.write(
            "summary.json",
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        staged.commit()?;
        eprintln!(
            "wrote {s} slices to {} in {:.1} s",
            args.out.display(),
            t_start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

fn abs(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
