//! The `fcd` command line as scripts use it: outputs, and one-line errors
//! that leave nothing behind.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fcd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(args)
        .output()
        .expect("run fcd")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An error run: exit code 1, one line on stderr that names `file` and says
/// `reason`, and no panic.
fn assert_one_line_error(out: &Output, file: &str, reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(file), "`{file}` not named in: {err}");
    assert!(
        err.to_lowercase().contains(&reason.to_lowercase()),
        "`{reason}` not in: {err}"
    );
}

fn detect_args<'a>(
    out: &'a str,
    unet: &'a str,
    cls: &'a str,
    flair: &'a str,
    t1: &'a str,
) -> Vec<&'a str> {
    vec![
        "detect",
        "--config",
        cfg_path(),
        "--unet",
        unet,
        "--classifier",
        cls,
        "--flair",
        flair,
        "--t1",
        t1,
        "--out",
        out,
        "--device",
        "cpu",
    ]
}

fn cfg_path() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/config_small.yaml"
    )
}

fn fx(name: &str) -> String {
    fixture(name).to_str().unwrap().to_string()
}

/// The directory holds nothing at all: no outputs and no staging leftovers.
fn assert_empty_dir(dir: &Path) {
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn detect_writes_the_three_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (unet, cls, flair, t1, noise) = (
        fx("unet.pt"),
        fx("classifier.pt"),
        fx("flair_raw.npy"),
        fx("t1_raw.npy"),
        fx("noise.npy"),
    );
    let mut args = detect_args(s(&out), &unet, &cls, &flair, &t1);
    args.extend(["--steps", "10", "--init-noise", &noise]);
    let r = fcd(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let (shape, ph) = fcd::io::npy::read_array(&out.join("pseudo_healthy.npy")).unwrap();
    assert_eq!(shape, [2, 1, 32, 32]);
    let ph32: Vec<f32> = ph.iter().map(|&v| v as f32).collect();
    let e = rel(&ph32, &array("sampler_n10_ref.npy").1);
    // Same tolerance as the sampler test: 5 x the float32 floor.
    assert!(e <= 5.0 * floor("sampler_n10"), "pseudo-healthy rel-L2 {e}");

    let (shape, a) = fcd::io::npy::read_array(&out.join("anomaly.npy")).unwrap();
    assert_eq!(shape, [2, 32, 32]);
    assert!(a.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(a.contains(&1.0), "each map is normalised to a maximum of 1");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["settings"]["steps"], 10);
    assert_eq!(summary["settings"]["hist_match"], true);
    assert_eq!(summary["inputs"]["slices"], 2);
    assert!(summary["timings_s"]["sample"].as_f64().unwrap() > 0.0);
}

/// Slices are sampled independently: one slice per sampler run gives the
/// maps of one run on both.
#[test]
fn detect_in_batches_of_one_matches_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (unet, cls, flair, t1, noise) = (
        fx("unet.pt"),
        fx("classifier.pt"),
        fx("flair_raw.npy"),
        fx("t1_raw.npy"),
        fx("noise.npy"),
    );
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = detect_args(s(&out), &unet, &cls, &flair, &t1);
        args.extend(["--steps", "3", "--init-noise", &noise]);
        args.extend_from_slice(extra);
        let r = fcd(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        let (_, ph) = fcd::io::npy::read_array(&out.join("pseudo_healthy.npy")).unwrap();
        (summary["settings"]["batch"].clone(), ph)
    };
    let (b_all, all) = run("all", &[]);
    let (b_one, one) = run("one", &["--batch", "1"]);
    assert_eq!((b_all, b_one), (serde_json::json!(2), serde_json::json!(1)));
    // The CPU's products do not depend on the batch around a slice; allow
    // float32 rounding should a GEMM split rows differently.
    let e = rel(&one.iter().map(|&v| v as f32).collect::<Vec<_>>(), &all);
    assert!(
        e <= 1e-6,
        "pseudo-healthy rel-L2 {e} between batch 1 and batch 2"
    );
}

#[test]
fn detect_seed_is_reproducible_and_matters() {
    let tmp = tempfile::tempdir().unwrap();
    let (unet, cls, flair, t1) = (
        fx("unet.pt"),
        fx("classifier.pt"),
        fx("flair_raw.npy"),
        fx("t1_raw.npy"),
    );
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let mut args = detect_args(s(&out), &unet, &cls, &flair, &t1);
        args.extend(["--steps", "2", "--seed", seed, "--no-hist-match"]);
        let r = fcd(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read(out.join("pseudo_healthy.npy")).unwrap()
    };
    assert_eq!(run("a", "3"), run("b", "3"));
    assert_ne!(run("a2", "3"), run("c", "4"));
}

