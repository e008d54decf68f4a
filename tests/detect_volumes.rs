//! `fcd detect` on NIfTI volumes and PNG slices: outputs on the input's grid,
//! overlays, montages and peaks; bad input refused in one line with nothing written.

mod common;

use common::fixture;
use fcd::io::volume::{encode_like, read_volume, Volume};
use fcd::outputs::montage::GAP;
use fcd::outputs::overlay::OUTLINE;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DIMS: [usize; 3] = [40, 36, 9];

fn affine() -> [[f64; 4]; 4] {
    [
        [0.9, 0.0, 0.0, -20.0],
        [0.0, 1.1, 0.0, -15.0],
        [0.0, 0.0, 2.0, 10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// A head-like volume: smooth values in an ellipse, zero outside; `bright`
/// adds a lesion-like blob.
fn head(seed: f32, bright: bool) -> Vec<f32> {
    let [nx, ny, nz] = DIMS;
    let mut v = vec![0f32; nx * ny * nz];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (dx, dy) = ((x as f32 - 20.0) / 17.0, (y as f32 - 18.0) / 15.0);
                if dx * dx + dy * dy < 1.0 {
                    let mut val = 100.0
                        + 30.0
                            * ((x as f32 * 0.3 + seed).sin() + (y as f32 * 0.2 + z as f32).cos());
                    if bright && (x as f32 - 26.0).powi(2) + (y as f32 - 14.0).powi(2) < 9.0 {
                        val += 80.0;
                    }
                    v[x + nx * (y + ny * z)] = val;
                }
            }
        }
    }
    v
}

fn write(dir: &Path, name: &str, dims: [usize; 3], data: &[f32]) -> PathBuf {
    let reference = Volume {
        dims,
        data: vec![0.0; data.len()],
        affine: affine(),
        path: PathBuf::new(),
    };
    let p = dir.join(name);
    std::fs::write(&p, encode_like(&reference, data).unwrap()).unwrap();
    p
}

fn detect(flair: &Path, t1: &Path, out: &Path, extra: &[&str]) -> Output {
    let (cfg, unet, cls) = (
        fixture("config_small.yaml"),
        fixture("unet.pt"),
        fixture("classifier.pt"),
    );
    let mut args: Vec<&str> = vec![
        "detect",
        "--config",
        cfg.to_str().unwrap(),
        "--unet",
        unet.to_str().unwrap(),
    ];
    args.extend([
        "--classifier",
        cls.to_str().unwrap(),
        "--flair",
        flair.to_str().unwrap(),
        "--t1",
        t1.to_str().unwrap(),
    ]);
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]);
    args.extend(extra);
    Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(&args)
        .output()
        .unwrap()
}

