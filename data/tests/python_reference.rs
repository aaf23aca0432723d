//! Token ids and split points against Hugging Face `transformers` `apply_chat_template`.
mod common;

use std::process::Command;

use overfill_data::conversation::{Message, Role};
use overfill_data::synth::{synth_row, write_tiny_tokenizer, SynthOptions};
use overfill_data::template::{ChatTemplate, TemplateSpec};
use overfill_data::tokenize::{load_tokenizer, SplitTokenizer, TokenizerConfig};
use serde_json::json;

fn conversations() -> Vec<Vec<Message>> {
    let options = SynthOptions { max_words: 30, ..SynthOptions::default() };
    let mut convs: Vec<Vec<Message>> = (0..150)
        .map(|i| synth_row(3, i, &options).turns.into_iter().map(|(r, c)| Message::new(r, c)).collect())
        .collect();
    let m = Message::new;
    convs.push(vec![m(Role::User, "Hi"), m(Role::Assistant, "Hello!")]);
    convs.push(vec![m(Role::System, "  You are terse.\n"), m(Role::User, "2+2?"), m(Role::Assistant, "4")]);
    convs.push(vec![m(Role::User, "\u{1f}sep trim\u{1c}"), m(Role::Assistant, "\u{3000}ideographic space\u{a0}")]);
    convs.push(vec![m(Role::User, "日本語で答えて"), m(Role::Assistant, " はい、もちろん。🙂\n\n")]);
    convs.push(vec![m(Role::User, "q"), m(Role::Assistant, "\n\n  leading newlines and spaces")]);
    convs.push(vec![m(Role::User, "q"), m(Role::Assistant, "?! punctuation first")]);
    convs.push(vec![m(Role::User, "q"), m(Role::Assistant, "123 digits first")]);
    convs.push(vec![
        m(Role::System, "sys"),
        m(Role::User, "one"),
        m(Role::Assistant, "two"),
        m(Role::User, "three"),
        m(Role::Assistant, "four <|eot_id|> literal special text"),
    ]);
    convs
}

fn compare(tokenizer_dir: &std::path::Path) {
    let convs = conversations();
    let tmp = tempfile::tempdir().unwrap();
    let request = tmp.path().join("request.json");
    let payload = json!({
        "tokenizer": tokenizer_dir,
        "template": null,
        "conversations": convs.iter().map(|c| c.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>()).collect::<Vec<_>>(),
    });
    std::fs::write(&request, payload.to_string()).unwrap();
    let script = common::repo_root().join("tests/python/preprocess_ref.py");
    let output = match Command::new(common::python()).arg(&script).arg(&request).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: cannot run {}: {e}", common::python().display());
            return;
        }
    };
    assert!(output.status.success(), "python failed: {}", String::from_utf8_lossy(&output.stderr));
    let reference: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(reference.len(), convs.len());

    let config = TokenizerConfig::load(Some(&tokenizer_dir.join("tokenizer_config.json"))).unwrap();
    let template = ChatTemplate::from_spec(&TemplateSpec::Llama3, config.template_tokens(), None).unwrap();
    let tokenizer = SplitTokenizer::new(load_tokenizer(&tokenizer_dir.join("tokenizer.json")).unwrap(), &template).unwrap();
    for (i, (conv, r)) in convs.iter().zip(&reference).enumerate() {
        let ids = |k: &str| -> Vec<u32> { r[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
        let (full, context) = (ids("full_ids"), ids("context_ids"));
        let split = tokenizer.encode_split(&template.render_split(conv).unwrap()).unwrap();
        assert_eq!(split.context_ids, context, "conversation {i}: context ids / split point differ");
        assert_eq!(split.target_ids, full[context.len()..].to_vec(), "conversation {i}: target ids differ");
        assert_eq!(*split.target_ids.last().unwrap(), tokenizer.end_of_turn_id, "conversation {i}: target must end with <|eot_id|>");
        assert_eq!(split.context_ids.iter().filter(|&&t| Some(t) == tokenizer.tokenizer.token_to_id("<|begin_of_text|>")).count(), 1, "exactly one BOS");
    }
}

#[test]
fn llama32_tokenizer_matches_transformers() {
    let Some(dir) = common::llama_fixture() else { return };
    compare(&dir);
}

#[test]
fn tiny_tokenizer_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = write_tiny_tokenizer(tmp.path()).unwrap();
    assert!(vocab <= 512, "tiny vocabulary {vocab} > 512");
    compare(tmp.path());
}

/// A GPT-2-style pre-tokenizer merges "\n\n" differently when text follows: the quick split
/// must notice and report a boundary error instead of shipping a wrong split.
#[test]
fn boundary_artefacts_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_tokenizer(tmp.path()).unwrap();
    let path = tmp.path().join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    std::fs::write(&path, json.to_string()).unwrap();
    let template = ChatTemplate::from_spec(&TemplateSpec::Llama3, Default::default(), None).unwrap();
    let tokenizer = SplitTokenizer::new(load_tokenizer(&path).unwrap(), &template).unwrap();
    let conv = vec![Message::new(Role::User, "q"), Message::new(Role::Assistant, "Hello")];
    let result = tokenizer.encode_split(&template.render_split(&conv).unwrap());
    assert_eq!(result, Err(overfill_data::tokenize::SplitError::Boundary));
}
