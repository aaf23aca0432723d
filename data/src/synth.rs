//! Synthetic instruction datasets in every input format, and a tiny byte-level BPE tokenizer
//! with the Llama-3 and ChatML special tokens: tests and the demo need neither real data nor
//! the real Llama tokenizer. Everything is deterministic given the seed.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::conversation::Role;
use crate::template::LLAMA3_TEMPLATE;

/// Output layouts of [`write_dataset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthFormat {
    /// OpenHermes-2.5: one JSON array, `conversations: [{from: system|human|gpt, value}]`.
    OpenHermes,
    /// The same rows, one per line.
    OpenHermesJsonl,
    /// Infinity-Instruct: Parquet with `id`, `conversations: list<struct<from, value>>`,
    /// `langdetect`, `label`, `source`.
    Infinity,
    /// Role/content mirrors: a JSON array with `messages: [{role, content}]`.
    Messages,
    MessagesJsonl,
    /// Role/content Parquet (`messages: list<struct<role, content>>`, `language`).
    MessagesParquet,
}

impl SynthFormat {
    pub fn parse(s: &str) -> Result<SynthFormat> {
        Ok(match s {
            "openhermes" => SynthFormat::OpenHermes,
            "openhermes-jsonl" => SynthFormat::OpenHermesJsonl,
            "infinity" => SynthFormat::Infinity,
            "messages" => SynthFormat::Messages,
            "messages-jsonl" => SynthFormat::MessagesJsonl,
            "messages-parquet" => SynthFormat::MessagesParquet,
            other => bail!("unknown synthetic format {other:?} (openhermes, openhermes-jsonl, infinity, messages, messages-jsonl, messages-parquet)"),
        })
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub rows: usize,
    pub seed: u64,
    /// Every `bad_every`-th row is deliberately malformed (bad JSON, missing field, wrong type,
    /// invalid UTF-8 in turn; a null conversation in Parquet). 0: none.
    pub bad_every: usize,
    /// Share of rows tagged with a non-English language (`de`).
    pub non_english_fraction: f64,
    /// Words per turn are drawn from 1..=max_words.
    pub max_words: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions { rows: 1000, seed: 0, bad_every: 0, non_english_fraction: 0.0, max_words: 40 }
    }
}

/// One generated conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthRow {
    /// `(role, content)`; system first when present, then alternating user/assistant, ending
    /// with an assistant turn.
    pub turns: Vec<(Role, String)>,
    pub language: String,
}

const WORDS: &[&str] = &[
    "the", "model", "data", "token", "cache", "prefill", "decode", "layer", "answer", "question", "why",
    "because", "and", "of", "to", "in", "is", "it", "that", "for", "with", "as", "on", "be", "at", "by",
    "this", "from", "or", "an", "42", "3.14", "2048", "(x)", "[1]", "a+b", "e.g.,", "don't", "it's", "we'll",
    "café", "naïve", "Ünïcödé", "日本語", "中文", "Привет", "مرحبا", "🙂", "🚀", "ß", "ﬁ", "—", "…", "\"quoted\"",
    "C++", "fn()", "x_1", "<tag>", "50%", "$5", "#hash", "@user",
];

fn sentence(rng: &mut ChaCha8Rng, max_words: usize) -> String {
    let n = rng.random_range(1..=max_words.max(1));
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            // Mostly single spaces, sometimes line breaks or double spaces (tokenizer edge cases).
            s.push_str(match rng.random_range(0..20) {
                0 => "\n",
                1 => "\n\n",
                2 => "  ",
                3 => ", ",
                _ => " ",
            });
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    if rng.random_range(0..2) == 0 {
        s.push('.');
    }
    // Whitespace that the template's `trim` must remove.
    match rng.random_range(0..8) {
        0 => format!("  {s}"),
        1 => format!("{s}\n"),
        2 => format!("\n\t{s} \u{3000}"),
        _ => s,
    }
}

/// Conversation `index` of the stream for `seed` (independent of other rows).
pub fn synth_row(seed: u64, index: u64, options: &SynthOptions) -> SynthRow {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    let mut turns = Vec::new();
    if rng.random_range(0..3) == 0 {
        turns.push((Role::System, sentence(&mut rng, 12)));
    }
    let exchanges = rng.random_range(1..=3);
    for _ in 0..exchanges {
        turns.push((Role::User, sentence(&mut rng, options.max_words)));
        turns.push((Role::Assistant, sentence(&mut rng, options.max_words)));
    }
    let language = if rng.random::<f64>() < options.non_english_fraction { "de" } else { "en" };
    SynthRow { turns, language: language.to_string() }
}

fn openhermes_role(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "human",
        Role::Assistant => "gpt",
    }
}

