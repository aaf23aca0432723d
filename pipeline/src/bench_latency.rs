//! `overfill bench-latency`: the paper's latency study (Figures 3–5) for three systems:
//! `full` (the full model prefills and decodes), `pruned` (the pruned model alone) and
//! `overfill` (full-model prefill, pruned-model decode over its cache):
//! latency vs generation length (prompt 128, batch 4), vs prompt length (generation 128,
//! batch 4; prefill and decode as stacked bars) and vs batch size (128/128).
//!
//! Models come from real configs with random weights (no checkpoint needed) or from
//! checkpoints, on CUDA or CPU. Each point is `--warmup` untimed runs and `--runs` timed runs
//! (greedy, no stop ids, so every run generates exactly the generation length); mean and
//! standard deviation go to `latency.csv`, the figures to PNG files. Decode tokens/s are set
//! against the memory-bandwidth ceiling measured in the same run: weight bytes a decode step
//! reads ÷ the measured device copy bandwidth.
//!
//! `--speculative 2,4,8` adds one system per draft length: lossless two-stage decoding (the
//! pruned model drafts, the full model verifies; its output is the full model's), with the
//! acceptance rate in the CSV's last column and the figures.
mod measure;
pub(crate) mod plots;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overfill_model::checkpoint::{dtype_name, parse_device, parse_dtype, resolve_model_dir};
use overfill_model::config::ModelConfig;
use overfill_model::train::check_compatible;
use overfill_model::transformer::Transformer;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use measure::{copy_bandwidth, decode_weight_bytes, measure_points, Point, Row, Stats, System, Timing};

#[derive(clap::Args)]
// A flag given twice takes the last value (`just bench-latency --runs 10` overrides the recipe's).
#[command(args_override_self = true)]
pub struct Args {
    /// Full model from a config.json, with random weights.
    #[arg(long, value_name = "FILE", required_unless_present_any = ["model", "replot"], conflicts_with = "model")]
    pub model_config: Option<PathBuf>,
    /// Full model from a checkpoint directory (or a hub id in the local HF cache).
    #[arg(long, value_name = "DIR")]
    pub model: Option<String>,
    /// Pruned model from a checkpoint directory.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["decoder_config", "hidden_size", "intermediate_size"])]
    pub decoder: Option<String>,
    /// Pruned model from a config.json, with random weights.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["hidden_size", "intermediate_size"])]
    pub decoder_config: Option<PathBuf>,
    /// Pruned model = the full model's config with this hidden size (default: half).
    #[arg(long)]
    pub hidden_size: Option<usize>,
    /// Pruned model = the full model's config with this intermediate size (default: half).
    #[arg(long)]
    pub intermediate_size: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Which figures: any of gen, prompt, batch (comma-separated).
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "gen,prompt,batch")]
    pub sweeps: Vec<String>,
    /// Generation lengths of the generation-length sweep (Figure 3).
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "32,64,128,256,512")]
    pub gen_lengths: Vec<usize>,
    /// Prompt lengths of the prompt-length sweep (Figure 4).
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "128,256,512,1024,2048")]
    pub prompt_lengths: Vec<usize>,
    /// Batch sizes of the batch-size sweep (Figure 5).
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "1,2,4,8,16")]
    pub batch_sizes: Vec<usize>,
    /// Prompt length where it is held fixed.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Generation length where it is held fixed.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Batch size where it is held fixed.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Untimed runs before each point.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs per point.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Also measure lossless two-stage decoding with these draft lengths (e.g. 2,4,8): the pruned
    /// model drafts K tokens over the full model's cache and the full model verifies them
    /// (`generate --speculative K`), one `speculative-kK` system each, with its acceptance rate.
    /// With random weights the drafts rarely agree: give --model and --decoder for real numbers.
    #[arg(long, value_delimiter = ',', value_name = "K,..")]
    pub speculative: Vec<usize>,
    /// Seed of the random weights and prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Output folder: latency.csv, summary.json and the PNG figures.
    #[arg(long, default_value = "work/bench-latency")]
    pub out: PathBuf,
    /// Redraw the figures of an earlier run from DIR/latency.csv and DIR/summary.json (measures
    /// nothing; writes the PNGs into DIR).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "model_config"])]
    pub replot: Option<PathBuf>,
}

