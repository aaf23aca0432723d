//! The demo's instruction tasks: short prompts whose answers depend on the prompt (key–value
//! lookup among distractors, multi-digit addition, reversing a list, copying a bracketed span),
//! with short deterministic answers so that exact match is meaningful; the same tasks phrased in
//! German for the language filter; held-out prompts with their expected answers; and a small BPE
//! tokenizer with the Llama-3 special tokens trained on them (the `tokenizers` trainer).
//!
//! Every answer starts with the same word (`Answer:`): the first answer token y0 is chosen by the
//! model that prefills (the full model for OverFill, the pruned model itself for the Pruned
//! baseline) and is never a training target, so it must carry no information; everything that
//! depends on the prompt comes after it, in the tokens the decoders are trained and scored on.
//!
//! Train and held-out rows never share a prompt: a prompt is held out exactly when a hash of its
//! English text falls in one bucket of eight, so the two sets are disjoint without coordination.
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::conversation::Role;
use crate::synth::{llama3_tokenizer_config, SynthRow};

/// The four task families, in the order tables list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `Keys: q=482 b=107 .... What is b?` → `Answer: 107` (associative recall among distractors).
    Lookup,
    /// `What is 47 + 385?` → `Answer: 432` (digits are single tokens).
    Add,
    /// `Reverse: d k a m` → `Answer: m a k d`.
    Reverse,
    /// `Copy the words between the bars: sun tree | moon star | cloud` → `Answer: moon star`.
    Copy,
    /// `bird lamp. Recall item 37.` → `Answer: salt moon`: a fixed table of [`RECALL_ITEMS`] facts
    /// that the model memorises in training (knowledge, as opposed to reading the prompt); the
    /// two leading words are filler, so prompts vary while the facts repeat.
    Recall,
}

/// Every task, in table order.
pub const TASKS: [Task; 5] = [Task::Lookup, Task::Add, Task::Reverse, Task::Copy, Task::Recall];

/// Items of the recall task's fact table.
pub const RECALL_ITEMS: u64 = 40;

/// The fact of item `item`: two words fixed by the item number alone (never by the seed).
fn recall_fact(item: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6661_6374 ^ item.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let a = WORDS[rng.random_range(0..WORDS.len())];
    let b = WORDS[rng.random_range(0..WORDS.len())];
    format!("{a} {b}")
}

impl Task {
    /// `lookup`, `add`, `reverse` or `copy`.
    pub fn parse(name: &str) -> Result<Task> {
        TASKS
            .into_iter()
            .find(|t| t.name() == name.trim())
            .ok_or_else(|| anyhow!("unknown task {name:?} (lookup, add, reverse, copy, recall)"))
    }

    /// A comma-separated list of task names, e.g. `copy,reverse`.
    pub fn parse_list(names: &str) -> Result<Vec<Task>> {
        let tasks: Vec<Task> = names.split(',').filter(|n| !n.trim().is_empty()).map(Task::parse).collect::<Result<_>>()?;
        if tasks.is_empty() {
            return Err(anyhow!("no task named in {names:?}"));
        }
        Ok(tasks)
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Lookup => "lookup",
            Task::Add => "add",
            Task::Reverse => "reverse",
            Task::Copy => "copy",
            Task::Recall => "recall",
        }
    }
}

/// One task instance: the user prompt and the exact assistant answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExample {
    pub task: Task,
    pub prompt: String,
    pub answer: String,
    /// `en`, or `de` for the German phrasing (dropped by the recipe's language filter).
    pub language: String,
}

/// Key–value pairs per lookup prompt (one is asked for, the others are distractors).
const LOOKUP_PAIRS: usize = 6;
/// Words of the copy task (single BPE tokens after training, each with its leading space).
const WORDS: &[&str] = &[
    "sun", "moon", "star", "tree", "river", "cloud", "stone", "bird", "fish", "wind", "rain", "snow",
    "fire", "lake", "hill", "road", "door", "book", "lamp", "cup", "bread", "milk", "salt", "ring",
    "bell", "coat", "ship", "train", "horse", "apple",
];
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

