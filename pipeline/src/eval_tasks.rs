//! `overfill eval-tasks`: exact-match accuracy on held-out prompts with known answers (the JSONL
//! `overfill synth-data --heldout-out` writes: `task`, `messages` or `prompt`, `answer`), per task,
//! with the decode speed of the same runs. Generation is `overfill generate`'s: prompts rendered
//! with the chat template and the generation prompt as preprocess renders contexts, greedy,
//! batched (left-padded), and two-stage with `--decoder` (the full model prefills and chooses the
//! first token, the decoder writes the rest; `--refresh-every K` lets the full model re-run every
//! K decoded tokens; `--speculative K` makes the decoder draft for the full model, whose output
//! it then is).
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_data::conversation::{Message, Role};
use overfill_data::template::{ChatTemplate, TemplateSpec};
use overfill_data::tokenize::{check_ids_in_vocab, load_tokenizer, SplitTokenizer, Tokenizer, TokenizerConfig};
use overfill_model::checkpoint::{load_config, parse_device, parse_dtype, resolve_model_dir};
use overfill_model::generate::{eos_and_end_of_turn, generate, DecodeOptions, GenerateOptions};
use overfill_model::sampling::Sampling;
use overfill_model::speculative::SpeculativeStats;
use overfill_model::transformer::Transformer;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// The model that prefills (and, without --decoder, decodes): a checkpoint folder with
    /// tokenizer.json.
    #[arg(long)]
    pub model: String,
    /// Two-stage: this (pruned) model decodes every token after the first from --model's cache.
    #[arg(long, value_name = "DIR")]
    pub decoder: Option<String>,
    /// Held-out prompts: JSONL with "answer" and "messages" (list of {role, content}) or
    /// "prompt" (one user turn), and optionally "task".
    #[arg(long, value_name = "JSONL")]
    pub input: PathBuf,
    /// Tokens generated per prompt at most (the answer plus the end-of-turn token must fit).
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: usize,
    /// Prompts generated together (one left-padded batch).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// With --decoder: the full model re-runs every K decoded tokens (see `overfill generate`).
    #[arg(long, value_name = "K", requires = "decoder")]
    pub refresh_every: Option<usize>,
    /// With --decoder: lossless two-stage decoding, up to K drafts per full-model verification
    /// (see `overfill generate`); the accuracy is the full model's.
    #[arg(long, value_name = "K", requires = "decoder", conflicts_with = "refresh_every")]
    pub speculative: Option<usize>,
    /// Chat template: auto (the model's own; llama3 when its tokenizer has none), llama3,
    /// chatml, model or a Jinja file (the one the shards were made with).
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Intra-op threads for libtorch (default: libtorch's own choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Write one JSON line per prompt (task, prompt, its templated token ids, answer, generated
    /// text, correct) to FILE.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Print one JSON object with every number last on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One held-out prompt.
struct HeldOut {
    task: String,
    messages: Vec<Message>,
    answer: String,
}

fn read_held_out(path: &Path) -> Result<Vec<HeldOut>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --input {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("{} line {}", path.display(), i + 1);
        let row: Value = serde_json::from_str(line).with_context(|| format!("{what}: not a JSON object"))?;
        let answer = row
            .get("answer")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{what}: needs a string \"answer\""))?
            .to_string();
        let task = row.get("task").and_then(Value::as_str).unwrap_or("all").to_string();
        let messages = if let Some(list) = row.get("messages") {
            let list = list.as_array().ok_or_else(|| anyhow!("{what}: \"messages\" must be a list"))?;
            list.iter()
                .enumerate()
                .map(|(j, m)| {
                    let role = m.get("role").and_then(Value::as_str).and_then(Role::parse);
                    let content = m.get("content").and_then(Value::as_str);
                    match (role, content) {
                        (Some(role), Some(content)) => Ok(Message::new(role, content)),
                        _ => bail!("{what}: message {j} needs a known \"role\" and a string \"content\""),
                    }
                })
                .collect::<Result<Vec<_>>>()?
        } else if let Some(prompt) = row.get("prompt").and_then(Value::as_str) {
            vec![Message::new(Role::User, prompt)]
        } else {
            bail!("{what}: needs \"messages\" or a string \"prompt\"");
        };
        if messages.is_empty() {
            bail!("{what}: no messages");
        }
        rows.push(HeldOut { task, messages, answer });
    }
    if rows.is_empty() {
        bail!("--input {} has no prompts", path.display());
    }
    Ok(rows)
}

