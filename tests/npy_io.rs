//! `.npy` reading and writing, atomic writes and staged output directories.

use fcd::io::atomic::{write_atomic, Staged};
use fcd::io::npy::{encode_f32, read_array, read_slices, write_f32};
use npyz::{AutoSerialize, Order, WriterBuilder};
use std::fs;
use std::path::Path;

/// Writes an array of any dtype npyz knows, as numpy would.
fn save<T: AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T], order: Order) {
    let mut bytes = Vec::new();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .order(order)
        .writer(&mut bytes)
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
    fs::write(path, bytes).unwrap();
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
}

#[test]
fn float32_round_trip_in_every_accepted_layout() {
    let dir = tempfile::tempdir().unwrap();
    for (shape, b, h, w) in [
        (vec![2, 1, 3, 4], 2, 3, 4),
        (vec![2, 3, 4], 2, 3, 4),
        (vec![3, 4], 1, 3, 4),
    ] {
        let path = dir.path().join("x.npy");
        let data = ramp(b * h * w);
        write_f32(&path, &shape, &data).unwrap();
        let s = read_slices(&path).unwrap();
        assert_eq!((s.shape, s.b, s.h, s.w), (shape.clone(), b, h, w));
        assert_eq!(s.data, data);
        let (ashape, adata) = read_array(&path).unwrap();
        assert_eq!(ashape, shape);
        assert_eq!(
            adata,
            data.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
        );
    }
    // Nothing but the file itself is left behind by the atomic write.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x.npy")]);
}

#[test]
fn wrong_shapes_are_refused_naming_file_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flair.npy");
    for shape in [vec![2usize, 3, 32, 32], vec![32], vec![1, 1, 1, 4, 4]] {
        let n = shape.iter().product();
        write_f32(&path, &shape, &ramp(n)).unwrap();
        let err = format!("{:#}", read_slices(&path).unwrap_err());
        assert!(err.contains("flair.npy"), "{err}");
        assert!(
            err.contains(&format!(
                "shape {shape:?} is not (B,1,H,W), (B,H,W) or (H,W)"
            )),
            "{err}"
        );
    }
    write_f32(&path, &[0, 32, 32], &[]).unwrap();
    let err = format!("{:#}", read_slices(&path).unwrap_err());
    assert!(
        err.contains("flair.npy") && err.contains("no pixels"),
        "{err}"
    );
}

#[test]
fn float64_is_accepted_and_rounded_to_float32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x64.npy");
    let data: Vec<f64> = (0..12).map(|i| 0.1 * i as f64).collect();
    save(&path, &[1, 1, 3, 4], &data, Order::C);
    let s = read_slices(&path).unwrap();
    assert_eq!((s.b, s.h, s.w), (1, 3, 4));
    assert_eq!(s.data, data.iter().map(|&v| v as f32).collect::<Vec<_>>());
    assert_eq!(read_array(&path).unwrap().1, data);
}

#[test]
fn integer_arrays_read_as_float64_but_are_not_slices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mask.npy");
    let data: Vec<u8> = vec![0, 1, 2, 255, 0, 7];
    save(&path, &[2, 3], &data, Order::C);
    let (shape, values) = read_array(&path).unwrap();
    assert_eq!(shape, vec![2, 3]);
    assert_eq!(values, vec![0.0, 1.0, 2.0, 255.0, 0.0, 7.0]);
    let err = format!("{:#}", read_slices(&path).unwrap_err());
    assert!(err.contains("mask.npy") && err.contains("|u1"), "{err}");

    save(&path, &[3], &[-5i64, 0, 9], Order::C);
    assert_eq!(read_array(&path).unwrap().1, vec![-5.0, 0.0, 9.0]);
    save(&path, &[2], &[true, false], Order::C);
    assert_eq!(read_array(&path).unwrap().1, vec![1.0, 0.0]);
}

#[test]
fn fortran_order_is_reordered_to_row_major() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.npy");
    // Row-major x[b][r][c] = 100 b + 10 r + c, stored column-major: b fastest, then r, then c.
    let (b, h, w) = (2, 3, 4);
    let mut stored = Vec::new();
    for c in 0..w {
        for r in 0..h {
            for i in 0..b {
                stored.push((100 * i + 10 * r + c) as f32);
            }
        }
    }
    save(
        &path,
        &[b as u64, h as u64, w as u64],
        &stored,
        Order::Fortran,
    );
    let s = read_slices(&path).unwrap();
    let want: Vec<f32> = (0..b * h * w)
        .map(|k| (100 * (k / (h * w)) + 10 * (k / w % h) + k % w) as f32)
        .collect();
    assert_eq!(s.data, want);
}

#[test]
fn unreadable_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.npy");
    fs::write(&path, b"not an npy file").unwrap();
    let err = format!("{:#}", read_slices(&path).unwrap_err());
    assert!(err.contains("junk.npy"), "{err}");
    let err = format!(
        "{:#}",
        read_array(&dir.path().join("missing.npy")).unwrap_err()
    );
    assert!(err.contains("missing.npy"), "{err}");
    assert!(encode_f32(&[2, 2], &[1.0; 3]).is_err());
}

#[test]
fn atomic_write_replaces_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.json");
    write_atomic(&path, b"first").unwrap();
    write_atomic(&path, b"second").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"second");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    let err = format!(
        "{:#}",
        write_atomic(&dir.path().join("no/such/dir/x"), b"x").unwrap_err()
    );
    assert!(err.contains("no/such/dir/x"), "{err}");
}

#[test]
fn staged_output_appears_only_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("run");
    let mut staged = Staged::new(&target).unwrap();
    staged.write("summary.json", b"{}").unwrap();
    staged
        .write("maps/a.npy", &encode_f32(&[1, 2], &[1.0, 2.0]).unwrap())
        .unwrap();
    assert!(!target.exists());
    assert!(staged.write("../escape", b"x").is_err());
    assert!(staged.write("summary.json", b"again").is_err());
    staged.commit().unwrap();
    assert_eq!(fs::read(target.join("summary.json")).unwrap(), b"{}");
    assert_eq!(
        read_slices(&target.join("maps/a.npy")).unwrap().data,
        vec![1.0, 2.0]
    );
    // Only the target directory remains next to it: the staging directory is gone.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // A run that fails (drops its Staged) leaves the existing output untouched.
    let mut failed = Staged::new(&target).unwrap();
    failed.write("summary.json", b"half").unwrap();
    drop(failed);
    assert_eq!(fs::read(target.join("summary.json")).unwrap(), b"{}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}
