//! `fcd eval` end to end on small PNG and NIfTI datasets made here, with the small fixture
//! model: outputs, bad cases reported, metrics equal to `metrics::evaluate` on the saved maps,
//! resumption, and the same files from shards merged and from several workers.

mod common;

use common::{fixture, gpu, gpu_test};
use fcd::io::volume::{self, Volume};
use fcd::metrics;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SIZE: usize = 32;

fn fcd(args: &[&str]) -> Output {
    fcd_env(args, &[])
}

/// `fcd` with these environment variables, and none of Slurm's (the tests may run in a job).
fn fcd_env(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fcd"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLURM_")) {
        cmd.env_remove(k);
    }
    cmd.args(args)
        .envs(vars.iter().copied())
        .output()
        .expect("run fcd")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
}

/// `fcd eval` on the fixture model with `--steps 2` on the CPU, plus `extra`.
fn eval(data: &Path, out: &Path, extra: &[&str]) -> Output {
    eval_env(data, out, extra, &[])
}

fn eval_env(data: &Path, out: &Path, extra: &[&str], vars: &[(&str, &str)]) -> Output {
    let (cfg, unet, cls) = (
        fixture("config_small.yaml"),
        fixture("unet.pt"),
        fixture("classifier.pt"),
    );
    let mut args = vec![
        "eval",
        "--config",
        s(&cfg),
        "--unet",
        s(&unet),
        "--classifier",
        s(&cls),
        "--data",
        s(data),
        "--out",
        s(out),
        "--steps",
        "2",
    ];
    if !extra.contains(&"--devices") {
        args.extend(["--device", "cpu"]);
    }
    args.extend_from_slice(extra);
    fcd_env(&args, vars)
}

/// A skull-stripped-looking FLAIR: texture inside a disc, a bright blob at `lesion`.
fn flair_image(w: usize, h: usize, lesion: Option<(f64, f64)>) -> Vec<f32> {
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let mut v = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64, y as f64);
            if (fx - cx).hypot(fy - cy) > 0.45 * w as f64 {
                continue;
            }
            let mut val = 90.0 + 40.0 * (fx / 5.0).sin() * (fy / 7.0).cos();
            if let Some((lx, ly)) = lesion {
                if (fx - lx).hypot(fy - ly) <= 4.0 {
                    val += 100.0;
                }
            }
            v[y * w + x] = val as f32;
        }
    }
    v
}

fn t1_image(w: usize, h: usize) -> Vec<f32> {
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f64, (i / w) as f64);
            if (x - cx).hypot(y - cy) > 0.45 * w as f64 {
                0.0
            } else {
                (80.0 + 30.0 * (x / 6.0 + y / 9.0).cos()) as f32
            }
        })
        .collect()
}

fn roi_image(w: usize, h: usize, lesion: (f64, f64)) -> Vec<f32> {
    (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f64, (i / w) as f64);
            if (x - lesion.0).hypot(y - lesion.1) <= 4.0 {
                255.0
            } else {
                0.0
            }
        })
        .collect()
}

fn write_png(path: &Path, v: &[f32]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let bytes: Vec<u8> = v
        .iter()
        .map(|&x| x.round().clamp(0.0, 255.0) as u8)
        .collect();
    image::GrayImage::from_raw(SIZE as u32, SIZE as u32, bytes)
        .unwrap()
        .save(path)
        .unwrap();
}

const LESIONS: [(&str, (f64, f64)); 3] = [
    ("p01", (12.0, 12.0)),
    ("p02", (20.0, 14.0)),
    ("p03", (15.0, 21.0)),
];