/// The model folder's tokenizer bound to the chat template, as `overfill generate` loads it.
fn load_codec(model_dir: &Path, template: &str) -> Result<(Tokenizer, ChatTemplate, SplitTokenizer)> {
    let path = model_dir.join("tokenizer.json");
    if !path.is_file() {
        bail!("{} has no tokenizer.json: eval-tasks renders text prompts", model_dir.display());
    }
    let tokenizer = load_tokenizer(&path)?;
    let config_path = model_dir.join("tokenizer_config.json");
    let config = TokenizerConfig::load(config_path.is_file().then_some(config_path.as_path()))?;
    let chat = ChatTemplate::from_spec(&TemplateSpec::parse(template), config.template_tokens(), config.chat_template.as_deref())?;
    let split = SplitTokenizer::new(tokenizer.clone(), &chat).with_context(|| format!("chat template {template:?} with {}", path.display()))?;
    Ok((tokenizer, chat, split))
}

/// Correct and total prompts of one task.
#[derive(Default, Clone, Copy)]
struct Score {
    correct: usize,
    total: usize,
}

impl Score {
    fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Generation totals and per-task scores over all prompts.
#[derive(Default)]
struct Tally {
    scores: BTreeMap<String, Score>,
    overall: Score,
    prefill_seconds: f64,
    decode_seconds: f64,
    decode_steps: usize,
    /// Tokens after the first (which comes from the prefill pass).
    decoded_tokens: usize,
    generated_tokens: usize,
    /// One JSON record per prompt (--out).
    per_row: Vec<Value>,
    /// Drafted and accepted tokens (--speculative).
    speculative: Option<SpeculativeStats>,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    if args.batch_size == 0 || args.max_new_tokens == 0 {
        bail!("--batch-size and --max-new-tokens must be at least 1");
    }
    if args.refresh_every == Some(0) {
        bail!("--refresh-every must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let model_dir = resolve_model_dir(&args.model)?;
    let config = load_config(&model_dir)?;
    let decoder_dir = crate::generate::resolve_decoder(args.decoder.as_deref(), &config, &model_dir)?;
    let rows = read_held_out(&args.input)?;
    let (tokenizer, chat, split) = load_codec(&model_dir, &args.template)?;
    let prompts: Vec<Vec<i64>> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let what = format!("{} prompt {}", args.input.display(), i + 1);
            let text = chat.render(&row.messages, true)?;
            let ids = split.encode(&text).map_err(|e| anyhow!("cannot tokenize {what}: {e:?}"))?;
            check_ids_in_vocab(&ids, config.vocab_size, Some(&tokenizer), &what)?;
            Ok(ids.into_iter().map(i64::from).collect())
        })
        .collect::<Result<_>>()?;

    let model = Transformer::load(&model_dir, device, dtype).with_context(|| format!("loading model {}", model_dir.display()))?;
    let decoder = decoder_dir
        .as_ref()
        .map(|d| Transformer::load(d, device, dtype).with_context(|| format!("loading decoder {}", d.display())))
        .transpose()?;
    let decode_model = decoder.as_ref().unwrap_or(&model);
    let mut options = GenerateOptions::for_model(&model, args.max_new_tokens);
    options.eos_token_ids = eos_and_end_of_turn(&options.eos_token_ids, Some(split.end_of_turn_id as i64));
    let decode = DecodeOptions { sampling: Sampling::new(0.0, None, 1.0, 0)?, refresh_every: args.refresh_every, speculative: args.speculative };

    let progress = ProgressBar::new(rows.len() as u64).with_style(
        ProgressStyle::with_template("eval-tasks {bar:30} {pos}/{len} prompts [{elapsed_precise} < {eta_precise}]").expect("valid progress template"),
    );
    let mut tally = Tally {
        per_row: Vec::with_capacity(rows.len()),
        speculative: args.speculative.map(|draft_len| SpeculativeStats { draft_len, ..Default::default() }),
        ..Tally::default()
    };
    for start in (0..rows.len()).step_by(args.batch_size) {
        let end = (start + args.batch_size).min(rows.len());
        let output = generate(&model, decode_model, &prompts[start..end], &options, &decode, None)?;
        tally.prefill_seconds += output.prefill_seconds;
        tally.decode_seconds += output.decode_seconds;
        tally.decode_steps += output.decode_steps;
        if let (Some(total), Some(stats)) = (tally.speculative.as_mut(), &output.speculative) {
            total.add(stats);
        }
        for (offset, ids) in output.token_ids.iter().enumerate() {
            tally.add(&rows[start + offset], &prompts[start + offset], ids, &tokenizer)?;
        }
        progress.inc((end - start) as u64);
    }
    progress.finish_and_clear();

