//! Lossless two-stage (speculative) decoding: the decoder drafts over the full model's cache, the
//! full model verifies. Greedy output is checked token for token against transformers' greedy
//! `generate()` of the full model (tests/python/two_stage_ref.py) for one prompt at a time and a
//! left-padded batch of four, with a drafter that often disagrees (the sliced decoder) and one that
//! always agrees (the full model itself); sampled output is checked in distribution against the
//! full model's exact probabilities, with one sampler for the batch (`generate`) and with one per
//! row (`overfill serve`), where greedy rows among sampled ones stay the full model's greedy output.
mod common;

use std::collections::HashMap;

use common::*;
use overfill_model::generate::{generate, greedy, DecodeOptions, GenerateOptions};
use overfill_model::sampling::Sampling;
use overfill_model::speculative::generate_speculative;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

const CASES: [&str; 2] = ["llama3", "qwen2_bias"];

/// The four prompts of different lengths and transformers' greedy tokens for them.
fn spec_refs(case: &str) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let refs = two_stage_refs(case);
    let prompts: Vec<Vec<i64>> = (0..)
        .map_while(|r| refs.get(&format!("spec.prompt.{r}")).map(to_vec_i64))
        .collect();
    (prompts, tensor_rows(&refs["spec.full.tokens"]))
}

fn speculative(sampling: Sampling, draft_len: usize) -> DecodeOptions {
    DecodeOptions {
        sampling,
        refresh_every: None,
        speculative: Some(draft_len),
    }
}

#[test]
fn greedy_speculative_output_is_the_full_models_for_one_prompt_and_a_padded_batch() {
    for case in CASES {
        let (full, decoder) = two_stage_pair(case);
        let (prompts, expected) = spec_refs(case);
        assert_eq!(prompts.len(), 4);
        let n = expected[0].len();
        assert_eq!(
            greedy(&full, &prompts, &no_stop_options(n))
                .unwrap()
                .token_ids,
            expected,
            "{case}: plain greedy"
        );
        for k in [1, 3, 8] {
            for (drafter_name, drafter) in [("decoder", &decoder), ("full model", &full)] {
                let what = format!("{case}, K = {k}, drafter {drafter_name}");
                let batch = generate(
                    &full,
                    drafter,
                    &prompts,
                    &no_stop_options(n),
                    &speculative(Sampling::Greedy, k),
                    None,
                )
                .unwrap();
                assert_eq!(batch.token_ids, expected, "{what}: batch of 4");
                let (mut proposed, mut accepted) = (0, 0);
                for (row, prompt) in prompts.iter().enumerate() {
                    let alone = generate(
                        &full,
                        drafter,
                        std::slice::from_ref(prompt),
                        &no_stop_options(n),
                        &speculative(Sampling::Greedy, k),
                        None,
                    )
                    .unwrap();
                    assert_eq!(
                        alone.token_ids[0], expected[row],
                        "{what}: prompt {row} alone"
                    );
                    let stats = alone.speculative.unwrap();
                    assert_eq!(
                        stats.proposed, alone.decode_steps,
                        "{what}: one draft per decoder step"
                    );
                    proposed += stats.proposed;
                    accepted += stats.accepted;
                    if std::ptr::eq(drafter, &full) {
                        // Every round keeps its k drafts and adds one token: the n - 1 tokens after
                        // the prefill's take ceil((n - 1) / (k + 1)) verifications.
                        assert_eq!(stats.verifications, (n - 1).div_ceil(k + 1), "{what}");
                        assert_eq!(stats.acceptance_rate(), 1.0, "{what}");
                    }
                }
                let rate = accepted as f64 / proposed as f64;
                if std::ptr::eq(drafter, &decoder) {
                    // Both paths are exercised: drafts kept and drafts rejected.
                    assert!(rate > 0.0 && rate < 1.0, "{what}: acceptance {rate}");
                }
            }
        }
    }
}

