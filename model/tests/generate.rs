//! Greedy generation: matches transformers' greedy tokens, and batches (left- or right-padded,
//! rows of different lengths) decode exactly like each row alone.
mod common;

use common::*;
use overfill_model::generate::{greedy, left_pad, GenerateOptions};
use overfill_model::kv_cache::KvCache;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

fn load(case: &str) -> Transformer {
    Transformer::load(&case_model_dir(case), Device::Cpu, Kind::Float).unwrap()
}

fn options(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        eos_token_ids: vec![],
        pad_token_id: 0,
        keep_prompt_logits: true,
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    for case in ["llama3_tied", "qwen2_bias"] {
        let model = load(case);
        let refs = case_refs(case);
        let prompt = to_vec_i64(&refs["prompt_ids"]);
        let expected = to_vec_i64(&refs["greedy_ids"]);
        let out = greedy(&model, &[prompt], &options(expected.len())).unwrap();
        assert_eq!(out.token_ids[0], expected, "{case}");
        assert_eq!(out.decode_steps, expected.len() - 1);
        let diff = max_abs_diff(
            &out.prompt_logits.unwrap().squeeze_dim(0),
            &refs["prompt_logits"],
        );
        assert!(diff <= 1e-4, "{case}: prompt logits differ by {diff}");
    }
}

#[test]
fn left_padded_batch_generates_like_each_row_alone() {
    let model = load("llama_untied");
    let prompts: Vec<Vec<i64>> = vec![
        vec![5, 9, 13, 40, 41, 7, 3],
        vec![60, 2],
        vec![11, 12, 13, 14],
    ];
    let batch = greedy(&model, &prompts, &options(6)).unwrap();
    for (row, prompt) in prompts.iter().enumerate() {
        let alone = greedy(&model, std::slice::from_ref(prompt), &options(6)).unwrap();
        assert_eq!(batch.token_ids[row], alone.token_ids[0], "row {row}");
        assert_eq!(alone.token_ids[0].len(), 6);
    }
}