/// Three lesion slices, one healthy slice, and three folders that cannot be evaluated: one
/// without its T1w, one with a constant FLAIR, one with an all-zero mask.
fn png_dataset(dir: &Path) {
    for (id, at) in LESIONS {
        let d = dir.join(id);
        write_png(&d.join(format!("{id}_T1w.png")), &t1_image(SIZE, SIZE));
        write_png(
            &d.join(format!("{id}_FLAIR.png")),
            &flair_image(SIZE, SIZE, Some(at)),
        );
        write_png(
            &d.join(format!("{id}_FLAIR_roi.png")),
            &roi_image(SIZE, SIZE, at),
        );
    }
    let d = dir.join("h01");
    write_png(&d.join("h01_T1w.png"), &t1_image(SIZE, SIZE));
    write_png(&d.join("h01_FLAIR.png"), &flair_image(SIZE, SIZE, None));
    write_png(
        &dir.join("nomod/nomod_FLAIR.png"),
        &flair_image(SIZE, SIZE, None),
    );
    let d = dir.join("constant");
    write_png(&d.join("constant_T1w.png"), &t1_image(SIZE, SIZE));
    write_png(&d.join("constant_FLAIR.png"), &vec![7.0; SIZE * SIZE]);
    let d = dir.join("blank");
    write_png(&d.join("blank_T1w.png"), &t1_image(SIZE, SIZE));
    write_png(
        &d.join("blank_FLAIR.png"),
        &flair_image(SIZE, SIZE, Some((16.0, 16.0))),
    );
    write_png(&d.join("blank_roi.png"), &vec![0.0; SIZE * SIZE]);
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_map(out: &Path, id: &str) -> Vec<f32> {
    let (shape, v) = fcd::io::npy::read_array(&out.join(format!("maps/{id}.npy"))).unwrap();
    assert_eq!(shape, [SIZE, SIZE]);
    v.into_iter().map(|x| x as f32).collect()
}

fn close(a: &Value, b: Option<f64>) -> bool {
    match (a.as_f64(), b) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12,
        (None, None) => a.is_null(),
        _ => false,
    }
}

