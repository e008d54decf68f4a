//! Atomic output: a file is either absent or complete, and a failed run adds nothing to its
//! output directory.

use anyhow::{bail, ensure, Context, Result};
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

/// A folder of outputs, written into a hidden staging folder beside its final place and
/// moved there whole by [`Staged::commit`]: the folder appears complete under its name in
/// one rename, or not at all. Dropping an uncommitted `Staged` deletes the staging folder.
///
/// A folder it replaces must be one it wrote (it holds [`MARKER`]) or empty: it is swapped
/// with the new one in one atomic exchange where the file system offers it (Linux's
/// `renameat2`), else renamed aside first and removed after. A crash leaves the complete old
/// folder or the complete new one under the name (in the second case, for the instant
/// between the two renames, the old one aside, which [`recover`] puts back), and leftovers
/// beside it that the next run on the folder removes ([`recover`]).
#[derive(Debug)]
pub struct Staged {
    target: PathBuf,
    staging: PathBuf,
    files: Vec<PathBuf>,
    /// Dropped after `drop` has removed the staging directory.
    _live: Live,
}

/// The file every folder [`Staged`] commits holds: what makes an existing folder one fcd
/// may replace.
pub const MARKER: &str = ".fcd-output";

/// The kinds of leftovers a killed run leaves beside a folder `name`: `.name.staging-*`
/// (a folder never committed) and `.name.replaced-*` (a replaced folder not yet removed).
const STAGING: &str = "staging";
const REPLACED: &str = "replaced";

fn sibling(target: &Path, kind: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .with_context(|| format!("{}: not a directory path", target.display()))?;
    Ok(parent_dir(target).join(format!(
        ".{}.{kind}-{}",
        name.to_string_lossy(),
        unique_suffix()
    )))
}

