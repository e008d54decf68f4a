//! The deterministic fuzz suite of issue 10: seeded mutations of valid checkpoints,
//! safetensors files, configs, `.npy`, NIfTI and PNG files, and of command lines, run against
//! the readers in-process and against the `fcd` binary. Every case must end without a panic,
//! signal or time-out, inside its memory budget, with at most a one-line error naming the file
//! or key, and with nothing left in `--out`.
//!
//! The memory budget (an address-space rlimit) binds the binary cases only: an in-process
//! allocation blow-up would take the test runner down, which fails CI just as loudly.
//!
//! `FCD_FUZZ_SEED=<u64>` replays another seed; `-- --nocapture` prints the totals.

use fcd::config::Config;
use fcd::io::{checkpoint, npy, png, volume};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DEFAULT_SEED: u64 = 0x00fc_d0f0_2210;
const LIB_BUDGET: Duration = Duration::from_secs(2);
const BIN_BUDGET: Duration = Duration::from_secs(10);
/// Address space of one binary case: an allocation blow-up fails the case, not the machine.
const BIN_MEMORY: u64 = 2 << 30;

/// Failure classes that are real bugs not fixed yet: (category, substring of the error or of
/// the failure text, the bug). Empty: every class the suite found so far is fixed.
const KNOWN: &[(&str, &str, &str)] = &[];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

struct Gen(ChaCha8Rng);

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n.max(1))
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn byte(&mut self) -> u8 {
        self.0.random_range(0..=255u8)
    }
}

// ---- byte-level mutations shared by every format ----

fn flip_bytes(g: &mut Gen, b: &mut [u8], from: usize) {
    if b.len() <= from {
        return;
    }
    for _ in 0..1 + g.below(4) {
        let i = from + g.below(b.len() - from);
        b[i] = g.byte();
    }
}

fn truncate(g: &mut Gen, b: &mut Vec<u8>) {
    let keep = g.below(b.len());
    b.truncate(keep);
}

fn replace_all(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn positions(b: &[u8], needle: &[u8]) -> Vec<usize> {
    (0..b.len().saturating_sub(needle.len()))
        .filter(|&i| b[i..].starts_with(needle))
        .collect()
}

/// A number that tends to sit on a boundary: zero, negative, huge, or just off a size.
fn nasty_int(g: &mut Gen) -> i64 {
    *g.pick(&[
        0,
        -1,
        1,
        2,
        3,
        31,
        33,
        255,
        65535,
        1 << 31,
        (1 << 31) - 1,
        1 << 40,
        i64::MAX,
        i64::MIN,
        -(1 << 40),
    ])
}

// ---- checkpoints (torch.save zip archives) ----

fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut body = Vec::new();
            f.read_to_end(&mut body).unwrap();
            (f.name().unwrap().into_owned(), body)
        })
        .collect()
}

fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, body) in entries {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(body).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// Pickle edits aimed at what the loader trusts: GLOBAL names, storage classes and keys,
/// the small ints that are shapes, strides and offsets, and opcodes themselves.
fn mutate_pickle(g: &mut Gen, pkl: &mut Vec<u8>) {
    match g.below(8) {
        0 => flip_bytes(g, pkl, 2),
        1 => truncate(g, pkl),
        2 => {
            let (from, to): (&[u8], &[u8]) = *g.pick(&[
                (&b"_rebuild_tensor_v2"[..], &b"_rebuild_tensor_v9"[..]),
                (b"torch._utils", b"os"),
                (b"FloatStorage", b"LongStorage"),
                (b"FloatStorage", b"NoSuchStorage"),
                (b"collections\nOrderedDict", b"builtins\neval"),
                (b"cpu", b"cuda:7"),
            ]);
            *pkl = replace_all(pkl, from, to);
        }
        3 => set_small_int(g, pkl),
        4 => widen_small_int(g, pkl),
        5 => {
            let at = g.below(pkl.len());
            let op = *g.pick(b"()tR.Q0123456789KMJX\x85\x86\x87ehsub}]q\x94\x95c");
            pkl.insert(at, op);
        }
        6 => {
            let at = g.below(pkl.len());
            let n = 1 + g.below(16);
            pkl.drain(at..(at + n).min(pkl.len()));
        }
        _ => rename_storage_key(g, pkl),
    }
}

/// A BININT1 (`K n`) argument: shape, stride and offset entries are mostly these.
fn set_small_int(g: &mut Gen, pkl: &mut [u8]) {
    let at = positions(pkl, b"K");
    if !at.is_empty() {
        let i = *g.pick(&at);
        if i + 1 < pkl.len() {
            pkl[i + 1] = g.byte();
        }
    }
}

/// `K n` replaced by `J <nasty i32>` (BININT): negative or huge sizes and offsets.
fn widen_small_int(g: &mut Gen, pkl: &mut Vec<u8>) {
    let at = positions(pkl, b"K");
    if at.is_empty() {
        return;
    }
    let i = *g.pick(&at);
    if i + 2 > pkl.len() {
        return;
    }
    let v = nasty_int(g) as i32;
    let mut with = vec![b'J'];
    with.extend_from_slice(&v.to_le_bytes());
    pkl.splice(i..i + 2, with);
}

/// Storage keys are short strings (`X\x01\0\0\0` + digit): point one at a missing entry.
fn rename_storage_key(g: &mut Gen, pkl: &mut [u8]) {
    let at = positions(pkl, b"X\x01\x00\x00\x00");
    if !at.is_empty() {
        let i = *g.pick(&at) + 5;
        if i < pkl.len() {
            pkl[i] = *g.pick(b"0123456789z/");
        }
    }
}

fn mutate_checkpoint(g: &mut Gen, base: &[u8]) -> Vec<u8> {
    let mut entries = unzip(base);
    match g.below(10) {
        0..=4 => {
            let pkl = entries
                .iter_mut()
                .find(|(n, _)| n.ends_with("data.pkl"))
                .unwrap();
            mutate_pickle(g, &mut pkl.1);
        }
        5 => {
            let i = g.below(entries.len());
            entries.remove(i);
        }
        6 => {
            let i = g.below(entries.len());
            let keep = g.below(entries[i].1.len() + 1);
            entries[i].1.truncate(keep);
        }
        7 => {
            let i = g.below(entries.len());
            entries[i].0 = format!("other/{}", g.below(1000));
        }
        _ => return mutate_archive(g, zip_of(&entries)),
    }
    zip_of(&entries)
}

/// Damage to the zip structure itself: the end records and central directory sit at the end.
fn mutate_archive(g: &mut Gen, mut z: Vec<u8>) -> Vec<u8> {
    if g.chance(50) {
        let from = z.len().saturating_sub(22 + 46 * 8);
        flip_bytes(g, &mut z, from);
    } else {
        truncate(g, &mut z);
    }
    z
}

// ---- safetensors ----

struct StTensor {
    dtype: &'static str,
    shape: Vec<i64>,
    offsets: [i64; 2],
}

fn st_tensors() -> Vec<(String, StTensor)> {
    let t = |dtype, shape: &[i64], a, b| StTensor {
        dtype,
        shape: shape.to_vec(),
        offsets: [a, b],
    };
    vec![
        ("a.weight".into(), t("F32", &[2, 3], 0, 24)),
        ("a.bias".into(), t("F16", &[3], 24, 30)),
        ("b".into(), t("BF16", &[2, 1], 30, 34)),
    ]
}

fn st_json(tensors: &[(String, StTensor)], meta: &str) -> String {
    let body: Vec<String> = tensors
        .iter()
        .map(|(name, t)| {
            format!(
                r#""{name}":{{"dtype":"{}","shape":{:?},"data_offsets":[{},{}]}}"#,
                t.dtype, t.shape, t.offsets[0], t.offsets[1]
            )
        })
        .collect();
    format!("{{{meta}{}}}", body.join(","))
}

fn st_bytes(json: &str, declared: u64, data_len: usize) -> Vec<u8> {
    let mut b = declared.to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.extend((0..data_len).map(|i| (i % 7) as u8 * 16));
    b
}

fn mutate_safetensors(g: &mut Gen) -> Vec<u8> {
    let mut ts = st_tensors();
    let mut meta = String::new();
    let mut data_len = 34;
    let i = g.below(ts.len());
    match g.below(9) {
        0 => ts[i].1.dtype = *g.pick(&["F64", "I64", "BOOL", "U8", "F8_E4M3", "Q4", ""]),
        1 => {
            let d = g
                .below(ts[i].1.shape.len() + 1)
                .min(ts[i].1.shape.len() - 1);
            ts[i].1.shape[d] = nasty_int(g);
        }
        2 => ts[i].1.shape = (0..g.below(40)).map(|_| 1 + g.below(3) as i64).collect(),
        3 => ts[i].1.offsets[g.below(2)] = nasty_int(g),
        4 => ts[i].1.offsets = [0, 24],
        5 => data_len = g.below(34),
        6 => meta = r#""__metadata__":{"format":[1,2]},"#.into(),
        7 => ts[i].0 = "\\u0000".into(),
        _ => {}
    }
    let json = st_json(&ts, &meta);
    let mut b = st_bytes(&json, json.len() as u64, data_len);
    match g.below(4) {
        0 => b[..8].copy_from_slice(&(nasty_int(g) as u64).to_le_bytes()),
        1 => flip_bytes(g, &mut b, 8),
        _ => {}
    }
    b
}

// ---- YAML configs ----

const YAML_VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "3",
    "4097",
    "99999999999999999999999",
    "1e308",
    "-1e308",
    ".nan",
    ".inf",
    "abc",
    "\"12\"",
    "~",
    "[]",
    "[ 1, 0, 2 ]",
    "[ 9, 9, 9, 9, 9, 9, 9, 9, 9 ]",
    "{}",
    "{ a: 1 }",
    "True",
    "0.5",
    "-0.0",
    "[[[[[[[[1]]]]]]]]",
];

