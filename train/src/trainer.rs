//! The step loop: one optimizer step = `gradient_accumulation_steps` micro-batches per rank, loss =
//! Σ token CE / predicted tokens of the whole step (all micro-batches and ranks), gradients reduced
//! across ranks between backward and the update, metrics reduced before logging, only rank 0 writes.
//!
//! [`Trainer`] holds one run on one rank; its phases are [`Trainer::start`] (models, optimizer,
//! resume, the run's log files), then in [`Trainer::run`] for every step
//! [`Trainer::optimizer_step`], [`Trainer::log_step`], [`Trainer::evaluate`] and
//! [`Trainer::checkpoint`], and [`Trainer::finish`] (the last validation loss and `final/`).
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_data::reader::ShardDataset;
use overfill_model::train::backward_loss_sum;
use overfill_model::transformer::Transformer;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::config::{TrainMode, TrainSection};
use crate::dist::train::StepOptimizer;
use crate::eval::evaluate_across_ranks;
use crate::events::EventWriter;
use crate::loader::{Loader, LoaderConfig, StepBatches, StepPosition};
use crate::memory::{cuda_tensor_bytes, process_memory};
use crate::optimizer::{clip_coefficient, learning_rate, warmup_steps, AdamWConfig};
use crate::reducer::GradientReducer;
use crate::inputs::RunInputs;
use crate::run_folder::{self, TrainerState};
use crate::settings::{check_cache_dtype, Settings};

/// A line above the progress bar, or on stderr when there is no bar (not a terminal).
fn say(progress: &ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

/// Everything the loop needs, checked by `train::run`.
pub struct TrainInputs {
    pub settings: Settings,
    pub device: Device,
    pub kind: Kind,
    pub train: Arc<ShardDataset>,
    pub val: Option<ShardDataset>,
    pub steps_per_epoch: usize,
    pub total_steps: u64,
    /// The checkpoint to continue from (`--resume`).
    pub resume_from: Option<(u64, PathBuf)>,
    /// What the run trains on, recorded in its checkpoints.
    pub run_inputs: RunInputs,
}

/// Logged values accumulated since the last log line.
#[derive(Default)]
struct Window {
    loss_sum: f64,
    predicted_tokens: f64,
    target_tokens: f64,
    started: Option<Instant>,
}

/// Keeps the memory libtorch frees for the next step instead of handing it back to the kernel.
///
/// Every step allocates and frees the same tensors. By default glibc gives the free top of its
/// heap back to the kernel, so every step faulted in and zeroed that memory again, page by page.
/// Here the heap is never trimmed, and every allocation below glibc's largest mmap threshold
/// (32 MiB) comes from the heap, including the loss's blocks of logits
/// (`overfill_model::train::loss_sum`); larger tensors are still mapped and unmapped, so they
/// cannot fragment the heap. (PyTorch's CPU tuning guide gets the same by preloading jemalloc
/// or tcmalloc. Transparent huge pages, libtorch's `THP_MEM_ALLOC_ENABLE`, stalled on compaction
/// here: steps of 1.0 to 1.45 s.)
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Trains on these inputs: [`Trainer::start`], then [`Trainer::run`].
pub fn train(inputs: TrainInputs, reducer: &dyn GradientReducer) -> Result<()> {
    Trainer::start(inputs, reducer)?.run()
}

/// What one optimizer step measured, reduced over ranks.
struct StepReport {
    step: u64,
    lr: f64,
    grad_norm: f64,
    /// SIGINT/SIGTERM on any rank: every rank stops after this step.
    stop_requested: bool,
    /// Too many non-finite steps in a row: the run ends with this error after logging the step.
    abort: Option<String>,
}

/// One training run on this rank.
pub struct Trainer<'a> {
    settings: Settings,
    /// `settings.train`, the resolved `[train]` table.
    t: TrainSection,
    device: Device,
    kind: Kind,
    reducer: &'a dyn GradientReducer,
    /// Rank 0 writes the run folder, the step log and the events.
    is_writer: bool,
    /// The frozen full model (overfill mode) and the trainable decoder, in one compute dtype.
    full: Option<Transformer>,
    decoder: Transformer,
    optimizer: StepOptimizer,
    train: Arc<ShardDataset>,
    val: Option<ShardDataset>,
    /// Where the run stands (what a checkpoint saves besides tensors).
    state: TrainerState,
    steps_per_epoch: usize,
    total_steps: u64,
    start_step: u64,
    /// The last step this process trains (`max_steps`, at most the whole schedule).
    end_step: u64,
    warmup: u64,
    events: Option<EventWriter>,
    log_file: Option<File>,
    progress: ProgressBar,
    window: Window,
    last_eval: Option<(u64, f64)>,
    last_saved_step: Option<u64>,
    last_loss: f64,
}