#[test]
fn detect_with_the_classifier_as_unet_names_a_missing_key_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (cls, flair, t1) = (fx("classifier.pt"), fx("flair_raw.npy"), fx("t1_raw.npy"));
    let r = fcd(&detect_args(s(&out), &cls, &cls, &flair, &t1));
    assert_one_line_error(&r, "classifier.pt", "missing key `label_emb.weight`");
    assert_empty_dir(tmp.path());
}

#[test]
fn detect_refuses_bad_inputs_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (unet, cls, flair) = (fx("unet.pt"), fx("classifier.pt"), fx("flair_raw.npy"));
    let write = |name: &str, shape: &[usize], data: &[f32]| {
        let p = tmp.path().join(name);
        fcd::io::npy::write_f32(&p, shape, data).unwrap();
        p
    };
    let (_, raw) = array("flair_raw.npy");
    let raw: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            write("grid.npy", &[2, 1, 32, 16], &raw[..1024]),
            "not on the same grid",
        ),
        (
            write("constant.npy", &[2, 32, 32], &vec![3.0; 2048]),
            "constant slice",
        ),
        (
            write("nan.npy", &[2, 32, 32], &{
                let mut v = raw.clone();
                v[100] = f32::NAN;
                v
            }),
            "non-finite",
        ),
    ];
    for (t1, reason) in &cases {
        let r = fcd(&detect_args(s(&out), &unet, &cls, &flair, s(t1)));
        assert_one_line_error(&r, t1.file_name().unwrap().to_str().unwrap(), reason);
        assert!(!out.exists());
    }
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn detect_device_cuda_runs_or_says_why_not() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (unet, cls, flair, t1) = (
        fx("unet.pt"),
        fx("classifier.pt"),
        fx("flair_raw.npy"),
        fx("t1_raw.npy"),
    );
    let mut args = detect_args(s(&out), &unet, &cls, &flair, &t1);
    *args.last_mut().unwrap() = "cuda";
    args.extend(["--steps", "2"]);
    let r = fcd(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    match fcd::backend::cuda::unavailable_reason() {
        Some(reason) => {
            println!("no GPU here ({reason}): checking the error path");
            assert_eq!(r.status.code(), Some(1));
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(
                err.contains("--device cuda") && !err.contains("panicked"),
                "{err}"
            );
            assert_empty_dir(tmp.path());
        }
        None => {
            assert!(r.status.success(), "{err}");
            let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
            assert!(summary.contains("cuda:0"), "{summary}");
        }
    }
}

/// The tensor-core precisions exist on the GPU only: on the CPU, one line
/// that says so, and nothing written.
#[test]
fn detect_bf16_on_the_cpu_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (unet, cls, flair, t1) = (
        fx("unet.pt"),
        fx("classifier.pt"),
        fx("flair_raw.npy"),
        fx("t1_raw.npy"),
    );
    for p in ["tf32", "bf16", "fp16"] {
        let mut args = detect_args(s(&out), &unet, &cls, &flair, &t1);
        args.extend(["--steps", "2", "--precision", p]);
        let r = fcd(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("--precision {p}")) && err.contains("fp32 only"),
            "{err}"
        );
        assert_empty_dir(tmp.path());
    }
}

#[test]
fn inspect_matches_the_fixture_networks() {
    for (file, net) in [("unet.pt", "UNet"), ("classifier.pt", "classifier")] {
        let r = fcd(&["inspect", &fx(file), "--config", cfg_path()]);
        let text = String::from_utf8_lossy(&r.stdout);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(text.contains(&format!("matches the {net}")), "{text}");
    }
}

#[test]
fn inspect_lists_every_mismatch() {
    let r = fcd(&[
        "inspect",
        &fx("classifier.pt"),
        "--config",
        cfg_path(),
        "--net",
        "unet",
    ]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("missing key `label_emb.weight`"), "{text}");
    assert!(
        text.contains("unexpected key `out.2.positional_embedding`"),
        "{text}"
    );
    assert!(text.contains("has shape"), "{text}");
    assert_one_line_error(&r, "classifier.pt", "does not match the UNet");
}

#[test]
fn inspect_refuses_broken_and_hostile_files_in_one_line() {
    for (file, reason) in [
        ("ckpt/truncated.pt", "truncated.pt"),
        (
            "ckpt/random.bin",
            "not a torch.save zip archive nor a safetensors file",
        ),
        ("ckpt/malicious_global.pt", "system"),
        ("ckpt/malicious_stack_global.pt", "not allowed"),
    ] {
        let r = fcd(&["inspect", &fx(file)]);
        assert_one_line_error(
            &r,
            Path::new(file).file_name().unwrap().to_str().unwrap(),
            reason,
        );
    }
}