    if let Some(path) = &args.out {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
        for line in &tally.per_row {
            writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))?;
        }
        file.flush()?;
    }
    let models = Models {
        model_dir: &model_dir,
        decoder_dir: decoder_dir.as_deref(),
        model_parameters: config.param_count(),
        decoder_parameters: decode_model.config.param_count(),
    };
    report(&args, &tally, &models);
    Ok(())
}

impl Tally {
    /// Scores one generated answer against the row's (exact match after trimming).
    fn add(&mut self, row: &HeldOut, prompt_ids: &[i64], ids: &[i64], tokenizer: &Tokenizer) -> Result<()> {
        self.generated_tokens += ids.len();
        // The first token comes from the prefill pass; the rest are decoded.
        self.decoded_tokens += ids.len().saturating_sub(1);
        let as_u32: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        let text = tokenizer.decode(&as_u32, true).map_err(|e| anyhow!("cannot decode generated ids: {e}"))?;
        let correct = text.trim() == row.answer.trim();
        for score in [self.scores.entry(row.task.clone()).or_default(), &mut self.overall] {
            score.total += 1;
            score.correct += correct as usize;
        }
        self.per_row.push(json!({"task": row.task, "prompt": row.messages.last().map(|m| m.content.clone()), "prompt_ids": prompt_ids, "answer": row.answer, "generated": text, "correct": correct}));
        Ok(())
    }
}

/// Which models generated, for the report.
struct Models<'a> {
    model_dir: &'a Path,
    decoder_dir: Option<&'a Path>,
    model_parameters: u64,
    decoder_parameters: u64,
}

/// Accuracy per task and overall with the decode speed on stderr; with --json the same as the
/// last line on stdout.
fn report(args: &Args, tally: &Tally, models: &Models) {
    let decode_tokens_per_second = if tally.decode_seconds > 0.0 { tally.decoded_tokens as f64 / tally.decode_seconds } else { 0.0 };
    let (scores, overall) = (&tally.scores, &tally.overall);
    for (task, score) in scores {
        eprintln!("{task:>10}: {:6.1}% ({}/{})", 100.0 * score.accuracy(), score.correct, score.total);
    }
    eprintln!(
        "{:>10}: {:6.1}% ({}/{}); decoder {} parameters; decode {:.0} tokens/s ({} steps, batch {}){}",
        "all",
        100.0 * overall.accuracy(),
        overall.correct,
        overall.total,
        models.decoder_parameters,
        decode_tokens_per_second,
        tally.decode_steps,
        args.batch_size,
        args.refresh_every.map(|k| format!(", full-model refresh every {k} tokens")).unwrap_or_default(),
    );
    if let Some(stats) = &tally.speculative {
        eprintln!("{}", crate::generate::speculative_line(stats));
    }
    if args.json {
        let tasks: serde_json::Map<String, Value> = scores
            .iter()
            .map(|(task, s)| (task.clone(), json!({"correct": s.correct, "total": s.total, "accuracy": s.accuracy()})))
            .collect();
        println!(
            "{}",
            json!({
                "model": models.model_dir.display().to_string(),
                "decoder": models.decoder_dir.map(|d| d.display().to_string()),
                "two_stage": models.decoder_dir.is_some(),
                "refresh_every": args.refresh_every,
                "model_parameters": models.model_parameters,
                "decoder_parameters": models.decoder_parameters,
                "accuracy": overall.accuracy(),
                "correct": overall.correct,
                "total": overall.total,
                "tasks": tasks,
                "batch_size": args.batch_size,
                "generated_tokens": tally.generated_tokens,
                "decoded_tokens": tally.decoded_tokens,
                "prefill_seconds": tally.prefill_seconds,
                "decode_seconds": tally.decode_seconds,
                "decode_steps": tally.decode_steps,
                "decode_tokens_per_second": decode_tokens_per_second,
                "speculative": tally.speculative.as_ref().map(crate::generate::speculative_json),
            })
        );
    }
}
