//! `overfill calibrate-prune`: score channels on calibration data and width-prune a model.
//!
//! Flags override the recipe (`--config configs/X.toml`, tables `[calibrate]` and `[prune]`; see
//! `crate::recipe`). The output directory is a plain HF checkpoint plus `pruning.json`, the
//! importance scores and the resolved recipe, staged in a hidden sibling folder and renamed into
//! place at the end, so that a killed run leaves nothing half-written; a later run removes such a
//! leftover.
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

use crate::recipe::{check_ratio, write_resolved, Recipe, RecipeArgs};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub flags: Flags,
    /// Output directory of the pruned checkpoint ([prune] out).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to save the importance scores [default: <out>/importance.safetensors].
    #[arg(long)]
    pub save_scores: Option<PathBuf>,
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

/// The flags of `calibrate-prune` that override recipe values (also accepted by `overfill
/// config`). Each help line names the recipe key it sets.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Flags {
    /// Model directory or hub id in the local HF cache ([calibrate] model; default: [model] path).
    #[arg(long)]
    pub model: Option<String>,
    /// Preprocessed shard directory, or a JSON file holding a list of token-id lists
    /// ([calibrate] data; default: [data] shards).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Hidden width as a prune ratio in [0, 1), the share of channels removed ([prune] width_hidden).
    #[arg(long, value_name = "RATIO", allow_hyphen_values = true, value_parser = hidden_ratio, conflicts_with = "hidden_size")]
    pub width_hidden: Option<f64>,
    /// FFN width as a prune ratio in [0, 1) ([prune] width_intermediate).
    #[arg(long, value_name = "RATIO", allow_hyphen_values = true, value_parser = intermediate_ratio, conflicts_with = "intermediate_size")]
    pub width_intermediate: Option<f64>,
    /// Hidden channels to keep, an absolute width instead of --width-hidden ([prune] hidden_size).
    #[arg(long, value_name = "N")]
    pub hidden_size: Option<usize>,
    /// FFN channels to keep, an absolute width instead of --width-intermediate ([prune] intermediate_size).
    #[arg(long, value_name = "N")]
    pub intermediate_size: Option<usize>,
    /// Round kept widths to a multiple of N, e.g. 64 ([prune] round_to).
    #[arg(long, value_name = "N")]
    pub round_to: Option<usize>,
    /// Number of calibration samples ([calibrate] calib_size, default 512).
    #[arg(long)]
    pub calib_size: Option<usize>,
    /// Calibration batch size ([calibrate] batch_size, default 16).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per calibration sample, context+target truncated ([calibrate] max_seq_len, default 512).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Sequence aggregation: mean (signed, paper) or abs-mean (Model-Optimizer) ([calibrate] seq_agg).
    #[arg(long)]
    pub seq_agg: Option<String>,
    /// Norm over samples: l2 or l1 ([calibrate] norm).
    #[arg(long)]
    pub norm: Option<String>,
    /// Reuse importance scores saved by an earlier run instead of calibrating ([calibrate] scores).
    #[arg(long)]
    pub scores: Option<PathBuf>,
    /// Compute dtype: f32, bf16 or f16 ([calibrate] dtype; default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N ([calibrate] device; default: cuda when available).
    #[arg(long)]
    pub device: Option<String>,
}

