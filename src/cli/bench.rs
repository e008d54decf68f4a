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
use crate::backend::Backend;
use crate::config::Config;
use crate::cuda::{self, backend::Cuda};
use crate::ddim::alphas_cumprod;
use crate::model::{random::random_weights, weights, Net, NetKind, NetSpec};
use crate::pipeline;
use crate::sampler::Sampler;
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    fn label(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

#[derive(Args)]
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
    /// Slices per sampler run.
    #[arg(long, default_value_t = 8)]
    batch: usize,
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
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.precision != Precision::Fp32 {
        bail!(
            "--precision {} is not implemented yet: the engine runs in fp32 only for now",
            args.precision.label()
        );
    }
    let cfg = Config::load(&args.config)?;
    ensure!(args.batch >= 1, "--batch must be at least 1");
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
    match args.device {
        Device::Cpu => execute(&Cpu, "cpu", None, &args, &cfg),
        Device::Cuda => {
            let g = Cuda::new(0).context("--device cuda")?;
            let name = g.gpu().name().to_owned();
            execute(&g, "cuda:0", Some(&name), &args, &cfg)
        }
        Device::Auto if cuda::cuda_available() => {
            let g = Cuda::new(0).context(
                "--device auto found a GPU but could not use it (--device cpu runs on the CPU)",
            )?;
            let name = g.gpu().name().to_owned();
            execute(&g, "cuda:0", Some(&name), &args, &cfg)
        }
        Device::Auto => execute(&Cpu, "cpu", None, &args, &cfg),
    }
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

fn execute<B: Backend>(
    backend: &B,
    device: &str,
    gpu: Option<&str>,
    args: &BenchArgs,
    cfg: &Config,
) -> Result<()> {
    let unet = network(backend, cfg, NetKind::Unet, args.unet.as_deref(), 11)?;
    let classifier = network(
        backend,
        cfg,
        NetKind::Classifier,
        args.classifier.as_deref(),
        12,
    )?;
    let s = cfg.unet.image_size;
    let shape = [args.batch, s, s, 1];
    // Inputs live on the device before the clock starts: the timed part is
    // the sampler and the download of its result, which also waits for the
    // GPU to finish.
    let x0 = backend.upload(&pipeline::seeded_noise(&shape, 31))?;
    let cond = backend.upload(&pipeline::seeded_noise(&shape, 32))?;
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
    let out = backend.download(&sampler(args.steps).run(&x0, &cond, &noise, |_, _| {})?)?;
    let seconds = t0.elapsed().as_secs_f64();
    ensure!(
        out.data.iter().all(|v| v.is_finite()),
        "the sampler produced non-finite values"
    );

    let n = args.steps as f64;
    let tflop_per_slice =
        (2.0 * n * unet.spec.forward_flops() + 2.0 * n * classifier.spec.forward_flops()) / 1e12;
    let s_per_slice = seconds / args.batch as f64;
    let achieved = tflop_per_slice / s_per_slice;
    let floor = args.peak_tflops.map(|p| tflop_per_slice / p);
    let mut report = json!({
        "device": device,
        "gpu": gpu,
        "precision": args.precision.label(),
        "batch": args.batch,
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

    let mut table = vec![
        format!(
            "device            {device}{}",
            gpu.map(|g| format!(" ({g})")).unwrap_or_default()
        ),
        format!(
            "work              batch {}, N = {}, {} ({:.4} TFLOP per slice: 2N UNet forwards + N classifier forward and input gradient, counted as 2 forwards)",
            args.batch,
            args.steps,
            args.precision.label(),
            tflop_per_slice
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
