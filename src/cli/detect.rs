//! `fcd detect`: FLAIR + T1 slices in, pseudo-healthy FLAIR and anomaly maps out.

use fcd::config::Config;
use fcd::engine::{DetectOptions, Detection, Device, Progress, VolumeDetection, Weights};
use fcd::inputs::{self, Origin, Prepared};
use fcd::io::{absolute, volume};
use fcd::io::{atomic::Staged, npy};
use fcd::precision::Precision;
use fcd::sampler::Phase;
use fcd::slices::SliceRange;
use fcd::{montage, overlay, slices};
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
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
    let mut staged = Staged::new(&args.out).with_context(|| {
        format!(
            "{}: cannot prepare the output directory",
            args.out.display()
        )
    })?;

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

    let outputs = write_maps(&mut staged, &inputs, det)?;
    let s = inputs.slices();
    let summary = json!({
        "fcd_version": env!("CARGO_PKG_VERSION"),
        "inputs": {
            "config": absolute(&args.model.config), "unet": absolute(&file(engine.unet_weights())),
            "classifier": absolute(&file(engine.classifier_weights())),
            "flair": absolute(&args.flair), "t1": absolute(&args.t1), "mask": args.mask.as_deref().map(absolute),
            "slices": s, "height": size, "width": size,
            "slice_range": match &inputs.origin { Origin::Volume { range, .. } => Some(range.to_string()), _ => None },
        },
        "settings": {
            "steps": outputs.steps, "guidance": outputs.guidance, "hist_match": !args.no_hist_match,
            "noise": match &args.init_noise { Some(p) => json!({"file": absolute(p)}), None => json!({"seed": args.seed}) },
            "device": engine.device(), "threads": rayon::current_num_threads(), "batch": outputs.batch,
            "label": 0,
        },
        "timings_s": { "load": load_s, "sample": sample_s, "total": t_start.elapsed().as_secs_f64() },
        "outputs": outputs.files,
        "peaks": outputs.peaks,
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

/// What `write_maps` wrote, for summary.json.
struct Written {
    files: serde_json::Map<String, serde_json::Value>,
    peaks: Vec<serde_json::Value>,
    steps: usize,
    guidance: f64,
    batch: usize,
}

/// The slices a montage may show and the peaks on their grid.
type Shown = (Vec<montage::Slice>, Vec<montage::Peak>);

/// Writes the maps in the input's form: volumes on its grid with an overlay per slice, or
/// `.npy` arrays (with an overlay for a PNG slice); a montage for a volume or a PNG slice.
fn write_maps(staged: &mut Staged, inputs: &Prepared, det: Detection) -> Result<Written> {
    let size = det.anomaly.shape[1];
    let s = inputs.slices();
    let mut files = serde_json::Map::new();
    let (steps, guidance, batch) = (det.steps, det.guidance, det.batch);
    let (peaks, shown): (Vec<serde_json::Value>, Option<Shown>) = match &inputs.origin {
        Origin::Volume {
            flair,
            lesion,
            range,
        } => {
            let vd = VolumeDetection::new(inputs, det)?;
            staged.write(
                "anomaly.nii.gz",
                &volume::encode_like(flair, &vd.anomaly.data)?,
            )?;
            staged.write(
                "pseudo_healthy.nii.gz",
                &volume::encode_like(flair, &vd.pseudo_healthy.data)?,
            )?;
            let [nx, ny, _] = flair.dims;
            let plane = nx * ny;
            let mut shown = Vec::with_capacity(s);
            for z in range.first..=range.last {
                let lesion = lesion.as_ref().map(|l| &l[z * plane..(z + 1) * plane]);
                let slice = shown_slice(
                    &slices::axial(flair, z),
                    &slices::axial(&vd.anomaly, z),
                    lesion,
                    (ny, nx),
                    Some(z),
                )?;
                staged.write(
                    &format!("overlays/slice_{z:03}.png"),
                    &overlay::png(&slice.overlay)?,
                )?;
                shown.push(slice);
            }
            let marks = vd
                .peaks
                .iter()
                .map(|p| montage::Peak {
                    slice: p.slice - range.first,
                    x: p.voxel_x.round() as u32,
                    y: p.voxel_y.round() as u32,
                })
                .collect();
            files.insert("anomaly".into(), json!("anomaly.nii.gz"));
            files.insert("pseudo_healthy".into(), json!("pseudo_healthy.nii.gz"));
            files.insert(
                "overlays".into(),
                json!("overlays/slice_ZZZ.png (the input's grid)"),
            );
            let peaks = vd
                .peaks
                .iter()
                .map(|p| {
                    json!({"slice": p.slice, "voxel_x": p.voxel_x, "voxel_y": p.voxel_y,
                           "world_mm": p.world_mm, "score": p.score, "strength": p.strength})
                })
                .collect();
            (peaks, Some((shown, marks)))
        }
        Origin::Slices | Origin::Png { .. } => {
            staged.write(
                "pseudo_healthy.npy",
                &npy::encode_f32(&[s, 1, size, size], &det.pseudo_healthy.data)?,
            )?;
            staged.write(
                "anomaly.npy",
                &npy::encode_f32(&[s, size, size], &det.anomaly.data)?,
            )?;
            files.insert("pseudo_healthy".into(), json!("pseudo_healthy.npy"));
            files.insert("anomaly".into(), json!("anomaly.npy"));
            let shown = if let Origin::Png {
                height,
                width,
                flair,
                lesion,
            } = &inputs.origin
            {
                let (h, w) = (*height, *width);
                let anomaly = slices::resize_bilinear(&det.anomaly.data, size, size, h, w);
                let slice = shown_slice(flair, &anomaly, lesion.as_deref(), (h, w), None)?;
                staged.write("overlay.png", &overlay::png(&slice.overlay)?)?;
                let marks = det
                    .peaks
                    .iter()
                    .map(|p| {
                        let (x, y) = slices::network_to_voxel(p.row, p.col, size, w, h);
                        montage::Peak {
                            slice: 0,
                            x: x.round() as u32,
                            y: y.round() as u32,
                        }
                    })
                    .collect();
                files.insert("overlay".into(), json!("overlay.png (the PNG's size)"));
                Some((vec![slice], marks))
            } else {
                None
            };
            let peaks = det
                .peaks
                .iter()
                .map(|p| {
                    json!({"slice": p.slice, "row": p.row, "col": p.col, "score": p.score,
                           "strength": p.strength})
                })
                .collect();
            (peaks, shown)
        }
    };
    if let Some((tiles, marks)) = shown {
        let png = overlay::png(&montage::montage(&tiles, &marks)?)?;
        staged.write("montage.png", &png)?;
        files.insert(
            "montage".into(),
            json!(
                "montage.png (overlays of the slices of the strongest peaks and the largest \
                 lesions, the peaks numbered by their rank in peaks)"
            ),
        );
    }
    Ok(Written {
        files,
        peaks,
        steps,
        guidance,
        batch,
    })
}

/// One slice at the input's resolution (`(h, w)`, row-major) ready for the montage, its
/// overlay made of the FLAIR, the anomaly map and the lesion on that grid.
fn shown_slice(
    flair: &[f32],
    anomaly: &[f32],
    lesion: Option<&[bool]>,
    (h, w): (usize, usize),
    label: Option<usize>,
) -> Result<montage::Slice> {
    Ok(montage::Slice {
        overlay: overlay::overlay(flair, anomaly, lesion, h, w)?,
        label,
        lesion_pixels: lesion.map_or(0, |l| l.iter().filter(|&&v| v).count()),
    })
}

/// The checkpoint of weights the engine loaded.
fn file(weights: &Weights) -> PathBuf {
    match weights {
        Weights::File(p) => p.clone(),
        Weights::Random(_) => "random weights".into(),
    }
}
