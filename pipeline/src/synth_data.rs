//! `overfill synth-data`: synthetic instruction data in every input format, and a tiny
//! byte-level tokenizer (Llama-3 + ChatML special tokens, vocabulary < 512), for tests and the demo.
//! With `--tasks`: the demo's tasks whose answers depend on the prompt (lookup, addition,
//! reversal, copy), their held-out prompts with answers, and a BPE tokenizer trained on them.
use std::path::PathBuf;

use anyhow::{bail, Result};
use overfill_data::synth::{write_dataset, write_rows, write_tiny_tokenizer, SynthFormat, SynthOptions};
use overfill_data::synth_tasks::{task_rows, train_task_tokenizer, write_held_out, Task};

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
    /// --out holds the demo tasks (key-value lookup, addition, list reversal, span copy; answers
    /// depend on the prompt) instead of random text; --non-english phrases that share in German.
    #[arg(long)]
    tasks: bool,
    /// The tasks of --tasks and --heldout-out, comma-separated (rows cycle through them): lookup,
    /// add, reverse, copy, recall.
    #[arg(long, default_value = "lookup,add,reverse,copy,recall")]
    task_mix: String,
    /// Held-out task prompts with their expected answers (JSONL: task, messages, prompt, answer),
    /// never among the training rows.
    #[arg(long, value_name = "FILE")]
    heldout_out: Option<PathBuf>,
    /// Held-out prompts per task.
    #[arg(long, default_value_t = 50)]
    heldout_per_task: usize,
    /// Folder to write a byte-level BPE tokenizer trained on the task data (Llama-3 special
    /// tokens, tokenizer_config.json with the Llama-3 template) into.
    #[arg(long, value_name = "DIR")]
    bpe_tokenizer_out: Option<PathBuf>,
    /// Vocabulary size of --bpe-tokenizer-out (special tokens included).
    #[arg(long, default_value_t = 512)]
    vocab_size: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.out.is_none() && args.tokenizer_out.is_none() && args.heldout_out.is_none() && args.bpe_tokenizer_out.is_none() {
        bail!("nothing to do: give --out FILE, --tokenizer-out DIR, --heldout-out FILE and/or --bpe-tokenizer-out DIR");
    }
    if !(0.0..=1.0).contains(&args.non_english) {
        bail!("--non-english must be a share in [0, 1], got {}", args.non_english);
    }
    let task_mix = Task::parse_list(&args.task_mix)?;
    if let Some(dir) = &args.bpe_tokenizer_out {
        if args.vocab_size < 300 {
            bail!("--vocab-size {} is too small: the byte alphabet alone has 256 tokens", args.vocab_size);
        }
        let vocab = train_task_tokenizer(dir, args.seed, args.vocab_size)?;
        eprintln!("synth-data: BPE tokenizer ({vocab} tokens) trained on the task data in {}", dir.display());
    }
    if let Some(path) = &args.heldout_out {
        let n = write_held_out(path, args.seed, args.heldout_per_task, &task_mix)?;
        eprintln!("synth-data: {n} held-out task prompts with answers in {}", path.display());
    }
    if args.tasks {
        if let Some(out) = &args.out {
            if args.bad_every > 0 {
                bail!("--bad-every is for random rows; the task data has no malformed rows");
            }
            let format = SynthFormat::parse(&args.format)?;
            let rows = task_rows(args.seed, args.rows, args.non_english, &task_mix);
            write_rows(out, format, &rows)?;
            let german = rows.iter().filter(|r| r.language != "en").count();
            eprintln!("synth-data: {} task rows ({german} in German) in {}", rows.len(), out.display());
        }
        return Ok(());
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
