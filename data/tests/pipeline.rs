//! The preprocess stage end to end on synthetic data with the tiny tokenizer.
mod common;

use std::path::Path;
use std::process::Command;

use overfill_data::preprocess::run_preprocess;
use overfill_data::reader::{BatchSpec, ShardDataset, Split};
use overfill_data::recipe::ValSize;
use overfill_data::synth::{write_dataset, write_tiny_tokenizer, SynthFormat, SynthOptions};

fn rows(dir: &Path, split: Split) -> Vec<overfill_data::reader::Example> {
    let data = ShardDataset::open_split(dir, split).unwrap();
    (0..data.len()).map(|i| data.get(i).unwrap()).collect()
}

#[test]
fn every_format_gives_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    let options = SynthOptions { rows: 120, seed: 5, ..SynthOptions::default() };
    let mut reference: Option<Vec<(u64, Vec<u32>, Vec<u32>)>> = None;
    for (format, name) in [
        (SynthFormat::OpenHermes, "a.json"),
        (SynthFormat::OpenHermesJsonl, "b.jsonl"),
        (SynthFormat::Infinity, "c.parquet"),
        (SynthFormat::Messages, "d.json"),
        (SynthFormat::MessagesJsonl, "e.jsonl"),
        (SynthFormat::MessagesParquet, "f.parquet"),
    ] {
        let input = tmp.path().join(name);
        write_dataset(&input, format, &options).unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        let summary = run_preprocess(&common::config(&[&input], &tok, &out)).unwrap();
        assert_eq!(summary.manifest.counts.raw_rows, 120, "{name}");
        assert_eq!(summary.manifest.counts.kept_rows, 120, "{name}");
        let mut got: Vec<_> = rows(&out, Split::Train).into_iter().map(|e| (e.row_id, e.context_ids, e.target_ids)).collect();
        got.sort();
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(r, &got, "{name} differs from the OpenHermes JSON array"),
        }
    }
}

#[test]
fn split_filters_manifest_and_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    let input = tmp.path().join("in.parquet");
    let options = SynthOptions { rows: 400, seed: 1, non_english_fraction: 0.25, ..SynthOptions::default() };
    write_dataset(&input, SynthFormat::Infinity, &options).unwrap();
    let out = tmp.path().join("out");
    let mut config = common::config(&[&input], &tok, &out);
    config.val_size = ValSize::Count(30);
    config.languages = vec!["en".into()];
    config.pre_filter_max_seq_length = Some(300);
    let manifest = run_preprocess(&config).unwrap().manifest;
    let c = &manifest.counts;
    let dropped: u64 = c.dropped.values().sum();
    assert_eq!(c.raw_rows, 400);
    assert_eq!(c.kept_rows + dropped, 400);
    assert!(c.dropped["language"] > 50, "{:?}", c.dropped);
    assert!(c.dropped.get("too_long").copied().unwrap_or(0) > 0, "{:?}", c.dropped);
    assert_eq!(manifest.val.rows, 30);
    assert_eq!(manifest.train.rows + manifest.val.rows, c.kept_rows);

    let train = ShardDataset::open(&out).unwrap();
    let val = ShardDataset::open_split(&out, Split::Val).unwrap();
    assert_eq!((train.len() as u64, val.len()), (manifest.train.rows, 30));
    let eot = manifest.tokenizer.end_of_turn_id;
    let bos = 256 + 0; // first id after the byte vocabulary and merges is checked below via manifest
    let _ = bos;
    for i in 0..train.len() {
        let e = train.get(i).unwrap();
        assert!(e.context_ids.len() + e.target_ids.len() <= 300);
        assert_eq!(*e.target_ids.last().unwrap(), eot);
        assert!(!e.target_ids.is_empty());
    }
    // Train and val are disjoint.
    let train_ids: std::collections::HashSet<u64> = (0..train.len()).map(|i| train.row_id(i)).collect();
    assert!((0..val.len()).all(|i| !train_ids.contains(&val.row_id(i))));

    // Batches: every row once, token budget respected, deterministic, disjoint equal-count ranks.
    let spec = BatchSpec { batch_size: Some(8), max_tokens: Some(1200), seed: 3, group_batches: 4 };
    let batches = train.batches(&spec);
    assert_eq!(batches, train.batches(&spec));
    let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..train.len()).collect::<Vec<_>>());
    for b in &batches {
        assert!(b.len() <= 8);
        let longest = b.iter().map(|&i| train.total_len(i)).max().unwrap();
        assert!(b.len() == 1 || b.len() * longest <= 1200);
    }
    let r0 = train.batches_for_rank(&spec, 0, 3);
    let r1 = train.batches_for_rank(&spec, 1, 3);
    assert_eq!(r0.len(), r1.len());
    assert!(r0.iter().flatten().all(|i| !r1.iter().flatten().any(|j| j == i)));
    let i0 = train.indices_for_rank(0, 2);
    assert_eq!(i0.len(), train.len() / 2);

    let calib = train.calibration_samples(10, 50);
    assert_eq!(calib.len(), 10);
    assert!(calib.iter().all(|s| s.len() <= 50));
    assert_eq!(calib, train.calibration_samples(10, 50));
    let first = train.shuffled_order()[0];
    assert_eq!(calib[0], train.ids(first)[..train.total_len(first).min(50)].to_vec());
}

