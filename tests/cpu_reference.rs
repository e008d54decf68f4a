//! The CPU reference against the PyTorch fixtures (tools/make_fixtures.py).
//!
//! Fixtures are float64 PyTorch results; `manifest.json` records the float32
//! noise floor of each (rel-L2 of PyTorch float32 vs float64). Single
//! forwards and gradients must be within rel-L2 1e-5 (the floors measured are
//! 1.3e-7 .. 1.4e-6); the chaotic N = 100 sampler within 5x its floor.

mod common;

use common::*;
use fcd::backend::cpu_ref::CpuRef;
use fcd::backend::Backend;
use fcd::ddim::alphas_cumprod;
use fcd::sampler::Sampler;
use fcd::tensor::Tensor;

const SINGLE: f64 = 1e-5;

#[test]
fn schedule_is_bit_exact() {
    let cfg = config();
    let abar = alphas_cumprod(&cfg.schedule);
    let (_, r) = array("schedule_abar.npy");
    assert_eq!(abar.len(), r.len());
    for (i, (&a, &b)) in abar.iter().zip(&r).enumerate() {
        assert_eq!(a, b as f32, "abar[{i}]");
    }
}

#[test]
fn unet_forward() {
    let cfg = config();
    let (unet, _) = nets(&cfg);
    let m = manifest();
    let x = nhwc("unet_in.npy");
    let out = unet
        .unet(&CpuRef, &x, &usizes(&m["unet_t"]), &usizes(&m["unet_y"]))
        .unwrap();
    let (shape, r) = array("unet_out_ref.npy");
    assert_eq!(shape, [2, 1, 32, 32]);
    let e = rel(&out.data, &r);
    println!(
        "unet rel-L2 {e:.3e} (float32 floor {:.3e})",
        floor("unet_out")
    );
    assert!(e <= SINGLE, "unet rel-L2 {e}");
}

#[test]
fn classifier_logits_and_input_gradient() {
    let cfg = config();
    let (_, cls) = nets(&cfg);
    let m = manifest();
    let x = nhwc("cls_in.npy");
    let (logits, grad) = cls
        .classifier_grad(&CpuRef, &x, &usizes(&m["cls_t"]), &[0, 0])
        .unwrap();
    let (_, rl) = array("cls_logits_ref.npy");
    let (_, rg) = array("cls_grad_ref.npy");
    let (el, eg) = (rel(&logits.data, &rl), rel(&grad.data, &rg));
    println!(
        "logits rel-L2 {el:.3e} (floor {:.3e}), grad rel-L2 {eg:.3e} (floor {:.3e})",
        floor("cls_logits"),
        floor("cls_grad")
    );
    assert!(el <= SINGLE, "logits rel-L2 {el}");
    assert!(eg <= SINGLE, "gradient rel-L2 {eg}");
}

fn sampler<'a>(
    unet: &'a fcd::model::Net<CpuRef>,
    cls: &'a fcd::model::Net<CpuRef>,
    steps: usize,
) -> Sampler<'a, CpuRef> {
    Sampler {
        backend: &CpuRef,
        unet,
        classifier: cls,
        abar: alphas_cumprod(&config().schedule),
        steps,
        guidance: 5.0,
    }
}

#[test]
fn one_inversion_step() {
    let cfg = config();
    let (unet, cls) = nets(&cfg);
    let mut x = nhwc("inv_x.npy");
    let t = manifest()["inv_t"].as_u64().unwrap() as usize;
    inversion_step(&sampler(&unet, &cls, 100), &mut x, &nhwc("cond.npy"), t).unwrap();
    let e = rel(&x.data, &array("inv_out_ref.npy").1);
    println!(
        "inversion step rel-L2 {e:.3e} (floor {:.3e})",
        floor("inv_out")
    );
    assert!(e <= SINGLE, "inversion step rel-L2 {e}");
}

