//! Text in and out of the server: prompts to token ids, generated ids to text, and where a
//! generation's text ends at a stop string.
//!
//! Prompts are encoded as `overfill generate` encodes them, so that the server's greedy output
//! equals the command's: `/v1/completions` text as `generate --raw` (the tokenizer's own special
//! tokens added), `/v1/chat/completions` messages rendered with the chat template and the
//! generation prompt as `generate --prompt/--messages` (no special tokens added: the template
//! writes BOS).
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use overfill_data::conversation::Message;
use overfill_data::template::{ChatTemplate, TemplateSpec};
use overfill_data::tokenize::{
    load_tokenizer, vocab_overflow_warning, SplitTokenizer, Tokenizer, TokenizerConfig,
};

/// The model's tokenizer and chat template; shared (read-only) by the HTTP handlers, which
/// encode prompts, and the engine, which decodes generated ids.
pub struct TextCodec {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    split: SplitTokenizer,
    /// Rows of the embedding table: ids at or past it cannot be fed.
    vocab_size: usize,
    /// BOS and EOS strings of tokenizer_config.json (reported by /tokenizer_info).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TextCodec {
    /// `tokenizer.json` (and `tokenizer_config.json` when present) of the model folder; `template`
    /// as `overfill generate --template` reads it (llama3, chatml, model or a Jinja file).
    pub fn load(model_dir: &Path, template_name: &str, vocab_size: usize) -> Result<TextCodec> {
        let path = model_dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "the server needs the model's tokenizer: {} does not exist",
                path.display()
            );
        }
        let tokenizer = load_tokenizer(&path)?;
        if let Some(warning) = vocab_overflow_warning(&tokenizer, vocab_size, &path) {
            eprintln!("{warning}");
        }
        let config_path = model_dir.join("tokenizer_config.json");
        let tokenizer_config =
            TokenizerConfig::load(config_path.is_file().then_some(config_path.as_path()))?;
        let template = ChatTemplate::from_spec(
            &TemplateSpec::parse(template_name),
            tokenizer_config.template_tokens(),
            tokenizer_config.chat_template.as_deref(),
        )?;
        let split = SplitTokenizer::new(tokenizer.clone(), &template)
            .with_context(|| format!("chat template {template_name:?} with {}", path.display()))?;
        Ok(TextCodec {
            tokenizer,
            template,
            split,
            vocab_size,
            bos_token: tokenizer_config.bos_token.clone(),
            eos_token: tokenizer_config.eos_token.clone(),
        })
    }

    /// The chat template's end-of-turn id (a chat completion stops there).
    pub fn end_of_turn_id(&self) -> i64 {
        self.split.end_of_turn_id as i64
    }

    /// The chat template's Jinja source.
    pub fn chat_template(&self) -> &str {
        &self.template.source
    }

    /// A completion prompt: the text as it is, with the tokenizer's special tokens (BOS).
    pub fn encode_text(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_text_with(text, true)
    }

    /// Text as it is, with or without the tokenizer's special tokens (`/tokenize`).
    pub fn encode_text_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?;
        self.checked(encoding.get_ids())
    }

    /// A chat: the messages rendered with the generation prompt.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<i64>> {
        let text = self.template.render(messages, true)?;
        let ids = self
            .split
            .encode(&text)
            .map_err(|e| anyhow!("cannot tokenize the messages: {e:?}"))?;
        self.checked(&ids)
    }

    /// Ids the model cannot embed (a tokenizer larger than the model) are refused, naming them.
    fn checked(&self, ids: &[u32]) -> Result<Vec<i64>> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            let token = self.tokenizer.id_to_token(id).unwrap_or_default();
            bail!(
                "the prompt has token {token:?} (id {id}), outside the model's vocabulary of {}",
                self.vocab_size
            );
        }
        Ok(ids.iter().map(|&id| i64::from(id)).collect())
    }

    /// Text of generated ids, special tokens skipped (as `overfill generate` prints it).
    pub fn decode(&self, ids: &[i64]) -> String {
        self.decode_with(ids, true)
    }

    /// Text of ids, special tokens written out unless skipped (`/detokenize` keeps them).
    pub fn decode_with(&self, ids: &[i64], skip_special_tokens: bool) -> String {
        let ids: Vec<u32> = ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok())
            .collect();
        self.tokenizer
            .decode(&ids, skip_special_tokens)
            .unwrap_or_default()
    }
}

/// The text of a growing list of generated ids, decoded a few ids at a time as vLLM and
/// transformers' TextStreamer do: the ids from `prefix_start` on are decoded, and the text of
/// those before `read_start` (already in `text`) is cut off the front; the rest is new once it
/// does not end in an incomplete character. Decoding all ids at every step would cost O(n²).
/// Decoding the window from `prefix_start` (not just the new ids) keeps what a tokenizer does
/// at the start of a text (SentencePiece's leading space) out of the middle of it.
#[derive(Debug, Default)]
pub struct IncrementalText {
    /// Append-only.
    pub text: String,
    prefix_start: usize,
    read_start: usize,
}

impl IncrementalText {
    /// Takes in the text `ids` (all generated so far) add; `flush` also takes an incomplete
    /// character at the end (the generation is over).
    pub fn update(&mut self, codec: &TextCodec, ids: &[i64], flush: bool) {
        if ids.len() <= self.read_start {
            return;
        }
        let prefix = codec.decode(&ids[self.prefix_start..self.read_start]);
        let window = codec.decode(&ids[self.prefix_start..]);
        let complete = flush || !window.ends_with('\u{fffd}');
        if window.len() > prefix.len() && window.starts_with(prefix.as_str()) && complete {
            self.text.push_str(&window[prefix.len()..]);
            self.prefix_start = self.read_start;
            self.read_start = ids.len();
        }
    }
}

/// Where a generation's text ends: the byte offset of the earliest stop string in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` (which holds no stop string) can be sent to a streaming client: all but
/// a tail that may still become a stop string, or an incomplete UTF-8 character (U+FFFD).
pub fn streamable_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    while text[..end].ends_with('\u{fffd}') {
        end -= '\u{fffd}'.len_utf8();
    }
    // The longest suffix of text[..end] that is a proper prefix of a stop string.
    let mut held = 0;
    for stop in stops {
        for (cut, _) in stop.char_indices().skip(1) {
            if cut > held && text[..end].ends_with(&stop[..cut]) {
                held = cut;
            }
        }
    }
    end - held
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn earliest_stop_wins() {
        let s = stops(&["\n", "Question:"]);
        assert_eq!(find_stop(" 12 Question: x\n", &s), Some(4));
        assert_eq!(find_stop(" 12", &s), None);
        assert_eq!(find_stop("abc", &stops(&[""])), None);
    }

    #[test]
    fn a_possible_stop_prefix_is_held_back() {
        let s = stops(&["Question:"]);
        assert_eq!(streamable_len(" 12 Quest", &s), 4);
        assert_eq!(streamable_len(" 12 Qx", &s), 6);
        assert_eq!(streamable_len("ab\u{fffd}", &s), 2);
        assert_eq!(streamable_len("abc", &[]), 3);
    }
}
