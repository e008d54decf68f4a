//! The `data.pkl` of a torch.save archive: the input is the pickle; the harness wraps it in
//! an archive holding a storage of the declared size for every tensor the pickle names (up
//! to a budget), so that the reading of views, strides and offsets is reached too.

#![no_main]

use fcd::io::checkpoint;
use fcd::io::pickle::{self, Pickle, StorageRef, Value};
use fcd_fuzz::{check_error, check_loaded};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::rc::Rc;
use zip::write::SimpleFileOptions;

/// Bytes of storage the harness writes for one input, at most.
const STORAGE_BUDGET: u64 = 1 << 20;

fuzz_target!(|pkl: &[u8]| {
    let storages = match pickle::parse(pkl) {
        Ok(p) => storages(&p),
        Err(e) => return check_error(&e),
    };
    match checkpoint::load_bytes(&archive(pkl, &storages)) {
        Ok(loaded) => check_loaded(&loaded),
        Err(e) => check_error(&e),
    }
});

/// The storages of the tensors at the top level and in `state_dict`, by key.
fn storages(p: &Pickle) -> BTreeMap<String, Rc<StorageRef>> {
    let mut found = BTreeMap::new();
    let mut scan = |dict: &Value| {
        for (_, v) in p.dict_items(dict).unwrap_or_default() {
            if let Value::Tensor(t) = v {
                found.insert(t.storage.key.clone(), t.storage.clone());
            }
        }
    };
    scan(&p.root);
    if let Some(sd) = p.dict_get(&p.root, "state_dict") {
        scan(sd);
    }
    found
}

/// A stored (uncompressed) archive as torch.save writes it. Storages hold 0.5 in every
/// element of their dtype's width; those past the budget are left out.
fn archive(pkl: &[u8], storages: &BTreeMap<String, Rc<StorageRef>>) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut put = |name: &str, bytes: &[u8]| {
        zip.start_file(name, opts).expect("zip entry");
        zip.write_all(bytes).expect("zip write");
    };
    put("archive/data.pkl", pkl);
    put("archive/byteorder", b"little");
    let mut budget = STORAGE_BUDGET;
    for (key, s) in storages {
        let width = s.dtype.size() as u64;
        let Some(len) = s.numel.checked_mul(width).filter(|&n| n <= budget) else {
            continue;
        };
        budget -= len;
        let one_half: &[u8] = match width {
            8 => &0.5f64.to_le_bytes(),
            4 => &0.5f32.to_le_bytes(),
            2 => &[0x00, 0x38], // float16 0.5 (bfloat16 reads it as a small finite value)
            _ => &[1],
        };
        put(
            &format!("archive/data/{key}"),
            &one_half.repeat(len as usize / one_half.len()),
        );
    }
    zip.finish().expect("zip finish").into_inner()
}