/// metrics.json agrees with `metrics::evaluate` on the saved maps and these masks (in id order).
fn assert_metrics_match(out: &Path, ids: &[String], masks: &[Vec<bool>]) {
    let maps: Vec<Vec<f32>> = ids.iter().map(|id| read_map(out, id)).collect();
    let map_refs: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
    let mask_refs: Vec<&[bool]> = masks.iter().map(|m| m.as_slice()).collect();
    let (want, records) = metrics::evaluate(&map_refs, &mask_refs, SIZE, SIZE, 0.4, 10.0);
    let m = json(&out.join("metrics.json"));
    assert_eq!(m["n_slices"], want.n_slices);
    assert_eq!(m["n_lesion_slices"], want.n_lesion_slices);
    assert_eq!(m["threshold"], 0.4);
    assert_eq!(m["radius"], 10.0);
    for (key, v) in [
        ("dice_at_threshold", want.dice_at_threshold),
        ("dice_best", want.dice_best),
        ("best_threshold", want.best_threshold),
        ("r_at_1", want.r_at_1),
        ("r_at_5", want.r_at_5),
        ("r_at_10", want.r_at_10),
    ] {
        assert!(close(&m[key], v), "{key}: {} vs {v:?}", m[key]);
    }
    // slices.csv: sorted by id, one row per slice, cells matching the per-slice records.
    let csv = std::fs::read_to_string(out.join("slices.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,lesion,dice,nearest_1,nearest_5,nearest_10,recalled_1,recalled_5,recalled_10"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), ids.len());
    for ((row, id), rec) in rows.iter().zip(ids).zip(&records) {
        assert_eq!(row[0], id);
        assert_eq!(row[1], rec.lesion_pixels.to_string());
        let cell = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let flag = |v: Option<bool>| v.map(|v| u8::from(v).to_string()).unwrap_or_default();
        assert_eq!(row[2], cell(rec.dice), "{id}");
        assert_eq!(row[3], cell(rec.distance_at_1), "{id}");
        assert_eq!(row[5], cell(rec.distance_at_10), "{id}");
        assert_eq!(row[6], flag(rec.recalled_at_1), "{id}");
        assert_eq!(row[8], flag(rec.recalled_at_10), "{id}");
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn eval_png_dataset_reports_bad_cases_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    png_dataset(&data);
    let out = tmp.path().join("out");

    let r = eval(&data, &out, &["--save-maps", "--batch", "3"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 4 slices (0 recorded earlier), 3 bad cases skipped"),
        "{}",
        stdout(&r)
    );
    let err = stderr(&r);
    assert!(
        err.contains("skipped nomod: missing modality: no T1w"),
        "{err}"
    );
    assert!(err.contains("skipped constant: "), "{err}");

    let m = json(&out.join("metrics.json"));
    let mut keys: Vec<&str> = m.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "anomaly_map",
            "bad_cases",
            "best_threshold",
            "dice_at_threshold",
            "dice_best",
            "n_bad_cases",
            "n_lesion_slices",
            "n_slices",
            "r_at_1",
            "r_at_10",
            "r_at_5",
            "radius",
            "threshold"
        ]
    );
    assert_eq!(m["anomaly_map"], "diffusion");
    assert_eq!(m["n_slices"], 4);
    assert_eq!(m["n_lesion_slices"], 3);
    assert_eq!(m["n_bad_cases"], 3);
    let bad = m["bad_cases"].as_array().unwrap();
    let reason = |i: usize| bad[i]["reason"].as_str().unwrap();
    let bad_ids: Vec<&str> = bad.iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(bad_ids, ["blank", "constant", "nomod"]);
    assert!(
        reason(0).contains("empty mask") && reason(0).contains("blank_roi.png"),
        "{}",
        reason(0)
    );
    assert!(
        reason(1).contains("constant_FLAIR.png") && reason(1).contains("constant slice"),
        "{}",
        reason(1)
    );
    assert!(reason(2).contains("missing modality"), "{}", reason(2));

    let ids: Vec<String> = ["h01", "p01", "p02", "p03"].map(String::from).to_vec();
    let mut masks = vec![vec![false; SIZE * SIZE]];
    for (_, at) in LESIONS {
        masks.push(roi_image(SIZE, SIZE, at).iter().map(|&v| v > 0.0).collect());
    }
    assert_metrics_match(&out, &ids, &masks);
    let records = out.join("records.jsonl");
    let first = lines(&records);
    assert_eq!(first.len(), 4);
    let metrics_first = std::fs::read(out.join("metrics.json")).unwrap();

    // A rerun finds everything recorded: no sampling, same outputs.
    let r = eval(&data, &out, &["--save-maps"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 0 slices (4 recorded earlier), 3 bad cases skipped"),
        "{}",
        stdout(&r)
    );
    assert_eq!(lines(&records), first);
    assert_eq!(
        std::fs::read(out.join("metrics.json")).unwrap(),
        metrics_first
    );

    // A partial line left by a killed run is dropped, not an error.
    let mut text = first.join("\n") + "\n";
    std::fs::write(&records, text.clone() + "{\"id\":\"p0").unwrap();
    let r = eval(&data, &out, &["--save-maps"]);
    assert_ok(&r);
    assert!(stdout(&r).contains("evaluated 0 slices"), "{}", stdout(&r));
    assert_eq!(std::fs::read_to_string(&records).unwrap(), text);

    // One record removed: exactly that slice runs again, alone in its batch this time, and
    // its result does not depend on the batch it ran in.
    let removed = first.iter().position(|l| l.contains("\"p02\"")).unwrap();
    let kept: Vec<&String> = first.iter().filter(|l| !l.contains("\"p02\"")).collect();
    text = kept.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&records, text).unwrap();
    let r = eval(&data, &out, &["--save-maps"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 1 slices (3 recorded earlier)"),
        "{}",
        stdout(&r)
    );
    let again = lines(&records);
    assert_eq!(again.len(), 4);
    assert_eq!(again[3], first[removed]);
    assert_eq!(
        std::fs::read(out.join("metrics.json")).unwrap(),
        metrics_first
    );
    assert_metrics_match(&out, &ids, &masks);

    // Other settings on the same output are refused, and nothing is touched.
    let r = eval(&data, &out, &["--threshold", "0.5"]);
    assert_eq!(r.status.code(), Some(1));
    let err = stderr(&r);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("threshold") && err.contains("--restart") && err.contains("new --out"),
        "{err}"
    );
    assert_eq!(lines(&records).len(), 4);

    // --restart starts over with the new settings.
    let r = eval(&data, &out, &["--threshold", "0.5", "--restart"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 4 slices (0 recorded earlier)"),
        "{}",
        stdout(&r)
    );
    assert_eq!(json(&out.join("metrics.json"))["threshold"], 0.5);
    assert!(!out.join("maps").exists());
}

#[test]
fn the_flair_baseline_needs_no_checkpoints_and_recalls_the_brightest_lesion() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    png_dataset(&data);
    let out = tmp.path().join("out");
    let cfg = fixture("config_small.yaml");
    let args = [
        "eval",
        "--config",
        s(&cfg),
        "--data",
        s(&data),
        "--out",
        s(&out),
    ];

    // The diffusion model, the default, needs its checkpoint.
    let r = fcd(&args);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    assert!(stderr(&r).contains("--unet"), "{}", stderr(&r));
    assert!(!out.exists());

    let r = fcd(&[&args[..], &["--anomaly-map", "flair", "--save-maps"]].concat());
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 4 slices (0 recorded earlier), 3 bad cases skipped"),
        "{}",
        stdout(&r)
    );
    let m = json(&out.join("metrics.json"));
    assert_eq!(m["anomaly_map"], "flair");
    assert_eq!(m["n_bad_cases"], 3);
    // Each lesion is the brightest spot of its FLAIR: the first peak finds it.
    assert_eq!(m["n_lesion_slices"], 3);
    assert_eq!(m["r_at_1"], 1.0);
    // The maps are the FLAIR term of the anomaly map, norm01 of the normalised slice (the
    // PNGs hold the images rounded to 8 bits), scored like the model's maps.
    let ids: Vec<String> = ["h01", "p01", "p02", "p03"].map(String::from).to_vec();
    let mut masks = vec![vec![false; SIZE * SIZE]];
    for (id, at) in LESIONS {
        let png: Vec<f32> = flair_image(SIZE, SIZE, Some(at))
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0))
            .collect();
        let want = fcd::post::norm01(&fcd::post::normalize_slice(&png).unwrap());
        assert_eq!(read_map(&out, id), want, "{id}");
        masks.push(roi_image(SIZE, SIZE, at).iter().map(|&v| v > 0.0).collect());
    }
    assert_metrics_match(&out, &ids, &masks);
    let run = json(&out.join("run.json"));
    assert_eq!(run["key"]["anomaly_map"], "flair");
    assert!(run["paths"]["unet"].is_null(), "{run}");

    // Its records are not the model's: resuming with the model is refused.
    let unet = fixture("unet.pt");
    let r = fcd(&[&args[..], &["--unet", s(&unet), "--device", "cpu"]].concat());
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    assert!(stderr(&r).contains("--restart"), "{}", stderr(&r));
}

