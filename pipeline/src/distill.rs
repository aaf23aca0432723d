//! `overfill distill`: the full model's own greedy answers to the prompts of `[[sources]]` (or
//! `--input`), written as conversations that `preprocess` reads — training data for a drafter
//! of `generate --speculative` (see `overfill_data::distill`).
//!
//! A drafter's speed-up depends on how often it proposes the full model's own next token. Trained
//! on a dataset's reference answers it learns the dataset's style; trained on the full model's
//! answers it learns what it is asked to predict (sequence-level distillation).
//!
//! Resumable: one output part per generation batch, written atomically; a rerun with the same
//! settings continues after the last whole part, one with other settings is refused.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use overfill_data::distill::{
    answer_row, input_files, read_prompts, Answer, ChatCodec, DistillOut, PartEntry, Prompt, STOP_AFTER_PARTS_ENV,
};
use overfill_data::recipe::SourceSpec;
use overfill_data::tokenize::check_ids_in_vocab;
use overfill_model::checkpoint::{device_and_dtype, load_config, resolve_model_dir, weight_files};
use overfill_model::file_digests::sha256_file;
use overfill_model::generate::{eos_and_end_of_turn, generate, DecodeOptions, GenerateOptions};
use overfill_model::transformer::Transformer;
use serde_json::{json, Value};

use crate::recipe::{write_resolved, Recipe, RecipeArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Prompt files or globs (replace the recipe's [[sources]]); any format preprocess reads.
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// auto | openhermes | infinity | jsonl | parquet (for --input).
    #[arg(long, default_value = "auto")]
    format: String,
    /// The full model that answers ([model] path).
    #[arg(long)]
    model: Option<String>,
    /// Output folder ([distill] out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use only the first N rows of the inputs ([distill] limit).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Tokens per answer at most ([distill] max_new_tokens).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Prompts generated together, one output part each ([distill] batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Leave out answers cut at max_new_tokens ([distill] drop_unfinished = true).
    #[arg(long)]
    drop_unfinished: bool,
    /// f32, bf16 or f16 ([distill] dtype).
    #[arg(long)]
    dtype: Option<String>,
    /// cpu, cuda or cuda:N ([distill] device).
    #[arg(long)]
    device: Option<String>,
}

impl Args {
    fn apply(&self, recipe: &mut Recipe) {
        let sources = (!self.input.is_empty()).then(|| {
            let format = Some(self.format.clone());
            self.input.iter().map(|p| SourceSpec { path: p.clone(), format: format.clone(), name: None, fraction: None }).collect()
        });
        recipe.flag(&["sources"], sources, |r, v| r.sources = v);
        recipe.flag(&["model.path"], self.model.clone(), |r, v| r.model.path = Some(v));
        let out = self.out.as_ref().map(|o| o.to_string_lossy().into_owned());
        recipe.flag(&["distill.out"], out, |r, v| r.distill.out = Some(v));
        recipe.flag(&["distill.limit"], self.limit, |r, v| r.distill.limit = Some(v));
        recipe.flag(&["distill.max_new_tokens"], self.max_new_tokens, |r, v| r.distill.max_new_tokens = v);
        recipe.flag(&["distill.batch_size"], self.batch_size, |r, v| r.distill.batch_size = v);
        recipe.flag(&["distill.drop_unfinished"], self.drop_unfinished.then_some(true), |r, v| r.distill.drop_unfinished = v);
        recipe.flag(&["distill.dtype"], self.dtype.clone(), |r, v| r.distill.dtype = Some(v));
        recipe.flag(&["distill.device"], self.device.clone(), |r, v| r.distill.device = Some(v));
    }
}

pub fn run(args: Args) -> Result<()> {
    let mut recipe = args.recipe.load()?;
    args.apply(&mut recipe);
    recipe.check()?;
    let settings = recipe.distill.clone();
    let out = settings.out.clone().map(PathBuf::from).context("no output folder: give --out or [distill] out")?;
    let model_id = recipe.model.path.clone().context("no full model: give --model or [model] path")?;
    let model_dir = resolve_model_dir(&model_id)?;
    let config = load_config(&model_dir)?;
    let (device, dtype) = device_and_dtype(settings.device.as_deref(), settings.dtype.as_deref())?;

    // Everything that can be refused is checked before the model is loaded.
    let tokenizer = recipe.data.tokenizer.clone().unwrap_or_else(|| model_dir.to_string_lossy().into_owned());
    let codec = ChatCodec::load(&tokenizer, &recipe.data.template)?;
    let (files, file_hashes) = input_files(&recipe.sources)?;
    let (prompts, counts) = read_prompts(&files, &codec, recipe.preprocess.seed, settings.limit)?;
    if counts.unusable > 0 {
        eprintln!("distill: {} of {} rows have no usable prompt and are skipped, e.g.:", counts.unusable, counts.raw_rows);
        for example in &counts.unusable_examples {
            eprintln!("  {example}");
        }
    }
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    if longest + settings.max_new_tokens > config.max_position_embeddings {
        anyhow::bail!(
            "the longest prompt ({longest} tokens) plus max_new_tokens {} exceeds the model's max_position_embeddings {}",
            settings.max_new_tokens,
            config.max_position_embeddings
        );
    }
    if prompts.is_empty() {
        anyhow::bail!("no usable prompt in the inputs ({} rows read)", counts.raw_rows);
    }
    // Text can encode to an id past the embedding table (e.g. Llama 3.2's <|image|>).
    for prompt in &prompts {
        let what = format!("the prompt of input row {}", prompt.row_id);
        check_ids_in_vocab(&prompt.ids, config.vocab_size, Some(&codec.tokenizer.tokenizer), &what)?;
    }
    let stop_ids = eos_and_end_of_turn(&config.eos_token_ids, Some(codec.tokenizer.end_of_turn_id as i64));
    let key = json!({
        "model": model_digest(&model_dir)?,
        "dtype": format!("{dtype:?}"),
        "tokenizer_and_template": codec.digests(),
        "inputs": files.iter().zip(&file_hashes).map(|(f, h)| json!([f.format, f.fraction, h])).collect::<Vec<_>>(),
        "seed": recipe.preprocess.seed,
        "limit": settings.limit,
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "drop_unfinished": settings.drop_unfinished,
        "stop_ids": stop_ids,
    });
    let mut folder = DistillOut::open(&out, key, prompts.len() as u64)?;
    write_resolved(&recipe, &out)?;

    eprintln!("distill: loading {} on {device:?} as {dtype:?}", model_dir.display());
    let model = Transformer::load(&model_dir, device, dtype).with_context(|| format!("loading model {}", model_dir.display()))?;
    let mut options = GenerateOptions::for_model(&model, settings.max_new_tokens);
    options.eos_token_ids = stop_ids.clone();
    let batches: Vec<&[Prompt]> = prompts.chunks(settings.batch_size).collect();
    let resumed = folder.done().len();
    let progress = progress_bar(prompts.len(), resumed * settings.batch_size);
    let stop_after: Option<usize> = std::env::var(STOP_AFTER_PARTS_ENV).ok().and_then(|v| v.parse().ok());
    for (index, batch) in batches.iter().enumerate().skip(resumed) {
        let start = Instant::now();
        let ids: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.iter().map(|&id| i64::from(id)).collect()).collect();
        let output = generate(&model, &model, &ids, &options, &DecodeOptions::default(), None)
            .with_context(|| format!("generating part {index} (prompts {}..)", index * settings.batch_size))?;
        let mut entry = PartEntry {
            name: DistillOut::part_name(index),
            prompts: batch.len() as u64,
            rows: 0,
            unfinished: 0,
            empty: 0,
            new_tokens: 0,
            seconds: 0.0,
        };
        let mut rows = Vec::with_capacity(batch.len());
        for (prompt, generated) in batch.iter().zip(&output.token_ids) {
            let answer = answer(&codec, generated, &stop_ids)?;
            entry.new_tokens += answer.new_tokens as u64;
            entry.unfinished += u64::from(!answer.finished);
            if answer.text.trim().is_empty() {
                entry.empty += 1;
            } else if answer.finished || !settings.drop_unfinished {
                rows.push(answer_row(prompt, &answer));
            }
        }
        entry.rows = rows.len() as u64;
        entry.seconds = start.elapsed().as_secs_f64();
        let tokens_per_second = entry.new_tokens as f64 / entry.seconds.max(1e-9);
        folder.write_part(entry, &rows)?;
        progress.inc(batch.len() as u64);
        progress.set_message(format!("{tokens_per_second:.0} tok/s"));
        if stop_after.is_some_and(|n| index + 1 - resumed >= n) {
            anyhow::bail!("{STOP_AFTER_PARTS_ENV} reached after part {index}");
        }
    }
    progress.finish_and_clear();
    println!("{}", summary(&folder, &counts, resumed));
    Ok(())
}