#[test]
fn nifti_outputs_are_on_the_input_grid_with_overlays_and_peaks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let flair = write(d, "sub_FLAIR.nii.gz", DIMS, &head(0.0, true));
    let t1 = write(d, "sub_T1w.nii.gz", DIMS, &head(1.0, false));
    let mut mask = vec![0f32; DIMS.iter().product()];
    for z in 3..=5 {
        for y in 12..16 {
            for x in 24..28 {
                mask[x + DIMS[0] * (y + DIMS[1] * z)] = 1.0;
            }
        }
    }
    let mask = write(d, "sub_roi.nii.gz", DIMS, &mask);
    let out = d.join("run");
    let r = detect(
        &flair,
        &t1,
        &out,
        &["--slices", "3:5", "--mask", mask.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    for name in ["anomaly.nii.gz", "pseudo_healthy.nii.gz"] {
        let v = read_volume(&out.join(name)).unwrap();
        assert_eq!(v.dims, DIMS, "{name}");
        for (a, b) in v.affine.iter().flatten().zip(affine().iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{name}: affine {:?}", v.affine);
        }
        let plane = DIMS[0] * DIMS[1];
        let outside = v.data[..3 * plane].iter().chain(&v.data[6 * plane..]);
        assert!(
            outside.into_iter().all(|&x| x == 0.0),
            "{name}: non-zero outside slices 3..=5"
        );
        assert!(
            v.data[3 * plane..6 * plane].iter().any(|&x| x != 0.0),
            "{name}: empty inside the range"
        );
    }
    let a = read_volume(&out.join("anomaly.nii.gz")).unwrap();
    assert!(
        a.data.iter().all(|&x| (-1e-6..=1.0 + 1e-6).contains(&x)),
        "anomaly outside [0, 1]"
    );
    // Overlays on the input's grid (x across, y down), the mask outlined where it lies there.
    for z in 3..=5 {
        let png = image::open(out.join(format!("overlays/slice_{z:03}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(png.dimensions(), (DIMS[0] as u32, DIMS[1] as u32));
        assert_eq!(png.get_pixel(24, 12).0, OUTLINE, "slice {z}");
        assert_eq!(png.get_pixel(27, 15).0, OUTLINE, "slice {z}");
        assert_ne!(
            png.get_pixel(25, 13).0,
            OUTLINE,
            "slice {z}: inside the lesion"
        );
        assert_ne!(
            png.get_pixel(23, 13).0,
            OUTLINE,
            "slice {z}: outside the lesion"
        );
    }
    // Three slices, each with peaks and lesion: a 2 x 2 grid of tiles of the input's size.
    let montage = image::open(out.join("montage.png")).unwrap();
    let (w, h) = (DIMS[0] as u32, DIMS[1] as u32);
    assert_eq!(
        (montage.width(), montage.height()),
        (2 * (w + GAP) + GAP, 2 * (h + GAP) + GAP)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let peaks = summary["peaks"].as_array().unwrap();
    assert!(!peaks.is_empty());
    let strengths: Vec<f64> = peaks
        .iter()
        .map(|p| p["strength"].as_f64().unwrap())
        .collect();
    assert!(
        strengths.windows(2).all(|w| w[0] >= w[1]),
        "peaks not sorted by strength"
    );
    assert!(peaks
        .iter()
        .all(|p| (0.0..=1.0).contains(&p["score"].as_f64().unwrap())));
    for p in peaks {
        let z = p["slice"].as_u64().unwrap();
        assert!((3..=5).contains(&z));
        let (x, y) = (
            p["voxel_x"].as_f64().unwrap(),
            p["voxel_y"].as_f64().unwrap(),
        );
        assert!((0.0..DIMS[0] as f64).contains(&x) && (0.0..DIMS[1] as f64).contains(&y));
        let w: Vec<f64> = p["world_mm"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let m = affine();
        let want = [
            m[0][0] * x + m[0][3],
            m[1][1] * y + m[1][3],
            m[2][2] * z as f64 + m[2][3],
        ];
        for (a, b) in w.iter().zip(want) {
            assert!(
                (a - b).abs() < 1e-3,
                "world {w:?} for voxel ({x}, {y}, {z})"
            );
        }
    }
    assert_eq!(summary["inputs"]["slice_range"], "3:5");
    let files = &summary["outputs"];
    assert!(files["montage"]
        .as_str()
        .unwrap()
        .starts_with("montage.png"));
}

#[test]
fn png_slices_give_npy_outputs_and_an_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let save = |name: &str, f: &dyn Fn(u32, u32) -> u8| {
        let img = image::GrayImage::from_fn(48, 40, |x, y| image::Luma([f(x, y)]));
        let p = d.join(name);
        img.save(&p).unwrap();
        p
    };
    let flair = save("FLAIR.png", &|x, y| {
        if (x as i32 - 24).pow(2) + (y as i32 - 20).pow(2) < 300 {
            90 + (x % 7) as u8 * 10
        } else {
            0
        }
    });
    let t1 = save("T1w.png", &|x, y| {
        if (x as i32 - 24).pow(2) + (y as i32 - 20).pow(2) < 300 {
            120 + (y % 5) as u8 * 9
        } else {
            0
        }
    });
    let roi = save("roi.png", &|x, y| {
        if (28..34).contains(&x) && (15..20).contains(&y) {
            255
        } else {
            0
        }
    });
    let out = d.join("run");
    let r = detect(&flair, &t1, &out, &["--mask", roi.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (shape, _) = fcd::io::npy::read_array(&out.join("anomaly.npy")).unwrap();
    assert_eq!(shape, [1, 32, 32]);
    // The overlay at the PNG's size, the mask outlined where it lies there.
    let overlay = image::open(out.join("overlay.png")).unwrap().to_rgb8();
    assert_eq!(overlay.dimensions(), (48, 40));
    assert_eq!(overlay.get_pixel(28, 15).0, OUTLINE);
    assert_eq!(overlay.get_pixel(33, 19).0, OUTLINE);
    assert_ne!(overlay.get_pixel(30, 17).0, OUTLINE);
    let montage = image::open(out.join("montage.png")).unwrap();
    assert_eq!(
        (montage.width(), montage.height()),
        (48 + 2 * GAP, 40 + 2 * GAP)
    );
}

fn assert_fails(r: &Output, file: &str, reason: &str, dir: &Path) {
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(file) && err.contains(reason),
        "expected `{file}` and `{reason}` in: {err}"
    );
    assert!(!dir.join("run").exists(), "output written");
    let hidden = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with('.'));
    assert!(!hidden, "staging left behind");
}

#[test]
fn bad_volumes_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let flair = write(d, "FLAIR.nii.gz", DIMS, &head(0.0, true));
    let t1 = write(d, "T1w.nii.gz", DIMS, &head(1.0, false));
    let out = d.join("run");

    let other = write(
        d,
        "T1w_other_grid.nii.gz",
        [40, 36, 8],
        &head(1.0, false)[..40 * 36 * 8],
    );
    assert_fails(
        &detect(&flair, &other, &out, &["--slices", "3:5"]),
        "T1w_other_grid.nii.gz",
        "dims",
        d,
    );

    let missing = d.join("T1w_missing.nii.gz");
    assert_fails(
        &detect(&flair, &missing, &out, &["--slices", "3:5"]),
        "T1w_missing.nii.gz",
        "",
        d,
    );

    let mut nan = head(1.0, false);
    nan[20 + 40 * (18 + 36 * 4)] = f32::NAN;
    let nan = write(d, "T1w_nan.nii.gz", DIMS, &nan);
    assert_fails(
        &detect(&flair, &nan, &out, &["--slices", "3:5"]),
        "T1w_nan.nii.gz",
        "non-finite",
        d,
    );

    let mut flat = head(1.0, false);
    flat[40 * 36 * 5..40 * 36 * 6].fill(7.0);
    let flat = write(d, "T1w_flat.nii.gz", DIMS, &flat);
    assert_fails(
        &detect(&flair, &flat, &out, &["--slices", "3:5"]),
        "axial slice 5",
        "constant slice",
        d,
    );

    let empty = write(
        d,
        "roi_empty.nii.gz",
        DIMS,
        &vec![0.0; DIMS.iter().product()],
    );
    assert_fails(
        &detect(
            &flair,
            &t1,
            &out,
            &["--slices", "3:5", "--mask", empty.to_str().unwrap()],
        ),
        "roi_empty.nii.gz",
        "empty",
        d,
    );

    assert_fails(
        &detect(&flair, &t1, &out, &["--slices", "3:12"]),
        "FLAIR.nii.gz",
        "",
        d,
    );

    // A 4-D series is not a 3-D volume.
    let four_d = d.join("FLAIR_4d.nii");
    let bytes = encode_like(
        &Volume {
            dims: DIMS,
            data: vec![0.0; 40 * 36 * 9],
            affine: affine(),
            path: PathBuf::new(),
        },
        &head(0.0, true),
    )
    .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw).unwrap();
    // dim[0] = 4 and dim[4] = 2 (header offsets 40 and 48, little-endian i16).
    raw[40..42].copy_from_slice(&4i16.to_le_bytes());
    raw[48..50].copy_from_slice(&2i16.to_le_bytes());
    std::fs::write(&four_d, &raw).unwrap();
    assert_fails(
        &detect(&four_d, &t1, &out, &["--slices", "3:5"]),
        "FLAIR_4d.nii",
        "3-D",
        d,
    );
}
