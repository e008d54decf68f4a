//! Issue 10: bad input cannot crash `fcd`, hang it, exhaust its memory or fool it. Every
//! reproducer fails with exit status 1, one stderr line naming the file or key, and leaves
//! nothing in `--out` (no staging folder either).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fcd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(args)
        .output()
        .expect("run fcd")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `fcd detect` on the fixture model and inputs with `config`, writing to `out`.
fn detect(config: &Path, out: &Path, extra: &[&str]) -> Output {
    let (unet, cls) = (fixture("unet.pt"), fixture("classifier.pt"));
    let (flair, t1) = (fixture("flair_raw.npy"), fixture("t1_raw.npy"));
    detect_with(config, &unet, &cls, (&flair, &t1), out, extra)
}

fn detect_with(
    config: &Path,
    unet: &Path,
    cls: &Path,
    (flair, t1): (&Path, &Path),
    out: &Path,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "detect",
        "--config",
        s(config),
        "--unet",
        s(unet),
        "--classifier",
        s(cls),
        "--flair",
        s(flair),
        "--t1",
        s(t1),
        "--out",
        s(out),
        "--device",
        "cpu",
        "--steps",
        "1",
    ];
    args.extend_from_slice(extra);
    fcd(&args)
}

/// Exit status 1, one line naming every one of `names`, no panic.
fn assert_one_line_error(out: &Output, names: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for name in names {
        assert!(err.contains(name), "`{name}` not named in: {err}");
    }
}

/// Neither `out` nor a staging folder beside it exists.
fn assert_nothing_written(out: &Path) {
    assert!(!out.exists(), "{} was created", out.display());
    let parent = out.parent().unwrap();
    let staging: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".staging-"))
        .collect();
    assert!(staging.is_empty(), "left behind: {staging:?}");
}

/// The fixture config with the first `from` replaced by `to`, written into `dir`.
fn config_with(dir: &Path, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(fixture("config_small.yaml")).unwrap();
    assert!(text.contains(from), "{from:?} not in the fixture config");
    let path = dir.join("config.yaml");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

/// (replaced, replacement, names the error must contain)
const BAD_CONFIGS: &[(&str, &str, &[&str])] = &[
    (
        "image_size: 32\n        in_channels: 2",
        "image_size: 65536\n        in_channels: 2",
        &["unet_config.image_size: 65536"],
    ),
    (
        "image_size: 32\n        in_channels: 2",
        "image_size: 0\n        in_channels: 2",
        &["unet_config.image_size: 0"],
    ),
    (
        "timesteps: 1000",
        "timesteps: 1e12",
        &["model.params.timesteps"],
    ),
    (
        "timesteps: 1000",
        "timesteps: .inf",
        &["model.params.timesteps"],
    ),
    (
        "timesteps: 1000",
        "timesteps: \"abc\"",
        &["model.params.timesteps", "not a number"],
    ),
    (
        "num_heads: 2",
        "num_heads: 0",
        &["unet_config.num_heads: 0"],
    ),
    (
        "num_heads: 2",
        "num_heads: 3",
        &["unet_config.num_heads: 3"],
    ),
    (
        "num_heads: 2",
        "num_heads: abc",
        &["unet_config.params.num_heads"],
    ),
    (
        "num_head_channels: 32",
        "num_head_channels: 1024",
        &["classifier_config.num_head_channels: 1024"],
    ),
    (
        "model_channels: 32",
        "model_channels: 48",
        &["unet_config.model_channels: 48"],
    ),
    (
        "channel_mult: [ 1,2,2 ]",
        "channel_mult: [ 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,\
         1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1 ]",
        &["unet_config.channel_mult: 65 levels"],
    ),
    (
        "linear_start: 0.0015\n    linear_end",
        "linear_start: 1.5\n    linear_end",
        &["model.params.linear_start: 1.5"],
    ),
    (
        "linear_start: 0.0015\n    linear_end",
        "linear_start: 0.5\n    linear_end",
        &["model.params.linear_start: 0.5"],
    ),
    (
        "linear_end: 0.0155\n    timesteps",
        "linear_end: .nan\n    timesteps",
        &["model.params.linear_end"],
    ),
    (
        "noise_level: 100",
        "noise_level: 0",
        &["tester.params.noise_level: 0"],
    ),
    (
        "noise_level: 100",
        "noise_level: 2000",
        &["tester.params.noise_level: 2000"],
    ),
    ("guide_w: 5", "guide_w: .inf", &["tester.params.guide_w"]),
    ("guide_w: 5", "guide_w: 1e30", &["tester.params.guide_w"]),
];

#[test]
fn bad_config_values_are_refused_naming_the_key() {
    for (from, to, names) in BAD_CONFIGS {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config_with(tmp.path(), from, to);
        let out = tmp.path().join("o");
        let r = detect(&cfg, &out, &[]);
        let mut all = vec![s(&cfg)];
        all.extend_from_slice(names);
        assert_one_line_error(&r, &all);
        assert_nothing_written(&out);
    }
}

#[test]
fn inspect_refuses_too_many_levels() {
    let tmp = tempfile::tempdir().unwrap();
    let (from, to, names) = BAD_CONFIGS
        .iter()
        .find(|c| c.2[0].contains("channel_mult"))
        .unwrap();
    let cfg = config_with(tmp.path(), from, to);
    let unet = fixture("unet.pt");
    let r = fcd(&["inspect", s(&unet), "--config", s(&cfg), "--net", "unet"]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(names[0]), "{err}");
}

/// `inspect` reports the bad value of the config's classifier, not a layout it guessed.
#[test]
fn inspect_names_a_bad_classifier_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_with(tmp.path(), "num_head_channels: 32", "num_head_channels: 0");
    let cls = fixture("classifier.pt");
    let r = fcd(&[
        "inspect",
        s(&cls),
        "--config",
        s(&cfg),
        "--net",
        "classifier",
    ]);
    assert_one_line_error(&r, &[s(&cfg), "classifier_config.num_head_channels: 0"]);
}

