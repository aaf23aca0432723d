//! An exclusive lock on a stage's output folder, so two runs never write the same folder at once.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let _lock = overfill_data::out_lock::OutputLock::acquire("work/tiny/shards".as_ref(), "preprocess")?;
//! // ... write the folder; the lock is released when `_lock` is dropped or the process ends.
//! # Ok(()) }
//! ```
//!
//! The lock is an OS file lock (`flock` on Unix, through `std::fs::File::try_lock`) on a file
//! beside the folder, `<parent>/.<name>.lock`. Beside rather than inside: calibrate-prune replaces
//! its folder by renaming a staged copy into place (a lock inside would move with the old copy),
//! and a file inside would make a new, empty folder look used. The OS drops the lock when the
//! holding process ends, however it ends, so a killed run never leaves a stale lock behind. The
//! holder writes who it is into the file (stage, pid, host, command, start time); a second run
//! fails at once with a message naming it.
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Who holds a lock, as its holder wrote it into the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// The stage, e.g. `preprocess` or `calibrate-prune`.
    pub what: String,
    pub pid: u32,
    pub host: String,
    /// The holder's command line.
    pub command: String,
    pub started_unix: u64,
}

impl LockHolder {
    fn this_process(what: &str) -> LockHolder {
        LockHolder {
            what: what.to_string(),
            pid: std::process::id(),
            host: host_name(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            started_unix: unix_now(),
        }
    }

    /// `preprocess (pid 123 on host h, started 5 s ago: overfill preprocess --out x)`.
    pub fn describe(&self) -> String {
        let ago = unix_now().saturating_sub(self.started_unix);
        format!("{} (pid {} on host {}, started {ago} s ago: {})", self.what, self.pid, self.host, self.command)
    }
}

/// Held while a run writes its output folder; dropping it releases the lock.
#[derive(Debug)]
pub struct OutputLock {
    /// Kept open: closing the file releases the OS lock.
    file: File,
    path: PathBuf,
    holder: LockHolder,
}

impl OutputLock {
    /// Lock output folder `dir` (which need not exist yet; its parent is created) for the stage
    /// `what`. Fails at once, naming the holder, when another run holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<OutputLock> {
        let path = lock_path(dir)?;
        // A holder that is releasing removes the lock file; a lock taken on the removed file is
        // worth nothing, so try again on the new one (a handful of tries is plenty).
        for _ in 0..20 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening the lock file {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    drop(file);
                    bail!(
                        "{} is in use by another run: {}; wait for it to finish or stop it (its lock {} is released when that process exits)",
                        dir.display(),
                        read_holder(&path).map(|h| h.describe()).unwrap_or_else(|| "a process that has not yet written its name".into()),
                        path.display()
                    );
                }
                Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
            }
            if !is_same_file(&file, &path) {
                continue;
            }
            let holder = LockHolder::this_process(what);
            let mut lock = OutputLock { file, path, holder };
            lock.write_holder().with_context(|| format!("writing {}", lock.path.display()))?;
            return Ok(lock);
        }
        Err(anyhow!("could not lock {}: its lock file {} keeps being replaced", dir.display(), path.display()))
    }

    /// The lock file beside the folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn holder(&self) -> &LockHolder {
        &self.holder
    }

    fn write_holder(&mut self) -> Result<()> {
        let json = serde_json::to_string(&self.holder)?;
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(json.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, so nobody locks a file that is about to
        // vanish (acquirers check that the file they locked is still the one at the path).
        // The lock itself goes when `file` closes right after.
        if cfg!(unix) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `<parent>/.<name>.lock` for folder `dir`, with symlinks and `..` resolved so that every
/// spelling of one folder gives one lock. Creates the parent.
pub fn lock_path(dir: &Path) -> Result<PathBuf> {
    let resolved = match dir.canonicalize() {
        Ok(p) => p,
        Err(_) => {
            let absolute = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
            let name = absolute.file_name().ok_or_else(|| anyhow!("output folder {} has no name", dir.display()))?;
            let parent = absolute.parent().ok_or_else(|| anyhow!("output folder {} has no parent", dir.display()))?;
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            parent.canonicalize().with_context(|| format!("resolving {}", parent.display()))?.join(name)
        }
    };
    let name = resolved.file_name().ok_or_else(|| anyhow!("cannot lock {}: it has no folder name", dir.display()))?;
    let parent = resolved.parent().ok_or_else(|| anyhow!("cannot lock {}: it has no parent folder", dir.display()))?;
    let mut lock_name = std::ffi::OsString::from(".");
    lock_name.push(name);
    lock_name.push(".lock");
    Ok(parent.join(lock_name))
}

/// The holder recorded in a lock file. It writes itself just after locking, so give it a moment.
fn read_holder(path: &Path) -> Option<LockHolder> {
    for _ in 0..20 {
        let mut text = String::new();
        let read = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
        if read.is_ok() {
            if let Ok(holder) = serde_json::from_str(&text) {
                return Some(holder);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[cfg(unix)]
fn is_same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_same_file(_file: &File, _path: &Path) -> bool {
    true // the lock file is never removed there
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_fails_naming_the_holder_and_drop_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/out");
        let first = OutputLock::acquire(&dir, "preprocess").unwrap();
        assert_eq!(first.path(), tmp.path().canonicalize().unwrap().join("a/.out.lock"));
        // Another spelling of the same folder gets the same lock.
        let other = tmp.path().join("a/b/../out");
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        let err = OutputLock::acquire(&other, "calibrate-prune").unwrap_err().to_string();
        assert!(err.contains("in use by another run") && err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("preprocess (pid"), "{err}");
        drop(first);
        assert!(!tmp.path().join("a/.out.lock").exists());
        let again = OutputLock::acquire(&dir, "preprocess").unwrap();
        assert_eq!(again.holder().what, "preprocess");
    }
}
