//! The step loop: one optimizer step = `gradient_accumulation_steps` micro-batches per rank, loss =
//! Σ token CE / predicted tokens of the whole step (all micro-batches and ranks), gradients reduced
//! across ranks between backward and the update, metrics reduced before logging, only rank 0 writes.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_data::reader::ShardDataset;
use overfill_model::train::loss_sum;
use overfill_model::transformer::Transformer;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::config::TrainMode;
use super::events::EventWriter;
use super::loader::{Loader, LoaderConfig, StepPosition};
use super::memory::process_memory;
use super::optimizer::{clip_coefficient, learning_rate, warmup_steps, AdamWConfig};
use crate::dist::train::StepOptimizer;
use super::run_folder::{self, TrainerState};
use super::settings::{check_cache_dtype, Settings};
use crate::eval_loss::evaluate_across_ranks;

/// What data parallelism plugs in between backward and the optimizer step. At world size 1
/// every reduction is the identity.
pub trait GradientReducer {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums every rank's gradients in place (each micro-batch's loss is already divided by the
    /// global token count, so the sum is the gradient of the global token mean).
    fn all_reduce_gradients(&self, gradients: &mut [Tensor]) -> Result<()>;
    /// Sums host-side metrics (loss sums, token counts) over ranks in place.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;
    /// Copies rank 0's tensors into every rank's (the decoder's weights at start).
    fn broadcast_from_rank0(&self, _tensors: &[Tensor]) -> Result<()> {
        Ok(())
    }
    /// `output` = this rank's slice of the sum over ranks of `input` (ZeRO-1's gradients).
    fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        tch::no_grad(|| output.view([-1]).copy_(&input.view([-1])));
        Ok(())
    }
    /// `output` = every rank's `input`, end to end in rank order (ZeRO-1's parameters).
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        tch::no_grad(|| output.view([-1]).copy_(&input.view([-1])));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// One process, no communication.
#[allow(dead_code)] // `train::run` passes a `Dist`, which is this at world size 1.
pub struct SingleProcess;