fn load_models(args: &Args, device: Device, dtype: Kind) -> Result<(Transformer, Transformer)> {
    let full = match (&args.model, &args.model_config) {
        (Some(dir), _) => {
            let dir = resolve_model_dir(dir)?;
            Transformer::load(&dir, device, dtype)
                .with_context(|| format!("loading model {}", dir.display()))?
        }
        (None, Some(path)) => {
            random_model(ModelConfig::from_file(path)?, args.seed, device, dtype)?
        }
        (None, None) => bail!("give --model-config FILE or --model DIR"),
    };
    let pruned = if let Some(dir) = &args.decoder {
        let dir = resolve_model_dir(dir)?;
        check_compatible(
            &full.config,
            &overfill_model::checkpoint::load_config(&dir)?,
        )
        .with_context(|| format!("--decoder {}", dir.display()))?;
        Transformer::load(&dir, device, dtype)
            .with_context(|| format!("loading decoder {}", dir.display()))?
    } else {
        let config = match &args.decoder_config {
            Some(path) => ModelConfig::from_file(path)?,
            None => {
                let mut config = full.config.clone();
                config.hidden_size = args.hidden_size.unwrap_or(full.config.hidden_size / 2);
                config.intermediate_size = args
                    .intermediate_size
                    .unwrap_or(full.config.intermediate_size / 2);
                if config.hidden_size == 0 || config.intermediate_size == 0 {
                    bail!("the pruned model's hidden and intermediate sizes must be > 0");
                }
                config
            }
        };
        check_compatible(&full.config, &config).context("the pruned model")?;
        random_model(config, args.seed + 1, device, dtype)?
    };
    Ok((full, pruned))
}

/// Random weights made directly on the device in the compute dtype (timing does not depend on
/// the values; an 8B model never passes through host memory): matrices ~ N(0, 0.02²), norms 1,
/// biases 0.
fn random_model(
    config: ModelConfig,
    seed: i64,
    device: Device,
    dtype: Kind,
) -> Result<Transformer> {
    tch::manual_seed(seed);
    let _guard = tch::no_grad_guard();
    let mut tensors = std::collections::BTreeMap::new();
    for (name, shape) in config.parameter_shapes() {
        let options = (dtype, device);
        let t = if name.ends_with("norm.weight") {
            Tensor::f_ones(shape.as_slice(), options)
        } else if name.ends_with(".bias") {
            Tensor::f_zeros(shape.as_slice(), options)
        } else {
            Tensor::f_randn(shape.as_slice(), options).map(|t| t * 0.02)
        }
        .with_context(|| format!("allocating {name} {shape:?} on {device:?}"))?;
        tensors.insert(name, t);
    }
    Transformer::from_tensors(config, tensors)
}