/// A config line's value swapped, the line dropped or duplicated, or the text cut.
fn mutate_config(g: &mut Gen, text: &str) -> (String, Option<String>) {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let keyed: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim_end().contains(": ") && !lines[i].trim().starts_with('#'))
        .collect();
    let i = *g.pick(&keyed);
    let key = lines[i].trim().split(':').next().unwrap().to_owned();
    match g.below(10) {
        0 => drop(lines.remove(i)),
        1 => {
            let dup = lines[i].clone();
            lines.insert(i, dup);
        }
        2 => {
            let cut = g.below(text.len());
            let cut = (0..=cut).rev().find(|&c| text.is_char_boundary(c)).unwrap();
            return (text[..cut].to_owned(), None);
        }
        3 => lines.insert(0, format!("deep: {}1{}", "[".repeat(200), "]".repeat(200))),
        _ => {
            let indent = lines[i].len() - lines[i].trim_start().len();
            let value = g.pick(YAML_VALUES);
            lines[i] = format!("{}{key}: {value}", " ".repeat(indent));
        }
    }
    (lines.join("\n") + "\n", Some(key))
}

// ---- .npy ----

fn npy_of(header: &str, data: &[u8], declared: Option<u16>) -> Vec<u8> {
    let mut header = header.to_owned();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    let len = declared.unwrap_or(header.len() as u16);
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn mutate_npy(g: &mut Gen, data: &[u8]) -> Vec<u8> {
    let mut descr = "<f4".to_owned();
    let mut order = "False".to_owned();
    let mut shape = "(2, 32, 32)".to_owned();
    let mut declared = None;
    let mut data = data.to_vec();
    match g.below(8) {
        0 => {
            descr = g
                .pick(&[
                    "<f8", ">f4", "<f2", "<i8", "|u1", "|b1", "<c8", "|O", "<U3", "x", "",
                ])
                .to_string()
        }
        1 => order = g.pick(&["True", "1", "None", "'yes'"]).to_string(),
        2 => {
            let dims: Vec<String> = (0..g.below(6)).map(|_| nasty_int(g).to_string()).collect();
            shape = format!("({},)", dims.join(", "));
        }
        3 => declared = Some(g.0.random_range(0..=u16::MAX)),
        4 => truncate(g, &mut data),
        5 => {
            shape = g
                .pick(&[
                    "(32, 32)",
                    "(2, 1, 32, 32)",
                    "(1, 2, 32, 32)",
                    "(2, 16, 64)",
                    "(0, 32, 32)",
                ])
                .to_string()
        }
        6 => shape = "[2, 32, 32]".into(),
        _ => {}
    }
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    let mut b = npy_of(&dict, &data, declared);
    if g.chance(20) {
        flip_bytes(g, &mut b, 0);
    }
    b
}

// ---- NIfTI ----

fn base_volume() -> volume::Volume {
    let dims = [32, 32, 3];
    let n = dims.iter().product::<usize>();
    let mut affine = [[0.0; 4]; 4];
    for (i, row) in affine.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    volume::Volume {
        dims,
        data: (0..n).map(|i| ((i * 37) % 101) as f32).collect(),
        affine,
        path: PathBuf::from("base"),
    }
}

/// (offset, width) of the header fields the reader trusts.
const NIFTI_FIELDS: &[(usize, usize)] = &[
    (0, 4),   // sizeof_hdr
    (40, 2),  // dim[0]
    (42, 2),  // dim[1]
    (44, 2),  // dim[2]
    (46, 2),  // dim[3]
    (48, 2),  // dim[4]
    (70, 2),  // datatype
    (72, 2),  // bitpix
    (76, 4),  // pixdim[0] (qfac)
    (80, 4),  // pixdim[1]
    (108, 4), // vox_offset
    (112, 4), // scl_slope
    (116, 4), // scl_inter
    (252, 2), // qform_code
    (254, 2), // sform_code
    (280, 4), // srow_x[0]
    (344, 4), // magic
];

fn nasty_field(g: &mut Gen, width: usize) -> Vec<u8> {
    if width == 2 {
        return (nasty_int(g) as i16).to_le_bytes().to_vec();
    }
    let f = *g.pick(&[
        0.0f32,
        -1.0,
        351.0,
        352.5,
        1e30,
        f32::NAN,
        f32::INFINITY,
        1e-30,
    ]);
    if g.chance(50) {
        f.to_le_bytes().to_vec()
    } else {
        (nasty_int(g) as i32).to_le_bytes().to_vec()
    }
}

fn mutate_nifti(g: &mut Gen, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    match g.below(6) {
        0..=2 => {
            for _ in 0..1 + g.below(2) {
                let (at, width) = *g.pick(NIFTI_FIELDS);
                let v = nasty_field(g, width);
                b[at..at + width].copy_from_slice(&v);
            }
        }
        3 => truncate(g, &mut b),
        4 => flip_bytes(g, &mut b, 0),
        _ => {
            let (at, _) = *g.pick(NIFTI_FIELDS);
            b[at..at + 2].copy_from_slice(&g.0.random_range(1i16..=64).to_le_bytes());
        }
    }
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// `encode_like` writes .nii.gz; the mutations work on the plain .nii inside.
fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A good header gzipped, then the stream damaged; or a damaged header gzipped intact.
fn mutate_nifti_gz(g: &mut Gen, base: &[u8]) -> Vec<u8> {
    if g.chance(50) {
        return gzip(&mutate_nifti(g, base));
    }
    let mut z = gzip(base);
    if g.chance(50) {
        truncate(g, &mut z);
    } else {
        let from = if g.chance(50) { z.len() - 8 } else { 0 };
        flip_bytes(g, &mut z, from);
    }
    z
}

// ---- PNG ----

fn base_png(seed: u8) -> Vec<u8> {
    let pixels: Vec<u8> = (0..32 * 32u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    let img = image::GrayImage::from_raw(32, 32, pixels).unwrap();
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Rewrites the CRC of the chunk whose type starts at `kind`, so the edit reaches the decoder.
fn fix_crc(b: &mut [u8], kind: usize) {
    let len = u32::from_be_bytes(b[kind - 4..kind].try_into().unwrap()) as usize;
    let end = kind + 4 + len;
    if end + 4 > b.len() {
        return;
    }
    let mut crc = flate2::Crc::new();
    crc.update(&b[kind..end]);
    b[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
}

fn mutate_png(g: &mut Gen, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    // IHDR's type at 12, its body (width, height, depth, colour, ...) at 16.
    match g.below(6) {
        0 => b[16..20].copy_from_slice(&(nasty_int(g) as u32).to_be_bytes()),
        1 => b[20..24].copy_from_slice(&(nasty_int(g) as u32).to_be_bytes()),
        2 => b[24] = *g.pick(&[0, 1, 2, 4, 16, 3, 255]),
        3 => b[25 + g.below(4)] = g.byte(),
        4 => {
            truncate(g, &mut b);
            return b;
        }
        _ => {
            flip_bytes(g, &mut b, 33);
            return b;
        }
    }
    if g.chance(80) {
        fix_crc(&mut b, 12);
    }
    b
}

// ---- cases ----

type Reader = fn(&Path) -> anyhow::Result<()>;

enum Run {
    /// A reader called in-process on the file.
    Lib(Reader),
    /// The binary with these arguments; `{file}` and `{out}` are filled in per case.
    Bin(Vec<String>),
}

struct Case {
    category: &'static str,
    /// The file the case writes (name, bytes); `None` for command-line cases.
    file: Option<(String, Vec<u8>)>,
    run: Run,
    /// Names of which the error must contain one (the file, a key, a flag).
    names: Vec<String>,
    /// An unmutated seed: it must succeed, or the mutations of it test nothing.
    control: bool,
}

fn read_ckpt(p: &Path) -> anyhow::Result<()> {
    checkpoint::load(p).map(drop)
}
fn read_config(p: &Path) -> anyhow::Result<()> {
    Config::load(p).map(drop)
}
fn read_npy(p: &Path) -> anyhow::Result<()> {
    npy::read_slices(p).map(drop)
}
fn read_nifti(p: &Path) -> anyhow::Result<()> {
    volume::read_volume(p).map(drop)
}
fn read_png(p: &Path) -> anyhow::Result<()> {
    png::read_gray(p).map(drop)
}

fn s(p: PathBuf) -> String {
    p.to_str().unwrap().to_owned()
}

/// `fcd detect` on the fixture model; `flair`, `t1` and `config` default to the fixtures.
fn detect_args(config: &str, flair: &str, t1: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["detect".into(), "--config".into(), config.into()];
    for (flag, v) in [
        ("--unet", s(fixture("unet.pt"))),
        ("--classifier", s(fixture("classifier.pt"))),
        ("--flair", flair.into()),
        ("--t1", t1.into()),
        ("--out", "{out}".into()),
        ("--steps", "1".into()),
        ("--device", "cpu".into()),
    ] {
        a.push(flag.into());
        a.push(v);
    }
    a
}

fn file_case(category: &'static str, name: String, bytes: Vec<u8>, run: Run) -> Case {
    Case {
        category,
        names: vec![name.clone()],
        file: Some((name, bytes)),
        run,
        control: false,
    }
}

fn control(mut case: Case) -> Case {
    case.control = true;
    case
}

const SMALL_CHECKPOINTS: &[&str] = &[
    "nested_f32.pt",
    "proto4.pt",
    "unet_weights.pt",
    "bf16.pt",
    "f64.pt",
];

struct Bases {
    classifier: Vec<u8>,
    /// Small valid checkpoints: most cases mutate these, so that the suite holds megabytes
    /// of generated files rather than gigabytes.
    small: Vec<(&'static str, Vec<u8>)>,
    config: String,
    npy: Vec<u8>,
    nifti: Vec<u8>,
    png: Vec<u8>,
}

impl Bases {
    fn load() -> Bases {
        let npy = read_fixture("flair_raw.npy");
        let data_at = 10 + u16::from_le_bytes([npy[8], npy[9]]) as usize;
        let v = base_volume();
        Bases {
            classifier: read_fixture("classifier.pt"),
            small: SMALL_CHECKPOINTS
                .iter()
                .map(|n| (*n, read_fixture(&format!("ckpt/{n}"))))
                .collect(),
            config: String::from_utf8(read_fixture("config_small.yaml")).unwrap(),
            npy: npy[data_at..].to_vec(),
            nifti: gunzip(&volume::encode_like(&v, &v.data).unwrap()),
            png: base_png(0),
        }
    }
}

fn library_controls(b: &Bases, out: &mut Vec<Case>) {
    let st = st_json(&st_tensors(), "");
    for (category, name, bytes, reader) in [
        (
            "checkpoint",
            "c.pt",
            b.classifier.clone(),
            read_ckpt as Reader,
        ),
        (
            "safetensors",
            "s.safetensors",
            st_bytes(&st, st.len() as u64, 34),
            read_ckpt,
        ),
        (
            "config",
            "y.yaml",
            b.config.clone().into_bytes(),
            read_config,
        ),
        (
            "npy",
            "n.npy",
            npy_of(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 32, 32), }",
                &b.npy,
                None,
            ),
            read_npy,
        ),
        ("nifti", "v.nii", b.nifti.clone(), read_nifti),
        ("nifti", "v.nii.gz", gzip(&b.nifti), read_nifti),
        ("png", "p.png", b.png.clone(), read_png),
    ] {
        out.push(control(file_case(
            category,
            name.into(),
            bytes,
            Run::Lib(reader),
        )));
    }
    for (name, bytes) in &b.small {
        let case = file_case(
            "checkpoint",
            name.to_string(),
            bytes.clone(),
            Run::Lib(read_ckpt),
        );
        out.push(control(case));
    }
}

fn library_cases(g: &mut Gen, b: &Bases, out: &mut Vec<Case>) {
    library_controls(b, out);
    for i in 0..600 {
        let base = if i % 10 == 0 {
            &b.classifier
        } else {
            &g.pick(&b.small).1
        };
        let bytes = mutate_checkpoint(g, base);
        out.push(file_case(
            "checkpoint",
            format!("c{i}.pt"),
            bytes,
            Run::Lib(read_ckpt),
        ));
    }
    for i in 0..300 {
        let bytes = mutate_safetensors(g);
        let name = format!("s{i}.safetensors");
        out.push(file_case("safetensors", name, bytes, Run::Lib(read_ckpt)));
    }
    for i in 0..300 {
        let (text, key) = mutate_config(g, &b.config);
        let mut c = file_case(
            "config",
            format!("y{i}.yaml"),
            text.into(),
            Run::Lib(read_config),
        );
        c.names.extend(key);
        out.push(c);
    }
    for i in 0..300 {
        let bytes = mutate_npy(g, &b.npy);
        out.push(file_case(
            "npy",
            format!("n{i}.npy"),
            bytes,
            Run::Lib(read_npy),
        ));
    }
    for i in 0..400 {
        let (name, bytes) = if i % 4 == 3 {
            (format!("v{i}.nii.gz"), mutate_nifti_gz(g, &b.nifti))
        } else {
            (format!("v{i}.nii"), mutate_nifti(g, &b.nifti))
        };
        out.push(file_case("nifti", name, bytes, Run::Lib(read_nifti)));
    }
    for i in 0..300 {
        let bytes = mutate_png(g, &b.png);
        out.push(file_case(
            "png",
            format!("p{i}.png"),
            bytes,
            Run::Lib(read_png),
        ));
    }
}

/// `shared` holds the unmutated T1 files the binary cases pair with a mutated FLAIR.
fn binary_file_cases(g: &mut Gen, b: &Bases, shared: &Path, out: &mut Vec<Case>) {
    let cfg = s(fixture("config_small.yaml"));
    let flair = s(fixture("flair_raw.npy"));
    let t1 = s(fixture("t1_raw.npy"));
    for i in 0..40 {
        let bytes = mutate_checkpoint(g, &b.classifier);
        let args = vec!["inspect".into(), "{file}".into()];
        out.push(file_case(
            "bin checkpoint",
            format!("bu{i}.pt"),
            bytes,
            Run::Bin(args),
        ));
    }
    for i in 0..40 {
        let (text, key) = mutate_config(g, &b.config);
        let run = Run::Bin(detect_args("{file}", &flair, &t1));
        let mut c = file_case("bin config", format!("by{i}.yaml"), text.into(), run);
        // A config that disagrees with a checkpoint may be reported against the checkpoint.
        c.names.extend(key);
        c.names.extend(["unet.pt".into(), "classifier.pt".into()]);
        out.push(c);
    }
    for i in 0..30 {
        let bytes = mutate_npy(g, &b.npy);
        let run = Run::Bin(detect_args(&cfg, "{file}", &t1));
        out.push(file_case("bin npy", format!("bn{i}.npy"), bytes, run));
    }
    let t1_dir = shared;
    let t1_nii = t1_dir.join("t1.nii");
    std::fs::write(&t1_nii, &b.nifti).unwrap();
    let t1_png = t1_dir.join("t1.png");
    std::fs::write(&t1_png, base_png(9)).unwrap();
    let nii_args = || {
        let mut a = detect_args(&cfg, "{file}", &s(t1_nii.clone()));
        a.extend(["--slices".into(), "0:1".into()]);
        a
    };
    out.push(control(file_case(
        "bin nifti",
        "bv.nii".into(),
        b.nifti.clone(),
        Run::Bin(nii_args()),
    )));
    let png_args = detect_args(&cfg, "{file}", &s(t1_png.clone()));
    out.push(control(file_case(
        "bin png",
        "bp.png".into(),
        b.png.clone(),
        Run::Bin(png_args),
    )));
    for i in 0..30 {
        let bytes = mutate_nifti(g, &b.nifti);
        let mut args = detect_args(&cfg, "{file}", &s(t1_nii.clone()));
        args.extend(["--slices".into(), "0:1".into()]);
        out.push(file_case(
            "bin nifti",
            format!("bv{i}.nii"),
            bytes,
            Run::Bin(args),
        ));
    }
    for i in 0..25 {
        let bytes = mutate_png(g, &b.png);
        let run = Run::Bin(detect_args(&cfg, "{file}", &s(t1_png.clone())));
        out.push(file_case("bin png", format!("bp{i}.png"), bytes, run));
    }
}

/// (flag, bad values): each command-line case breaks one to three of these.
const BAD_FLAGS: &[(&str, &[&str])] = &[
    (
        "--steps",
        &[
            "0",
            "-1",
            "1001",
            "1000000000",
            "abc",
            "99999999999999999999999",
            "",
        ],
    ),
    ("--batch", &["0", "-3", "x", "18446744073709551616"]),
    (
        "--slices",
        &[
            "a:b", "5:2", "-1:3", "999:1000", ":", "1:", "0:0:0", "0-1", "",
        ],
    ),
    (
        "--guidance",
        &["nan", "inf", "-inf", "1e400", "1001", "-1e9", "--", "x"],
    ),
    ("--seed", &["-1", "18446744073709551616", "seed"]),
    ("--device", &["gpu7", "", "cuda"]),
    ("--precision", &["fp8", "bf16", "fp16"]),
    ("--flair", &["/nonexistent/f.npy", "", "/dev/null", "/"]),
    ("--t1", &["/nonexistent/t.npy", "/proc/self/mem"]),
    ("--config", &["/nonexistent/c.yaml", "/", "/dev/zero"]),
    ("--unet", &["/nonexistent/u.pt", "/dev/urandom"]),
    ("--init-noise", &["/nonexistent/n.npy", "/dev/null"]),
    ("--mask", &["/nonexistent/m.nii"]),
];

fn command_line_cases(g: &mut Gen, out: &mut Vec<Case>) {
    let cfg = s(fixture("config_small.yaml"));
    let good = detect_args(
        &cfg,
        &s(fixture("flair_raw.npy")),
        &s(fixture("t1_raw.npy")),
    );
    out.push(Case {
        category: "command line",
        file: None,
        run: Run::Bin(good.clone()),
        names: vec![],
        control: true,
    });
    for _ in 0..70 {
        let mut args = good.clone();
        let mut names = vec![];
        for _ in 0..1 + g.below(3) {
            let (flag, values) = *g.pick(BAD_FLAGS);
            let value = g.pick(values).to_string();
            set_flag(&mut args, flag, &value, g.chance(20));
            names.push(flag.to_string());
            names.push(value.clone());
            names.push(value.rsplit('/').next().unwrap().to_owned());
        }
        if g.chance(15) {
            let i = 1 + g.below(args.len() - 1);
            names.push(args.remove(i));
        }
        names.retain(|n| !n.is_empty());
        out.push(Case {
            category: "command line",
            file: None,
            run: Run::Bin(args),
            names,
            control: false,
        });
    }
}

/// Sets `flag` to `value`, appending a second `flag value` when `twice`.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str, twice: bool) {
    match args.iter().position(|a| a == flag) {
        Some(i) if !twice => args[i + 1] = value.into(),
        _ => args.extend([flag.into(), value.into()]),
    }
}

fn generate(seed: u64, shared: &Path) -> Vec<Case> {
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    let bases = Bases::load();
    let mut cases = Vec::new();
    library_cases(&mut g, &bases, &mut cases);
    binary_file_cases(&mut g, &bases, shared, &mut cases);
    command_line_cases(&mut g, &mut cases);
    cases
}

// ---- running and judging ----

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Failure {
    Panic,
    Signal,
    TimeOut,
    Budget,
    MultiLine,
    Unnamed,
    DebugForm,
    Leftover,
    BadSuccess,
    Control,
}

struct Verdict {
    valid: bool,
    failure: Option<(Failure, String)>,
}

fn ok(valid: bool) -> Verdict {
    Verdict {
        valid,
        failure: None,
    }
}

fn fail(kind: Failure, text: String) -> Verdict {
    Verdict {
        valid: false,
        failure: Some((kind, text)),
    }
}

/// Rust debug structures, which a reader of an error should never have to decode.
const DEBUG_FORMS: &[&str] = &[
    "Custom {",
    "kind:",
    "Io(",
    "Error {",
    "ChunkType {",
    "Mapping {",
    "String(\"",
    "Number(",
    "Sequence [",
];

/// The error is one line naming one of `names`, in words rather than debug structures.
fn judge_message(msg: &str, names: &[String]) -> Option<(Failure, String)> {
    let msg = msg.trim_end();
    if std::env::var_os("FCD_FUZZ_SHOW").is_some() {
        eprintln!("{msg}");
    }
    if msg.lines().count() != 1 {
        return Some((Failure::MultiLine, msg.to_owned()));
    }
    if let Some(d) = DEBUG_FORMS.iter().find(|d| msg.contains(*d)) {
        return Some((Failure::DebugForm, format!("`{d}` in: {msg}")));
    }
    if !names.iter().any(|n| msg.contains(n.as_str())) {
        return Some((Failure::Unnamed, format!("{msg} (wanted one of {names:?})")));
    }
    None
}

fn run_lib(reader: Reader, path: &Path, names: &[String]) -> Verdict {
    let t = Instant::now();
    let result = std::panic::catch_unwind(|| reader(path));
    let took = t.elapsed();
    let verdict = match result {
        Err(_) => return fail(Failure::Panic, "reader panicked".into()),
        Ok(Ok(())) => ok(true),
        Ok(Err(e)) => match judge_message(&format!("{e:#}"), names) {
            Some(f) => Verdict {
                valid: false,
                failure: Some(f),
            },
            None => ok(false),
        },
    };
    if took > LIB_BUDGET {
        return fail(Failure::TimeOut, format!("took {took:?}"));
    }
    verdict
}

fn limit_memory(cmd: &mut Command) {
    // SAFETY: setrlimit is async-signal-safe and touches nothing shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: BIN_MEMORY,
                rlim_max: BIN_MEMORY,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs the binary, killed at the time budget; `None` when it was killed.
fn spawn_with_budget(args: &[String], stderr_file: &Path) -> Option<std::process::ExitStatus> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fcd"));
    cmd.args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr_file).unwrap());
    limit_memory(&mut cmd);
    let mut child = cmd.spawn().expect("spawn fcd");
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if t.elapsed() > BIN_BUDGET {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_bin(args: &[String], file: Option<&Path>, dir: &Path, names: &[String]) -> Verdict {
    let out = dir.join("out");
    let fill = |a: &String| {
        let a = a.replace("{out}", out.to_str().unwrap());
        match file {
            Some(f) => a.replace("{file}", f.to_str().unwrap()),
            None => a,
        }
    };
    let args: Vec<String> = args.iter().map(fill).collect();
    let stderr_file = dir.join("stderr.txt");
    let Some(status) = spawn_with_budget(&args, &stderr_file) else {
        return fail(Failure::TimeOut, format!("killed after {BIN_BUDGET:?}"));
    };
    let err = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    if err.contains("panicked") {
        return fail(Failure::Panic, err);
    }
    if let Some(leftover) = leftover(dir, status.success()) {
        return fail(Failure::Leftover, leftover);
    }
    match status.code() {
        // Rust aborts on a failed allocation: under the rlimit that is the budget exceeded.
        None if err.contains("memory allocation") => fail(Failure::Budget, err),
        None => fail(Failure::Signal, format!("{status}: {err}")),
        Some(0) => judge_success(&out, args[0] == "detect"),
        Some(1) if err.contains("memory allocation") => fail(Failure::Budget, err),
        Some(1) => match judge_message(&err, names) {
            Some(f) => Verdict {
                valid: false,
                failure: Some(f),
            },
            None if err.starts_with("error: ") => ok(false),
            None => fail(Failure::Unnamed, format!("no `error: ` prefix: {err}")),
        },
        // clap's usage errors span several lines by design (usage and a hint).
        Some(2) if err.starts_with("error: ") => ok(false),
        Some(code) => fail(Failure::Signal, format!("exit {code}: {err}")),
    }
}

/// A staging folder always, and the out folder after a failure, are leftovers.
fn leftover(dir: &Path, success: bool) -> Option<String> {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.contains("staging") || (name == "out" && !success) {
            return Some(name);
        }
    }
    None
}

/// A run that succeeded wrote its outputs, and every array in them is finite.
fn judge_success(out: &Path, detect: bool) -> Verdict {
    if !detect {
        return ok(true);
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return fail(Failure::BadSuccess, "exit 0 but no --out".into());
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "npy") {
            match npy::read_array(&p) {
                Ok((_, v)) if v.iter().all(|x| x.is_finite()) => {}
                _ => return fail(Failure::BadSuccess, format!("{} not finite", p.display())),
            }
        }
    }
    ok(true)
}

fn run_case(case: &Case, root: &Path, index: usize) -> Verdict {
    let dir = root.join(format!("case{index}"));
    std::fs::create_dir(&dir).unwrap();
    let path = case.file.as_ref().map(|(name, bytes)| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    });
    let verdict = match &case.run {
        Run::Lib(reader) => run_lib(*reader, path.as_deref().unwrap(), &case.names),
        Run::Bin(args) => run_bin(args, path.as_deref(), &dir, &case.names),
    };
    let _ = std::fs::remove_dir_all(&dir);
    verdict
}

