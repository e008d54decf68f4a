//! The fault suite: what a killed, interrupted or doubled run leaves behind. Each case sets
//! up a fault the way clusters and notebooks produce it (a process killed at each step of an
//! output folder's commit, a signal during it, two processes on one folder, a ledger that
//! contradicts itself, a setting changed on resume) and asserts the promise: the folder is
//! complete or absent, the results equal an uninterrupted run's byte for byte, the error is
//! one line naming the folder. The kill points are test hooks of lab builds
//! (`FCD_FAULT_AT`, `FCD_SIGNAL_AT`, `FCD_NO_EXCHANGE` in `src/io/atomic.rs`).

mod common;

use common::fixture;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `fcd` with `args` and the environment variables `vars`.
fn fcd(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fcd"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLURM_")) {
        cmd.env_remove(k);
    }
    cmd.args(args).envs(vars.iter().copied());
    cmd.output().expect("run fcd")
}

/// `fcd detect` of the fixture slices into `out`, with the initial noise of `seed`.
fn detect(out: &Path, seed: &str, vars: &[(&str, &str)]) -> Output {
    let (cfg, unet, cls) = (
        fixture("config_small.yaml"),
        fixture("unet.pt"),
        fixture("classifier.pt"),
    );
    let (flair, t1) = (fixture("flair_raw.npy"), fixture("t1_raw.npy"));
    #[rustfmt::skip]
    let args = [
        "detect", "--config", s(&cfg), "--unet", s(&unet), "--classifier", s(&cls),
        "--flair", s(&flair), "--t1", s(&t1), "--out", s(out), "--device", "cpu",
        "--steps", "2", "--seed", seed,
    ];
    fcd(&args, vars)
}

fn assert_ok(r: &Output) {
    assert!(
        r.status.success(),
        "status {:?}\nstderr: {}",
        r.status,
        String::from_utf8_lossy(&r.stderr)
    );
}

/// Every file under `dir` by relative path, with summary.json's timings left out (they
/// differ from run to run).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let mut bytes = std::fs::read(&p).unwrap();
            if rel == "summary.json" {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                v["timings_s"] = serde_json::Value::Null;
                bytes = v.to_string().into_bytes();
            }
            out.insert(rel, bytes);
        }
    }
    out
}

/// The names beside `dir` (in its parent) other than its own and its lock file's.
fn leftovers(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let lock = format!(".{name}.lock");
    let mut v: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| *n != name && *n != lock && n.contains(&name))
        .collect();
    v.sort();
    v
}

/// The two runs the commit cases swap between, each made once without faults.
struct Runs {
    _tmp: tempfile::TempDir,
    old: BTreeMap<String, Vec<u8>>,
    new: BTreeMap<String, Vec<u8>>,
}

fn runs() -> Runs {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert_ok(&detect(&a, "1", &[]));
    assert_ok(&detect(&b, "2", &[]));
    let (old, new) = (files(&a), files(&b));
    assert_ne!(old, new, "the two seeds give different outputs");
    Runs {
        _tmp: tmp,
        old,
        new,
    }
}

