//! `overfill inspect DIR`: statistics from a shard folder's manifest and shards, and a few
//! decoded examples with the context/target boundary marked.
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use overfill_data::reader::{ShardDataset, Split};
use overfill_data::tokenize::load_tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// A folder written by `overfill preprocess`.
    dir: PathBuf,
    /// Examples to decode.
    #[arg(long, default_value_t = 3)]
    examples: usize,
    /// Decode from the validation split.
    #[arg(long)]
    val: bool,
    /// Tokenizer for decoding (default: the one recorded in the manifest).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

const BOUNDARY: &str = "\x1b[7m⟦TARGET⟧\x1b[0m";

fn hist_line(edges: &[usize], counts: &[u64]) -> String {
    let mut lower = 0;
    let mut parts = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        let label = match edges.get(i) {
            Some(&upper) => format!("[{lower},{upper})"),
            None => format!("[{lower},∞)"),
        };
        if n > 0 {
            parts.push(format!("{label}:{n}"));
        }
        lower = edges.get(i).copied().unwrap_or(lower);
    }
    parts.join(" ")
}

pub fn run(args: Args) -> Result<()> {
    let split = if args.val { Split::Val } else { Split::Train };
    let data = ShardDataset::open_split(&args.dir, split)?;
    let m = &data.manifest;
    let c = &m.counts;
    println!("shards: {}", args.dir.display());
    println!("key: {}", m.key);
    for input in &m.inputs {
        println!("input: {} ({}, {}, {} bytes, {} rows, sha256 {})", input.path, input.source, input.format, input.size, input.rows, &input.sha256[..16]);
    }
    println!("tokenizer: {} (vocab {}, end of turn {} = {})", m.tokenizer.path, m.tokenizer.vocab_size, m.tokenizer.end_of_turn, m.tokenizer.end_of_turn_id);
    println!("template: {}", m.template.spec);
    println!(
        "rows: {} in, {} kept ({} train in {} shards, {} val in {} shards), {} malformed ({:.3}%), {} truncated",
        c.raw_rows, c.kept_rows, m.train.rows, m.train.shards.len(), m.val.rows, m.val.shards.len(), c.bad_rows, 100.0 * m.bad_fraction, c.truncated_rows
    );
    for (reason, n) in &c.dropped {
        println!("  dropped {reason}: {n}");
    }
    println!("tokens: {} context + {} target", c.context_tokens, c.target_tokens);
    println!("context lengths: {}", hist_line(&m.histogram_edges, &c.context_len_hist));
    println!("target lengths:  {}", hist_line(&m.histogram_edges, &c.target_len_hist));
    println!("total lengths:   {}", hist_line(&m.histogram_edges, &c.total_len_hist));
    // Recount from the shards themselves (catches a manifest that does not match its files).
    let loaded_tokens: usize = (0..data.len()).map(|i| data.total_len(i)).sum();
    let expected = match split {
        Split::Train => m.train.context_tokens + m.train.target_tokens,
        Split::Val => m.val.context_tokens + m.val.target_tokens,
    };
    println!("loaded {} rows, {} tokens from the shards ({})", data.len(), loaded_tokens, if loaded_tokens as u64 == expected { "matches the manifest" } else { "DOES NOT match the manifest" });

    if args.examples == 0 || data.is_empty() {
        return Ok(());
    }
    let tokenizer_path = args.tokenizer.unwrap_or_else(|| PathBuf::from(&m.tokenizer.path));
    let tokenizer_path = if tokenizer_path.is_dir() { tokenizer_path.join("tokenizer.json") } else { tokenizer_path };
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    for i in 0..args.examples.min(data.len()) {
        let e = data.get(i).ok_or_else(|| anyhow!("row {i} missing"))?;
        let context = tokenizer.decode(&e.context_ids, false).map_err(|e| anyhow!("{e}"))?;
        let target = tokenizer.decode(&e.target_ids, false).map_err(|e| anyhow!("{e}"))?;
        println!("\n--- example {i}: row {} from {} ({} context + {} target tokens)", e.row_id, e.source, e.context_ids.len(), e.target_ids.len());
        println!("{context}{BOUNDARY}{target}");
    }
    Ok(())
}
