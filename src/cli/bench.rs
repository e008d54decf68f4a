//! `fcd bench`: the throughput of the whole guided sampler on random inputs, with the
//! published checkpoints or random weights ([`Engine::bench`] counts the work); with
//! `--kernels`, in a build with the lab, the kernel tournament (`fcd::lab::tournament`).

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use fcd::engine::{BenchRun, BenchSetup, Device, Engine, Weights};
use fcd::metrics;
use fcd::precision::Precision;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// The diffusion YAML config (unet_config and classifier_config).
    #[arg(long)]
    config: PathBuf,
    /// UNet checkpoint (default: random weights).
    #[arg(long)]
    unet: Option<PathBuf>,
    /// Classifier checkpoint (default: random weights).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Slices per sampler run (default: on a GPU, as many as fit in 80% of
    /// its free memory, at most 64; on the CPU, 1).
    #[arg(long)]
    batch: Option<usize>,
    /// Noise level N of the timed run (N inversion + N guided steps).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Arithmetic of the networks.
    #[arg(long, value_parser = super::choice(&Precision::ALL, Precision::label), default_value_t = Precision::Fp32)]
    precision: Precision,
    #[arg(long, value_parser = super::choice(&Device::ALL, Device::label), default_value_t = Device::Auto)]
    device: Device,
    /// Noise level of the untimed warm-up run (0: none).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Dense peak rate of the device in TFLOP/s: adds the floor (the time the
    /// counted work takes at that rate) and the fraction of it reached.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// One JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Then run the fp32 engine on the same inputs and report the PSNR of
    /// this precision's anomaly maps against its maps (GPU only).
    #[arg(long)]
    fidelity: bool,
    /// Instead of the sampler, the kernel tournament: every convolution
    /// kernel version, attention and GroupNorm on every layer shape of the
    /// config's networks in the bf16, tf32 and fp32 modes, each checked
    /// against its CPU twin, then timed (batch: --batch, default 16).
    #[cfg(feature = "lab")]
    #[arg(long, conflicts_with_all = ["fidelity", "unet", "classifier"])]
    kernels: bool,
    /// The tournament's JSON report; its `winners` are the kernel table
    /// that FCD_KERNEL_TABLE=FILE runs the engine on.
    #[cfg(feature = "lab")]
    #[arg(long, requires = "kernels")]
    out: Option<PathBuf>,
    /// Timed calls per kernel and shape in the tournament (the median is
    /// reported).
    #[cfg(feature = "lab")]
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.batch != Some(0), "--batch must be at least 1");
    #[cfg(feature = "lab")]
    if args.kernels {
        return kernels(&args);
    }
    if let Some(p) = args.peak_tflops {
        ensure!(
            p.is_finite() && p > 0.0,
            "--peak-tflops {p} is not a positive number"
        );
    }
    let engine = |device: Device, precision: Precision| {
        let weights = |given: &Option<PathBuf>, seed| match given {
            Some(p) => Weights::File(p.clone()),
            None => Weights::Random(seed),
        };
        Engine::builder(&args.config)
            .unet_weights(weights(&args.unet, 11))
            .classifier_weights(weights(&args.classifier, 12))
            .device(device)
            .precision(precision)
            .build()
    };
    let e = engine(args.device, args.precision)?;
    let gpu = e.gpu().map(str::to_string);
    ensure!(
        gpu.is_some() || !args.fidelity,
        "--fidelity needs a GPU; the CPU backend computes in fp32 only"
    );
    let setup = BenchSetup {
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
    };
    let run = e.bench(&setup)?;
    drop(e);
    let psnr = if args.fidelity {
        let reference = engine(Device::Cuda, Precision::Fp32)?.bench(&BenchSetup {
            batch: Some(run.batch),
            warmup: 0,
            ..setup
        })?;
        Some(
            metrics::psnr(&reference.anomaly.data, &run.anomaly.data).with_context(|| {
                "the fp32 anomaly maps are constant: no PSNR to report".to_string()
            })?,
        )
    } else {
        None
    };
    report(&args, gpu.as_deref(), &run, psnr)
}

