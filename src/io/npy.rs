//! NumPy `.npy` input and output.

use super::atomic::write_atomic;
use anyhow::{anyhow, bail, ensure, Context, Result};
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};
use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::Path;

/// A stack of `b` slices of `h x w` pixels, row-major, as read from an `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Slices {
    /// The shape as stored in the file, so outputs can be written back in the same layout.
    pub shape: Vec<usize>,
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Reads slices stored as (B, 1, H, W), (B, H, W) or (H, W), float32 or float64 (rounded to
/// float32). Fortran-ordered arrays are reordered to row-major.
pub fn read_slices(path: &Path) -> Result<Slices> {
    let (file, len) = open(path)?;
    read_slices_from(BufReader::new(file), len, path)
}

/// [`read_slices`] on the `len` bytes of an `.npy` file that `src` reads; `path` names it in
/// errors.
pub fn read_slices_from(src: impl Read, len: u64, path: &Path) -> Result<Slices> {
    let (shape, values) = read_values(src, len, path)?;
    let (b, h, w) = match shape[..] {
        [b, 1, h, w] => (b, h, w),
        [b, h, w] => (b, h, w),
        [h, w] => (1, h, w),
        _ => bail!(
            "{}: shape {shape:?} is not (B,1,H,W), (B,H,W) or (H,W)",
            path.display()
        ),
    };
    if b * h * w == 0 {
        bail!("{}: shape {shape:?} holds no pixels", path.display());
    }
    let data = match values {
        Values::F32(v) => v,
        // Rounding to float32 is the point: the engine computes in float32.
        Values::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        Values::Other(dtype, _) => {
            bail!(
                "{}: dtype {dtype} is not float32 or float64",
                path.display()
            )
        }
    };
    Ok(Slices {
        shape,
        b,
        h,
        w,
        data,
    })
}

/// Reads any numeric (bool, integer or float) array as float64, in row-major order, with its
/// shape. 64-bit integers beyond 2^53 lose precision.
pub fn read_array(path: &Path) -> Result<(Vec<usize>, Vec<f64>)> {
    let (file, len) = open(path)?;
    let (shape, values) = read_values(BufReader::new(file), len, path)?;
    let data = match values {
        Values::F32(v) => v.into_iter().map(f64::from).collect(),
        Values::F64(v) | Values::Other(_, v) => v,
    };
    Ok((shape, data))
}

/// The bytes of a float32 `.npy` file (little-endian, row-major) of the given shape.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        bail!("npy: shape {shape:?} needs {n} values, got {}", data.len());
    }
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut bytes = Vec::with_capacity(128 + 4 * n);
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape64)
        .writer(&mut bytes)
        .begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()?;
    Ok(bytes)
}

/// Writes a float32 `.npy` file atomically (see [`write_atomic`]).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes = encode_f32(shape, data).with_context(|| format!("encoding {}", path.display()))?;
    write_atomic(path, &bytes)
}

enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// Any other numeric dtype, named as numpy writes it, converted to float64.
    Other(String, Vec<f64>),
}

/// The file at `path` and its length, which bounds what its header may claim.
fn open(path: &Path) -> Result<(File, u64)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .ok_or_else(|| anyhow!("{}: not a regular file", path.display()))?;
    Ok((file, len))
}