fn known(category: &str, text: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|(c, needle, _)| *c == category && text.contains(needle))
        .map(|(_, _, bug)| *bug)
}

#[derive(Default)]
struct Tally {
    cases: usize,
    valid: usize,
    known: usize,
    failures: BTreeMap<Failure, usize>,
}

fn run_all(cases: &[Case], threads: usize) -> (BTreeMap<&'static str, Tally>, Vec<String>) {
    let root = tempfile::tempdir().unwrap();
    let next = AtomicUsize::new(0);
    let tallies = Mutex::new(BTreeMap::<&'static str, Tally>::new());
    let reports = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let mut v = run_case(case, root.path(), i);
                if case.control && !v.valid {
                    let why = v.failure.map(|f| f.1).unwrap_or_default();
                    v.failure =
                        Some((Failure::Control, format!("an unmutated seed failed: {why}")));
                }
                let mut t = tallies.lock().unwrap();
                let tally = t.entry(case.category).or_default();
                tally.cases += 1;
                tally.valid += v.valid as usize;
                if let Some((kind, text)) = v.failure {
                    if known(case.category, &text).is_some() {
                        tally.known += 1;
                    } else {
                        *tally.failures.entry(kind).or_default() += 1;
                        let line = text.replace('\n', " | ");
                        reports
                            .lock()
                            .unwrap()
                            .push(format!("case {i} [{}] {kind:?}: {line}", case.category));
                    }
                }
            });
        }
    });
    (tallies.into_inner().unwrap(), reports.into_inner().unwrap())
}

