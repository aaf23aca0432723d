//! Loading a Hugging Face `tokenizer.json` and splitting a rendered conversation into context and
//! target token ids, with the split made on token ids of the whole text.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
// Re-exported so that crates without a tokenizers dependency can name the type.
pub use tokenizers::Tokenizer;

use crate::conversation::Message;
use crate::digest::{sha256_file, sha256_str};
use crate::template::{ChatTemplate, RenderedSplit, TemplateSpec, TemplateTokens};

/// A tokenizer with its chat template bound to it, and the digests that identify both: what
/// preprocess renders and splits training conversations with, and what distill renders prompts with.
pub struct ChatCodec {
    pub files: TokenizerFiles,
    pub template: ChatTemplate,
    pub tokenizer: SplitTokenizer,
    pub tokenizer_sha256: String,
    pub config_sha256: Option<String>,
    /// Of the template's source.
    pub template_sha256: String,
}

impl ChatCodec {
    /// `tokenizer`: a `tokenizer.json`, a folder or a hub id ([`resolve_tokenizer`]); `template`: a
    /// [`TemplateSpec`] as `[data] template` writes it.
    pub fn load(tokenizer: &str, template: &str) -> Result<ChatCodec> {
        let files = resolve_tokenizer(tokenizer)?;
        let config = TokenizerConfig::load(files.config_json.as_deref())?;
        let template = ChatTemplate::from_spec(&TemplateSpec::parse(template), config.template_tokens(), config.chat_template.as_deref())?;
        let plain = load_tokenizer(&files.tokenizer_json)?;
        let split = SplitTokenizer::new(plain, &template).with_context(|| format!("tokenizer {}", files.tokenizer_json.display()))?;
        Ok(ChatCodec {
            tokenizer_sha256: sha256_file(&files.tokenizer_json)?,
            config_sha256: files.config_json.as_deref().map(sha256_file).transpose()?,
            template_sha256: sha256_str(&template.source),
            files,
            template,
            tokenizer: split,
        })
    }

    /// The digests in one list: tokenizer.json, tokenizer_config.json (if any), the template.
    pub fn digests(&self) -> Vec<String> {
        std::iter::once(self.tokenizer_sha256.clone()).chain(self.config_sha256.clone()).chain([self.template_sha256.clone()]).collect()
    }

    /// Token ids of a conversation rendered with the generation prompt (the template writes BOS),
    /// as a training context is tokenized.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.tokenizer.encode(&text).map_err(|e| anyhow!("cannot tokenize: {e:?}"))
    }

    /// Text of generated ids, special tokens (the end-of-turn token) left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.tokenizer.decode(ids, true).map_err(|e| anyhow!("cannot decode generated ids: {e}"))
    }
}

/// The files of a tokenizer: `tokenizer.json` and, next to it, `tokenizer_config.json`.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    pub tokenizer_json: PathBuf,
    pub config_json: Option<PathBuf>,
}

/// Find `tokenizer.json` from a file, a model folder, or a Hugging Face hub id that is in the
/// local hub cache (`$HF_HOME/hub` or `~/.cache/huggingface/hub`). Never downloads.
pub fn resolve_tokenizer(path_or_id: &str) -> Result<TokenizerFiles> {
    let path = Path::new(path_or_id);
    let dir = if path.is_file() {
        return Ok(TokenizerFiles {
            tokenizer_json: path.to_path_buf(),
            config_json: path.parent().map(|p| p.join("tokenizer_config.json")).filter(|p| p.is_file()),
        });
    } else if path.is_dir() {
        path.to_path_buf()
    } else if let Some(snapshot) = hub_cache_snapshot(path_or_id) {
        snapshot
    } else {
        bail!(
            "tokenizer not found: {path_or_id} is neither a tokenizer.json, a folder holding one, nor a model id in the local Hugging Face cache (run `huggingface-cli download {path_or_id} tokenizer.json tokenizer_config.json` or pass --tokenizer DIR)"
        );
    };
    let tokenizer_json = dir.join("tokenizer.json");
    if !tokenizer_json.is_file() {
        bail!("tokenizer not found: {} has no tokenizer.json", dir.display());
    }
    let config = dir.join("tokenizer_config.json");
    Ok(TokenizerFiles { tokenizer_json, config_json: config.is_file().then_some(config) })
}