#[test]
fn rows_stop_at_eos() {
    let model = load("llama_untied");
    let prompts: Vec<Vec<i64>> = vec![vec![5, 9, 13], vec![60, 2, 8, 8]];
    let free = greedy(&model, &prompts, &options(6)).unwrap();
    // Declare row 0's third token an eos: row 0 stops there, row 1 is unaffected unless it meets it.
    let eos = free.token_ids[0][2];
    let mut opts = options(6);
    opts.eos_token_ids = vec![eos];
    let stopped = greedy(&model, &prompts, &opts).unwrap();
    let first_eos = free.token_ids[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(
        stopped.token_ids[0],
        free.token_ids[0][..=first_eos].to_vec()
    );
    let row1_cut = free.token_ids[1]
        .iter()
        .position(|&t| t == eos)
        .map_or(6, |p| p + 1);
    assert_eq!(stopped.token_ids[1], free.token_ids[1][..row1_cut].to_vec());
}

#[test]
fn left_pad_computes_mask_and_positions() {
    let b = left_pad(&[vec![7, 8, 9], vec![4]], 0, Device::Cpu).unwrap();
    assert_eq!(to_vec_i64(&b.ids), vec![7, 8, 9, 0, 0, 4]);
    assert_eq!(to_vec_i64(&b.attention_mask), vec![1, 1, 1, 0, 0, 1]);
    assert_eq!(to_vec_i64(&b.positions), vec![0, 1, 2, 0, 0, 0]);
    assert!(left_pad(&[vec![1], vec![]], 0, Device::Cpu).is_err());
}

/// Right padding: real tokens first, padding slots after; decode steps append after the padding
/// and the mask hides it. Each row's decode logits equal that row decoded alone.
#[test]
fn right_padded_batch_decodes_like_each_row_alone() {
    let model = load("qwen2_bias");
    let rows: Vec<Vec<i64>> = vec![vec![5, 9, 13, 40, 41], vec![60, 2], vec![11, 12, 13]];
    let width = 5i64;
    let steps: Vec<Vec<i64>> = vec![vec![3, 4, 5], vec![6, 7, 8], vec![9, 10, 11]]; // fed tokens per row
    let mut ids = vec![0i64; rows.len() * width as usize];
    let mut mask = vec![0i64; rows.len() * width as usize];
    for (r, row) in rows.iter().enumerate() {
        for (t, &id) in row.iter().enumerate() {
            ids[r * width as usize + t] = id;
            mask[r * width as usize + t] = 1;
        }
    }
    let n = rows.len() as i64;
    let ids = Tensor::from_slice(&ids).view([n, width]);
    let mut mask = Tensor::from_slice(&mask).view([n, width]);
    let positions = Tensor::arange(width, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .repeat([n, 1]);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let _prefill = model
        .forward(&ids, &positions, &mask, Some(&mut cache))
        .unwrap();
    let mut batch_logits = vec![];
    for step in 0..3 {
        let fed: Vec<i64> = steps.iter().map(|s| s[step]).collect();
        let pos: Vec<i64> = rows.iter().map(|r| (r.len() + step) as i64).collect();
        mask = Tensor::cat(
            &[&mask, &Tensor::ones([n, 1], (Kind::Int64, Device::Cpu))],
            1,
        );
        let logits = model
            .forward(
                &Tensor::from_slice(&fed).view([n, 1]),
                &Tensor::from_slice(&pos).view([n, 1]),
                &mask,
                Some(&mut cache),
            )
            .unwrap();
        batch_logits.push(logits);
    }
    assert_eq!(cache.row_lengths(), vec![8, 5, 6]);
    for (r, row) in rows.iter().enumerate() {
        let t = row.len() as i64;
        let mut alone_cache = KvCache::new(model.config.num_hidden_layers);
        let mut alone_mask = Tensor::ones([1, t], (Kind::Int64, Device::Cpu));
        let alone_pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let _prefill = model
            .forward(
                &Tensor::from_slice(row).unsqueeze(0),
                &alone_pos,
                &alone_mask,
                Some(&mut alone_cache),
            )
            .unwrap();
        for step in 0..3 {
            alone_mask = Tensor::cat(
                &[
                    &alone_mask,
                    &Tensor::ones([1, 1], (Kind::Int64, Device::Cpu)),
                ],
                1,
            );
            let logits = model
                .forward(
                    &Tensor::from_slice(&[steps[r][step]]).view([1, 1]),
                    &Tensor::from_slice(&[t + step as i64]).view([1, 1]),
                    &alone_mask,
                    Some(&mut alone_cache),
                )
                .unwrap();
            let diff = max_abs_diff(&batch_logits[step].get(r as i64), &logits.get(0));
            assert!(
                diff <= 1e-4,
                "row {r} step {step}: differs from the row alone by {diff}"
            );
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let model = load("llama_untied");
    let ids = Tensor::from_slice(&[1i64, 500]).view([1, 2]);
    let pos = Tensor::arange(2, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
    let err = format!("{:#}", model.forward(&ids, &pos, &mask, None).unwrap_err());
    assert!(err.contains("token id out of range"), "{err}");
    let ids = Tensor::from_slice(&[1i64, 5]).view([1, 2]);
    let err = format!(
        "{:#}",
        model
            .forward(&ids, &pos, &mask.narrow(1, 0, 1), None)
            .unwrap_err()
    );
    assert!(err.contains("attention mask"), "{err}");
    let mut cache = KvCache::new(1);
    assert!(
        model.forward(&ids, &pos, &mask, Some(&mut cache)).is_err(),
        "cache with the wrong layer count"
    );
}

/// The cache is a plain value: its K/V and mask, rebuilt into a new cache (as another model
/// would receive them), continue decoding exactly like the original.
#[test]
fn cache_handed_over_as_plain_tensors_decodes_identically() {
    let model = load("llama3_tied");
    let batch = left_pad(&[vec![5, 9, 13, 40], vec![60, 2]], 0, Device::Cpu).unwrap();
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let _prefill = model
        .forward(
            &batch.ids,
            &batch.positions,
            &batch.attention_mask,
            Some(&mut cache),
        )
        .unwrap();
    assert_eq!(cache.len(), 4);
    assert_eq!(cache.row_lengths(), vec![4, 2]);
    let layers = cache.layers();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0].0.size(), vec![2, 2, 4, 16]); // [B, KV, T, hd]
    let handed: Vec<(Tensor, Tensor)> = layers.iter().map(|(k, v)| (k.copy(), v.copy())).collect();
    let mut copy = KvCache::from_parts(handed, cache.attention_mask().unwrap().copy()).unwrap();
    let next = Tensor::from_slice(&[7i64, 8]).view([2, 1]);
    let positions = Tensor::from_slice(&[4i64, 2]).view([2, 1]);
    let mask = Tensor::cat(
        &[
            &batch.attention_mask,
            &Tensor::ones([2, 1], (Kind::Int64, Device::Cpu)),
        ],
        1,
    );
    let a = model
        .forward(&next, &positions, &mask, Some(&mut cache))
        .unwrap();
    let b = model
        .forward(&next, &positions, &mask, Some(&mut copy))
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(copy.len(), 5);
    // Two-stage generation with the same model on both sides is plain greedy generation.
    let prompts = vec![vec![5, 9, 13, 40], vec![60, 2]];
    let one = greedy(&model, &prompts, &options(5)).unwrap();
    let two =
        overfill_model::generate::greedy_two_stage(&model, &model, &prompts, &options(5)).unwrap();
    assert_eq!(one.token_ids, two.token_ids);
    assert!(KvCache::from_parts(
        vec![(
            Tensor::zeros([2, 2, 3, 16], (Kind::Float, Device::Cpu)),
            Tensor::zeros([2, 2, 3, 16], (Kind::Float, Device::Cpu))
        )],
        Tensor::ones([2, 4], (Kind::Int64, Device::Cpu))
    )
    .is_err());
}
