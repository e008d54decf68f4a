//! Loading network weights from `torch.save` zip archives and safetensors files.
//!
//! A torch archive is read without executing its pickle (see [`super::pickle`]); only the
//! storages of the tensors that are returned are read. Every tensor comes back as float32 in
//! row-major order, whatever its stored dtype, strides or storage offset.

use super::pickle::{self, Pickle, StorageDtype, TensorRef, Value};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;
use std::rc::Rc;
use zip::ZipArchive;

pub type TensorMap = BTreeMap<String, Tensor>;

/// Tensors plus the dtype each was stored in ("float32", "float16", "bfloat16", ...).
#[derive(Debug)]
pub struct Loaded {
    pub tensors: TensorMap,
    pub dtypes: BTreeMap<String, &'static str>,
}

/// Views let many tensors share one storage, so a small hostile file could ask for unbounded
/// memory. Stored tensors take at least a byte per element; allowing this many elements per
/// byte of file covers tied weights and half-precision storage with room to spare.
const MAX_ELEMENTS_PER_FILE_BYTE: u64 = 4;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// What the pre-1.6 torch.save format starts with: protocol 2 and torch's magic number.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

/// The state dict of a checkpoint, keys as stored.
pub fn load(path: &Path) -> Result<TensorMap> {
    Ok(load_with_dtypes(path)?.tensors)
}

/// Like [`load`], also reporting each tensor's stored dtype.
///
/// For a torch archive the tensors are the dict under `"state_dict"` if the top-level dict
/// has that key, else the tensor entries of the top-level dict. Errors are one line that
/// starts with the file name.
pub fn load_with_dtypes(path: &Path) -> Result<Loaded> {
    read_any(path).map_err(|e| anyhow!("{}: {}", path.display(), super::one_line(&e)))
}

/// Like [`load_with_dtypes`], on the bytes of a checkpoint file already in memory. Errors
/// are one line, without a file name.
pub fn load_bytes(bytes: &[u8]) -> Result<Loaded> {
    let len = bytes.len() as u64;
    match format_of(bytes, len) {
        Ok(Format::Torch) => read_torch(Cursor::new(bytes), len),
        Ok(Format::Safetensors) => read_safetensors(bytes),
        Err(e) => Err(e),
    }
    .map_err(|e| anyhow!(super::one_line(&e)))
}

