//! NIfTI-1 volumes in and out (.nii and .nii.gz).
//!
//! Reading goes through the `nifti` crate for the header and the raw voxel
//! bytes; the conversion to f32 and the voxel-to-world affine are done here so
//! that the rules are explicit (and so the crate's ndarray / nalgebra features
//! are not needed). Writing builds the 348-byte NIfTI-1 header by hand because
//! a [`Volume`] carries its affine, not the header it was read from.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use nifti::{Endianness, NiftiHeader, NiftiObject, NiftiType, ReaderOptions};

/// A 3-D scalar volume on a voxel grid with its voxel-to-world (mm) affine.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// Voxel counts (nx, ny, nz).
    pub dims: [usize; 3],
    /// Voxel values, index `x + nx * (y + ny * z)`, with scl_slope / scl_inter applied.
    pub data: Vec<f32>,
    /// Voxel (x, y, z, 1) to world (mm). Taken from the sform when `sform_code > 0`, else
    /// from the qform (quaternion, offsets and pixdim with qfac) when `qform_code > 0`,
    /// else the NIfTI "method 1" fallback `diag(pixdim[1], pixdim[2], pixdim[3], 1)`.
    pub affine: [[f64; 4]; 4],
    /// The file this volume was read from (for messages); empty for synthetic volumes.
    pub path: PathBuf,
}

/// Reads a 3-D NIfTI-1 volume (.nii or .nii.gz) of any real scalar datatype as f32.
///
/// Trailing singleton dimensions (e.g. a 4-D file with `dim[4] == 1`) are accepted as 3-D;
/// anything else that is not 3-D is an error listing the file's dims. A `scl_slope` of 0
/// means "not scaled" (the NIfTI-1 rule). See [`Volume::affine`] for where the affine comes from.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let header = NiftiHeader::from_file(path)
        .with_context(|| format!("{}: not a readable NIfTI-1 file", path.display()))?;
    let dims = spatial_dims(&header).with_context(|| path.display().to_string())?;
    let object = ReaderOptions::new()
        .read_file(path)
        .with_context(|| format!("{}: cannot read the NIfTI-1 volume", path.display()))?;
    let raw = object.volume().raw_data();
    let n = dims[0] * dims[1] * dims[2];
    let datatype = header
        .data_type()
        .with_context(|| format!("{}: unknown datatype {}", path.display(), header.datatype))?;
    let (slope, inter) = (header.scl_slope as f64, header.scl_inter as f64);
    // NIfTI-1: a zero (or non-finite) slope means the stored values are used as they are.
    let scaled = slope != 0.0 && slope.is_finite() && (slope != 1.0 || inter != 0.0);
    let inter = if inter.is_finite() { inter } else { 0.0 };
    let data = decode(raw, datatype, header.endianness, n, |v| {
        if scaled {
            (slope * v + inter) as f32
        } else {
            v as f32
        }
    })
    .with_context(|| path.display().to_string())?;
    Ok(Volume {
        dims,
        data,
        affine: header_affine(&header),
        path: path.to_path_buf(),
    })
}

/// Checks that two volumes share a voxel grid: equal dims and every affine entry within 1e-4 mm.
pub fn same_grid(a: &Volume, b: &Volume) -> Result<()> {
    let close = a
        .affine
        .iter()
        .flatten()
        .zip(b.affine.iter().flatten())
        .all(|(p, q)| (p - q).abs() <= 1e-4);
    if a.dims != b.dims || !close {
        bail!(
            "{} and {} are not on the same voxel grid: dims {:?} vs {:?}, affine {} vs {}",
            a.path.display(),
            b.path.display(),
            a.dims,
            b.dims,
            affine_text(&a.affine),
            affine_text(&b.affine)
        );
    }
    Ok(())
}