fn letter(rng: &mut ChaCha8Rng) -> char {
    LETTERS[rng.random_range(0..LETTERS.len())] as char
}

/// `n` distinct letters.
fn distinct_letters(rng: &mut ChaCha8Rng, n: usize) -> Vec<char> {
    let mut out: Vec<char> = Vec::with_capacity(n);
    while out.len() < n {
        let c = letter(rng);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The prompt and answer text of `task` drawn from `rng`, in English and German.
fn draw(task: Task, rng: &mut ChaCha8Rng) -> ((String, String), (String, String)) {
    let answer = |a: &str| (format!("Answer: {a}"), format!("Antwort: {a}"));
    match task {
        Task::Lookup => {
            let keys = distinct_letters(rng, LOOKUP_PAIRS);
            let values: Vec<u32> = (0..LOOKUP_PAIRS).map(|_| rng.random_range(100..1000)).collect();
            let asked = rng.random_range(0..LOOKUP_PAIRS);
            let pairs = keys.iter().zip(&values).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
            let (en, de) = answer(&values[asked].to_string());
            // "Keys:" first, so that every key (the first one too) is a letter token with its space.
            ((format!("Keys: {pairs}. What is {}?", keys[asked]), en), (format!("Schlüssel: {pairs}. Was ist {}?", keys[asked]), de))
        }
        Task::Add => {
            let digits = |rng: &mut ChaCha8Rng| if rng.random_range(0..2) == 0 { rng.random_range(10..100) } else { rng.random_range(100..1000) };
            let (a, b): (u32, u32) = (digits(rng), digits(rng));
            let (en, de) = answer(&(a + b).to_string());
            ((format!("What is {a} + {b}?"), en), (format!("Was ist {a} plus {b}?"), de))
        }
        Task::Reverse => {
            let n = rng.random_range(4..=6);
            let items: Vec<String> = (0..n).map(|_| letter(rng).to_string()).collect();
            let reversed: Vec<String> = items.iter().rev().cloned().collect();
            let (en, de) = answer(&reversed.join(" "));
            ((format!("Reverse: {}", items.join(" ")), en), (format!("Umkehren: {}", items.join(" ")), de))
        }
        Task::Copy => {
            let n = rng.random_range(5..=8);
            let words: Vec<&str> = (0..n).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            let len = rng.random_range(2..=3);
            let start = rng.random_range(1..n - len);
            // The span is set off by bars that are words of their own, so a copied word is the
            // same token inside the span and in the answer.
            let mut shown: Vec<&str> = Vec::with_capacity(n + 2);
            for (i, w) in words.iter().enumerate() {
                if i == start {
                    shown.push("|");
                }
                shown.push(w);
                if i == start + len - 1 {
                    shown.push("|");
                }
            }
            let shown = shown.join(" ");
            let (en, de) = answer(&words[start..start + len].join(" "));
            ((format!("Copy the words between the bars: {shown}"), en), (format!("Kopiere die Wörter zwischen den Strichen: {shown}"), de))
        }
        Task::Recall => {
            let item = rng.random_range(0..RECALL_ITEMS);
            let filler = format!("{} {}", WORDS[rng.random_range(0..WORDS.len())], WORDS[rng.random_range(0..WORDS.len())]);
            let (en, de) = answer(&recall_fact(item));
            ((format!("{filler}. Recall item {item}."), en), (format!("{filler}. Erinnere Eintrag {item}."), de))
        }
    }
}

/// FNV-1a: a hash that never changes between versions or platforms (the held-out split is
/// defined by it).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Whether an (English) prompt belongs to the held-out set.
pub fn is_held_out(english_prompt: &str) -> bool {
    fnv1a(english_prompt) % 8 == 0
}

/// Example `index` of the stream for `seed`: the task cycles through `tasks`, the content is
/// drawn until it falls on the requested side of the held-out split. `german` phrases it in
/// German (same content, `language = "de"`).
pub fn task_example(seed: u64, index: u64, held_out: bool, german: bool, tasks: &[Task]) -> TaskExample {
    let task = tasks[(index % tasks.len() as u64) as usize];
    let stream = if held_out { 0x4845_4c44 } else { 0x5452_4149 };
    for attempt in 0u64.. {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0x1000_0001) ^ (attempt << 48) ^ stream);
        let ((prompt, answer), (prompt_de, answer_de)) = draw(task, &mut rng);
        if is_held_out(&prompt) == held_out {
            return if german {
                TaskExample { task, prompt: prompt_de, answer: answer_de, language: "de".into() }
            } else {
                TaskExample { task, prompt, answer, language: "en".into() }
            };
        }
    }
    unreachable!("an unbounded loop returns")
}