fn json_row(row: &SynthRow, index: u64, role_content: bool) -> serde_json::Value {
    if role_content {
        json!({
            "messages": row.turns.iter().map(|(r, c)| json!({"role": r.as_str(), "content": c})).collect::<Vec<_>>(),
            "language": row.language,
        })
    } else {
        json!({
            "conversations": row.turns.iter().map(|(r, c)| json!({"from": openhermes_role(*r), "value": c, "weight": null})).collect::<Vec<_>>(),
            "source": "synthetic",
            "category": "demo",
            "id": format!("row-{index}"),
            "langdetect": row.language,
        })
    }
}

/// The four kinds of malformed JSON rows, in turn.
fn bad_json_row(kind: usize) -> Vec<u8> {
    match kind % 4 {
        0 => br#"{"conversations": [{"from": "human", "value": "broken",, }]}"#.to_vec(),
        1 => br#"{"conversations": [{"from": "human"}, {"from": "gpt", "value": "no value above"}]}"#.to_vec(),
        2 => br#"{"conversations": "not a list"}"#.to_vec(),
        _ => {
            let mut v = br#"{"conversations": [{"from": "human", "value": "bad "#.to_vec();
            v.extend_from_slice(&[0xff, 0xfe]);
            v.extend_from_slice(br#" bytes"}, {"from": "gpt", "value": "ok"}]}"#);
            v
        }
    }
}

/// Write `options.rows` rows to `path`. Returns the number of malformed rows written.
/// JSON formats stream row by row, so very large files take little memory.
pub fn write_dataset(path: &Path, format: SynthFormat, options: &SynthOptions) -> Result<usize> {
    let is_bad = |i: usize| options.bad_every > 0 && i % options.bad_every == options.bad_every - 1;
    write_rows_with(path, format, options.rows, |i| {
        let row = synth_row(options.seed, i as u64, options);
        if is_bad(i) {
            RowOrBad::Bad(row.language)
        } else {
            RowOrBad::Row(row)
        }
    })
}

/// Write the given conversations to `path` in `format` (none malformed): the demo's task data
/// goes through the same writers as the random rows.
pub fn write_rows(path: &Path, format: SynthFormat, rows: &[SynthRow]) -> Result<()> {
    write_rows_with(path, format, rows.len(), |i| RowOrBad::Row(rows[i].clone()))?;
    Ok(())
}

/// One row to write, or a deliberately malformed one (its language still fills the column).
enum RowOrBad {
    Row(SynthRow),
    Bad(String),
}

/// Rows `0..rows` from `row_at` to `path`. Returns the number of malformed rows written.
fn write_rows_with(path: &Path, format: SynthFormat, rows: usize, row_at: impl Fn(usize) -> RowOrBad) -> Result<usize> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    match format {
        SynthFormat::Infinity | SynthFormat::MessagesParquet => write_parquet(path, format, rows, &row_at),
        _ => {
            let array = matches!(format, SynthFormat::OpenHermes | SynthFormat::Messages);
            let role_content = matches!(format, SynthFormat::Messages | SynthFormat::MessagesJsonl);
            let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let mut bad = 0;
            if array {
                out.write_all(b"[\n")?;
            }
            for i in 0..rows {
                if array && i > 0 {
                    out.write_all(b",\n")?;
                }
                match row_at(i) {
                    RowOrBad::Bad(_) => {
                        out.write_all(&bad_json_row(bad))?;
                        bad += 1;
                    }
                    RowOrBad::Row(row) => serde_json::to_writer(&mut out, &json_row(&row, i as u64, role_content))?,
                }
                if !array {
                    out.write_all(b"\n")?;
                }
            }
            if array {
                out.write_all(b"\n]\n")?;
            }
            out.flush()?;
            Ok(bad)
        }
    }
}

fn write_parquet(path: &Path, format: SynthFormat, rows: usize, row_at: &dyn Fn(usize) -> RowOrBad) -> Result<usize> {
    let (list_name, role_name, content_name, lang_name) = match format {
        SynthFormat::Infinity => ("conversations", "from", "value", "langdetect"),
        _ => ("messages", "role", "content", "language"),
    };
    let turn_fields = Fields::from(vec![Field::new(role_name, DataType::Utf8, true), Field::new(content_name, DataType::Utf8, true)]);
    let item = Arc::new(Field::new("item", DataType::Struct(turn_fields.clone()), true));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new(list_name, DataType::List(item.clone()), true),
        Field::new(lang_name, DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
    ]));
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), None)?;
    let mut bad = 0;
    for start in (0..rows).step_by(1000) {
        let end = (start + 1000).min(rows);
        let (mut roles, mut contents, mut offsets, mut valid, mut langs) = (Vec::new(), Vec::new(), vec![0i32], Vec::new(), Vec::new());
        for i in start..end {
            match row_at(i) {
                RowOrBad::Row(row) => {
                    for (r, c) in &row.turns {
                        roles.push(if format == SynthFormat::Infinity { openhermes_role(*r) } else { r.as_str() });
                        contents.push(c.clone());
                    }
                    valid.push(true);
                    langs.push(row.language);
                }
                RowOrBad::Bad(language) => {
                    bad += 1;
                    valid.push(false);
                    langs.push(language);
                }
            }
            offsets.push(roles.len() as i32);
        }
        let turns = StructArray::new(
            turn_fields.clone(),
            vec![Arc::new(StringArray::from(roles)) as ArrayRef, Arc::new(StringArray::from(contents)) as ArrayRef],
            None,
        );
        let lists = ListArray::new(item.clone(), OffsetBuffer::new(offsets.into()), Arc::new(turns), Some(valid.into()));
        let n = end - start;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(UInt64Array::from_iter_values((start as u64)..(end as u64))),
                Arc::new(lists),
                Arc::new(StringArray::from(langs)),
                Arc::new(StringArray::from(vec!["synthetic"; n])),
                Arc::new(StringArray::from(vec!["synth"; n])),
            ],
        )?;
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(bad)
}

