//! The memory planner (`overfill_train::memory_plan`, behind `train --dry-run`) against the peak
//! memory of real training steps: `overfill bench-train --activation-checkpointing --json` runs
//! OverFill steps on random weights of three shapes at two batch sizes, with recomputation and
//! without, and reports the most bytes of libtorch tensors alive at once (counted by its CPU
//! allocator, `overfill_train::memory::count_cpu_tensors`) and its peak resident set, next to the
//! planner's peak.
mod common;

use common::here::overfill_ok;
use serde_json::{json, Value};

/// The planner's peak must be within this share of the counted tensor peak (measured: within
/// 1.6% on every shape here, f32 and bf16, OverFill and Pruned), plus a little for the batch's
/// few integer tensors, which the planner leaves out.
const TOLERANCE: f64 = 0.03;
const SLACK_MIB: f64 = 1.0;

/// A Llama config.json of this shape (the decoder is pruned from it by bench-train).
fn config(hidden: usize, intermediate: usize, layers: usize, heads: usize, kv_heads: usize, vocab: usize) -> Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024, "tie_word_embeddings": false
    })
}

#[test]
fn planned_peak_memory_matches_real_cpu_steps_and_recomputation_lowers_it() {
    let tmp = tempfile::tempdir().unwrap();
    // (name, full config, decoder hidden, decoder intermediate)
    let shapes = [
        ("wide MLP", config(384, 1536, 4, 6, 2, 2048), 256, 1024),
        ("deep", config(256, 768, 12, 4, 4, 4096), 192, 512),
        ("large vocabulary", config(256, 704, 2, 4, 1, 24000), 192, 512),
    ];
    let mut table = Vec::new();
    for (name, full, hidden, intermediate) in &shapes {
        let path = tmp.path().join(format!("{}.json", name.replace(' ', "-")));
        std::fs::write(&path, full.to_string()).unwrap();
        for batch in [2, 6] {
            let out = overfill_ok(&[
                "bench-train", "--full-config", path.to_str().unwrap(),
                "--hidden-size", &hidden.to_string(), "--intermediate-size", &intermediate.to_string(),
                "--batch", &batch.to_string(), "--context-len", "96", "--target-len", "160",
                "--steps", "1", "--warmup", "1", "--threads", "2", "--activation-checkpointing", "--json",
            ]);
            let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
            let configs = report["configurations"].as_array().expect("two configurations");
            assert_eq!(configs.len(), 2, "{report}");
            let mut measured_by_mode = Vec::new();
            for c in configs {
                let recompute = c["activation_checkpointing"].as_bool().unwrap();
                let tensors = c["measured_tensor_peak_mib"].as_f64().expect("CPU tensors are counted");
                let resident = c["measured_peak_mib"].as_f64().expect("Linux reports the peak resident set");
                let planned = c["planned_peak_mib"].as_f64().unwrap();
                table.push(format!(
                    "{name:>16} batch {batch} recompute {recompute:<5}: tensors {tensors:6.1} MiB, planned {planned:6.1} MiB ({:+.1}%); resident {resident:6.1} MiB ({:.2}x the tensors)",
                    100.0 * (planned / tensors - 1.0),
                    resident / tensors
                ));
                measured_by_mode.push((recompute, tensors, planned, resident));
            }
            for &(recompute, tensors, planned, resident) in &measured_by_mode {
                assert!(
                    (planned - tensors).abs() <= TOLERANCE * tensors + SLACK_MIB,
                    "{name}, batch {batch}, recompute {recompute}: planned {planned:.1} MiB, tensors peaked at {tensors:.1} MiB\n{}",
                    table.join("\n")
                );
                // The resident set holds the tensors and more (glibc's free lists, libtorch's own).
                assert!(resident >= tensors * 0.98, "{name}, batch {batch}: resident {resident:.1} < tensors {tensors:.1} MiB");
            }
            let (with, without) = (measured_by_mode[0], measured_by_mode[1]);
            assert!(with.0 && !without.0);
            assert!(with.1 < without.1, "{name}, batch {batch}: recomputation peaks at {:.1} MiB, the plain step at {:.1} MiB", with.1, without.1);
        }
    }
    eprintln!("{}", table.join("\n"));
}
