//! Two-stage (OverFill) generation: the full model prefills, a narrower decoder continues from
//! its cache. Checked token for token against transformers running the upstream algorithm
//! (tests/python/two_stage_ref.py), for one prompt and a batch of different lengths; sampling,
//! refresh and the errors on bad input.
mod common;

use std::collections::HashMap;

use common::*;
use overfill_model::generate::{generate, greedy, greedy_two_stage, DecodeOptions};
use overfill_model::sampling::Sampling;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

const CASES: [&str; 2] = ["llama3", "qwen2_bias"];

fn batch_prompts(refs: &HashMap<String, Tensor>) -> Vec<Vec<i64>> {
    (0..)
        .map_while(|r| refs.get(&format!("batch.prompt.{r}")).map(to_vec_i64))
        .collect()
}

#[test]
fn greedy_two_stage_matches_transformers_for_one_prompt_and_a_ragged_batch() {
    for case in CASES {
        let (full, decoder) = two_stage_pair(case);
        let refs = two_stage_refs(case);
        let single = to_vec_i64(&refs["single.prompt"]);
        let expected = to_vec_i64(&refs["single.tokens"]);
        let n = expected.len();
        let out =
            greedy_two_stage(&full, &decoder, &[single.clone()], &no_stop_options(n)).unwrap();
        assert_eq!(out.token_ids[0], expected, "{case}: single prompt");
        assert_eq!(out.decode_steps, n - 1);
        // The narrow decoder really decodes: the full model alone continues differently.
        let alone = greedy(&full, &[single], &no_stop_options(n)).unwrap();
        assert_eq!(
            alone.token_ids[0],
            to_vec_i64(&refs["full.single.tokens"]),
            "{case}: full model alone"
        );
        assert_ne!(alone.token_ids[0], expected, "{case}");

        let prompts = batch_prompts(&refs);
        assert_eq!(prompts.len(), 3);
        let out = greedy_two_stage(&full, &decoder, &prompts, &no_stop_options(n)).unwrap();
        assert_eq!(
            out.token_ids,
            tensor_rows(&refs["batch.tokens"]),
            "{case}: batch"
        );
    }
}

#[test]
fn refresh_matches_transformers_and_is_greedy_when_the_decoder_is_the_full_model() {
    for case in CASES {
        let (full, decoder) = two_stage_pair(case);
        let refs = two_stage_refs(case);
        let prompts = batch_prompts(&refs);
        let n = refs["batch.tokens"].size()[1] as usize;
        let refresh = |k| DecodeOptions {
            sampling: Sampling::Greedy,
            refresh_every: Some(k),
            speculative: None,
        };
        let out = generate(
            &full,
            &decoder,
            &prompts,
            &no_stop_options(n),
            &refresh(3),
            None,
        )
        .unwrap();
        assert_eq!(
            out.token_ids,
            tensor_rows(&refs["refresh3.batch.tokens"]),
            "{case}"
        );
        // 10 tokens: 1 from prefill, then (3 decoder steps + 1 refresh) twice, 1 decoder step.
        assert_eq!((out.decode_steps, out.refreshes), (7, 2), "{case}");
        assert!(out.refresh_seconds > 0.0 && out.refresh_seconds <= out.decode_seconds);

        let plain = greedy(&full, &prompts, &no_stop_options(n)).unwrap();
        for k in [1, 2, 5] {
            let out = generate(
                &full,
                &full,
                &prompts,
                &no_stop_options(n),
                &refresh(k),
                None,
            )
            .unwrap();
            assert_eq!(
                out.token_ids, plain.token_ids,
                "{case}: full model, refresh every {k}"
            );
            assert!(out.refreshes > 0);
        }
    }
}

#[test]
fn seeded_sampling_reproduces_and_top_k_one_is_greedy() {
    let case = "llama3";
    let (full, decoder) = two_stage_pair(case);
    let prompts = batch_prompts(&two_stage_refs(case));
    let sample = |temperature, top_k, top_p, seed| {
        let decode = DecodeOptions {
            sampling: Sampling::new(temperature, top_k, top_p, seed).unwrap(),
            refresh_every: None,
            speculative: None,
        };
        generate(
            &full,
            &decoder,
            &prompts,
            &no_stop_options(16),
            &decode,
            None,
        )
        .unwrap()
        .token_ids
    };
    let a = sample(1.0, None, 0.9, 5);
    assert_eq!(a, sample(1.0, None, 0.9, 5), "same seed, same tokens");
    // The global torch generator does not take part.
    tch::manual_seed(123);
    assert_eq!(a, sample(1.0, None, 0.9, 5));
    assert_ne!(a, sample(1.0, None, 0.9, 6), "another seed");
    let greedy = greedy_two_stage(&full, &decoder, &prompts, &no_stop_options(16)).unwrap();
    assert_ne!(
        a, greedy.token_ids,
        "sampling at temperature 1 is not greedy"
    );
    assert_eq!(sample(1.3, Some(1), 1.0, 9), greedy.token_ids, "top-k 1");
    assert_eq!(
        sample(0.0, Some(40), 0.5, 9),
        greedy.token_ids,
        "temperature 0"
    );
}

#[test]
fn streaming_callback_sees_every_token_in_order() {
    let case = "qwen2_bias";
    let (full, decoder) = two_stage_pair(case);
    let prompts = batch_prompts(&two_stage_refs(case));
    let mut seen = vec![vec![]; prompts.len()];
    let mut on_token = |row: usize, id: i64| seen[row].push(id);
    let out = generate(
        &full,
        &decoder,
        &prompts,
        &no_stop_options(6),
        &DecodeOptions::default(),
        Some(&mut on_token),
    )
    .unwrap();
    assert_eq!(seen, out.token_ids);
}

#[test]
fn bad_input_is_a_clear_error() {
    let case = "llama3";
    let full = two_stage_model(case, "full");
    let prompt = vec![vec![5i64, 9, 13]];
    let err = |r: anyhow::Result<_>| format!("{:#}", r.err().expect("an error"));

    let shallow = two_stage_model(case, "shallow");
    let e = err(greedy_two_stage(
        &full,
        &shallow,
        &prompt,
        &no_stop_options(4),
    ));
    assert!(
        e.contains("num_hidden_layers: full model 2, decoder 1"),
        "{e}"
    );

    let bf16 = Transformer::load(
        &two_stage_ref_dir().join(case).join("decoder"),
        Device::Cpu,
        Kind::BFloat16,
    )
    .unwrap();
    let e = err(greedy_two_stage(&full, &bf16, &prompt, &no_stop_options(4)));
    assert!(e.contains("dtype") && e.contains("BFloat16"), "{e}");

    let decoder = two_stage_model(case, "decoder");
    let e = err(greedy_two_stage(
        &full,
        &decoder,
        &[vec![]],
        &no_stop_options(4),
    ));
    assert!(e.contains("prompt 0 is empty"), "{e}");
    let e = err(greedy_two_stage(&full, &decoder, &[], &no_stop_options(4)));
    assert!(e.contains("no prompts"), "{e}");
    let e = err(greedy_two_stage(
        &full,
        &decoder,
        &[vec![5, 97]],
        &no_stop_options(4),
    ));
    assert!(e.contains("token id out of range [0, 97)"), "{e}");
    let never = DecodeOptions {
        sampling: Sampling::Greedy,
        refresh_every: Some(0),
        speculative: None,
    };
    let e = err(generate(
        &full,
        &decoder,
        &prompt,
        &no_stop_options(4),
        &never,
        None,
    ));
    assert!(e.contains("refresh_every must be at least 1"), "{e}");
}
