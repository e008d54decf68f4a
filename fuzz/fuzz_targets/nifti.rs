//! A NIfTI-1 volume: the header, `vox_offset`, the voxel data and (.nii.gz) the gzip stream.
//! The first byte chooses how the rest is read: 0 as a .nii, 1 gzip-compressed by the
//! harness as a valid .nii.gz, anything else as the bytes of a .nii.gz (so mostly a corrupt
//! or truncated gzip stream).

#![no_main]

use fcd::io::volume::{self, MAX_VOXELS};
use fcd_fuzz::check_error;
use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let gzipped;
    let (bytes, gz) = match mode {
        0 => (rest, false),
        1 => {
            let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(rest).expect("gzip");
            gzipped = enc.finish().expect("gzip");
            (&gzipped[..], true)
        }
        _ => (rest, true),
    };
    let path = Path::new(if gz { "fuzz.nii.gz" } else { "fuzz.nii" });
    match volume::read_volume_from(bytes, bytes.len() as u64, gz, path) {
        Ok(v) => {
            let n = v
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            assert!(n.is_some_and(|n| n <= MAX_VOXELS), "dims {:?}", v.dims);
            assert_eq!(n, Some(v.data.len() as u64), "dims {:?}", v.dims);
        }
        Err(e) => check_error(&e),
    }
});