pub fn run(args: Args) -> Result<()> {
    if let Some(dir) = &args.replot {
        return replot(dir);
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref().unwrap_or(if device.is_cuda() {
        "bf16"
    } else {
        "f32"
    }))?;
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    check_args(&args)?;
    let points = sweep_points(&args);
    let (full, pruned) = load_models(&args, device, dtype)?;
    let longest = points.iter().map(|p| p.prompt_len + p.gen_len).max().unwrap_or(0);
    if longest > full.config.max_position_embeddings {
        eprintln!(
            "warning: prompt + generation of up to {longest} tokens passes max_position_embeddings {} (timing is still meaningful)",
            full.config.max_position_embeddings
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let bandwidth = copy_bandwidth(device).context("measuring copy bandwidth")?;
    let full_bytes = decode_weight_bytes(&full);
    let pruned_bytes = decode_weight_bytes(&pruned);
    eprintln!(
        "{} {}: full {:.1}M params ({:.0} MB read per decode step), pruned {:.1}M ({:.0} MB); copy bandwidth {:.1} GB/s",
        match device {
            Device::Cuda(n) => format!("cuda:{n}"),
            _ => "cpu".into(),
        },
        dtype_name(dtype),
        full.config.param_count() as f64 / 1e6,
        full_bytes as f64 / 1e6,
        pruned.config.param_count() as f64 / 1e6,
        pruned_bytes as f64 / 1e6,
        bandwidth / 1e9
    );
    let mut systems = vec![
        System { name: "full".into(), prefill: &full, decode: &full, speculative: None, decode_bytes: full_bytes },
        System { name: "pruned".into(), prefill: &pruned, decode: &pruned, speculative: None, decode_bytes: pruned_bytes },
        System { name: "overfill".into(), prefill: &full, decode: &pruned, speculative: None, decode_bytes: pruned_bytes },
    ];
    // A verification reads the full model's weights once for K drafts of the pruned model: its
    // ceiling is taken per round, K pruned steps + one full pass for at most K + 1 tokens.
    for &k in &args.speculative {
        let round_bytes = k as u64 * pruned_bytes + full_bytes;
        systems.push(System {
            name: format!("speculative-k{k}"),
            prefill: &full,
            decode: &pruned,
            speculative: Some(k),
            decode_bytes: round_bytes / (k as u64 + 1),
        });
    }
    let timing = Timing { vocab_size: full.config.vocab_size, seed: args.seed, warmup: args.warmup, runs: args.runs, bandwidth };
    let rows = measure_points(&points, &systems, &timing)?;

    write_csv(&args.out.join("latency.csv"), &rows)?;
    let models = describe(&full, &pruned, device, dtype);
    plots::draw_all(&args.out, &rows, &models)?;
    let mut summary = summarize(
        &args,
        &rows,
        bandwidth,
        full_bytes,
        pruned_bytes,
        device,
        dtype,
    );
    summary["models"] = json!(models);
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .with_context(|| format!("cannot write {}", args.out.join("summary.json").display()))?;
    print_table(&rows, bandwidth);
    eprintln!(
        "wrote {}/latency.csv, summary.json and the figures",
        args.out.display()
    );
    Ok(())
}

/// Counts, sweeps and lengths that cannot be measured.
fn check_args(args: &Args) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    for sweep in &args.sweeps {
        if !["gen", "prompt", "batch"].contains(&sweep.as_str()) {
            bail!("unknown sweep {sweep:?} (gen, prompt, batch)");
        }
    }
    let lists = [
        ("--gen-lengths", &args.gen_lengths),
        ("--prompt-lengths", &args.prompt_lengths),
        ("--batch-sizes", &args.batch_sizes),
    ];
    for (flag, list) in lists {
        if list.is_empty() || list.contains(&0) {
            bail!("{flag} must list numbers > 0");
        }
    }
    if args.prompt_len == 0 || args.gen_len == 0 || args.batch == 0 {
        bail!("--prompt-len, --gen-len and --batch must be > 0");
    }
    if args.speculative.contains(&0) {
        bail!("--speculative must list draft lengths > 0");
    }
    Ok(())
}

/// The points of the sweeps, in figure order.
fn sweep_points(args: &Args) -> Vec<Point> {
    let mut points = Vec::new();
    for sweep in &args.sweeps {
        match sweep.as_str() {
            "gen" => points.extend(
                args.gen_lengths
                    .iter()
                    .map(|&g| Point { sweep: "gen", batch: args.batch, prompt_len: args.prompt_len, gen_len: g }),
            ),
            "prompt" => points.extend(
                args.prompt_lengths
                    .iter()
                    .map(|&p| Point { sweep: "prompt", batch: args.batch, prompt_len: p, gen_len: args.gen_len }),
            ),
            _ => points.extend(
                args.batch_sizes
                    .iter()
                    .map(|&b| Point { sweep: "batch", batch: b, prompt_len: args.prompt_len, gen_len: args.gen_len }),
            ),
        }
    }
    points
}

/// Redraws the figures from an earlier run's latency.csv (and the models line of summary.json).
fn replot(dir: &Path) -> Result<()> {
    let csv = dir.join("latency.csv");
    let text =
        std::fs::read_to_string(&csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let summary: serde_json::Value = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let models = summary["models"].as_str().unwrap_or("").to_string();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let bad = || anyhow::anyhow!("{} line {}: not a latency.csv row", csv.display(), i + 1);
        let f: Vec<&str> = line.split(',').collect();
        // 13 columns before --speculative existed, 14 since (acceptance_rate, empty but for
        // speculative systems).
        if f.len() != 13 && f.len() != 14 {
            return Err(bad());
        }
        let name = |s: &str, names: &[&'static str]| {
            names.iter().copied().find(|n| *n == s).ok_or_else(bad)
        };
        let system = match f[1] {
            "full" | "pruned" | "overfill" => f[1].to_string(),
            s if s.strip_prefix("speculative-k").is_some_and(|k| k.parse::<usize>().is_ok()) => s.to_string(),
            _ => return Err(bad()),
        };
        let acceptance_rate = match f.get(13) {
            Some(v) if !v.is_empty() => Some(v.parse::<f64>().map_err(|_| bad())?),
            _ => None,
        };
        let num = |k: usize| f[k].parse::<f64>().map_err(|_| bad());
        let int = |k: usize| f[k].parse::<usize>().map_err(|_| bad());
        rows.push(Row {
            sweep: name(f[0], &["gen", "prompt", "batch"])?,
            system,
            batch: int(2)?,
            prompt_len: int(3)?,
            gen_len: int(4)?,
            prefill: Stats {
                mean: num(5)?,
                std: num(6)?,
            },
            decode: Stats {
                mean: num(7)?,
                std: num(8)?,
            },
            total: Stats {
                mean: num(9)?,
                std: num(10)?,
            },
            decode_tokens_per_second: num(11)?,
            ceiling_tokens_per_second: num(12)?,
            acceptance_rate,
        });
    }
    plots::draw_all(dir, &rows, &models)?;
    eprintln!("redrew the figures in {}", dir.display());
    Ok(())
}

/// A subtitle for the figures: shapes, dtype and device.
fn describe(full: &Transformer, pruned: &Transformer, device: Device, dtype: Kind) -> String {
    format!(
        "full D={} I={} ({:.1}M params) / pruned D={} I={} ({:.1}M), {} layers, {} on {}",
        full.config.hidden_size,
        full.config.intermediate_size,
        full.config.param_count() as f64 / 1e6,
        pruned.config.hidden_size,
        pruned.config.intermediate_size,
        pruned.config.param_count() as f64 / 1e6,
        full.config.num_hidden_layers,
        dtype_name(dtype),
        if device.is_cuda() { "CUDA" } else { "CPU" }
    )
}

fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut text = String::from(
        "sweep,system,batch,prompt_len,gen_len,prefill_mean_s,prefill_std_s,decode_mean_s,decode_std_s,total_mean_s,total_std_s,decode_tokens_per_s,ceiling_tokens_per_s,acceptance_rate\n",
    );
    for r in rows {
        text.push_str(&format!(
            "{},{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.2},{:.2},{}\n",
            r.sweep,
            r.system,
            r.batch,
            r.prompt_len,
            r.gen_len,
            r.prefill.mean,
            r.prefill.std,
            r.decode.mean,
            r.decode.std,
            r.total.mean,
            r.total.std,
            r.decode_tokens_per_second,
            r.ceiling_tokens_per_second,
            r.acceptance_rate.map_or(String::new(), |a| format!("{a:.4}"))
        ));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The three systems at one point, if measured.
fn at<'a>(
    rows: &'a [Row],
    batch: usize,
    prompt_len: usize,
    gen_len: usize,
    system: &str,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.system == system && r.batch == batch && r.prompt_len == prompt_len && r.gen_len == gen_len
    })
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    args: &Args,
    rows: &[Row],
    bandwidth: f64,
    full_bytes: u64,
    pruned_bytes: u64,
    device: Device,
    dtype: Kind,
) -> serde_json::Value {
    // The paper's headline comparisons where the points were measured.
    let ratios = |batch: usize| {
        let get = |s| at(rows, batch, args.prompt_len, args.gen_len, s);
        match (get("full"), get("pruned"), get("overfill")) {
            (Some(f), Some(p), Some(o)) => json!({
                "batch": batch,
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "overfill_decode_tokens_per_s_over_pruned": o.decode_tokens_per_second / p.decode_tokens_per_second,
                "overfill_total_over_full": o.total.mean / f.total.mean,
                "pruned_total_over_full": p.total.mean / f.total.mean,
            }),
            _ => serde_json::Value::Null,
        }
    };
    json!({
        "device": match device { Device::Cuda(n) => format!("cuda:{n}"), _ => "cpu".into() },
        "dtype": dtype_name(dtype),
        "warmup": args.warmup,
        "runs": args.runs,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "decode_weight_bytes": {"full": full_bytes, "pruned": pruned_bytes},
        "batch_1": ratios(1),
        "batch_default": ratios(args.batch),
        "speculative": speculative_summary(args, rows),
    })
}

