//! The data side of `overfill distill` (no libtorch): the prompts of a dataset, and the output
//! folder where the full model's answers to them are written as conversations.
//!
//! Distillation data are the full model's own answers to the dataset's prompts: a drafter for
//! speculative decoding (`generate --speculative`) trained on them learns what the full model
//! writes, not what the dataset's references say, and so agrees with the full model more often.
//! The output is JSONL in the `messages` schema, one file per generation batch
//! (`part-00000.jsonl`, ...), which `preprocess --input 'DIR/part-*.jsonl'` reads like any input.
//!
//! A prompt is a conversation without its last assistant turn (that turn is what the full model
//! replaces); a conversation ending with a user turn is a prompt as it is.
//!
//! The folder is resumable: every part is written atomically and recorded in `distill.json`
//! with the settings' key, so a run killed halfway continues from its last whole part, and a run
//! with other settings is refused instead of mixing two distillations.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::conversation::{normalise_turns, Message, Role, Unusable};
use crate::digest::{sha256_file, sha256_str};
use crate::out_lock::OutputLock;
use crate::owned_files::OwnedFiles;
use crate::recipe::SourceSpec;
use crate::shard::write_atomic;
use crate::source::{expand_sources, parse_json_row, read_file, InputFile, RawConversation, RawPayload};
pub use crate::tokenize::ChatCodec;

/// The record of the output folder.
pub const STATE_FILE: &str = "distill.json";
/// Tests: exit with an error after writing this many parts in one run (a run killed halfway).
pub const STOP_AFTER_PARTS_ENV: &str = "OVERFILL_TEST_DISTILL_STOP_AFTER_PARTS";

/// The conversation up to the turn the full model answers: a trailing assistant turn is dropped,
/// and what is left must end with a user turn.
pub fn prompt_messages(raw: RawConversation) -> Result<Vec<Message>, String> {
    let mut messages = normalise_turns(raw.turns, raw.system_prompt).map_err(|e| match e {
        Unusable::UnknownRole(role) => format!("unknown role {role:?}"),
        Unusable::NoAssistantTurn => "no assistant turn".to_string(),
    })?;
    if messages.last().is_some_and(|m| m.role == Role::Assistant) {
        messages.pop();
    }
    match messages.last() {
        Some(m) if m.role == Role::User => Ok(messages),
        Some(m) => Err(format!("the prompt ends with a {} turn, not a user turn", m.role.as_str())),
        None => Err("no turns".to_string()),
    }
}

/// One prompt to answer.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Position of the row in the whole input (all files, in order).
    pub row_id: u64,
    pub messages: Vec<Message>,
    pub ids: Vec<u32>,
}

/// What reading the inputs found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PromptCounts {
    /// Rows looked at: all, or the first `limit`.
    pub raw_rows: u64,
    /// Not chosen by their source's mixing fraction.
    pub sampled_out: u64,
    /// Rows that could not be read or have no usable prompt, with a few examples.
    pub unusable: u64,
    pub unusable_examples: Vec<String>,
    pub prompts: u64,
}

/// The input files of `sources` and their sha256 (part of the output's key).
pub fn input_files(sources: &[SourceSpec]) -> Result<(Vec<InputFile>, Vec<String>)> {
    let files = expand_sources(sources)?;
    let hashes = files.par_iter().map(|f| sha256_file(&f.path)).collect::<Result<_>>()?;
    Ok((files, hashes))
}

