//! Hostile and broken inputs (issue 10): each reader refuses them with one line that names the
//! file, before allocating what the file only claims, and without crashing or hanging.

use fcd::io::{checkpoint, npy, png, volume};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn fcd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fcd"))
        .args(args)
        .output()
        .expect("run fcd")
}

/// `fcd detect` on the fixture model, with any of its files replaced.
fn detect(unet: &Path, flair: &Path, out: &Path) -> Output {
    detect_with(unet, flair, &fixture("t1_raw.npy"), out)
}

fn detect_with(unet: &Path, flair: &Path, t1: &Path, out: &Path) -> Output {
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let args = [
        "detect".into(),
        "--config".into(),
        s(&fixture("config_small.yaml")),
        "--unet".into(),
        s(unet),
        "--classifier".into(),
        s(&fixture("classifier.pt")),
        "--flair".into(),
        s(flair),
        "--t1".into(),
        s(t1),
        "--out".into(),
        s(out),
        "--steps".into(),
        "2".into(),
        "--device".into(),
        "cpu".into(),
    ];
    fcd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Exit status 1, one stderr line naming `file` and saying `reason`, no panic.
fn assert_cli_error(out: &Output, file: &str, reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(file), "`{file}` not named in: {err}");
    assert!(err.contains(reason), "`{reason}` not in: {err}");
}

/// One line, the file named once, `reason` in it, and no Rust debug structures.
fn assert_sentence(e: anyhow::Error, file: &str, reason: &str) {
    let text = format!("{e:#}");
    assert!(!text.contains('\n'), "not one line: {text}");
    assert_eq!(
        text.matches(file).count(),
        1,
        "`{file}` not once in: {text}"
    );
    assert!(text.contains(reason), "`{reason}` not in: {text}");
    for debug in ["Custom {", "kind:", "Io(", "Error {"] {
        assert!(!text.contains(debug), "debug structure in: {text}");
    }
}

// ---- checkpoints ----

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, body) in entries {
        z.start_file(*name, opts).unwrap();
        z.write_all(body).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// `{'w': tensor}` of `numel` elements of torch storage class `class`, viewed as shape (2,).
fn tensor_pickle(class: &str, numel: u32) -> Vec<u8> {
    let mut p = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\n");
    p.extend_from_slice(class.as_bytes());
    p.extend_from_slice(b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ");
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"tQK\x00K\x02\x85K\x01\x85\x89)tRs.");
    p
}

#[test]
fn deeply_nested_pickle_is_refused_not_a_stack_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut pkl = b"\x80\x02)".to_vec();
    pkl.extend(std::iter::repeat_n(0x85u8, 200_000));
    pkl.push(b'.');
    let p = write(dir.path(), "r1.pt", &zip_of(&[("a/data.pkl", &pkl)]));
    let e = checkpoint::load(&p).unwrap_err();
    assert_sentence(e, "r1.pt", "nest deeper than 256");
    let out = fcd(&["inspect", p.to_str().unwrap()]);
    assert_cli_error(&out, "r1.pt", "nest deeper than 256");
}

#[test]
fn integer_and_bool_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (class, dtype, esize) in [
        ("LongStorage", "int64", 8),
        ("IntStorage", "int32", 4),
        ("ByteStorage", "uint8", 1),
        ("BoolStorage", "bool", 1),
    ] {
        let data = vec![1u8; 2 * esize];
        let archive = zip_of(&[
            ("m/data.pkl", &tensor_pickle(class, 2)),
            ("m/data/0", &data),
        ]);
        let p = write(dir.path(), "int.pt", &archive);
        let e = checkpoint::load(&p).unwrap_err();
        assert_sentence(e, "int.pt", &format!("tensor `w` has dtype {dtype}"));
    }
    for (dtype, name, size) in [
        ("I64", "int64", 16),
        ("I32", "int32", 8),
        ("BOOL", "bool", 2),
    ] {
        let json =
            format!(r#"{{"w":{{"dtype":"{dtype}","shape":[2],"data_offsets":[0,{size}]}}}}"#);
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, size));
        let p = write(dir.path(), "int.safetensors", &bytes);
        let e = checkpoint::load(&p).unwrap_err();
        assert_sentence(
            e,
            "int.safetensors",
            &format!("tensor `w` has dtype {name}"),
        );
    }
    let p = dir.path().join("int.pt");
    let archive = zip_of(&[
        ("m/data.pkl", &tensor_pickle("LongStorage", 2)),
        ("m/data/0", &[0u8; 16]),
    ]);
    std::fs::write(&p, archive).unwrap();
    let out = fcd(&["inspect", p.to_str().unwrap()]);
    assert_cli_error(&out, "int.pt", "dtype int64");
}

