//! One writer per output folder: an exclusive advisory lock (`flock`) on a lock file, held
//! for a run and released when the process ends, however it ends. The lock file holds the
//! holder's PID and host, so that a second process can say who has the folder.
//!
//! Advisory: it keeps out other fcd processes, not other programs. On NFS, Linux emulates
//! `flock` with the server's byte-range locks (NFSv4, or NFSv3 with lockd), so processes on
//! different hosts exclude each other when the mount supports locking; a mount with
//! `nolock` or `local_lock=all` makes the lock local to each host.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock of one folder, held until dropped.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    path: PathBuf,
}

impl FolderLock {
    /// Locks the folder `what` through the lock file `path` (created if missing), or fails
    /// at once, in one line naming the folder and the holder.
    pub fn acquire(path: &Path, what: &Path) -> Result<FolderLock> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "{}: another fcd process is writing it ({}); wait for it to end, or use \
                     another folder",
                    what.display(),
                    if holder.is_empty() {
                        "its PID is not recorded yet".to_string()
                    } else {
                        holder.to_string()
                    }
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        let me = format!("PID {} on host {}", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
            .and_then(|()| file.write_all(me.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(FolderLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// This machine's name, as `hostname` prints it.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "an unknown host".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join(".out.lock");
        let first = FolderLock::acquire(&lock, &tmp.path().join("out")).unwrap();
        let e = FolderLock::acquire(&lock, &tmp.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another fcd process is writing it"), "{e}");
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        assert!(e.contains(&hostname()), "{e}");
        drop(first);
        FolderLock::acquire(&lock, &tmp.path().join("out")).unwrap();
    }
}
