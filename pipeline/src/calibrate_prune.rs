//! `overfill calibrate-prune`: score channels on calibration data and width-prune a model.
//!
//! Flags override the recipe (`--config configs/X.toml`, tables `[calibrate]` and `[prune]`).
//! The output directory is a plain HF checkpoint plus `pruning.json` and the importance scores,
//! staged in a temporary sibling directory and renamed into place at the end, so that a killed run
//! leaves nothing half-written.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_model::calibrate::{self, Importance, LossStats, SampleNorm, SeqAgg};
use overfill_model::checkpoint;
use overfill_model::config::ModelConfig;
use overfill_model::prune::{self, Width};
use overfill_model::transformer::Transformer;
use serde_json::json;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Recipe TOML; its [calibrate] and [prune] tables give defaults that flags override.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model directory (or hub id in the local HF cache).
    #[arg(long)]
    pub model: Option<String>,
    /// Preprocessed shard directory, or a JSON file holding a list of token-id lists.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Hidden width: a prune ratio in [0, 1) or an absolute number of channels to keep.
    #[arg(long, allow_hyphen_values = true)]
    pub width_hidden: Option<String>,
    /// FFN intermediate width: a prune ratio in [0, 1) or an absolute number of channels.
    #[arg(long, allow_hyphen_values = true)]
    pub width_intermediate: Option<String>,
    /// Round kept widths to a multiple of N (e.g. 64).
    #[arg(long)]
    pub round_to: Option<usize>,
    /// Number of calibration samples [default: 512].
    #[arg(long)]
    pub calib_size: Option<usize>,
    /// Calibration batch size [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per calibration sample (context+target, truncated) [default: 512].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Sequence aggregation: mean (signed, paper) or abs-mean (Model-Optimizer) [default: mean].
    #[arg(long)]
    pub seq_agg: Option<String>,
    /// Norm over samples: l2 or l1 [default: l2].
    #[arg(long)]
    pub norm: Option<String>,
    /// Reuse importance scores saved by an earlier run instead of calibrating.
    #[arg(long)]
    pub scores: Option<PathBuf>,
    /// Where to save the importance scores [default: <out>/importance.safetensors].
    #[arg(long)]
    pub save_scores: Option<PathBuf>,
    /// Output directory of the pruned checkpoint.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compute dtype: f32, bf16 or f16 [default: bf16 on CUDA, f32 on CPU].
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N [default: cuda when available].
    #[arg(long)]
    pub device: Option<String>,
    /// Intra-op threads for libtorch (default: libtorch's own choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Only calibrate and save the scores (no pruning).
    #[arg(long)]
    pub calibrate_only: bool,
    /// Print pruned shapes and parameter counts from a config only (no weights, no data).
    #[arg(long)]
    pub dry_run: bool,
    /// config.json for --dry-run (default: <model>/config.json).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
}

/// All settings after merging recipe and flags.
#[derive(Debug)]
struct Settings {
    model: Option<String>,
    data: Option<PathBuf>,
    width_hidden: Width,
    width_intermediate: Width,
    round_to: Option<usize>,
    calib_size: usize,
    batch_size: usize,
    max_seq_len: usize,
    seq_agg: SeqAgg,
    norm: SampleNorm,
    scores: Option<PathBuf>,
    save_scores: Option<PathBuf>,
    out: Option<PathBuf>,
    dtype: Option<String>,
    device: Option<String>,
}

/// A recipe table value as a string (numbers and strings alike).
fn toml_str(table: Option<&toml::Value>, key: &str) -> Option<String> {
    match table?.get(key)? {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        other => Some(other.to_string()),
    }
}

fn toml_usize(table: Option<&toml::Value>, key: &str, file: &Path) -> Result<Option<usize>> {
    match table.and_then(|t| t.get(key)) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as usize)),
        Some(v) => bail!("{}: {key} = {v} must be a non-negative integer", file.display()),
    }
}

