//! `overfill generate --decoder`: two-stage generation from the command line, checked against
//! transformers running the upstream algorithm (tests/python/two_stage_ref.py); text prompts
//! rendered with the chat template as transformers' apply_chat_template renders them; sampling,
//! refresh, batching and the errors on bad input.
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::here::{overfill, overfill_refused, overfill_ok};
use common::model::{cached_script_output, python_script, read_refs, to_vec_i64};
use common::{init_model_with_tokenizer, llama32_tokenizer, LLAMA32_VOCAB_TINY_CONFIG};
use serde_json::Value;
use tch::Tensor;

fn ref_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_script_output("two_stage_ref.py", "two-stage-ref-cache"))
}

fn case(name: &str, which: &str) -> String {
    ref_dir()
        .join(name)
        .join(which)
        .to_str()
        .unwrap()
        .to_string()
}

/// The `--json` object: the last line of stdout.
fn last_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    (0..t.size()[0]).map(|r| to_vec_i64(&t.get(r))).collect()
}

fn joined(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn decoder_flag_matches_transformers_for_one_prompt_and_a_jsonl_batch() {
    for name in ["llama3", "qwen2_bias"] {
        let refs = read_refs(&ref_dir().join(name).join("ref.safetensors"));
        let (full, decoder) = (case(name, "full"), case(name, "decoder"));
        let prompt = joined(&to_vec_i64(&refs["single.prompt"]));
        let expected = to_vec_i64(&refs["single.tokens"]);
        let n = expected.len().to_string();
        let base = [
            "generate",
            "--model",
            &full,
            "--decoder",
            &decoder,
            "--max-new-tokens",
            &n,
        ];
        let out = last_json(&overfill_ok(
            &[
                &base[..],
                &["--prompt-ids", &prompt, "--stop-ids", "none", "--json"],
            ]
            .concat(),
        ));
        assert_eq!(ids(&out["token_ids"]), expected, "{name}");
        assert_eq!(out["two_stage"], true);
        assert_eq!(out["decode_steps"], expected.len() as u64 - 1);
        for key in [
            "prefill_seconds",
            "decode_seconds",
            "decode_tokens_per_second",
        ] {
            assert!(out[key].as_f64().unwrap() > 0.0, "{name}: {key} in {out}");
        }
        // By default rows stop at the model's eos id (2 in these configs), which is kept.
        let out = last_json(&overfill_ok(
            &[&base[..], &["--prompt-ids", &prompt, "--json"]].concat(),
        ));
        let cut = expected
            .iter()
            .position(|&t| t == 2)
            .map_or(expected.len(), |p| p + 1);
        assert_eq!(
            ids(&out["token_ids"]),
            expected[..cut].to_vec(),
            "{name}: eos stop"
        );

        // --input: the rows of different lengths generated as one batch; one JSON line per row,
        // then the --json object.
        let jsonl = ref_dir().join(name).join("batch.jsonl");
        let stdout = overfill_ok(
            &[
                &base[..],
                &[
                    "--input",
                    jsonl.to_str().unwrap(),
                    "--stop-ids",
                    "none",
                    "--json",
                ],
            ]
            .concat(),
        );
        let expected = rows(&refs["batch.tokens"]);
        let lines: Vec<Value> = stdout
            .trim()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), expected.len() + 1);
        for (row, line) in lines[..expected.len()].iter().enumerate() {
            assert_eq!(line["row"], row as u64);
            assert_eq!(ids(&line["token_ids"]), expected[row], "{name}: row {row}");
        }
        let out = &lines[expected.len()];
        let got: Vec<Vec<i64>> = out["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(got, expected, "{name}: batch");
        assert_eq!(out["batch_size"], 3);

        // --refresh-every 3: the full model re-runs the decoder's tokens every 3 slots.
        let out = last_json(&overfill_ok(
            &[
                &base[..],
                &[
                    "--input",
                    jsonl.to_str().unwrap(),
                    "--stop-ids",
                    "none",
                    "--refresh-every",
                    "3",
                    "--json",
                ],
            ]
            .concat(),
        ));
        let got: Vec<Vec<i64>> = out["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(got, rows(&refs["refresh3.batch.tokens"]), "{name}: refresh");
        assert_eq!(out["refreshes"], 2);
        assert!(out["refresh_seconds"].as_f64().unwrap() > 0.0);
    }
}

/// `--speculative K`: the decoder drafts, the full model verifies; the output is transformers'
/// greedy generation of the full model alone, and the acceptance statistics are reported.
#[test]
fn speculative_flag_gives_the_full_models_tokens_and_reports_acceptance() {
    let name = "llama3";
    let refs = read_refs(&ref_dir().join(name).join("ref.safetensors"));
    let expected = rows(&refs["spec.full.tokens"]);
    let jsonl = ref_dir().join(name).join("spec.jsonl");
    let (full, decoder) = (case(name, "full"), case(name, "decoder"));
    let n = expected[0].len().to_string();
    let out = last_json(&overfill_ok(&[
        "generate", "--model", &full, "--decoder", &decoder, "--speculative", "3",
        "--input", jsonl.to_str().unwrap(), "--max-new-tokens", &n, "--stop-ids", "none", "--json",
    ]));
    let got: Vec<Vec<i64>> = out["token_ids"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(got, expected);
    let stats = &out["speculative"];
    assert_eq!(stats["draft_len"], 3);
    let rate = stats["acceptance_rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate < 1.0, "{stats}");
    let (proposed, accepted) = (stats["proposed"].as_u64().unwrap(), stats["accepted"].as_u64().unwrap());
    assert_eq!(rate, accepted as f64 / proposed as f64);
    assert!(stats["verifications"].as_u64().unwrap() > 0);

    // Without --json the statistics go to stderr.
    let prompt = joined(&expected[0][..3]);
    let output = overfill(&["generate", "--model", &full, "--decoder", &decoder, "--speculative", "2", "--prompt-ids", &prompt]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("speculative K=2:") && stderr.contains("drafts accepted"), "{stderr}");

    let err = overfill_refused(&["generate", "--model", &full, "--prompt-ids", "5", "--speculative", "2"]);
    assert!(err.contains("--decoder"), "--speculative needs a decoder: {err}");
    let two = ["generate", "--model", &full, "--decoder", &decoder, "--prompt-ids", "5"];
    let err = overfill_refused(&[&two[..], &["--speculative", "2", "--refresh-every", "2"]].concat());
    assert!(err.contains("cannot be used with"), "{err}");
    let err = overfill_refused(&[&two[..], &["--speculative", "0"]].concat());
    assert!(err.contains("--speculative must be at least 1"), "{err}");
}

#[test]
fn seeded_sampling_reproduces_and_top_k_one_is_greedy() {
    let (full, decoder) = (case("llama3", "full"), case("llama3", "decoder"));
    let jsonl = ref_dir().join("llama3").join("batch.jsonl");
    let run = |extra: &[&str]| -> Vec<Vec<i64>> {
        let base = [
            "generate",
            "--model",
            &full,
            "--decoder",
            &decoder,
            "--input",
            jsonl.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--stop-ids",
            "none",
            "--json",
        ];
        let out = last_json(&overfill_ok(&[&base[..], extra].concat()));
        out["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect()
    };
    let sampled = run(&["--temperature", "1.0", "--top-p", "0.95", "--seed", "17"]);
    assert_eq!(
        sampled,
        run(&["--temperature", "1.0", "--top-p", "0.95", "--seed", "17"])
    );
    assert_ne!(
        sampled,
        run(&["--temperature", "1.0", "--top-p", "0.95", "--seed", "18"])
    );
    let greedy = run(&[]);
    assert_ne!(sampled, greedy);
    assert_eq!(
        run(&["--temperature", "0.8", "--top-k", "1", "--seed", "3"]),
        greedy
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let (full, decoder) = (case("llama3", "full"), case("llama3", "decoder"));
    let shallow = case("llama3", "shallow");
    let err = overfill_refused(&[
        "generate",
        "--model",
        &full,
        "--decoder",
        &shallow,
        "--prompt-ids",
        "5,6",
    ]);
    assert!(
        err.contains("cannot continue from --model")
            && err.contains("num_hidden_layers: full model 2, decoder 1"),
        "{err}"
    );
    let two = ["generate", "--model", &full, "--decoder", &decoder];
    let err = overfill_refused(&[&two[..], &["--prompt-ids", ""]].concat());
    assert!(err.contains("--prompt-ids is empty"), "{err}");
    let err = overfill_refused(&[&two[..], &["--prompt-ids", "5,97"]].concat());
    assert!(
        err.contains("token id 97") && err.contains("vocabulary"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("in.jsonl");
    std::fs::write(&jsonl, "{\"prompt_ids\": [5, 6]}\n{\"prompt_ids\": []}\n").unwrap();
    let err = overfill_refused(&[&two[..], &["--input", jsonl.to_str().unwrap()]].concat());
    assert!(err.contains("line 2") && err.contains("is empty"), "{err}");
    std::fs::write(&jsonl, "{\"prompt_ids\": [5, 600]}\n").unwrap();
    let err = overfill_refused(&[&two[..], &["--input", jsonl.to_str().unwrap()]].concat());
    assert!(
        err.contains("line 1") && err.contains("token id 600"),
        "{err}"
    );
    std::fs::write(&jsonl, "{\"prompt\": \"hi\"}\n").unwrap();
    let err = overfill_refused(&[&two[..], &["--input", jsonl.to_str().unwrap()]].concat());
    assert!(
        err.contains("tokenizer.json"),
        "a text prompt needs a tokenizer: {err}"
    );

    // Longer than the model's context (max_position_embeddings 64): an error before any work;
    // a prompt that fits but whose generation would not is a warning (an error with --strict).
    let long = joined(&(0..70).map(|i| 3 + i % 90).collect::<Vec<i64>>());
    let err = overfill_refused(&[&two[..], &["--prompt-ids", &long, "--max-new-tokens", "2"]].concat());
    assert!(
        err.contains("the prompt has 70 tokens, more than the model's max_position_embeddings 64"),
        "{err}"
    );
    let fits = joined(&(0..60).map(|i| 3 + i % 90).collect::<Vec<i64>>());
    let out = overfill(&[&two[..], &["--prompt-ids", &fits, "--max-new-tokens", "8"]].concat());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: the prompt (60 tokens) plus --max-new-tokens 8"));
    let err = overfill_refused(&[&two[..], &["--prompt-ids", &fits, "--max-new-tokens", "8", "--strict"]].concat());
    assert!(err.contains("--strict"), "{err}");

    let err = overfill_refused(&[
        "generate",
        "--model",
        &full,
        "--prompt-ids",
        "5",
        "--refresh-every",
        "2",
    ]);
    assert!(
        err.contains("--decoder"),
        "--refresh-every needs a decoder: {err}"
    );
    let err = overfill_refused(&[&two[..], &["--prompt-ids", "5", "--refresh-every", "0"]].concat());
    assert!(err.contains("at least 1"), "{err}");
    let err = overfill_refused(
        &[
            &two[..],
            &["--prompt-ids", "5", "--temperature", "1", "--top-p", "0"],
        ]
        .concat(),
    );
    assert!(err.contains("top-p must be in (0, 1]"), "{err}");
}

/// Text prompts: the same ids as transformers' apply_chat_template with the paper's template and
/// the generation prompt; --messages and --system agree; a single text prompt streams its text.
#[test]
fn text_prompts_render_the_chat_template_like_transformers() {
    let Some(tokenizer) = llama32_tokenizer() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = init_model_with_tokenizer(tmp.path(), LLAMA32_VOCAB_TINY_CONFIG, "5", &tokenizer);
    let model_s = model.to_str().unwrap();
    let messages = tmp.path().join("messages.json");
    std::fs::write(
        &messages,
        r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"  What is 2 + 2?  "}]"#,
    )
    .unwrap();
    let expected: Vec<i64> = serde_json::from_str(&python_script(
        "two_stage_ref.py",
        &[
            "chat-ids",
            tokenizer.to_str().unwrap(),
            messages.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(expected[0], 128000, "BOS written by the template");

    let gen = ["generate", "--model", model_s, "--max-new-tokens", "5"];
    let from_messages = last_json(&overfill_ok(
        &[
            &gen[..],
            &["--messages", messages.to_str().unwrap(), "--json"],
        ]
        .concat(),
    ));
    assert_eq!(ids(&from_messages["prompt_ids"]), expected);
    let from_prompt = last_json(&overfill_ok(
        &[
            &gen[..],
            &[
                "--prompt",
                "  What is 2 + 2?  ",
                "--system",
                "Be brief.",
                "--json",
            ],
        ]
        .concat(),
    ));
    assert_eq!(ids(&from_prompt["prompt_ids"]), expected);
    assert_eq!(from_prompt["token_ids"], from_messages["token_ids"]);
    let raw = last_json(&overfill_ok(
        &[&gen[..], &["--prompt", "What is 2 + 2?", "--raw", "--json"]].concat(),
    ));
    assert_ne!(ids(&raw["prompt_ids"]), expected);

    // Streaming (no --json): the text printed is the text of the generated ids.
    let streamed = overfill_ok(&[&gen[..], &["--messages", messages.to_str().unwrap()]].concat());
    assert_eq!(
        streamed.trim_end_matches('\n'),
        from_messages["text"].as_str().unwrap()
    );

    let err = overfill_refused(&[&gen[..], &["--prompt", "   "]].concat());
    assert!(err.contains("the prompt is empty"), "{err}");
    std::fs::write(&messages, "[]").unwrap();
    let err = overfill_refused(&[&gen[..], &["--messages", messages.to_str().unwrap()]].concat());
    assert!(err.contains("has no messages"), "{err}");
    std::fs::write(&messages, r#"[{"role":"wizard","content":"x"}]"#).unwrap();
    let err = overfill_refused(&[&gen[..], &["--messages", messages.to_str().unwrap()]].concat());
    assert!(err.contains("unknown role \"wizard\""), "{err}");
}

/// `eval-tasks --speculative K`: whatever the drafter (here an unrelated random model of the same
/// shape), every answer is the full model's own, and the acceptance statistics are reported.
#[test]
fn eval_tasks_speculative_answers_are_the_full_models() {
    let Some(tokenizer) = llama32_tokenizer() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (full_dir, drafter_dir) = (tmp.path().join("full"), tmp.path().join("drafter"));
    for dir in [&full_dir, &drafter_dir] {
        std::fs::create_dir(dir).unwrap();
    }
    let full = init_model_with_tokenizer(&full_dir, LLAMA32_VOCAB_TINY_CONFIG, "5", &tokenizer);
    let drafter = init_model_with_tokenizer(&drafter_dir, LLAMA32_VOCAB_TINY_CONFIG, "6", &tokenizer);
    let held_out = tmp.path().join("heldout.jsonl");
    let lines: Vec<String> = ["2 + 2", "the capital of France", "reverse abc"]
        .iter()
        .map(|q| serde_json::json!({"task": "t", "prompt": q, "answer": "x"}).to_string())
        .collect();
    std::fs::write(&held_out, lines.join("\n") + "\n").unwrap();
    let run = |extra: &[&str], out: &str| {
        let out_path = tmp.path().join(out);
        let base = ["eval-tasks", "--model", full.to_str().unwrap(), "--input", held_out.to_str().unwrap(),
            "--max-new-tokens", "12", "--batch-size", "2", "--json", "--out", out_path.to_str().unwrap()];
        let summary = last_json(&overfill_ok(&[&base[..], extra].concat()));
        let answers: Vec<Value> = std::fs::read_to_string(out_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["generated"].clone())
            .collect();
        (summary, answers)
    };
    let (plain, plain_answers) = run(&[], "plain.jsonl");
    let drafter = drafter.to_str().unwrap();
    let (spec, spec_answers) = run(&["--decoder", drafter, "--speculative", "3"], "spec.jsonl");
    assert_eq!(spec_answers, plain_answers);
    assert_eq!(spec["accuracy"], plain["accuracy"]);
    assert_eq!(plain["speculative"], Value::Null);
    let stats = &spec["speculative"];
    assert!(stats["proposed"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["accepted"].as_u64().unwrap() <= stats["proposed"].as_u64().unwrap());
}
