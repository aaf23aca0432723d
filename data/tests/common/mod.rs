#![allow(dead_code)]
use std::path::PathBuf;

use overfill_data::recipe::{PreprocessConfig, SourceSpec, ValSize};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn python() -> PathBuf {
    std::env::var_os("OVERFILL_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// The real Llama 3.2 tokenizer fixture, or `None` (and a printed reason) when absent.
pub fn llama_fixture() -> Option<PathBuf> {
    let dir = repo_root().join("../shared/fixtures/llama-3.2-tokenizer");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIP: fixture {} is absent", dir.display());
        None
    }
}

pub fn config(inputs: &[&std::path::Path], tokenizer: &std::path::Path, out: &std::path::Path) -> PreprocessConfig {
    PreprocessConfig {
        sources: inputs
            .iter()
            .map(|p| SourceSpec { path: p.display().to_string(), format: None, name: None, fraction: None })
            .collect(),
        tokenizer: tokenizer.display().to_string(),
        template: "llama3".into(),
        out: out.to_path_buf(),
        val_size: ValSize::Count(0),
        pre_filter_max_seq_length: None,
        max_seq_length: 4096,
        max_context_length: None,
        languages: vec![],
        seed: 7,
        dedup: false,
        max_bad_fraction: 0.01,
        rows_per_shard: 100,
    }
}