fn resolve(args: &Args) -> Result<Settings> {
    let recipe: Option<(PathBuf, toml::Value)> = match &args.config {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
            let value: toml::Value = toml::from_str(&text).with_context(|| format!("parsing recipe {}", path.display()))?;
            Some((path.clone(), value))
        }
    };
    let file = recipe.as_ref().map(|(p, _)| p.clone()).unwrap_or_default();
    let cal = recipe.as_ref().and_then(|(_, v)| v.get("calibrate"));
    let pr = recipe.as_ref().and_then(|(_, v)| v.get("prune"));
    // Relative paths in a recipe are relative to the directory `just` runs in (the repo root),
    // like every other recipe path.
    let width = |flag: &Option<String>, key: &str| -> Result<Width> {
        let text = flag.clone().or_else(|| toml_str(pr, key));
        match text {
            None => bail!("no --{} given and none in the recipe's [prune] table", key.replace('_', "-")),
            Some(t) => t.parse::<Width>().with_context(|| format!("--{}", key.replace('_', "-"))),
        }
    };
    let dry_run_needs_no_data = args.dry_run;
    let settings = Settings {
        // Model and shards default to the recipe's [model] path and [data] shards (where
        // `overfill preprocess` writes).
        model: args.model.clone().or_else(|| toml_str(cal, "model")).or_else(|| {
            let model_table = recipe.as_ref().and_then(|(_, v)| v.get("model"));
            ["path", "dir", "id", "name"].iter().find_map(|k| toml_str(model_table, k))
        }),
        data: args.data.clone().or_else(|| toml_str(cal, "data").map(PathBuf::from)).or_else(|| {
            toml_str(recipe.as_ref().and_then(|(_, v)| v.get("data")), "shards").map(PathBuf::from)
        }),
        width_hidden: width(&args.width_hidden, "width_hidden")?,
        width_intermediate: width(&args.width_intermediate, "width_intermediate")?,
        round_to: args.round_to.or(toml_usize(pr, "round_to", &file)?),
        calib_size: args.calib_size.or(toml_usize(cal, "calib_size", &file)?).unwrap_or(512),
        batch_size: args.batch_size.or(toml_usize(cal, "batch_size", &file)?).unwrap_or(16),
        max_seq_len: args.max_seq_len.or(toml_usize(cal, "max_seq_len", &file)?).unwrap_or(512),
        seq_agg: args.seq_agg.clone().or_else(|| toml_str(cal, "seq_agg")).unwrap_or_else(|| "mean".into()).parse()?,
        norm: args.norm.clone().or_else(|| toml_str(cal, "norm")).unwrap_or_else(|| "l2".into()).parse()?,
        scores: args.scores.clone().or_else(|| toml_str(cal, "scores").map(PathBuf::from)),
        save_scores: args.save_scores.clone(),
        out: args.out.clone().or_else(|| toml_str(pr, "out").map(PathBuf::from)),
        dtype: args.dtype.clone().or_else(|| toml_str(cal, "dtype")),
        device: args.device.clone().or_else(|| toml_str(cal, "device")),
    };
    if !dry_run_needs_no_data {
        if settings.calib_size == 0 {
            bail!("--calib-size must be at least 1");
        }
        if settings.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if settings.max_seq_len < 2 {
            bail!("--max-seq-len must be at least 2 (the calibration loss needs a next token)");
        }
    }
    Ok(settings)
}

pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let settings = resolve(&args)?;
    if args.dry_run {
        return dry_run(&args, &settings);
    }
    let model_id = settings.model.clone().ok_or_else(|| anyhow!("no --model given and no model in the recipe's [calibrate] table"))?;
    let model_dir = checkpoint::resolve_model_dir(&model_id)?;
    let config = checkpoint::load_config(&model_dir)?;
    // Widths first: a bad ratio fails before any weight or data is read.
    let hidden_kept = prune::kept_width(config.hidden_size, settings.width_hidden, settings.round_to).context("hidden width")?;
    let inter_kept =
        prune::kept_width(config.intermediate_size, settings.width_intermediate, settings.round_to).context("intermediate width")?;
    let tokenizer = load_model_tokenizer(&model_dir, &config)?;
    let out = settings.out.clone().ok_or_else(|| anyhow!("no --out given and no out in the recipe's [prune] table"))?;
    // One run per --out at a time, held until this function returns or the process dies: a
    // second run fails at once naming this one (and never takes its staging folder for stale).
    let _out_lock = overfill_data::out_lock::OutputLock::acquire(&out, "calibrate-prune")?;
    if !args.calibrate_only {
        check_out_dir(&out)?;
    }

    // Calibration data is needed for the scores, and for the loss before/after even with --scores.
    let data = settings.data.clone().ok_or_else(|| anyhow!("no --data given and no data in the recipe's [calibrate] table"))?;
    let samples = load_samples(&data, settings.calib_size, settings.max_seq_len)?;
    if samples.len() < settings.calib_size && samples.len() >= settings.batch_size {
        eprintln!(
            "warning: {} has {} calibration samples, fewer than the {} asked for; using them all",
            data.display(),
            samples.len(),
            settings.calib_size
        );
    }
    let batches = calibrate::length_sorted_batches(samples, settings.batch_size).with_context(|| format!("calibration data {}", data.display()))?;
    check_data_vocab(&batches, config.vocab_size, tokenizer.as_ref()).with_context(|| format!("calibration data {}", data.display()))?;
    calibrate::check_token_ids(&batches, config.vocab_size).with_context(|| format!("calibration data {}", data.display()))?;
    let total_tokens: usize = batches.iter().flatten().map(Vec::len).sum();

    let device = match &settings.device {
        Some(d) => checkpoint::parse_device(d)?,
        None => tch::Device::cuda_if_available(),
    };
    let kind = match &settings.dtype {
        Some(d) => checkpoint::parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    eprintln!("loading {} on {device:?} as {kind:?}", model_dir.display());
    let model = Transformer::load(&model_dir, device, kind)?;

    let mut calibration = json!(null);
    let (importance, loss_before) = match &settings.scores {
        Some(path) => {
            let importance = Importance::load(path)?;
            importance.check_matches(&config).with_context(|| format!("scores {}", path.display()))?;
            eprintln!("reusing importance scores from {} (calib_size {})", path.display(), importance.calib_size);
            let bar = progress_bar(total_tokens, "loss (full)");
            let loss = calibrate::lm_loss(&model, &batches, &mut |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            (importance, loss)
        }
        None => {
            let bar = progress_bar(total_tokens, "calibrating");
            let start = Instant::now();
            let (importance, loss) =
                calibrate::calibrate(&model, &batches, settings.seq_agg, settings.norm, &mut |n| bar.inc(n as u64))?;
            let seconds = start.elapsed().as_secs_f64();
            bar.finish_and_clear();
            let rate = importance.tokens as f64 / seconds.max(1e-9);
            eprintln!(
                "calibration: {} samples, {} tokens in {seconds:.2}s ({rate:.0} tokens/s), loss {:.4}",
                importance.calib_size, importance.tokens, loss.loss
            );
            calibration = json!({
                "samples": importance.calib_size,
                "tokens": importance.tokens,
                "seconds": seconds,
                "tokens_per_second": rate,
            });
            if let Some(path) = &settings.save_scores {
                importance.save(path)?;
                eprintln!("saved importance scores to {}", path.display());
            }
            (importance, loss)
        }
    };

    if args.calibrate_only {
        let path = match &settings.save_scores {
            Some(p) => p.clone(),
            None => {
                std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
                let p = out.join("importance.safetensors");
                importance.save(&p)?;
                p
            }
        };
        let summary = json!({"scores": path, "loss": loss_before.loss, "loss_tokens": loss_before.tokens, "calibration": calibration});
        if args.json {
            println!("{summary}");
        } else {
            eprintln!("saved importance scores to {}", path.display());
        }
        return Ok(());
    }

    // Prune.
    let plan = importance.plan(hidden_kept, inter_kept)?;
    let (new_config, tensors) = prune::prune_tensors(&config, &model.tensors(), &plan)?;
    drop(model);
    let pruned = Transformer::from_tensors(new_config.clone(), tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect())?;
    let bar = progress_bar(total_tokens, "loss (pruned)");
    let loss_after = calibrate::lm_loss(&pruned, &batches, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    drop(pruned);

    // Stage everything in a sibling temp dir, then rename into place.
    let staging = sibling(&out, &format!(".tmp-{}", std::process::id()))?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing stale {}", staging.display()))?;
    }
    let result = (|| -> Result<()> {
        checkpoint::save_checkpoint(&staging, &new_config, &tensors, 5 << 30)?;
        copy_tokenizer_files(&model_dir, &staging)?;
        if settings.scores.is_none() && settings.save_scores.is_none() {
            importance.save(&staging.join("importance.safetensors"))?;
        }
        let report = pruning_report(
            &model_dir, &data, &settings, &config, &new_config, &plan, &importance, loss_before, loss_after, calibration.clone(), device, kind,
        );
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(staging.join("pruning.json"), text).context("writing pruning.json")?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    replace_dir(&staging, &out)?;
    let summary = json!({
        "out": out,
        "hidden_size": new_config.hidden_size,
        "intermediate_size": new_config.intermediate_size,
        "params_before": config.param_count(),
        "params_after": new_config.param_count(),
        "loss_before": loss_before.loss,
        "loss_after": loss_after.loss,
    });
    if args.json {
        println!("{summary}");
    } else {
        eprintln!(
            "pruned D {} -> {}, I {} -> {}, params {} -> {}, calibration loss {:.4} -> {:.4}; wrote {}",
            config.hidden_size,
            new_config.hidden_size,
            config.intermediate_size,
            new_config.intermediate_size,
            config.param_count(),
            new_config.param_count(),
            loss_before.loss,
            loss_after.loss,
            out.display()
        );
    }
    Ok(())
}

fn dry_run(args: &Args, settings: &Settings) -> Result<()> {
    let config_path = match (&args.model_config, &settings.model) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => checkpoint::resolve_model_dir(m)?.join("config.json"),
        (None, None) => bail!("--dry-run needs --model-config FILE or --model DIR"),
    };
    let config = ModelConfig::from_file(&config_path)?;
    let (pruned, report) = prune::dry_run(&config, settings.width_hidden, settings.width_intermediate, settings.round_to)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("{}", config_path.display());
    println!(
        "hidden_size {} -> {}, intermediate_size {} -> {} (layers {}, heads {}, kv heads {}, head_dim {} unchanged)",
        config.hidden_size,
        pruned.hidden_size,
        config.intermediate_size,
        pruned.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim
    );
    let before: std::collections::BTreeMap<String, Vec<i64>> = config.parameter_shapes().into_iter().collect();
    for (name, shape) in pruned.parameter_shapes() {
        // One layer is enough to show the pattern.
        if name.starts_with("model.layers.") && !name.starts_with("model.layers.0.") {
            continue;
        }
        println!("  {name:<48} {:?} -> {shape:?}", before.get(&name).cloned().unwrap_or_default());
    }
    println!(
        "parameters {} ({:.2}B) -> {} ({:.2}B)",
        report.params_before,
        report.params_before as f64 / 1e9,
        report.params_after,
        report.params_after as f64 / 1e9
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pruning_report(
    model_dir: &Path,
    data: &Path,
    settings: &Settings,
    config: &ModelConfig,
    new_config: &ModelConfig,
    plan: &prune::PrunePlan,
    importance: &Importance,
    loss_before: LossStats,
    loss_after: LossStats,
    calibration: serde_json::Value,
    device: tch::Device,
    kind: tch::Kind,
) -> serde_json::Value {
    json!({
        "source_model": model_dir,
        "data": data,
        "settings": {
            "width_hidden": settings.width_hidden.to_string(),
            "width_intermediate": settings.width_intermediate.to_string(),
            "round_to": settings.round_to,
            "calib_size": importance.calib_size,
            "calib_tokens": importance.tokens,
            "batch_size": settings.batch_size,
            "max_seq_len": settings.max_seq_len,
            "seq_agg": importance.seq_agg.to_string(),
            "norm": importance.norm.to_string(),
            "scores": settings.scores,
            "device": format!("{device:?}"),
            "dtype": format!("{kind:?}"),
        },
        "hidden_size": {"before": config.hidden_size, "after": new_config.hidden_size},
        "intermediate_size": {"before": config.intermediate_size, "after": new_config.intermediate_size},
        "params_before": config.param_count(),
        "params_after": new_config.param_count(),
        "loss_before": loss_before.loss,
        "loss_after": loss_after.loss,
        "loss_tokens": loss_before.tokens,
        "calibration": calibration,
        "kept": {
            "hidden": plan.hidden,
            "intermediate": plan.intermediate,
        },
    })
}

fn progress_bar(total: usize, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} tokens ({per_sec}, eta {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(message);
    bar
}

/// Calibration samples: context+target token ids, truncated to `max_seq_len`, at most `n`.
fn load_samples(path: &Path, n: usize, max_seq_len: usize) -> Result<Vec<Vec<u32>>> {
    if path.is_file() {
        // A JSON list of token-id lists (tests, benchmarks, hand-made calibration sets).
        let text = std::fs::read_to_string(path).with_context(|| format!("reading calibration data {}", path.display()))?;
        let rows: Vec<Vec<u32>> = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON list of token-id lists", path.display()))?;
        return Ok(rows
            .into_iter()
            .take(n)
            .map(|mut r| {
                r.truncate(max_seq_len);
                r
            })
            .collect());
    }
    if !path.is_dir() {
        bail!("calibration data {} does not exist", path.display());
    }
    load_shard_samples(path, n, max_seq_len)
}

fn load_shard_samples(path: &Path, n: usize, max_seq_len: usize) -> Result<Vec<Vec<u32>>> {
    let shards = overfill_data::reader::ShardDataset::open(path).with_context(|| format!("opening shards {}", path.display()))?;
    Ok(shards.calibration_samples(n, max_seq_len))
}

/// The tokenizer shipped with the model, if any. Ids it has past the embedding table are only
/// warned about here (Llama 3.2's `<|image|>` is one past the text models' vocabulary), as in
/// every command; data that holds one is refused by `check_data_vocab`, naming the token.
fn load_model_tokenizer(model_dir: &Path, config: &ModelConfig) -> Result<Option<overfill_data::tokenize::Tokenizer>> {
    let path = model_dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let tokenizer = overfill_data::tokenize::load_tokenizer(&path)?;
    if let Some(warning) = overfill_data::tokenize::vocab_overflow_warning(&tokenizer, config.vocab_size, &path) {
        eprintln!("{warning}");
    }
    Ok(Some(tokenizer))
}

/// Calibration ids the model cannot embed are refused, naming the token when the model has a tokenizer.
fn check_data_vocab(batches: &[Vec<Vec<u32>>], vocab_size: usize, tokenizer: Option<&overfill_data::tokenize::Tokenizer>) -> Result<()> {
    for (b, rows) in batches.iter().enumerate() {
        for (r, row) in rows.iter().enumerate() {
            if row.iter().any(|&id| id as usize >= vocab_size) {
                overfill_data::tokenize::check_ids_in_vocab(row, vocab_size, tokenizer, &format!("calibration batch {b} row {r}"))?;
            }
        }
    }
    Ok(())
}

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            checkpoint::copy_file_contents(&src, &to.join(name))?;
        }
    }
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| anyhow!("--out {} has no directory name", path.display()))?;
    let mut name = name.to_os_string();
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// Refuse to overwrite a directory that is not an earlier output of this command.
fn check_out_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let ours = out.join("pruning.json").is_file();
        let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !ours && !empty {
            bail!("--out {} exists and is not an earlier calibrate-prune output; refusing to overwrite it", out.display());
        }
    }
    Ok(())
}

/// Move `staging` to `out`, replacing an earlier output.
fn replace_dir(staging: &Path, out: &Path) -> Result<()> {
    if let Some(parent) = out.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    if out.exists() {
        let old = sibling(out, &format!(".old-{}", std::process::id()))?;
        std::fs::rename(out, &old).with_context(|| format!("moving the earlier {} aside", out.display()))?;
        std::fs::rename(staging, out).with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(staging, out).with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
    }
    Ok(())
}