/// Gzipped NIfTI-1 (.nii.gz) bytes of float32 `data` on `reference`'s grid.
///
/// The header is rebuilt from the reference's dims and affine: sform = the affine (code 1),
/// qform = its rotation / voxel size / offset decomposition (code 1, or 0 when the affine has
/// no such decomposition), pixdim = the affine's column norms, scl_slope 1, scl_inter 0,
/// cal_min / cal_max 0. Reading the bytes back gives the same data and the affine rounded to f32.
pub fn encode_like(reference: &Volume, data: &[f32]) -> Result<Vec<u8>> {
    let [nx, ny, nz] = reference.dims;
    if data.len() != nx * ny * nz {
        bail!(
            "encoding a volume like {}: {} values for dims {:?}",
            reference.path.display(),
            data.len(),
            reference.dims
        );
    }
    let mut dim = [1i16; 8];
    dim[0] = 3;
    for (d, &n) in dim[1..4].iter_mut().zip(&reference.dims) {
        *d = i16::try_from(n).with_context(|| {
            format!(
                "encoding a volume like {}: dims {:?} do not fit NIfTI-1",
                reference.path.display(),
                reference.dims
            )
        })?;
    }
    let a = &reference.affine;
    let q = Qform::from_affine(a);
    let mut h = HeaderBytes::new();
    h.i32(0, 348);
    for (i, &d) in dim.iter().enumerate() {
        h.i16(40 + 2 * i, d);
    }
    h.i16(70, 16); // float32
    h.i16(72, 32);
    let pixdim = [
        q.qfac, q.voxel[0], q.voxel[1], q.voxel[2], 0.0, 0.0, 0.0, 0.0,
    ];
    for (i, &p) in pixdim.iter().enumerate() {
        h.f32(76 + 4 * i, p as f32);
    }
    h.f32(108, 352.0);
    h.f32(112, 1.0);
    h.f32(116, 0.0);
    h.bytes(123, &[2]); // spatial units: mm
    h.bytes(148, b"fcd");
    h.i16(252, if q.valid { 1 } else { 0 });
    h.i16(254, 1);
    for (i, &v) in [q.b, q.c, q.d, a[0][3], a[1][3], a[2][3]]
        .iter()
        .enumerate()
    {
        h.f32(256 + 4 * i, v as f32);
    }
    for (r, row) in a.iter().take(3).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            h.f32(280 + 16 * r + 4 * c, v as f32);
        }
    }
    h.bytes(344, b"n+1\0");

    let mut raw = Vec::with_capacity(352 + 4 * data.len());
    raw.extend_from_slice(&h.0);
    raw.extend_from_slice(&[0u8; 4]); // no extensions
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    let mut gz = GzEncoder::new(Vec::new(), Compression::new(6));
    gz.write_all(&raw).context("gzip of a NIfTI volume")?;
    gz.finish().context("gzip of a NIfTI volume")
}

/// World (mm) coordinates of a voxel position under `affine`.
pub fn world(affine: &[[f64; 4]; 4], voxel: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (o, row) in out.iter_mut().zip(affine) {
        *o = row[0] * voxel[0] + row[1] * voxel[1] + row[2] * voxel[2] + row[3];
    }
    out
}

fn spatial_dims(header: &NiftiHeader) -> Result<[usize; 3]> {
    let ndim = header.dim[0] as usize;
    let listed: Vec<u16> = header.dim[1..=ndim.clamp(1, 7)].to_vec();
    let ok = (3..=7).contains(&ndim)
        && listed[..3].iter().all(|&d| d > 0)
        && listed[3..].iter().all(|&d| d == 1);
    if !ok {
        bail!("expected a 3-D volume, found {ndim}-D with dims {listed:?}");
    }
    Ok([listed[0] as usize, listed[1] as usize, listed[2] as usize])
}