/// `rows` training conversations (one user turn, one assistant turn); a `non_english` share of
/// them (chosen by the row's own generator) in German.
pub fn task_rows(seed: u64, rows: usize, non_english: f64, tasks: &[Task]) -> Vec<SynthRow> {
    (0..rows as u64)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x6c61_6e67);
            let german = rng.random::<f64>() < non_english;
            let example = task_example(seed, i, false, german, tasks);
            SynthRow {
                turns: vec![(Role::User, example.prompt), (Role::Assistant, example.answer)],
                language: example.language,
            }
        })
        .collect()
}

/// Held-out prompts with expected answers, `per_task` of each task, as JSONL: `task`,
/// `messages` (one user turn), `prompt` and `answer` (the exact assistant reply). Returns the
/// number of lines.
pub fn write_held_out(path: &Path, seed: u64, per_task: usize, tasks: &[Task]) -> Result<usize> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let n = per_task * tasks.len();
    for i in 0..n as u64 {
        let e = task_example(seed, i, true, false, tasks);
        let line = json!({
            "task": e.task.name(),
            "messages": [{"role": "user", "content": e.prompt}],
            "prompt": e.prompt,
            "answer": e.answer,
        });
        writeln!(out, "{line}").with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()?;
    Ok(n)
}

/// The special tokens of the trained tokenizer: Llama 3's (the ones its chat template and
/// generation use), first in the vocabulary.
pub const LLAMA3_SPECIAL_TOKENS: [&str; 8] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
];