#[test]
fn eval_refuses_a_dataset_with_no_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("notes")).unwrap();
    let out = tmp.path().join("out");
    let r = eval(&data, &out, &[]);
    assert_eq!(r.status.code(), Some(1));
    let err = stderr(&r);
    assert!(
        err.contains("no cases found") && err.contains("data"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `nx x ny x nz` volume from a function of (x, y, z), identity affine.
fn volume(dims: [usize; 3], f: impl Fn(usize, usize, usize) -> f32) -> Volume {
    let [nx, ny, nz] = dims;
    let mut data = Vec::with_capacity(nx * ny * nz);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                data.push(f(x, y, z));
            }
        }
    }
    let mut affine = [[0.0; 4]; 4];
    for (i, row) in affine.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    Volume {
        dims,
        data,
        affine,
        path: PathBuf::new(),
    }
}

fn write_nii(path: &Path, v: &Volume) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, volume::encode_like(v, &v.data).unwrap()).unwrap();
}

fn in_lesion(x: usize, y: usize, z: usize) -> bool {
    (4..=5).contains(&z) && (x as f64 - 14.0).hypot(y as f64 - 18.0) <= 5.0
}

#[test]
fn eval_nifti_subjects_over_a_slice_range() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dims = [40, 40, 12];
    let t1 = volume(dims, |x, y, z| {
        (80.0 + 30.0 * (x as f64 / 6.0 + y as f64 / 9.0 + z as f64).cos()) as f32
    });
    let flair = |lesion: bool| {
        volume(dims, move |x, y, z| {
            let base = 90.0 + 40.0 * (x as f64 / 5.0).sin() * (y as f64 / 7.0 + z as f64).cos();
            let bump = if lesion && in_lesion(x, y, z) {
                100.0
            } else {
                0.0
            };
            (base + bump) as f32
        })
    };
    let roi = volume(dims, |x, y, z| f32::from(u8::from(in_lesion(x, y, z))));
    let anat = |sub: &str| data.join(sub).join("anat");
    write_nii(&anat("sub-01").join("sub-01_T1w.nii.gz"), &t1);
    write_nii(&anat("sub-01").join("sub-01_FLAIR.nii.gz"), &flair(true));
    write_nii(&anat("sub-01").join("sub-01_FLAIR_roi.nii.gz"), &roi);
    write_nii(&anat("sub-02").join("sub-02_T1w.nii.gz"), &t1);
    write_nii(&anat("sub-02").join("sub-02_FLAIR.nii.gz"), &flair(false));
    let small = volume([40, 36, 12], |x, y, _| (x + y) as f32);
    write_nii(&anat("sub-03").join("sub-03_T1w.nii.gz"), &small);
    write_nii(&anat("sub-03").join("sub-03_FLAIR.nii.gz"), &flair(false));

    let out = tmp.path().join("out");
    let r = eval(&data, &out, &["--slices", "4:6", "--save-maps"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 6 slices (0 recorded earlier), 1 bad cases skipped"),
        "{}",
        stdout(&r)
    );
    let m = json(&out.join("metrics.json"));
    assert_eq!(m["n_slices"], 6);
    assert_eq!(m["n_lesion_slices"], 2);
    assert_eq!(m["bad_cases"][0]["id"], "sub-03");
    let reason = m["bad_cases"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("sub-03_T1w.nii.gz")
            && reason.contains("sub-03_FLAIR.nii.gz")
            && reason.contains("same voxel grid"),
        "{reason}"
    );

    // Masks as the evaluation defines them: roi > 0, resized bilinearly, kept where >= 0.5.
    let range: fcd::slices::SliceRange = "4:6".parse().unwrap();
    let bin = volume(dims, |x, y, z| f32::from(u8::from(in_lesion(x, y, z))));
    let net = fcd::slices::to_network(&bin, range, SIZE).unwrap();
    let mut ids = Vec::new();
    let mut masks = Vec::new();
    for sub in ["sub-01", "sub-02"] {
        for (i, z) in (4..=6).enumerate() {
            ids.push(format!("{sub}_z{z:03}"));
            masks.push(if sub == "sub-01" {
                net[i * SIZE * SIZE..(i + 1) * SIZE * SIZE]
                    .iter()
                    .map(|&v| v >= 0.5)
                    .collect()
            } else {
                vec![false; SIZE * SIZE]
            });
        }
    }
    assert_metrics_match(&out, &ids, &masks);

    // Resuming a NIfTI run does nothing more.
    let r = eval(&data, &out, &["--slices", "4:6", "--save-maps"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 0 slices (6 recorded earlier)"),
        "{}",
        stdout(&r)
    );

    // A range outside the volumes makes every subject bad, each reported, and the run a
    // failure (exit 1) whose metrics.json still lists them.
    let out2 = tmp.path().join("out2");
    let r = eval(&data, &out2, &["--slices", "10:12"]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    let last = stderr(&r).lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("error: ") && last.contains("every case was skipped (3 bad cases"),
        "{last}"
    );
    let m = json(&out2.join("metrics.json"));
    assert_eq!(m["n_slices"], 0);
    assert_eq!(m["n_bad_cases"], 3);
    assert!(m["r_at_5"].is_null());
    assert!(
        stderr(&r).contains("skipped sub-01: ") && stderr(&r).contains("outside the volume"),
        "{}",
        stderr(&r)
    );
}

/// Issue 4: the bf16 and fp16 modes recall the same lesions at 5 and 10
/// peaks as the fp32 engine on the fixture metric case (the PNG dataset).
#[gpu_test]
fn gpu_fast_precisions_recall_as_fp32() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    png_dataset(&data);
    let (cfg, unet, cls) = (
        fixture("config_small.yaml"),
        fixture("unet.pt"),
        fixture("classifier.pt"),
    );
    // (id, recalled_5, recalled_10) of each lesion slice.
    let recalls = |precision: &str| {
        let out = tmp.path().join(precision);
        let r = fcd(&[
            "eval",
            "--config",
            s(&cfg),
            "--unet",
            s(&unet),
            "--classifier",
            s(&cls),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "10",
            "--device",
            "cuda",
            "--precision",
            precision,
        ]);
        assert_ok(&r);
        let rows: Vec<(String, String, String)> = lines(&out.join("slices.csv"))
            .iter()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].to_string(), f[7].to_string(), f[8].to_string())
            })
            .collect();
        rows
    };
    let reference = recalls("fp32");
    assert_eq!(reference.len(), 4, "{reference:?}");
    for p in ["tf32", "bf16", "fp16"] {
        let got = recalls(p);
        println!("{p}: {got:?} (fp32 {reference:?})");
        assert_eq!(got, reference, "{p}: recall at 5 / 10 differs from fp32");
    }
}