impl Flags {
    /// Store the given flags in the recipe, marked as set on the command line. A ratio replaces
    /// an absolute width of the same dimension and the other way round.
    pub fn apply(&self, recipe: &mut Recipe) {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        recipe.flag(&["calibrate.model"], self.model.clone(), |r, v| r.calibrate.model = Some(v));
        recipe.flag(&["calibrate.data"], path(&self.data), |r, v| r.calibrate.data = Some(v));
        let hidden = ["prune.width_hidden", "prune.hidden_size"];
        recipe.flag(&hidden, self.width_hidden, |r, v| (r.prune.width_hidden, r.prune.hidden_size) = (Some(v), None));
        recipe.flag(&hidden, self.hidden_size, |r, v| (r.prune.width_hidden, r.prune.hidden_size) = (None, Some(v)));
        let inter = ["prune.width_intermediate", "prune.intermediate_size"];
        recipe.flag(&inter, self.width_intermediate, |r, v| {
            (r.prune.width_intermediate, r.prune.intermediate_size) = (Some(v), None)
        });
        recipe.flag(&inter, self.intermediate_size, |r, v| {
            (r.prune.width_intermediate, r.prune.intermediate_size) = (None, Some(v))
        });
        recipe.flag(&["prune.round_to"], self.round_to, |r, v| r.prune.round_to = Some(v));
        recipe.flag(&["calibrate.calib_size"], self.calib_size, |r, v| r.calibrate.calib_size = v);
        recipe.flag(&["calibrate.batch_size"], self.batch_size, |r, v| r.calibrate.batch_size = v);
        recipe.flag(&["calibrate.max_seq_len"], self.max_seq_len, |r, v| r.calibrate.max_seq_len = v);
        recipe.flag(&["calibrate.seq_agg"], self.seq_agg.clone(), |r, v| r.calibrate.seq_agg = v);
        recipe.flag(&["calibrate.norm"], self.norm.clone(), |r, v| r.calibrate.norm = v);
        recipe.flag(&["calibrate.scores"], path(&self.scores), |r, v| r.calibrate.scores = Some(v));
        recipe.flag(&["calibrate.dtype"], self.dtype.clone(), |r, v| r.calibrate.dtype = Some(v));
        recipe.flag(&["calibrate.device"], self.device.clone(), |r, v| r.calibrate.device = Some(v));
    }
}