/// Per draft length at the fixed point (batch 1 and the default batch): acceptance and decode
/// time over the full model's.
fn speculative_summary(args: &Args, rows: &[Row]) -> serde_json::Value {
    let mut out = Vec::new();
    let batches = if args.batch == 1 { vec![1] } else { vec![1, args.batch] };
    for batch in batches {
        let Some(full) = at(rows, batch, args.prompt_len, args.gen_len, "full") else { continue };
        for &k in &args.speculative {
            if let Some(r) = at(rows, batch, args.prompt_len, args.gen_len, &format!("speculative-k{k}")) {
                out.push(json!({
                    "draft_len": k,
                    "batch": batch,
                    "acceptance_rate": r.acceptance_rate,
                    "decode_seconds_over_full": r.decode.mean / full.decode.mean,
                }));
            }
        }
    }
    json!(out)
}

fn print_table(rows: &[Row], bandwidth: f64) {
    println!(
        "{:<7} {:<16} {:>5} {:>6} {:>5} {:>16} {:>16} {:>16} {:>10} {:>10} {:>6} {:>7}",
        "sweep",
        "system",
        "batch",
        "prompt",
        "gen",
        "prefill ms",
        "decode ms",
        "total ms",
        "dec tok/s",
        "ceil tok/s",
        "%ceil",
        "accept"
    );
    for r in rows {
        let ms = |s: Stats| format!("{:.1}±{:.1}", s.mean * 1e3, s.std * 1e3);
        println!(
            "{:<7} {:<16} {:>5} {:>6} {:>5} {:>16} {:>16} {:>16} {:>10.1} {:>10.1} {:>5.0}% {:>7}",
            r.sweep,
            r.system,
            r.batch,
            r.prompt_len,
            r.gen_len,
            ms(r.prefill),
            ms(r.decode),
            ms(r.total),
            r.decode_tokens_per_second,
            r.ceiling_tokens_per_second,
            100.0 * r.decode_tokens_per_second / r.ceiling_tokens_per_second,
            r.acceptance_rate.map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a))
        );
    }
    println!(
        "ceiling = batch × copy bandwidth ({:.1} GB/s) ÷ weight bytes per decode step",
        bandwidth / 1e9
    );
}