#[test]
fn rerun_is_noop_and_changes_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    let input = tmp.path().join("in.json");
    write_dataset(&input, SynthFormat::OpenHermes, &SynthOptions { rows: 150, ..SynthOptions::default() }).unwrap();
    let out = tmp.path().join("out");
    let config = common::config(&[&input], &tok, &out);
    let first = run_preprocess(&config).unwrap();
    assert!(!first.up_to_date);
    assert!(run_preprocess(&config).unwrap().up_to_date);
    // Tokenizer change (one merge dropped) → rebuild.
    let path = tok.join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["model"]["merges"].as_array_mut().unwrap().pop();
    std::fs::write(&path, json.to_string()).unwrap();
    let after_tok = run_preprocess(&config).unwrap();
    assert!(!after_tok.up_to_date);
    assert_ne!(after_tok.manifest.key, first.manifest.key);
    // Config change → rebuild; input change → rebuild; template change → rebuild.
    let mut c2 = config.clone();
    c2.seed = 8;
    assert!(!run_preprocess(&c2).unwrap().up_to_date);
    assert!(run_preprocess(&c2).unwrap().up_to_date);
    write_dataset(&input, SynthFormat::OpenHermes, &SynthOptions { rows: 151, ..SynthOptions::default() }).unwrap();
    assert!(!run_preprocess(&c2).unwrap().up_to_date);
    let mut c3 = c2.clone();
    c3.template = "chatml".into();
    let chatml = run_preprocess(&c3).unwrap();
    assert!(!chatml.up_to_date);
    assert_eq!(chatml.manifest.tokenizer.end_of_turn, "<|im_end|>");
}

#[test]
fn bad_rows_are_counted_and_thresholded() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    for (format, name) in [(SynthFormat::OpenHermes, "bad.json"), (SynthFormat::OpenHermesJsonl, "bad.jsonl"), (SynthFormat::Infinity, "bad.parquet")] {
        let input = tmp.path().join(name);
        // 1 row in 10 malformed: bad JSON, missing field, wrong type, invalid UTF-8 in turn.
        let bad = write_dataset(&input, format, &SynthOptions { rows: 200, bad_every: 10, ..SynthOptions::default() }).unwrap();
        assert_eq!(bad, 20);
        let out = tmp.path().join(format!("out-{name}"));
        let mut config = common::config(&[&input], &tok, &out);
        let err = run_preprocess(&config).unwrap_err().to_string();
        assert!(err.contains("malformed") && err.contains("max-bad-fraction"), "{err}");
        // The failed run's manifest keeps the counts and samples, and readers refuse it.
        let refused = overfill_data::manifest::Manifest::load(&out).unwrap_err().to_string();
        assert!(refused.contains("failed preprocess run") && refused.contains("max-bad-fraction"), "{refused}");
        let manifest = overfill_data::manifest::Manifest::load_any(&out).unwrap();
        assert_eq!(manifest.counts.bad_rows, 20, "{name}");
        assert_eq!(manifest.counts.kept_rows, 180, "{name}");
        let sample = &manifest.counts.bad_samples[0];
        assert_eq!(sample.row, 9);
        assert!(sample.file.ends_with(name));
        if format != SynthFormat::Infinity {
            assert!(sample.byte_offset.is_some());
            let errors: Vec<&str> = manifest.counts.bad_samples.iter().map(|b| b.error.as_str()).collect();
            assert!(errors.iter().any(|e| e.contains("missing field")), "{errors:?}");
            assert!(errors.iter().any(|e| e.contains("invalid type")), "{errors:?}");
            assert!(errors.iter().any(|e| e.contains("unicode") || e.contains("UTF-8")), "{errors:?}");
        }
        config.max_bad_fraction = 0.2;
        // A looser limit finishes the run from the failed run's work chunks.
        let finished = run_preprocess(&config).unwrap();
        assert!(!finished.up_to_date && finished.resumed_chunks == 2, "{name}");
        assert!(run_preprocess(&config).unwrap().up_to_date);
    }
}