#[test]
fn rows_stop_on_their_own_and_stream_in_order() {
    let case = "llama3";
    let (full, decoder) = two_stage_pair(case);
    let (prompts, expected) = spec_refs(case);
    // Stop ids met at different steps by different rows; the others run to max_new_tokens.
    let mut stopping = no_stop_options(19);
    stopping.eos_token_ids = vec![expected[0][4]];
    let plain = greedy(&full, &prompts, &stopping).unwrap();
    let lengths: Vec<usize> = plain.token_ids.iter().map(Vec::len).collect();
    assert_eq!(lengths, [5, 14, 14, 19]);
    for k in [3, 8] {
        let mut seen = vec![vec![]; prompts.len()];
        let mut on_token = |row: usize, id: i64| seen[row].push(id);
        let out = generate(
            &full,
            &decoder,
            &prompts,
            &stopping,
            &speculative(Sampling::Greedy, k),
            Some(&mut on_token),
        )
        .unwrap();
        assert_eq!(out.token_ids, plain.token_ids, "K = {k}");
        assert_eq!(seen, out.token_ids, "K = {k}: streamed tokens");
        let stats = out.speculative.unwrap();
        assert!(stats.accepted <= stats.proposed && stats.verifications > 0);
        assert!(stats.row_verifications >= stats.verifications);
    }
}

/// The full model's sampling distribution, computed on the host from its logits: temperature,
/// then the `top_k` largest, then the smallest prefix of the sorted rest whose mass reaches
/// `top_p` (transformers' warper order). Returns (token, probability) pairs.
fn warped(logits: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<(i64, f64)> {
    let mut scored: Vec<(i64, f64)> = logits
        .iter()
        .enumerate()
        .map(|(id, &l)| (id as i64, l as f64 / temperature))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(top_k);
    let max = scored[0].1;
    let total: f64 = scored.iter().map(|(_, s)| (s - max).exp()).sum();
    let probs: Vec<(i64, f64)> = scored
        .iter()
        .map(|&(id, s)| (id, (s - max).exp() / total))
        .collect();
    let mut kept = Vec::new();
    let mut before = 0.0;
    for (id, p) in probs {
        if before >= top_p {
            break;
        }
        kept.push((id, p));
        before += p;
    }
    let mass: f64 = kept.iter().map(|(_, p)| p).sum();
    kept.into_iter().map(|(id, p)| (id, p / mass)).collect()
}

/// Exact probability of every sequence of the first `tokens` generated tokens under the full
/// model's sampler, by running the full model alone (no cache) on every prefix.
fn exact_distribution(
    full: &Transformer,
    prompt: &[i64],
    tokens: usize,
    sampling: (f64, usize, f64),
) -> HashMap<Vec<i64>, f64> {
    let (temperature, top_k, top_p) = sampling;
    let mut layer = HashMap::from([(vec![], 1.0)]);
    for _ in 0..tokens {
        let mut next = HashMap::new();
        for (prefix, p) in layer {
            let ids: Vec<i64> = prompt.iter().chain(&prefix).copied().collect();
            let t = ids.len() as i64;
            let logits = full
                .forward(
                    &Tensor::from_slice(&ids).view([1, t]),
                    &Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]),
                    &Tensor::ones([1, t], (Kind::Int64, Device::Cpu)),
                    None,
                )
                .unwrap()
                .get(0)
                .get(t - 1);
            let logits = Vec::<f32>::try_from(&logits.to_kind(Kind::Float)).unwrap();
            for (id, q) in warped(&logits, temperature, top_k, top_p) {
                let mut seq = prefix.clone();
                seq.push(id);
                next.insert(seq, p * q);
            }
        }
        layer = next;
    }
    layer
}

/// Total variation distance between the empirical distribution of `samples` and `exact`.
fn total_variation(samples: &[Vec<i64>], exact: &HashMap<Vec<i64>, f64>) -> f64 {
    let mut counts: HashMap<&[i64], usize> = HashMap::new();
    for s in samples {
        *counts.entry(s.as_slice()).or_default() += 1;
    }
    let n = samples.len() as f64;
    let seen: f64 = counts
        .iter()
        .map(|(seq, &c)| (c as f64 / n - exact.get(*seq).copied().unwrap_or(0.0)).abs())
        .sum();
    let unseen: f64 = exact
        .iter()
        .filter(|(seq, _)| !counts.contains_key(seq.as_slice()))
        .map(|(_, p)| p)
        .sum();
    0.5 * (seen + unseen)
}

