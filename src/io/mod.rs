//! Reading and writing files: checkpoints (torch.save zip / safetensors), .npy arrays, atomic writes.

pub mod atomic;
pub mod checkpoint;
pub mod dataset;
pub mod lock;
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

/// The error's chain as one line (`a: b: c`) with its control characters escaped (a newline
/// as `\n`): errors quote names that files hold (a pickle global, a tensor name).
pub fn one_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