impl<'a> Trainer<'a> {
    /// Loads the models (every rank starting from rank 0's decoder weights), makes the optimizer,
    /// restores the newest checkpoint on `--resume`, and opens rank 0's events and step log.
    pub fn start(inputs: TrainInputs, reducer: &'a dyn GradientReducer) -> Result<Trainer<'a>> {
        let TrainInputs { settings, device, kind, train, val, steps_per_epoch, total_steps, resume_from, run_inputs } = inputs;
        keep_freed_memory();
        let t = settings.train.clone();
        let is_writer = reducer.rank() == 0;
        tch::manual_seed(t.seed as i64);

        let (full, decoder) = load_models(&settings, device, kind)?;
        // Data parallelism: every rank starts from rank 0's weights.
        let params = decoder.parameters();
        reducer.broadcast_from_rank0(&params.iter().map(|(_, p)| p.shallow_clone()).collect::<Vec<_>>())?;
        let mut optimizer = StepOptimizer::new(params, AdamWConfig::from_train(&t), t.zero_stage, reducer)?;

        // Resume: weights (from the fp32 masters), moments and counters of the newest checkpoint.
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            optimizer_steps: 0,
            bad_step_streak: 0,
            skipped_steps: 0,
            skipped_rows: 0,
            predicted_tokens: 0,
            total_steps,
            seed: t.seed,
            rng_state: None,
            settings: t.clone(),
            inputs: Some(run_inputs.clone()),
        };
        if let Some((step, dir)) = &resume_from {
            let saved = run_folder::read_state(dir)?;
            if saved.total_steps != total_steps {
                bail!(
                    "{} was written by a run of {} steps; with this data and batch the run has {total_steps}: the shards changed?",
                    dir.display(),
                    saved.total_steps
                );
            }
            optimizer
                .load_from(dir, saved.optimizer_steps, reducer)
                .with_context(|| format!("restoring the optimizer from {}", dir.display()))?;
            eprintln!("resuming from {} (step {step} of {total_steps})", dir.display());
            state = TrainerState { settings: t.clone(), inputs: Some(run_inputs), ..saved };
        }
        let start_step = state.step;
        let end_step = t.max_steps.unwrap_or(total_steps).min(total_steps);
        let warmup = warmup_steps(t.warmup_ratio, total_steps);
        let resumed = resume_from.is_some();
        let (events, log_file) = if is_writer { open_run_logs(&settings, resumed, start_step)? } else { (None, None) };
        Ok(Trainer {
            settings,
            t,
            device,
            kind,
            reducer,
            is_writer,
            full,
            decoder,
            optimizer,
            train,
            val,
            state,
            steps_per_epoch,
            total_steps,
            start_step,
            end_step,
            warmup,
            events,
            log_file,
            // Replaced by the step bar once the loop starts.
            progress: ProgressBar::hidden(),
            window: Window::default(),
            last_eval: None,
            last_saved_step: None,
            last_loss: f64::NAN,
        })
    }