/// Stored values in file order, each widened to f64 and passed through `convert`.
fn decode(
    raw: &[u8],
    ty: NiftiType,
    endian: Endianness,
    n: usize,
    convert: impl Fn(f64) -> f32,
) -> Result<Vec<f32>> {
    let size = match ty {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Int16 | NiftiType::Uint16 => 2,
        NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Float32 => 4,
        NiftiType::Int64 | NiftiType::Uint64 | NiftiType::Float64 => 8,
        _ => bail!("datatype {ty:?} is not a supported real scalar type"),
    };
    if raw.len() < n * size {
        bail!("{} bytes of voxel data, expected {}", raw.len(), n * size);
    }
    let big = endian == Endianness::Big;
    let values = raw[..n * size].chunks_exact(size).map(|c| {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(c);
        if big {
            b[..size].reverse();
        }
        match ty {
            NiftiType::Uint8 => b[0] as f64,
            NiftiType::Int8 => b[0] as i8 as f64,
            NiftiType::Int16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            NiftiType::Uint16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            NiftiType::Int32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            NiftiType::Uint32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            NiftiType::Float32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            NiftiType::Int64 => i64::from_le_bytes(b) as f64,
            NiftiType::Uint64 => u64::from_le_bytes(b) as f64,
            _ => f64::from_le_bytes(b),
        }
    });
    Ok(values.map(convert).collect())
}

fn header_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    a[3][3] = 1.0;
    if h.sform_code > 0 {
        for (row, srow) in a.iter_mut().zip([h.srow_x, h.srow_y, h.srow_z]) {
            for (o, &v) in row.iter_mut().zip(&srow) {
                *o = v as f64;
            }
        }
        return a;
    }
    let pixdim = |i: usize| {
        let p = h.pixdim[i] as f64;
        if p > 0.0 {
            p
        } else {
            1.0
        }
    };
    if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let aa = 1.0 - (b * b + c * c + d * d);
        // A quaternion slightly over unit length (f32 rounding) is a 180-degree rotation.
        let (qa, b, c, d) = if aa < 1e-7 {
            let s = (b * b + c * c + d * d).sqrt();
            (0.0, b / s, c / s, d / s)
        } else {
            (aa.sqrt(), b, c, d)
        };
        let r = [
            [
                qa * qa + b * b - c * c - d * d,
                2.0 * (b * c - qa * d),
                2.0 * (b * d + qa * c),
            ],
            [
                2.0 * (b * c + qa * d),
                qa * qa + c * c - b * b - d * d,
                2.0 * (c * d - qa * b),
            ],
            [
                2.0 * (b * d - qa * c),
                2.0 * (c * d + qa * b),
                qa * qa + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let scale = [pixdim(1), pixdim(2), qfac * pixdim(3)];
        let offset = [h.quatern_x, h.quatern_y, h.quatern_z];
        for i in 0..3 {
            for j in 0..3 {
                a[i][j] = r[i][j] * scale[j];
            }
            a[i][3] = offset[i] as f64;
        }
        return a;
    }
    for (i, row) in a.iter_mut().take(3).enumerate() {
        row[i] = pixdim(i + 1);
    }
    a
}

fn affine_text(a: &[[f64; 4]; 4]) -> String {
    let rows: Vec<String> = a
        .iter()
        .take(3)
        .map(|r| format!("[{:.4} {:.4} {:.4} {:.4}]", r[0], r[1], r[2], r[3]))
        .collect();
    rows.join(" ")
}

/// The qform view of an affine: voxel sizes, qfac and the rotation as a unit quaternion.
struct Qform {
    voxel: [f64; 3],
    qfac: f64,
    b: f64,
    c: f64,
    d: f64,
    /// False when the 3x3 part is singular; the qform is then not written.
    valid: bool,
}