fn hub_cache_snapshot(model_id: &str) -> Option<PathBuf> {
    if !model_id.contains('/') || model_id.starts_with('/') || model_id.starts_with('.') {
        return None;
    }
    let hub = match std::env::var_os("HF_HOME") {
        Some(home) => PathBuf::from(home).join("hub"),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/huggingface/hub"),
    };
    let snapshots = hub.join(format!("models--{}", model_id.replace('/', "--"))).join("snapshots");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("tokenizer.json").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// The parts of `tokenizer_config.json` the templates need.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// `tokenizer_config.json` at `path`, and the `chat_template.jinja` beside it when there is
    /// one (transformers >= 4.43 saves the template there; like transformers, it wins over the
    /// config's `chat_template`).
    pub fn load(path: Option<&Path>) -> Result<TokenizerConfig> {
        let Some(path) = path else { return Ok(TokenizerConfig::default()) };
        let mut config = TokenizerConfig::load_json(path)?;
        let jinja = path.with_file_name("chat_template.jinja");
        if jinja.is_file() {
            let template = std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?;
            config.chat_template = Some(template);
        }
        Ok(config)
    }

    fn load_json(path: &Path) -> Result<TokenizerConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // Tokens are either plain strings or AddedToken objects `{"content": ...}`.
        let token = |key: &str| -> Option<String> {
            match value.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let chat_template = match value.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // Named templates: [{"name": "default", "template": ...}, ...]
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        Ok(TokenizerConfig { bos_token: token("bos_token"), eos_token: token("eos_token"), chat_template })
    }

    pub fn template_tokens(&self) -> TemplateTokens {
        TemplateTokens {
            bos_token: self.bos_token.clone().unwrap_or_default(),
            eos_token: self.eos_token.clone().unwrap_or_default(),
        }
    }
}

/// Load `tokenizer.json` with padding and truncation switched off (a saved truncation setting
/// would otherwise cut rows silently).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
    tokenizer.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Context and target token ids of one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSplit {
    pub context_ids: Vec<u32>,
    pub target_ids: Vec<u32>,
}

/// Why a rendered conversation could not be split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitError {
    Tokenizer(String),
    /// The whole text's tokens do not start with the context's tokens.
    Boundary,
    /// The target does not contain the end-of-turn token.
    NoEndOfTurn,
}

/// A tokenizer bound to a chat template: encodes without adding special tokens (the template
/// writes BOS) and splits at the context/target boundary.
pub struct SplitTokenizer {
    pub tokenizer: Tokenizer,
    /// Ids of the special tokens the template writes.
    template_token_ids: HashSet<u32>,
    pub end_of_turn_id: u32,
}

impl SplitTokenizer {
    /// Fails when the tokenizer lacks any special token the template writes.
    pub fn new(tokenizer: Tokenizer, template: &ChatTemplate) -> Result<SplitTokenizer> {
        let mut missing = Vec::new();
        let mut template_token_ids = HashSet::new();
        for token in template.required_special_tokens() {
            // It must be one token when it appears in text, i.e. an added token.
            match tokenizer.token_to_id(&token) {
                Some(id) if tokenizer.encode_fast(token.as_str(), false).map(|e| e.get_ids() == [id]).unwrap_or(false) => {
                    template_token_ids.insert(id);
                }
                _ => missing.push(token),
            }
        }
        if !missing.is_empty() {
            bail!(
                "the tokenizer does not have the chat template's special tokens {} as single tokens: wrong tokenizer for this template?",
                missing.join(", ")
            );
        }
        let end_of_turn_id = tokenizer
            .token_to_id(&template.end_of_turn)
            .ok_or_else(|| anyhow!("tokenizer lacks end-of-turn token {}", template.end_of_turn))?;
        Ok(SplitTokenizer { tokenizer, template_token_ids, end_of_turn_id })
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, SplitError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| SplitError::Tokenizer(e.to_string()))
    }

    /// Tokenize the whole text once and split it where the context ends.
    ///
    /// The split index is where the byte offsets cross `context.len()`. It is verified to equal
    /// the tokenization of the context alone: text before the context's last template special
    /// token is cut into identical pieces in both strings (special tokens split the text first),
    /// so only the short tail after it (e.g. `"\n\n"`) is re-encoded and compared. When that
    /// quick check fails, the context is encoded in full and compared; a mismatch then is a
    /// boundary error. The target is cut after its last end-of-turn token (ChatML writes a
    /// newline after `<|im_end|>`, which is not part of the turn).
    pub fn encode_split(&self, rendered: &RenderedSplit) -> Result<TokenizedSplit, SplitError> {
        let encoding = self
            .tokenizer
            .encode(rendered.full.as_str(), false)
            .map_err(|e| SplitError::Tokenizer(e.to_string()))?;
        let ids = encoding.get_ids();
        let offsets = encoding.get_offsets();
        let context_len = rendered.context.len();
        let split = offsets.partition_point(|&(_, end)| end <= context_len);
        let quick_ok = split < ids.len() && offsets[split].0 >= context_len && self.tail_matches(rendered, ids, offsets, split);
        let split = if quick_ok {
            split
        } else {
            let context_ids = self.encode(&rendered.context)?;
            if !ids.starts_with(&context_ids) {
                return Err(SplitError::Boundary);
            }
            context_ids.len()
        };
        let target = &ids[split..];
        let end = target.iter().rposition(|&id| id == self.end_of_turn_id).ok_or(SplitError::NoEndOfTurn)?;
        Ok(TokenizedSplit { context_ids: ids[..split].to_vec(), target_ids: target[..=end].to_vec() })
    }

    fn tail_matches(&self, rendered: &RenderedSplit, ids: &[u32], offsets: &[(usize, usize)], split: usize) -> bool {
        let Some(last_special) = ids[..split].iter().rposition(|id| self.template_token_ids.contains(id)) else {
            return false;
        };
        let tail_start = offsets[last_special].1;
        let Some(tail_text) = rendered.context.get(tail_start..) else { return false };
        match self.encode(tail_text) {
            Ok(tail_ids) => ids[last_special + 1..split] == tail_ids[..],
            Err(_) => false,
        }
    }
}