    /// Steps `start_step + 1 ..= end_step`, each followed by its log line, and by a validation
    /// loss and a checkpoint when they are due; then [`Trainer::finish`]. SIGINT/SIGTERM end the
    /// run after a step with a checkpoint.
    pub fn run(mut self) -> Result<()> {
        let (start_step, end_step) = (self.start_step, self.end_step);
        if start_step >= end_step {
            eprintln!("the run is already at step {start_step} (stop at {end_step}): nothing to train");
            if self.is_writer {
                crate::resume::complete_final(&self.settings.out, &self.decoder, &self.settings.decoder, &self.state)?;
            }
            return Ok(());
        }
        if self.is_writer {
            self.announce();
        }
        let loader = Loader::spawn(self.train.clone(), self.loader_config(), start_step + 1, end_step)?;
        self.progress = if self.is_writer { ProgressBar::new(end_step) } else { ProgressBar::hidden() };
        self.progress.set_style(
            ProgressStyle::with_template("train {bar:30} {pos}/{len} steps | {msg} [{elapsed_precise} < {eta_precise}]")
                .expect("valid progress template"),
        );
        self.progress.set_position(start_step);
        self.progress.reset_eta();

        for step in start_step + 1..=end_step {
            self.window.started.get_or_insert_with(Instant::now);
            let batches = loader.next()?;
            debug_assert_eq!(batches.position.step, step);
            let report = self.optimizer_step(step, batches)?;
            self.log_step(&report)?;
            if let Some(message) = report.abort {
                self.flush_events()?;
                self.progress.abandon();
                bail!(message);
            }
            if self.t.eval_steps > 0 && step % self.t.eval_steps == 0 {
                if let Some(loss) = self.evaluate(step)? {
                    say(&self.progress, format!("step {step}: eval/loss {loss:.4}"));
                    self.last_eval = Some((step, loss));
                }
            }
            let stopping_early = (step == end_step && end_step < self.total_steps) || report.stop_requested;
            let save_steps = self.t.save_steps;
            if (save_steps > 0 && step % save_steps == 0) || stopping_early || (step == end_step && save_steps > 0) {
                self.checkpoint(step)?;
            }
            if report.stop_requested {
                self.flush_events()?;
                self.progress.abandon();
                if self.is_writer {
                    eprintln!(
                        "stopped by SIGINT/SIGTERM after step {step}: checkpoint saved in {}; continue with --resume",
                        self.settings.out.display()
                    );
                }
                return Ok(());
            }
            self.flush_events()?;
        }
        drop(loader);
        self.progress.finish_and_clear();
        self.finish()
    }