/// The generated ids as an answer: text without the stop token, and whether it stopped by itself.
fn answer(codec: &ChatCodec, generated: &[i64], stop_ids: &[i64]) -> Result<Answer> {
    let finished = generated.last().is_some_and(|id| stop_ids.contains(id));
    let body = if finished { &generated[..generated.len() - 1] } else { generated };
    let ids: Vec<u32> = body.iter().map(|&id| id as u32).collect();
    Ok(Answer { text: codec.decode(&ids)?, new_tokens: body.len(), finished })
}

/// sha256 of config.json and of every weight file: a changed model is another distillation.
fn model_digest(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut files = vec![dir.join("config.json")];
    files.extend(weight_files(dir)?);
    files.iter().map(|f| sha256_file(f)).collect()
}

fn progress_bar(prompts: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(prompts as u64).with_style(
        indicatif::ProgressStyle::with_template("distill {bar:40} {pos}/{len} prompts {msg} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done.min(prompts) as u64);
    bar
}

/// One JSON line: what the folder holds now (every part, this run's and earlier runs').
fn summary(folder: &DistillOut, counts: &overfill_data::distill::PromptCounts, resumed: usize) -> Value {
    let parts = folder.done();
    let sum = |f: fn(&PartEntry) -> u64| parts.iter().map(f).sum::<u64>();
    let seconds: f64 = parts.iter().map(|p| p.seconds).sum();
    json!({
        "out": folder.dir(),
        "parts": parts.len(),
        "resumed_parts": resumed,
        "raw_rows": counts.raw_rows,
        "sampled_out": counts.sampled_out,
        "unusable_rows": counts.unusable,
        "prompts": sum(|p| p.prompts),
        "rows_written": sum(|p| p.rows),
        "unfinished": sum(|p| p.unfinished),
        "empty": sum(|p| p.empty),
        "new_tokens": sum(|p| p.new_tokens),
        "tokens_per_second": sum(|p| p.new_tokens) as f64 / seconds.max(1e-9),
        "next": format!("overfill preprocess --input '{}/part-*.jsonl' --format jsonl --out SHARDS", folder.dir().display()),
    })
}