#[test]
fn one_guided_step() {
    let cfg = config();
    let (unet, cls) = nets(&cfg);
    let x_in = nhwc("guided_x.npy");
    let mut x = x_in.clone();
    let t = manifest()["guided_t"].as_u64().unwrap() as usize;
    guided_step(&sampler(&unet, &cls, 100), &mut x, &nhwc("cond.npy"), t).unwrap();
    let r = array("guided_out_ref.npy").1;
    let e = rel(&x.data, &r);
    println!(
        "guided step rel-L2 {e:.3e} (floor {:.3e})",
        floor("guided_out")
    );
    assert!(e <= SINGLE, "guided step rel-L2 {e}");
}

fn whole_sampler(steps: usize, factor: f64) {
    let cfg = config();
    let (unet, cls) = nets(&cfg);
    let out = sampler(&unet, &cls, steps)
        .run(
            &nhwc("x0.npy"),
            &nhwc("cond.npy"),
            &nhwc("noise.npy"),
            |_, _| Ok(()),
        )
        .unwrap();
    let r = array(&format!("sampler_n{steps}_ref.npy")).1;
    let e = rel(&out.data, &r);
    let fl = floor(&format!("sampler_n{steps}"));
    println!(
        "sampler N={steps} rel-L2 {e:.3e}, float32 floor {fl:.3e}, ratio {:.2}",
        e / fl
    );
    assert!(
        e <= factor * fl,
        "sampler N={steps}: rel-L2 {e} over {factor} x the float32 floor {fl}"
    );
}

#[test]
fn sampler_n10() {
    whole_sampler(10, 5.0);
}

#[test]
fn sampler_n100() {
    whole_sampler(100, 5.0);
}

/// The switches the published models leave at their other value:
/// `use_scale_shift_norm: false` (the embedding added before GN_out),
/// `use_new_attention_order: true` and UNet heads from `num_head_channels`;
/// float16 checkpoints. Floors: UNet 9.6e-7, logits 8.6e-7, gradient 1.7e-6
/// (tests/fixtures/variant/manifest.json); same 1e-5 bound as above.
#[test]
fn variant_config_forward_and_gradient() {
    let dir = fixture("variant");
    let cfg = fcd::config::Config::load(&dir.join("config.yaml")).unwrap();
    assert!(
        !cfg.unet.use_scale_shift_norm
            && cfg.unet.use_new_attention_order
            && !cfg.classifier.use_scale_shift_norm
    );
    let unet = fcd::model::load_net(
        &CpuRef,
        &cfg.unet,
        fcd::model::NetKind::Unet,
        &dir.join("unet.pt"),
    )
    .unwrap();
    let cls = fcd::model::load_net(
        &CpuRef,
        &cfg.classifier,
        fcd::model::NetKind::Classifier,
        &dir.join("classifier.pt"),
    )
    .unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let out = unet
        .unet(
            &CpuRef,
            &nhwc("variant/unet_in.npy"),
            &usizes(&m["unet_t"]),
            &usizes(&m["unet_y"]),
        )
        .unwrap();
    let eu = rel(&out.data, &array("variant/unet_out_ref.npy").1);
    let (logits, grad) = cls
        .classifier_grad(
            &CpuRef,
            &nhwc("variant/cls_in.npy"),
            &usizes(&m["cls_t"]),
            &[0, 0],
        )
        .unwrap();
    let el = rel(&logits.data, &array("variant/cls_logits_ref.npy").1);
    let eg = rel(&grad.data, &array("variant/cls_grad_ref.npy").1);
    println!("variant: unet rel-L2 {eu:.3e}, logits {el:.3e}, gradient {eg:.3e}");
    assert!(eu <= SINGLE, "unet {eu}");
    assert!(el <= SINGLE, "logits {el}");
    assert!(eg <= SINGLE, "gradient {eg}");
}

/// Zero heads is a shape error on the CPU as on the GPU (it used to divide
/// by zero here).
#[test]
fn attention_refuses_zero_heads() {
    let qkv = Tensor::zeros(&[1, 1, 4, 48]);
    let err = CpuRef.attention(&qkv, 0, false).unwrap_err().to_string();
    assert_eq!(err, "attention: 48 qkv channels for 0 heads");
    let dout = Tensor::zeros(&[1, 1, 4, 16]);
    let err = CpuRef
        .attention_bwd(&qkv, &dout, 0, true)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "attention_bwd: 48 qkv channels for 0 heads");
}