    /// One optimizer step over this step's micro-batches: forward and backward of each (its loss
    /// divided by the global token count), gradients reduced across ranks, then the clipped update
    /// — or a skipped step when no row fit or the loss or gradient is not finite.
    fn optimizer_step(&mut self, step: u64, batches: StepBatches) -> Result<StepReport> {
        let t = &self.t;
        let total_tokens = batches.global_predicted_tokens;
        let lr = learning_rate(t.learning_rate, t.lr_schedule, self.warmup, self.total_steps, step);

        self.optimizer.zero_grad();
        let mut abort: Option<String> = None;
        let mut local_loss = Tensor::zeros([], (Kind::Double, self.device));
        if total_tokens > 0 {
            for micro in batches.micro.into_iter().flatten() {
                let batch = micro.to_device(self.device);
                let scale = 1.0 / total_tokens as f64;
                let sum = backward_loss_sum(&self.decoder, self.full.as_ref(), &batch, scale, t.activation_checkpointing)
                    .with_context(|| format!("step {step}"))?;
                local_loss += sum.to_kind(Kind::Double);
                self.optimizer.accumulate_micro_batch(self.reducer)?;
            }
        }
        self.optimizer.reduce_gradients(self.reducer)?;
        // The loss sum and a stop request (SIGINT/SIGTERM on any rank) in one reduction, so every
        // rank stops after the same step.
        let mut sums = [local_loss.double_value(&[]), if crate::dist::stop::requested() { 1.0 } else { 0.0 }];
        self.reducer.all_reduce_sum(&mut sums)?;
        let stop_requested = sums[1] > 0.0;
        let loss = sums[0] / total_tokens as f64;
        let grad_norm = self.optimizer.grad_norm(self.reducer)?;

        let state = &mut self.state;
        state.skipped_rows += batches.global_skipped_rows as u64;
        if total_tokens == 0 {
            // Every row of this global batch was too long: nothing to learn from, not a bad step.
            state.skipped_steps += 1;
        } else if !(loss.is_finite() && grad_norm.is_finite()) {
            self.optimizer.zero_grad();
            state.skipped_steps += 1;
            state.bad_step_streak += 1;
            say(&self.progress, format!("step {step}: {}; step skipped", non_finite_values(loss, grad_norm)));
            if state.bad_step_streak >= t.max_bad_steps {
                abort = Some(format!(
                    "{} optimizer steps in a row had a non-finite loss or gradient (the last at step {step}: loss {loss}, \
                     gradient norm {grad_norm}); stopping. Lower the learning rate (now {}) or check the data; \
                     the newest checkpoint in {} is unaffected",
                    state.bad_step_streak,
                    t.learning_rate,
                    self.settings.out.display()
                ));
            }
        } else {
            self.optimizer.step(lr, clip_coefficient(grad_norm, t.max_grad_norm), self.reducer)?;
            state.bad_step_streak = 0;
            state.predicted_tokens += total_tokens as u64;
            self.window.loss_sum += sums[0];
            self.window.predicted_tokens += total_tokens as f64;
            self.last_loss = loss;
        }
        self.window.target_tokens += batches.global_target_tokens as f64;
        let next = StepPosition::of(step + 1, self.steps_per_epoch);
        state.step = step;
        state.epoch = next.epoch;
        state.step_in_epoch = next.step_in_epoch;
        state.optimizer_steps = self.optimizer.steps();
        Ok(StepReport { step, lr, grad_norm, stop_requested, abort })
    }

    /// The progress bar after every step; every `logging_steps` (and at the last or an aborted
    /// step) the window's mean loss and the step's numbers to TensorBoard, the step log and, with
    /// no terminal, stderr.
    fn log_step(&mut self, report: &StepReport) -> Result<()> {
        let StepReport { step, lr, grad_norm, .. } = *report;
        let window = &self.window;
        let elapsed = window.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or_default();
        let tokens_per_sec = window.target_tokens / elapsed.max(1e-9);
        self.progress.set_message(format!("loss {:.4} | lr {lr:.2e} | {tokens_per_sec:.0} tok/s", self.last_loss));
        self.progress.set_position(step);
        if !(step % self.t.logging_steps == 0 || step == self.end_step || report.abort.is_some()) {
            return Ok(());
        }
        let window_loss = window.loss_sum / window.predicted_tokens;
        if let Some(events) = &mut self.events {
            let mut scalars = vec![
                ("train/lr", lr),
                ("train/grad_norm", grad_norm),
                ("train/tokens_per_sec", tokens_per_sec),
                ("train/skipped_steps", self.state.skipped_steps as f64),
            ];
            if window.predicted_tokens > 0.0 {
                scalars.push(("train/loss", window_loss));
            }
            let mut memory = process_memory();
            if let Device::Cuda(i) = self.device {
                // The caching allocator's peak since the run started (the planner's GPU check).
                memory.cuda_peak_allocated_bytes = cuda_tensor_bytes(i).map(|b| b.peak);
            }
            scalars.extend(memory.scalars());
            events.scalars(step, &scalars)?;
        }
        if let Some(file) = &mut self.log_file {
            use std::io::Write;
            let record = json!({
                "step": step,
                "epoch": StepPosition::of(step, self.steps_per_epoch).epoch,
                "loss": (window.predicted_tokens > 0.0).then_some(window_loss),
                "lr": lr,
                "grad_norm": grad_norm,
                "predicted_tokens": window.predicted_tokens,
                "tokens_per_sec": tokens_per_sec,
                "skipped_steps": self.state.skipped_steps,
                "skipped_rows": self.state.skipped_rows,
            });
            writeln!(file, "{record}").context("writing the step log")?;
        }
        if self.progress.is_hidden() && self.is_writer {
            // No terminal (a batch job's log): one line per logged step instead of the bar.
            let loss = if window.predicted_tokens > 0.0 { format!("{window_loss:.4}") } else { "n/a".into() };
            eprintln!(
                "step {step}/{}: loss {loss} | lr {lr:.3e} | grad norm {grad_norm:.3} | {tokens_per_sec:.0} tok/s | skipped steps {}",
                self.end_step, self.state.skipped_steps
            );
        }
        self.window = Window::default();
        Ok(())
    }

