//! `overfill preprocess`: chat-template and tokenize instruction data into context/target token
//! shards (see `overfill_data::preprocess`). A recipe gives the defaults; flags override them.
use std::path::PathBuf;

use anyhow::{Context, Result};
use overfill_data::preprocess::run_preprocess;
use overfill_data::recipe::{PreprocessConfig, Recipe, SourceSpec, ValSize};

#[derive(clap::Args)]
pub struct Args {
    /// Recipe TOML (`[data]`, `[[sources]]`, `[preprocess]`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input files or globs (replace the recipe's sources).
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// auto | openhermes | infinity | jsonl | parquet (for --input).
    #[arg(long, default_value = "auto")]
    format: String,
    /// Tokenizer folder or tokenizer.json (default: the recipe's model).
    #[arg(long)]
    tokenizer: Option<String>,
    /// llama3 | chatml | model | FILE.
    #[arg(long)]
    template: Option<String>,
    /// Output folder for the shards and manifest.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validation rows (count).
    #[arg(long)]
    val_size: Option<u64>,
    /// Validation rows (fraction of kept rows).
    #[arg(long, conflicts_with = "val_size")]
    val_fraction: Option<f64>,
    /// Truncate context + target to this many tokens; rows left with no target token are dropped
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// Drop rows whose context + target is longer than this many tokens (before truncation)
    #[arg(long)]
    pre_filter_max_seq_length: Option<usize>,
    /// Allowed languages, comma separated (rows without a language tag pass).
    #[arg(long, value_delimiter = ',')]
    languages: Option<Vec<String>>,
    /// Seed of the shuffle and the train/validation split
    #[arg(long)]
    seed: Option<u64>,
    /// Drop exact duplicate conversations.
    #[arg(long)]
    dedup: bool,
    /// Exit non-zero when more than this fraction of rows is malformed.
    #[arg(long)]
    max_bad_fraction: Option<f64>,
    /// Input rows per shard.
    #[arg(long)]
    rows_per_shard: Option<u64>,
}

pub fn run(args: Args) -> Result<()> {
    let recipe = match &args.config {
        Some(path) => Recipe::load(path)?,
        None => Recipe::default(),
    };
    let mut config = PreprocessConfig::from_recipe(&recipe).context("recipe")?;
    if !args.input.is_empty() {
        config.sources = args
            .input
            .iter()
            .map(|p| SourceSpec { path: p.clone(), format: Some(args.format.clone()), name: None, fraction: None })
            .collect();
    }
    if let Some(t) = args.tokenizer {
        config.tokenizer = t;
    }
    if let Some(t) = args.template {
        config.template = t;
    }
    if let Some(o) = args.out {
        config.out = o;
    }
    if let Some(n) = args.val_size {
        config.val_size = ValSize::Count(n);
    }
    if let Some(f) = args.val_fraction {
        config.val_size = ValSize::Fraction(f);
    }
    if let Some(n) = args.max_seq_length {
        config.max_seq_length = n;
    }
    if let Some(n) = args.pre_filter_max_seq_length {
        config.pre_filter_max_seq_length = Some(n);
    }
    if let Some(l) = args.languages {
        config.languages = l;
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    config.dedup |= args.dedup;
    if let Some(f) = args.max_bad_fraction {
        config.max_bad_fraction = f;
    }
    if let Some(n) = args.rows_per_shard {
        config.rows_per_shard = n;
    }
    let summary = run_preprocess(&config)?;
    let m = &summary.manifest;
    println!(
        "{}",
        serde_json::json!({
            "out": config.out,
            "up_to_date": summary.up_to_date,
            "resumed_shards": summary.resumed_chunks,
            "raw_rows": m.counts.raw_rows,
            "train_rows": m.train.rows,
            "val_rows": m.val.rows,
            "dropped": m.counts.dropped,
            "context_tokens": m.counts.context_tokens,
            "target_tokens": m.counts.target_tokens,
        })
    );
    Ok(())
}
