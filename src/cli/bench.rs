//! `fcd bench`: the throughput of the whole guided sampler (issue 4) on
//! random inputs, with the published checkpoints or random weights.
//!
//! Work per slice: 2N UNet forwards plus N classifier forward + input
//! gradient. The input gradient of a convolution or linear layer is one
//! more product of the forward's size (no weight gradients are taken), so
//! the classifier counts as 2 forwards per step, as SPEC section 6's
//! "about 67 TFLOP at N = 100" does.

use super::Device;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{self, backend::Cuda};
use crate::backend::Backend;
use crate::config::Config;
use crate::ddim::alphas_cumprod;
use crate::metrics;
use crate::model::{random::random_weights, weights, Net, NetKind, NetSpec};
use crate::pipeline;
use crate::precision::Precision;
use crate::sampler::Sampler;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
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
}

pub fn run(args: BenchArgs) -> Result<()> {
    let cfg = Config::load(&args.config)?;
    ensure!(args.batch != Some(0), "--batch must be at least 1");
    for (flag, n) in [("--steps", args.steps), ("--warmup", args.warmup)] {
        ensure!(
            n <= cfg.schedule.timesteps,
            "{flag} {n} exceeds the schedule's {} timesteps",
            cfg.schedule.timesteps
        );
    }
    ensure!(args.steps >= 1, "--steps must be at least 1");
    if let Some(p) = args.peak_tflops {
        ensure!(
            p.is_finite() && p > 0.0,
            "--peak-tflops {p} is not a positive number"
        );
    }
    ensure!(
        cfg.classifier.image_size == cfg.unet.image_size,
        "{}: the UNet's image_size {} and the classifier's {} differ",
        args.config.display(),
        cfg.unet.image_size,
        cfg.classifier.image_size
    );
    let on_gpu = match args.device {
        Device::Cpu => false,
        Device::Cuda => true,
        Device::Auto => cuda::cuda_available(),
    };
    if !on_gpu {
        if args.precision != Precision::Fp32 || args.fidelity {
            bail!(
                "--precision {} and --fidelity need a GPU ({}); the CPU backend computes in fp32 only",
                args.precision,
                cuda::unavailable_reason().unwrap_or_else(|| "--device cpu was asked for".into())
            );
        }
        let run = execute(&Cpu, &args, &cfg)?;
        return report(&args, "cpu", None, &run, None);
    }
    let why = match args.device {
        Device::Cuda => "--device cuda",
        _ => "--device auto found a GPU but could not use it (--device cpu runs on the CPU)",
    };
    let g = Cuda::with_precision(0, args.precision).context(why)?;
    let name = g.gpu().name().to_owned();
    let run = execute(&g, &args, &cfg)?;
    drop(g);
    let psnr = if args.fidelity {
        let g32 = Cuda::new(0).context(why)?;
        let reference = execute(
            &g32,
            &BenchArgs {
                batch: Some(run.batch),
                warmup: 0,
                ..args.clone()
            },
            &cfg,
        )?;
        Some(
            metrics::psnr(&reference.anomaly.data, &run.anomaly.data).with_context(|| {
                "the fp32 anomaly maps are constant: no PSNR to report".to_string()
            })?,
        )
    } else {
        None
    };
    report(&args, "cuda:0", Some(&name), &run, psnr)
}

fn network<B: Backend>(
    backend: &B,
    cfg: &Config,
    kind: NetKind,
    path: Option<&Path>,
    seed: u64,
) -> Result<Net<B>> {
    let net_cfg = match kind {
        NetKind::Unet => &cfg.unet,
        NetKind::Classifier => &cfg.classifier,
    };
    if let Some(p) = path {
        return pipeline::load_net(backend, net_cfg, kind, p);
    }
    let spec = NetSpec::build(net_cfg, kind);
    let w = weights::bind(
        backend,
        &spec,
        &random_weights(&spec, seed),
        "random weights",
    )?;
    Ok(Net { spec, w })
}

/// One timed sampler run and what the report needs from it.
struct Run {
    batch: usize,
    seconds: f64,
    tflop_per_slice: f64,
    /// Anomaly maps of the run (histogram-matched), for `--fidelity`.
    anomaly: Tensor,
}

fn execute<B: Backend>(backend: &B, args: &BenchArgs, cfg: &Config) -> Result<Run> {
    let unet = network(backend, cfg, NetKind::Unet, args.unet.as_deref(), 11)?;
    let classifier = network(
        backend,
        cfg,
        NetKind::Classifier,
        args.classifier.as_deref(),
        12,
    )?;
    let batch = match (args.batch, backend.free_bytes()?) {
        (Some(b), _) => b,
        (None, Some(free)) => pipeline::auto_batch(&unet.spec, &classifier.spec, free),
        (None, None) => 1,
    };
    let s = cfg.unet.image_size;
    let shape = [batch, s, s, 1];
    // Inputs live on the device before the clock starts: the timed part is
    // the sampler and the download of its result, which also waits for the
    // GPU to finish. Noise slices normalised as FLAIR and T1 are.
    let x0 = backend.normalize(&backend.upload(&pipeline::seeded_noise(&shape, 31))?)?;
    let cond = backend.normalize(&backend.upload(&pipeline::seeded_noise(&shape, 32))?)?;
    let noise = backend.upload(&pipeline::seeded_noise(&shape, 33))?;
    let abar = alphas_cumprod(&cfg.schedule);
    let guidance = cfg.defaults.guidance as f32;
    let sampler = |steps| Sampler {
        backend,
        unet: &unet,
        classifier: &classifier,
        abar: abar.clone(),
        steps,
        guidance,
    };
    if args.warmup > 0 {
        backend.download(&sampler(args.warmup).run(&x0, &cond, &noise, |_, _| {})?)?;
    }
    let t0 = Instant::now();
    let xhat = sampler(args.steps).run(&x0, &cond, &noise, |_, _| {})?;
    let out = backend.download(&xhat)?;
    let seconds = t0.elapsed().as_secs_f64();
    ensure!(
        out.data.iter().all(|v| v.is_finite()),
        "the sampler produced non-finite values"
    );
    let anomaly = backend.download(&backend.anomaly(&x0, &xhat, true)?)?;
    let n = args.steps as f64;
    Ok(Run {
        batch,
        seconds,
        tflop_per_slice: (2.0 * n * unet.spec.forward_flops()
            + 2.0 * n * classifier.spec.forward_flops())
            / 1e12,
        anomaly,
    })
}

fn report(
    args: &BenchArgs,
    device: &str,
    gpu: Option<&str>,
    run: &Run,
    psnr: Option<f64>,
) -> Result<()> {
    let Run {
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