/// A deep YAML nest is refused before the parser sees it, in well under a second.
#[test]
fn deeply_nested_or_huge_yaml_is_refused_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(fixture("config_small.yaml")).unwrap();
    let n = 100_000;
    let flow = format!("{base}\ndeep: {}{}\n", "[".repeat(n), "]".repeat(n));
    let block = format!("{base}\ndeep:\n{}x\n", "- ".repeat(n));
    let huge = format!("{base}\n#{}\n", "x".repeat(2 << 20));
    for (text, reason) in [(flow, "nested"), (block, "nested"), (huge, "larger than")] {
        let cfg = tmp.path().join("config.yaml");
        std::fs::write(&cfg, text).unwrap();
        let out = tmp.path().join("o");
        let t = Instant::now();
        let r = detect(&cfg, &out, &[]);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_one_line_error(&r, &[s(&cfg), reason]);
        assert_nothing_written(&out);
    }
}

/// The fixture UNet as a safetensors file with every value of `tensor` replaced by `value`.
fn unet_with(dir: &Path, tensor: &str, value: f32) -> PathBuf {
    unet_edited(dir, |tensors| {
        // A training checkpoint may keep the UNet under `model.`.
        let key = tensors
            .keys()
            .find(|k| k.ends_with(tensor))
            .expect("tensor")
            .clone();
        tensors.get_mut(&key).unwrap().data.fill(value);
    })
}

