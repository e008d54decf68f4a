//! Wall time of one CPU forward of the paper's UNet and one classifier
//! forward + input gradient at 256 x 256, batch 1, random weights.
//! `cargo bench --bench cpu_forward`

use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::Backend;
use fcd::config::Config;
use fcd::engine::seeded_noise;
use fcd::model::{random::random_weights, weights, Net, NetKind, NetSpec};
use std::path::Path;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/published/config_t1_cond_multiclass_cg.yaml");
    let cfg = Config::load(&path)?;
    let b = CpuRef;
    let s = cfg.unet.image_size;
    println!("threads: {}", rayon::current_num_threads());
    for (kind, nc) in [
        (NetKind::Unet, &cfg.unet),
        (NetKind::Classifier, &cfg.classifier),
    ] {
        let spec = NetSpec::build(nc, kind);
        let w = weights::bind(&b, &spec, &random_weights(&spec, 1), "random")?;
        let net = Net { spec, w };
        let x = b.upload(&seeded_noise(&[1, s, s, nc.in_channels], 2))?;
        let mut times = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            match kind {
                NetKind::Unet => {
                    net.unet(&b, &x, &[10], &[0])?;
                }
                NetKind::Classifier => {
                    net.classifier_grad(&b, &x, &[10], &[0])?;
                }
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let gflop = net.spec.forward_flops() / 1e9;
        let what = if kind == NetKind::Unet {
            "unet forward"
        } else {
            "classifier forward+grad"
        };
        println!("{what:>24}: {:.2} s median of 3 ({gflop:.1} GFLOP forward, {:.1} GFLOP/s on the forward count)", times[1], gflop / times[1]);
    }
    Ok(())
}
