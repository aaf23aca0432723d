//! `overfill generate`: generation with one model, or two-stage (OverFill) generation with
//! `--decoder`: the full model prefills the prompt and chooses the first token, the decoder
//! produces every later token from the full model's KV cache.
//!
//! Prompts: `--prompt TEXT` rendered with the chat template and the generation prompt exactly
//! as preprocess renders a training context (`--system`, `--template`; `--raw` tokenizes the
//! text as it is), `--messages FILE` (a JSON list of {role, content}), `--prompt-ids`, or
//! `--input JSONL` (one prompt per line, generated together as one batch).
//!
//! Output: a single text prompt streams its text to stdout; `--input` prints one JSON object per
//! row; `--json` prints one JSON object last on stdout with the token ids, text and timings.
//! `--logits FILE` writes the prompt's logits (safetensors, key `logits`, [prompt_len, vocab]).
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use overfill_data::conversation::{Message, Role};
use overfill_data::template::{ChatTemplate, TemplateSpec};
use overfill_data::tokenize::{
    check_ids_in_vocab, load_tokenizer, vocab_overflow_warning, SplitTokenizer, Tokenizer,
    TokenizerConfig,
};
use overfill_model::checkpoint::{
    dtype_name, load_config, parse_device, parse_dtype, resolve_model_dir,
};
use overfill_model::config::ModelConfig;
use overfill_model::generate::{eos_and_end_of_turn, generate, DecodeOptions, GenerateOptions, GenerationOutput};
use overfill_model::sampling::Sampling;
use overfill_model::speculative::SpeculativeStats;
use overfill_model::train::check_compatible;
use overfill_model::transformer::Transformer;
use serde_json::{json, Value};
use tch::Tensor;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("prompt_source").required(true).args(["prompt", "prompt_ids", "messages", "input"])))]
pub struct Args {
    /// Checkpoint directory (config.json + safetensors) or a hub id in the local HF cache. With
    /// --decoder it is the full model, which prefills the prompt.
    #[arg(long)]
    pub model: String,
    /// Two-stage generation: this (pruned) model decodes every token after the first from the
    /// full model's cache. It must agree with --model on layers, heads, KV heads, head_dim, rope
    /// and vocabulary.
    #[arg(long, value_name = "DIR")]
    pub decoder: Option<String>,
    /// Prompt text: one user turn rendered with the chat template and the generation prompt
    /// (as preprocess renders training contexts), tokenized with the model's tokenizer.json.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A system turn before the --prompt user turn.
    #[arg(long, requires = "prompt", conflicts_with = "raw")]
    pub system: Option<String>,
    /// Tokenize --prompt as it is (special tokens added by the tokenizer), without the chat
    /// template.
    #[arg(long)]
    pub raw: bool,
    /// A JSON file with a list of {"role", "content"} turns, rendered with the chat template and
    /// the generation prompt.
    #[arg(long, value_name = "FILE")]
    pub messages: Option<PathBuf>,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
    /// Many prompts, generated as one batch: a JSONL file, one object per line with "prompt"
    /// (text, optional "system"), "messages" or "prompt_ids".
    #[arg(long, value_name = "JSONL")]
    pub input: Option<PathBuf>,
    /// Chat template: auto (the model's own, as transformers' apply_chat_template; llama3 when
    /// its tokenizer has none), llama3 (the paper's), chatml, model or a Jinja file. Use the
    /// recipe's.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Tokens to generate at most per prompt (stops earlier at a stop id).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample from the K most likely tokens only (top-k 1 is greedy).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler's own generator (same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Token ids that end a row, comma-separated, or "none". Default: the model's eos ids
    /// (generation_config.json) and the chat template's end-of-turn token.
    #[arg(long, value_name = "IDS")]
    pub stop_ids: Option<String>,
    /// With --decoder: after the decoder has written K cache slots, the full model re-runs those
    /// tokens (replacing their K/V) and chooses the next token.
    #[arg(long, value_name = "K", requires = "decoder")]
    pub refresh_every: Option<usize>,
    /// With --decoder: lossless two-stage decoding. The decoder drafts up to K tokens over the
    /// full model's cache, the full model verifies them in one forward pass and keeps those it
    /// agrees with: the output is the full model's own (greedy: token for token). Prints the
    /// acceptance statistics.
    #[arg(long, value_name = "K", requires = "decoder", conflicts_with_all = ["refresh_every", "logits"])]
    pub speculative: Option<usize>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object last on stdout (token_ids, text, timings) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the prompt's logits to FILE (safetensors, key "logits", [prompt_len, vocab] f32).
    #[arg(long, value_name = "FILE")]
    pub logits: Option<PathBuf>,
    /// Refuse, instead of warning, a prompt plus --max-new-tokens longer than the model's
    /// max_position_embeddings (a prompt alone longer than it is always refused).
    #[arg(long)]
    pub strict: bool,
}

