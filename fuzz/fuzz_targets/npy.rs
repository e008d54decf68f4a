//! An `.npy` file of slices: the header (dtype, order, shape) and the data.

#![no_main]

use fcd::io::npy;
use fcd_fuzz::check_error;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    match npy::read_slices_from(bytes, bytes.len() as u64, Path::new("fuzz.npy")) {
        Ok(s) => {
            assert!(s.b * s.h * s.w > 0, "no pixels: {:?}", s.shape);
            assert_eq!(s.data.len(), s.b * s.h * s.w, "shape {:?}", s.shape);
            let pixels: usize = s.shape.iter().product();
            assert_eq!(pixels, s.data.len(), "shape {:?}", s.shape);
        }
        Err(e) => check_error(&e),
    }
});
