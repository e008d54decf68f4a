//! Atomic output: a file is either absent or complete, and a failed run adds nothing to its
//! output directory.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary names made by one process (threads may write side by side).
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced to disk
/// and then renamed over `path`, so readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let dir = parent_dir(path);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        unique_suffix()
    ));
    let written = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = written {
        // Best effort: the temporary may not exist if creating it was what failed.
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    sync_dir(&dir);
    Ok(())
}

/// Files of one run, written into a hidden staging directory next to the target directory and
/// moved into the target only by [`Staged::commit`]. Dropping an uncommitted `Staged` deletes
/// the staging directory, so a failed run leaves no half-written output behind.
#[derive(Debug)]
pub struct Staged {
    target: PathBuf,
    staging: PathBuf,
    files: Vec<PathBuf>,
}

impl Staged {
    /// Starts staging output for the directory `target` (which need not exist yet).
    pub fn new(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("{}: not a directory path", target.display()))?;
        let parent = parent_dir(target);
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let staging = parent.join(format!(
            ".{}.staging-{}",
            name.to_string_lossy(),
            unique_suffix()
        ));
        fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        Ok(Self {
            target: target.to_path_buf(),
            staging,
            files: Vec::new(),
        })
    }

    /// The directory the files will end up in.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Stages `bytes` as `name`, a relative path inside the target directory.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let rel = Path::new(name);
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            bail!("output name {name:?} is not a plain relative path");
        }
        if self.files.iter().any(|f| f == rel) {
            bail!("output {name:?} written twice");
        }
        let path = self.staging.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut f =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        self.files.push(rel.to_path_buf());
        Ok(())
    }

    /// Moves every staged file into the target directory (replacing files of the same name)
    /// and removes the staging directory. Each move is a rename on one file system; should one
    /// fail, the files moved before it stay and the error names the one that did not.
    pub fn commit(self) -> Result<()> {
        fs::create_dir_all(&self.target)
            .with_context(|| format!("creating {}", self.target.display()))?;
        for rel in &self.files {
            let to = self.target.join(rel);
            if let Some(dir) = to.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::rename(self.staging.join(rel), &to)
                .with_context(|| format!("moving output into {}", to.display()))?;
        }
        sync_dir(&self.target);
        // Drop removes the (now empty of files) staging directory.
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Nothing useful can be done about a failure to clean up a hidden directory.
        let _ = fs::remove_dir_all(&self.staging);
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes a rename durable; some platforms cannot open directories, which is not an error.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