fn read_values(mut src: impl Read, file_len: u64, path: &Path) -> Result<(Vec<usize>, Values)> {
    let head = read_header(&mut src, file_len).with_context(|| path.display().to_string())?;
    let npy = NpyFile::new(Cursor::new(head).chain(src)).map_err(|e| {
        anyhow!(
            "{}: not a readable .npy file: {}",
            path.display(),
            one_line(&e.to_string())
        )
    })?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let order = npy.order();
    let ts = match npy.dtype() {
        DType::Plain(ts) => ts,
        other => bail!("{}: dtype {} is not numeric", path.display(), other.descr()),
    };
    check_fits(&shape, ts.size_field() as u64, file_len)
        .with_context(|| path.display().to_string())?;
    let dtype = ts.to_string();
    let context = || format!("reading {} data of {}", dtype, path.display());
    let widen = |v: Vec<f64>| Values::Other(dtype.clone(), v);
    let values = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => Values::F32(npy.into_vec::<f32>().with_context(context)?),
        (TypeChar::Float, 8) => Values::F64(npy.into_vec::<f64>().with_context(context)?),
        (TypeChar::Bool, 1) => widen(convert(
            npy.into_vec::<bool>(),
            |b| f64::from(u8::from(b)),
            context,
        )?),
        (TypeChar::Uint, 1) => widen(convert(npy.into_vec::<u8>(), f64::from, context)?),
        (TypeChar::Uint, 2) => widen(convert(npy.into_vec::<u16>(), f64::from, context)?),
        (TypeChar::Uint, 4) => widen(convert(npy.into_vec::<u32>(), f64::from, context)?),
        (TypeChar::Uint, 8) => widen(convert(npy.into_vec::<u64>(), |x| x as f64, context)?),
        (TypeChar::Int, 1) => widen(convert(npy.into_vec::<i8>(), f64::from, context)?),
        (TypeChar::Int, 2) => widen(convert(npy.into_vec::<i16>(), f64::from, context)?),
        (TypeChar::Int, 4) => widen(convert(npy.into_vec::<i32>(), f64::from, context)?),
        (TypeChar::Int, 8) => widen(convert(npy.into_vec::<i64>(), |x| x as f64, context)?),
        _ => bail!(
            "{}: dtype {dtype} is not a supported numeric type",
            path.display()
        ),
    };
    let values = match (order, values) {
        (Order::C, v) => v,
        (Order::Fortran, Values::F32(v)) => Values::F32(fortran_to_c(&v, &shape)),
        (Order::Fortran, Values::F64(v)) => Values::F64(fortran_to_c(&v, &shape)),
        (Order::Fortran, Values::Other(d, v)) => Values::Other(d, fortran_to_c(&v, &shape)),
    };
    Ok((shape, values))
}

/// How deeply the header's dict may nest brackets. numpy writes 2 levels for a plain dtype
/// and a few more for a structured one; npyz's parser takes time exponential in the depth
/// (a 200-byte header of 66 `{` ran for hours, found by the `npy` fuzz target).
const MAX_HEADER_NESTING: usize = 8;

/// The start of an `.npy` stream up to the end of its header (as much as there is of it),
/// to be parsed again by npyz; refused when the header nests too deeply.
fn read_header(src: &mut impl Read, file_len: u64) -> Result<Vec<u8>> {
    // Magic (6 bytes), version (2), then the header's length: 2 bytes in version 1, else 4.
    let mut head = Vec::new();
    src.take(10).read_to_end(&mut head).context("cannot read")?;
    // Not an .npy file, or too short for one: npyz says what is wrong.
    let len = match head[..] {
        [0x93, b'N', b'U', b'M', b'P', b'Y', 1, _, a, b] => u64::from(u16::from_le_bytes([a, b])),
        [0x93, b'N', b'U', b'M', b'P', b'Y', _, _, a, b] => {
            let mut more = [0u8; 2];
            src.read_exact(&mut more).context("cannot read")?;
            head.extend(more);
            u64::from(u32::from_le_bytes([a, b, more[0], more[1]]))
        }
        _ => return Ok(head),
    };
    src.take(len.min(file_len))
        .read_to_end(&mut head)
        .context("cannot read")?;
    let (mut depth, mut deepest) = (0usize, 0usize);
    for &c in &head {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        deepest = deepest.max(depth);
    }
    ensure!(
        deepest <= MAX_HEADER_NESTING,
        "the .npy header nests {deepest} levels of brackets, at most {MAX_HEADER_NESTING}"
    );
    Ok(head)
}

/// The header's shape and dtype must fit the file before their data is allocated: a header
/// may claim gigabytes that are not there.
fn check_fits(shape: &[usize], elem_size: u64, file_len: u64) -> Result<()> {
    let bytes = shape
        .iter()
        .try_fold(elem_size, |acc, &d| acc.checked_mul(d as u64));
    ensure!(
        bytes.is_some_and(|b| b <= file_len),
        "the header's shape {shape:?} of {elem_size}-byte elements needs more bytes than the file's {file_len}"
    );
    Ok(())
}

/// npyz reports header errors over several lines; the CLI prints one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn convert<T>(
    read: std::io::Result<Vec<T>>,
    f: impl Fn(T) -> f64,
    context: impl FnOnce() -> String,
) -> Result<Vec<f64>> {
    Ok(read.with_context(context)?.into_iter().map(f).collect())
}

/// Reorders column-major (Fortran) data of `shape` into row-major order.
fn fortran_to_c<T: Copy>(data: &[T], shape: &[usize]) -> Vec<T> {
    let mut strides = Vec::with_capacity(shape.len());
    let mut s = 1;
    for &d in shape {
        strides.push(s);
        s *= d;
    }
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(data.len());
    for _ in 0..data.len() {
        let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(data[offset]);
        // Advance the row-major multi-index: the last axis moves fastest.
        for (i, &d) in index.iter_mut().zip(shape).rev() {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    out
}