/// A run killed at each step of the commit that replaces a folder leaves the complete old
/// folder or the complete new one (or, between the two renames of a file system without an
/// atomic exchange, the old one aside), never a mixture; the next run on the folder puts
/// back or removes what the killed one left, and writes its own complete folder.
#[test]
fn a_run_killed_at_every_step_of_its_commit() {
    let r = runs();
    let cases = [
        ("commit:staged", false, "old"),
        ("commit:exchanged", false, "new"),
        ("commit:done", false, "new"),
        ("commit:staged", true, "old"),
        ("commit:aside", true, "aside"),
        ("commit:done", true, "new"),
    ];
    for (point, no_exchange, expect) in cases {
        let label = format!("{point} (exchange {})", !no_exchange);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        assert_ok(&detect(&out, "1", &[]));
        let mut vars = vec![("FCD_FAULT_AT", point)];
        if no_exchange {
            vars.push(("FCD_NO_EXCHANGE", "1"));
        }
        let killed = detect(&out, "2", &vars);
        assert!(!killed.status.success(), "{label}: the run was not killed");
        match expect {
            "old" => assert_eq!(files(&out), r.old, "{label}"),
            "new" => assert_eq!(files(&out), r.new, "{label}"),
            _ => {
                assert!(!out.exists(), "{label}");
                let aside = leftovers(&out);
                assert!(aside.iter().any(|n| n.contains(".replaced-")), "{label}");
            }
        }
        // The next run recovers and leaves only its own complete folder.
        let next = detect(&out, "2", &[]);
        assert_ok(&next);
        assert_eq!(files(&out), r.new, "{label}: the next run");
        assert!(leftovers(&out).is_empty(), "{label}: {:?}", leftovers(&out));
        // A kill before the new folder is in place leaves a staging or replaced folder,
        // which the next run names as it removes or restores it.
        let said = String::from_utf8_lossy(&next.stderr);
        if expect != "new" {
            assert!(said.contains("note: "), "{label}: {said}");
        }
    }
    // A first run killed before its commit leaves no folder, and nothing after the next.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert!(!detect(&out, "2", &[("FCD_FAULT_AT", "commit:staged")])
        .status
        .success());
    assert!(!out.exists());
    assert_ok(&detect(&out, "2", &[]));
    assert_eq!(files(&out), r.new);
    assert!(leftovers(&out).is_empty());
}

/// SIGTERM arriving during the commit lets it finish, and the run is a success.
#[test]
fn a_signal_during_the_commit_does_not_fail_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert_ok(&detect(&out, "1", &[]));
    for point in ["commit:staged", "commit:exchanged"] {
        let r = detect(&out, "2", &[("FCD_SIGNAL_AT", point)]);
        assert_ok(&r);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!err.contains("interrupted"), "{point}: {err}");
        assert!(leftovers(&out).is_empty(), "{point}");
    }
}

/// A folder that is not fcd's is never replaced.
#[test]
fn a_folder_of_other_files_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), b"years of work").unwrap();
    let r = detect(&out, "1", &[]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("holds files fcd did not write"), "{err}");
    assert_eq!(
        std::fs::read(out.join("thesis.tex")).unwrap(),
        b"years of work"
    );
}

const SIZE: usize = 32;

/// A small PNG dataset in eval's layout: `n` cases, a bright disc on a grey one.
fn dataset(dir: &Path, n: usize) {
    for i in 0..n {
        let case = dir.join(format!("c{i:02}"));
        std::fs::create_dir_all(&case).unwrap();
        let img = |bright: f64| {
            let data: Vec<u8> = (0..SIZE * SIZE)
                .map(|p| {
                    let (x, y) = ((p % SIZE) as f64, (p / SIZE) as f64);
                    let d = ((x - 10.0 - i as f64).powi(2) + (y - 14.0).powi(2)).sqrt();
                    let r = ((x - 16.0).powi(2) + (y - 16.0).powi(2)).sqrt();
                    let v = if r > 14.0 {
                        0.0
                    } else if d < 3.0 {
                        bright
                    } else {
                        80.0 + 2.0 * (x + y)
                    };
                    v as u8
                })
                .collect();
            image::GrayImage::from_raw(SIZE as u32, SIZE as u32, data).unwrap()
        };
        img(120.0).save(case.join("T1w.png")).unwrap();
        img(250.0).save(case.join("FLAIR.png")).unwrap();
    }
}

fn eval_args<'a>(data: &'a Path, out: &'a Path, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "eval",
        "--config",
        "",
        "--unet",
        "",
        "--classifier",
        "",
        "--data",
        s(data),
        "--out",
        s(out),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(rest);
    args
}

/// `fcd eval` of the fixture model on `data` into `out`.
fn eval(data: &Path, out: &Path, rest: &[&str]) -> Output {
    let paths: Vec<PathBuf> = ["config_small.yaml", "unet.pt", "classifier.pt"]
        .iter()
        .map(|f| fixture(f))
        .collect();
    let mut args = eval_args(data, out, rest);
    for (i, p) in paths.iter().enumerate() {
        args[2 + 2 * i] = s(p);
    }
    fcd(&args, &[])
}

