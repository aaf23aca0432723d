//! Pruning arithmetic and bad input, no Python: the paper's Table 1 from config files alone,
//! width parsing and rounding, top-k order, importance-file round trip and error messages.
use std::path::PathBuf;

use overfill_model::calibrate::{self, Importance, SampleNorm, SeqAgg};
use overfill_model::config::ModelConfig;
use overfill_model::prune::{self, kept_width, top_k_indices, PrunePlan, Width};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/model-configs")
}

fn fixture_config(name: &str) -> Option<ModelConfig> {
    let path = fixtures().join(format!("{name}.json"));
    if !path.exists() {
        eprintln!("skipping: fixture {} is absent", path.display());
        return None;
    }
    Some(ModelConfig::from_file(&path).expect("fixture config parses"))
}

/// Billions rounded to two decimals, as the paper prints them.
fn billions(n: u64) -> f64 {
    (n as f64 / 1e7).round() / 100.0
}

#[test]
fn dry_run_reproduces_paper_table_1() {
    let Some(llama3b) = fixture_config("Llama-3.2-3B-Instruct") else { return };
    assert_eq!(billions(llama3b.param_count()), 3.21);
    for (p, d, params) in [(0.7, 921, 0.52), (0.45, 1689, 1.24), (0.25, 2304, 2.01)] {
        let (pruned, report) = prune::dry_run(&llama3b, Width::Fraction(p), Width::Fraction(p), None).unwrap();
        assert_eq!(report.hidden_size, d, "P={p}");
        assert_eq!(pruned.hidden_size, d);
        assert_eq!(report.intermediate_size, ((1.0 - p) * 8192.0f64).floor() as usize);
        assert_eq!(billions(report.params_after), params, "P={p}: {}", report.params_after);
        // Attention geometry untouched: the KV cache keeps its shape.
        assert_eq!(pruned.head_dim, 128);
        assert_eq!(pruned.num_key_value_heads, llama3b.num_key_value_heads);
        assert_eq!(pruned.num_attention_heads, llama3b.num_attention_heads);
        assert_eq!(pruned.to_hf_json()["head_dim"], 128);
        assert_eq!(pruned.to_hf_json()["hidden_size"], d);
    }

    let Some(llama8b) = fixture_config("Llama-3.1-8B-Instruct") else { return };
    assert_eq!(billions(llama8b.param_count()), 8.03);
    let (_, report) = prune::dry_run(&llama8b, Width::Fraction(0.43), Width::Fraction(0.43), None).unwrap();
    assert_eq!((report.hidden_size, report.intermediate_size), (2334, 8171));
    assert_eq!(billions(report.params_after), 3.19);
    assert_eq!(billions(report.params_before), 8.03);

    let Some(qwen14b) = fixture_config("Qwen2.5-14B-Instruct") else { return };
    assert_eq!(billions(qwen14b.param_count()), 14.77);
    let (_, report) = prune::dry_run(&qwen14b, Width::Absolute(2944), Width::Absolute(11776), None).unwrap();
    assert_eq!((report.hidden_size, report.intermediate_size), (2944, 11776));
    assert_eq!(billions(report.params_after), 7.62);
}

#[test]
fn widths_parse_round_and_reject_bad_values() {
    assert_eq!("0.43".parse::<Width>().unwrap(), Width::Fraction(0.43));
    assert_eq!("0".parse::<Width>().unwrap(), Width::Fraction(0.0));
    assert_eq!("2334".parse::<Width>().unwrap(), Width::Absolute(2334));
    for bad in ["1.0", "1.5", "-0.1", "nan", "abc", ""] {
        let err = bad.parse::<Width>().unwrap_err().to_string();
        assert!(err.contains("[0, 1)") || err.contains("neither"), "{bad}: {err}");
    }
    assert_eq!(kept_width(4096, Width::Fraction(0.43), None).unwrap(), 2334);
    assert_eq!(kept_width(4096, Width::Fraction(0.0), None).unwrap(), 4096);
    assert_eq!(kept_width(4096, Width::Fraction(0.43), Some(64)).unwrap(), 2304); // 2334 = 36.47 x 64 -> 36 x 64
    assert_eq!(kept_width(14336, Width::Fraction(0.43), Some(64)).unwrap(), 8192); // 8171 -> 8192
    assert_eq!(kept_width(100, Width::Fraction(0.01), Some(64)).unwrap(), 64); // never above dim
    assert_eq!(kept_width(3072, Width::Absolute(3072), None).unwrap(), 3072);
    let err = kept_width(3072, Width::Absolute(4000), None).unwrap_err().to_string();
    assert!(err.contains("larger than the model"), "{err}");
    let err = kept_width(3072, Width::Fraction(1.0), None).unwrap_err().to_string();
    assert!(err.contains("[0, 1)"), "{err}");
    assert!(kept_width(10, Width::Fraction(0.99), None).is_err()); // keeps nothing
    assert!(kept_width(10, Width::Fraction(0.5), Some(0)).is_err());
}

