//! Numerical parity with Hugging Face transformers on tiny random checkpoints that
//! transformers itself creates (tests/python/model_ref.py): prefill logits, 8 greedy
//! incremental decode steps, and left-padded batches.
mod common;

use common::*;
use overfill_model::kv_cache::KvCache;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn load(case: &str) -> Transformer {
    Transformer::load(&case_model_dir(case), Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{case}: {e:#}"))
}

fn check_prefill_and_decode(case: &str) {
    let model = load(case);
    let refs = case_refs(case);
    let prompt = refs["prompt_ids"].unsqueeze(0);
    let t = prompt.size()[1];
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = Tensor::ones([1, t], (Kind::Int64, Device::Cpu));
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let logits = model
        .forward(&prompt, &positions, &mask, Some(&mut cache))
        .unwrap();
    let diff = max_abs_diff(&logits.squeeze_dim(0), &refs["prompt_logits"]);
    assert!(diff <= TOL, "{case}: prefill logits differ by {diff}");
    assert_eq!(cache.len(), t as usize);

    let expected_ids = to_vec_i64(&refs["greedy_ids"]);
    let mut next = logits.select(1, t - 1).argmax(-1, true); // [1, 1]
    let mut mask = mask;
    for (step, expected) in expected_ids.iter().enumerate() {
        assert_eq!(
            next.int64_value(&[0, 0]),
            *expected,
            "{case}: greedy token {step} differs"
        );
        mask = Tensor::cat(
            &[&mask, &Tensor::ones([1, 1], (Kind::Int64, Device::Cpu))],
            1,
        );
        let position = Tensor::from_slice(&[t + step as i64]).view([1, 1]);
        let step_logits = model
            .forward(&next, &position, &mask, Some(&mut cache))
            .unwrap();
        let diff = max_abs_diff(
            &step_logits.view([-1]),
            &refs["step_logits"].get(step as i64),
        );
        assert!(
            diff <= TOL,
            "{case}: decode step {step} logits differ by {diff}"
        );
        next = step_logits.select(1, 0).argmax(-1, true);
    }
    assert_eq!(cache.len(), t as usize + expected_ids.len());
}

fn check_left_padded_batch(case: &str) {
    let model = load(case);
    let refs = case_refs(case);
    let ids = &refs["batch_ids"];
    let mask = &refs["batch_mask"];
    let positions = (mask.cumsum(-1, Kind::Int64) - 1).clamp_min(0);
    let logits = model.forward(ids, &positions, mask, None).unwrap();
    let width = ids.size()[1];
    for row in 0..ids.size()[0] {
        let n = mask.get(row).sum(Kind::Int64).int64_value(&[]);
        let real = logits.get(row).narrow(0, width - n, n);
        // Against transformers' batched run...
        let diff = max_abs_diff(
            &real,
            &refs["batch_logits"].get(row).narrow(0, width - n, n),
        );
        assert!(
            diff <= TOL,
            "{case}: batch row {row} differs from transformers by {diff}"
        );
        // ...and against the same row run alone.
        let alone_ids = ids.get(row).narrow(0, width - n, n).unsqueeze(0);
        let alone_pos = Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let alone = model
            .forward(
                &alone_ids,
                &alone_pos,
                &Tensor::ones([1, n], (Kind::Int64, Device::Cpu)),
                None,
            )
            .unwrap();
        let diff = max_abs_diff(&real, &alone.squeeze_dim(0));
        assert!(
            diff <= TOL,
            "{case}: batch row {row} differs from the row alone by {diff}"
        );
    }
}

#[test]
fn llama3_tied_matches_transformers() {
    check_prefill_and_decode("llama3_tied");
    check_left_padded_batch("llama3_tied");
}

#[test]
fn llama_untied_matches_transformers() {
    check_prefill_and_decode("llama_untied");
    check_left_padded_batch("llama_untied");
}

#[test]
fn qwen2_bias_matches_transformers() {
    check_prefill_and_decode("qwen2_bias");
    check_left_padded_batch("qwen2_bias");
}

#[test]
fn explicit_head_dim_matches_transformers() {
    for case in ["llama_head_dim", "qwen2_head_dim"] {
        let model = load(case);
        assert_eq!(model.config.head_dim, 24);
        assert_ne!(
            model.config.head_dim * model.config.num_attention_heads,
            model.config.hidden_size
        );
        check_prefill_and_decode(case);
        check_left_padded_batch(case);
    }
}