#[test]
fn missing_input_and_wrong_tokenizer_fail_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    let out = tmp.path().join("out");
    let missing = tmp.path().join("nope.json");
    let err = format!("{:#}", run_preprocess(&common::config(&[&missing], &tok, &out)).unwrap_err());
    assert!(err.contains("nope.json") && err.contains("missing"), "{err}");
    assert!(!out.exists(), "no work before failing");

    // A tokenizer without the Llama-3 header tokens.
    let input = tmp.path().join("in.json");
    write_dataset(&input, SynthFormat::OpenHermes, &SynthOptions { rows: 10, ..SynthOptions::default() }).unwrap();
    let path = tok.join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["added_tokens"].as_array_mut().unwrap().retain(|t| t["content"] != "<|start_header_id|>");
    std::fs::write(&path, json.to_string()).unwrap();
    let err = format!("{:#}", run_preprocess(&common::config(&[&input], &tok, &out)).unwrap_err());
    assert!(err.contains("<|start_header_id|>") && err.contains("special tokens"), "{err}");
    assert!(!out.exists());
}

/// Kill a run after some shards (via the test hook in a child process), resume, and compare with
/// an uninterrupted run. Also checks memory stays bounded on a ~300 MB JSON array.
#[test]
fn resume_after_kill_equals_uninterrupted_run() {
    let exe = env!("CARGO_BIN_EXE_preprocess_child");
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    let input = tmp.path().join("in.json");
    write_dataset(&input, SynthFormat::OpenHermes, &SynthOptions { rows: 1000, bad_every: 97, ..SynthOptions::default() }).unwrap();
    let run = |out: &Path, abort: Option<usize>| {
        let mut cmd = Command::new(exe);
        cmd.args([input.to_str().unwrap(), tok.to_str().unwrap(), out.to_str().unwrap(), "100"]);
        if let Some(n) = abort {
            cmd.env(overfill_data::preprocess::ABORT_ENV, n.to_string());
        }
        cmd.output().unwrap()
    };
    let whole = tmp.path().join("whole");
    assert!(run(&whole, None).status.success());
    let resumed = tmp.path().join("resumed");
    let killed = run(&resumed, Some(4));
    assert_eq!(killed.status.code(), Some(86), "{}", String::from_utf8_lossy(&killed.stderr));
    let partial: Vec<_> = std::fs::read_dir(resumed.join(".partial")).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".parquet")).collect();
    assert_eq!(partial.len(), 4);
    let again = run(&resumed, None);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming after 4"));
    for split in [Split::Train, Split::Val] {
        assert_eq!(rows(&whole, split), rows(&resumed, split));
    }
    let a = overfill_data::manifest::Manifest::load(&whole).unwrap();
    let b = overfill_data::manifest::Manifest::load(&resumed).unwrap();
    assert_eq!(a.counts, b.counts);
    assert_eq!(a.counts.raw_rows, 1000);
}

#[test]
fn memory_stays_bounded_on_a_300mb_array() {
    let exe = env!("CARGO_BIN_EXE_preprocess_child");
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok");
    write_tiny_tokenizer(&tok).unwrap();
    let input = tmp.path().join("big.json");
    // Long turns; 97% tagged `de` and dropped by the language filter after parsing, so the
    // test exercises streaming (the whole file passes through the reader and the parser).
    let options = SynthOptions { rows: 300_000, seed: 2, non_english_fraction: 0.97, max_words: 140, ..SynthOptions::default() };
    write_dataset(&input, SynthFormat::OpenHermes, &options).unwrap();
    let size = std::fs::metadata(&input).unwrap().len();
    assert!(size > 250 << 20, "generated only {size} bytes");
    let out = tmp.path().join("out");
    let output = Command::new(exe)
        .args([input.to_str().unwrap(), tok.to_str().unwrap(), out.to_str().unwrap(), "20000", "en"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let peak_kb: u64 = stdout.lines().find_map(|l| l.strip_prefix("peak_rss_kb ")).unwrap().trim().parse().unwrap();
    eprintln!("peak RSS {} MB for a {} MB file", peak_kb / 1024, size >> 20);
    assert!(peak_kb < 400 * 1024, "peak RSS {peak_kb} kB");
}