/// Llama 3's split pattern with single digits (`\p{N}` instead of `\p{N}{1,3}`, as Llama 2 and
/// Qwen split numbers), so that arithmetic is learnt digit by digit. `\s*[\r\n]+` still keeps
/// the `\n\n` after the assistant header apart from the answer.
pub const TASK_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Train a byte-level BPE tokenizer of `vocab_size` tokens (special tokens included) on the
/// task data (English and German rows, the role names of the chat template) and write
/// `tokenizer.json` and `tokenizer_config.json` (Llama-3 template) into `dir`. Returns the
/// vocabulary size.
pub fn train_task_tokenizer(dir: &Path, seed: u64, vocab_size: usize) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut texts: Vec<String> = task_rows(seed ^ 0x746f_6b, 4000, 0.2, &TASKS)
        .into_iter()
        .flat_map(|row| row.turns.into_iter().map(|(_, text)| text))
        .collect();
    // The template's role names and the `\n\n` after each header, as often as the turns use them.
    let turns = texts.len();
    texts.extend(["system", "user", "assistant", "\n\n"].iter().flat_map(|s| std::iter::repeat_n(s.to_string(), turns / 2)));

    let mut tokenizer = Tokenizer::new(BPE::default());
    let split = Split::new(SplitPattern::Regex(TASK_SPLIT_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("split pattern: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(LLAMA3_SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;

    let specials: Vec<(usize, &str)> = LLAMA3_SPECIAL_TOKENS
        .iter()
        .map(|t| tokenizer.token_to_id(t).map(|id| (id as usize, *t)).ok_or_else(|| anyhow!("trained tokenizer lacks {t}")))
        .collect::<Result<_>>()?;
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, true).map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    let config = llama3_tokenizer_config(&specials);
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", dir.join("tokenizer_config.json").display()))?;
    Ok(tokenizer.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_follow_from_prompts() {
        for i in 0..200 {
            let e = task_example(3, i, false, false, &TASKS);
            let value = e.answer.strip_prefix("Answer: ").expect("answer prefix");
            match e.task {
                Task::Lookup => {
                    let asked = e.prompt.trim_end_matches('?').rsplit(' ').next().unwrap_or_default().to_string();
                    assert!(e.prompt.contains(&format!(" {asked}={value}")), "{e:?}");
                }
                Task::Add => {
                    let nums: Vec<u32> = e.prompt.trim_start_matches("What is ").trim_end_matches('?').split(" + ").map(|n| n.parse().unwrap()).collect();
                    assert_eq!(value, (nums[0] + nums[1]).to_string());
                }
                Task::Reverse => {
                    let items: Vec<&str> = e.prompt.trim_start_matches("Reverse: ").split(' ').collect();
                    let rev: Vec<&str> = items.into_iter().rev().collect();
                    assert_eq!(value, rev.join(" "));
                }
                Task::Copy => {
                    let inner = e.prompt.split(" | ").nth(1).unwrap();
                    assert_eq!(value, inner);
                }
                Task::Recall => {
                    let item: u64 = e.prompt.trim_end_matches('.').rsplit(' ').next().unwrap().parse().unwrap();
                    assert_eq!(value, recall_fact(item));
                }
            }
        }
    }

    #[test]
    fn held_out_prompts_never_appear_in_training() {
        let train: std::collections::HashSet<String> = (0..4000).map(|i| task_example(0, i, false, false, &TASKS).prompt).collect();
        for i in 0..400 {
            let e = task_example(0, i, true, false, &TASKS);
            assert!(is_held_out(&e.prompt));
            assert!(!train.contains(&e.prompt), "{}", e.prompt);
        }
    }

    #[test]
    fn german_rows_are_tagged() {
        let rows = task_rows(1, 400, 0.25, &TASKS);
        let de = rows.iter().filter(|r| r.language == "de").count();
        assert!((60..140).contains(&de), "{de} German rows of 400");
        assert!(rows.iter().filter(|r| r.language == "de").all(|r| r.turns[1].1.starts_with("Antwort: ")));
    }

    #[test]
    fn trained_tokenizer_has_the_specials_and_single_digits() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = train_task_tokenizer(dir.path(), 0, 512).unwrap();
        assert!(vocab <= 512 && vocab > 400, "{vocab}");
        let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let enc = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\nAnswer: 482<|eot_id|>", false).unwrap();
        let tokens = enc.get_tokens();
        assert_eq!(tokens[0], "<|start_header_id|>");
        assert_eq!(tokens[1], "assistant");
        assert_eq!(tokens[2], "<|end_header_id|>");
        assert_eq!(tokens[3], "ĊĊ");
        assert_eq!(tokens[4], "Answer");
        assert_eq!(tokens.last().map(String::as_str), Some("<|eot_id|>"));
        assert!(tokens.iter().any(|t| t == "4") && tokens.iter().any(|t| t == "8") && tokens.iter().any(|t| t == "2"), "{tokens:?}");
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "assistant\n\nAnswer: 482");
        // Every word of the copy task is one token, the same inside the span and in the answer.
        for word in WORDS {
            let ids = tok.encode(format!("Answer: {word} | {word} |"), false).unwrap().get_ids().to_vec();
            assert_eq!(ids.len(), 6, "{word}: {:?}", tok.encode(format!("Answer: {word} | {word} |"), false).unwrap().get_tokens());
        }
    }
}
