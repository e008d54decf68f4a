//! include/fcd.h must be the header cbindgen makes from capi/src.

use std::path::Path;

#[test]
fn header_is_current() {
    let generated = fcd_capi_header::generate();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include/fcd.h");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if generated == committed {
        return;
    }
    if std::env::var_os("FCD_BLESS").is_some() {
        std::fs::write(&path, generated).expect("include/fcd.h is writable");
        return;
    }
    panic!(
        "{} is not the header of capi/src: rerun with FCD_BLESS=1 to rewrite it",
        path.display()
    );
}