/// The full model with every weight nudged by N(0, 0.02²) noise (they are ~N(0, 0.2²)): a drafter
/// that agrees with it often but not always, unlike the sliced decoder, which rarely does.
fn near_copy(full: &Transformer) -> Transformer {
    tch::manual_seed(11);
    let tensors = full
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, &t + t.randn_like() * 0.02))
        .collect();
    Transformer::from_tensors(full.config.clone(), tensors).unwrap()
}

#[test]
fn speculative_sampling_keeps_the_full_models_distribution() {
    let case = "llama3";
    let (full, decoder) = two_stage_pair(case);
    let near = near_copy(&full);
    let prompt = spec_refs(case).0[0].clone();
    // The first 4 tokens: the prefill's, then one round of 2 drafts and the full model's own (K = 3
    // is cut to the 2 drafts that 3 remaining tokens can use), so the first and second draft
    // positions and the token after all-kept drafts are all tested. Temperature, top-k and top-p
    // all take part: q and p must both be the warped distributions.
    const TOKENS: usize = 4;
    const ROWS: usize = 4000;
    let (temperature, top_k, top_p) = (1.5, 4, 0.8);
    // `seeds` runs of ROWS copies of the prompt (rows draw independently).
    let samples_of = |drafter: &Transformer, speculative: Option<usize>, seeds: u64| {
        let (mut samples, mut proposed, mut accepted) = (Vec::new(), 0, 0);
        for seed in 0..seeds {
            let decode = DecodeOptions {
                sampling: Sampling::new(temperature, Some(top_k), top_p, seed).unwrap(),
                refresh_every: None,
                speculative,
            };
            let prompts = vec![prompt.clone(); ROWS];
            let out = generate(
                &full,
                drafter,
                &prompts,
                &no_stop_options(TOKENS),
                &decode,
                None,
            )
            .unwrap();
            if let Some(stats) = out.speculative {
                (proposed, accepted) = (proposed + stats.proposed, accepted + stats.accepted);
            }
            samples.extend(out.token_ids);
        }
        (samples, accepted as f64 / proposed.max(1) as f64)
    };
    let exact = exact_distribution(&full, &prompt, TOKENS, (temperature, top_k, top_p));
    const SEEDS: u64 = 3;
    let n = (ROWS as u64 * SEEDS) as f64;
    // E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) <= 1/2 sum_i sqrt(p_i / n); one sample moves the
    // TV by at most 1/n, so (McDiarmid) it exceeds its mean by t with probability at most
    // exp(-2 n t^2): t = sqrt(ln(1e6) / (2n)) makes a false failure a one-in-a-million event.
    let bound = 0.5 * exact.values().map(|p| (p / n).sqrt()).sum::<f64>()
        + ((1e6f64).ln() / (2.0 * n)).sqrt();
    for (name, drafter) in [("sliced decoder", &decoder), ("near copy", &near)] {
        let (samples, rate) = samples_of(drafter, Some(3), SEEDS);
        let tv = total_variation(&samples, &exact);
        eprintln!(
            "drafter {name}: acceptance {rate:.3}, TV {tv:.4} (bound {bound:.4}, {} outcomes)",
            exact.len()
        );
        assert!(rate > 0.0 && rate < 1.0, "{name}: acceptance {rate}");
        assert!(tv < bound, "drafter {name}: TV {tv:.4} >= {bound:.4}");
    }
    // Control: the full model's own sampler.
    let control = total_variation(&samples_of(&full, None, SEEDS).0, &exact);
    assert!(
        control < bound,
        "full model alone: TV {control:.4} >= {bound:.4}"
    );
    // The test tells distributions apart: the two-stage sampler's (the decoder's) is far off.
    let two_stage = total_variation(&samples_of(&decoder, None, 1).0, &exact);
    assert!(two_stage > 0.5, "two-stage TV {two_stage:.4}");
}

