//! The training loss and the decoder's gradients against transformers (tests/python/train_ref.py
//! writes tiny random checkpoints and the reference losses and gradients): OverFill (full model's
//! past_key_values → decoder) and the single-model baselines, on batches with left-padded
//! contexts and right-padded targets of different lengths. Also: the full model and its K/V are
//! untouched by a training step, incompatible models and bad batches are refused.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use overfill_model::config::RopeScaling;
use overfill_model::kv_cache::KvCache;
use overfill_model::train::{backward_loss_sum, check_compatible, loss_sum, TrainBatch, IGNORE_INDEX};
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;
const CASES: [&str; 3] = ["llama3_untied", "llama_tied", "qwen2_bias"];
const BATCHES: [&str; 2] = ["ragged", "one_token"];
const TRAIN_FIELDS: [&str; 7] = [
    "context_ids",
    "context_mask",
    "context_positions",
    "target_inputs",
    "target_mask",
    "target_positions",
    "labels",
];

fn train_reference_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_script_output("train_ref.py", "train-ref-cache"))
}

fn load(case: &str, which: &str) -> Transformer {
    let dir = train_reference_dir().join(case).join(which);
    Transformer::load(&dir, Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{case}/{which}: {e:#}"))
}

fn refs(case: &str) -> HashMap<String, Tensor> {
    read_refs(&train_reference_dir().join(case).join("ref.safetensors"))
}

/// The rows of reference batch `name` as (context, target) id vectors.
fn rows(refs: &HashMap<String, Tensor>, name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let ids = |key: String| -> Vec<u32> {
        to_vec_i64(&refs[&key])
            .into_iter()
            .map(|id| id as u32)
            .collect()
    };
    (0..)
        .take_while(|r| refs.contains_key(&format!("{name}.context.{r}")))
        .map(|r| {
            (
                ids(format!("{name}.context.{r}")),
                ids(format!("{name}.target.{r}")),
            )
        })
        .collect()
}

fn batch(rows: &[(Vec<u32>, Vec<u32>)]) -> TrainBatch {
    let slices: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(c, t)| (c.as_slice(), t.as_slice()))
        .collect();
    TrainBatch::from_rows(&slices, Device::Cpu).expect("valid rows")
}

fn field<'a>(batch: &'a TrainBatch, name: &str) -> &'a Tensor {
    match name {
        "context_ids" => &batch.context_ids,
        "context_mask" => &batch.context_mask,
        "context_positions" => &batch.context_positions,
        "target_inputs" => &batch.target_inputs,
        "target_mask" => &batch.target_mask,
        "target_positions" => &batch.target_positions,
        "labels" => &batch.labels,
        _ => unreachable!("unknown field {name}"),
    }
}

fn zero_grads(model: &Transformer) {
    for (_, mut p) in model.parameters() {
        p.zero_grad();
    }
}

/// How a test computes the loss and the gradients.
#[derive(Debug, Clone, Copy)]
enum Backward {
    /// `loss_sum`, then `backward()` on it.
    OfLossSum,
    /// The trainer's `backward_loss_sum` (blocked loss, each block's backward at once), with or
    /// without activation recomputation.
    Training { activation_checkpointing: bool },
}

const BACKWARDS: [Backward; 3] = [
    Backward::OfLossSum,
    Backward::Training { activation_checkpointing: false },
    Backward::Training { activation_checkpointing: true },
];

/// The loss sum on a freshly zeroed decoder, its gradients in the decoder's `.grad`s.
fn loss_and_backward(
    how: Backward,
    decoder: &Transformer,
    full: Option<&Transformer>,
    batch: &TrainBatch,
) -> anyhow::Result<Tensor> {
    zero_grads(decoder);
    match how {
        Backward::OfLossSum => {
            let loss = loss_sum(decoder, full, batch)?;
            loss.backward();
            Ok(loss.detach())
        }
        Backward::Training { activation_checkpointing } => {
            backward_loss_sum(decoder, full, batch, 1.0, activation_checkpointing)
        }
    }
}