    /// The validation loss at `step` (None without val rows or predicted tokens): each rank scores
    /// its share of the validation batches and the totals are summed over ranks.
    fn evaluate(&mut self, step: u64) -> Result<Option<f64>> {
        let Some(val) = &self.val else { return Ok(None) };
        let t = &self.t;
        let (totals, rows_per_rank) = evaluate_across_ranks(
            &self.decoder,
            self.full.as_ref(),
            val,
            t.per_device_batch_size,
            t.eval_max_rows,
            Some(t.max_seq_length),
            self.reducer,
        )?;
        if totals.predicted_tokens == 0 {
            return Ok(None);
        }
        let loss = totals.mean();
        if let Some(events) = &mut self.events {
            events.scalar("eval/loss", step, loss)?;
        }
        if let Some(file) = &mut self.log_file {
            use std::io::Write;
            let record = json!({
                "step": step,
                "eval_loss": loss,
                "eval_tokens": totals.predicted_tokens,
                "eval_rows": totals.rows,
                "eval_rows_per_rank": rows_per_rank,
            });
            writeln!(file, "{record}").context("writing the step log")?;
        }
        Ok(Some(loss))
    }

    /// `checkpoint-STEP`: every rank writes its optimizer files (ZeRO-1 slices), rank 0 the folder.
    fn checkpoint(&mut self, step: u64) -> Result<()> {
        let rank_files = self.optimizer.write_rank_files(&self.settings.out, step, self.reducer)?;
        if self.is_writer {
            let dir = run_folder::save_checkpoint_folder(
                &self.settings.out,
                &self.decoder,
                &self.settings.decoder,
                &self.optimizer.state_tensors(),
                &rank_files,
                &self.state,
                self.t.save_total_limit,
            )?;
            self.last_saved_step = Some(step);
            say(&self.progress, format!("step {step}: saved {}", dir.display()));
        }
        Ok(())
    }

    /// After the last step: the validation loss at `end_step` (unless just computed), then rank 0
    /// writes `final/` (the decoder and where the run ended) and the run's summary line.
    fn finish(mut self) -> Result<()> {
        let end_step = self.end_step;
        if self.last_eval.map(|(s, _)| s) != Some(end_step) {
            if let Some(loss) = self.evaluate(end_step)? {
                self.last_eval = Some((end_step, loss));
            }
        }
        if !self.is_writer {
            return Ok(());
        }
        let final_dir = run_folder::save_final_folder(&self.settings.out, &self.decoder, &self.settings.decoder, &self.state)?;
        self.flush_events()?;
        let mode = match self.t.mode {
            TrainMode::Overfill => "overfill",
            TrainMode::Pruned => "pruned",
            TrainMode::Sft => "sft",
        };
        eprintln!(
            "{mode}: steps {}..{end_step} of {}, last train loss {:.4}{}, {} skipped steps, {} skipped rows; decoder saved to {}{}",
            self.start_step + 1,
            self.total_steps,
            self.last_loss,
            self.last_eval.map(|(_, l)| format!(", eval loss {l:.4}")).unwrap_or_default(),
            self.state.skipped_steps,
            self.state.skipped_rows,
            final_dir.display(),
            self.last_saved_step.map(|s| format!(" (checkpoint at step {s})")).unwrap_or_default(),
        );
        Ok(())
    }

