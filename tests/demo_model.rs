//! The whole method, as a regression test: `fcd detect` with the demo model of `weights/`
//! on the phantom subject that ships with it (the README's main command) finds the lesion.
//! Parity tests pin each step to PyTorch; this one pins what the steps are for.

use fcd::io::volume::{read_volume, Volume};
use fcd::metrics::{nearest_peak_distance, peaks};
use std::path::{Path, PathBuf};
use std::process::Command;

/// R@k's radius at the input's resolution: 10 mm (1 mm voxels in x and y), the paper's
/// 10 px at 256 x 256 over 240 mm.
const RADIUS_VOXELS: f64 = 10.0;
const K: usize = 5;
/// Slices whose lesion is smaller than this are left out of R@k: about the 8 pixels of the
/// 64 x 64 network grid (11.2 voxels each here) below which the classifier was not trained
/// to call a lesion (`MIN_LESION_PIXELS` of tools/train/train.py).
const MIN_LESION_VOXELS: usize = 90;
/// The README's main command's `--slices`: six of the nine, so that it runs in under three
/// minutes on two cores.
const SLICES: std::ops::RangeInclusive<usize> = 2..=7;

fn weights(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join(name)
}

/// Whether one of the `K` strongest peaks of each slice of `anomaly` lies within
/// `RADIUS_VOXELS` of that slice's lesion, for the slices with at least
/// `MIN_LESION_VOXELS` of it, among those in `SLICES`: (z, lesion voxels, recalled).
fn recall_per_slice(anomaly: &Path, m: &Volume) -> Vec<(usize, usize, bool)> {
    let a = read_volume(anomaly).unwrap();
    assert_eq!(a.dims, m.dims);
    let [nx, ny, _] = a.dims;
    let plane = nx * ny;
    SLICES
        .filter_map(|z| {
            // vol[x, y, z] with rows along y: index x + nx * y is row y, column x.
            let map = &a.data[z * plane..(z + 1) * plane];
            let lesion: Vec<bool> = m.data[z * plane..(z + 1) * plane]
                .iter()
                .map(|&v| v > 0.0)
                .collect();
            let size = lesion.iter().filter(|&&l| l).count();
            (size >= MIN_LESION_VOXELS).then(|| {
                let hit = peaks(map, ny, nx, K, RADIUS_VOXELS)
                    .into_iter()
                    .any(|p| nearest_peak_distance(p, &lesion, nx).unwrap() <= RADIUS_VOXELS);
                (z, size, hit)
            })
        })
        .collect()
}

#[test]
fn the_demo_model_finds_the_shipped_lesion() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let anat = weights("phantom/sub-001/anat");
    let (flair, t1, roi) = (
        anat.join("sub-001_FLAIR.nii.gz"),
        anat.join("sub-001_T1w.nii.gz"),
        anat.join("sub-001_FLAIR_roi.nii.gz"),
    );
    let r = Command::new(env!("CARGO_BIN_EXE_fcd"))
        .arg("detect")
        .arg("--config")
        .arg(weights("config.yaml"))
        .arg("--unet")
        .arg(weights("unet.pt"))
        .arg("--flair")
        .arg(&flair)
        .arg("--t1")
        .arg(&t1)
        .arg("--mask")
        .arg(&roi)
        .arg("--slices")
        .arg(format!("{}:{}", SLICES.start(), SLICES.end()))
        .args(["--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = read_volume(&roi).unwrap();
    let slices = recall_per_slice(&out.join("anomaly.nii.gz"), &m);
    let recalled = slices.iter().filter(|s| s.2).count();
    eprintln!("R@{K} per lesion slice (z, lesion voxels, recalled): {slices:?}");
    assert!(!slices.is_empty());
    assert!(
        2 * recalled >= slices.len(),
        "R@{K} {recalled} of {} lesion slices: {slices:?}",
        slices.len()
    );

    // Recall at k = 5 for the subject: one of its `K` strongest peaks (numbered 1 to 5 on
    // the montage) lies on the lesion.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let [nx, ny, _] = m.dims;
    let distances: Vec<(usize, f64)> = summary["peaks"]
        .as_array()
        .unwrap()
        .iter()
        .take(K)
        .map(|p| {
            let z = p["slice"].as_u64().unwrap() as usize;
            let (x, y) = (
                p["voxel_x"].as_f64().unwrap(),
                p["voxel_y"].as_f64().unwrap(),
            );
            let nearest = (0..nx * ny)
                .filter(|&i| m.data[z * nx * ny + i] > 0.0)
                .map(|i| ((i % nx) as f64 - x).hypot((i / nx) as f64 - y))
                .fold(f64::INFINITY, f64::min);
            (z, nearest)
        })
        .collect();
    eprintln!("the subject's {K} strongest peaks (slice, voxels to the lesion): {distances:?}");
    assert_eq!(distances.len(), K);
    assert!(
        distances.iter().any(|&(_, d)| d <= RADIUS_VOXELS),
        "none of the subject's {K} strongest peaks lies within {RADIUS_VOXELS} voxels of the lesion: {distances:?}"
    );
}