fn write_png_sized(path: &Path, w: usize, h: usize, v: &[f32]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let bytes: Vec<u8> = v
        .iter()
        .map(|&x| x.round().clamp(0.0, 255.0) as u8)
        .collect();
    image::GrayImage::from_raw(w as u32, h as u32, bytes)
        .unwrap()
        .save(path)
        .unwrap();
}

/// The initial noise `fcd eval` gives these slices (seed 0), as an `.npy` for `--init-noise`.
fn eval_noise(path: &Path, ids: &[String]) {
    let noise: Vec<f32> = ids
        .iter()
        .flat_map(|id| {
            fcd::engine::seeded_noise(&[1, SIZE, SIZE, 1], fcd::eval::rows::slice_seed(0, id)).data
        })
        .collect();
    fcd::io::npy::write_f32(path, &[ids.len(), 1, SIZE, SIZE], &noise).unwrap();
}

/// `fcd detect` on the CPU with `--steps 2` and the given inputs.
fn detect(out: &Path, inputs: &[&str]) -> Output {
    let (cfg, unet) = (fixture("config_small.yaml"), fixture("unet.pt"));
    let mut args = vec![
        "detect",
        "--config",
        s(&cfg),
        "--unet",
        s(&unet),
        "--out",
        s(out),
        "--steps",
        "2",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(inputs);
    fcd(&args)
}

/// One input path: the same subject gives the same maps through `fcd detect` and
/// `fcd eval`, and the same metrics from them, for a PNG slice of another size than the
/// network's with a 0/255 mask and for NIfTI volumes.
#[test]
fn detect_and_eval_agree_on_a_subject() {
    let tmp = tempfile::tempdir().unwrap();

    // PNG: 40 x 36, so slices and mask are resized; the mask is 0/255.
    let (w, h) = (40, 36);
    let at = (15.0, 17.0);
    let case = tmp.path().join("png/p01");
    let (t1, flair, roi) = (
        case.join("p01_T1w.png"),
        case.join("p01_FLAIR.png"),
        case.join("p01_FLAIR_roi.png"),
    );
    write_png_sized(&t1, w, h, &t1_image(w, h));
    write_png_sized(&flair, w, h, &flair_image(w, h, Some(at)));
    let lesion: Vec<f32> = (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f64, (i / w) as f64);
            if (x - at.0).hypot(y - at.1) <= 4.0 {
                255.0
            } else {
                0.0
            }
        })
        .collect();
    write_png_sized(&roi, w, h, &lesion);
    let ids = vec!["p01".to_string()];
    let noise = tmp.path().join("png_noise.npy");
    eval_noise(&noise, &ids);
    let eval_out = tmp.path().join("png_eval");
    assert_ok(&eval(&tmp.path().join("png"), &eval_out, &["--save-maps"]));
    let det_out = tmp.path().join("png_detect");
    assert_ok(&detect(
        &det_out,
        &[
            "--flair",
            s(&flair),
            "--t1",
            s(&t1),
            "--mask",
            s(&roi),
            "--init-noise",
            s(&noise),
        ],
    ));
    let (shape, det_map) = fcd::io::npy::read_array(&det_out.join("anomaly.npy")).unwrap();
    assert_eq!(shape, [1, SIZE, SIZE]);
    let det_map: Vec<f32> = det_map.into_iter().map(|v| v as f32).collect();
    assert_eq!(det_map, read_map(&eval_out, "p01"), "PNG maps differ");
    let range = fcd::slices::SliceRange::default();
    let mask = fcd::inputs::read(&flair, &t1, Some(&roi), range, SIZE)
        .unwrap()
        .mask
        .unwrap();
    // The mask rule keeps the lesion's area: about pi * 4^2 pixels of the 40 x 36 image,
    // scaled to 32 x 32, not the grown disc a resize of the raw 0/255 values keeps.
    let pixels = mask.iter().filter(|&&m| m).count() as f64;
    let area = std::f64::consts::PI * 16.0 * (SIZE * SIZE) as f64 / (w * h) as f64;
    assert!(
        (pixels - area).abs() <= 0.35 * area,
        "{pixels} lesion pixels, area {area:.1}"
    );
    assert_metrics_match(&eval_out, &ids, &[mask]);

    // NIfTI: one subject, slices 4:6 of volumes on another grid than the network's.
    let dims = [40, 40, 12];
    let anat = tmp.path().join("nii/sub-01/anat");
    let t1v = volume(dims, |x, y, z| {
        (80.0 + 30.0 * (x as f64 / 6.0 + y as f64 / 9.0 + z as f64).cos()) as f32
    });
    let flv = volume(dims, |x, y, z| {
        let base = 90.0 + 40.0 * (x as f64 / 5.0).sin() * (y as f64 / 7.0 + z as f64).cos();
        (base + if in_lesion(x, y, z) { 100.0 } else { 0.0 }) as f32
    });
    let roiv = volume(dims, |x, y, z| if in_lesion(x, y, z) { 255.0 } else { 0.0 });
    let (t1, flair, roi) = (
        anat.join("sub-01_T1w.nii.gz"),
        anat.join("sub-01_FLAIR.nii.gz"),
        anat.join("sub-01_FLAIR_roi.nii.gz"),
    );
    write_nii(&t1, &t1v);
    write_nii(&flair, &flv);
    write_nii(&roi, &roiv);
    let ids: Vec<String> = (4..=6).map(|z| format!("sub-01_z{z:03}")).collect();
    let noise = tmp.path().join("nii_noise.npy");
    eval_noise(&noise, &ids);
    let eval_out = tmp.path().join("nii_eval");
    assert_ok(&eval(
        &tmp.path().join("nii"),
        &eval_out,
        &["--slices", "4:6", "--save-maps"],
    ));
    let det_out = tmp.path().join("nii_detect");
    assert_ok(&detect(
        &det_out,
        &[
            "--flair",
            s(&flair),
            "--t1",
            s(&t1),
            "--mask",
            s(&roi),
            "--init-noise",
            s(&noise),
            "--slices",
            "4:6",
        ],
    ));
    let maps: Vec<f32> = ids.iter().flat_map(|id| read_map(&eval_out, id)).collect();
    let range: fcd::slices::SliceRange = "4:6".parse().unwrap();
    let on_grid = fcd::slices::from_network(&maps, SIZE, dims, range);
    let det = volume::read_volume(&det_out.join("anomaly.nii.gz")).unwrap();
    assert_eq!(det.data, on_grid, "NIfTI maps differ");
    let mask = fcd::inputs::read(&flair, &t1, Some(&roi), range, SIZE)
        .unwrap()
        .mask
        .unwrap();
    let masks: Vec<Vec<bool>> = mask.chunks(SIZE * SIZE).map(<[bool]>::to_vec).collect();
    assert_metrics_match(&eval_out, &ids, &masks);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files that must not depend on how a run was split.