fn parse_ids(s: &str, flag: &str) -> Result<Vec<i64>> {
    let ids: Vec<i64> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<i64>()
                .map_err(|_| anyhow!("{flag}: {p:?} is not an integer token id"))
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("{flag} is empty");
    }
    Ok(ids)
}

/// RoPE positions past `max_position_embeddings` are outside what the model was trained on: the
/// output degrades without any error. A prompt that does not fit is refused (it is the user's
/// input, and prefilling it is the expensive part); generation that would run past the limit is
/// warned about, or refused with --strict.
fn check_positions(
    prompt_len: usize,
    max_new_tokens: usize,
    max_positions: usize,
    strict: bool,
) -> Result<()> {
    if prompt_len > max_positions {
        bail!("the prompt has {prompt_len} tokens, more than the model's max_position_embeddings {max_positions}");
    }
    let problem = if prompt_len + max_new_tokens > max_positions {
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

/// The model's tokenizer with the chat template bound to it, loaded only when a prompt is text.
struct TextCodec {
    tokenizer: Tokenizer,
    /// `None` with --raw: text is tokenized as it is.
    chat: Option<(ChatTemplate, SplitTokenizer)>,
}

impl TextCodec {
    fn load(model_dir: &Path, config: &ModelConfig, args: &Args) -> Result<TextCodec> {
        let path = model_dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "a text prompt needs {} (or pass --prompt-ids)",
                path.display()
            );
        }
        let tokenizer = load_tokenizer(&path)?;
        if let Some(warning) = vocab_overflow_warning(&tokenizer, config.vocab_size, &path) {
            eprintln!("{warning}");
        }
        let chat = if args.raw {
            None
        } else {
            let tokenizer_config = model_dir.join("tokenizer_config.json");
            let tokenizer_config = TokenizerConfig::load(
                tokenizer_config
                    .is_file()
                    .then_some(tokenizer_config.as_path()),
            )?;
            let template = ChatTemplate::from_spec(
                &TemplateSpec::parse(&args.template),
                tokenizer_config.template_tokens(),
                tokenizer_config.chat_template.as_deref(),
            )?;
            let split = SplitTokenizer::new(tokenizer.clone(), &template).with_context(|| {
                format!("chat template {:?} with {}", args.template, path.display())
            })?;
            Some((template, split))
        };
        Ok(TextCodec { tokenizer, chat })
    }

    /// The end-of-turn id of the template (a stop id by default).
    fn end_of_turn_id(&self) -> Option<i64> {
        self.chat
            .as_ref()
            .map(|(_, split)| split.end_of_turn_id as i64)
    }

    /// Token ids of a conversation rendered with the generation prompt (no special tokens
    /// added: the template writes BOS), as preprocess tokenizes a context.
    fn encode_messages(&self, messages: &[Message], what: &str, vocab: usize) -> Result<Vec<i64>> {
        let Some((template, split)) = &self.chat else {
            bail!("{what}: messages need the chat template (drop --raw)");
        };
        if messages.is_empty() {
            bail!("{what} has no messages");
        }
        let text = template.render(messages, true)?;
        let ids = split
            .encode(&text)
            .map_err(|e| anyhow!("cannot tokenize {what}: {e:?}"))?;
        self.checked(ids, what, vocab)
    }

    /// `--prompt` text: one user turn (after an optional system turn), or the text as it is.
    fn encode_prompt(
        &self,
        text: &str,
        system: Option<&str>,
        what: &str,
        vocab: usize,
    ) -> Result<Vec<i64>> {
        if text.trim().is_empty() {
            bail!("{what} is empty");
        }
        if self.chat.is_none() {
            let encoding = self
                .tokenizer
                .encode(text, true)
                .map_err(|e| anyhow!("cannot tokenize {what}: {e}"))?;
            return self.checked(encoding.get_ids().to_vec(), what, vocab);
        }
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message::new(Role::System, system));
        }
        messages.push(Message::new(Role::User, text));
        self.encode_messages(&messages, what, vocab)
    }

    /// Text can encode to an id past the embedding table (a special token such as Llama 3.2's
    /// <|image|>): refuse it here, naming the token.
    fn checked(&self, ids: Vec<u32>, what: &str, vocab: usize) -> Result<Vec<i64>> {
        check_ids_in_vocab(&ids, vocab, Some(&self.tokenizer), what)?;
        Ok(ids.into_iter().map(i64::from).collect())
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| anyhow!("cannot decode the generated ids: {e}"))
    }
}

