//! `overfill preprocess`: chat-template and tokenize instruction data into context/target token
//! shards (see `overfill_data::preprocess`). A recipe gives the defaults; flags override them.
use std::path::PathBuf;

use anyhow::{Context, Result};
use overfill_data::preprocess::run_preprocess;
use overfill_data::recipe::{PreprocessConfig, SourceSpec};

use crate::recipe::{write_resolved, Recipe, RecipeArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
    #[command(flatten)]
    flags: Flags,
    /// Output folder for the shards and manifest.json ([data] shards).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The flags of `preprocess` that override recipe values (also accepted by `overfill config`).
/// Each help line names the recipe key it sets.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Flags {
    /// Input files or globs (replace the recipe's [[sources]]).
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// auto | openhermes | infinity | jsonl | parquet (for --input).
    #[arg(long, default_value = "auto")]
    format: String,
    /// Tokenizer folder or tokenizer.json ([data] tokenizer; default: [model] path).
    #[arg(long)]
    tokenizer: Option<String>,
    /// auto | llama3 | chatml | model | FILE ([data] template; auto: the tokenizer's own, else llama3).
    #[arg(long)]
    template: Option<String>,
    /// Validation rows, a count ([preprocess] val_size).
    #[arg(long)]
    val_size: Option<u64>,
    /// Validation rows, a fraction of the kept rows ([preprocess] val_fraction).
    #[arg(long, conflicts_with = "val_size")]
    val_fraction: Option<f64>,
    /// Truncate context + target to this many tokens; rows left with no target token are dropped
    /// ([preprocess] max_seq_length).
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// Drop rows whose context + target is longer than this many tokens, before truncation
    /// ([preprocess] pre_filter_max_seq_length).
    #[arg(long)]
    pre_filter_max_seq_length: Option<usize>,
    /// Allowed languages, comma separated; rows without a language tag pass; "" allows all
    /// ([preprocess] languages).
    #[arg(long, value_delimiter = ',')]
    languages: Option<Vec<String>>,
    /// Seed of the shuffle and the train/validation split ([preprocess] seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Drop exact duplicate conversations ([preprocess] dedup = true).
    #[arg(long)]
    dedup: bool,
    /// Exit non-zero when more than this fraction of rows is malformed ([preprocess] max_bad_fraction).
    #[arg(long)]
    max_bad_fraction: Option<f64>,
    /// Input rows per shard ([preprocess] rows_per_shard).
    #[arg(long)]
    rows_per_shard: Option<u64>,
}

impl Flags {
    /// Store the given flags in the recipe, marked as set on the command line.
    pub fn apply(&self, recipe: &mut Recipe) {
        let sources = (!self.input.is_empty()).then(|| {
            let format = Some(self.format.clone());
            self.input.iter().map(|p| SourceSpec { path: p.clone(), format: format.clone(), name: None, fraction: None }).collect()
        });
        recipe.flag(&["sources"], sources, |r, v| r.sources = v);
        recipe.flag(&["data.tokenizer"], self.tokenizer.clone(), |r, v| r.data.tokenizer = Some(v));
        recipe.flag(&["data.template"], self.template.clone(), |r, v| r.data.template = v);
        let val_keys = ["preprocess.val_size", "preprocess.val_fraction"];
        recipe.flag(&val_keys, self.val_size, |r, v| (r.preprocess.val_size, r.preprocess.val_fraction) = (Some(v), None));
        recipe.flag(&val_keys, self.val_fraction, |r, v| (r.preprocess.val_size, r.preprocess.val_fraction) = (None, Some(v)));
        recipe.flag(&["preprocess.max_seq_length"], self.max_seq_length, |r, v| r.preprocess.max_seq_length = v);
        recipe.flag(&["preprocess.pre_filter_max_seq_length"], self.pre_filter_max_seq_length, |r, v| {
            r.preprocess.pre_filter_max_seq_length = Some(v)
        });
        // `--languages ""` clears the list (every language passes).
        let languages = self.languages.as_ref().map(|l| l.iter().filter(|x| !x.is_empty()).cloned().collect());
        recipe.flag(&["preprocess.languages"], languages, |r, v| r.preprocess.languages = v);
        recipe.flag(&["preprocess.seed"], self.seed, |r, v| r.preprocess.seed = v);
        recipe.flag(&["preprocess.dedup"], self.dedup.then_some(true), |r, v| r.preprocess.dedup = v);
        recipe.flag(&["preprocess.max_bad_fraction"], self.max_bad_fraction, |r, v| r.preprocess.max_bad_fraction = v);
        recipe.flag(&["preprocess.rows_per_shard"], self.rows_per_shard, |r, v| r.preprocess.rows_per_shard = v);
    }
}

pub fn run(args: Args) -> Result<()> {
    let mut recipe = args.recipe.load()?;
    args.flags.apply(&mut recipe);
    recipe.flag(&["data.shards"], args.out.map(|o| o.to_string_lossy().into_owned()), |r, v| r.data.shards = Some(v));
    recipe.check()?;
    let config = PreprocessConfig::from_recipe(&recipe.model, &recipe.data, &recipe.sources, &recipe.preprocess).context("recipe")?;
    let summary = run_preprocess(&config)?;
    // Next to the shards, so the run can be reproduced from its output folder alone.
    write_resolved(&recipe, &config.out)?;
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
