//! NIfTI-1 volumes in and out (.nii and .nii.gz).
//!
//! Reading parses the header with the `nifti` crate and reads the voxel bytes
//! here, from `vox_offset`, bounded by the file and [`MAX_VOXELS`], and (for
//! .nii.gz) inflating to the end so that the gzip checksum is verified; the
//! conversion to f32 and the voxel-to-world affine are done here so that the
//! rules are explicit (and so the crate's ndarray / nalgebra features are not
//! needed). Writing builds the 348-byte NIfTI-1 header by hand because
//! a [`Volume`] carries its affine, not the header it was read from.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use nifti::{Endianness, NiftiHeader, NiftiType};

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

/// The most voxels a volume may have (2^31, 8 GiB as f32). A header alone may claim any
/// size; this and the file's length bound what is allocated before any voxel is read.
pub const MAX_VOXELS: u64 = 1 << 31;

/// Bytes of a NIfTI-1 header, and where a single-file (.nii) volume's data may start at the
/// earliest: after the header and the 4-byte extension flag.
const HEADER_LEN: usize = 348;
const MIN_VOX_OFFSET: u64 = 352;

/// Reads a 3-D NIfTI-1 volume (.nii or .nii.gz) of any real scalar datatype as f32.
///
/// Trailing singleton dimensions (e.g. a 4-D file with `dim[4] == 1`) are accepted as 3-D;
/// anything else that is not 3-D is an error listing the file's dims. The voxels are read
/// from `vox_offset`; a .nii.gz is decompressed to its end, so a bad checksum or a truncated
/// stream is an error. A `scl_slope` of 0 means "not scaled" (the NIfTI-1 rule). See
/// [`Volume::affine`] for where the affine comes from. Errors are one line naming the file.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let opened = File::open(path).context("cannot open").and_then(|file| {
        let meta = file.metadata().context("cannot open")?;
        ensure!(meta.is_file(), "not a regular file");
        Ok((file, meta.len()))
    });
    let gz = path.extension().is_some_and(|e| e == "gz");
    opened
        .and_then(|(file, len)| read_volume_from(BufReader::new(file), len, gz, path))
        .map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// [`read_volume`] on a .nii file of `len` bytes (or, `gz`, a .nii.gz file, whose inflated
/// length is not known ahead) that `src` reads; `path` is recorded in the volume. Errors are
/// one line, without the file name.
pub fn read_volume_from(mut src: impl Read, len: u64, gz: bool, path: &Path) -> Result<Volume> {
    if !gz {
        return read_stream(&mut src, Some(len), path);
    }
    let mut src = GzDecoder::new(src);
    let read = read_stream(&mut src, None, path);
    // Reading to the end is what makes flate2 check the CRC32 and length trailer. A corrupt
    // stream also explains whatever went wrong before it (garbage in the header, say).
    io::copy(&mut src, &mut io::sink())
        .map_err(|e| stream_error(e, "its checksum trailer", true))?;
    read
}

/// Reads header and voxels from `src`, the plain file of `file_len` bytes or (`None`) the
/// inflated .nii.gz stream, of which it reads only what the header needs.
fn read_stream(src: &mut dyn Read, file_len: Option<u64>, path: &Path) -> Result<Volume> {
    let gz = file_len.is_none();
    let mut head = [0u8; HEADER_LEN];
    src.read_exact(&mut head)
        .map_err(|e| stream_error(e, "its 348-byte header", gz))?;
    let header = NiftiHeader::from_reader(&head[..])
        .map_err(|_| anyhow!("not a NIfTI-1 file (no valid 348-byte header)"))?;
    ensure!(
        &header.magic == b"n+1\0",
        "not a single-file NIfTI-1 volume (magic {:?}; .hdr/.img pairs are not read)",
        String::from_utf8_lossy(&header.magic).trim_end_matches('\0')
    );
    let dims = spatial_dims(&header)?;
    let datatype = header
        .data_type()
        .map_err(|_| anyhow!("unknown datatype {}", header.datatype))?;
    let size = type_size(datatype)?;
    let n = dims.iter().map(|&d| d as u64).product::<u64>();
    ensure!(
        n <= MAX_VOXELS,
        "dims {dims:?} make {n} voxels, more than the {MAX_VOXELS} read"
    );
    let bytes = n * size as u64;
    let offset = vox_offset(&header)?;
    if let Some(len) = file_len {
        ensure!(
            offset.saturating_add(bytes) <= len,
            "vox_offset {offset} plus {bytes} bytes of {datatype:?} voxels for dims {dims:?} exceed the file's {len} bytes"
        );
    }
    let raw = read_voxels(src, offset, bytes, gz)?;
    let (slope, inter) = scaling(&header);
    let data = decode(&raw, (datatype, size), header.endianness, |v| {
        (slope * v + inter) as f32
    });
    Ok(Volume {
        dims,
        data,
        affine: header_affine(&header),
        path: path.to_path_buf(),
    })
}

