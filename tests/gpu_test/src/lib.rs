//! `#[gpu_test]`: a test that needs a CUDA GPU. It is `#[test]`, ignored (with the reason)
//! in a build that found no CUDA driver (`fcd_cuda_driver`, set by fcd's build.rs), and run
//! everywhere else, where it must get its GPU from `tests/common`'s `gpu()` or fail: a GPU
//! test never passes without running.

use proc_macro::TokenStream;

#[proc_macro_attribute]
pub fn gpu_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return r##"compile_error!("#[gpu_test] takes no arguments");"##
            .parse()
            .expect("a valid token stream");
    }
    let mut out: TokenStream = concat!(
        "#[test] #[cfg_attr(not(fcd_cuda_driver), ignore = \"needs a CUDA GPU: built without ",
        "a CUDA driver; run with --include-ignored on a GPU machine\")]"
    )
    .parse()
    .expect("a valid token stream");
    out.extend(item);
    out
}
