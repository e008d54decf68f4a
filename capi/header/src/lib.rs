//! include/fcd.h as cbindgen makes it from the C ABI's source (capi/src, with
//! capi/header/cbindgen.toml); tests/header.rs checks that the committed header is current.

use std::path::Path;

/// The header of capi/src.
pub fn generate() -> String {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(here.join("cbindgen.toml"))
        .expect("capi/header/cbindgen.toml is readable");
    // The crate root rather than the crate (cbindgen follows its `mod`s): the crate would
    // make cbindgen run `cargo metadata`.
    let mut header = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(here.join("../src/lib.rs"))
        .generate()
        .expect("cbindgen parses capi/src")
        .write(&mut header);
    String::from_utf8(header).expect("cbindgen writes UTF-8")
}