/// The prompts of the first `limit` rows of `files` (all without a limit), in input order; a
/// source's `fraction` keeps the same rows preprocess would keep with `seed`.
pub fn read_prompts(files: &[InputFile], codec: &ChatCodec, seed: u64, limit: Option<u64>) -> Result<(Vec<Prompt>, PromptCounts)> {
    let mut counts = PromptCounts::default();
    let mut raw: Vec<(u64, Result<RawConversation, String>, String)> = Vec::new();
    let bytes_read = AtomicU64::new(0);
    let mut next_row_id = 0u64;
    'files: for (index, file) in files.iter().enumerate() {
        let mut sink = |record: crate::source::RawRecord| -> Result<()> {
            // The reader streams the file to its end; rows past the limit are not looked at.
            if limit.is_some_and(|n| raw.len() as u64 >= n) {
                return Ok(());
            }
            counts.raw_rows += 1;
            if crate::filter::sampled_out(seed, record.row_id, file.fraction) {
                counts.sampled_out += 1;
                return Ok(());
            }
            let parsed = match record.payload {
                RawPayload::Json(bytes) => parse_json_row(&bytes),
                RawPayload::Decoded(row) => row,
            };
            let place = format!("{} row {}", file.path.display(), record.row_in_file);
            raw.push((record.row_id, parsed, place));
            Ok(())
        };
        next_row_id += read_file(file, index, next_row_id, 0, &bytes_read, &mut sink)?;
        if limit.is_some_and(|n| raw.len() as u64 >= n) {
            break 'files;
        }
    }
    let encoded: Vec<(u64, Result<(Vec<Message>, Vec<u32>), String>, String)> = raw
        .into_par_iter()
        .map(|(row_id, parsed, place)| {
            let prompt = parsed.and_then(prompt_messages).and_then(|messages| {
                let ids = codec.encode_prompt(&messages).map_err(|e| format!("{e:#}"))?;
                Ok((messages, ids))
            });
            (row_id, prompt, place)
        })
        .collect();
    let mut prompts = Vec::with_capacity(encoded.len());
    for (row_id, prompt, place) in encoded {
        match prompt {
            Ok((messages, ids)) => prompts.push(Prompt { row_id, messages, ids }),
            Err(why) => {
                counts.unusable += 1;
                if counts.unusable_examples.len() < 5 {
                    counts.unusable_examples.push(format!("{place}: {why}"));
                }
            }
        }
    }
    counts.prompts = prompts.len() as u64;
    Ok((prompts, counts))
}

/// The full model's answer to one prompt.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub new_tokens: usize,
    /// Ended with a stop token (not cut at `max_new_tokens`).
    pub finished: bool,
}

/// One output row: the prompt's turns and the answer, in the `messages` schema preprocess reads.
pub fn answer_row(prompt: &Prompt, answer: &Answer) -> Value {
    let mut messages: Vec<Value> = prompt.messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect();
    messages.push(json!({"role": "assistant", "content": answer.text}));
    json!({
        "messages": messages,
        "distill": {"row_id": prompt.row_id, "new_tokens": answer.new_tokens, "finished": answer.finished},
    })
}

/// One written part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartEntry {
    pub name: String,
    /// Prompts of this part (one generation batch).
    pub prompts: u64,
    /// Rows written (prompts minus empty answers, minus unfinished ones when they are dropped).
    pub rows: u64,
    /// Answers cut at `max_new_tokens`.
    pub unfinished: u64,
    /// Answers with no text (the model stopped at once); never written.
    pub empty: u64,
    pub new_tokens: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    key: String,
    /// What the key was computed from, for the message when settings differ.
    settings: Value,
    prompts: u64,
    parts: Vec<PartEntry>,
}

/// The output folder, locked for this run, with the parts already written.
pub struct DistillOut {
    dir: PathBuf,
    owned: OwnedFiles,
    state: State,
    _lock: OutputLock,
}