#[test]
fn storage_larger_than_its_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = zip_of(&[
        ("m/data.pkl", &tensor_pickle("FloatStorage", 1 << 30)),
        ("m/data/0", &[0u8; 8]),
    ]);
    let p = write(dir.path(), "big.pt", &archive);
    let e = checkpoint::load(&p).unwrap_err();
    assert_sentence(
        e,
        "big.pt",
        "holds 8 bytes, the pickle declares 1073741824 float32 elements",
    );
}

/// A stored entry whose headers declare 1 GiB over its 8 real bytes.
#[test]
fn storage_entry_declaring_more_than_it_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = zip_of(&[
        ("m/data.pkl", &tensor_pickle("FloatStorage", 1 << 28)),
        ("m/data/0", &[0u8; 8]),
    ]);
    for (sig, at) in [(b"PK\x03\x04", 22), (b"PK\x01\x02", 24)] {
        let name_at = |i: usize| if sig[3] == 4 { i + 30 } else { i + 46 };
        let starts: Vec<usize> = (0..archive.len() - 4)
            .filter(|&i| &archive[i..i + 4] == sig)
            .filter(|&i| archive[name_at(i)..].starts_with(b"m/data/0"))
            .collect();
        assert_eq!(starts.len(), 1);
        archive[starts[0] + at..starts[0] + at + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
    }
    let p = write(dir.path(), "lies.pt", &archive);
    let e = checkpoint::load(&p).unwrap_err();
    assert_sentence(e, "lies.pt", "holds 8 bytes");
}

#[test]
fn devices_are_refused_as_checkpoints() {
    let e = checkpoint::load(Path::new("/dev/zero")).unwrap_err();
    assert_sentence(e, "/dev/zero", "not a regular file");
    let dir = tempfile::tempdir().unwrap();
    let out = detect(
        Path::new("/dev/zero"),
        &fixture("flair_raw.npy"),
        &dir.path().join("out"),
    );
    assert_cli_error(&out, "/dev/zero", "not a regular file");
}

/// A sparse 3 GiB file of zeros: refused from its first bytes, never read whole.
#[test]
fn large_non_checkpoint_is_refused_from_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.bin");
    std::fs::File::create(&p).unwrap().set_len(3 << 30).unwrap();
    let start = std::time::Instant::now();
    let e = checkpoint::load(&p).unwrap_err();
    assert!(start.elapsed().as_secs() < 2, "{:?}", start.elapsed());
    assert_sentence(
        e,
        "huge.bin",
        "not a torch.save zip archive nor a safetensors file",
    );
}

// ---- .npy ----

fn npy_with_header(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_owned();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn npy_shape_beyond_the_file_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 65535, 16383), }";
    let p = write(dir.path(), "claims.npy", &npy_with_header(dict, &[0; 64]));
    let e = npy::read_slices(&p).unwrap_err();
    assert_sentence(e, "claims.npy", "needs more bytes than the file's");
    let out = detect(&fixture("unet.pt"), &p, &dir.path().join("out"));
    assert_cli_error(&out, "claims.npy", "needs more bytes");
    let e = npy::read_slices(Path::new("/dev/zero")).unwrap_err();
    assert_sentence(e, "/dev/zero", "not a regular file");
}

#[test]
fn npy_header_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, dict) in [
        (
            "garbled.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, }",
        ),
        ("nodescr.npy", "{'fortran_order': False, 'shape': (2,), }"),
        ("notadict.npy", "[1, 2, 3]"),
    ] {
        let p = write(dir.path(), name, &npy_with_header(dict, &[0; 8]));
        let e = npy::read_slices(&p).unwrap_err();
        assert_sentence(e, name, "not a readable .npy file");
    }
}

// ---- PNG ----

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(body);
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// An 8-bit grey PNG header claiming `w x h` pixels, then `idat` and IEND.
fn png_claiming(w: u32, h: u32, idat: &[u8]) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(&mut b, b"IHDR", &ihdr);
    chunk(&mut b, b"IDAT", idat);
    chunk(&mut b, b"IEND", &[]);
    b
}

