//! Checkpoint reading against files written by PyTorch (tools/make_ckpt_fixtures.py).

use fcd::io::checkpoint::{load, load_with_dtypes};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ckpt")
        .join(name)
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every tensor the fixture script recorded for `file`, and nothing else, with exact values.
fn check_exact(file: &str) {
    let all = expected();
    let want = all[file]
        .as_object()
        .unwrap_or_else(|| panic!("{file} not in expected.json"));
    let loaded = load_with_dtypes(&fixture(file)).unwrap_or_else(|e| panic!("{e:#}"));
    let got_keys: Vec<_> = loaded.tensors.keys().cloned().collect();
    let mut want_keys: Vec<_> = want.keys().cloned().collect();
    want_keys.sort();
    assert_eq!(got_keys, want_keys, "{file}: keys");
    for (key, w) in want {
        let t = &loaded.tensors[key];
        let shape: Vec<usize> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{file}: shape of {key}");
        let values: Vec<f32> = w["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(t.data.len(), values.len(), "{file}: length of {key}");
        for (i, (a, b)) in t.data.iter().zip(&values).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{file}: {key}[{i}] = {a}, want {b}"
            );
        }
        assert_eq!(
            loaded.dtypes[key],
            w["dtype"].as_str().unwrap(),
            "{file}: dtype of {key}"
        );
    }
}

#[test]
fn nested_f32_with_views_and_extra_keys() {
    check_exact("nested_f32.pt");
    let m = load(&fixture("nested_f32.pt")).unwrap();
    // The `model.` prefix is kept, and top-level tensors outside the state dict are ignored.
    assert!(m.contains_key("model.input_blocks.0.0.weight"));
    assert!(!m.contains_key("top_level_tensor"));
    // Transposed view of arange(12).reshape(3, 4) * 0.5 - 2.
    let p = &m["model.proj.weight"];
    assert_eq!(p.shape, vec![4, 3]);
    assert_eq!(&p.data[..6], &[-2.0, 0.0, 2.0, -1.5, 0.5, 2.5]);
    // Views sharing one storage: offset slice and stride-2 view of `model.base`.
    let base = &m["model.base"].data;
    assert_eq!(m["model.slice"].data, base[5..11].to_vec());
    let odd: Vec<f32> = base.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(m["model.every_other"].data, odd);
    assert_eq!(m["model.scalar"].shape, Vec::<usize>::new());
    assert_eq!(m["model.scalar"].data, vec![0.25]);
    assert_eq!(m["model.conv1d.weight"].shape, vec![3, 2, 1]);
}

#[test]
fn arbitrary_archive_folder_name() {
    check_exact("unet_weights.pt");
    assert_eq!(
        load(&fixture("unet_weights.pt")).unwrap(),
        load(&fixture("nested_f32.pt")).unwrap()
    );
}

#[test]
fn pickle_protocol_4() {
    check_exact("proto4.pt");
}

#[test]
fn bare_state_dict() {
    check_exact("bare_f32.pt");
}

#[test]
fn half_bfloat16_and_double() {
    check_exact("f16.pt");
    check_exact("bf16.pt");
    check_exact("f64.pt");
    let l = load_with_dtypes(&fixture("f16.pt")).unwrap();
    assert_eq!(l.dtypes["wt"], "float16");
    let (w, wt) = (&l.tensors["w"], &l.tensors["wt"]);
    assert_eq!(
        (w.shape.as_slice(), wt.shape.as_slice()),
        (&[3, 5][..], &[5, 3][..])
    );
    for i in 0..3 {
        for j in 0..5 {
            assert_eq!(w.data[i * 5 + j], wt.data[j * 3 + i]);
        }
    }
}

#[test]
fn safetensors_mixed_dtypes() {
    check_exact("mixed.safetensors");
}

fn err_of(file: &str) -> String {
    let path = fixture(file);
    let e = load(&path).expect_err(file);
    let msg = format!("{e}");
    assert_eq!(
        msg,
        format!("{e:#}"),
        "the whole reason is in the top-level message"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.starts_with(&path.display().to_string()),
        "names the file: {msg}"
    );
    msg
}

fn assert_err(file: &str, parts: &[&str]) {
    let msg = err_of(file);
    for p in parts {
        assert!(msg.contains(p), "{file}: `{p}` not in: {msg}");
    }
}

