//! A whole checkpoint file in memory: the safetensors header and data (and, from the
//! seeds of torch archives, the zip reading before the pickle).

#![no_main]

use fcd::io::checkpoint;
use fcd_fuzz::{check_error, check_loaded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match checkpoint::load_bytes(bytes) {
        Ok(loaded) => check_loaded(&loaded),
        Err(e) => check_error(&e),
    }
});