#[test]
fn huge_png_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "huge.png", &png_claiming(23000, 23000, &[]));
    let out = detect_with(&fixture("unet.pt"), &p, &p, &dir.path().join("out"));
    assert_cli_error(&out, "huge.png", "more than the 8192 x 8192 read");
    let start = std::time::Instant::now();
    let e = png::read_gray(&p).unwrap_err();
    assert!(start.elapsed().as_secs() < 2, "{:?}", start.elapsed());
    assert_sentence(
        e,
        "huge.png",
        "23000 x 23000 pixels, more than the 8192 x 8192 read",
    );
}

#[test]
fn png_errors_say_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.png", &png_claiming(4, 4, b"not deflate"));
    let text = format!("{:#}", png::read_gray(&p).unwrap_err());
    let parts: Vec<&str> = text.split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "repeated: {text}");
    }
    let tail = parts.last().unwrap();
    assert_eq!(text.matches(tail).count(), 1, "repeated: {text}");
    assert_sentence(png::read_gray(&p).unwrap_err(), "x.png", "PNG");
}

// ---- NIfTI ----

/// A little-endian single-file NIfTI-1 of float32 `dims` whose data starts at `offset`
/// (filler 0xEE up to it), with `slope` and `inter`.
fn nii(dims: [i16; 3], offset: f32, slope: f32, inter: f32, data: &[f32]) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    put(0, &348i32.to_le_bytes());
    put(40, &3i16.to_le_bytes());
    for (i, d) in dims.iter().chain(&[1, 1, 1, 1]).enumerate() {
        put(42 + 2 * i, &d.to_le_bytes());
    }
    put(70, &16i16.to_le_bytes());
    put(72, &32i16.to_le_bytes());
    for i in 0..4 {
        put(76 + 4 * i, &1f32.to_le_bytes());
    }
    put(108, &offset.to_le_bytes());
    put(112, &slope.to_le_bytes());
    put(116, &inter.to_le_bytes());
    put(344, b"n+1\0");
    if offset.is_finite() && offset > 352.0 && offset < 1e6 {
        h.resize(offset as usize, 0xEE);
    }
    for v in data {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn nifti_data_is_read_at_vox_offset() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = nii([2, 3, 4], 1024.0, 0.0, 0.0, &ramp(24));
    for (name, bytes) in [("off.nii", bytes.clone()), ("off.nii.gz", gzip(&bytes))] {
        let p = write(dir.path(), name, &bytes);
        let v = volume::read_volume(&p).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(v.data, ramp(24), "{name}");
    }
}

#[test]
fn nifti_bad_vox_offsets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for off in [-16.0, f32::NAN, f32::INFINITY, 0.0, 348.0, 400.5] {
        let p = write(
            dir.path(),
            "bad.nii",
            &nii([2, 2, 2], off, 1.0, 0.0, &ramp(8)),
        );
        let e = volume::read_volume(&p).unwrap_err();
        assert_sentence(e, "bad.nii", "vox_offset");
    }
    // Past the end: the header says 1 MB, the file has 384 bytes.
    let p = write(
        dir.path(),
        "far.nii",
        &nii([2, 2, 2], 1e6, 1.0, 0.0, &ramp(8)),
    );
    let e = volume::read_volume(&p).unwrap_err();
    assert_sentence(e, "far.nii", "exceed the file's");
    let p = write(
        dir.path(),
        "far.nii.gz",
        &gzip(&nii([2, 2, 2], 1e6, 1.0, 0.0, &ramp(8))),
    );
    let e = volume::read_volume(&p).unwrap_err();
    assert_sentence(e, "far.nii.gz", "vox_offset");
}

