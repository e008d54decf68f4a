//! NIfTI volumes, slicing / resizing, overlays and PNG slices, on synthetic data made here.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fcd::io::png::read_gray;
use fcd::io::volume::{encode_like, read_volume, same_grid, world, Volume};
use fcd::outputs::overlay::{self, jet};
use fcd::slices::{axial, from_network, network_to_voxel, resize_bilinear, to_network, SliceRange};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

fn synthetic(dims: [usize; 3], affine: [[f64; 4]; 4]) -> Volume {
    let n = dims[0] * dims[1] * dims[2];
    Volume {
        dims,
        data: (0..n)
            .map(|i| (i as f32 * 0.37).sin() * 100.0 + 0.125)
            .collect(),
        affine,
        path: PathBuf::from("synthetic"),
    }
}

/// An oblique affine with f32-exact entries, negative determinant and an offset.
fn oblique() -> [[f64; 4]; 4] {
    [
        [-1.5, 0.25, 0.0, 90.5],
        [0.0, 0.0, 2.0, -126.25],
        [0.125, -1.0, 0.0, 72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Fields of a hand-made NIfTI-1 header (independent of the crate's writer).
struct Hdr {
    dim: Vec<i16>,
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 4],
    slope: f32,
    inter: f32,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
}

impl Hdr {
    fn new(dim: &[i16], datatype: i16, bitpix: i16) -> Hdr {
        Hdr {
            dim: dim.to_vec(),
            datatype,
            bitpix,
            pixdim: [1.0; 4],
            slope: 0.0,
            inter: 0.0,
            qform_code: 0,
            sform_code: 0,
            quatern: [0.0; 6],
            srow: [[0.0; 4]; 3],
        }
    }

    /// A single-file .nii: header, empty extension flag, then `data` (already in file byte order).
    fn nii(&self, big: bool, data: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        let put = |h: &mut Vec<u8>, at: usize, b: &[u8]| {
            let mut b = b.to_vec();
            if big {
                b.reverse();
            }
            h[at..at + b.len()].copy_from_slice(&b);
        };
        put(&mut h, 0, &348i32.to_le_bytes());
        put(&mut h, 40, &(self.dim.len() as i16).to_le_bytes());
        for i in 0..7 {
            let d = self.dim.get(i).copied().unwrap_or(1);
            put(&mut h, 42 + 2 * i, &d.to_le_bytes());
        }
        put(&mut h, 70, &self.datatype.to_le_bytes());
        put(&mut h, 72, &self.bitpix.to_le_bytes());
        for (i, p) in self.pixdim.iter().enumerate() {
            put(&mut h, 76 + 4 * i, &p.to_le_bytes());
        }
        put(&mut h, 108, &352f32.to_le_bytes());
        put(&mut h, 112, &self.slope.to_le_bytes());
        put(&mut h, 116, &self.inter.to_le_bytes());
        put(&mut h, 252, &self.qform_code.to_le_bytes());
        put(&mut h, 254, &self.sform_code.to_le_bytes());
        for (i, q) in self.quatern.iter().enumerate() {
            put(&mut h, 256 + 4 * i, &q.to_le_bytes());
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                put(&mut h, 280 + 16 * r + 4 * c, &v.to_le_bytes());
            }
        }
        h[344..348].copy_from_slice(b"n+1\0");
        h.extend_from_slice(data);
        h
    }
}

fn assert_affine_near(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4], tol: f64) {
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() <= tol, "affine {a:?} vs {b:?}");
        }
    }
}

#[test]
fn encode_then_read_is_exact_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let v = synthetic([5, 4, 3], oblique());
    let bytes = encode_like(&v, &v.data).unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "output is gzipped");
    let p = write(dir.path(), "out.nii.gz", &bytes);
    let back = read_volume(&p).unwrap();
    assert_eq!(back.dims, v.dims);
    assert_eq!(back.data, v.data);
    assert_eq!(back.affine, v.affine);
    assert_eq!(back.path, p);
    // Re-encoding what was read reproduces the same bytes (header derived from the grid only).
    assert_eq!(encode_like(&back, &back.data).unwrap(), bytes);
    // Uncompressed .nii of the same content reads the same.
    let p2 = write(dir.path(), "out.nii", &gunzip(&bytes));
    let back2 = read_volume(&p2).unwrap();
    assert_eq!(back2.data, v.data);
    assert_eq!(back2.affine, v.affine);
    same_grid(&back, &back2).unwrap();
}