/// `--width-*` takes ratios only: a whole number other than 0 (`1`, `2334`) is refused, since it
/// once meant "keep that many channels" while `1.0` meant a ratio.
fn ratio_flag(text: &str, size_flag: &str) -> std::result::Result<f64, String> {
    let t = text.trim();
    if t != "0" && !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{t}` is a whole number, but this flag takes a prune ratio in [0, 1) (the share of channels removed); to keep {t} channels use --{size_flag} {t}"
        ));
    }
    let ratio: f64 = t.parse().map_err(|_| format!("`{t}` is not a prune ratio in [0, 1)"))?;
    check_ratio(ratio)?;
    Ok(ratio)
}

fn hidden_ratio(text: &str) -> std::result::Result<f64, String> {
    ratio_flag(text, "hidden-size")
}

fn intermediate_ratio(text: &str) -> std::result::Result<f64, String> {
    ratio_flag(text, "intermediate-size")
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

/// The recipe (file, `--set`, then flags; checked) and the settings this command reads from it.
fn resolve(args: &Args) -> Result<(Recipe, Settings)> {
    let mut recipe = args.recipe.load()?;
    args.flags.apply(&mut recipe);
    let out = args.out.as_ref().map(|o| o.to_string_lossy().into_owned());
    recipe.flag(&["prune.out"], out, |r, v| r.prune.out = Some(v));
    recipe.check()?;
    let (cal, pr) = (&recipe.calibrate, &recipe.prune);
    let width = |ratio: Option<f64>, size: Option<usize>, dim: &str| -> Result<Width> {
        match (size, ratio) {
            (Some(n), _) => Ok(Width::Absolute(n)),
            (None, Some(r)) => Ok(Width::Fraction(r)),
            (None, None) => bail!(
                "no --width-{dim} (a ratio) or --{dim}-size (channels) given, and neither width_{dim} nor {dim}_size in the recipe's [prune] table"
            ),
        }
    };
    let settings = Settings {
        // Model and shards default to the recipe's [model] path and [data] shards (where
        // `overfill preprocess` writes). Relative paths are relative to the working directory.
        model: cal.model.clone().or_else(|| recipe.model.path.clone()),
        data: cal.data.clone().or_else(|| recipe.data.shards.clone()).map(PathBuf::from),
        width_hidden: width(pr.width_hidden, pr.hidden_size, "hidden")?,
        width_intermediate: width(pr.width_intermediate, pr.intermediate_size, "intermediate")?,
        round_to: pr.round_to,
        calib_size: cal.calib_size,
        batch_size: cal.batch_size,
        max_seq_len: cal.max_seq_len,
        seq_agg: cal.seq_agg.parse()?,
        norm: cal.norm.parse()?,
        scores: cal.scores.clone().map(PathBuf::from),
        save_scores: args.save_scores.clone(),
        out: pr.out.clone().map(PathBuf::from),
        dtype: cal.dtype.clone(),
        device: cal.device.clone(),
    };
    if !args.dry_run {
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
    Ok((recipe, settings))
}

pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let (recipe, settings) = resolve(&args)?;
    if args.dry_run {
        return dry_run(&args, &settings);
    }
    let model_id = settings.model.clone().ok_or_else(|| anyhow!("no --model given and no model in the recipe ([calibrate] model or [model] path)"))?;
    let model_dir = checkpoint::resolve_model_dir(&model_id)?;
    let config = checkpoint::load_config(&model_dir)?;
    // Widths first: a bad ratio fails before any weight or data is read.
    let hidden_kept = prune::kept_width(config.hidden_size, settings.width_hidden, settings.round_to).context("hidden width")?;
    let inter_kept =
        prune::kept_width(config.intermediate_size, settings.width_intermediate, settings.round_to).context("intermediate width")?;
    let tokenizer = load_model_tokenizer(&model_dir, &config)?;
    let out = settings.out.clone().ok_or_else(|| anyhow!("no --out given and no out in the recipe's [prune] table"))?;
    refuse_out_over_model(&model_dir, &out)?;
    // One run per --out at a time, held until this function returns or the process dies: a
    // second run fails at once naming this one (and never takes its staging folder for stale).
    let _out_lock = overfill_data::out_lock::OutputLock::acquire(&out, "calibrate-prune")?;
    remove_stale_staging(&out)?;
    if !args.calibrate_only {
        check_out_dir(&out)?;
    }

    let calibration = CalibrationData::load(&settings, &config, tokenizer.as_ref())?;
    let (device, kind) = checkpoint::device_and_dtype(settings.device.as_deref(), settings.dtype.as_deref())?;
    eprintln!("loading {} on {device:?} as {kind:?}", model_dir.display());
    let model = Transformer::load(&model_dir, device, kind)?;
    let scored = score(&model, &config, &calibration, &settings)?;
    if args.calibrate_only {
        return save_scores_only(&args, &settings, &recipe, &out, &scored);
    }

    // Prune.
    let plan = scored.importance.plan(hidden_kept, inter_kept)?;
    let (new_config, tensors) = prune::prune_tensors(&config, &model.tensors(), &plan)?;
    drop(model);
    let pruned = Transformer::from_tensors(new_config.clone(), tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect())?;
    let bar = progress_bar(calibration.total_tokens, "loss (pruned)");
    let loss_after = calibrate::lm_loss(&pruned, &calibration.batches, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    drop(pruned);

    let report = pruning_report(
        &model_dir, &calibration.path, &settings, &config, &new_config, &plan, &scored.importance, scored.loss_before, loss_after,
        scored.calibration.clone(), device, kind,
    );
    let pruned = PrunedModel { source_dir: &model_dir, config: &new_config, tensors: &tensors, report };
    write_pruned(&pruned, &settings, &recipe, &scored.importance, &out)?;
    let summary = json!({
        "out": out,
        "hidden_size": new_config.hidden_size,
        "intermediate_size": new_config.intermediate_size,
        "params_before": config.param_count(),
        "params_after": new_config.param_count(),
        "loss_before": scored.loss_before.loss,
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
            scored.loss_before.loss,
            loss_after.loss,
            out.display()
        );
    }
    Ok(())
}

/// The calibration samples in length-sorted batches, checked against the model's vocabulary.
struct CalibrationData {
    path: PathBuf,
    batches: Vec<Vec<Vec<u32>>>,
    total_tokens: usize,
}

impl CalibrationData {
    /// Needed for the scores, and for the loss before/after even with --scores.
    fn load(settings: &Settings, config: &ModelConfig, tokenizer: Option<&overfill_data::tokenize::Tokenizer>) -> Result<CalibrationData> {
        let data = settings.data.clone().ok_or_else(|| anyhow!("no --data given and no data in the recipe ([calibrate] data or [data] shards)"))?;
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
        check_data_vocab(&batches, config.vocab_size, tokenizer).with_context(|| format!("calibration data {}", data.display()))?;
        calibrate::check_token_ids(&batches, config.vocab_size).with_context(|| format!("calibration data {}", data.display()))?;
        let total_tokens: usize = batches.iter().flatten().map(Vec::len).sum();
        Ok(CalibrationData { path: data, batches, total_tokens })
    }
}

/// Importance scores (calibrated here, or an earlier run's --scores) and the full model's loss.
struct Scored {
    importance: Importance,
    loss_before: LossStats,
    /// Samples, tokens and speed of the calibration pass (null with --scores).
    calibration: serde_json::Value,
}

/// Calibrates `model` on the data (saving the scores with --save-scores), or reuses --scores and
/// only measures the loss.
fn score(model: &Transformer, config: &ModelConfig, data: &CalibrationData, settings: &Settings) -> Result<Scored> {
    if let Some(path) = &settings.scores {
        let importance = Importance::load(path)?;
        importance.check_matches(config).with_context(|| format!("scores {}", path.display()))?;
        eprintln!("reusing importance scores from {} (calib_size {})", path.display(), importance.calib_size);
        let bar = progress_bar(data.total_tokens, "loss (full)");
        let loss = calibrate::lm_loss(model, &data.batches, &mut |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        return Ok(Scored { importance, loss_before: loss, calibration: json!(null) });
    }
    let bar = progress_bar(data.total_tokens, "calibrating");
    let start = Instant::now();
    let (importance, loss) = calibrate::calibrate(model, &data.batches, settings.seq_agg, settings.norm, &mut |n| bar.inc(n as u64))?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let rate = importance.tokens as f64 / seconds.max(1e-9);
    eprintln!(
        "calibration: {} samples, {} tokens in {seconds:.2}s ({rate:.0} tokens/s), loss {:.4}",
        importance.calib_size, importance.tokens, loss.loss
    );
    let calibration = json!({
        "samples": importance.calib_size,
        "tokens": importance.tokens,
        "seconds": seconds,
        "tokens_per_second": rate,
    });
    if let Some(path) = &settings.save_scores {
        importance.save(path)?;
        eprintln!("saved importance scores to {}", path.display());
    }
    Ok(Scored { importance, loss_before: loss, calibration })
}

/// --calibrate-only: the scores (to --save-scores, or `importance.safetensors` in --out with the
/// resolved recipe) and the loss, nothing pruned.
fn save_scores_only(args: &Args, settings: &Settings, recipe: &Recipe, out: &Path, scored: &Scored) -> Result<()> {
    let path = match &settings.save_scores {
        Some(p) => p.clone(),
        None => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let p = out.join("importance.safetensors");
            scored.importance.save(&p)?;
            write_resolved(recipe, out)?;
            p
        }
    };
    let summary = json!({"scores": path, "loss": scored.loss_before.loss, "loss_tokens": scored.loss_before.tokens, "calibration": scored.calibration});
    if args.json {
        println!("{summary}");
    } else {
        eprintln!("saved importance scores to {}", path.display());
    }
    Ok(())
}

/// The pruned checkpoint to write, with its report (`pruning.json`).
struct PrunedModel<'a> {
    /// The source model's folder (its tokenizer files are copied).
    source_dir: &'a Path,
    config: &'a ModelConfig,
    tensors: &'a std::collections::BTreeMap<String, tch::Tensor>,
    report: serde_json::Value,
}

/// Stages everything in a hidden sibling folder of `out` (its marker says it is ours), then
/// renames it into place.
fn write_pruned(pruned: &PrunedModel, settings: &Settings, recipe: &Recipe, importance: &Importance, out: &Path) -> Result<()> {
    let container = create_staging(out)?;
    let staging = container.join(out.file_name().unwrap_or_else(|| "out".as_ref()));
    let result = (|| -> Result<()> {
        checkpoint::save_checkpoint(&staging, pruned.config, pruned.tensors, 5 << 30)?;
        checkpoint::copy_tokenizer_files(pruned.source_dir, &staging)?;
        if settings.scores.is_none() && settings.save_scores.is_none() {
            importance.save(&staging.join("importance.safetensors"))?;
        }
        let text = serde_json::to_string_pretty(&pruned.report)?;
        std::fs::write(staging.join("pruning.json"), text).context("writing pruning.json")?;
        write_resolved(recipe, &staging)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&container);
        return Err(e);
    }
    replace_dir(&staging, out)?;
    std::fs::remove_dir_all(&container).with_context(|| format!("removing {}", container.display()))?;
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

fn sibling(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| anyhow!("--out {} has no directory name", path.display()))?;
    let mut name = name.to_os_string();
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// Marker inside a staging folder: which command, process and machine made it.
const STAGING_MARKER: &str = ".overfill-staging.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct StagingMarker {
    written_by: String,
    pid: u32,
    host: String,
}

/// `.NAME.tmp-` (the prefix of the staging folders of `--out NAME`) and the folder holding them.
fn staging_prefix(out: &Path) -> Result<(PathBuf, String)> {
    let name = out.file_name().ok_or_else(|| anyhow!("--out {} has no directory name", out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((parent.to_path_buf(), format!(".{}.tmp-", name.to_string_lossy())))
}

/// A new hidden staging folder `.NAME.tmp-PID` next to `out`, marked as ours. The output is
/// assembled in `<staging>/NAME` (the checkpoint writer's own temporary files stay inside too).
fn create_staging(out: &Path) -> Result<PathBuf> {
    let (parent, prefix) = staging_prefix(out)?;
    let container = parent.join(format!("{prefix}{}", std::process::id()));
    if container.exists() {
        std::fs::remove_dir_all(&container).with_context(|| format!("removing stale {}", container.display()))?;
    }
    std::fs::create_dir_all(&container).with_context(|| format!("creating {}", container.display()))?;
    let marker = StagingMarker { written_by: "calibrate-prune".into(), pid: std::process::id(), host: host_name() };
    std::fs::write(container.join(STAGING_MARKER), serde_json::to_string(&marker)?)
        .with_context(|| format!("writing {}", container.join(STAGING_MARKER).display()))?;
    Ok(container)
}

/// Remove staging folders of `out` left by a calibrate-prune run that was killed or ran out of
/// disk: only those whose marker says this command made them on this machine, in a process that
/// is no longer running. Anything else is left alone.
fn remove_stale_staging(out: &Path) -> Result<()> {
    let (parent, prefix) = staging_prefix(out)?;
    let Ok(entries) = std::fs::read_dir(&parent) else { return Ok(()) };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = entry.path();
        let marker: Option<StagingMarker> =
            std::fs::read_to_string(path.join(STAGING_MARKER)).ok().and_then(|text| serde_json::from_str(&text).ok());
        let Some(marker) = marker else { continue };
        if marker.written_by != "calibrate-prune" || marker.host != host_name() || process_running(marker.pid) {
            continue;
        }
        eprintln!("removing {}, left by an interrupted calibrate-prune run (pid {})", path.display(), marker.pid);
        std::fs::remove_dir_all(&path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    Ok(())
}

/// Whether process `pid` is running (Linux `/proc`); elsewhere every process counts as running,
/// so nothing is removed.
fn process_running(pid: u32) -> bool {
    if pid == std::process::id() {
        // A folder of ours from before this process started: an earlier process with our id.
        return false;
    }
    !Path::new("/proc/self").exists() || Path::new("/proc").join(pid.to_string()).exists()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// `--out` must not be the model folder being read, or a folder holding it: replacing the output
/// would delete the model.
fn refuse_out_over_model(model_dir: &Path, out: &Path) -> Result<()> {
    let (Ok(model), Ok(out_abs)) = (model_dir.canonicalize(), out.canonicalize()) else {
        // A folder that does not exist yet holds no model.
        return Ok(());
    };
    if model.starts_with(&out_abs) {
        bail!(
            "--out {} would replace the model being pruned ({}); refusing (choose another output folder)",
            out.display(),
            model_dir.display()
        );
    }
    Ok(())
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
