//! Which files of an output folder a stage created, so it never deletes or overwrites anyone
//! else's. Users point `--out` at odd places (a dataset download folder, a folder holding the
//! inputs); the stage claims a folder only when it is new or empty, records every name before it
//! creates the file, and touches only recorded names afterwards.
//!
//! The record is `<dir>/.overfill-files.json`: `{"written_by": "preprocess", "files": [...]}`.
//! A recorded name also covers its `NAME.tmp` (files are written there, then renamed).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::shard::{tmp_path, write_atomic};

pub const OWNED_FILE: &str = ".overfill-files.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    written_by: String,
    files: BTreeSet<String>,
}

/// The files a stage created in its output folder.
#[derive(Debug)]
pub struct OwnedFiles {
    dir: PathBuf,
    record: Record,
    /// Whether the record is on disk yet ([`OwnedFiles::claim`]).
    claimed: bool,
}

impl OwnedFiles {
    /// Check that stage `written_by` may write `dir`: the folder is missing or empty, or holds this
    /// stage's record. `legacy` names the files of an output made before records existed (e.g.
    /// the shards a parseable manifest lists); `None` means the folder is not ours. Writes nothing.
    pub fn open(dir: &Path, written_by: &str, legacy: impl FnOnce() -> Option<Vec<String>>) -> Result<OwnedFiles> {
        let record_path = dir.join(OWNED_FILE);
        if record_path.is_file() {
            let text = std::fs::read_to_string(&record_path).with_context(|| format!("reading {}", record_path.display()))?;
            let record: Record = serde_json::from_str(&text).with_context(|| format!("parsing {}", record_path.display()))?;
            if record.written_by != written_by {
                bail!(
                    "--out {} holds the output of `{}`, not `{written_by}`; refusing to write into it (choose another folder)",
                    dir.display(),
                    record.written_by
                );
            }
            return Ok(OwnedFiles { dir: dir.to_path_buf(), record, claimed: true });
        }
        let empty = Record { written_by: written_by.to_string(), files: BTreeSet::new() };
        if !dir.exists() {
            return Ok(OwnedFiles { dir: dir.to_path_buf(), record: empty, claimed: false });
        }
        if !dir.is_dir() {
            bail!("--out {} exists and is not a folder", dir.display());
        }
        let is_empty = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.next().is_none();
        if is_empty {
            return Ok(OwnedFiles { dir: dir.to_path_buf(), record: empty, claimed: false });
        }
        match legacy() {
            Some(names) => Ok(OwnedFiles {
                dir: dir.to_path_buf(),
                record: Record { written_by: written_by.to_string(), files: names.into_iter().collect() },
                claimed: false,
            }),
            None => bail!(
                "--out {} is not empty and was not written by `{written_by}`; refusing to write into it, as that could replace or delete its files (choose a new or empty folder)",
                dir.display()
            ),
        }
    }

    /// Create the folder if needed and write the record: from here on the folder is ours.
    pub fn claim(&mut self) -> Result<()> {
        if !self.claimed {
            std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
            self.save()?;
            self.claimed = true;
        }
        Ok(())
    }

    pub fn owns(&self, name: &str) -> bool {
        self.record.files.contains(name)
    }

    /// Whether creating `name` would replace a file this stage did not create.
    pub fn would_clobber(&self, name: &str) -> bool {
        let path = self.dir.join(name);
        !self.owns(name) && (path.symlink_metadata().is_ok() || tmp_path(&path).symlink_metadata().is_ok())
    }

    /// The path for a file (or folder) this stage is about to create, recorded first so a run
    /// killed halfway still knows it is ours. Fails if a file it did not create is in the way.
    pub fn create(&mut self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        if self.would_clobber(name) {
            bail!("refusing to overwrite {}: it was not created by `{}`", path.display(), self.record.written_by);
        }
        if !self.owns(name) {
            self.record.files.insert(name.to_string());
            self.save()?;
        }
        Ok(path)
    }

    /// Remove an owned file or folder (and its `.tmp`); names not owned are left alone.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if !self.owns(name) {
            return Ok(());
        }
        let path = self.dir.join(name);
        for p in [tmp_path(&path), path.clone()] {
            let result = match p.symlink_metadata() {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&p),
                Ok(_) => std::fs::remove_file(&p),
                Err(_) => Ok(()),
            };
            result.with_context(|| format!("removing {}", p.display()))?;
        }
        self.record.files.remove(name);
        self.save()
    }

    /// Owned names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.record.files.iter().cloned().collect()
    }

    fn save(&self) -> Result<()> {
        write_atomic(&self.dir.join(OWNED_FILE), serde_json::to_string_pretty(&self.record)?.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_folders_are_refused_and_foreign_files_never_touched() {
        let tmp = tempfile::tempdir().unwrap();
        let foreign = tmp.path().join("download");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("train-00000.parquet"), b"theirs").unwrap();
        let err = OwnedFiles::open(&foreign, "preprocess", || None).unwrap_err().to_string();
        assert!(err.contains("not empty") && err.contains("refusing"), "{err}");

        let out = tmp.path().join("out");
        let mut owned = OwnedFiles::open(&out, "preprocess", || None).unwrap();
        assert!(!out.exists(), "open writes nothing");
        owned.claim().unwrap();
        let ours = owned.create("train-00000.parquet").unwrap();
        std::fs::write(&ours, b"ours").unwrap();
        std::fs::write(out.join("notes.txt"), b"theirs").unwrap();
        assert!(owned.create("notes.txt").is_err());
        owned.remove("notes.txt").unwrap();
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"theirs");

        // Reopened: the record says what is ours; another stage may not write here.
        let mut reopened = OwnedFiles::open(&out, "preprocess", || None).unwrap();
        assert_eq!(reopened.names(), vec!["train-00000.parquet".to_string()]);
        reopened.remove("train-00000.parquet").unwrap();
        assert!(!ours.exists());
        assert!(OwnedFiles::open(&out, "calibrate-prune", || None).is_err());
    }
}