#[test]
fn nifti_gzip_is_verified_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let good = gzip(&nii([4, 4, 4], 352.0, 0.0, 0.0, &ramp(64)));
    let n = good.len();
    let mut bad_crc = good.clone();
    bad_crc[n - 8] ^= 0xff;
    let mut bad_len = good.clone();
    bad_len[n - 3] ^= 0x01;
    let mut bad_deflate = good.clone();
    bad_deflate[n / 2] ^= 0xff;
    for (name, bytes, reason) in [
        ("crc.nii.gz", &bad_crc[..], "gzip stream is corrupt"),
        ("size.nii.gz", &bad_len[..], "gzip stream is corrupt"),
        ("trailer.nii.gz", &good[..n - 4], "truncated"),
        ("deflate.nii.gz", &bad_deflate[..], "gzip"),
    ] {
        let p = write(dir.path(), name, bytes);
        let e = volume::read_volume(&p).unwrap_err();
        assert_sentence(e, name, reason);
    }
    let p = write(dir.path(), "good.nii.gz", &good);
    assert_eq!(volume::read_volume(&p).unwrap().data, ramp(64));
    let bad = dir.path().join("crc.nii.gz");
    let out = detect_with(&fixture("unet.pt"), &bad, &bad, &dir.path().join("out"));
    assert_cli_error(&out, "crc.nii.gz", "gzip stream is corrupt");
}

#[test]
fn nifti_scaling_follows_the_standard() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "s.nii",
        &nii([2, 2, 2], 352.0, 2.0, 1.0, &ramp(8)),
    );
    let want: Vec<f32> = ramp(8).iter().map(|v| 2.0 * v + 1.0).collect();
    assert_eq!(volume::read_volume(&p).unwrap().data, want);
    // Slope 0 means unscaled, the intercept included.
    let p = write(
        dir.path(),
        "z.nii",
        &nii([2, 2, 2], 352.0, 0.0, 5.0, &ramp(8)),
    );
    assert_eq!(volume::read_volume(&p).unwrap().data, ramp(8));
}

#[test]
fn nifti_dims_beyond_the_data_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let claim = nii([1200, 1200, 1200], 352.0, 0.0, 0.0, &ramp(8));
    let p = write(dir.path(), "dims.nii", &claim);
    let e = volume::read_volume(&p).unwrap_err();
    assert_sentence(e, "dims.nii", "exceed the file's");
    let claim = nii([2000, 2000, 2000], 352.0, 0.0, 0.0, &ramp(8));
    let p = write(dir.path(), "dims.nii.gz", &gzip(&claim));
    let e = volume::read_volume(&p).unwrap_err();
    assert_sentence(e, "dims.nii.gz", "more than the 2147483648 read");
    // Within the voxel cap, a .nii.gz that lacks the data fails as it runs out.
    let claim = nii([1000, 1000, 1000], 352.0, 0.0, 0.0, &ramp(8));
    let p = write(dir.path(), "short.nii.gz", &gzip(&claim));
    let e = volume::read_volume(&p).unwrap_err();
    assert_sentence(e, "short.nii.gz", "expected 4000000000");
    let e = volume::read_volume(Path::new("/dev/zero")).unwrap_err();
    assert_sentence(e, "/dev/zero", "not a regular file");
}

/// Found by the `pickle` fuzz target: a global's name with a newline in it made the error two
/// lines. Names from the file are shown with control characters escaped.
#[test]
fn names_with_newlines_are_shown_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let pkl = b"\x80\x04\x8c\x0bcollections\x8c\x0bOrder\ndDict\x93)R.";
    let e = fcd::io::pickle::parse(pkl).unwrap_err();
    assert_sentence(
        e,
        "STACK_GLOBAL",
        r"`collections.Order\ndDict` is not allowed",
    );
    let p = write(dir.path(), "nl.pt", &zip_of(&[("a/data.pkl", pkl)]));
    let e = checkpoint::load(&p).unwrap_err();
    assert_sentence(e, "nl.pt", r"Order\ndDict");
    let out = fcd(&["inspect", p.to_str().unwrap()]);
    assert_cli_error(&out, "nl.pt", r"Order\ndDict");
}

/// Found by the `npy` fuzz target: a 200-byte header nesting 66 `{` kept npyz's parser busy
/// for hours (its time grows about threefold per level).
#[test]
fn deeply_nested_npy_header_is_refused_fast() {
    let dir = tempfile::tempdir().unwrap();
    let dict = format!(
        "{{'descr':{} '<f4', 'fortran_order': False, 'shape': (2,), }}",
        "{".repeat(66)
    );
    let p = write(dir.path(), "deep.npy", &npy_with_header(&dict, &[0; 8]));
    let t = std::time::Instant::now();
    let e = fcd::io::npy::read_slices(&p).unwrap_err();
    assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
    assert_sentence(e, "deep.npy", "nests 68 levels of brackets, at most 8");
}