#[test]
fn written_header_fields() {
    let v = synthetic([5, 4, 3], oblique());
    let raw = gunzip(&encode_like(&v, &v.data).unwrap());
    assert_eq!(raw.len(), 352 + 4 * 60);
    let i16_at = |at: usize| i16::from_le_bytes([raw[at], raw[at + 1]]);
    let f32_at = |at: usize| f32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    assert_eq!(i32::from_le_bytes(raw[0..4].try_into().unwrap()), 348);
    assert_eq!(
        (0..4).map(|i| i16_at(40 + 2 * i)).collect::<Vec<_>>(),
        [3, 5, 4, 3]
    );
    assert_eq!((i16_at(70), i16_at(72)), (16, 32));
    assert_eq!(f32_at(108), 352.0);
    assert_eq!((f32_at(112), f32_at(116)), (1.0, 0.0));
    assert_eq!((f32_at(124), f32_at(128)), (0.0, 0.0));
    assert_eq!(&raw[344..348], b"n+1\0");
    // pixdim = voxel sizes (column norms), qfac = -1 for this left-handed affine
    assert_eq!(f32_at(76), -1.0);
    let norm0 = (1.5f64 * 1.5 + 0.125 * 0.125).sqrt() as f32;
    assert!((f32_at(80) - norm0).abs() < 1e-6);
    assert!((f32_at(84) - (0.25f32 * 0.25 + 1.0).sqrt()).abs() < 1e-6);
    assert_eq!(f32_at(88), 2.0);
}