fn read_any(path: &Path) -> Result<Loaded> {
    let mut file = File::open(path).context("cannot open")?;
    let file_len = regular_file_len(&file)?;
    let mut head = Vec::with_capacity(LEGACY_MAGIC.len());
    (&mut file)
        .take(LEGACY_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .context("cannot read")?;
    file.rewind().context("cannot read")?;
    if format_of(&head, file_len)? == Format::Torch {
        return read_torch(BufReader::new(file), file_len);
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(file_len as usize)
        .map_err(|_| anyhow!("cannot allocate {file_len} bytes to read it"))?;
    // The length was checked: a file that grows meanwhile is not read past it.
    file.take(file_len)
        .read_to_end(&mut bytes)
        .context("cannot read")?;
    read_safetensors(&bytes)
}

#[derive(Debug, PartialEq)]
enum Format {
    Torch,
    Safetensors,
}

/// The format of a file of `file_len` bytes that starts with `head`. Only a plausible
/// safetensors header earns reading the whole file.
fn format_of(head: &[u8], file_len: u64) -> Result<Format> {
    if head.starts_with(ZIP_MAGIC) {
        return Ok(Format::Torch);
    }
    if head.starts_with(LEGACY_MAGIC) {
        bail!("legacy (PyTorch < 1.6) torch.save format is not supported; re-save it with a current PyTorch");
    }
    ensure!(
        looks_like_safetensors(head, file_len),
        "not a torch.save zip archive nor a safetensors file"
    );
    Ok(Format::Safetensors)
}

/// The length of a regular file; devices and pipes (`/dev/zero`) have no length to bound
/// the reads by, so they are refused.
fn regular_file_len(file: &File) -> Result<u64> {
    let meta = file.metadata().context("cannot read")?;
    ensure!(meta.is_file(), "not a regular file");
    Ok(meta.len())
}

/// Weights are float32, float16, bfloat16 (or float64, rounded): an integer or bool storage is
/// a buffer or a different file, not weights to run on.
fn check_weight_dtype(name: &str, dtype: StorageDtype) -> Result<()> {
    use StorageDtype as D;
    ensure!(
        matches!(dtype, D::F32 | D::F16 | D::BF16 | D::F64),
        "tensor `{name}` has dtype {}; weights must be float32, float16 or bfloat16",
        dtype.name()
    );
    Ok(())
}

fn read_safetensors(bytes: &[u8]) -> Result<Loaded> {
    let st = match safetensors::SafeTensors::deserialize(bytes) {
        Ok(st) => st,
        Err(e) if looks_like_safetensors(bytes, bytes.len() as u64) => {
            bail!("invalid safetensors file: {e}")
        }
        Err(_) => bail!("not a torch.save zip archive nor a safetensors file"),
    };
    let mut out = Loaded {
        tensors: TensorMap::new(),
        dtypes: BTreeMap::new(),
    };
    for (name, view) in st.tensors() {
        use safetensors::Dtype as D;
        let dtype = match view.dtype() {
            D::F32 => StorageDtype::F32,
            D::F16 => StorageDtype::F16,
            D::BF16 => StorageDtype::BF16,
            D::F64 => StorageDtype::F64,
            D::I64 => StorageDtype::I64,
            D::I32 => StorageDtype::I32,
            D::I16 => StorageDtype::I16,
            D::I8 => StorageDtype::I8,
            D::U8 => StorageDtype::U8,
            D::BOOL => StorageDtype::Bool,
            other => bail!("tensor `{name}` has unsupported dtype {other:?}"),
        };
        check_weight_dtype(&name, dtype)?;
        let shape = view.shape().to_vec();
        let count = element_count(&shape).with_context(|| format!("tensor `{name}`"))?;
        let mut data = alloc(count).with_context(|| format!("tensor `{name}`"))?;
        decode_run(view.data(), dtype, &mut data);
        ensure!(
            data.len() == count,
            "tensor `{name}` of shape {shape:?} has {} bytes of data",
            view.data().len()
        );
        out.dtypes.insert(name.clone(), dtype.name());
        out.tensors.insert(name, Tensor { shape, data });
    }
    ensure!(
        !out.tensors.is_empty(),
        "the safetensors file holds no tensors"
    );
    Ok(out)
}

/// A header length that fits the file and a JSON object after it: then a deserialisation
/// error is worth reporting as such.
/// `head` is the start of a file of `file_len` bytes.
fn looks_like_safetensors(head: &[u8], file_len: u64) -> bool {
    let Some(len) = head.get(..8) else {
        return false;
    };
    let n = u64::from_le_bytes(len.try_into().unwrap_or_default());
    head.get(8) == Some(&b'{') && n <= file_len.saturating_sub(8)
}

/// A torch.save archive of `file_len` bytes read from `src`.
fn read_torch(src: impl Read + Seek, file_len: u64) -> Result<Loaded> {
    let mut zip =
        ZipArchive::new(src).context("not a readable zip archive (truncated or corrupt)")?;
    let prefix = archive_prefix(&zip)?;

    let byteorder = format!("{prefix}byteorder");
    if zip.index_for_name(&byteorder).is_some() {
        let raw = read_entry(&mut zip, &byteorder, file_len)?;
        match raw.trim_ascii() {
            b"little" => {}
            b"big" => {
                bail!("`{byteorder}` says big-endian; only little-endian checkpoints are read")
            }
            other => bail!(
                "`{byteorder}` holds {:?}, not \"little\"",
                String::from_utf8_lossy(other)
            ),
        }
    }

    let pkl_name = format!("{prefix}data.pkl");
    let pkl = read_entry(&mut zip, &pkl_name, file_len)?;
    let pickle = pickle::parse(&pkl).with_context(|| format!("`{pkl_name}`"))?;
    let wanted = select_tensors(&pickle)?;
    let mut total = 0u64;
    for (name, t) in &wanted {
        check_weight_dtype(name, t.storage.dtype)?;
        let count = element_count(&t.shape).with_context(|| format!("tensor `{name}`"))?;
        total = total.saturating_add(count as u64);
    }
    ensure!(
        total <= file_len.saturating_mul(MAX_ELEMENTS_PER_FILE_BYTE),
        "the tensors add up to {total} elements, implausibly many for a file of {file_len} bytes"
    );

    // Views of one storage share its bytes: read each storage once.
    let mut by_storage: BTreeMap<&str, Vec<(&String, &TensorRef)>> = BTreeMap::new();
    for (name, t) in &wanted {
        by_storage
            .entry(t.storage.key.as_str())
            .or_default()
            .push((name, t));
    }
    let mut out = Loaded {
        tensors: TensorMap::new(),
        dtypes: BTreeMap::new(),
    };
    for (key, tensors) in by_storage {
        let entry = format!("{prefix}data/{key}");
        check_storage_fits(&mut zip, &entry, &tensors[0].1.storage)
            .with_context(|| format!("storage of tensor `{}`", tensors[0].0))?;
        let bytes = read_entry(&mut zip, &entry, file_len)
            .with_context(|| format!("storage of tensor `{}`", tensors[0].0))?;
        for (name, t) in tensors {
            let tensor =
                materialise(t, &bytes, &entry).with_context(|| format!("tensor `{name}`"))?;
            out.dtypes.insert(name.clone(), t.storage.dtype.name());
            out.tensors.insert(name.clone(), tensor);
        }
    }
    Ok(out)
}

/// The folder holding `data.pkl` ("archive/", or the saved file's stem), with its slash.
fn archive_prefix<R: Read + Seek>(zip: &ZipArchive<R>) -> Result<String> {
    let mut found = zip.file_names_raw().filter_map(|raw| {
        let dir = raw.strip_suffix(b"data.pkl")?;
        let top_level = match dir {
            [] => true,
            [inner @ .., b'/'] => !inner.contains(&b'/'),
            _ => false,
        };
        top_level.then_some(dir)
    });
    let dir = found
        .next()
        .ok_or_else(|| anyhow!("missing data.pkl: not a torch.save archive"))?;
    ensure!(
        found.next().is_none(),
        "the archive holds more than one data.pkl"
    );
    String::from_utf8(dir.to_vec()).context("archive folder name is not UTF-8")
}

fn read_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    file_len: u64,
) -> Result<Vec<u8>> {
    ensure!(
        zip.index_for_name(name).is_some(),
        "`{name}` is missing from the archive"
    );
    let mut entry = zip
        .by_name(name)
        .with_context(|| format!("cannot read `{name}`"))?;
    // The declared size is not trusted for the allocation: a real entry fits in the file.
    let mut buf = Vec::new();
    buf.try_reserve_exact(entry.size().min(file_len) as usize)
        .with_context(|| format!("cannot allocate for `{name}`"))?;
    entry
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read `{name}` (truncated or corrupt archive)"))?;
    Ok(buf)
}

/// Refuses a storage whose declared size exceeds its archive entry before the entry is read.
fn check_storage_fits<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    entry: &str,
    storage: &pickle::StorageRef,
) -> Result<()> {
    let Ok(file) = zip.by_name(entry) else {
        bail!("`{entry}` is missing from the archive");
    };
    // A stored entry (what torch.save writes) holds its compressed size, whatever its header
    // declares as the uncompressed one.
    let size = match file.compression() {
        zip::CompressionMethod::Stored => file.size().min(file.compressed_size()),
        _ => file.size(),
    };
    let needed = storage.numel.checked_mul(storage.dtype.size() as u64);
    ensure!(
        needed.is_some_and(|n| n <= size),
        "storage `{entry}` holds {size} bytes, the pickle declares {} {} elements",
        storage.numel,
        storage.dtype.name()
    );
    Ok(())
}

