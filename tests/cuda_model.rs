//! The networks, a sampler step and the whole sampler on the GPU, against the
//! PyTorch fixtures with the tolerances the CPU path meets (tests/cpu_reference.rs),
//! and against the CPU backend on the same inputs.

mod common;

use common::*;
use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::cuda::backend::Cuda;
use fcd::backend::Backend;
use fcd::ddim::alphas_cumprod;
use fcd::engine::{DetectOptions, Device, Engine};
use fcd::lab::cuda_ref::CudaRef;
use fcd::model::{Net, NetKind};
use fcd::precision::Precision;
use fcd::sampler::Sampler;
use fcd::tensor::{rel_l2, Tensor};

fn gpu_nets<B: Backend>(g: &B) -> (Net<B>, Net<B>) {
    let cfg = config();
    let unet = fcd::model::load_net(g, &cfg.unet, NetKind::Unet, &fixture("unet.pt")).unwrap();
    let cls = fcd::model::load_net(
        g,
        &cfg.classifier,
        NetKind::Classifier,
        &fixture("classifier.pt"),
    )
    .unwrap();
    (unet, cls)
}

fn up<B: Backend>(g: &B, t: &Tensor) -> B::T {
    g.upload(t).unwrap()
}

fn down<B: Backend>(g: &B, t: &B::T) -> Tensor {
    g.download(t).unwrap()
}

// Single forwards: rel-L2 <= 1e-5 against the float64 PyTorch result, as on
// the CPU (floors 1.3e-7 .. 1.4e-6); GPU and CPU differ only in summation order.
// Measured on an H100 (reports/gpu-tests.json): UNet 7.8e-7, logits 2.0e-7,
// gradient 9.7e-7, inversion step 1.4e-7, guided step 1.1e-7; the N = 10 and
// N = 100 samplers at 0.74 and 0.67 of their float32 floors.
const SINGLE: f64 = 1e-5;

#[gpu_test]
fn gpu_unet_forward() {
    let g = cuda(Precision::Fp32);
    let (unet, _) = gpu_nets(&g);
    let m = manifest();
    let x = nhwc("unet_in.npy");
    let (t, y) = (usizes(&m["unet_t"]), usizes(&m["unet_y"]));
    let out = down(&g, &unet.unet(&g, &up(&g, &x), &t, &y).unwrap());
    let e = rel(&out.data, &array("unet_out_ref.npy").1);
    let (cu, _) = nets(&config());
    let cpu = cu.unet(&CpuRef, &x, &t, &y).unwrap();
    let ec = rel_l2(&out.data, &cpu.data);
    println!("gpu unet: rel-L2 {e:.3e} to PyTorch f64, {ec:.3e} to the CPU backend");
    assert!(e <= SINGLE, "{e}");
    assert!(ec <= SINGLE, "{ec}");
}

/// The fast path (implicit-GEMM convolutions with fused prologues, flash
/// attention) against the GPU oracle, the lab's `CudaRef` (im2col + SGEMM,
/// SIMT attention, one op per kernel), on the same device and weights.
#[gpu_test]
fn gpu_fast_path_matches_reference_backend() {
    let g = cuda(Precision::Fp32);
    let oracle = CudaRef::new(0).expect("the reference backend");
    let m = manifest();
    let x = nhwc("unet_in.npy");
    let (t, y) = (usizes(&m["unet_t"]), usizes(&m["unet_y"]));
    fn unet_of<B: Backend>(b: &B, x: &Tensor, t: &[usize], y: &[usize]) -> Tensor {
        let (unet, _) = gpu_nets(b);
        down(b, &unet.unet(b, &up(b, x), t, y).unwrap())
    }
    let (fast, slow) = (unet_of(&g, &x, &t, &y), unet_of(&oracle, &x, &t, &y));
    let e = rel_l2(&fast.data, &slow.data);
    println!("gpu unet: rel-L2 {e:.3e} to the reference backend");
    assert!(e <= SINGLE, "{e}");
}

#[gpu_test]
fn gpu_classifier_gradient() {
    let g = cuda(Precision::Fp32);
    let (_, cls) = gpu_nets(&g);
    let t = usizes(&manifest()["cls_t"]);
    let (logits, grad) = cls
        .classifier_grad(&g, &up(&g, &nhwc("cls_in.npy")), &t, &[0, 0])
        .unwrap();
    let el = rel(&down(&g, &logits).data, &array("cls_logits_ref.npy").1);
    let eg = rel(&down(&g, &grad).data, &array("cls_grad_ref.npy").1);
    println!("gpu classifier: logits rel-L2 {el:.3e}, gradient rel-L2 {eg:.3e}");
    assert!(el <= SINGLE, "{el}");
    assert!(eg <= SINGLE, "{eg}");
}

fn sampler<'a>(
    g: &'a Cuda,
    unet: &'a Net<Cuda>,
    cls: &'a Net<Cuda>,
    steps: usize,
) -> Sampler<'a, Cuda> {
    Sampler {
        backend: g,
        unet,
        classifier: cls,
        abar: alphas_cumprod(&config().schedule),
        steps,
        guidance: 5.0,
    }
}