impl DistillOut {
    /// Lock and claim `dir` for a distillation whose settings (everything that changes the output)
    /// are `settings`; a folder holding another distillation's parts is refused.
    pub fn open(dir: &Path, settings: Value, prompts: u64) -> Result<DistillOut> {
        let lock = OutputLock::acquire(dir, "distill")?;
        let mut owned = OwnedFiles::open(dir, "distill", || None)?;
        let key = sha256_str(&settings.to_string());
        let path = dir.join(STATE_FILE);
        let state = if owned.owns(STATE_FILE) && path.is_file() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let state: State = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            if state.key != key {
                bail!(
                    "--out {} holds a distillation made with other settings or inputs ({}); refusing to mix them: choose another folder, or delete this one to start over.\n  there: {}\n  now:   {}",
                    dir.display(),
                    differing_keys(&state.settings, &settings).join(", "),
                    state.settings,
                    settings
                );
            }
            state
        } else {
            State { key, settings, prompts, parts: Vec::new() }
        };
        owned.claim()?;
        owned.create(STATE_FILE)?;
        // Written by the command beside the parts.
        owned.create(crate::recipe::RESOLVED_FILE)?;
        let out = DistillOut { dir: dir.to_path_buf(), owned, state, _lock: lock };
        out.save()?;
        Ok(out)
    }

    /// Parts already written (by earlier runs), in order.
    pub fn done(&self) -> &[PartEntry] {
        &self.state.parts
    }

    /// The name of part `index`.
    pub fn part_name(index: usize) -> String {
        format!("part-{index:05}.jsonl")
    }

    /// Write part `entry.name` (atomically), then record it.
    pub fn write_part(&mut self, entry: PartEntry, rows: &[Value]) -> Result<()> {
        let path = self.owned.create(&entry.name)?;
        let mut text = String::new();
        for row in rows {
            text.push_str(&serde_json::to_string(row)?);
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes())?;
        self.state.parts.push(entry);
        self.save()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn save(&self) -> Result<()> {
        write_atomic(&self.dir.join(STATE_FILE), serde_json::to_string_pretty(&self.state)?.as_bytes())
    }
}

/// Top-level keys whose values differ between two settings objects.
fn differing_keys(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec!["settings".into()] };
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(turns: &[(&str, &str)], system: Option<&str>) -> RawConversation {
        RawConversation {
            turns: turns.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect(),
            system_prompt: system.map(str::to_string),
            language: None,
        }
    }

    #[test]
    fn prompts_drop_the_last_answer_and_end_with_a_user_turn() {
        let m = prompt_messages(raw(&[("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d")], Some("s"))).unwrap();
        let roles: Vec<_> = m.iter().map(|m| (m.role, m.content.as_str())).collect();
        assert_eq!(roles, vec![(Role::System, "s"), (Role::User, "a"), (Role::Assistant, "b"), (Role::User, "c")]);
        // A conversation waiting for an answer is a prompt as it is.
        assert_eq!(prompt_messages(raw(&[("human", "a"), ("gpt", "b"), ("human", "c")], None)).unwrap().len(), 3);
        assert_eq!(prompt_messages(raw(&[("user", "q")], None)).unwrap().len(), 1);
        assert!(prompt_messages(raw(&[("gpt", "b")], None)).unwrap_err().contains("no turns"));
        assert!(prompt_messages(raw(&[("system", "s"), ("gpt", "b")], None)).unwrap_err().contains("system turn"));
        assert!(prompt_messages(raw(&[("tool", "x")], None)).unwrap_err().contains("unknown role"));
    }

    #[test]
    fn other_settings_are_refused_and_parts_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let settings = json!({"max_new_tokens": 8, "inputs": ["x"]});
        let entry = PartEntry { name: DistillOut::part_name(0), prompts: 2, rows: 2, unfinished: 1, empty: 0, new_tokens: 9, seconds: 0.5 };
        {
            let mut out = DistillOut::open(&dir, settings.clone(), 4).unwrap();
            out.write_part(entry.clone(), &[json!({"a": 1}), json!({"b": 2})]).unwrap();
        }
        assert_eq!(std::fs::read_to_string(dir.join("part-00000.jsonl")).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        let out = DistillOut::open(&dir, settings, 4).unwrap();
        assert_eq!(out.done(), &[entry]);
        drop(out);
        let err = DistillOut::open(&dir, json!({"max_new_tokens": 16, "inputs": ["x"]}), 4).err().unwrap().to_string();
        assert!(err.contains("other settings") && err.contains("max_new_tokens") && !err.contains("inputs,"), "{err}");
    }
}