/// Ids given as numbers (--prompt-ids, "prompt_ids" of --input): each must be an id the model
/// can embed; named with its token when the model folder has a tokenizer.
fn check_given_ids(ids: &[i64], vocab: usize, model_dir: &Path, what: &str) -> Result<()> {
    if ids.is_empty() {
        bail!("{what} is empty");
    }
    if let Some(&id) = ids.iter().find(|&&id| id < 0 || id > u32::MAX as i64) {
        bail!("{what} has token id {id}, outside the model's vocabulary 0..{vocab}");
    }
    let as_u32: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
    if as_u32.iter().any(|&id| id as usize >= vocab) {
        let path = model_dir.join("tokenizer.json");
        let tok = path.is_file().then(|| load_tokenizer(&path).ok()).flatten();
        check_ids_in_vocab(&as_u32, vocab, tok.as_ref(), what)?;
    }
    Ok(())
}

/// A JSON list of {role, content}; role names as preprocess reads them (user/human, ...).
fn parse_messages(value: &Value, what: &str) -> Result<Vec<Message>> {
    let list = value.as_array().ok_or_else(|| {
        anyhow!("{what}: messages must be a JSON list of {{\"role\", \"content\"}}")
    })?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) => {
                    let role = Role::parse(role).ok_or_else(|| {
                        anyhow!("{what}: message {i} has unknown role {role:?} (system, user or assistant)")
                    })?;
                    Ok(Message::new(role, content))
                }
                _ => bail!("{what}: message {i} needs string fields \"role\" and \"content\""),
            }
        })
        .collect()
}