#[test]
fn top_k_is_sorted_ascending_and_breaks_ties_low() {
    let scores = [0.5, 3.0, 1.0, 3.0, 0.1, 2.0];
    assert_eq!(top_k_indices(&scores, 3).unwrap(), vec![1, 3, 5]);
    assert_eq!(top_k_indices(&scores, 1).unwrap(), vec![1]);
    assert_eq!(top_k_indices(&scores, 6).unwrap(), vec![0, 1, 2, 3, 4, 5]);
    assert!(top_k_indices(&scores, 7).is_err());
    assert!(top_k_indices(&[1.0, f32::NAN], 1).is_err());
}

#[test]
fn calibration_set_errors_are_clear() {
    let err = calibrate::length_sorted_batches(vec![], 4).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let err = calibrate::length_sorted_batches(vec![vec![1, 2]; 3], 4).unwrap_err().to_string();
    assert!(err.contains("fewer than one batch"), "{err}");
    let err = calibrate::length_sorted_batches(vec![vec![1], vec![]], 1).unwrap_err().to_string();
    assert!(err.contains("no tokens"), "{err}");
    // Longest first, last batch may be short.
    let batches = calibrate::length_sorted_batches(vec![vec![1], vec![1, 2, 3], vec![1, 2], vec![4; 5], vec![9; 4]], 2).unwrap();
    let lens: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(Vec::len).collect()).collect();
    assert_eq!(lens, vec![vec![5, 4], vec![3, 2], vec![1]]);
    let err = calibrate::check_token_ids(&[vec![vec![1, 300]]], 256).unwrap_err().to_string();
    assert!(err.contains("token id 300") && err.contains("256"), "{err}");
}

fn tiny_config(tie: bool) -> ModelConfig {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    });
    ModelConfig::from_json_str(&json.to_string()).unwrap()
}

#[test]
fn prune_plans_are_validated() {
    let config = tiny_config(false);
    let tensors: std::collections::BTreeMap<String, tch::Tensor> = config
        .parameter_shapes()
        .into_iter()
        .map(|(n, s)| (n, tch::Tensor::randn(s.as_slice(), (tch::Kind::Float, tch::Device::Cpu))))
        .collect();
    let mut plan = PrunePlan::identity(&config);
    plan.hidden = vec![3, 1, 2];
    assert!(prune::prune_tensors(&config, &tensors, &plan).unwrap_err().to_string().contains("ascending"));
    plan.hidden = vec![0, 16];
    assert!(prune::prune_tensors(&config, &tensors, &plan).unwrap_err().to_string().contains("out of range"));
    let mut plan = PrunePlan::identity(&config);
    plan.intermediate[1].pop();
    assert!(prune::prune_tensors(&config, &tensors, &plan).unwrap_err().to_string().contains("layer 1"));
    // A correct plan gives the config's shapes, lm_head included.
    let plan = PrunePlan { hidden: vec![0, 2, 5, 7, 11, 15], intermediate: vec![(0..10).collect(), (5..15).collect()] };
    let (new_config, pruned) = prune::prune_tensors(&config, &tensors, &plan).unwrap();
    assert_eq!((new_config.hidden_size, new_config.intermediate_size, new_config.head_dim), (6, 10, 8));
    for (name, shape) in new_config.parameter_shapes() {
        assert_eq!(pruned[&name].size(), shape, "{name}");
    }
    assert_eq!(pruned.len(), new_config.parameter_shapes().len());
    // The slices are the right rows and columns.
    let down = &tensors["model.layers.1.mlp.down_proj.weight"];
    let got = pruned["model.layers.1.mlp.down_proj.weight"].double_value(&[2, 3]);
    assert_eq!(got, down.double_value(&[5, 8]));
    let mut tensors = tensors;
    tensors.insert("model.rotary.inv_freq".into(), tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu)));
    assert!(prune::prune_tensors(&config, &tensors, &plan).is_err());
}

#[test]
fn importance_file_round_trips_and_refuses_other_models() {
    let config = tiny_config(true);
    let importance = Importance {
        hidden: (0..16).map(|i| i as f32 * 0.5).collect(),
        intermediate: vec![(0..24).map(|i| (24 - i) as f32).collect(), vec![1.0; 24]],
        calib_size: 8,
        tokens: 100,
        seq_agg: SeqAgg::AbsMean,
        norm: SampleNorm::L1,
        model_hash: calibrate::config_hash(&config),
        model_config: config.to_hf_json().to_string(),
    };
    let dir = std::env::temp_dir().join(format!("overfill-prune-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("importance.safetensors");
    importance.save(&path).unwrap();
    let loaded = Importance::load(&path).unwrap();
    assert_eq!(loaded, importance);
    loaded.check_matches(&config).unwrap();
    let plan = loaded.plan(4, 3).unwrap();
    assert_eq!(plan.hidden, vec![12, 13, 14, 15]);
    assert_eq!(plan.intermediate[0], vec![0, 1, 2]);
    assert_eq!(plan.intermediate[1], vec![0, 1, 2]);
    let mut other = tiny_config(true);
    other.hidden_size = 32;
    assert!(loaded.check_matches(&other).unwrap_err().to_string().contains("hidden 16"));
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(Importance::load(&path).unwrap_err().to_string().contains("importance.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}
