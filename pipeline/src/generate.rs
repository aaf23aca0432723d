//! `overfill generate`: greedy generation with one model (prefill + incremental decode).
//!
//! Prints the generated text (or ids) by default; `--json` prints one object with the
//! generated `token_ids` and timings; `--logits FILE` writes the prompt's logits
//! (safetensors, key `logits`, [prompt_len, vocab], f32).
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use overfill_data::tokenize::{check_ids_in_vocab, load_tokenizer, vocab_overflow_warning};
use overfill_model::checkpoint::{
    dtype_name, load_config, parse_device, parse_dtype, resolve_model_dir,
};
use overfill_model::generate::{greedy, GenerateOptions};
use overfill_model::transformer::Transformer;
use serde_json::json;
use tch::Tensor;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct Args {
    /// Checkpoint directory (config.json + safetensors) or a hub id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// Prompt text, tokenized with the model directory's tokenizer.json (special tokens added).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
    /// Tokens to generate at most (stops earlier at an eos token).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object (token_ids, timings) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the prompt's logits to FILE (safetensors, key "logits", [prompt_len, vocab] f32).
    #[arg(long, value_name = "FILE")]
    pub logits: Option<PathBuf>,
    /// Refuse, instead of warning, a prompt (plus --max-new-tokens) longer than the model's
    /// max_position_embeddings.
    #[arg(long)]
    pub strict: bool,
}

fn parse_ids(s: &str) -> Result<Vec<i64>> {
    let ids: Vec<i64> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<i64>()
                .map_err(|_| anyhow!("--prompt-ids: {p:?} is not an integer token id"))
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--prompt-ids is empty");
    }
    Ok(ids)
}

/// RoPE positions past `max_position_embeddings` are outside what the model was trained on:
/// the output degrades without any error, so say so (or refuse with --strict).
fn check_positions(
    prompt_len: usize,
    max_new_tokens: usize,
    max_positions: usize,
    strict: bool,
) -> Result<()> {
    let problem = if prompt_len > max_positions {
        format!("the prompt has {prompt_len} tokens, more than the model's max_position_embeddings {max_positions}")
    } else if prompt_len + max_new_tokens > max_positions {
        format!(
            "the prompt ({prompt_len} tokens) plus --max-new-tokens {max_new_tokens} runs past the model's max_position_embeddings {max_positions}"
        )
    } else {
        return Ok(());
    };
    if strict {
        bail!("{problem} (--strict)");
    }
    eprintln!("warning: {problem}; positions beyond it were never trained (--strict refuses this)");
    Ok(())
}

fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_string(),
    }
}

pub fn run(args: Args) -> Result<()> {
    let dir = resolve_model_dir(&args.model)?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    // Malformed ids are reported before the model folder is read.
    if let Some(ids) = &args.prompt_ids {
        parse_ids(ids)?;
    }
    let config = load_config(&dir)?;
    crate::init_model::warn_unread_keys(&config, &dir.join("config.json"));
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = match &args.prompt {
        Some(_) => {
            if !tokenizer_path.is_file() {
                bail!(
                    "--prompt needs {} (or pass --prompt-ids)",
                    tokenizer_path.display()
                );
            }
            let tokenizer = load_tokenizer(&tokenizer_path)?;
            if let Some(warning) =
                vocab_overflow_warning(&tokenizer, config.vocab_size, &tokenizer_path)
            {
                eprintln!("{warning}");
            }
            Some(tokenizer)
        }
        None => None,
    };
    let prompt_ids: Vec<i64> = match (&args.prompt, &args.prompt_ids, &tokenizer) {
        (Some(text), _, Some(tok)) => {
            let encoding = tok
                .encode(text.as_str(), true)
                .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?;
            // Text can encode to an id past the embedding table (a special token such as
            // Llama 3.2's <|image|>): refuse it here, naming the token.
            check_ids_in_vocab(
                encoding.get_ids(),
                config.vocab_size,
                Some(tok),
                "the prompt",
            )?;
            encoding.get_ids().iter().map(|&id| id as i64).collect()
        }
        (_, Some(ids), _) => {
            let ids = parse_ids(ids)?;
            if let Some(&id) = ids.iter().find(|&&id| id < 0 || id > u32::MAX as i64) {
                bail!(
                    "--prompt-ids has token id {id}, outside the model's vocabulary 0..{}",
                    config.vocab_size
                );
            }
            let as_u32: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
            if as_u32.iter().any(|&id| id as usize >= config.vocab_size) {
                // Name the token when the model folder has a tokenizer.
                let tok = tokenizer_path
                    .is_file()
                    .then(|| load_tokenizer(&tokenizer_path).ok())
                    .flatten();
                check_ids_in_vocab(&as_u32, config.vocab_size, tok.as_ref(), "--prompt-ids")?;
            }
            ids
        }
        _ => bail!("give --prompt or --prompt-ids"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    check_positions(
        prompt_ids.len(),
        args.max_new_tokens,
        config.max_position_embeddings,
        args.strict,
    )?;

    let model = Transformer::load(&dir, device, dtype)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let mut options = GenerateOptions::for_model(&model, args.max_new_tokens);
    options.keep_prompt_logits = args.logits.is_some();
    let output = greedy(&model, std::slice::from_ref(&prompt_ids), &options)?;
    let generated = &output.token_ids[0];

    if let (Some(path), Some(logits)) = (&args.logits, &output.prompt_logits) {
        let logits: Tensor = logits.get(0).to_device(tch::Device::Cpu).contiguous();
        Tensor::write_safetensors(&[("logits", &logits)], path)
            .map_err(|e| anyhow!("cannot write logits to {}: {e}", path.display()))?;
    }

    let text = match &tokenizer {
        Some(tok) => {
            let ids: Vec<u32> = generated.iter().map(|&id| id as u32).collect();
            Some(
                tok.decode(&ids, true)
                    .map_err(|e| anyhow!("cannot decode the generated ids: {e}"))?,
            )
        }
        None => None,
    };
    if args.json {
        let out = json!({
            "token_ids": generated,
            "text": text,
            "prompt_tokens": prompt_ids.len(),
            "generated_tokens": generated.len(),
            "prefill_seconds": output.prefill_seconds,
            "decode_seconds": output.decode_seconds,
            "decode_steps": output.decode_steps,
            "decode_seconds_per_token": output.decode_seconds_per_token(),
            "dtype": dtype_name(dtype),
            "device": device_name(device),
        });
        println!("{out}");
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!(
                "{}",
                generated
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
        eprintln!(
            "prompt {} tokens, prefill {:.3} s; {} tokens generated, {:.2} ms/token decode",
            prompt_ids.len(),
            output.prefill_seconds,
            generated.len(),
            output.decode_seconds_per_token() * 1e3
        );
    }
    Ok(())
}
