//! Test helper (not installed): run preprocess in a child process so tests can kill it (via
//! `OVERFILL_TEST_ABORT_AFTER_SHARDS`) or read its peak memory.
//! Usage: preprocess_child INPUT TOKENIZER_DIR OUT ROWS_PER_SHARD [LANGUAGE]
use overfill_data::recipe::{PreprocessConfig, SourceSpec, ValSize};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 5, "usage: preprocess_child INPUT TOKENIZER_DIR OUT ROWS_PER_SHARD [LANGUAGE]");
    let config = PreprocessConfig {
        sources: vec![SourceSpec { path: args[1].clone(), format: None, name: Some("synthetic".into()), fraction: None }],
        tokenizer: args[2].clone(),
        template: "llama3".into(),
        out: args[3].clone().into(),
        val_size: ValSize::Count(20),
        pre_filter_max_seq_length: None,
        max_seq_length: 4096,
        max_context_length: None,
        languages: args.get(5).map(|l| vec![l.clone()]).unwrap_or_default(),
        seed: 11,
        dedup: true,
        max_bad_fraction: 0.05,
        rows_per_shard: args[4].parse()?,
    };
    overfill_data::preprocess::run_preprocess(&config)?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        let kb: String = line.chars().filter(|c| c.is_ascii_digit()).collect();
        println!("peak_rss_kb {kb}");
    }
    Ok(())
}