/// The fixture UNet, changed by `edit`, as a safetensors file in `dir`.
fn unet_edited(dir: &Path, edit: impl FnOnce(&mut fcd::io::checkpoint::TensorMap)) -> PathBuf {
    let mut tensors = fcd::io::checkpoint::load(&fixture("unet.pt")).unwrap();
    edit(&mut tensors);
    let (mut header, mut data) = (serde_json::Map::new(), Vec::<u8>::new());
    for (name, t) in &tensors {
        let start = data.len();
        data.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    let path = dir.join("unet.safetensors");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    for value in [f32::NAN, f32::INFINITY] {
        let tmp = tempfile::tempdir().unwrap();
        let unet = unet_with(tmp.path(), "out.2.bias", value);
        let out = tmp.path().join("o");
        let (cls, flair, t1) = (
            fixture("classifier.pt"),
            fixture("flair_raw.npy"),
            fixture("t1_raw.npy"),
        );
        let cfg = fixture("config_small.yaml");
        let r = detect_with(&cfg, &unet, &cls, (&flair, &t1), &out, &[]);
        assert_one_line_error(&r, &[s(&unet), "out.2.bias", "non-finite"]);
        assert_nothing_written(&out);
    }
}

/// A finite but huge weight made the noise prediction huge, which the DDIM update's
/// clipping turned into a plausible image (exit 0); it is refused at load. Weights within
/// the bound can still overflow the network: the first non-finite output is named.
#[test]
fn huge_finite_weights_give_no_result() {
    let (tmp, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let big = unet_with(tmp.path(), "out.2.bias", 3e38);
    let scaled = unet_edited(other.path(), |tensors| {
        for t in tensors.values_mut() {
            t.data.iter_mut().for_each(|v| *v *= 1e5);
        }
    });
    let (cls, flair, t1) = (
        fixture("classifier.pt"),
        fixture("flair_raw.npy"),
        fixture("t1_raw.npy"),
    );
    let cfg = fixture("config_small.yaml");
    let out = tmp.path().join("o");
    let r = detect_with(&cfg, &big, &cls, (&flair, &t1), &out, &[]);
    assert_one_line_error(&r, &[s(&big), "out.2.bias", "3e38 beyond the 1e6"]);
    assert_nothing_written(&out);
    let r = detect_with(&cfg, &scaled, &cls, (&flair, &t1), &out, &[]);
    assert_one_line_error(&r, &["the UNet at inversion step 0", "non-finite"]);
    assert_nothing_written(&out);
}

/// A guidance that would overflow the guided step is refused, naming the flag.
#[test]
fn overflowing_guidance_gives_no_result() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let cfg = fixture("config_small.yaml");
    for g in ["1e30", "-1e30"] {
        let r = detect(&cfg, &out, &["--guidance", g]);
        assert_one_line_error(
            &r,
            &[&format!(
                "--guidance {}",
                g.replace("1e30", "1000000000000000000000000000000")
            )],
        );
        assert_nothing_written(&out);
    }
}

#[test]
fn input_whose_range_overflows_float32_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (flair, t1) = (tmp.path().join("flair.npy"), fixture("t1_raw.npy"));
    let t1_slices = fcd::io::npy::read_slices(&t1).unwrap();
    let n = t1_slices.b * t1_slices.h * t1_slices.w;
    let data: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { 3e38 } else { -3e38 })
        .collect();
    fcd::io::npy::write_f32(&flair, &[t1_slices.b, t1_slices.h, t1_slices.w], &data).unwrap();
    let out = tmp.path().join("o");
    let cfg = fixture("config_small.yaml");
    let (unet, cls) = (fixture("unet.pt"), fixture("classifier.pt"));
    let r = detect_with(&cfg, &unet, &cls, (&flair, &t1), &out, &[]);
    assert_one_line_error(&r, &[s(&flair), "overflows float32"]);
    assert_nothing_written(&out);
}

#[test]
fn negative_guidance_is_a_number_not_a_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = detect(&fixture("config_small.yaml"), &out, &["--guidance", "-5"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["settings"]["guidance"], -5.0);
}

/// Found by the fuzz suite: a mistyped value was shown as serde_yaml's debug structure.
#[test]
fn mistyped_value_is_shown_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    for (to, shown) in [
        ("guide_w: { a: 1 }", "a mapping"),
        ("guide_w: [ 1 ]", "a list"),
        ("guide_w: abc", "\"abc\""),
    ] {
        let p = config_with(tmp.path(), "guide_w: 5", to);
        let e = format!("{:#}", fcd::config::Config::load(&p).unwrap_err());
        assert!(
            e.contains(&format!("guide_w: {shown} is not a number")),
            "{e}"
        );
        for debug in ["Mapping", "Sequence", "String("] {
            assert!(!e.contains(debug), "debug structure in: {e}");
        }
    }
}

/// Found by the fuzz suite: the engine's own check said "a batch" without the flag.
#[test]
fn zero_batch_names_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = detect(&fixture("config_small.yaml"), &out, &["--batch", "0"]);
    assert_one_line_error(&r, &["--batch"]);
    assert_nothing_written(&out);
}

/// A destination that cannot be replaced fails the run before any output moves.
#[test]
fn a_blocked_output_moves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    std::fs::create_dir_all(out.join("summary.json")).unwrap();
    // A folder fcd did not write is not replaced, and it is said before any work.
    let r = detect(&fixture("config_small.yaml"), &out, &[]);
    assert_one_line_error(&r, &["o", "holds files fcd did not write"]);
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["summary.json"]);
    assert_nothing_written(&tmp.path().join("absent"));
}

/// SIGTERM in the middle of sampling removes the staging folder and exits 143.
#[test]
fn sigterm_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (unet, cls) = (fixture("unet.pt"), fixture("classifier.pt"));
    let (flair, t1, cfg) = (
        fixture("flair_raw.npy"),
        fixture("t1_raw.npy"),
        fixture("config_small.yaml"),
    );
    #[rustfmt::skip]
    let args = [
        "detect", "--config", s(&cfg), "--unet", s(&unet), "--classifier", s(&cls),
        "--flair", s(&flair), "--t1", s(&t1), "--out", s(&out), "--device", "cpu",
        "--steps", "200",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the run has staged its output (sampling has begun), then stop it.
    let t = Instant::now();
    while !staging_exists(tmp.path()) {
        assert!(t.elapsed() < Duration::from_secs(30), "never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by signal 15"), "{err}");
    assert_nothing_written(&out);
}

fn staging_exists(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".staging-"))
}