impl Staged {
    /// Starts staging the folder `target` (which need not exist yet); fails at once when
    /// `target` exists and is not a folder fcd may replace.
    pub fn new(target: &Path) -> Result<Self> {
        let parent = parent_dir(target);
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        check_replaceable(target)?;
        let live = Live::new();
        let staging = sibling(target, STAGING)?;
        fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let mut staged = Self {
            target: target.to_path_buf(),
            staging,
            files: Vec::new(),
            _live: live,
        };
        staged.write(
            MARKER,
            b"written by fcd; the folder is replaced whole by the next run\n",
        )?;
        Ok(staged)
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

    /// Puts the staged folder in place of the target, whole: see the type's note. A
    /// signal that arrives once the commit has begun lets it finish.
    pub fn commit(mut self) -> Result<()> {
        interrupted()?;
        check_replaceable(&self.target)?;
        for dir in dirs_of(&self.files) {
            sync_dir(&self.staging.join(dir));
        }
        sync_dir(&self.staging);
        fault_point("commit:staged");
        let target = self.target.clone();
        let context = || format!("moving the output into {}", target.display());
        if !target.exists() {
            fs::rename(&self.staging, &target).with_context(context)?;
        } else if !exchange_disabled() && exchange(&self.staging, &target)? {
            // The old folder is where the staging folder was: Drop removes it.
            fault_point("commit:exchanged");
        } else {
            let aside = sibling(&target, REPLACED)?;
            fs::rename(&target, &aside).with_context(context)?;
            fault_point("commit:aside");
            if let Err(e) = fs::rename(&self.staging, &target) {
                let _ = fs::rename(&aside, &target);
                return Err(e).with_context(context);
            }
            self.staging = aside;
        }
        sync_dir(&parent_dir(&target));
        fault_point("commit:done");
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Nothing useful can be done about a failure to clean up a hidden directory.
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// Refuses a `target` that exists and is not a folder fcd wrote, or an empty one.
fn check_replaceable(target: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.with_context(|| format!("reading {}", target.display()))?,
    };
    ensure!(
        meta.is_dir(),
        "{}: exists and is not a directory; nothing was written",
        target.display()
    );
    let mut entries =
        fs::read_dir(target).with_context(|| format!("listing {}", target.display()))?;
    ensure!(
        target.join(MARKER).is_file() || entries.next().is_none(),
        "{}: exists and holds files fcd did not write (no {MARKER}); choose a new or empty \
         folder, nothing was written",
        target.display()
    );
    Ok(())
}

/// The folders holding `files`, outermost first.
fn dirs_of(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .flat_map(|f| f.ancestors().skip(1))
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Swaps the folders `a` and `b` in one atomic step where the file system can (Linux's
/// `renameat2` with `RENAME_EXCHANGE`): `Ok(false)` where it cannot, having changed nothing.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes());
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e).with_context(|| format!("swapping the output into {}", b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

/// Cleans up after runs on the folder `target` that were killed: puts back a replaced
/// folder whose replacement never arrived, and removes staging folders, folders left aside
/// and temporary files of [`write_atomic`] beside it (and, for a folder written file by
/// file, inside it). Call it holding the folder's lock ([`super::lock`]), so that no live
/// run owns them. Returns what it did, one line each.
pub fn recover(target: &Path) -> Result<Vec<String>> {
    let name = target
        .file_name()
        .with_context(|| format!("{}: not a directory path", target.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = parent_dir(target);
    let mut done = Vec::new();
    let leftovers = |dir: &Path, prefix: &str| -> Result<Vec<PathBuf>> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for e in entries {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            if e.file_name().to_string_lossy().starts_with(prefix) {
                found.push(e.path());
            }
        }
        found.sort();
        Ok(found)
    };
    let mut replaced = leftovers(&parent, &format!(".{name}.{REPLACED}-"))?;
    if !target.exists() {
        if let Some(old) = replaced.pop() {
            fs::rename(&old, target).with_context(|| {
                format!("restoring {} from {}", target.display(), old.display())
            })?;
            done.push(format!(
                "restored {} from a run killed while replacing it",
                target.display()
            ));
        }
    }
    let mut stale = leftovers(&parent, &format!(".{name}.{STAGING}-"))?;
    stale.extend(replaced);
    stale.extend(leftovers(&parent, &format!(".{name}.tmp-"))?);
    // A folder written file by file (an evaluation's): its temporary files and its
    // subfolders' (maps/).
    if target.is_dir() {
        let mut dirs = vec![target.to_path_buf()];
        for e in fs::read_dir(target).with_context(|| format!("listing {}", target.display()))? {
            let p = e
                .with_context(|| format!("listing {}", target.display()))?
                .path();
            if p.is_dir() {
                dirs.push(p);
            }
        }
        for dir in dirs {
            stale.extend(leftovers(&dir, ".")?.into_iter().filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(".tmp-"))
            }));
        }
    }
    for p in stale {
        let gone = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        gone.with_context(|| format!("removing {}, left by a killed run", p.display()))?;
        done.push(format!("removed {}, left by a killed run", p.display()));
    }
    Ok(done)
}

/// Test hooks of the fault suite (`lab` builds only): `FCD_FAULT_AT=<point>` aborts the
/// process there, as a kill -9 would; `FCD_SIGNAL_AT=<point>` sends it SIGTERM there.
fn fault_point(point: &str) {
    #[cfg(feature = "lab")]
    {
        let at = |var: &str| std::env::var(var).is_ok_and(|p| p == point);
        if at("FCD_FAULT_AT") {
            std::process::abort();
        }
        if at("FCD_SIGNAL_AT") {
            // SAFETY: raise only delivers a signal to this thread.
            unsafe { libc::raise(libc::SIGTERM) };
        }
    }
    #[cfg(not(feature = "lab"))]
    let _ = point;
}

/// Whether a test asked for the two-rename commit where the exchange would work
/// (`FCD_NO_EXCHANGE=1`, `lab` builds only), so that the fault suite reaches its points.
fn exchange_disabled() -> bool {
    cfg!(feature = "lab") && std::env::var("FCD_NO_EXCHANGE").is_ok_and(|v| v == "1")
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
    fn a_folder_of_other_files_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        fs::create_dir_all(out.join("z")).unwrap();
        let e = Staged::new(&out).unwrap_err().to_string();
        assert!(e.contains("holds files fcd did not write"), "{e}");
        assert_eq!(names(&out), ["z"]);
        assert_eq!(names(tmp.path()), ["o"], "no staging folder");
        fs::write(tmp.path().join("f"), b"x").unwrap();
        let e = Staged::new(&tmp.path().join("f")).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
    }

    #[test]
    fn a_folder_is_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        staged(&out, &["a", "old/only"]).commit().unwrap();
        assert_eq!(names(&out), [MARKER, "a", "old"]);
        staged(&out, &["a", "b/c"]).commit().unwrap();
        assert_eq!(names(&out), [MARKER, "a", "b"]);
        assert_eq!(fs::read(out.join("b/c")).unwrap(), b"b/c");
        assert_eq!(names(tmp.path()), ["o"], "nothing left beside it");
        // An empty folder is taken too.
        let empty = tmp.path().join("e");
        fs::create_dir(&empty).unwrap();
        staged(&empty, &["a"]).commit().unwrap();
        assert_eq!(names(&empty), [MARKER, "a"]);
    }

    #[test]
    fn leftovers_are_recovered() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        staged(&out, &["a"]).commit().unwrap();
        // A run killed between renaming the old folder aside and moving the new one in.
        let aside = tmp.path().join(".o.replaced-1-0");
        fs::rename(&out, &aside).unwrap();
        fs::create_dir(tmp.path().join(".o.staging-1-1")).unwrap();
        fs::write(tmp.path().join(".o.tmp-1-2"), b"x").unwrap();
        let done = recover(&out).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(names(tmp.path()), ["o"]);
        assert_eq!(names(&out), [MARKER, "a"]);
        assert!(recover(&out).unwrap().is_empty());
    }
}