/// The loss and its gradients (computed as `how` says) on a freshly zeroed decoder against
/// transformers'.
#[allow(clippy::too_many_arguments)]
fn check_mode(
    case: &str,
    name: &str,
    mode: &str,
    how: Backward,
    decoder: &Transformer,
    full: Option<&Transformer>,
    batch: &TrainBatch,
    refs: &HashMap<String, Tensor>,
) {
    let loss = loss_and_backward(how, decoder, full, batch).unwrap_or_else(|e| panic!("{case}: {e:#}"));
    assert_eq!(loss.kind(), Kind::Float);
    assert_eq!(loss.dim(), 0, "the loss sum is a scalar");
    let expected = refs[&format!("{name}.{mode}.loss_sum")].double_value(&[0]);
    let got = loss.double_value(&[]);
    assert!(
        (got - expected).abs() <= TOL * expected.abs().max(1.0),
        "{case} {name} {mode} {how:?}: loss sum {got} vs transformers {expected}"
    );
    let prefix = format!("{name}.{mode}.grad.");
    let reference: BTreeMap<&str, &Tensor> = refs
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p, v)))
        .collect();
    let params = decoder.parameters();
    let mut worst = 0.0f64;
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        reference.keys().copied().collect::<Vec<_>>(),
        "{case}: parameter names differ from transformers'"
    );
    for (param, p) in &params {
        let grad = p.grad();
        assert!(
            grad.defined(),
            "{case} {name} {mode}: {param} has no gradient"
        );
        let want = reference[param.as_str()];
        let scale = want.abs().max().double_value(&[]).max(1.0);
        let diff = max_abs_diff(&grad, want);
        worst = worst.max(diff / scale);
        assert!(
            diff <= TOL * scale,
            "{case} {name} {mode}: gradient of {param} differs by {diff} (scale {scale})"
        );
    }
    eprintln!(
        "{case} {name} {mode} {how:?}: loss sum {got:.6} (transformers {expected:.6}), worst gradient diff / scale {worst:.2e}"
    );
    // The loss really depends on the decoder: some gradient is far from zero.
    assert!(
        params
            .iter()
            .any(|(_, p)| p.grad().abs().max().double_value(&[]) > 1e-3),
        "{case} {name} {mode}: all gradients vanish"
    );
}

fn check_case(case: &str) {
    let full = load(case, "full");
    let decoder = load(case, "decoder");
    assert!(decoder.config.hidden_size < full.config.hidden_size);
    check_compatible(&full.config, &decoder.config).expect("the reference decoder fits");
    decoder.set_requires_grad(true);
    let refs = refs(case);
    for name in BATCHES {
        let rows = rows(&refs, name);
        let batch = batch(&rows);
        for f in TRAIN_FIELDS {
            let want = &refs[&format!("{name}.expect.{f}")];
            assert!(
                field(&batch, f).equal(want),
                "{case} {name}: {f} {:?} differs from {want:?}",
                field(&batch, f)
            );
        }
        assert_eq!(
            batch.predicted_tokens,
            refs[&format!("{name}.tokens")].int64_value(&[0])
        );
        assert_eq!(batch.rows(), rows.len() as i64);

        // The full model's prefill K/V equal transformers' past_key_values at real slots.
        let past = full
            .prefill_kv(
                &batch.context_ids,
                &batch.context_positions,
                &batch.context_mask,
            )
            .unwrap();
        assert_eq!(past.len(), full.config.num_hidden_layers);
        let real = batch.context_mask.unsqueeze(1).unsqueeze(-1); // [B, 1, Tc, 1]
        for (layer, (k, v)) in past.iter().enumerate() {
            assert!(!k.requires_grad() && !v.requires_grad());
            for (ours, key) in [(k, "past_k"), (v, "past_v")] {
                let want = &refs[&format!("{name}.{key}.{layer}")];
                let diff = max_abs_diff(&(ours * &real), &(want * &real));
                assert!(
                    diff <= TOL,
                    "{case} {name}: {key} {layer} differs by {diff}"
                );
            }
        }

        for how in BACKWARDS {
            check_mode(case, name, "overfill", how, &decoder, Some(&full), &batch, &refs);
            check_mode(case, name, "single", how, &decoder, None, &batch, &refs);
        }
    }
}

/// The gradients of every parameter after `loss_and_backward`.
fn gradients(decoder: &Transformer) -> Vec<(String, Tensor)> {
    decoder.parameters().into_iter().map(|(n, p)| (n, p.grad().copy())).collect()
}

/// Activation recomputation gives the gradients of the plain backward (f32, within 1e-6 of the
/// largest gradient), in OverFill and single-model mode, tied and untied.
#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    for case in CASES {
        let full = load(case, "full");
        let decoder = load(case, "decoder");
        decoder.set_requires_grad(true);
        let batch = batch(&rows(&refs(case), "ragged"));
        for full in [Some(&full), None] {
            let plain = loss_and_backward(BACKWARDS[1], &decoder, full, &batch).unwrap();
            let plain_grads = gradients(&decoder);
            let recomputed = loss_and_backward(BACKWARDS[2], &decoder, full, &batch).unwrap();
            let diff = (plain.double_value(&[]) - recomputed.double_value(&[])).abs();
            assert!(diff <= 1e-6 * plain.double_value(&[]).abs(), "{case}: loss {plain:?} vs {recomputed:?}");
            for ((name, want), (_, got)) in plain_grads.iter().zip(gradients(&decoder)) {
                let scale = want.abs().max().double_value(&[]).max(1e-3);
                let diff = max_abs_diff(&got, want);
                assert!(diff <= 1e-6 * scale, "{case} {}: gradient of {name} differs by {diff} (scale {scale})", full.is_some());
            }
        }
    }
}