/// Peak resident memory of `who` (RUSAGE_SELF: the in-process cases; RUSAGE_CHILDREN: the
/// largest binary case), in MiB.
fn peak_rss_mib(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    u.ru_maxrss as f64 / 1024.0
}

const COLUMNS: [Failure; 10] = [
    Failure::Panic,
    Failure::Signal,
    Failure::TimeOut,
    Failure::Budget,
    Failure::MultiLine,
    Failure::Unnamed,
    Failure::DebugForm,
    Failure::Leftover,
    Failure::BadSuccess,
    Failure::Control,
];

fn table(tallies: &BTreeMap<&'static str, Tally>) -> String {
    let mut s = format!(
        "{:<16}{:>7}{:>7}{:>7}",
        "category", "cases", "valid", "known"
    );
    for c in COLUMNS {
        s += &format!("{:>11}", format!("{c:?}"));
    }
    s.push('\n');
    let mut total = Tally::default();
    for (cat, t) in tallies {
        s += &row(cat, t);
        total.cases += t.cases;
        total.valid += t.valid;
        total.known += t.known;
        for (k, n) in &t.failures {
            *total.failures.entry(*k).or_default() += n;
        }
    }
    s + &row("total", &total)
}

fn row(name: &str, t: &Tally) -> String {
    let mut s = format!("{name:<16}{:>7}{:>7}{:>7}", t.cases, t.valid, t.known);
    for c in COLUMNS {
        s += &format!("{:>11}", t.failures.get(&c).copied().unwrap_or(0));
    }
    s + "\n"
}

