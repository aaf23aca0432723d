//! Prefill and per-token decode time of one checkpoint (used by `just bench-model` through
//! tests/python/bench_model.py, which times transformers on the same checkpoint).
//!
//! bench_model MODEL_DIR [--prompt-len N] [--decode-steps N] [--repeats N] [--threads N] [--dtype f32|bf16|f16]
//! Prints one JSON object: median prefill seconds and median per-token decode seconds.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use overfill_model::checkpoint::parse_dtype;
use overfill_model::kv_cache::KvCache;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let (mut prompt_len, mut decode_steps, mut repeats, mut threads) =
        (128i64, 64usize, 5usize, 0i32);
    let mut dtype = "f32".to_string();
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--prompt-len" => prompt_len = value()?.parse()?,
            "--decode-steps" => decode_steps = value()?.parse()?,
            "--repeats" => repeats = value()?.parse()?,
            "--threads" => threads = value()?.parse()?,
            "--dtype" => dtype = value()?,
            _ if dir.is_none() && !a.starts_with("--") => dir = Some(PathBuf::from(&a)),
            _ => bail!("unknown argument {a}"),
        }
    }
    let dir = dir.context("usage: bench_model MODEL_DIR [--prompt-len N] [--decode-steps N] [--repeats N] [--threads N] [--dtype D]")?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let model = Transformer::load(&dir, Device::Cpu, parse_dtype(&dtype)?)?;
    let vocab = model.config.vocab_size as i64;
    tch::manual_seed(0);
    let ids = Tensor::randint(vocab, [1, prompt_len], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(prompt_len, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = Tensor::ones([1, prompt_len], (Kind::Int64, Device::Cpu));
    let layers = model.config.num_hidden_layers;

    let (mut prefill, mut decode) = (vec![], vec![]);
    // One warm-up round, then `repeats` timed rounds.
    for round in 0..=repeats {
        let mut cache = KvCache::new(layers);
        let start = Instant::now();
        let logits = model.forward(&ids, &positions, &mask, Some(&mut cache))?;
        let mut next = logits.select(1, prompt_len - 1).argmax(-1, true);
        let _ = next.int64_value(&[0, 0]);
        let prefill_s = start.elapsed().as_secs_f64();
        let mut step_mask = mask.shallow_clone();
        let one = Tensor::ones([1, 1], (Kind::Int64, Device::Cpu));
        let start = Instant::now();
        for step in 0..decode_steps {
            step_mask = Tensor::cat(&[&step_mask, &one], 1);
            let pos = Tensor::from_slice(&[prompt_len + step as i64]).view([1, 1]);
            let logits = model.forward(&next, &pos, &step_mask, Some(&mut cache))?;
            next = logits.select(1, 0).argmax(-1, true);
            let _ = next.int64_value(&[0, 0]);
        }
        let decode_s = start.elapsed().as_secs_f64() / decode_steps as f64;
        if round > 0 {
            prefill.push(prefill_s);
            decode.push(decode_s);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "overfill",
            "prefill_seconds": median(prefill),
            "decode_seconds_per_token": median(decode),
            "prompt_len": prompt_len,
            "decode_steps": decode_steps,
            "threads": tch::get_num_threads(),
            "dtype": dtype,
        })
    );
    Ok(())
}