    /// Rank 0's first line: what is trained, on what, for how many steps.
    fn announce(&self) {
        let (t, settings, world_size) = (&self.t, &self.settings, self.reducer.world_size());
        eprintln!(
            "{:?} training of {} ({} parameters{}): {} train rows, {} steps per epoch × {} epochs = {} steps \
             (global batch {} rows = {} per device × {} accumulation × {} ranks), warmup {}; steps {}..{} on {:?} in {:?}",
            t.mode,
            settings.decoder.display(),
            self.decoder.config.param_count(),
            settings.full.as_ref().map(|f| format!(", frozen full model {}", f.display())).unwrap_or_default(),
            self.train.len(),
            self.steps_per_epoch,
            t.num_epochs,
            self.total_steps,
            settings.global_batch_rows(world_size),
            t.per_device_batch_size,
            t.gradient_accumulation_steps,
            world_size,
            self.warmup,
            self.start_step + 1,
            self.end_step,
            self.device,
            self.kind,
        );
    }

    fn loader_config(&self) -> LoaderConfig {
        let t = &self.t;
        LoaderConfig {
            seed: t.seed,
            global_batch_rows: self.settings.global_batch_rows(self.reducer.world_size()),
            group_batches: t.length_group_batches,
            accumulation_steps: t.gradient_accumulation_steps,
            rank: self.reducer.rank(),
            world_size: self.reducer.world_size(),
            max_seq_length: t.max_seq_length,
            steps_per_epoch: self.steps_per_epoch,
            prefetch_batches: t.prefetch_batches,
        }
    }

    fn flush_events(&mut self) -> Result<()> {
        if let Some(events) = &mut self.events {
            events.flush()?;
        }
        Ok(())
    }
}

/// The frozen full model (overfill mode, no gradients) and the trainable decoder.
fn load_models(settings: &Settings, device: Device, kind: Kind) -> Result<(Option<Transformer>, Transformer)> {
    let full = match &settings.full {
        Some(dir) => {
            let full = Transformer::load(dir, device, kind).with_context(|| format!("loading the full model {}", dir.display()))?;
            full.set_requires_grad(false);
            Some(full)
        }
        None => None,
    };
    let decoder = Transformer::load(&settings.decoder, device, kind)
        .with_context(|| format!("loading the decoder {}", settings.decoder.display()))?;
    if let Some(full) = &full {
        check_cache_dtype(full.kind(), decoder.kind())?;
    }
    decoder.set_requires_grad(true);
    Ok((full, decoder))
}

/// Rank 0's TensorBoard events (with the recipe at step 0 on a fresh run) and its step log, from
/// which a resumed run first drops the steps after its checkpoint.
fn open_run_logs(settings: &Settings, resumed: bool, start_step: u64) -> Result<(Option<EventWriter>, Option<File>)> {
    let mut events = EventWriter::create(&settings.out, resumed.then_some(start_step + 1))?;
    if !resumed {
        events.text("recipe", 0, &format!("```toml\n{}\n```", settings.recipe_toml))?;
    }
    run_folder::truncate_log(&settings.out, start_step)?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(settings.out.join(run_folder::LOG_FILE))
        .context("opening the step log")?;
    Ok((Some(events), Some(log_file)))
}

/// What was not finite in a skipped step: the loss, the gradient norm or both.
fn non_finite_values(loss: f64, grad_norm: f64) -> String {
    match (loss.is_finite(), grad_norm.is_finite()) {
        (false, true) => format!("non-finite loss {loss} (gradient norm {grad_norm})"),
        (true, false) => format!("non-finite gradient norm {grad_norm} (loss {loss})"),
        _ => format!("non-finite loss {loss} and gradient norm {grad_norm}"),
    }
}

#[cfg(test)]
mod tests {
    use super::non_finite_values;

    #[test]
    fn a_skipped_step_names_what_was_not_finite() {
        assert_eq!(non_finite_values(6.25, f64::NAN), "non-finite gradient norm NaN (loss 6.25)");
        assert_eq!(non_finite_values(f64::INFINITY, 1.5), "non-finite loss inf (gradient norm 1.5)");
        assert_eq!(non_finite_values(f64::NAN, f64::NAN), "non-finite loss NaN and gradient norm NaN");
    }
}
