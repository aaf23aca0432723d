//! `file_digests.json`: the files a folder holds, with their sizes and SHA-256 digests, written
//! last into a folder that is complete (the trainer's checkpoints and `final/`). A folder that has
//! one is checked by every reader: a listed file that is missing or has another size is named
//! ([`check_sizes`], called by [`crate::checkpoint::load_config`]); a resume checks the digests
//! too ([`check_digests`]), since a damaged weight file may keep its size. Folders without the
//! file (Hugging Face downloads, `init-model`, `calibrate-prune`) are read as before.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const FILE_DIGESTS: &str = "file_digests.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name in the folder.
    pub name: String,
    pub bytes: u64,
    /// Lower-case hex, as `sha256sum` prints it.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigests {
    pub files: Vec<FileEntry>,
}

/// SHA-256 of a file's bytes in lower-case hex (memory-mapped, as the weights are read).
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(
        &crate::checkpoint::map_file(path)?[..],
    )))
}

/// Lists every file of `dir` (not sub-folders) with its size and digest, and writes the list as
/// `file_digests.json`: the last file written into a folder that is complete.
pub fn write_file_digests(dir: &Path) -> Result<FileDigests> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if entry
            .file_type()
            .with_context(|| format!("cannot stat {}", entry.path().display()))?
            .is_file()
            && name != FILE_DIGESTS
        {
            names.push(name);
        }
    }
    names.sort();
    let files = names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let bytes = std::fs::metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?
                .len();
            Ok(FileEntry {
                sha256: sha256_file(&path)?,
                name,
                bytes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let list = FileDigests { files };
    let path = dir.join(FILE_DIGESTS);
    std::fs::write(&path, serde_json::to_string_pretty(&list)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(list)
}

/// The folder's `file_digests.json`, or `None` for a folder without one.
pub fn read_file_digests(dir: &Path) -> Result<Option<FileDigests>> {
    let path = dir.join(FILE_DIGESTS);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let list = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged (not a file list)", path.display()))?;
    Ok(Some(list))
}

/// Every listed file is present with its listed size: what every reader checks (a stat per file).
pub fn check_sizes(dir: &Path) -> Result<()> {
    let Some(list) = read_file_digests(dir)? else {
        return Ok(());
    };
    for entry in &list.files {
        check_size(dir, entry)?;
    }
    Ok(())
}

/// Sizes and digests of every listed file (reads every byte): what a resume checks. A folder
/// without a list passes (it predates the lists).
pub fn check_digests(dir: &Path) -> Result<()> {
    let Some(list) = read_file_digests(dir)? else {
        return Ok(());
    };
    for entry in &list.files {
        let path = check_size(dir, entry)?;
        let digest = sha256_file(&path)?;
        if digest != entry.sha256 {
            bail!(
                "{} is damaged: its SHA-256 is {digest}, {FILE_DIGESTS} lists {}",
                path.display(),
                entry.sha256
            );
        }
    }
    Ok(())
}

fn check_size(dir: &Path, entry: &FileEntry) -> Result<PathBuf> {
    let path = dir.join(&entry.name);
    let bytes = match std::fs::metadata(&path) {
        Ok(metadata) => metadata.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{} is incomplete: {} is missing (listed in its {FILE_DIGESTS})",
                dir.display(),
                entry.name
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    };
    if bytes != entry.bytes {
        bail!(
            "{} is damaged: {bytes} bytes, {FILE_DIGESTS} lists {} (truncated, or changed since: to read the folder as it is, remove {FILE_DIGESTS})",
            path.display(),
            entry.bytes
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_files_and_names_a_missing_truncated_or_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), b"hello").unwrap();
        std::fs::write(dir.path().join("b.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let list = write_file_digests(dir.path()).unwrap();
        let names: Vec<&str> = list.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.bin", "b.json", "empty"]);
        // `printf hello | sha256sum`, `sha256sum < /dev/null`
        assert_eq!(
            list.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(list.files[0].bytes, 5);
        assert_eq!(
            list.files[2].sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        check_digests(dir.path()).unwrap();

        std::fs::write(dir.path().join("a.bin"), b"jello").unwrap();
        check_sizes(dir.path()).unwrap();
        let error = format!("{:#}", check_digests(dir.path()).unwrap_err());
        assert!(error.contains("a.bin is damaged: its SHA-256"), "{error}");
        std::fs::write(dir.path().join("a.bin"), b"hel").unwrap();
        let error = format!("{:#}", check_sizes(dir.path()).unwrap_err());
        assert!(
            error.contains("a.bin is damaged: 3 bytes, file_digests.json lists 5"),
            "{error}"
        );
        std::fs::remove_file(dir.path().join("b.json")).unwrap();
        std::fs::write(dir.path().join("a.bin"), b"hello").unwrap();
        let error = format!("{:#}", check_sizes(dir.path()).unwrap_err());
        assert!(
            error.contains("is incomplete: b.json is missing"),
            "{error}"
        );
    }

    #[test]
    fn a_folder_without_a_list_passes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        check_sizes(dir.path()).unwrap();
        check_digests(dir.path()).unwrap();
        assert_eq!(read_file_digests(dir.path()).unwrap(), None);
    }
}