/// The pre-tokenizer split pattern of Llama 3 (from its published `tokenizer.json`).
pub const LLAMA3_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens of the tiny tokenizer, in id order after the BPE vocabulary.
pub const TINY_SPECIAL_TOKENS: [&str; 8] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|finetune_right_pad_id|>",
];

/// GPT-2's reversible byte → printable character map (byte-level BPE's alphabet).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// Merges of the tiny tokenizer: a few frequent English pairs (in byte-level letters, `Ġ` is a
/// space).
const TINY_MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"), ("a", "t"),
    ("e", "n"), ("n", "d"), ("o", "r"), ("e", "s"), ("Ġ", "a"), ("Ġ", "s"), ("Ġ", "w"), ("Ġ", "o"),
    ("Ġ", "i"), ("Ġ", "c"), ("Ġ", "b"), ("Ġ", "m"), ("Ġ", "d"), ("Ġ", "f"), ("Ġ", "p"), ("Ġt", "he"),
    ("Ġ", "th"), ("t", "h"), ("i", "s"), ("i", "t"), ("a", "l"), ("a", "r"), ("s", "t"), ("t", "o"),
    ("n", "t"), ("in", "g"), ("o", "u"), ("l", "e"), ("c", "o"), ("d", "e"), ("Ġa", "n"), ("Ġan", "d"),
    ("Ġ", "model"), ("m", "o"), ("mo", "de"), ("mode", "l"), ("Ġ", "to"), ("Ġ", "in"), ("Ġ", "is"),
    ("Ġ", "it"), ("Ċ", "Ċ"), ("Ġ", "Ġ"),
];

/// Write `tokenizer.json` and `tokenizer_config.json` of a tiny byte-level BPE tokenizer
/// (256 byte tokens, a few merges, the Llama-3 and ChatML special tokens; vocabulary < 512) into
/// `dir`. Loads with the `tokenizers` crate, Python `tokenizers` and `transformers`. The config
/// carries the paper's Llama-3 template as `chat_template`.
pub fn write_tiny_tokenizer(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let alphabet = bytes_to_unicode();
    let mut vocab = serde_json::Map::new();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    let mut merges = Vec::new();
    for (a, b) in TINY_MERGES {
        // Multi-letter parts must already be tokens (earlier merges), or the merge is skipped.
        let merged = format!("{a}{b}");
        if tokens.contains(&merged) {
            continue;
        }
        let (a, b) = (a.to_string(), b.to_string());
        if !tokens.contains(&a) || !tokens.contains(&b) {
            continue;
        }
        merges.push(format!("{a} {b}"));
        tokens.push(merged);
    }
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
    }
    let first_special = tokens.len();
    let added: Vec<serde_json::Value> = TINY_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": first_special + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        // Llama-3's split pattern: `\s*[\r\n]+` keeps "\n\n" + text apart, so the context/target
        // boundary after the assistant header is always a token boundary.
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    let specials: Vec<(usize, &str)> = TINY_SPECIAL_TOKENS.iter().enumerate().map(|(i, t)| (first_special + i, *t)).collect();
    let config = llama3_tokenizer_config(&specials);
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string_pretty(&tokenizer)?)?;
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    let vocab_size = first_special + TINY_SPECIAL_TOKENS.len();
    Ok(vocab_size)
}


/// `tokenizer_config.json` of a tokenizer with the Llama-3 special tokens `(id, token)`: BOS
/// `<|begin_of_text|>`, EOS `<|eot_id|>`, pad `<|finetune_right_pad_id|>`, and the paper's
/// Llama-3 template as `chat_template`.
pub fn llama3_tokenizer_config(specials: &[(usize, &str)]) -> serde_json::Value {
    let decoder: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .map(|(id, t)| (id.to_string(), json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true})))
        .collect();
    json!({
        "added_tokens_decoder": decoder,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}