#[test]
fn written_qform_matches_an_orthogonal_affine() {
    let dir = tempfile::tempdir().unwrap();
    // rotation of 30 degrees about z, voxel 1.2 x 0.9 x 2.0, z flipped (qfac -1)
    let (s, c) = (30f64.to_radians().sin(), 30f64.to_radians().cos());
    let rounded = |x: f64| x as f32 as f64;
    let affine = [
        [rounded(c * 1.2), rounded(-s * 0.9), 0.0, 12.5],
        [rounded(s * 1.2), rounded(c * 0.9), 0.0, -3.0],
        [0.0, 0.0, -2.0, 40.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for affine in [affine, oblique_orthogonal()] {
        let v = synthetic([3, 3, 2], affine);
        let mut raw = gunzip(&encode_like(&v, &v.data).unwrap());
        assert_eq!(i16::from_le_bytes([raw[252], raw[253]]), 1, "qform_code");
        raw[254..256].copy_from_slice(&0i16.to_le_bytes()); // sform_code 0: use the qform
        let p = write(dir.path(), "q.nii", &raw);
        let back = read_volume(&p).unwrap();
        assert_affine_near(&back.affine, &affine, 1e-5);
    }
}

/// A 180-degree rotation (the quaternion's a = 0 case) with anisotropic voxels.
fn oblique_orthogonal() -> [[f64; 4]; 4] {
    [
        [-2.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 3.0, 2.0],
        [0.0, 1.5, 0.0, 3.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

#[test]
fn hand_made_int16_qform_only() {
    let dir = tempfile::tempdir().unwrap();
    // 90 degrees about z: a = cos 45, d = sin 45; pixdim (qfac -1, 2, 3, 4), offsets (10, 20, 30)
    let mut h = Hdr::new(&[4, 3, 2], 4, 16);
    h.pixdim = [-1.0, 2.0, 3.0, 4.0];
    h.qform_code = 1;
    h.quatern = [0.0, 0.0, std::f32::consts::FRAC_1_SQRT_2, 10.0, 20.0, 30.0];
    h.slope = 2.0;
    h.inter = -1.0;
    let stored: Vec<i16> = (0..24).map(|i| i as i16 * 100 - 700).collect();
    let data: Vec<u8> = stored.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = write(dir.path(), "hand.nii", &h.nii(false, &data));
    let v = read_volume(&p).unwrap();
    assert_eq!(v.dims, [4, 3, 2]);
    let expected: Vec<f32> = stored.iter().map(|&s| 2.0 * s as f32 - 1.0).collect();
    assert_eq!(v.data, expected);
    let affine = [
        [0.0, -3.0, 0.0, 10.0],
        [2.0, 0.0, 0.0, 20.0],
        [0.0, 0.0, -4.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert_affine_near(&v.affine, &affine, 1e-6);
    // data order: x fastest, then y, then z
    let at = |x: usize, y: usize, z: usize| v.data[x + 4 * (y + 3 * z)];
    assert_eq!(at(1, 2, 1), expected[1 + 4 * 2 + 12]);
    let w = world(&v.affine, [1.0, 2.0, 1.0]);
    assert!((w[0] - 4.0).abs() < 1e-6 && (w[1] - 22.0).abs() < 1e-6 && (w[2] - 26.0).abs() < 1e-6);
}

#[test]
fn sform_wins_and_pixdim_fallback_and_big_endian() {
    let dir = tempfile::tempdir().unwrap();
    // big-endian float64 with both forms: the sform is used
    let mut h = Hdr::new(&[2, 2, 2], 64, 64);
    h.qform_code = 1;
    h.sform_code = 2;
    h.srow = [
        [0.0, 1.0, 0.0, -5.0],
        [1.0, 0.0, 0.0, 6.0],
        [0.0, 0.0, 1.0, 7.0],
    ];
    let values: Vec<f64> = (0..8).map(|i| i as f64 * 0.5 - 1.0).collect();
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    let p = write(dir.path(), "be.nii.gz", &gzip(&h.nii(true, &data)));
    let v = read_volume(&p).unwrap();
    assert_eq!(v.data, values.iter().map(|&x| x as f32).collect::<Vec<_>>());
    assert_eq!(v.affine[0], [0.0, 1.0, 0.0, -5.0]);
    assert_eq!(v.affine[1], [1.0, 0.0, 0.0, 6.0]);

    // uint8 without either form: diag(pixdim); slope 0 means unscaled
    let mut h = Hdr::new(&[2, 1, 3], 2, 8);
    h.pixdim = [1.0, 0.5, 0.75, 3.0];
    h.inter = 100.0;
    let p = write(
        dir.path(),
        "u8.nii",
        &h.nii(false, &[0, 1, 2, 250, 254, 255]),
    );
    let v = read_volume(&p).unwrap();
    assert_eq!(v.data, [0.0, 1.0, 2.0, 250.0, 254.0, 255.0]);
    assert_eq!(
        v.affine,
        [
            [0.5, 0.0, 0.0, 0.0],
            [0.0, 0.75, 0.0, 0.0],
            [0.0, 0.0, 3.0, 0.0],
            [0.0, 0.0, 0.0, 1.0]
        ]
    );
}

#[test]
fn four_d_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..24u8).collect();
    let p = write(
        dir.path(),
        "single.nii",
        &Hdr::new(&[2, 3, 4, 1], 2, 8).nii(false, &data),
    );
    let v = read_volume(&p).unwrap();
    assert_eq!(v.dims, [2, 3, 4]);
    let p = write(
        dir.path(),
        "series.nii",
        &Hdr::new(&[2, 3, 2, 2], 2, 8).nii(false, &data),
    );
    let err = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(err.contains("series.nii"), "{err}");
    assert!(err.contains("[2, 3, 2, 2]"), "{err}");
    let p = write(
        dir.path(),
        "flat.nii",
        &Hdr::new(&[4, 6], 2, 8).nii(false, &data),
    );
    let err = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(err.contains("flat.nii") && err.contains("2-D"), "{err}");
}

#[test]
fn unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.nii.gz");
    let err = format!("{:#}", read_volume(&missing).unwrap_err());
    assert!(err.contains("nope.nii.gz"), "{err}");

    let v = synthetic([6, 5, 4], oblique());
    let bytes = encode_like(&v, &v.data).unwrap();
    let p = write(dir.path(), "cut.nii.gz", &bytes[..bytes.len() / 2]);
    let err = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(err.contains("cut.nii.gz"), "{err}");

    let raw = gunzip(&bytes);
    let p = write(dir.path(), "short.nii", &raw[..raw.len() - 8]);
    let err = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(err.contains("short.nii"), "{err}");

    let p = write(dir.path(), "text.nii", b"this is not a nifti file");
    let err = format!("{:#}", read_volume(&p).unwrap_err());
    assert!(err.contains("text.nii"), "{err}");

    let err = format!("{:#}", encode_like(&v, &v.data[1..]).unwrap_err());
    assert!(err.contains("[6, 5, 4]"), "{err}");
}

#[test]
fn grid_comparison() {
    let mut a = synthetic([4, 4, 4], oblique());
    a.path = PathBuf::from("sub-01_T1w.nii.gz");
    let mut b = a.clone();
    b.path = PathBuf::from("sub-01_FLAIR.nii.gz");
    b.affine[0][3] += 5e-5;
    same_grid(&a, &b).unwrap();
    b.affine[1][2] += 1e-3;
    let err = format!("{:#}", same_grid(&a, &b).unwrap_err());
    assert!(
        err.contains("sub-01_T1w.nii.gz") && err.contains("sub-01_FLAIR.nii.gz"),
        "{err}"
    );
    let mut c = synthetic([4, 4, 5], oblique());
    c.path = PathBuf::from("other.nii");
    let err = format!("{:#}", same_grid(&a, &c).unwrap_err());
    assert!(
        err.contains("[4, 4, 4]") && err.contains("[4, 4, 5]") && err.contains("other.nii"),
        "{err}"
    );
}

#[test]
fn slice_ranges() {
    assert_eq!(
        SliceRange::default(),
        SliceRange {
            first: 75,
            last: 125
        }
    );
    assert_eq!(
        "75:125".parse::<SliceRange>().unwrap(),
        SliceRange::default()
    );
    assert_eq!(
        " 3:3 ".parse::<SliceRange>().unwrap(),
        SliceRange { first: 3, last: 3 }
    );
    assert_eq!(SliceRange::default().count(), 51);
    assert_eq!(SliceRange::default().to_string(), "75:125");
    for bad in ["125:75", "a:b", "5", "", "1:2:3", "-1:4"] {
        let err = format!("{:#}", bad.parse::<SliceRange>().unwrap_err());
        assert!(err.contains("FIRST:LAST"), "{bad}: {err}");
    }
}

#[test]
fn resize_matches_pytorch_half_pixel_rule() {
    // F.interpolate(torch.arange(4.).view(1, 1, 2, 2), size=(4, 4), mode="bilinear",
    // align_corners=False)
    let up = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
    #[rustfmt::skip]
    let expected = [
        0.0, 0.25, 0.75, 1.0,
        0.5, 0.75, 1.25, 1.5,
        1.5, 1.75, 2.25, 2.5,
        2.0, 2.25, 2.75, 3.0,
    ];
    assert_eq!(up, expected);
    // downsampling by 2 samples between pixel pairs; 3 -> 2 samples at 0.25 and 1.75
    assert_eq!(
        resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 1, 4, 1, 2),
        [0.5, 2.5]
    );
    assert_eq!(resize_bilinear(&[0.0, 1.0, 2.0], 1, 3, 1, 2), [0.25, 1.75]);
    // non-square: rows and columns are independent
    let img: Vec<f32> = (0..6).map(|i| i as f32).collect(); // 2 x 3
    let out = resize_bilinear(&img, 2, 3, 1, 3);
    assert_eq!(out, [1.5, 2.5, 3.5]);
}

#[test]
fn resize_properties() {
    let (h, w) = (7, 5);
    let img: Vec<f32> = (0..h * w).map(|i| (i as f32 * 1.7).cos()).collect();
    assert_eq!(resize_bilinear(&img, h, w, h, w), img);
    let constant = vec![3.25f32; h * w];
    for (oh, ow) in [(16, 16), (3, 9), (1, 1)] {
        let out = resize_bilinear(&constant, h, w, oh, ow);
        assert_eq!(out.len(), oh * ow);
        assert!(out.iter().all(|&v| (v - 3.25).abs() < 1e-6));
    }
    // a ramp in x stays a ramp, sampled at the half-pixel source positions, inside the image
    let (h, w, ow) = (3, 10, 24);
    let ramp: Vec<f32> = (0..h * w).map(|i| 2.0 * (i % w) as f32 + 1.0).collect();
    let out = resize_bilinear(&ramp, h, w, 2, ow);
    for r in 0..2 {
        for c in 0..ow {
            let src = (c as f64 + 0.5) * w as f64 / ow as f64 - 0.5;
            if src >= 0.0 && src <= (w - 1) as f64 {
                let want = 2.0 * src + 1.0;
                assert!((out[r * ow + c] as f64 - want).abs() < 1e-4, "col {c}");
            }
        }
    }
}

#[test]
fn network_round_trip_and_layout() {
    let v = synthetic([6, 4, 10], oblique());
    // axial slice: rows are y, columns are x
    let s = axial(&v, 3);
    assert_eq!(s.len(), 24);
    assert_eq!(s[2 * 6 + 5], v.data[5 + 6 * (2 + 4 * 3)]);

    let range: SliceRange = "2:5".parse().unwrap();
    let net = to_network(&v, range, 32).unwrap();
    assert_eq!(net.len(), 4 * 32 * 32);
    let back = from_network(&net, 32, v.dims, range);
    assert_eq!(back.len(), v.data.len());
    let plane = 24;
    for z in 0..10 {
        let sl = &back[plane * z..plane * (z + 1)];
        if range.first <= z && z <= range.last {
            assert!(sl.iter().any(|&x| x != 0.0));
        } else {
            assert!(sl.iter().all(|&x| x == 0.0), "slice {z} outside the range");
        }
    }

    // equal sizes: both directions are the identity
    let sq = synthetic([8, 8, 3], oblique());
    let all = SliceRange { first: 0, last: 2 };
    let net = to_network(&sq, all, 8).unwrap();
    assert_eq!(net, sq.data);
    assert_eq!(from_network(&net, 8, sq.dims, all), sq.data);

    // a range past the last slice is an error naming the volume
    let err = format!(
        "{:#}",
        to_network(&v, SliceRange { first: 8, last: 10 }, 32).unwrap_err()
    );
    assert!(err.contains("synthetic") && err.contains("8:10"), "{err}");
}

#[test]
fn network_pixels_to_voxels() {
    assert_eq!(network_to_voxel(3, 5, 8, 8, 8), (5.0, 3.0));
    let (x, y) = network_to_voxel(0, 128, 256, 240, 240);
    assert_eq!(y, 0.0, "clamped at the edge");
    assert!((x - (128.5 * 240.0 / 256.0 - 0.5)).abs() < 1e-12);
    let (x, y) = network_to_voxel(255, 255, 256, 240, 200);
    assert!(x <= 239.0 && y <= 199.0);
    // the half-pixel mapping at a 2x upsampling
    let (x, _) = network_to_voxel(0, 15, 32, 16, 16);
    assert!((x - 7.25).abs() < 1e-12);
}

#[test]
fn jet_endpoints() {
    assert_eq!(jet(0.0), [0, 0, 128]);
    assert_eq!(jet(0.5), [128, 255, 128]);
    assert_eq!(jet(1.0), [128, 0, 0]);
    assert_eq!(jet(2.0), jet(1.0));
    assert_eq!(jet(f32::NAN), jet(0.0));
}

/// The overlay as PNG bytes, as `fcd detect` writes it.
fn overlay_png(
    flair: &[f32],
    anomaly: &[f32],
    mask: Option<&[bool]>,
    h: usize,
    w: usize,
) -> anyhow::Result<Vec<u8>> {
    overlay::png(&overlay::overlay(flair, anomaly, mask, h, w)?)
}

#[test]
fn overlay_colours_and_outline() {
    let (h, w) = (6, 7);
    let flair: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
    let mut anomaly = vec![0.0f32; h * w];
    anomaly[w * 5 + 6] = 1.0;
    anomaly[w * 5 + 5] = 0.5;
    let mut mask = vec![false; h * w];
    for r in 1..4 {
        for c in 1..4 {
            mask[r * w + c] = true;
        }
    }
    let png = overlay_png(&flair, &anomaly, Some(&mask), h, w).unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8);
    let img = img.to_rgb8();
    assert_eq!((img.width(), img.height()), (w as u32, h as u32));
    let px = |r: u32, c: u32| img.get_pixel(c, r).0;
    // zero anomaly: the FLAIR's grey level, min-max scaled
    let p = px(4, 5);
    assert_eq!(p[0], p[1]);
    assert_eq!(p[1], p[2]);
    assert_eq!(p[0], ((4 * 7 + 5) as f32 / 41.0 * 255.0).round() as u8);
    assert_eq!(px(0, 0), [0, 0, 0]);
    // anomaly 1: red dominates
    let p = px(5, 6);
    assert!(p[0] > p[1] && p[0] > p[2], "{p:?}");
    // outline: the ring of the 3 x 3 mask is green, its centre is not
    for (r, c) in [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 3),
        (3, 1),
        (3, 2),
        (3, 3),
    ] {
        assert_eq!(px(r, c), [0, 255, 0], "({r}, {c})");
    }
    assert_ne!(px(2, 2), [0, 255, 0]);
    // without a mask nothing is green
    let png = overlay_png(&flair, &anomaly, None, h, w).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert!(img.pixels().all(|p| p.0 != [0, 255, 0]));

    assert!(overlay_png(&flair, &anomaly[1..], None, h, w).is_err());
    // constant FLAIR: black under the map, no division by zero
    let png = overlay_png(&vec![5.0; h * w], &vec![0.0; h * w], None, h, w).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert!(img.pixels().all(|p| p.0 == [0, 0, 0]));
}

#[test]
fn png_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p8 = dir.path().join("a_T1w.png");
    let g8: Vec<u8> = (0..12).map(|i| i * 20).collect();
    image::GrayImage::from_raw(4, 3, g8.clone())
        .unwrap()
        .save(&p8)
        .unwrap();
    let (h, w, v) = read_gray(&p8).unwrap();
    assert_eq!((h, w), (3, 4));
    assert_eq!(v, g8.iter().map(|&x| x as f32).collect::<Vec<_>>());

    let p16 = dir.path().join("a_FLAIR.png");
    let g16: Vec<u16> = vec![0, 1000, 40000, 65535, 7, 300];
    image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 3, g16.clone())
        .unwrap()
        .save(&p16)
        .unwrap();
    let (h, w, v) = read_gray(&p16).unwrap();
    assert_eq!((h, w), (3, 2));
    assert_eq!(v, g16.iter().map(|&x| x as f32).collect::<Vec<_>>());

    let prgb = dir.path().join("roi.png");
    let rgb: Vec<u8> = vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 10, 10];
    image::RgbImage::from_raw(2, 2, rgb)
        .unwrap()
        .save(&prgb)
        .unwrap();
    let (h, w, v) = read_gray(&prgb).unwrap();
    assert_eq!((h, w), (2, 2));
    let want = [0.299 * 255.0, 0.587 * 255.0, 0.114 * 255.0, 10.0];
    for (a, b) in v.iter().zip(want) {
        assert!((a - b).abs() < 1e-3, "{v:?}");
    }

    let pla = dir.path().join("la.png");
    image::GrayAlphaImage::from_raw(2, 1, vec![9, 255, 200, 0])
        .unwrap()
        .save(&pla)
        .unwrap();
    assert_eq!(read_gray(&pla).unwrap().2, [9.0, 200.0]);

    let bad = write(dir.path(), "broken.png", b"\x89PNG\r\n\x1a\nnot really");
    let err = format!("{:#}", read_gray(&bad).unwrap_err());
    assert!(err.contains("broken.png"), "{err}");
    let err = format!("{:#}", read_gray(&dir.path().join("gone.png")).unwrap_err());
    assert!(err.contains("gone.png"), "{err}");
}
