//! The batching engine: one OS thread owns the models and runs every forward pass.
//!
//! Continuous batching. Every prompt of a request is a sequence. Sequences wait in a queue
//! until the running batch has a free row; between two decode steps the waiting ones are
//! prefilled together by the full model (left-padded, a fresh KV cache), their first tokens
//! chosen from its last logits, and their cache rows merged into the running batch's cache
//! (`batch_cache`). Each decode step then feeds every running row its latest token through the
//! decode model (the pruned decoder with `--decoder`, else the full model). A row that hits a
//! stop id, a stop string or its max_tokens, or whose client went away, leaves the batch (its
//! cache row is removed) without disturbing the others.
//!
//! This is `overfill_model::generate::generate` unrolled so that rows can come and go: for one
//! sequence alone it runs the same tensor operations, so greedy output equals `overfill generate`.
//!
//! With `--speculative K` (and a decoder) every answer is the full model's own: each step is a
//! round of speculative decoding (`overfill_model::speculative::round`: the decoder drafts up to K
//! tokens, the full model verifies them in one pass, each row keeps its agreed prefix plus the full
//! model's token). Every row verifies with its own sampler: greedy rows keep exactly the drafts
//! that are the full model's argmax, sampled rows (their own temperature, top-k, top-p and seed)
//! follow the speculative-sampling rule, so each answer is distributed as the full model's.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use overfill_model::generate::{left_pad, prefill, Prefill};
use overfill_model::kv_cache::KvCache;
use overfill_model::sampling::{Sampler, Sampling};
use overfill_model::transformer::Transformer;
use tch::{Kind, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use super::batch_cache::{concat_rows, select_rows};

mod speculative_step;
use super::metrics::Metrics;
use super::text::{find_stop, streamable_len, IncrementalText, TextCodec};

/// How one sequence is generated.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Tokens generated at most (the stop id that ends a row counts).
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// The text ends before the first of these (not included).
    pub stop_strings: Vec<String>,
    /// A generated id among these ends the row (its text is not included).
    pub stop_ids: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the engine tells a request about one of its sequences (`index` = the prompt's place).
#[derive(Debug)]
pub enum Event {
    Text {
        index: usize,
        delta: String,
    },
    Done {
        index: usize,
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed {
        message: String,
    },
}

/// One prompt to generate from.
pub struct Sequence {
    pub index: usize,
    pub prompt_ids: Vec<i64>,
    pub params: GenerationParams,
    /// Dropped by the HTTP side when the client goes away: the sequence is then abandoned.
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `queued` sequences; `max` at most.
    QueueFull { queued: usize, max: usize },
    /// The engine thread has stopped.
    Stopped,
}

/// The HTTP side's end of the engine: submits sequences, enforcing the queue limit.
#[derive(Clone)]
pub struct EngineHandle {
    sender: Sender<Sequence>,
    /// Sequences submitted and not yet admitted to the batch.
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues all `sequences` of a request, or none of them.
    pub fn submit(&self, sequences: Vec<Sequence>) -> Result<(), SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        let n = sequences.len();
        let reserved = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| {
                (queued + n <= self.max_queue).then_some(queued + n)
            });
        if let Err(queued) = reserved {
            return Err(SubmitError::QueueFull {
                queued,
                max: self.max_queue,
            });
        }
        self.metrics
            .queue_depth
            .set(self.queued.load(Ordering::SeqCst) as i64);
        for sequence in sequences {
            if self.sender.send(sequence).is_err() {
                return Err(SubmitError::Stopped);
            }
        }
        Ok(())
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Sequences the queue holds at most (--max-queue).
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

pub struct Models {
    /// Prefills prompts and chooses each sequence's first token.
    pub prefill: Transformer,
    /// Decodes every later token; `None` = the prefill model decodes too.
    pub decode: Option<Transformer>,
    /// `Some(K)` with `decode`: `decode` drafts up to K tokens per step and `prefill` verifies
    /// them (lossless two-stage decoding).
    pub speculative: Option<usize>,
}

/// Marks the engine stopped however its thread ends (a panic included) and wakes whoever
/// waits for that (the server, which then shuts down instead of answering 503 forever).
struct StoppedOnDrop {
    alive: Arc<AtomicBool>,
    stopped: Arc<tokio::sync::Notify>,
}

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.stopped.notify_one();
    }
}

/// Starts the engine thread: `load` runs on it (the models never leave it). Returns once the
/// models are loaded, with the handle and the thread (it ends when every handle is dropped
/// and the last sequence has finished). `stopped` is notified when the thread ends.
pub fn spawn(
    load: impl FnOnce() -> Result<Models> + Send + 'static,
    codec: Arc<TextCodec>,
    max_batch_size: usize,
    max_queue: usize,
    metrics: Arc<Metrics>,
    stopped: Arc<tokio::sync::Notify>,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (sender, receiver) = crossbeam_channel::unbounded();
    let queued = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicBool::new(true));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let engine_queued = queued.clone();
    let engine_alive = alive.clone();
    let engine_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("overfill-engine".into())
        .spawn(move || {
            let _stopped = StoppedOnDrop {
                alive: engine_alive,
                stopped,
            };
            let models = match load() {
                Ok(models) => {
                    let _ = ready_tx.send(Ok(()));
                    models
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut engine = Engine {
                pad_token_id: models
                    .prefill
                    .config
                    .eos_token_ids
                    .first()
                    .copied()
                    .unwrap_or(0),
                models,
                codec,
                metrics: engine_metrics,
                max_batch_size,
                queued: engine_queued,
                receiver,
                waiting: VecDeque::new(),
                rows: Vec::new(),
                cache: None,
            };
            engine.run();
        })
        .context("starting the engine thread")?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => bail!("the engine thread stopped while loading the models"),
    }
    Ok((
        EngineHandle {
            sender,
            queued,
            max_queue,
            alive,
            metrics,
        },
        thread,
    ))
}

/// A sequence in the running batch.
struct Row {
    sequence: Sequence,
    sampler: Sampler,
    generated: Vec<i64>,
    text: IncrementalText,
    /// Bytes of `text` already sent to the client.
    sent: usize,
    /// Rope position of the latest generated token (fed at the next decode step).
    position: i64,
    finished: bool,
}

struct Engine {
    models: Models,
    codec: Arc<TextCodec>,
    metrics: Arc<Metrics>,
    max_batch_size: usize,
    pad_token_id: i64,
    queued: Arc<AtomicUsize>,
    receiver: Receiver<Sequence>,
    waiting: VecDeque<Sequence>,
    /// Row i of `cache` belongs to `rows[i]`.
    rows: Vec<Row>,
    cache: Option<KvCache>,
}

impl Engine {
    fn run(&mut self) {
        loop {
            if self.rows.is_empty() && self.waiting.is_empty() {
                // Idle: wait for work; every handle dropped (the server stopped) ends the thread.
                match self.receiver.recv() {
                    Ok(sequence) => self.waiting.push_back(sequence),
                    Err(_) => return,
                }
            }
            while let Ok(sequence) = self.receiver.try_recv() {
                self.waiting.push_back(sequence);
            }
            self.drop_abandoned_waiting();
            self.admit();
            if !self.rows.is_empty() {
                if let Err(e) = self.decode_step() {
                    let message = format!("decode step failed: {e:#}");
                    eprintln!("overfill serve: {message}");
                    self.metrics.running.set(0);
                    for row in self.rows.drain(..) {
                        let _ = row.sequence.events.send(Event::Failed {
                            message: message.clone(),
                        });
                    }
                    self.cache = None;
                }
            }
            self.metrics.running.set(self.rows.len() as i64);
        }
    }

    fn set_queued(&self, removed: usize) {
        let before = self.queued.fetch_sub(removed, Ordering::SeqCst);
        self.metrics.queue_depth.set((before - removed) as i64);
    }

    /// Waiting sequences whose client is gone never start.
    fn drop_abandoned_waiting(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.events.is_closed());
        let dropped = before - self.waiting.len();
        if dropped > 0 {
            self.metrics.cancelled.inc_by(dropped as u64);
            self.set_queued(dropped);
        }
    }

    /// Prefills as many waiting sequences as the batch has room for and merges them in.
    fn admit(&mut self) {
        let room = self.max_batch_size.saturating_sub(self.rows.len());
        let n = room.min(self.waiting.len());
        if n == 0 {
            return;
        }
        let newcomers: Vec<Sequence> = self.waiting.drain(..n).collect();
        self.set_queued(n);
        // Newcomers run from here on; each leaves the count before its client hears the end
        // (`accept_token`), so a client never sees itself still counted.
        self.metrics.running.set((self.rows.len() + n) as i64);
        let mut rows: Vec<Row> = newcomers
            .into_iter()
            .map(|sequence| Row {
                sampler: Sampler::new(sequence.params.sampling.clone()),
                position: sequence.prompt_ids.len() as i64,
                generated: Vec::new(),
                text: IncrementalText::default(),
                sent: 0,
                finished: false,
                sequence,
            })
            .collect();
        match self.prefill(&mut rows) {
            Ok(cache) => {
                // Rows that finished on their first token never join.
                let keep: Vec<i64> = (0..rows.len() as i64)
                    .filter(|&i| !rows[i as usize].finished)
                    .collect();
                let joined = if keep.len() == rows.len() {
                    Ok(Some(cache))
                } else {
                    select_rows(&cache, &keep)
                };
                let merged = joined.and_then(|joining| match (self.cache.take(), joining) {
                    (Some(running), Some(joining)) => concat_rows(&running, &joining).map(Some),
                    (running, None) => Ok(running),
                    (None, joining) => Ok(joining),
                });
                match merged {
                    Ok(cache) => {
                        self.cache = cache;
                        self.rows.extend(rows.into_iter().filter(|r| !r.finished));
                    }
                    Err(e) => {
                        // The running rows' cache is gone with the failed merge: fail them too.
                        let message = format!("merging into the running batch failed: {e:#}");
                        eprintln!("overfill serve: {message}");
                        self.metrics.running.set(0);
                        let failed = self.rows.drain(..).chain(rows);
                        for row in failed.filter(|r| !r.finished) {
                            let _ = row.sequence.events.send(Event::Failed {
                                message: message.clone(),
                            });
                        }
                        self.cache = None;
                    }
                }
            }
            Err(e) => {
                let message = format!("prefill failed: {e:#}");
                eprintln!("overfill serve: {message}");
                self.metrics.running.set(self.rows.len() as i64);
                for row in rows {
                    let _ = row.sequence.events.send(Event::Failed {
                        message: message.clone(),
                    });
                }
            }
        }
    }

    /// The full model over the newcomers' prompts: their cache and their first tokens.
    fn prefill(&mut self, rows: &mut [Row]) -> Result<KvCache> {
        let model = &self.models.prefill;
        let prompts: Vec<Vec<i64>> = rows.iter().map(|r| r.sequence.prompt_ids.clone()).collect();
        let start = Instant::now();
        let batch = left_pad(&prompts, self.pad_token_id, model.device())?;
        let Prefill { cache, last_logits, .. } = prefill(model, &batch)?;
        let ids = choose(&last_logits, rows)?;
        let seconds = start.elapsed().as_secs_f64();
        let tokens: usize = prompts.iter().map(Vec::len).sum();
        self.metrics.prompt_tokens.inc_by(tokens as u64);
        self.metrics.prefill_seconds.inc_by(seconds);
        self.metrics
            .prefill_tokens_per_second
            .set(tokens as f64 / seconds.max(1e-9));
        for (row, id) in rows.iter_mut().zip(ids) {
            self.accept_token(row, id);
        }
        Ok(cache)
    }

    /// One token for every running row through the decode model (with `--speculative`: one
    /// speculative round, 1 to K + 1 tokens per row).
    fn decode_step(&mut self) -> Result<()> {
        self.remove_done_rows()?;
        if self.rows.is_empty() {
            return Ok(());
        }
        if let Some(k) = self.models.speculative {
            return self.speculative_step(k);
        }
        let rows = self.rows.len() as i64;
        let device = self.models.prefill.device();
        let start = Instant::now();
        let (ids, positions) = self.newest_tokens();
        let Some(cache) = self.cache.as_mut() else {
            bail!("internal: running rows without a KV cache");
        };
        let Some(cached_mask) = cache.attention_mask() else {
            bail!("internal: a KV cache that was never written");
        };
        let ones = Tensor::ones([rows, 1], (Kind::Int64, device));
        let mask = Tensor::cat(&[cached_mask, &ones], 1);
        let model = self.models.decode.as_ref().unwrap_or(&self.models.prefill);
        // Every running row's last id was sampled from the models' shared vocabulary (a row
        // enters the batch with its first token): no per-step range check, no device sync.
        let logits = model
            .forward_sampled(&ids, &positions, &mask, cache)
            .context("decode step")?
            .select(1, 0); // [B, V]
        let mut batch = std::mem::take(&mut self.rows);
        let next = choose(&logits, &mut batch);
        self.record_decode_step(rows as usize, rows as usize, start);
        match next {
            Ok(next) => {
                for (row, id) in batch.iter_mut().zip(next) {
                    row.position += 1;
                    self.accept_token(row, id);
                }
                self.rows = batch;
            }
            Err(e) => {
                self.rows = batch;
                return Err(e);
            }
        }
        self.remove_done_rows()
    }

    /// Every running row's newest token (chosen, not yet in the cache) and its rope position,
    /// both [B, 1] on the models' device.
    fn newest_tokens(&self) -> (Tensor, Tensor) {
        let rows = self.rows.len() as i64;
        let device = self.models.prefill.device();
        let ids: Vec<i64> = self
            .rows
            .iter()
            .map(|r| r.generated.last().copied().unwrap_or(self.pad_token_id))
            .collect();
        let positions: Vec<i64> = self.rows.iter().map(|r| r.position).collect();
        (
            Tensor::from_slice(&ids).view([rows, 1]).to_device(device),
            Tensor::from_slice(&positions).view([rows, 1]).to_device(device),
        )
    }

    /// The decode metrics of one step that began at `start` and gave `tokens` tokens to `rows`
    /// rows.
    fn record_decode_step(&self, rows: usize, tokens: usize, start: Instant) {
        let seconds = start.elapsed().as_secs_f64();
        self.metrics.decode_seconds.inc_by(seconds);
        self.metrics.decode_step_seconds.observe(seconds);
        self.metrics.batch_size.observe(rows as f64);
        self.metrics
            .decode_tokens_per_second
            .set(tokens as f64 / seconds.max(1e-9));
    }

    /// Finished rows and rows whose client went away leave the batch and its cache.
    fn remove_done_rows(&mut self) -> Result<()> {
        // Decided once: a client may go away while this runs.
        let stays: Vec<bool> = self
            .rows
            .iter()
            .map(|r| !r.finished && !r.sequence.events.is_closed())
            .collect();
        if stays.iter().all(|&s| s) {
            return Ok(());
        }
        let abandoned = self
            .rows
            .iter()
            .zip(&stays)
            .filter(|(r, &s)| !s && !r.finished)
            .count();
        self.metrics.cancelled.inc_by(abandoned as u64);
        let keep: Vec<i64> = (0..stays.len() as i64)
            .filter(|&i| stays[i as usize])
            .collect();
        self.cache = match &self.cache {
            Some(cache) => select_rows(cache, &keep)?,
            None => None,
        };
        let rows = std::mem::take(&mut self.rows);
        self.rows = rows
            .into_iter()
            .zip(stays)
            .filter_map(|(row, stays)| stays.then_some(row))
            .collect();
        Ok(())
    }

    /// Records a row's new token and tells its client: new text (held back while it may still
    /// become a stop string), and the end when the row stops.
    fn accept_token(&self, row: &mut Row, id: i64) {
        row.generated.push(id);
        self.metrics.generated_tokens.inc();
        if row.generated.len() == 1 {
            self.metrics
                .time_to_first_token
                .observe(row.sequence.arrived.elapsed().as_secs_f64());
        }
        let params = &row.sequence.params;
        let hit_stop_id = params.stop_ids.contains(&id);
        let out_of_tokens = row.generated.len() >= params.max_tokens;
        if hit_stop_id {
            // The stop id's own text is not part of the answer.
            let ids = &row.generated[..row.generated.len() - 1];
            row.text.update(&self.codec, ids, true);
        } else {
            row.text.update(&self.codec, &row.generated, out_of_tokens);
        }
        // No stop string starts in what was sent (a possible start is held back), so only the
        // rest is searched.
        let unsent = &row.text.text[row.sent..];
        let (visible, finish) = if let Some(at) = find_stop(unsent, &params.stop_strings) {
            (at, Some(FinishReason::Stop))
        } else if hit_stop_id {
            (unsent.len(), Some(FinishReason::Stop))
        } else if out_of_tokens {
            (unsent.len(), Some(FinishReason::Length))
        } else {
            (streamable_len(unsent, &params.stop_strings), None)
        };
        let events = &row.sequence.events;
        if visible > 0 {
            let _ = events.send(Event::Text {
                index: row.sequence.index,
                delta: unsent[..visible].to_string(),
            });
            row.sent += visible;
        }
        if let Some(finish_reason) = finish {
            row.finished = true;
            self.metrics.running.dec();
            let _ = events.send(Event::Done {
                index: row.sequence.index,
                finish_reason,
                prompt_tokens: row.sequence.prompt_ids.len(),
                completion_tokens: row.generated.len(),
            });
        }
    }
}

/// Each row's next token from logits [B, V]: argmax for greedy rows, the row's own sampler
/// (own seed and generator) for the others.
fn choose(logits: &Tensor, rows: &mut [Row]) -> Result<Vec<i64>> {
    let any_greedy = rows
        .iter()
        .any(|r| *r.sampler.sampling() == Sampling::Greedy);
    let mut ids = if any_greedy {
        Vec::<i64>::try_from(logits.argmax(-1, false))?
    } else {
        vec![0; rows.len()]
    };
    for (i, row) in rows.iter_mut().enumerate() {
        if *row.sampler.sampling() != Sampling::Greedy {
            let chosen = row.sampler.choose(&logits.narrow(0, i as i64, 1));
            ids[i] = Vec::<i64>::try_from(chosen)?[0];
        }
    }
    Ok(ids)
}