#[test]
fn refuses_code_execution() {
    assert_err(
        "malicious_global.pt",
        &[
            "pickle global `posix.system` is not allowed",
            "GLOBAL",
            "only tensors and plain containers",
        ],
    );
    assert_err(
        "malicious_stack_global.pt",
        &[
            "pickle global `builtins.eval` is not allowed",
            "STACK_GLOBAL",
        ],
    );
}

#[test]
fn reports_broken_files() {
    assert_err("truncated.pt", &["not a readable zip archive", "truncated"]);
    assert_err(
        "random.bin",
        &["not a torch.save zip archive nor a safetensors file"],
    );
    assert_err("big_endian.pt", &["big-endian"]);
    assert_err(
        "missing_storage.pt",
        &[
            "`archive/data/0` is missing",
            "model.input_blocks.0.0.weight",
        ],
    );
    assert_err(
        "short_storage.pt",
        &[
            "storage `archive/data/0` holds 8 bytes",
            "72 float32 elements",
        ],
    );
    assert_err("no_data_pkl.pt", &["missing data.pkl"]);
    assert_err(
        "state_dict_not_tensors.pt",
        &["`state_dict` entry `lr` is a float, not a tensor"],
    );
    assert_err(
        "state_dict_list.pt",
        &["`state_dict` is a list, not a dict of tensors"],
    );
    assert_err("no_tensors.pt", &["no `state_dict` entry and no tensors"]);
    let missing = fixture("does_not_exist.pt");
    let msg = format!("{}", load(&missing).unwrap_err());
    assert!(
        msg.contains("does_not_exist.pt") && msg.contains("cannot open"),
        "{msg}"
    );
}

#[test]
fn reports_broken_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("mixed.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &good[..good.len() - 4]).unwrap();
    let msg = format!("{}", load(&path).unwrap_err());
    assert!(
        msg.contains("cut.safetensors") && msg.contains("invalid safetensors file"),
        "{msg}"
    );
}

/// Deterministic corruption of valid files: any outcome but a panic is acceptable.
#[test]
fn corrupted_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mangled.pt");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut tries = 0;
    for file in ["nested_f32.pt", "proto4.pt", "f16.pt", "mixed.safetensors"] {
        let good = std::fs::read(fixture(file)).unwrap();
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for cut in (0..good.len()).step_by(37) {
            cases.push(good[..cut].to_vec());
        }
        for _ in 0..300 {
            let mut bad = good.clone();
            for _ in 0..=(next() % 3) {
                let i = (next() % bad.len() as u64) as usize;
                bad[i] ^= 1 << (next() % 8);
            }
            cases.push(bad);
        }
        for case in cases {
            std::fs::write(&path, &case).unwrap();
            let outcome = std::panic::catch_unwind(|| load(&path).map(|m| m.len()));
            assert!(outcome.is_ok(), "{file}: panic on a corrupted copy");
            tries += 1;
        }
    }
    assert!(tries > 1000);
}

/// The archive `nested_f32.pt` with its data.pkl replaced.
fn repack(original: &[u8], pkl: &[u8]) -> Vec<u8> {
    use std::io::{Cursor, Read, Write};
    let mut src = zip::ZipArchive::new(Cursor::new(original)).unwrap();
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..src.len() {
        let mut entry = src.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut body = Vec::new();
        entry.read_to_end(&mut body).unwrap();
        out.start_file(name.as_str(), opts).unwrap();
        out.write_all(if name.ends_with("/data.pkl") {
            pkl
        } else {
            &body
        })
        .unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// Corruptions of the pickle stream itself (the zip CRC hides those from the test above), both
/// parsed alone and loaded, so that mangled shapes, strides and offsets reach the tensor reader.
#[test]
fn corrupted_pickles_never_panic() {
    let zipped = std::fs::read(fixture("nested_f32.pt")).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&zipped)).unwrap();
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name("archive/data.pkl").unwrap(), &mut pkl).unwrap();
    assert!(fcd::io::pickle::parse(&pkl).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repacked.pt");
    std::fs::write(&path, repack(&zipped, &pkl)).unwrap();
    assert_eq!(
        load(&path).unwrap(),
        load(&fixture("nested_f32.pt")).unwrap()
    );

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for cut in 0..pkl.len() {
        let r = std::panic::catch_unwind(|| fcd::io::pickle::parse(&pkl[..cut]).is_ok());
        assert_eq!(
            r.ok(),
            Some(false),
            "truncated pickle at {cut} must be an error"
        );
    }
    let (mut loaded, mut refused) = (0, 0);
    for round in 0..4000 {
        let mut bad = pkl.clone();
        let i = (next() % bad.len() as u64) as usize;
        bad[i] = next() as u8;
        let r = std::panic::catch_unwind(|| fcd::io::pickle::parse(&bad).map(|p| p.root.kind()));
        assert!(r.is_ok(), "parse panics with byte {i} set to {}", bad[i]);
        if round % 2 == 0 {
            std::fs::write(&path, repack(&zipped, &bad)).unwrap();
            match std::panic::catch_unwind(|| load(&path).is_ok()) {
                Ok(true) => loaded += 1,
                Ok(false) => refused += 1,
                Err(_) => panic!("load panics with pickle byte {i} set to {}", bad[i]),
            }
        }
    }
    // Both outcomes occur: many bytes are string contents or values that do not matter.
    assert!(
        loaded > 0 && refused > 0,
        "loaded {loaded}, refused {refused}"
    );
}