/// `vox_offset` as a byte position: a whole number from 352 on (a float in the header, so
/// negative, fractional, NaN and infinite values have to be refused).
fn vox_offset(header: &NiftiHeader) -> Result<u64> {
    let v = header.vox_offset;
    ensure!(
        v.is_finite() && v.fract() == 0.0 && v >= MIN_VOX_OFFSET as f32,
        "vox_offset {v} is not a whole number of bytes from {MIN_VOX_OFFSET} on"
    );
    Ok(v as u64)
}

/// Skips from the end of the header to `offset`, then reads `bytes` bytes of voxels.
fn read_voxels(src: &mut dyn Read, offset: u64, bytes: u64, gz: bool) -> Result<Vec<u8>> {
    let gap = offset - HEADER_LEN as u64;
    let skipped = io::copy(&mut src.take(gap), &mut io::sink())
        .map_err(|e| stream_error(e, "the bytes before vox_offset", gz))?;
    ensure!(skipped == gap, "the data ends before vox_offset {offset}");
    let mut raw = Vec::new();
    // A .nii's length was checked against `bytes`; a .nii.gz's data grows as it is inflated.
    if !gz {
        raw.try_reserve_exact(bytes as usize)
            .map_err(|_| anyhow!("cannot allocate {bytes} bytes of voxel data"))?;
    }
    src.take(bytes)
        .read_to_end(&mut raw)
        .map_err(|e| stream_error(e, "the voxel data", gz))?;
    ensure!(
        raw.len() as u64 == bytes,
        "{} bytes of voxel data from vox_offset {offset}, expected {bytes} (truncated?)",
        raw.len()
    );
    Ok(raw)
}

/// An I/O error as a sentence: flate2's and std's messages, not their debug structures.
fn stream_error(e: io::Error, what: &str, gz: bool) -> anyhow::Error {
    let kind = if gz { "gzip stream" } else { "file" };
    match e.kind() {
        io::ErrorKind::UnexpectedEof => anyhow!("the {kind} is truncated (in {what})"),
        _ if gz => anyhow!("the gzip stream is corrupt (in {what}): {e}"),
        _ => anyhow!("cannot read {what}: {e}"),
    }
}

/// `(slope, inter)` to apply. NIfTI-1: a zero (or non-finite) slope means the stored values
/// are used as they are, intercept included.
fn scaling(header: &NiftiHeader) -> (f64, f64) {
    let (slope, inter) = (header.scl_slope as f64, header.scl_inter as f64);
    if slope == 0.0 || !slope.is_finite() {
        return (1.0, 0.0);
    }
    (slope, if inter.is_finite() { inter } else { 0.0 })
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

fn type_size(ty: NiftiType) -> Result<usize> {
    Ok(match ty {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Int16 | NiftiType::Uint16 => 2,
        NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Float32 => 4,
        NiftiType::Int64 | NiftiType::Uint64 | NiftiType::Float64 => 8,
        _ => bail!("datatype {ty:?} is not a supported real scalar type"),
    })
}

/// Stored values in file order, each widened to f64 and passed through `convert`; `size` is
/// `ty`'s, from [`type_size`].
fn decode(
    raw: &[u8],
    (ty, size): (NiftiType, usize),
    endian: Endianness,
    convert: impl Fn(f64) -> f32,
) -> Vec<f32> {
    let big = endian == Endianness::Big;
    let values = raw.chunks_exact(size).map(|c| {
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
    values.map(convert).collect()
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
