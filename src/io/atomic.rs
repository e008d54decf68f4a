//! Atomic output: a file is either absent or complete, and a failed run adds nothing to its
//! output directory.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// Distinguishes temporary names made by one process (threads may write side by side).
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced to disk
/// and then renamed over `path`, so readers never see a partial file. A SIGINT or SIGTERM
/// meanwhile waits for the temporary to be gone (renamed, or removed when the signal came
/// before the rename), then stops the run with [`Interrupted`].
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
    let live = Live::new();
    let written = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        interrupted()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = written {
        // Best effort: the temporary may not exist if creating it was what failed.
        let _ = fs::remove_file(&tmp);
        drop(live);
        interrupted()?;
        return Err(e.context(format!("writing {}", path.display())));
    }
    sync_dir(&dir);
    drop(live);
    interrupted()
}

/// Files of one run, written into a hidden staging directory next to the target directory and
/// moved into the target only by [`Staged::commit`]. Dropping an uncommitted `Staged` deletes
/// the staging directory, so a failed run leaves no half-written output behind.
#[derive(Debug)]
pub struct Staged {
    target: PathBuf,
    staging: PathBuf,
    files: Vec<PathBuf>,
    /// Dropped after `drop` has removed the staging directory.
    _live: Live,
}

impl Staged {
    /// Starts staging output for the directory `target` (which need not exist yet).
    pub fn new(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("{}: not a directory path", target.display()))?;
        let parent = parent_dir(target);
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let live = Live::new();
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
            _live: live,
        })
    }

    /// The directory the files will end up in.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Stages `bytes` as `name`, a relative path inside the target directory.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        interrupted()?;
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
    /// and removes the staging directory. Every destination is checked before anything moves;
    /// should a move still fail, the files moved before it are taken back and the files they
    /// replaced restored, so the target is as it was.
    pub fn commit(self) -> Result<()> {
        interrupted()?;
        let created = create_dirs(&self.target)?;
        let checked = self.check_destinations();
        let mut moved = Vec::new();
        let result = checked.and_then(|()| {
            self.files.iter().try_for_each(|rel| {
                self.move_in(rel)?;
                moved.push(rel.as_path());
                Ok(())
            })
        });
        if let Err(e) = result {
            self.roll_back(&moved);
            for dir in created.iter().rev() {
                // Only directories this commit made, and only while empty.
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
        sync_dir(&self.target);
        // Drop removes the (now empty of files) staging directory.
        Ok(())
    }

    /// Refuses a destination that is a directory, or lies under a file.
    fn check_destinations(&self) -> Result<()> {
        for rel in &self.files {
            let to = self.target.join(rel);
            for dir in to.ancestors().skip(1) {
                if dir == self.target {
                    break;
                }
                if dir.exists() && !dir.is_dir() {
                    bail!(
                        "{}: exists and is not a directory; nothing was written",
                        dir.display()
                    );
                }
            }
            if to.is_dir() {
                bail!(
                    "{}: exists and is a directory; nothing was written",
                    to.display()
                );
            }
        }
        Ok(())
    }

    /// Where the file a move replaces waits until the commit is through.
    fn backup(&self, rel: &Path) -> PathBuf {
        self.staging.join(".replaced").join(rel)
    }

    fn move_in(&self, rel: &Path) -> Result<()> {
        let to = self.target.join(rel);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if to.exists() {
            let backup = self.backup(rel);
            if let Some(dir) = backup.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::rename(&to, &backup).with_context(|| format!("replacing {}", to.display()))?;
        }
        let moved = fs::rename(self.staging.join(rel), &to)
            .with_context(|| format!("moving output into {}", to.display()));
        if moved.is_err() && self.backup(rel).exists() {
            let _ = fs::rename(self.backup(rel), &to);
        }
        moved
    }

    /// Undoes the moves of `moved`, newest first.
    fn roll_back(&self, moved: &[&Path]) {
        for rel in moved.iter().rev() {
            let to = self.target.join(rel);
            let backup = self.backup(rel);
            let _ = fs::rename(&to, self.staging.join(rel));
            if backup.exists() {
                let _ = fs::rename(&backup, &to);
            }
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Nothing useful can be done about a failure to clean up a hidden directory.
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// `dir` and its missing ancestors created; returns those it created, outermost first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(missing)
}

/// Staging directories and temporary files alive in this process; a signal with none alive
/// exits at once.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Counts one staging directory or temporary file in [`LIVE`] while it lives. Made before
/// the thing exists, so that a signal never misses it, and dropped after it is gone.
#[derive(Debug)]
struct Live;

impl Live {
    fn new() -> Self {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}
/// The signal that asked this process to stop (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The error of a run stopped by SIGINT or SIGTERM; the CLI exits with 128 + `signal`.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by signal {}", self.signal)
    }
}

impl std::error::Error for Interrupted {}

/// An error once SIGINT or SIGTERM has arrived: long loops call it so that the run unwinds
/// and every staging directory is removed by its `Drop`.
pub fn interrupted() -> Result<()> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => Err(Interrupted { signal }.into()),
    }
}

/// Routes SIGINT and SIGTERM to [`interrupted`] (for the command line; a library leaves the
/// process's signals alone).
pub fn install_signal_handlers() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        // SAFETY: the action only touches atomics and calls _exit, both async-signal-safe.
        unsafe { signal_hook::low_level::register(signal, move || on_signal(signal)) }
            .with_context(|| format!("installing the handler of signal {signal}"))?;
    }
    Ok(())
}

fn on_signal(signal: i32) {
    SIGNAL.store(signal, Ordering::SeqCst);
    if LIVE.load(Ordering::SeqCst) == 0 {
        // Nothing to clean up: stop now, as the default action would.
        signal_hook::low_level::exit(128 + signal);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(target: &Path, files: &[&str]) -> Staged {
        let mut s = Staged::new(target).unwrap();
        for f in files {
            s.write(f, f.as_bytes()).unwrap();
        }
        s
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_blocked_destination_moves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        fs::create_dir_all(out.join("z")).unwrap();
        let e = staged(&out, &["a", "z"]).commit().unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        assert_eq!(names(&out), ["z"]);
        assert_eq!(names(tmp.path()), ["o"], "the staging folder is gone");
    }

    #[test]
    fn a_file_in_place_of_a_folder_moves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("overlays"), b"x").unwrap();
        let e = staged(&out, &["a", "overlays/s.png"])
            .commit()
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a directory"), "{e}");
        assert_eq!(names(&out), ["overlays"]);
    }

    #[test]
    fn files_of_the_same_name_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("a"), b"old").unwrap();
        staged(&out, &["a", "b/c"]).commit().unwrap();
        assert_eq!(fs::read(out.join("a")).unwrap(), b"a");
        assert_eq!(fs::read(out.join("b/c")).unwrap(), b"b/c");
        assert_eq!(names(tmp.path()), ["o"]);
    }
}