/// `_rebuild_tensor_v2` of a float32 storage of nested_f32.pt: `data/0` holds 72 elements
/// (`model.input_blocks.0.0.weight`), `data/3` holds 20 (`model.base`).
fn tensor_pickle(storage: u8, offset: u8, size: u8, stride: u8) -> Vec<u8> {
    let numel = if storage == 0 { 72 } else { 20 };
    let mut p =
        b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            .to_vec();
    p.extend_from_slice(&[b'X', 1, 0, 0, 0, b'0' + storage]);
    p.extend_from_slice(&[b'X', 3, 0, 0, 0, b'c', b'p', b'u', b'K', numel, b't', b'Q']);
    p.extend_from_slice(&[
        b'K', offset, b'K', size, 0x85, b'K', stride, 0x85, 0x89, b')', b't', b'R',
    ]);
    p
}

fn load_hand_pickle(pkl: &[u8]) -> Result<fcd::io::checkpoint::TensorMap, String> {
    let zipped = std::fs::read(fixture("nested_f32.pt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hand.pt");
    std::fs::write(&path, repack(&zipped, pkl)).unwrap();
    load(&path).map_err(|e| e.to_string())
}

#[test]
fn views_are_bounds_checked() {
    let base = load(&fixture("nested_f32.pt")).unwrap()["model.base"]
        .data
        .clone();
    let wrap = |t: Vec<u8>| [b"\x80\x02}X\x01\x00\x00\x00w".to_vec(), t, b"s.".to_vec()].concat();
    // Offset 17, two elements 2 apart: the last one is element 19.
    let got = load_hand_pickle(&wrap(tensor_pickle(3, 17, 2, 2))).unwrap();
    assert_eq!(got["w"].data, vec![base[17], base[19]]);
    for (offset, size, stride) in [(18, 2, 2), (0, 21, 1), (1, 20, 1)] {
        let msg = load_hand_pickle(&wrap(tensor_pickle(3, offset, size, stride))).unwrap_err();
        assert!(
            msg.contains("reach past the 20 elements of storage `archive/data/3`"),
            "{msg}"
        );
        assert!(msg.contains("tensor `w`"), "{msg}");
    }
}

#[test]
fn aliasing_cannot_blow_up_memory() {
    // One 72-element tensor under 2000 keys: 144000 floats from a ~20 KB file.
    let mut pkl = b"\x80\x02}(\x8c\x02k0".to_vec();
    pkl.extend(tensor_pickle(0, 0, 72, 1));
    pkl.extend_from_slice(b"q\x00");
    for i in 1..2000 {
        let key = format!("k{i}");
        pkl.extend_from_slice(&[0x8c, key.len() as u8]);
        pkl.extend_from_slice(key.as_bytes());
        pkl.extend_from_slice(b"h\x00");
    }
    pkl.extend_from_slice(b"u.");
    let msg = load_hand_pickle(&pkl).unwrap_err();
    assert!(
        msg.contains("the tensors add up to 144000 elements, implausibly many"),
        "{msg}"
    );
    // The same with 10 keys is a legitimate (if odd) checkpoint.
    let mut pkl = b"\x80\x02}(\x8c\x02k0".to_vec();
    pkl.extend(tensor_pickle(0, 0, 72, 1));
    pkl.extend_from_slice(b"q\x00");
    for i in 1..10u8 {
        pkl.extend_from_slice(&[0x8c, 2, b'k', b'0' + i, b'h', 0]);
    }
    pkl.extend_from_slice(b"u.");
    let m = load_hand_pickle(&pkl).unwrap();
    assert_eq!(m.len(), 10);
    assert!(m.values().all(|t| t.data == m["k0"].data));
}
