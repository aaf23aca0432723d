//! `overfill init-model`: a randomly initialised checkpoint in Hugging Face layout from a
//! config.json (matrices ~ N(0, std²), norms 1, biases 0), e.g. the tiny model of the demo.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use overfill_data::tokenize::vocab_overflow_warning;
use overfill_model::checkpoint::{copy_file_contents, dtype_name, parse_dtype, save_checkpoint};
use overfill_model::config::ModelConfig;
use overfill_model::transformer::random_tensors;

#[derive(clap::Args)]
pub struct Args {
    /// Model config (config.json of a llama or qwen2 model).
    #[arg(long)]
    pub config: PathBuf,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Standard deviation of the weight matrices.
    #[arg(long, default_value_t = 0.02)]
    pub std: f64,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A tokenizer.json (or a folder holding one, with tokenizer_config.json) to copy into the
    /// checkpoint so that `generate --prompt` works; its vocabulary must fit the config's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let config = ModelConfig::from_file(&args.config)?;
    warn_unread_keys(&config, &args.config);
    let dtype = parse_dtype(&args.dtype)?;
    if !(args.std > 0.0 && args.std.is_finite()) {
        bail!("--std must be a positive number, got {}", args.std);
    }
    let tokenizer_files = match &args.tokenizer {
        Some(path) => {
            let json = if path.is_dir() {
                path.join("tokenizer.json")
            } else {
                path.clone()
            };
            let tokenizer = overfill_data::tokenize::load_tokenizer(&json)?;
            // Real tokenizers sometimes carry extra special tokens past the model's vocabulary
            // (Llama 3.2's <|image|>): fine to ship, every command refuses text encoding to them.
            if let Some(warning) = vocab_overflow_warning(&tokenizer, config.vocab_size, &json) {
                eprintln!("{warning}");
            }
            let mut files = vec![json.clone()];
            let config_json = json.with_file_name("tokenizer_config.json");
            if config_json.is_file() {
                files.push(config_json);
            }
            files
        }
        None => vec![],
    };
    let tensors = random_tensors(&config, args.std, args.seed, tch::Device::Cpu, dtype)?;
    save_checkpoint(&args.out, &config, &tensors, 2 << 30)?;
    for file in tokenizer_files {
        let name = file
            .file_name()
            .context("tokenizer path has no file name")?;
        copy_file_contents(&file, &args.out.join(name))?;
    }
    eprintln!(
        "wrote {} ({} parameters, {} layers, hidden {}, {})",
        args.out.display(),
        config.param_count(),
        config.num_hidden_layers,
        config.hidden_size,
        dtype_name(dtype)
    );
    Ok(())
}

/// Keys of a config that nothing reads are kept in the saved config; say so, since a setting
/// the user relies on could be among them.
pub fn warn_unread_keys(config: &ModelConfig, path: &std::path::Path) {
    let unread = config.unread_keys();
    if !unread.is_empty() {
        eprintln!(
            "warning: {}: config keys not read by overfill (kept as they are): {}",
            path.display(),
            unread.join(", ")
        );
    }
}