/// `--kernels`: the tournament, its report to --out and a summary.
#[cfg(feature = "lab")]
fn kernels(args: &BenchArgs) -> Result<()> {
    use fcd::backend::cuda;
    use fcd::config::Config;
    use fcd::io::atomic::write_atomic;
    use fcd::lab::tournament::{self, NetLayers};
    ensure!(args.reps >= 1, "--reps must be at least 1");
    ensure!(
        args.device != Device::Cpu,
        "--kernels times the GPU kernels; --device cpu was asked for"
    );
    if let Some(why) = cuda::unavailable_reason() {
        bail!("--kernels needs a GPU: {why}");
    }
    let cfg = Config::load(&args.config)?;
    let opts = tournament::Options {
        ordinal: 0,
        batch: args.batch.unwrap_or(16),
        reps: args.reps,
        precisions: vec![Precision::Bf16, Precision::Tf32, Precision::Fp32],
    };
    let save = |r: &serde_json::Value| match &args.out {
        Some(out) => write_atomic(out, serde_json::to_string_pretty(r)?.as_bytes()),
        None => Ok(()),
    };
    let report = tournament::run(&NetLayers::of_config(&cfg), &opts, save)?;
    let text = serde_json::to_string_pretty(&report)?;
    let failed: Vec<String> = report["convolutions"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            report["attention_and_norm"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .filter(|r| r["valid"] != json!(true))
        .map(|r| r.to_string())
        .collect();
    eprintln!(
        "bf16 GEMM rate {:.1} TFLOP/s; {} shapes with a winner; {} checks failed",
        report["bf16_gemm_tflops"].as_f64().unwrap_or(f64::NAN),
        report["winners"].as_array().map_or(0, Vec::len),
        failed.len()
    );
    for f in &failed {
        eprintln!("failed: {f}");
    }
    if args.out.is_none() {
        println!("{text}");
    }
    ensure!(
        failed.is_empty(),
        "{} kernel checks failed against the CPU twin (listed above)",
        failed.len()
    );
    Ok(())
}

fn report(args: &BenchArgs, gpu: Option<&str>, run: &BenchRun, psnr: Option<f64>) -> Result<()> {
    let device = if gpu.is_some() { "cuda:0" } else { "cpu" };
    let BenchRun {
        batch,
        seconds,
        tflop_per_slice,
        ..
    } = *run;
    let s_per_slice = seconds / batch as f64;
    let achieved = tflop_per_slice / s_per_slice;
    let floor = args.peak_tflops.map(|p| tflop_per_slice / p);
    let mut report = json!({
        "device": device,
        "gpu": gpu,
        "precision": args.precision.label(),
        "batch": batch,
        "steps": args.steps,
        "seconds": seconds,
        "s_per_slice": s_per_slice,
        "slices_per_s": 1.0 / s_per_slice,
        "tflop_per_slice": tflop_per_slice,
        "achieved_tflops": achieved,
    });
    if let Some(f) = floor {
        report["floor_s_per_slice"] = json!(f);
        report["fraction_of_floor"] = json!(f / s_per_slice);
    }
    // Identical maps give an infinite PSNR, which JSON writes as null.
    if let Some(p) = psnr {
        report["fidelity_psnr_db"] = json!(p);
    }

    let mut table = vec![
        format!(
            "device            {device}{}",
            gpu.map(|g| format!(" ({g})")).unwrap_or_default()
        ),
        format!(
            "work              batch {batch}, N = {}, {} ({tflop_per_slice:.4} TFLOP per slice: 2N UNet forwards + N classifier forward and input gradient, counted as 2 forwards)",
            args.steps,
            args.precision.label(),
        ),
        format!("time              {seconds:.3} s, {s_per_slice:.4} s per slice"),
        format!("throughput        {:.3} slices/s", 1.0 / s_per_slice),
        format!("achieved          {achieved:.2} TFLOP/s"),
    ];
    if let (Some(f), Some(p)) = (floor, args.peak_tflops) {
        table.push(format!(
            "floor             {f:.4} s per slice at {p} TFLOP/s: {:.1}% of the floor's speed",
            100.0 * f / s_per_slice
        ));
    }
    if let Some(p) = psnr {
        table.push(format!(
            "fidelity          anomaly-map PSNR {p:.2} dB against the fp32 engine"
        ));
    }
    if args.json {
        for line in &table {
            eprintln!("{line}");
        }
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for line in &table {
            println!("{line}");
        }
    }
    Ok(())
}
