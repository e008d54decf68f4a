//! `fcd bench` as scripts use it: one JSON line with positive times, and a
//! one-line refusal of the tensor-core precisions on the CPU.

use std::path::Path;
use std::process::{Command, Output};

fn small_config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config_small.yaml")
        .display()
        .to_string()
}

fn bench(extra: &[&str]) -> Output {
    let config = small_config();
    let mut args = vec![
        "bench", "--config", &config, "--device", "cpu", "--batch", "1", "--steps", "1",
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(&args)
        .output()
        .expect("run fcd")
}

#[test]
fn json_line_with_positive_times() {
    let out = bench(&["--json", "--peak-tflops", "100"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim_end().lines().count(), 1, "stdout: {stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(v["device"], "cpu");
    assert!(v["gpu"].is_null());
    assert_eq!(v["precision"], "fp32");
    assert_eq!(v["batch"], 1);
    assert_eq!(v["steps"], 1);
    for key in [
        "seconds",
        "s_per_slice",
        "slices_per_s",
        "tflop_per_slice",
        "achieved_tflops",
        "floor_s_per_slice",
        "fraction_of_floor",
    ] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"));
        assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    }
    let (s, n) = (
        v["s_per_slice"].as_f64().unwrap(),
        v["slices_per_s"].as_f64().unwrap(),
    );
    assert!((s * n - 1.0).abs() < 1e-9);
    let f = v["floor_s_per_slice"].as_f64().unwrap();
    assert!((f - v["tflop_per_slice"].as_f64().unwrap() / 100.0).abs() < 1e-15);
}

#[test]
fn tensor_core_precisions_on_the_cpu_are_one_line() {
    for p in ["tf32", "bf16", "fp16"] {
        let out = bench(&["--precision", p]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {err}");
        assert!(!err.contains("panicked"), "panic: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(
            err.contains(p) && err.contains("need a GPU") && err.contains("fp32 only"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn the_kernel_tournament_on_the_cpu_is_one_line() {
    let out = bench(&["--kernels"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("--kernels") && err.contains("--device cpu"),
        "{err}"
    );
}