#[gpu_test]
fn gpu_sampler_steps() {
    let g = cuda(Precision::Fp32);
    let (unet, cls) = gpu_nets(&g);
    let m = manifest();
    let s = sampler(&g, &unet, &cls, 100);
    let cond = up(&g, &nhwc("cond.npy"));
    let mut x = up(&g, &nhwc("inv_x.npy"));
    inversion_step(&s, &mut x, &cond, m["inv_t"].as_u64().unwrap() as usize).unwrap();
    let ei = rel(&down(&g, &x).data, &array("inv_out_ref.npy").1);
    let mut x = up(&g, &nhwc("guided_x.npy"));
    guided_step(&s, &mut x, &cond, m["guided_t"].as_u64().unwrap() as usize).unwrap();
    let eg = rel(&down(&g, &x).data, &array("guided_out_ref.npy").1);
    println!("gpu steps: inversion rel-L2 {ei:.3e}, guided rel-L2 {eg:.3e}");
    assert!(ei <= SINGLE, "{ei}");
    assert!(eg <= SINGLE, "{eg}");
}

fn whole(steps: usize) {
    let g = cuda(Precision::Fp32);
    let (unet, cls) = gpu_nets(&g);
    let s = sampler(&g, &unet, &cls, steps);
    let (x0, c, n) = (
        up(&g, &nhwc("x0.npy")),
        up(&g, &nhwc("cond.npy")),
        up(&g, &nhwc("noise.npy")),
    );
    let out = down(&g, &s.run(&x0, &c, &n, |_, _| Ok(())).unwrap());
    let e = rel(&out.data, &array(&format!("sampler_n{steps}_ref.npy")).1);
    let fl = floor(&format!("sampler_n{steps}"));
    println!(
        "gpu sampler N={steps}: rel-L2 {e:.3e}, float32 floor {fl:.3e}, ratio {:.2}",
        e / fl
    );
    // The CPU path's tolerance: 5 x the float32 floor.
    assert!(e <= 5.0 * fl, "{e} > 5 x {fl}");
}

#[gpu_test]
fn gpu_sampler_n10() {
    whole(10);
}

#[gpu_test]
fn gpu_sampler_n100() {
    whole(100);
}

#[gpu_test]
fn gpu_detect_matches_cpu_detect() {
    gpu();
    let (flair, t1, noise) = (nhwc("flair_raw.npy"), nhwc("t1_raw.npy"), nhwc("noise.npy"));
    let run = |device| {
        let engine = Engine::builder(fixture("config_small.yaml"))
            .unet(fixture("unet.pt"))
            .device(device)
            .build()
            .unwrap();
        let options = DetectOptions {
            steps: Some(10),
            guidance: Some(5.0),
            noise: Some(noise.clone()),
            ..Default::default()
        };
        engine.detect(flair.clone(), t1.clone(), options).unwrap()
    };
    let (run_g, run_c) = (run(Device::Cuda), run(Device::Cpu));
    let e = rel_l2(&run_g.pseudo_healthy.data, &run_c.pseudo_healthy.data);
    // Both within 5 x floor of PyTorch (floor 5.1e-6 at N = 10), so of each other.
    assert!(
        e <= 10.0 * floor("sampler_n10"),
        "pseudo-healthy GPU vs CPU rel-L2 {e}"
    );
    // Histogram matching truncates to 256 levels, so a 1e-6 change can move a
    // pixel one level: compare maps by mean absolute difference, and require
    // most pixels identical.
    let (a, b) = (&run_g.anomaly.data, &run_c.anomaly.data);
    let mad = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64;
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    println!("gpu detect: pseudo-healthy rel-L2 {e:.3e}; anomaly mean |diff| {mad:.2e}, identical {:.1}%", 100.0 * same);
    assert!(
        mad <= 1e-3 && same >= 0.95,
        "anomaly maps differ: mean |diff| {mad}, identical {same}"
    );
}

/// The sampler's network passes recorded as CUDA graphs and replayed give
/// the same bits as running them kernel by kernel (the same kernels on the
/// same buffers), and the replays do happen.
#[gpu_test]
fn gpu_sampler_graph_replay_is_exact() {
    let g = cuda(Precision::Fp32);
    let (unet, cls) = gpu_nets(&g);
    let (x0, c, n) = (
        up(&g, &nhwc("x0.npy")),
        up(&g, &nhwc("cond.npy")),
        up(&g, &nhwc("noise.npy")),
    );
    let s = sampler(&g, &unet, &cls, 4);
    g.set_graphs(false);
    let direct = down(&g, &s.run(&x0, &c, &n, |_, _| Ok(())).unwrap());
    assert_eq!(g.graph_launches(), 0);
    g.set_graphs(true);
    let replayed = down(&g, &s.run(&x0, &c, &n, |_, _| Ok(())).unwrap());
    // N = 4: 8 UNet passes and 4 classifier passes; each key runs directly
    // once, then every later pass launches its graph (the capturing call
    // too): 7 + 3 launches.
    println!("graph launches: {}", g.graph_launches());
    assert_eq!(
        g.graph_launches(),
        10,
        "the steps were not replayed as graphs"
    );
    assert_eq!(direct.data.len(), replayed.data.len());
    for (i, (a, b)) in direct.data.iter().zip(&replayed.data).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "element {i}: {a} vs {b}");
    }
}
