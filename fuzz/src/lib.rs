//! What every fuzz target asserts of a parser's error, and what the checkpoint targets
//! assert of the tensors a parser accepts.

use fcd::io::checkpoint::Loaded;

/// The error contract: one line (the CLI prints it after `error: `), not empty.
pub fn check_error(e: &anyhow::Error) {
    let text = format!("{e:#}");
    assert!(!text.trim().is_empty(), "an empty error");
    assert!(!text.contains('\n'), "an error of several lines: {text:?}");
}

/// Accepted weights: float dtypes only, each tensor's data exactly its shape's size.
pub fn check_loaded(loaded: &Loaded) {
    assert!(!loaded.tensors.is_empty(), "a checkpoint of no tensors");
    for (name, t) in &loaded.tensors {
        let count = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(count, Some(t.data.len()), "tensor {name}: {:?}", t.shape);
        let dtype = loaded.dtypes.get(name).copied();
        assert!(
            matches!(dtype, Some("float32" | "float16" | "bfloat16" | "float64")),
            "tensor {name} accepted with dtype {dtype:?}"
        );
    }
}