/// The `(name, tensor)` pairs the checkpoint's state dict holds.
fn select_tensors(p: &Pickle) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let root = &p.root;
    let items = p
        .dict_items(root)
        .ok_or_else(|| anyhow!("the saved object is {}, not a dict", root.kind()))?;
    if let Some(sd) = p.dict_get(root, "state_dict") {
        let entries = p
            .dict_items(sd)
            .ok_or_else(|| anyhow!("`state_dict` is {}, not a dict of tensors", sd.kind()))?;
        ensure!(!entries.is_empty(), "`state_dict` is empty");
        return entries
            .iter()
            .map(|(k, v)| {
                let key = k
                    .as_str()
                    .ok_or_else(|| anyhow!("`state_dict` has {} as a key", k.kind()))?;
                match v {
                    Value::Tensor(t) => Ok((key.to_owned(), t.clone())),
                    other => bail!(
                        "`state_dict` entry `{key}` is {}, not a tensor",
                        other.kind()
                    ),
                }
            })
            .collect();
    }
    let tensors: Vec<_> = items
        .iter()
        .filter_map(|(k, v)| match (k.as_str(), v) {
            (Some(key), Value::Tensor(t)) => Some((key.to_owned(), t.clone())),
            _ => None,
        })
        .collect();
    ensure!(
        !tensors.is_empty(),
        "no `state_dict` entry and no tensors at the top level"
    );
    Ok(tensors)
}