/// `overfill serve` verifies every row with its own sampler: in one batch, every tenth row is
/// greedy and must give the full model's greedy tokens; the others sample with seeds of their own
/// and must follow the full model's distribution (the bound of the test above).
#[test]
fn per_row_samplers_keep_greedy_rows_exact_and_sampled_rows_in_distribution() {
    let case = "llama3";
    let (full, decoder) = two_stage_pair(case);
    let near = near_copy(&full);
    let prompt = spec_refs(case).0[0].clone();
    const TOKENS: usize = 4;
    const ROWS: u64 = 4400;
    let (temperature, top_k, top_p) = (1.5, 4, 0.8);
    let greedy_tokens = generate(&full, &full, &[prompt.clone()], &no_stop_options(TOKENS), &DecodeOptions::default(), None)
        .unwrap()
        .token_ids
        .remove(0);
    let exact = exact_distribution(&full, &prompt, TOKENS, (temperature, top_k, top_p));
    for (name, drafter) in [("sliced decoder", &decoder), ("near copy", &near)] {
        let (mut samples, mut proposed, mut accepted) = (Vec::new(), 0, 0);
        for run in 0..3 {
            let samplings: Vec<Sampling> = (0..ROWS)
                .map(|i| match i % 10 {
                    0 => Sampling::Greedy,
                    _ => Sampling::new(temperature, Some(top_k), top_p, run * ROWS + i).unwrap(),
                })
                .collect();
            let prompts = vec![prompt.clone(); ROWS as usize];
            let out = generate_speculative(&full, drafter, &prompts, &no_stop_options(TOKENS), &samplings, 3, None).unwrap();
            let stats = out.speculative.unwrap();
            (proposed, accepted) = (proposed + stats.proposed, accepted + stats.accepted);
            for (i, tokens) in out.token_ids.into_iter().enumerate() {
                if i % 10 == 0 {
                    assert_eq!(tokens, greedy_tokens, "{name}, run {run}: greedy row {i}");
                } else {
                    samples.push(tokens);
                }
            }
        }
        let n = samples.len() as f64;
        let bound = 0.5 * exact.values().map(|p| (p / n).sqrt()).sum::<f64>() + ((1e6f64).ln() / (2.0 * n)).sqrt();
        let tv = total_variation(&samples, &exact);
        let rate = accepted as f64 / proposed as f64;
        eprintln!("per-row samplers, drafter {name}: {} samples, acceptance {rate:.3}, TV {tv:.4} (bound {bound:.4})", samples.len());
        assert!(rate > 0.0 && rate < 1.0, "{name}: acceptance {rate}");
        assert!(tv < bound, "{name}: TV {tv:.4} >= {bound:.4}");
    }
    // One sampling for the batch or one per prompt, nothing else.
    let two = vec![prompt.clone(); 2];
    let err = generate_speculative(&full, &decoder, &two, &no_stop_options(2), &vec![Sampling::Greedy; 3], 2, None).unwrap_err();
    assert!(err.to_string().contains("one for all or one per prompt"), "{err}");
}

#[test]
fn bad_speculative_settings_are_errors() {
    let case = "llama3";
    let (full, decoder) = two_stage_pair(case);
    let prompt = vec![vec![5i64, 9, 13]];
    let err = |decode: &DecodeOptions, options: &GenerateOptions| {
        let r = generate(&full, &decoder, &prompt, options, decode, None);
        format!("{:#}", r.err().expect("an error"))
    };
    let e = err(&speculative(Sampling::Greedy, 0), &no_stop_options(4));
    assert!(e.contains("at least 1 draft token"), "{e}");
    let mut with_refresh = speculative(Sampling::Greedy, 2);
    with_refresh.refresh_every = Some(2);
    assert!(err(&with_refresh, &no_stop_options(4)).contains("excludes refresh_every"));
    let mut logits = no_stop_options(4);
    logits.keep_prompt_logits = true;
    assert!(err(&speculative(Sampling::Greedy, 2), &logits).contains("prompt logits"));
    let shallow = two_stage_model(case, "shallow");
    let r = generate(
        &full,
        &shallow,
        &prompt,
        &no_stop_options(4),
        &speculative(Sampling::Greedy, 2),
        None,
    );
    assert!(format!("{:#}", r.err().unwrap()).contains("num_hidden_layers"));
}
