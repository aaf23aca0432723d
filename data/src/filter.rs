//! Turning one raw row into a kept example or a counted reason to drop it.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::conversation::{normalise, Message, Unusable};
use crate::recipe::PreprocessConfig;
use crate::source::{parse_json_row, RawConversation, RawPayload, RawRecord};
use crate::template::ChatTemplate;
use crate::tokenize::{SplitError, SplitTokenizer};

/// Why a row was not kept. The snake-case names are the manifest's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Bad JSON, missing fields, wrong types, invalid UTF-8 (the "bad" rows).
    Malformed,
    /// Not chosen by the source's mixing fraction.
    SampledOut,
    UnknownRole,
    NoAssistantTurn,
    Language,
    TemplateError,
    TokenizerError,
    /// Full-text tokens do not start with the context's tokens.
    BoundaryError,
    NoEndOfTurn,
    /// Context + target over `pre_filter_max_seq_length`.
    TooLong,
    /// Context over `max_context_length`, or no target token left under `max_seq_length`.
    ContextTooLong,
    Duplicate,
}

impl DropReason {
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// A kept row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub row_id: u64,
    pub source: String,
    pub context_ids: Vec<u32>,
    pub target_ids: Vec<u32>,
    /// Hash of the normalised conversation (duplicate detection).
    pub content_hash: u64,
    /// Seeded random key: the shuffle order and the validation draw.
    pub shuffle_key: u64,
    /// The target was cut to fit `max_seq_length`.
    pub truncated: bool,
}

/// The fate of one raw row.
#[derive(Debug)]
pub enum Outcome {
    Kept(Example),
    Dropped(DropReason),
    /// A malformed row, with a message for the log.
    Bad(String),
}

#[derive(Debug)]
pub struct Processed {
    pub row_id: u64,
    pub file_index: usize,
    pub row_in_file: u64,
    pub byte_offset: Option<u64>,
    pub outcome: Outcome,
}

/// SplitMix64: a fixed, portable mixing function (Rust's `DefaultHasher` may change).
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seeded shuffle key of a row.
pub fn shuffle_key(seed: u64, row_id: u64) -> u64 {
    mix64(mix64(seed) ^ row_id)
}

/// A uniform number in [0, 1) from the seed and row id (mixing fractions).
fn sample_unit(seed: u64, row_id: u64) -> f64 {
    (mix64(mix64(seed ^ 0x5A5A_5A5A_5A5A_5A5A) ^ row_id) >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether row `row_id` of a source mixed in at `fraction` is left out (seeded; the same rows for
/// the same seed in preprocess and distill).
pub fn sampled_out(seed: u64, row_id: u64, fraction: f64) -> bool {
    fraction < 1.0 && sample_unit(seed, row_id) >= fraction
}

pub fn content_hash(messages: &[Message]) -> u64 {
    let mut hasher = Sha256::new();
    for m in messages {
        hasher.update(m.role.as_str().as_bytes());
        hasher.update([0u8]);
        hasher.update(m.content.as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Everything a worker needs to process rows.
pub struct RowProcessor<'a> {
    pub config: &'a PreprocessConfig,
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a SplitTokenizer,
    /// Per input file: source name and mixing fraction.
    pub files: Vec<(String, f64)>,
}

impl RowProcessor<'_> {
    pub fn process(&self, record: RawRecord) -> Processed {
        let outcome = self.outcome(&record);
        Processed {
            row_id: record.row_id,
            file_index: record.file_index,
            row_in_file: record.row_in_file,
            byte_offset: record.byte_offset,
            outcome,
        }
    }

    fn outcome(&self, record: &RawRecord) -> Outcome {
        let (source, fraction) = &self.files[record.file_index];
        if sampled_out(self.config.seed, record.row_id, *fraction) {
            return Outcome::Dropped(DropReason::SampledOut);
        }
        let raw: RawConversation = match &record.payload {
            RawPayload::Json(bytes) => match parse_json_row(bytes) {
                Ok(raw) => raw,
                Err(e) => return Outcome::Bad(e),
            },
            RawPayload::Decoded(Ok(raw)) => raw.clone(),
            RawPayload::Decoded(Err(e)) => return Outcome::Bad(e.clone()),
        };
        if let (Some(language), false) = (&raw.language, self.config.languages.is_empty()) {
            if !self.config.languages.iter().any(|l| l.eq_ignore_ascii_case(language.trim())) {
                return Outcome::Dropped(DropReason::Language);
            }
        }
        let messages = match normalise(raw.turns, raw.system_prompt) {
            Ok(m) => m,
            Err(Unusable::UnknownRole(_)) => return Outcome::Dropped(DropReason::UnknownRole),
            Err(Unusable::NoAssistantTurn) => return Outcome::Dropped(DropReason::NoAssistantTurn),
        };
        let hash = content_hash(&messages);
        let Ok(rendered) = self.template.render_split(&messages) else {
            return Outcome::Dropped(DropReason::TemplateError);
        };
        let split = match self.tokenizer.encode_split(&rendered) {
            Ok(s) => s,
            Err(SplitError::Boundary) => return Outcome::Dropped(DropReason::BoundaryError),
            Err(SplitError::NoEndOfTurn) => return Outcome::Dropped(DropReason::NoEndOfTurn),
            Err(SplitError::Tokenizer(_)) => return Outcome::Dropped(DropReason::TokenizerError),
        };
        let context_len = split.context_ids.len();
        let total = context_len + split.target_ids.len();
        if let Some(limit) = self.config.pre_filter_max_seq_length {
            if total > limit {
                return Outcome::Dropped(DropReason::TooLong);
            }
        }
        if self.config.max_context_length.map(|l| context_len > l).unwrap_or(false)
            || context_len >= self.config.max_seq_length
        {
            return Outcome::Dropped(DropReason::ContextTooLong);
        }
        let mut target_ids = split.target_ids;
        let truncated = total > self.config.max_seq_length;
        target_ids.truncate(self.config.max_seq_length - context_len);
        Outcome::Kept(Example {
            row_id: record.row_id,
            source: source.clone(),
            context_ids: split.context_ids,
            target_ids,
            content_hash: hash,
            shuffle_key: shuffle_key(self.config.seed, record.row_id),
            truncated,
        })
    }
}