#[test]
fn fuzz_suite() {
    let seed = std::env::var("FCD_FUZZ_SEED")
        .ok()
        .map(|v| v.parse().expect("FCD_FUZZ_SEED: a u64"))
        .unwrap_or(DEFAULT_SEED);
    let t = Instant::now();
    let shared = tempfile::tempdir().unwrap();
    let mut cases = generate(seed, shared.path());
    // FCD_FUZZ_ONLY=<category> narrows a replay to one category (the count check still holds).
    if let Ok(only) = std::env::var("FCD_FUZZ_ONLY") {
        cases.retain(|c| c.category == only);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let (tallies, reports) = run_all(&cases, threads);
    println!(
        "fuzz suite: seed {seed} (FCD_FUZZ_SEED), {} cases, {threads} threads, {:.1} s",
        cases.len(),
        t.elapsed().as_secs_f64()
    );
    println!("{}", table(&tallies));
    println!(
        "peak memory (ru_maxrss): {:.0} MiB in-process, {:.0} MiB the largest binary case",
        peak_rss_mib(libc::RUSAGE_SELF),
        peak_rss_mib(libc::RUSAGE_CHILDREN)
    );
    for r in reports.iter().take(40) {
        println!("{r}");
    }
    if std::env::var_os("FCD_FUZZ_ONLY").is_none() {
        assert!(cases.len() >= 1000, "only {} cases", cases.len());
    }
    assert!(
        reports.is_empty(),
        "{} failing cases (seed {seed}); see the table",
        reports.len()
    );
}
