//! Reading and writing files: checkpoints (torch.save zip / safetensors), .npy arrays, atomic writes.

pub mod atomic;
pub mod checkpoint;
pub mod dataset;
pub mod npy;
pub mod pickle;
pub mod png;
pub mod volume;

/// `p` made absolute (symlinks resolved) for summaries; as given when that fails.
pub fn absolute(p: &std::path::Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
