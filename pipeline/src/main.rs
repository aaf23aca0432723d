//! `overfill`: the stage commands of the OverFill pipeline.
//!
//! Each subcommand lives in its own module with an `Args` struct (clap) and a `run` function.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench_latency;
mod bench_train;
mod calibrate_prune;
mod config_cmd;
mod distill;
mod eval_loss;
mod eval_tasks;
mod generate;
mod init_model;
mod inspect;
mod launch;
mod plot_curves;
mod preprocess;
mod recipe;
mod serve;
mod synth_data;
mod train;

#[derive(Parser)]
#[command(name = "overfill", version, about = "OverFill: two-stage (full-model prefill, pruned-model decode) LLMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the resolved recipe (defaults, recipe values and flag overrides, each marked) as TOML.
    Config(config_cmd::Args),
    /// Chat-template and tokenize instruction data into context/target token shards.
    Preprocess(preprocess::Args),
    /// Print statistics of token shards and decode examples at the context/target boundary.
    Inspect(inspect::Args),
    /// Write synthetic instruction data (every input format) or a tiny byte-level tokenizer.
    SynthData(synth_data::Args),
    /// Score channels on calibration data and width-prune a model (KV-cache compatible).
    CalibratePrune(calibrate_prune::Args),
    /// The full model's greedy answers to a dataset's prompts, as conversations preprocess reads:
    /// training data for a speculative-decoding drafter (resumable).
    Distill(distill::Args),
    /// Generation with one model, or two-stage (full-model prefill, --decoder decode).
    Generate(generate::Args),
    /// Latency of full, pruned and OverFill generation vs generation length, prompt length and
    /// batch size (the paper's Figures 3–5): CSV and PNG plots.
    BenchLatency(bench_latency::Args),
    /// An OpenAI-compatible HTTP server (continuous batching; two-stage with --decoder).
    Serve(serve::Args),
    /// Write a randomly initialised checkpoint (HF layout) from a model config.json.
    InitModel(init_model::Args),
    /// Train the decoder: OverFill (frozen full-model prefill), or the Pruned/SFT baselines.
    Train(train::Args),
    /// Mean cross-entropy over predicted target tokens of a decoder on a split.
    EvalLoss(eval_loss::Args),
    /// Exact-match accuracy per task on held-out prompts with answers, and decode tokens/s.
    EvalTasks(eval_tasks::Args),
    /// Time OverFill training steps on random weights for given shapes (throughput, MFU).
    BenchTrain(bench_train::Args),
    /// One scalar (e.g. eval/loss) of several training runs as one PNG, from their TensorBoard
    /// event files.
    PlotCurves(plot_curves::Args),
    /// Run an overfill command (e.g. `train`) as N data-parallel ranks on this node, torchrun-style.
    Launch(launch::Args),
    /// Benchmark helper: all-reduce throughput of the c10d shim (run under `overfill launch`).
    #[command(hide = true)]
    DebugAllreduce(overfill_train::dist::bench::Args),
    /// Test helper: write made-up training scalars to a TensorBoard event file.
    #[command(hide = true)]
    DebugWriteEvents(overfill_train::events::DebugWriteEventsArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(args) => config_cmd::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::SynthData(args) => synth_data::run(args),
        Command::CalibratePrune(args) => calibrate_prune::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Generate(args) => generate::run(args),
        Command::BenchLatency(args) => bench_latency::run(args),
        Command::Serve(args) => serve::run(args),
        Command::InitModel(args) => init_model::run(args),
        Command::Train(args) => train::run(args),
        Command::EvalLoss(args) => eval_loss::run(args),
        Command::EvalTasks(args) => eval_tasks::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::PlotCurves(args) => plot_curves::run(args),
        Command::Launch(args) => launch::run(args),
        Command::DebugAllreduce(args) => overfill_train::dist::bench::run(args),
        Command::DebugWriteEvents(args) => overfill_train::events::debug_write_events(args),
    }
}