impl Qform {
    fn from_affine(a: &[[f64; 4]; 4]) -> Qform {
        let col = |j: usize| [a[0][j], a[1][j], a[2][j]];
        let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        let voxel = [norm(col(0)), norm(col(1)), norm(col(2))];
        let invalid = Qform {
            voxel: voxel.map(|v| if v > 0.0 { v } else { 1.0 }),
            qfac: 1.0,
            b: 0.0,
            c: 0.0,
            d: 0.0,
            valid: false,
        };
        if voxel.iter().any(|&v| v <= 1e-12 || !v.is_finite()) {
            return invalid;
        }
        // Gram-Schmidt makes a rotation of a sheared affine; the sform keeps the exact matrix.
        let unit = |v: [f64; 3]| {
            let n = norm(v);
            [v[0] / n, v[1] / n, v[2] / n]
        };
        let dot = |u: [f64; 3], v: [f64; 3]| u[0] * v[0] + u[1] * v[1] + u[2] * v[2];
        let sub =
            |u: [f64; 3], v: [f64; 3], k: f64| [u[0] - k * v[0], u[1] - k * v[1], u[2] - k * v[2]];
        let e0 = unit(col(0));
        let v1 = sub(col(1), e0, dot(col(1), e0));
        if norm(v1) <= 1e-12 {
            return invalid;
        }
        let e1 = unit(v1);
        let v2 = sub(sub(col(2), e0, dot(col(2), e0)), e1, dot(col(2), e1));
        if norm(v2) <= 1e-12 {
            return invalid;
        }
        let mut e2 = unit(v2);
        let cross = [
            e0[1] * e1[2] - e0[2] * e1[1],
            e0[2] * e1[0] - e0[0] * e1[2],
            e0[0] * e1[1] - e0[1] * e1[0],
        ];
        let qfac = if dot(cross, e2) < 0.0 { -1.0 } else { 1.0 };
        e2 = e2.map(|v| v * qfac);
        // r[i][j]: row i, column j of the proper rotation.
        let r = [
            [e0[0], e1[0], e2[0]],
            [e0[1], e1[1], e2[1]],
            [e0[2], e1[2], e2[2]],
        ];
        let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
        let (qa, b, c, d);
        if trace > 0.5 {
            qa = 0.5 * trace.sqrt();
            b = 0.25 * (r[2][1] - r[1][2]) / qa;
            c = 0.25 * (r[0][2] - r[2][0]) / qa;
            d = 0.25 * (r[1][0] - r[0][1]) / qa;
        } else {
            let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
            let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
            let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
            if xd > 1.0 {
                b = 0.5 * xd.sqrt();
                c = 0.25 * (r[0][1] + r[1][0]) / b;
                d = 0.25 * (r[0][2] + r[2][0]) / b;
                qa = 0.25 * (r[2][1] - r[1][2]) / b;
            } else if yd > 1.0 {
                c = 0.5 * yd.sqrt();
                b = 0.25 * (r[0][1] + r[1][0]) / c;
                d = 0.25 * (r[1][2] + r[2][1]) / c;
                qa = 0.25 * (r[0][2] - r[2][0]) / c;
            } else {
                d = 0.5 * zd.sqrt();
                b = 0.25 * (r[0][2] + r[2][0]) / d;
                c = 0.25 * (r[1][2] + r[2][1]) / d;
                qa = 0.25 * (r[1][0] - r[0][1]) / d;
            }
        }
        // The stored quaternion has a >= 0 (a itself is implied), so flip the sign if needed.
        let s = if qa < 0.0 { -1.0 } else { 1.0 };
        Qform {
            voxel,
            qfac,
            b: s * b,
            c: s * c,
            d: s * d,
            valid: true,
        }
    }
}

/// A zeroed little-endian NIfTI-1 header being filled in at byte offsets.
struct HeaderBytes([u8; 348]);

impl HeaderBytes {
    fn new() -> Self {
        HeaderBytes([0; 348])
    }
    fn bytes(&mut self, at: usize, b: &[u8]) {
        self.0[at..at + b.len()].copy_from_slice(b);
    }
    fn i16(&mut self, at: usize, v: i16) {
        self.bytes(at, &v.to_le_bytes());
    }
    fn i32(&mut self, at: usize, v: i32) {
        self.bytes(at, &v.to_le_bytes());
    }
    fn f32(&mut self, at: usize, v: f32) {
        self.bytes(at, &v.to_le_bytes());
    }
}