/// Ids the tokenizer can produce (vocabulary and added tokens) that an embedding table of
/// `vocab_size` rows cannot embed, ascending, with their tokens. Real tokenizers carry such ids:
/// the Llama 3.2 release's has `<|image|>` at 128256, one past the text models' vocabulary.
pub fn ids_beyond_vocab(tokenizer: &Tokenizer, vocab_size: usize) -> Vec<(u32, String)> {
    let mut beyond: Vec<(u32, String)> = tokenizer
        .get_vocab(true)
        .into_iter()
        .filter(|&(_, id)| id as usize >= vocab_size)
        .map(|(token, id)| (id, token))
        .collect();
    beyond.sort();
    beyond
}

/// The load-time warning for `ids_beyond_vocab` (None when every id fits): loading such a pair
/// is fine as long as text never encodes to one of those ids, which `check_ids_in_vocab` refuses.
pub fn vocab_overflow_warning(tokenizer: &Tokenizer, vocab_size: usize, tokenizer_path: &Path) -> Option<String> {
    let beyond = ids_beyond_vocab(tokenizer, vocab_size);
    if beyond.is_empty() {
        return None;
    }
    const SHOWN: usize = 8;
    let mut listed: Vec<String> = beyond.iter().take(SHOWN).map(|(id, token)| format!("{id} {token:?}")).collect();
    if beyond.len() > SHOWN {
        listed.push(format!("and {} more", beyond.len() - SHOWN));
    }
    Some(format!(
        "warning: tokenizer {} has {} token id{} the model cannot embed (vocab_size {vocab_size}): {}; text that encodes to them will be refused",
        tokenizer_path.display(),
        beyond.len(),
        if beyond.len() == 1 { "" } else { "s" },
        listed.join(", ")
    ))
}

/// Fails when an id of `ids` is past the model's vocabulary, naming its position, the id and,
/// when a tokenizer is given, its token (`what` says whose ids they are, e.g. "the prompt").
pub fn check_ids_in_vocab(ids: &[u32], vocab_size: usize, tokenizer: Option<&Tokenizer>, what: &str) -> Result<()> {
    let Some(position) = ids.iter().position(|&id| id as usize >= vocab_size) else {
        return Ok(());
    };
    let id = ids[position];
    let token = tokenizer.and_then(|t| t.id_to_token(id)).map(|t| format!(" ({t:?})")).unwrap_or_default();
    let count = ids.iter().filter(|&&id| id as usize >= vocab_size).count();
    bail!(
        "{what} has token id {id}{token} at position {position}{}, but the model's vocabulary has {vocab_size} entries (ids 0..={}): the model cannot embed it",
        if count > 1 { format!(" and {} more such ids", count - 1) } else { String::new() },
        vocab_size.saturating_sub(1)
    )
}

#[cfg(test)]
mod vocab_tests {
    use std::str::FromStr;

    use super::*;

    /// Word-level vocabulary a=0 b=1 c=2, plus the added special token <|x|> at 3.
    fn tokenizer() -> Tokenizer {
        Tokenizer::from_str(
            r#"{"version":"1.0","truncation":null,"padding":null,
                "added_tokens":[{"id":3,"content":"<|x|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
                "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
                "model":{"type":"WordLevel","vocab":{"a":0,"b":1,"c":2},"unk_token":"a"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn ids_past_the_vocabulary_are_listed_warned_and_refused_by_name() {
        let tok = tokenizer();
        assert_eq!(ids_beyond_vocab(&tok, 3), vec![(3, "<|x|>".to_string())]);
        assert_eq!(ids_beyond_vocab(&tok, 2), vec![(2, "c".to_string()), (3, "<|x|>".to_string())]);
        assert!(ids_beyond_vocab(&tok, 4).is_empty());
        let warning = vocab_overflow_warning(&tok, 3, Path::new("tok.json")).unwrap();
        assert!(warning.contains("1 token id ") && warning.contains("3 \"<|x|>\"") && warning.contains("vocab_size 3"), "{warning}");
        assert!(vocab_overflow_warning(&tok, 4, Path::new("tok.json")).is_none());

        let ids = tok.encode("a b", false).unwrap().get_ids().to_vec();
        check_ids_in_vocab(&ids, 3, Some(&tok), "the prompt").unwrap();
        let ids = tok.encode("a <|x|> b", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [0, 3, 1]);
        let err = check_ids_in_vocab(&ids, 3, Some(&tok), "the prompt").unwrap_err().to_string();
        assert!(err.contains("the prompt has token id 3 (\"<|x|>\") at position 1") && err.contains("3 entries"), "{err}");
        let err = check_ids_in_vocab(&[3, 2, 3], 2, None, "row 0").unwrap_err().to_string();
        assert!(err.contains("row 0 has token id 3 at position 0 and 2 more such ids"), "{err}");
    }
}