impl GradientReducer for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_gradients(&self, _gradients: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

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

pub fn train(inputs: TrainInputs, reducer: &dyn GradientReducer) -> Result<()> {
    let TrainInputs { settings, device, kind, train, val, steps_per_epoch, total_steps, resume_from } = inputs;
    keep_freed_memory();
    let t = settings.train.clone();
    let is_writer = reducer.rank() == 0;
    tch::manual_seed(t.seed as i64);

    // Models: the frozen full model (overfill) and the trainable decoder, one compute dtype.
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
        state = TrainerState { settings: t.clone(), ..saved };
    }
    let start_step = state.step;
    let end_step = t.max_steps.unwrap_or(total_steps).min(total_steps);
    let warmup = warmup_steps(t.warmup_ratio, total_steps);

    let mut events = if is_writer {
        let mut events = EventWriter::create(&settings.out, resume_from.as_ref().map(|_| start_step + 1))?;
        if resume_from.is_none() {
            let recipe = settings.recipe.to_toml()?;
            events.text("recipe", 0, &format!("```toml\n{recipe}\n```"))?;
        }
        run_folder::truncate_log(&settings.out, start_step)?;
        Some(events)
    } else {
        None
    };
    let mut log_file = if is_writer {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(settings.out.join(run_folder::LOG_FILE))
                .context("opening the step log")?,
        )
    } else {
        None
    };

    let eval = |decoder: &Transformer,
                step: u64,
                events: &mut Option<EventWriter>,
                log_file: &mut Option<std::fs::File>|
     -> Result<Option<f64>> {
        let Some(val) = &val else { return Ok(None) };
        // Each rank scores its share of the validation batches; the totals are summed over ranks.
        let (totals, rows_per_rank) =
            evaluate_across_ranks(decoder, full.as_ref(), val, t.per_device_batch_size, t.eval_max_rows, Some(t.max_seq_length), reducer)?;
        if totals.predicted_tokens == 0 {
            return Ok(None);
        }
        let loss = totals.mean();
        if let Some(events) = events {
            events.scalar("eval/loss", step, loss)?;
        }
        if let Some(file) = log_file {
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
    };

    if start_step >= end_step {
        eprintln!("the run is already at step {start_step} (stop at {end_step}): nothing to train");
        if is_writer && !settings.out.join(run_folder::FINAL_DIR).exists() {
            run_folder::save_decoder(&decoder, &settings.decoder, &settings.out.join(run_folder::FINAL_DIR))?;
        }
        return Ok(());
    }

    if is_writer {
        eprintln!(
            "{:?} training of {} ({} parameters{}): {} train rows, {steps_per_epoch} steps per epoch × {} epochs = {total_steps} steps \
             (global batch {} rows = {} per device × {} accumulation × {} ranks), warmup {warmup}; steps {}..{end_step} on {device:?} in {kind:?}",
            t.mode,
            settings.decoder.display(),
            decoder.config.param_count(),
            settings.full.as_ref().map(|f| format!(", frozen full model {}", f.display())).unwrap_or_default(),
            train.len(),
            t.num_epochs,
            settings.global_batch_rows(reducer.world_size()),
            t.per_device_batch_size,
            t.gradient_accumulation_steps,
            reducer.world_size(),
            start_step + 1,
        );
    }
    let loader = Loader::spawn(
        train,
        LoaderConfig {
            seed: t.seed,
            global_batch_rows: settings.global_batch_rows(reducer.world_size()),
            group_batches: t.length_group_batches,
            accumulation_steps: t.gradient_accumulation_steps,
            rank: reducer.rank(),
            world_size: reducer.world_size(),
            max_seq_length: t.max_seq_length,
            steps_per_epoch,
            prefetch_batches: t.prefetch_batches,
        },
        start_step + 1,
        end_step,
    )?;

    let progress = if is_writer { ProgressBar::new(end_step) } else { ProgressBar::hidden() };
    progress.set_style(
        ProgressStyle::with_template("train {bar:30} {pos}/{len} steps | {msg} [{elapsed_precise} < {eta_precise}]")
            .expect("valid progress template"),
    );
    progress.set_position(start_step);
    progress.reset_eta();

    let mut window = Window::default();
    let mut last_eval: Option<(u64, f64)> = None;
    let mut last_saved_step = None;
    let mut last_loss = f64::NAN;
    for step in start_step + 1..=end_step {
        let step_started = Instant::now();
        window.started.get_or_insert(step_started);
        let batches = loader.next()?;
        debug_assert_eq!(batches.position.step, step);
        let total_tokens = batches.global_predicted_tokens;
        let lr = learning_rate(t.learning_rate, t.lr_schedule, warmup, total_steps, step);

        optimizer.zero_grad();
        let mut abort: Option<String> = None;
        let mut local_loss = Tensor::zeros([], (Kind::Double, device));
        if total_tokens > 0 {
            for micro in batches.micro.into_iter().flatten() {
                let batch = micro.to_device(device);
                let sum = loss_sum(&decoder, full.as_ref(), &batch).with_context(|| format!("step {step}"))?;
                (&sum / total_tokens as f64).backward();
                local_loss += sum.detach().to_kind(Kind::Double);
                optimizer.accumulate_micro_batch();
            }
        }
        optimizer.reduce_gradients(reducer)?;
        // The loss sum and a stop request (SIGINT/SIGTERM on any rank) in one reduction, so every
        // rank stops after the same step.
        let mut sums = [local_loss.double_value(&[]), if crate::dist::stop::requested() { 1.0 } else { 0.0 }];
        reducer.all_reduce_sum(&mut sums)?;
        let stop_requested = sums[1] > 0.0;
        let loss = sums[0] / total_tokens as f64;
        let grad_norm = optimizer.grad_norm(reducer)?;

        state.skipped_rows += batches.global_skipped_rows as u64;
        if total_tokens == 0 {
            // Every row of this global batch was too long: nothing to learn from, not a bad step.
            state.skipped_steps += 1;
        } else if !(loss.is_finite() && grad_norm.is_finite()) {
            optimizer.zero_grad();
            state.skipped_steps += 1;
            state.bad_step_streak += 1;
            say(&progress, format!("step {step}: non-finite loss {loss} or gradient norm {grad_norm}; step skipped"));
            if state.bad_step_streak >= t.max_bad_steps {
                abort = Some(format!(
                    "{} optimizer steps in a row had a non-finite loss or gradient (the last at step {step}: loss {loss}, \
                     gradient norm {grad_norm}); stopping. Lower the learning rate (now {}) or check the data; \
                     the newest checkpoint in {} is unaffected",
                    state.bad_step_streak,
                    t.learning_rate,
                    settings.out.display()
                ));
            }
        } else {
            optimizer.step(lr, clip_coefficient(grad_norm, t.max_grad_norm), reducer)?;
            state.bad_step_streak = 0;
            state.predicted_tokens += total_tokens as u64;
            window.loss_sum += sums[0];
            window.predicted_tokens += total_tokens as f64;
            last_loss = loss;
        }
        window.target_tokens += batches.global_target_tokens as f64;
        let next = StepPosition::of(step + 1, steps_per_epoch);
        state.step = step;
        state.epoch = next.epoch;
        state.step_in_epoch = next.step_in_epoch;
        state.optimizer_steps = optimizer.steps();

        let elapsed = window.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or_default();
        let tokens_per_sec = window.target_tokens / elapsed.max(1e-9);
        progress.set_message(format!("loss {last_loss:.4} | lr {lr:.2e} | {tokens_per_sec:.0} tok/s"));
        progress.set_position(step);

        if step % t.logging_steps == 0 || step == end_step || abort.is_some() {
            let window_loss = window.loss_sum / window.predicted_tokens;
            if let Some(events) = &mut events {
                let mut scalars = vec![
                    ("train/lr", lr),
                    ("train/grad_norm", grad_norm),
                    ("train/tokens_per_sec", tokens_per_sec),
                    ("train/skipped_steps", state.skipped_steps as f64),
                ];
                if window.predicted_tokens > 0.0 {
                    scalars.push(("train/loss", window_loss));
                }
                let memory = process_memory().scalars();
                scalars.extend(memory.iter().copied());
                events.scalars(step, &scalars)?;
            }
            if let Some(file) = &mut log_file {
                use std::io::Write;
                let record = json!({
                    "step": step,
                    "epoch": StepPosition::of(step, steps_per_epoch).epoch,
                    "loss": (window.predicted_tokens > 0.0).then_some(window_loss),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "predicted_tokens": window.predicted_tokens,
                    "tokens_per_sec": tokens_per_sec,
                    "skipped_steps": state.skipped_steps,
                    "skipped_rows": state.skipped_rows,
                });
                writeln!(file, "{record}").context("writing the step log")?;
            }
            if progress.is_hidden() && is_writer {
                // No terminal (a batch job's log): one line per logged step instead of the bar.
                let loss = if window.predicted_tokens > 0.0 { format!("{window_loss:.4}") } else { "n/a".into() };
                eprintln!(
                    "step {step}/{end_step}: loss {loss} | lr {lr:.3e} | grad norm {grad_norm:.3} | {tokens_per_sec:.0} tok/s | skipped steps {}",
                    state.skipped_steps
                );
            }
            window = Window::default();
        }

        if let Some(message) = abort {
            if let Some(events) = &mut events {
                events.flush()?;
            }
            progress.abandon();
            bail!(message);
        }
        if t.eval_steps > 0 && step % t.eval_steps == 0 {
            if let Some(loss) = eval(&decoder, step, &mut events, &mut log_file)? {
                say(&progress, format!("step {step}: eval/loss {loss:.4}"));
                last_eval = Some((step, loss));
            }
        }
        let stopping_early = (step == end_step && end_step < total_steps) || stop_requested;
        if (t.save_steps > 0 && step % t.save_steps == 0) || stopping_early || (step == end_step && t.save_steps > 0) {
            let rank_files = optimizer.write_rank_files(&settings.out, step, reducer)?;
            if is_writer {
                let dir = run_folder::save_checkpoint_folder(
                    &settings.out,
                    &decoder,
                    &settings.decoder,
                    &optimizer.state_tensors(),
                    &rank_files,
                    &state,
                    t.save_total_limit,
                )?;
                last_saved_step = Some(step);
                say(&progress, format!("step {step}: saved {}", dir.display()));
            }
        }
        if stop_requested {
            if let Some(events) = &mut events {
                events.flush()?;
            }
            progress.abandon();
            if is_writer {
                eprintln!(
                    "stopped by SIGINT/SIGTERM after step {step}: checkpoint saved in {}; continue with --resume",
                    settings.out.display()
                );
            }
            return Ok(());
        }
        if let Some(events) = &mut events {
            events.flush()?;
        }
        let _ = step_started;
    }
    drop(loader);
    progress.finish_and_clear();

    if last_eval.map(|(s, _)| s) != Some(end_step) {
        if let Some(loss) = eval(&decoder, end_step, &mut events, &mut log_file)? {
            last_eval = Some((end_step, loss));
        }
    }
    if is_writer {
        let final_dir = settings.out.join(run_folder::FINAL_DIR);
        run_folder::save_decoder(&decoder, &settings.decoder, &final_dir)?;
        // Where the run ended, for a later --resume (no optimizer tensors: that is a checkpoint).
        run_folder::write_state(&final_dir, &state)?;
        if let Some(events) = &mut events {
            events.flush()?;
        }
        let mode = match t.mode {
            TrainMode::Overfill => "overfill",
            TrainMode::Pruned => "pruned",
            TrainMode::Sft => "sft",
        };
        eprintln!(
            "{mode}: steps {}..{end_step} of {total_steps}, last train loss {last_loss:.4}{}, {} skipped steps, {} skipped rows; decoder saved to {}{}",
            start_step + 1,
            last_eval.map(|(_, l)| format!(", eval loss {l:.4}")).unwrap_or_default(),
            state.skipped_steps,
            state.skipped_rows,
            final_dir.display(),
            last_saved_step.map(|s| format!(" (checkpoint at step {s})")).unwrap_or_default(),
        );
    }
    Ok(())
}