/// A second eval on a folder that one is writing is refused at once, naming the folder and
/// the holder; the first goes on to the results a lone run gives.
#[test]
fn two_evals_on_one_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 3);
    let out = tmp.path().join("out");
    let paths: Vec<PathBuf> = ["config_small.yaml", "unet.pt", "classifier.pt"]
        .iter()
        .map(|f| fixture(f))
        .collect();
    let mut args = eval_args(&data, &out, &["--steps", "40", "--seed", "1"]);
    for (i, p) in paths.iter().enumerate() {
        args[2 + 2 * i] = s(p);
    }
    let mut first = Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first holds the lock once its run.json exists.
    let started = std::time::Instant::now();
    while !out.join("run.json").exists() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first eval never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = eval(&data, &out, &["--steps", "40", "--seed", "2"]);
    let done_first = first.wait().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(s(&out)) && err.contains("another fcd process") && err.contains("PID"),
        "{err}"
    );
    assert!(done_first.success());
    let alone = tmp.path().join("alone");
    assert!(eval(&data, &alone, &["--steps", "40", "--seed", "1"])
        .status
        .success());
    for f in ["slices.csv", "metrics.json", "records.jsonl"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(alone.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// A ledger holding two different records of one slice is refused, naming the lines.
#[test]
fn a_conflicting_record_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 2);
    let out = tmp.path().join("out");
    assert_ok(&eval(&data, &out, &["--steps", "1"]));
    let records = out.join("records.jsonl");
    let text = std::fs::read_to_string(&records).unwrap();
    let first = text.lines().next().unwrap().to_string();
    let mut v: serde_json::Value = serde_json::from_str(&first).unwrap();
    v["predicted"] = serde_json::json!(v["predicted"].as_u64().unwrap() + 1);
    std::fs::write(&records, format!("{text}{v}\n")).unwrap();
    let r = eval(&data, &out, &["--steps", "1"]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("recorded again, differently from line 1") && err.contains("records.jsonl"),
        "{err}"
    );
    // The same record twice is no contradiction.
    std::fs::write(&records, format!("{text}{first}\n")).unwrap();
    assert_ok(&eval(&data, &out, &["--steps", "1"]));
}

/// `--save-maps` is part of a run: resuming a run that saved no maps with it (or the other
/// way round) is refused, naming it, rather than leaving maps of only some slices.
#[test]
fn save_maps_on_resume_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 2);
    for (first, then) in [
        (&[][..], &["--save-maps"][..]),
        (&["--save-maps"][..], &[][..]),
    ] {
        let out = tmp.path().join(format!("out{}", first.len()));
        let args = |extra: &[&'static str]| [&["--steps", "1"][..], extra].concat();
        assert_ok(&eval(&data, &out, &args(first)));
        let r = eval(&data, &out, &args(then));
        assert_eq!(r.status.code(), Some(1));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains("save_maps") && err.contains("--restart"),
            "{err}"
        );
        // With --restart the run starts over and every slice has its map.
        assert_ok(&eval(&data, &out, &args(&[then, &["--restart"]].concat())));
        assert_eq!(out.join("maps").exists(), !then.is_empty());
    }
}

/// Temporary files and staging folders of killed runs are removed by the next run, which
/// says so.
#[test]
fn leftovers_of_killed_runs_are_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 2);
    let out = tmp.path().join("out");
    assert_ok(&eval(&data, &out, &["--steps", "1", "--save-maps"]));
    std::fs::write(out.join(".slices.csv.tmp-99-0"), b"half").unwrap();
    std::fs::write(out.join("maps/.c00.npy.tmp-99-1"), b"half").unwrap();
    let r = eval(&data, &out, &["--steps", "1", "--save-maps"]);
    assert_ok(&r);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.matches("note: removed").count(), 2, "{err}");
    assert!(!out.join(".slices.csv.tmp-99-0").exists());
    assert!(!out.join("maps/.c00.npy.tmp-99-1").exists());

    let det = tmp.path().join("det");
    std::fs::create_dir(tmp.path().join(".det.staging-99-0")).unwrap();
    let r = detect(&det, "1", &[]);
    assert_ok(&r);
    assert!(String::from_utf8_lossy(&r.stderr).contains("note: removed"));
    assert!(leftovers(&det).is_empty());
}