fn assert_same_results(a: &Path, b: &Path) {
    for name in ["slices.csv", "metrics.json"] {
        assert_eq!(read(&a.join(name)), read(&b.join(name)), "{name}");
    }
}

/// Issue 13: three shards, one of them picked by Slurm's array variables, merge to the files
/// of one process; status and merge follow the shards' progress; a shard reruns only its
/// missing slices.
#[test]
fn eval_shards_merge_to_the_one_process_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    png_dataset(&data);
    let single = tmp.path().join("single");
    assert_ok(&eval(&data, &single, &[]));

    let out = tmp.path().join("sharded");
    let status = || fcd(&["eval", "--status", s(&out)]);
    let merge = || fcd(&["eval", "--merge", s(&out)]);
    let r = status();
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("no shard folders"), "{}", stderr(&r));

    assert_ok(&eval(&data, &out, &["--shard", "0/3"]));
    let r = status();
    assert_ok(&r);
    let text = stdout(&r);
    assert!(text.contains("shard 1/3: 0/"), "{text}");
    assert!(text.contains("not started"), "{text}");
    assert!(text.contains("1 of 3 shards complete"), "{text}");
    let r = merge();
    assert_eq!(r.status.code(), Some(1));
    assert!(
        stderr(&r).contains("shard 1/3 has not started"),
        "{}",
        stderr(&r)
    );

    // --array=1-3: task 3 runs shard 2/3.
    let array = [
        ("SLURM_ARRAY_TASK_ID", "3"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ];
    let r = eval_env(&data, &out, &[], &array);
    assert_ok(&r);
    assert!(stdout(&r).starts_with("shard 2/3: "), "{}", stdout(&r));
    assert!(out.join("shards/2-of-3/records.jsonl").exists());
    assert_ok(&eval(&data, &out, &["--shard", "1/3", "--batch", "1"]));

    let r = status();
    assert_ok(&r);
    assert!(
        stdout(&r).contains("3 of 3 shards complete"),
        "{}",
        stdout(&r)
    );
    let per_shard: Vec<(usize, usize, usize)> = fcd::eval::status(&out)
        .unwrap()
        .iter()
        .map(|st| {
            assert!(st.complete && st.done == st.expected, "{st:?}");
            (st.done, st.expected, st.bad_cases.len())
        })
        .collect();
    let total = per_shard
        .iter()
        .fold((0, 0, 0), |t, p| (t.0 + p.0, t.1 + p.1, t.2 + p.2));
    assert_eq!(total, (4, 4, 3), "{per_shard:?}");

    let r = merge();
    assert_ok(&r);
    assert_same_results(&single, &out);

    // A shard that lost a record reruns that slice alone; until then it is not complete.
    let (k, records) = (0..3)
        .map(|k| (k, out.join(format!("shards/{k}-of-3/records.jsonl"))))
        .find(|(_, p)| !read(p).is_empty())
        .unwrap();
    let kept: Vec<String> = lines(&records).into_iter().skip(1).collect();
    std::fs::write(
        &records,
        kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    std::fs::remove_file(out.join(format!("shards/{k}-of-3/metrics.json"))).unwrap();
    let r = merge();
    assert_eq!(r.status.code(), Some(1));
    assert!(
        stderr(&r).contains(&format!("shard {k}/3 has {} of", kept.len())),
        "{}",
        stderr(&r)
    );
    let r = eval(&data, &out, &["--shard", &format!("{k}/3")]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains(&format!(
            "evaluated 1 slices ({} recorded earlier)",
            kept.len()
        )),
        "{}",
        stdout(&r)
    );
    assert_ok(&merge());
    assert_same_results(&single, &out);

    // A merge never overwrites a one-process run.
    let r = fcd(&["eval", "--merge", s(&single)]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("one-process run"), "{}", stderr(&r));
}

/// Issue 13: the multi-device scheduler, exercised with two CPU workers: the same files as
/// one worker, whichever worker ran which batch.
#[test]
fn two_cpu_workers_give_the_one_worker_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    png_dataset(&data);
    let one = tmp.path().join("one");
    assert_ok(&eval(&data, &one, &["--batch", "1"]));
    let two = tmp.path().join("two");
    let r = eval(&data, &two, &["--devices", "cpu,cpu", "--batch", "1"]);
    assert_ok(&r);
    assert!(
        stdout(&r).contains("evaluated 4 slices (0 recorded earlier), 3 bad cases skipped"),
        "{}",
        stdout(&r)
    );
    assert_same_results(&one, &two);
    let sorted = |p: &Path| {
        let mut l = lines(&p.join("records.jsonl"));
        l.sort();
        l
    };
    assert_eq!(sorted(&one), sorted(&two));
    assert_eq!(json(&two.join("run.json"))["device"], "cpu, cpu");

    let r = eval(&data, &tmp.path().join("mixed"), &["--devices", "cpu,0"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("not a mix"), "{}", stderr(&r));
}

/// The first temporary file of an atomic write under `dir` (maps/ included).
fn temporary(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries.filter_map(|e| e.ok()).find_map(|e| {
        let path = e.path();
        if e.file_name().to_string_lossy().contains(".tmp-") {
            Some(path)
        } else if path.is_dir() {
            temporary(&path)
        } else {
            None
        }
    })
}

/// SIGINT while `fcd eval` writes a file stops the run (exit 130) without leaving the
/// write's temporary file behind. To land the signal inside a write, the process is frozen
/// (SIGSTOP) when a temporary file is seen, and signalled only if the file is still there.
#[test]
fn sigint_while_writing_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Each slice's map is one atomic write to catch.
    for i in 0..60 {
        let d = data.join(format!("s{i:02}"));
        write_png(&d.join("T1w.png"), &t1_image(SIZE, SIZE));
        write_png(&d.join("FLAIR.png"), &flair_image(SIZE, SIZE, None));
    }
    let out = tmp.path().join("out");
    let (cfg, unet, cls) = (
        fixture("config_small.yaml"),
        fixture("unet.pt"),
        fixture("classifier.pt"),
    );
    #[rustfmt::skip]
    let args = [
        "eval", "--config", s(&cfg), "--unet", s(&unet), "--classifier", s(&cls),
        "--data", s(&data), "--out", s(&out), "--device", "cpu", "--steps", "1",
        "--batch", "1", "--save-maps",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let signal = |sig| assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {sig}");
    let start = std::time::Instant::now();
    let mut caught = None;
    while caught.is_none() && child.try_wait().unwrap().is_none() {
        assert!(start.elapsed().as_secs() < 120, "no write caught");
        let Some(file) = temporary(&out) else {
            continue;
        };
        signal(libc::SIGSTOP);
        wait_stopped(pid);
        if file.exists() {
            signal(libc::SIGINT);
            caught = Some(file);
        }
        signal(libc::SIGCONT);
    }
    let caught = caught.expect("the run ended before a write was caught");
    let r = child.wait_with_output().unwrap();
    assert_eq!(r.status.code(), Some(130), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("interrupted by signal 2"),
        "{}",
        stderr(&r)
    );
    assert!(!caught.exists(), "{} left behind", caught.display());
    assert_eq!(temporary(&out), None);
}

/// Returns once every thread of process `pid` is stopped (SIGSTOP takes effect later than
/// `kill` returns).
fn wait_stopped(pid: libc::pid_t) {
    let stopped = || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        tasks.filter_map(|t| t.ok()).all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .is_none_or(|(_, rest)| rest.starts_with('T'))
        })
    };
    while !stopped() {
        std::thread::yield_now();
    }
}
