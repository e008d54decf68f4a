//! The paper's full configuration on the GPU (issue 3, point 4): random
//! weights for every parameter, 256 x 256. Prints one JSON object:
//! rel-L2 of one UNet forward and of one classifier input gradient against
//! the CPU reference, and the wall time of the whole N = 100 sampler on a
//! batch of 8; and the two parity figures of the bf16 and fp16 modes.
//! `cargo bench --bench gpu_full_config [-- --steps N --batch B]`

use anyhow::{ensure, Result};
use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::cuda::backend::Cuda;
use fcd::backend::Backend;
use fcd::config::Config;
use fcd::ddim::alphas_cumprod;
use fcd::engine::seeded_noise;
use fcd::model::{random::random_weights, weights, Net, NetKind, NetSpec};
use fcd::precision::Precision;
use fcd::sampler::Sampler;
use fcd::tensor::rel_l2;
use std::path::Path;
use std::time::Instant;

fn net<B: Backend>(b: &B, spec: &NetSpec, seed: u64) -> Result<Net<B>> {
    let w = weights::bind(b, spec, &random_weights(spec, seed), "random weights")?;
    Ok(Net {
        spec: spec.clone(),
        w,
    })
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    if let Some(reason) = fcd::backend::cuda::unavailable_reason() {
        println!("{{\"skipped\": {:?}}}", reason);
        return Ok(());
    }
    let (steps, batch) = (arg("--steps", 100), arg("--batch", 8));
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/published/config_t1_cond_multiclass_cg.yaml");
    let cfg = Config::load(&path)?;
    let g = Cuda::new(0)?;
    let s = cfg.unet.image_size;
    let uspec = NetSpec::build(&cfg.unet, NetKind::Unet);
    let cspec = NetSpec::build(&cfg.classifier, NetKind::Classifier);
    let (gu, gc) = (net(&g, &uspec, 11)?, net(&g, &cspec, 12)?);

    // Parity at batch 1: fresh random input, timestep and label.
    let x2 = seeded_noise(&[1, s, s, 2], 21);
    let x1 = seeded_noise(&[1, s, s, 1], 22);
    let cpu_unet = net(&CpuRef, &uspec, 11)?.unet(&CpuRef, &x2, &[437], &[3])?;
    let (_, cpu_grad) = net(&CpuRef, &cspec, 12)?.classifier_grad(&CpuRef, &x1, &[61], &[0])?;
    // (UNet, gradient) rel-L2 of a GPU backend against the CPU.
    let parity = |b: &Cuda, u: &Net<Cuda>, c: &Net<Cuda>| -> Result<(f64, f64)> {
        let d = b.download(&u.unet(b, &b.upload(&x2)?, &[437], &[3])?)?;
        let (_, gr) = c.classifier_grad(b, &b.upload(&x1)?, &[61], &[0])?;
        Ok((
            rel_l2(&d.data, &cpu_unet.data),
            rel_l2(&b.download(&gr)?.data, &cpu_grad.data),
        ))
    };
    let (unet_rel, grad_rel) = parity(&g, &gu, &gc)?;
    // The tensor-core modes against the same float32 CPU reference.
    let mut fast = serde_json::Map::new();
    for p in [Precision::Tf32, Precision::Bf16, Precision::Fp16] {
        let b = Cuda::with_precision(0, p)?;
        let (u, c) = (net(&b, &uspec, 11)?, net(&b, &cspec, 12)?);
        let (ue, ge) = parity(&b, &u, &c)?;
        fast.insert(
            p.label().into(),
            serde_json::json!({"unet_rel_l2": ue, "grad_rel_l2": ge}),
        );
    }

    // The whole sampler on a batch, timed after a one-step warm-up.
    let sampler = Sampler {
        backend: &g,
        unet: &gu,
        classifier: &gc,
        abar: alphas_cumprod(&cfg.schedule),
        steps,
        guidance: 5.0,
    };
    let x0 = g.upload(&seeded_noise(&[batch, s, s, 1], 31))?;
    let c = g.upload(&seeded_noise(&[batch, s, s, 1], 32))?;
    let n = g.upload(&seeded_noise(&[batch, s, s, 1], 33))?;
    let warm = Sampler {
        backend: &g,
        unet: &gu,
        classifier: &gc,
        abar: sampler.abar.clone(),
        steps: 1,
        guidance: 5.0,
    };
    g.download(&warm.run(&x0, &c, &n, |_, _| Ok(()))?)?;
    let t0 = Instant::now();
    let out = g.download(&sampler.run(&x0, &c, &n, |_, _| Ok(()))?)?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(
        out.data.iter().all(|v| v.is_finite()),
        "the sampler produced non-finite values"
    );
    let tflop =
        steps as f64 * batch as f64 * (2.0 * uspec.forward_flops() + 2.0 * cspec.forward_flops())
            / 1e12;
    println!(
        "{}",
        serde_json::json!({
            "gpu": g.gpu().name(), "unet_rel_l2": unet_rel, "grad_rel_l2": grad_rel,
            "sampler_seconds_batch8": if batch == 8 && steps == 100 { Some(secs) } else { None },
            "steps": steps, "batch": batch, "sampler_seconds": secs,
            "approx_tflop": tflop, "tflop_per_s": tflop / secs, "fast_modes": fast,
        })
    );
    Ok(())
}