/// The prompts of this run as token ids.
fn read_prompts(
    args: &Args,
    model_dir: &Path,
    config: &ModelConfig,
    codec: Option<&TextCodec>,
) -> Result<Vec<Vec<i64>>> {
    let vocab = config.vocab_size;
    let need_codec = || codec.ok_or_else(|| anyhow!("internal: a text prompt without a tokenizer"));
    if let Some(text) = &args.prompt {
        return Ok(vec![need_codec()?.encode_prompt(
            text,
            args.system.as_deref(),
            "the prompt",
            vocab,
        )?]);
    }
    if let Some(path) = &args.messages {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --messages {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing --messages {} as JSON", path.display()))?;
        let what = format!("--messages {}", path.display());
        let messages = parse_messages(&value, &what)?;
        return Ok(vec![need_codec()?.encode_messages(&messages, &what, vocab)?]);
    }
    if let Some(ids) = &args.prompt_ids {
        let ids = parse_ids(ids, "--prompt-ids")?;
        check_given_ids(&ids, vocab, model_dir, "--prompt-ids")?;
        return Ok(vec![ids]);
    }
    let Some(path) = &args.input else {
        bail!("give --prompt, --messages, --prompt-ids or --input");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --input {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("{} line {}", path.display(), i + 1);
        let row: Value =
            serde_json::from_str(line).with_context(|| format!("{what}: not a JSON object"))?;
        let ids = if let Some(text) = row.get("prompt") {
            let text = text
                .as_str()
                .ok_or_else(|| anyhow!("{what}: \"prompt\" must be a string"))?;
            let system = row.get("system").and_then(Value::as_str);
            need_codec()?.encode_prompt(text, system, &format!("the prompt of {what}"), vocab)?
        } else if let Some(messages) = row.get("messages") {
            let messages = parse_messages(messages, &what)?;
            need_codec()?.encode_messages(&messages, &what, vocab)?
        } else if let Some(ids) = row.get("prompt_ids") {
            let ids: Vec<i64> = serde_json::from_value(ids.clone())
                .with_context(|| format!("{what}: \"prompt_ids\" must be a list of integers"))?;
            check_given_ids(&ids, vocab, model_dir, &format!("\"prompt_ids\" of {what}"))?;
            ids
        } else {
            bail!("{what}: needs \"prompt\", \"messages\" or \"prompt_ids\"");
        };
        prompts.push(ids);
    }
    if prompts.is_empty() {
        bail!("--input {} has no prompts", path.display());
    }
    Ok(prompts)
}

/// Whether the prompts are text (a tokenizer is needed to read them and to print text).
fn prompts_are_text(args: &Args) -> Result<bool> {
    if args.prompt.is_some() || args.messages.is_some() {
        return Ok(true);
    }
    let Some(path) = &args.input else {
        return Ok(false);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --input {}", path.display()))?;
    Ok(text.lines().any(|line| {
        serde_json::from_str::<Value>(line)
            .map(|v| v.get("prompt").is_some() || v.get("messages").is_some())
            .unwrap_or(false)
    }))
}

fn stop_ids(args: &Args, config: &ModelConfig, codec: Option<&TextCodec>) -> Result<Vec<i64>> {
    match args.stop_ids.as_deref().map(str::trim) {
        Some("none") => Ok(vec![]),
        Some(ids) => parse_ids(ids, "--stop-ids"),
        None => Ok(eos_and_end_of_turn(&config.eos_token_ids, codec.and_then(TextCodec::end_of_turn_id))),
    }
}

/// Prints a single prompt's text as it is generated: the decoded text of all ids so far, minus
/// what is already printed (so multi-token characters appear once complete).
struct Streamer<'a> {
    codec: &'a TextCodec,
    ids: Vec<i64>,
    printed: String,
}

impl Streamer<'_> {
    fn push(&mut self, id: i64) {
        self.ids.push(id);
        let Ok(text) = self.codec.decode(&self.ids) else {
            return;
        };
        if let Some(new) = text.strip_prefix(self.printed.as_str()) {
            if !new.is_empty() && !new.ends_with('\u{fffd}') {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(new.as_bytes());
                let _ = stdout.flush();
                self.printed = text;
            }
        }
    }
}

/// `--decoder` of the two-stage commands (generate, serve, eval-tasks): its folder, once its config
/// has been read and found able to continue from the full model's cache. Refuses an incompatible
/// decoder before any weights are read.
pub fn resolve_decoder(decoder: Option<&str>, full_config: &ModelConfig, full_dir: &Path) -> Result<Option<PathBuf>> {
    let Some(decoder) = decoder else { return Ok(None) };
    let decoder_dir = resolve_model_dir(decoder)?;
    let decoder_config = load_config(&decoder_dir)?;
    crate::init_model::warn_unread_keys(&decoder_config, &decoder_dir.join("config.json"));
    check_compatible(full_config, &decoder_config).with_context(|| {
        format!("--decoder {} cannot continue from --model {}", decoder_dir.display(), full_dir.display())
    })?;
    Ok(Some(decoder_dir))
}

pub fn run(args: Args) -> Result<()> {
    let dir = resolve_model_dir(&args.model)?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    // Malformed ids are reported before the model folder is read.
    if let Some(ids) = &args.prompt_ids {
        parse_ids(ids, "--prompt-ids")?;
    }
    let decode = DecodeOptions {
        sampling: Sampling::new(args.temperature, args.top_k, args.top_p, args.seed)?,
        refresh_every: args.refresh_every,
        speculative: args.speculative,
    };
    if args.refresh_every == Some(0) {
        bail!("--refresh-every must be at least 1");
    }
    if args.speculative == Some(0) {
        bail!("--speculative must be at least 1");
    }
    if decode.sampling == Sampling::Greedy && (args.top_k.is_some() || args.top_p < 1.0) {
        eprintln!("note: --temperature 0 decodes greedily; --top-k and --top-p apply with --temperature > 0");
    }
    let config = load_config(&dir)?;
    crate::init_model::warn_unread_keys(&config, &dir.join("config.json"));
    // Refuse an incompatible decoder before any weights are read.
    let decoder_dir = resolve_decoder(args.decoder.as_deref(), &config, &dir)?;
    let codec = if prompts_are_text(&args)? {
        Some(TextCodec::load(&dir, &config, &args)?)
    } else {
        None
    };
    let prompts = read_prompts(&args, &dir, &config, codec.as_ref())?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    check_positions(
        longest,
        args.max_new_tokens,
        config.max_position_embeddings,
        args.strict,
    )?;
    if args.logits.is_some() && prompts.len() > 1 {
        bail!(
            "--logits writes one prompt's logits; --input has {} prompts",
            prompts.len()
        );
    }
    let model = Transformer::load(&dir, device, dtype)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let decoder = match &decoder_dir {
        Some(d) => Some(
            Transformer::load(d, device, dtype)
                .with_context(|| format!("loading decoder {}", d.display()))?,
        ),
        None => None,
    };
    let mut options = GenerateOptions::for_model(&model, args.max_new_tokens);
    options.eos_token_ids = stop_ids(&args, &config, codec.as_ref())?;
    options.keep_prompt_logits = args.logits.is_some();

    // A single text prompt streams to the console (not with --json: stdout is one object).
    let stream = prompts.len() == 1 && !args.json && codec.is_some();
    let mut streamer = codec.as_ref().map(|codec| Streamer {
        codec,
        ids: vec![],
        printed: String::new(),
    });
    let mut on_token = |_row: usize, id: i64| {
        if let Some(s) = streamer.as_mut() {
            s.push(id);
        }
    };
    let output = generate(
        &model,
        decoder.as_ref().unwrap_or(&model),
        &prompts,
        &options,
        &decode,
        if stream { Some(&mut on_token) } else { None },
    )?;

    if let (Some(path), Some(logits)) = (&args.logits, &output.prompt_logits) {
        let logits: Tensor = logits.get(0).to_device(tch::Device::Cpu).contiguous();
        Tensor::write_safetensors(&[("logits", &logits)], path)
            .map_err(|e| anyhow!("cannot write logits to {}: {e}", path.display()))?;
    }
    // Text prompts get text back; ids given as numbers are answered with ids.
    let texts: Vec<Option<String>> = output
        .token_ids
        .iter()
        .map(|ids| codec.as_ref().map(|c| c.decode(ids)).transpose())
        .collect::<Result<_>>()?;
    report(&args, &prompts, &output, &texts, stream, dtype, device)
}

/// Prints the result: streamed text is finished with a newline, --input rows as JSON lines,
/// --json as one object last on stdout, timings on stderr.
fn report(
    args: &Args,
    prompts: &[Vec<i64>],
    output: &GenerationOutput,
    texts: &[Option<String>],
    streamed: bool,
    dtype: tch::Kind,
    device: tch::Device,
) -> Result<()> {
    let generated: usize = output.token_ids.iter().map(Vec::len).sum();
    let decode_tokens_per_second = if output.decode_seconds > 0.0 {
        (generated - output.token_ids.iter().filter(|t| !t.is_empty()).count()) as f64
            / output.decode_seconds
    } else {
        0.0
    };
    let batch = args.input.is_some();
    if batch {
        for (row, (ids, text)) in output.token_ids.iter().zip(texts).enumerate() {
            println!(
                "{}",
                json!({"row": row, "prompt_tokens": prompts[row].len(), "token_ids": ids, "text": text})
            );
        }
    }
    if args.json {
        let (token_ids, text, prompt_ids) = if batch {
            (json!(output.token_ids), json!(texts), json!(prompts))
        } else {
            (
                json!(output.token_ids[0]),
                json!(texts[0]),
                json!(prompts[0]),
            )
        };
        let mut out = json!({
            "token_ids": token_ids,
            "text": text,
            "prompt_ids": prompt_ids,
            "prompt_tokens": prompts.iter().map(Vec::len).sum::<usize>(),
            "generated_tokens": generated,
            "batch_size": prompts.len(),
            "prefill_seconds": output.prefill_seconds,
            "decode_seconds": output.decode_seconds,
            "decode_steps": output.decode_steps,
            "decode_seconds_per_token": output.decode_seconds_per_token(),
            "decode_tokens_per_second": decode_tokens_per_second,
            "refreshes": output.refreshes,
            "refresh_seconds": output.refresh_seconds,
            "two_stage": args.decoder.is_some(),
            "dtype": dtype_name(dtype),
            "device": device_name(device),
        });
        if let Some(stats) = &output.speculative {
            out["speculative"] = speculative_json(stats);
        }
        println!("{out}");
        return Ok(());
    }
    if streamed {
        println!();
    } else if !batch {
        match &texts[0] {
            Some(t) => println!("{t}"),
            _ => println!(
                "{}",
                output.token_ids[0]
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
    eprintln!(
        "{} prompt(s), {} prompt tokens, prefill {:.3} s; {generated} tokens generated, {:.2} ms/step decode{}",
        prompts.len(),
        prompts.iter().map(Vec::len).sum::<usize>(),
        output.prefill_seconds,
        output.decode_seconds_per_token() * 1e3,
        if output.refreshes > 0 {
            format!(", {} refreshes {:.3} s", output.refreshes, output.refresh_seconds)
        } else {
            String::new()
        }
    );
    if let Some(stats) = &output.speculative {
        eprintln!("{}", speculative_line(stats));
    }
    Ok(())
}

/// `--speculative`'s statistics in the `--json` objects of generate and eval-tasks.
pub fn speculative_json(stats: &SpeculativeStats) -> Value {
    json!({
        "draft_len": stats.draft_len,
        "verifications": stats.verifications,
        "proposed": stats.proposed,
        "accepted": stats.accepted,
        "acceptance_rate": stats.acceptance_rate(),
        "mean_accepted_per_verification": stats.mean_accepted_per_verification(),
        "draft_seconds": stats.draft_seconds,
        "verify_seconds": stats.verify_seconds,
    })
}

/// `--speculative`'s statistics as one line for stderr.
pub fn speculative_line(stats: &SpeculativeStats) -> String {
    format!(
        "speculative K={}: {}/{} drafts accepted ({:.1}%), {:.2} per verification; {} verifications {:.3} s, drafting {:.3} s",
        stats.draft_len,
        stats.accepted,
        stats.proposed,
        100.0 * stats.acceptance_rate(),
        stats.mean_accepted_per_verification(),
        stats.verifications,
        stats.verify_seconds,
        stats.draft_seconds
    )
}
