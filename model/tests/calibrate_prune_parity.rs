//! Calibration and pruning against an independent implementation on Hugging Face transformers
//! (`tests/python/prune_ref.py`: forward hooks on the HF modules, its own slicing), on a tiny
//! random model and fixed, padded calibration batches. Plus the exact identities pruning must keep.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{python, repo_root};
use overfill_model::calibrate::{self, SampleNorm, SeqAgg};
use overfill_model::checkpoint;
use overfill_model::prune::{self, PrunePlan, Width};
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

/// Runs prune_ref.py; returns its JSON line, or None (skip) when the Python environment is absent.
fn prune_ref(args: &[&str]) -> Option<serde_json::Value> {
    let py = python();
    if !py.exists() {
        eprintln!("skipping: {} not found (run `just setup`)", py.display());
        return None;
    }
    let out = Command::new(&py)
        .arg(repo_root().join("tests/python/prune_ref.py"))
        .args(args)
        .output()
        .expect("python starts");
    assert!(out.status.success(), "prune_ref.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("prune_ref prints a JSON line");
    Some(serde_json::from_str(line).expect("JSON line"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("overfill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Fixed calibration batches: rows of different lengths so that padding matters.
fn batches(vocab: u32) -> Vec<Vec<Vec<u32>>> {
    let mut state: u64 = 0x2545F4914F6CDD1D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..3)
        .map(|_| {
            (0..4)
                .map(|_| {
                    let len = 4 + (next() % 17) as usize;
                    (0..len).map(|_| (next() % vocab as u64) as u32).collect()
                })
                .collect()
        })
        .collect()
}

fn read_f32(path: &Path, name: &str) -> Tensor {
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(path).unwrap().into_iter().collect();
    tensors.get(name).unwrap_or_else(|| panic!("{name} in {}", path.display())).to_kind(Kind::Float)
}

fn assert_rel_close(ours: &[f32], reference: &Tensor, what: &str) {
    let reference = Vec::<f32>::try_from(reference).unwrap();
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        let tol = 1e-4 * b.abs() + 1e-6 * scale;
        assert!((a - b).abs() <= tol, "{what}[{i}]: ours {a}, reference {b}");
    }
}

/// Our logits on every batch, real positions only, one flat vector per batch.
fn our_logits(model: &Transformer, batches: &[Vec<Vec<u32>>]) -> Vec<Tensor> {
    let _guard = tch::no_grad_guard();
    batches
        .iter()
        .map(|rows| {
            let batch = calibrate::Batch::from_rows(rows, Device::Cpu).unwrap();
            let logits = model.forward(&batch.ids, &batch.positions, &batch.attention_mask, None).unwrap();
            real_positions(&logits, &batch.attention_mask)
        })
        .collect()
}

fn real_positions(logits: &Tensor, mask: &Tensor) -> Tensor {
    let keep = mask.to_kind(Kind::Bool);
    logits.to_kind(Kind::Float).index(&[Some(keep)])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn reference_logits(path: &Path, batches: usize) -> Vec<Tensor> {
    (0..batches)
        .map(|b| real_positions(&read_f32(path, &format!("logits.{b}")), &read_f32(path, &format!("mask.{b}")).to_kind(Kind::Int64)))
        .collect()
}

#[test]
fn scores_kept_indices_and_pruned_logits_match_transformers() {
    let dir = temp_dir("prune-parity");
    let model_dir = dir.join("model");
    let Some(_) = prune_ref(&["make-model", "--out", model_dir.to_str().unwrap(), "--seed", "3"]) else { return };
    let batches = batches(256);
    let batches_path = dir.join("batches.json");
    std::fs::write(&batches_path, serde_json::to_string(&batches).unwrap()).unwrap();
    let model = Transformer::load(&model_dir, Device::Cpu, Kind::Float).unwrap();

    for (seq_agg, norm) in [(SeqAgg::Mean, SampleNorm::L2), (SeqAgg::AbsMean, SampleNorm::L1)] {
        let scores_path = dir.join(format!("ref-{seq_agg}-{norm}.safetensors"));
        let reference = prune_ref(&[
            "score",
            "--model",
            model_dir.to_str().unwrap(),
            "--batches",
            batches_path.to_str().unwrap(),
            "--seq-agg",
            &seq_agg.to_string(),
            "--norm",
            &norm.to_string(),
            "--out",
            scores_path.to_str().unwrap(),
        ])
        .unwrap();
        let (importance, loss) = calibrate::calibrate(&model, &batches, seq_agg, norm, &mut |_| {}).unwrap();
        assert_eq!(importance.calib_size, 12);
        assert_eq!(importance.tokens as u64, reference["tokens"].as_u64().unwrap());
        assert_rel_close(&importance.hidden, &read_f32(&scores_path, "hidden"), &format!("{seq_agg}/{norm} hidden"));
        for layer in 0..2 {
            assert_rel_close(
                &importance.intermediate[layer],
                &read_f32(&scores_path, &format!("intermediate.{layer}")),
                &format!("{seq_agg}/{norm} intermediate.{layer}"),
            );
        }
        let ref_loss = reference["loss"].as_f64().unwrap();
        assert!((loss.loss - ref_loss).abs() <= 1e-4 * ref_loss, "loss {} vs {ref_loss}", loss.loss);
        assert_eq!(loss.tokens as u64, reference["loss_tokens"].as_u64().unwrap());
        if seq_agg != SeqAgg::Mean {
            continue;
        }

        // Prune D 64 -> 48 (P=0.25), I 128 -> 76 (P=0.4) on both sides.
        let hidden_kept = prune::kept_width(64, Width::Fraction(0.25), None).unwrap();
        let inter_kept = prune::kept_width(128, Width::Fraction(0.4), None).unwrap();
        assert_eq!((hidden_kept, inter_kept), (48, 76));
        let ref_pruned = dir.join("ref-pruned");
        prune_ref(&[
            "prune",
            "--model",
            model_dir.to_str().unwrap(),
            "--scores",
            scores_path.to_str().unwrap(),
            "--hidden-size",
            "48",
            "--intermediate-size",
            "76",
            "--out",
            ref_pruned.to_str().unwrap(),
        ])
        .unwrap();
        let plan = importance.plan(hidden_kept, inter_kept).unwrap();
        let ref_kept: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ref_pruned.join("kept.json")).unwrap()).unwrap();
        let ref_hidden: Vec<i64> = serde_json::from_value(ref_kept["hidden"].clone()).unwrap();
        let ref_inter: Vec<Vec<i64>> = serde_json::from_value(ref_kept["intermediate"].clone()).unwrap();
        assert_eq!(plan.hidden, ref_hidden, "kept hidden channels");
        assert_eq!(plan.intermediate, ref_inter, "kept intermediate channels");

        let (new_config, tensors) = prune::prune_tensors(&model.config, &model.tensors(), &plan).unwrap();
        let pruned = Transformer::from_tensors(new_config.clone(), tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect()).unwrap();

        // transformers' own pruned model on the same batches.
        let ref_logits_path = dir.join("ref-pruned-logits.safetensors");
        prune_ref(&["logits", "--model", ref_pruned.to_str().unwrap(), "--batches", batches_path.to_str().unwrap(), "--out", ref_logits_path.to_str().unwrap()])
            .unwrap();
        let ours = our_logits(&pruned, &batches);
        for (b, reference) in reference_logits(&ref_logits_path, batches.len()).iter().enumerate() {
            let diff = max_abs_diff(&ours[b], reference);
            assert!(diff < 1e-4, "pruned logits of batch {b} differ from transformers' pruned model by {diff}");
        }

        // Our saved checkpoint loads in transformers and in our model with the same logits.
        let saved = dir.join("ours-pruned");
        checkpoint::save_checkpoint(&saved, &new_config, &tensors, 1 << 30).unwrap();
        let hf_logits_path = dir.join("ours-pruned-logits.safetensors");
        prune_ref(&["logits", "--model", saved.to_str().unwrap(), "--batches", batches_path.to_str().unwrap(), "--out", hf_logits_path.to_str().unwrap()])
            .unwrap();
        let reloaded = our_logits(&Transformer::load(&saved, Device::Cpu, Kind::Float).unwrap(), &batches);
        for (b, hf) in reference_logits(&hf_logits_path, batches.len()).iter().enumerate() {
            assert!(max_abs_diff(&reloaded[b], hf) < 1e-4, "saved pruned checkpoint: transformers vs ours, batch {b}");
            assert!(max_abs_diff(&reloaded[b], &ours[b]) == 0.0, "saved pruned checkpoint reloads to different logits");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Qwen2-style (q/k/v biases) with tied embeddings: ratio 0 is exact, and the zeroing identity.
#[test]
fn ratio_zero_is_exact_and_pruning_equals_zeroing() {
    let dir = temp_dir("prune-identity");
    let model_dir = dir.join("model");
    let Some(_) = prune_ref(&["make-model", "--out", model_dir.to_str().unwrap(), "--model-type", "qwen2", "--tie", "--seed", "5"]) else {
        return;
    };
    let model = Transformer::load(&model_dir, Device::Cpu, Kind::Float).unwrap();
    let config = model.config.clone();
    let batches = batches(256);
    let full_logits = our_logits(&model, &batches);
    let (importance, _) = calibrate::calibrate(&model, &batches, SeqAgg::Mean, SampleNorm::L2, &mut |_| {}).unwrap();

    // (1) Ratio 0 keeps every channel in order: bit-identical logits.
    let hk = prune::kept_width(config.hidden_size, Width::Fraction(0.0), None).unwrap();
    let ik = prune::kept_width(config.intermediate_size, Width::Fraction(0.0), None).unwrap();
    let plan = importance.plan(hk, ik).unwrap();
    assert_eq!(plan, PrunePlan::identity(&config));
    let (same_config, same) = prune::prune_tensors(&config, &model.tensors(), &plan).unwrap();
    let same_model = Transformer::from_tensors(same_config, same).unwrap();
    for (a, b) in our_logits(&same_model, &batches).iter().zip(&full_logits) {
        assert!(a.equal(b), "ratio 0 changed the logits");
    }

    // (2) Intermediate only: dropping FFN channels == zeroing those columns of down_proj in the
    // full model (each FFN channel only reaches the residual through its down_proj column), so the
    // identity holds up to summation order.
    let plan = importance.plan(config.hidden_size, 80).unwrap();
    let (small_config, small) = prune::prune_tensors(&config, &model.tensors(), &plan).unwrap();
    let small_logits = our_logits(&Transformer::from_tensors(small_config, small).unwrap(), &batches);
    let mut zeroed = model.tensors().into_iter().map(|(k, v)| (k, v.copy())).collect::<BTreeMap<_, _>>();
    for (layer, kept) in plan.intermediate.iter().enumerate() {
        let mut keep = vec![0f32; config.intermediate_size];
        kept.iter().for_each(|&i| keep[i as usize] = 1.0);
        let down = zeroed.get_mut(&format!("model.layers.{layer}.mlp.down_proj.weight")).unwrap();
        *down = &*down * Tensor::from_slice(&keep).unsqueeze(0);
    }
    let zeroed_logits = our_logits(&Transformer::from_tensors(config.clone(), zeroed).unwrap(), &batches);
    for (b, (a, z)) in small_logits.iter().zip(&zeroed_logits).enumerate() {
        let diff = max_abs_diff(a, z);
        assert!(diff < 1e-5, "intermediate pruning vs zeroing, batch {b}: {diff}");
    }

    // (3) Hidden (and intermediate): zero the dropped residual channels everywhere they can enter
    // (embedding columns; o_proj and down_proj rows) so the residual stream is exactly zero there.
    // Then every matmul agrees, but RMSNorm does not: it divides by sqrt(Σ_kept x² / D + eps) in
    // the full model and by sqrt(Σ_kept x² / D' + eps) in the pruned one. The identity is exact
    // again if the full model's norm weights are multiplied by sqrt(D'/D) and its eps by D'/D:
    //   w·sqrt(D'/D)·x / sqrt(S/D + eps·D'/D) = w·sqrt(D'/D)·x / sqrt((D'/D)·(S/D' + eps))
    //                                         = w·x / sqrt(S/D' + eps).
    // Dropped channels' norm weights are zeroed too (they multiply zeros anyway).
    let plan = importance.plan(40, 96).unwrap();
    let (pruned_config, pruned) = prune::prune_tensors(&config, &model.tensors(), &plan).unwrap();
    let pruned_logits = our_logits(&Transformer::from_tensors(pruned_config, pruned).unwrap(), &batches);
    let d = config.hidden_size as f64;
    let d_kept = plan.hidden.len() as f64;
    let mut hidden_keep = vec![0f32; config.hidden_size];
    plan.hidden.iter().for_each(|&i| hidden_keep[i as usize] = 1.0);
    let hidden_keep = Tensor::from_slice(&hidden_keep);
    let mut zeroed = BTreeMap::new();
    for (name, w) in model.tensors() {
        let w = w.copy();
        let w = if name == "model.embed_tokens.weight" {
            w * hidden_keep.unsqueeze(0)
        } else if name.ends_with("norm.weight") {
            w * &hidden_keep * (d_kept / d).sqrt()
        } else if name.ends_with("o_proj.weight") {
            w * hidden_keep.unsqueeze(1)
        } else if name.ends_with("down_proj.weight") {
            let layer: usize = name.split('.').nth(2).unwrap().parse().unwrap();
            let mut keep = vec![0f32; config.intermediate_size];
            plan.intermediate[layer].iter().for_each(|&i| keep[i as usize] = 1.0);
            w * hidden_keep.unsqueeze(1) * Tensor::from_slice(&keep).unsqueeze(0)
        } else {
            w
        };
        zeroed.insert(name, w);
    }
    let mut zeroed_config = config.clone();
    zeroed_config.rms_norm_eps = config.rms_norm_eps * d_kept / d;
    let zeroed_logits = our_logits(&Transformer::from_tensors(zeroed_config, zeroed).unwrap(), &batches);
    for (b, (a, z)) in pruned_logits.iter().zip(&zeroed_logits).enumerate() {
        let diff = max_abs_diff(a, z);
        assert!(diff < 1e-4, "hidden pruning vs zeroing with rescaled norms, batch {b}: {diff}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
