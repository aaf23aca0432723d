//! `overfill synth-data`: synthetic instruction data in every input format, and a tiny
//! byte-level tokenizer (Llama-3 + ChatML special tokens, vocabulary < 512), for tests and the demo.
use std::path::PathBuf;

use anyhow::{bail, Result};
use overfill_data::synth::{write_dataset, write_tiny_tokenizer, SynthFormat, SynthOptions};

#[derive(clap::Args)]
pub struct Args {
    /// openhermes | openhermes-jsonl | infinity | messages | messages-jsonl | messages-parquet
    #[arg(long, default_value = "openhermes")]
    format: String,
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Make every N-th row malformed (0: none).
    #[arg(long, default_value_t = 0)]
    bad_every: usize,
    /// Share of rows tagged as non-English (`de`).
    #[arg(long, default_value_t = 0.0)]
    non_english: f64,
    /// Words per turn are drawn from 1..=N.
    #[arg(long, default_value_t = 40)]
    max_words: usize,
    /// Dataset file to write.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder to write the tiny tokenizer (tokenizer.json, tokenizer_config.json) into.
    #[arg(long)]
    tokenizer_out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    if args.out.is_none() && args.tokenizer_out.is_none() {
        bail!("nothing to do: give --out FILE and/or --tokenizer-out DIR");
    }
    if let Some(dir) = &args.tokenizer_out {
        let vocab = write_tiny_tokenizer(dir)?;
        eprintln!("synth-data: tiny tokenizer ({vocab} tokens) in {}", dir.display());
    }
    if let Some(out) = &args.out {
        let format = SynthFormat::parse(&args.format)?;
        let options = SynthOptions {
            rows: args.rows,
            seed: args.seed,
            bad_every: args.bad_every,
            non_english_fraction: args.non_english,
            max_words: args.max_words,
        };
        let bad = write_dataset(out, format, &options)?;
        eprintln!("synth-data: {} rows ({bad} malformed) in {}", args.rows, out.display());
    }
    Ok(())
}