#[test]
fn llama3_untied_loss_and_gradients_match_transformers() {
    check_case("llama3_untied");
}

#[test]
fn llama_tied_loss_and_gradients_match_transformers() {
    check_case("llama_tied");
}

#[test]
fn qwen2_bias_loss_and_gradients_match_transformers() {
    check_case("qwen2_bias");
}

fn shallow(map: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    map.iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

fn deep_copy(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors.iter().map(|(n, t)| (n.clone(), t.copy())).collect()
}

#[test]
fn a_training_step_leaves_the_full_model_and_its_cache_bit_identical() {
    let case = CASES[0];
    let full = load(case, "full");
    let decoder = load(case, "decoder");
    decoder.set_requires_grad(true);
    let refs = refs(case);
    let batch = batch(&rows(&refs, "ragged"));
    let full_before = deep_copy(&full.parameters());
    let decoder_before = deep_copy(&decoder.parameters());
    let past = full
        .prefill_kv(
            &batch.context_ids,
            &batch.context_positions,
            &batch.context_mask,
        )
        .unwrap();
    let past_before: Vec<(Tensor, Tensor)> =
        past.iter().map(|(k, v)| (k.copy(), v.copy())).collect();

    // The decoder reads this K/V directly, backward runs through it, and the loss path of
    // loss_sum runs its own prefill: then one manual SGD step on the decoder.
    let mask = Tensor::cat(&[&batch.context_mask, &batch.target_mask], 1);
    let logits = decoder
        .forward_train(
            &batch.target_inputs,
            &batch.target_positions,
            &mask,
            Some(&past),
        )
        .unwrap();
    logits.square().sum(Kind::Float).backward();
    zero_grads(&decoder);
    let loss = loss_sum(&decoder, Some(&full), &batch).unwrap();
    loss.backward();
    tch::no_grad(|| {
        for (_, mut p) in decoder.parameters() {
            let step = p.grad() * 0.1;
            let _ = p.f_sub_(&step).unwrap();
        }
    });

    for ((name, before), (_, after)) in full_before.iter().zip(full.parameters()) {
        assert!(before.equal(&after), "full model weight {name} changed");
        assert!(
            !after.requires_grad(),
            "full model weight {name} requires grad"
        );
        assert!(
            !after.grad().defined(),
            "full model weight {name} got a gradient"
        );
    }
    for (layer, ((k0, v0), (k, v))) in past_before.iter().zip(&past).enumerate() {
        assert!(
            k0.equal(k) && v0.equal(v),
            "past K/V of layer {layer} changed"
        );
    }
    let again = full
        .prefill_kv(
            &batch.context_ids,
            &batch.context_positions,
            &batch.context_mask,
        )
        .unwrap();
    for (layer, ((k0, v0), (k, v))) in past_before.iter().zip(&again).enumerate() {
        assert!(
            k0.equal(k) && v0.equal(v),
            "prefill of layer {layer} differs after the step"
        );
    }
    let changed = decoder_before
        .iter()
        .zip(decoder.parameters())
        .filter(|((_, before), (_, after))| !before.equal(after))
        .count();
    assert_eq!(
        changed,
        decoder_before.len(),
        "every decoder parameter took the step"
    );
}

#[test]
fn forward_train_agrees_with_the_inference_forward() {
    let case = CASES[1];
    let full = load(case, "full");
    let decoder = load(case, "decoder");
    let refs = refs(case);
    let batch = batch(&rows(&refs, "ragged"));
    let past = full
        .prefill_kv(
            &batch.context_ids,
            &batch.context_positions,
            &batch.context_mask,
        )
        .unwrap();
    let mask = Tensor::cat(&[&batch.context_mask, &batch.target_mask], 1);
    let train = decoder
        .forward_train(
            &batch.target_inputs,
            &batch.target_positions,
            &mask,
            Some(&past),
        )
        .unwrap();
    // Inference: the decoder continues from a cache holding the full model's prefill.
    let mut cache = KvCache::from_parts(
        past.iter().map(|(k, v)| (k.copy(), v.copy())).collect(),
        batch.context_mask.shallow_clone(),
    )
    .unwrap();
    let inference = decoder
        .forward(
            &batch.target_inputs,
            &batch.target_positions,
            &mask,
            Some(&mut cache),
        )
        .unwrap();
    let scored = batch.target_mask.unsqueeze(-1);
    let diff = max_abs_diff(&(&train * &scored), &(&inference * &scored));
    assert!(
        diff <= 1e-5,
        "with past: training and inference differ by {diff}"
    );

    // Without past, over a left-padded batch: real positions agree.
    let (ids, positions, mask) = (
        &batch.context_ids,
        &batch.context_positions,
        &batch.context_mask,
    );
    let train = decoder.forward_train(ids, positions, mask, None).unwrap();
    let inference = decoder.forward(ids, positions, mask, None).unwrap();
    let real = mask.unsqueeze(-1);
    let diff = max_abs_diff(&(&train * &real), &(&inference * &real));
    assert!(
        diff <= 1e-5,
        "without past: training and inference differ by {diff}"
    );
}

#[test]
fn incompatible_decoders_are_refused_naming_both_values() {
    let full = load(CASES[0], "full");
    let decoder = load(CASES[0], "decoder");
    let base = decoder.config.clone();
    type Change = fn(&mut overfill_model::config::ModelConfig);
    let changes: [(&str, Change, &str, &str); 7] = [
        ("num_hidden_layers", |c| c.num_hidden_layers = 3, "2", "3"),
        (
            "num_attention_heads",
            |c| c.num_attention_heads = 8,
            "4",
            "8",
        ),
        (
            "num_key_value_heads",
            |c| c.num_key_value_heads = 4,
            "2",
            "4",
        ),
        ("head_dim", |c| c.head_dim = 16, "12", "16"),
        ("rope_theta", |c| c.rope_theta = 10000.0, "500000", "10000"),
        (
            "rope_scaling",
            |c| c.rope_scaling = RopeScaling::None,
            "Llama3",
            "None",
        ),
        ("vocab_size", |c| c.vocab_size = 128, "97", "128"),
    ];
    for (name, change, full_value, decoder_value) in changes {
        let mut config = base.clone();
        change(&mut config);
        let message = format!("{:#}", check_compatible(&full.config, &config).unwrap_err());
        assert!(
            message.contains(&format!("{name}: full model {full_value}"))
                && message.contains(&format!("decoder {decoder_value}")),
            "{name}: {message}"
        );
        assert_eq!(
            message.matches("full model ").count(),
            1,
            "only {name} is named: {message}"
        );
    }

    // loss_sum refuses before any work, and so does two-stage generation.
    let tied = load("llama_tied", "decoder"); // rope theta 10000, no llama3 scaling
    let refs = refs(CASES[0]);
    let batch = batch(&rows(&refs, "ragged"));
    let message = format!("{:#}", loss_sum(&tied, Some(&full), &batch).unwrap_err());
    assert!(
        message.contains("rope_theta: full model 500000, decoder 10000")
            && message.contains("rope_scaling"),
        "{message}"
    );
    let options = overfill_model::generate::GenerateOptions::for_model(&full, 2);
    let message = format!(
        "{:#}",
        overfill_model::generate::greedy_two_stage(&full, &tied, &[vec![5, 6]], &options)
            .unwrap_err()
    );
    assert!(message.contains("rope_theta"), "{message}");
}

#[test]
fn bad_rows_are_refused() {
    let message = |rows: &[(&[u32], &[u32])]| {
        format!(
            "{:#}",
            TrainBatch::from_rows(rows, Device::Cpu).unwrap_err()
        )
    };
    assert!(message(&[]).contains("at least one row"));
    let m = message(&[(&[5, 6], &[7, 8]), (&[], &[7, 8])]);
    assert!(m.contains("row 1") && m.contains("empty context"), "{m}");
    let m = message(&[(&[5, 6], &[])]);
    assert!(m.contains("row 0") && m.contains("empty target"), "{m}");

    // One-token targets predict nothing: allowed, zero tokens, a zero loss.
    let decoder = load(CASES[0], "decoder");
    let full = load(CASES[0], "full");
    decoder.set_requires_grad(true);
    let batch = TrainBatch::from_rows(&[(&[5, 6, 7], &[8]), (&[9], &[10])], Device::Cpu).unwrap();
    assert_eq!(batch.predicted_tokens, 0);
    assert_eq!(batch.labels.size(), [2, 1]);
    assert_eq!(to_vec_i64(&batch.labels), [IGNORE_INDEX, IGNORE_INDEX]);
    for full in [Some(&full), None] {
        let loss = loss_sum(&decoder, full, &batch).unwrap();
        assert_eq!(loss.double_value(&[]), 0.0);
        loss.backward();
    }

    // A label beyond the decoder's vocabulary.
    let batch = TrainBatch::from_rows(&[(&[5, 6], &[7, 500])], Device::Cpu).unwrap();
    let m = format!("{:#}", loss_sum(&decoder, Some(&full), &batch).unwrap_err());
    assert!(m.contains("500") && m.contains("97"), "{m}");
}

#[test]
fn copy_parameters_from_overwrites_values_in_place() {
    for case in ["llama3_untied", "llama_tied"] {
        let decoder = load(case, "decoder");
        decoder.set_requires_grad(true);
        let params = decoder.parameters();
        let doubled: BTreeMap<String, Tensor> = params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach() * 2.0))
            .collect();
        decoder.copy_parameters_from(&doubled).unwrap();
        for (name, p) in decoder.parameters() {
            assert!(p.equal(&doubled[&name]), "{case}: {name} not copied");
            assert!(p.requires_grad(), "{case}: {name} lost requires_grad");
        }
        // The handles taken before the copy see the new values (same storage).
        assert!(params[0].1.equal(&doubled[&params[0].0]));
        if decoder.config.tie_word_embeddings {
            // The LM head is the embedding: logits follow the copied embedding.
            let hidden = Tensor::ones(
                [1, decoder.config.hidden_size as i64],
                (Kind::Float, Device::Cpu),
            );
            let logits = decoder.lm_head(&hidden);
            let want = doubled["model.embed_tokens.weight"].sum_dim_intlist(1, false, Kind::Float);
            assert!(max_abs_diff(&logits.view([-1]), &want) <= 1e-4);
        }

        let mut missing = shallow(&doubled);
        missing.remove("model.norm.weight");
        let m = format!("{:#}", decoder.copy_parameters_from(&missing).unwrap_err());
        assert!(m.contains("model.norm.weight"), "{m}");
        let mut wrong = shallow(&doubled);
        wrong.insert(
            "model.norm.weight".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        let m = format!("{:#}", decoder.copy_parameters_from(&wrong).unwrap_err());
        assert!(m.contains("model.norm.weight") && m.contains("[3]"), "{m}");
        let mut extra = shallow(&doubled);
        extra.insert(
            "model.layers.9.mlp.up_proj.weight".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        let m = format!("{:#}", decoder.copy_parameters_from(&extra).unwrap_err());
        assert!(m.contains("model.layers.9.mlp.up_proj.weight"), "{m}");
    }
}

#[test]
fn past_in_another_dtype_is_cast_to_the_decoders() {
    // The trainer's CUDA setup: a bf16 full model's cache read by an f32 decoder (and the
    // reverse). The result stays close to the all-f32 loss and the gradients stay finite.
    let case = CASES[0];
    let refs = refs(case);
    let batch = batch(&rows(&refs, "ragged"));
    let expected = refs["ragged.overfill.loss_sum"].double_value(&[0]);
    let full_f32 = load(case, "full");
    let decoder_f32 = load(case, "decoder");
    let dir = train_reference_dir().join(case);
    let full_bf16 = Transformer::load(&dir.join("full"), Device::Cpu, Kind::BFloat16).unwrap();
    let decoder_bf16 =
        Transformer::load(&dir.join("decoder"), Device::Cpu, Kind::BFloat16).unwrap();
    let past = full_bf16
        .prefill_kv(
            &batch.context_ids,
            &batch.context_positions,
            &batch.context_mask,
        )
        .unwrap();
    assert!(past
        .iter()
        .all(|(k, v)| k.kind() == Kind::BFloat16 && v.kind() == Kind::BFloat16));
    for (decoder, full) in [(&decoder_f32, &full_bf16), (&decoder_bf16, &full_f32)] {
        decoder.set_requires_grad(true);
        let loss = loss_sum(decoder, Some(full), &batch).unwrap();
        assert_eq!(loss.kind(), Kind::Float);
        let got = loss.double_value(&[]);
        assert!(
            (got - expected).abs() <= 0.02 * expected,
            "{:?} decoder, {:?} full: loss sum {got} vs f32 {expected}",
            decoder.kind(),
            full.kind()
        );
        loss.backward();
        for (name, p) in decoder.parameters() {
            let grad = p.grad();
            assert_eq!(grad.kind(), decoder.kind(), "{name}");
            assert!(
                grad.isfinite().all().int64_value(&[]) == 1,
                "{name} has a non-finite gradient"
            );
        }
    }
}