fn element_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow!("shape {shape:?} has too many elements"))
}

fn alloc(count: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(count)
        .map_err(|_| anyhow!("cannot allocate {count} floats"))?;
    Ok(v)
}

/// Gathers a strided view of a storage into a row-major float32 tensor.
fn materialise(t: &TensorRef, bytes: &[u8], entry: &str) -> Result<Tensor> {
    let dtype = t.storage.dtype;
    let esize = dtype.size();
    let numel = t.storage.numel;
    let needed = numel.checked_mul(esize as u64);
    ensure!(
        needed.is_some_and(|n| n <= bytes.len() as u64),
        "storage `{entry}` holds {} bytes, the pickle declares {numel} {} elements",
        bytes.len(),
        dtype.name()
    );
    let count = element_count(&t.shape)?;
    let mut data = alloc(count)?;
    if count > 0 {
        // Furthest element the view touches; every other index is at most this.
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&d, &s)| {
                acc.checked_add(((d - 1) as u64).checked_mul(s as u64)?)
            });
        ensure!(
            last.is_some_and(|l| l < numel),
            "shape {:?}, stride {:?} and offset {} reach past the {numel} elements of storage `{entry}`",
            t.shape,
            t.stride,
            t.offset
        );
        // Bounded by `numel`, which fits the bytes in memory: these casts cannot truncate.
        let offset = t.offset as usize;
        if is_contiguous(&t.shape, &t.stride) {
            decode_run(
                &bytes[offset * esize..(offset + count) * esize],
                dtype,
                &mut data,
            );
        } else {
            gather(t, offset, bytes, &mut data);
        }
    }
    Ok(Tensor {
        shape: t.shape.clone(),
        data,
    })
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// Walks the view in row-major order, decoding the innermost dimension as one run where it
/// is unit-strided.
fn gather(t: &TensorRef, offset: usize, bytes: &[u8], out: &mut Vec<f32>) {
    let dtype = t.storage.dtype;
    let esize = dtype.size();
    let rank = t.shape.len();
    let (inner_len, inner_stride) = (t.shape[rank - 1], t.stride[rank - 1]);
    let outer = &t.shape[..rank - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let base = offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        if inner_stride == 1 {
            decode_run(&bytes[base * esize..(base + inner_len) * esize], dtype, out);
        } else {
            for j in 0..inner_len {
                let at = (base + j * inner_stride) * esize;
                decode_run(&bytes[at..at + esize], dtype, out);
            }
        }
        // Odometer over the outer dimensions, last fastest.
        let mut dim = outer.len();
        loop {
            if dim == 0 {
                return;
            }
            dim -= 1;
            index[dim] += 1;
            if index[dim] < outer[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
}

/// Appends the little-endian elements of `raw` to `out` as float32 (float64 rounds to nearest).
fn decode_run(raw: &[u8], dtype: StorageDtype, out: &mut Vec<f32>) {
    fn each<const N: usize>(raw: &[u8], out: &mut Vec<f32>, f: impl Fn([u8; N]) -> f32) {
        out.extend(raw.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        }));
    }
    match dtype {
        StorageDtype::F32 => each(raw, out, f32::from_le_bytes),
        StorageDtype::F16 => each(raw, out, |b| half::f16::from_le_bytes(b).to_f32()),
        StorageDtype::BF16 => each(raw, out, |b| half::bf16::from_le_bytes(b).to_f32()),
        StorageDtype::F64 => each(raw, out, |b| f64::from_le_bytes(b) as f32),
        StorageDtype::I64 => each(raw, out, |b| i64::from_le_bytes(b) as f32),
        StorageDtype::I32 => each(raw, out, |b| i32::from_le_bytes(b) as f32),
        StorageDtype::I16 => each(raw, out, |b| i16::from_le_bytes(b) as f32),
        StorageDtype::I8 => each(raw, out, |b: [u8; 1]| b[0] as i8 as f32),
        StorageDtype::U8 => each(raw, out, |b: [u8; 1]| b[0] as f32),
        StorageDtype::Bool => each(raw, out, |b: [u8; 1]| f32::from(u8::from(b[0] != 0))),
    }
}
