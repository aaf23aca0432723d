//! Inputs as the real world writes them: Infinity-Instruct-style Parquet from pyarrow with every
//! codec (Snappy is its default) and the 7M release's extra columns, several codecs under one
//! glob (also resumed after a kill), and OpenHermes JSON from `json.dump` with and without
//! `ensure_ascii`. Shards are compared token for token with transformers' `apply_chat_template`
//! (tests/python/write_real_files.py writes the files and the reference, cached per version).
mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use overfill_data::conversation::Role;
use overfill_data::preprocess::{run_preprocess, ABORT_ENV};
use overfill_data::reader::{ShardDataset, Split};
use overfill_data::synth::{synth_row, write_tiny_tokenizer, SynthOptions};
use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::{json, Value};

/// Rows of the files under `mix/`, in order (the rest go to a last file); with row groups of 3,
/// the resume point after two 10-row shards (row 20) falls inside a row group of the third file.
const GLOB_PARTS: [usize; 5] = [5, 11, 9, 7, 13];
/// The pyarrow-written files and the codec each one must carry.
const CODEC_FILES: [(&str, &str); 6] = [
    ("infinity-snappy.parquet", "SNAPPY"),
    ("infinity-gzip.parquet", "GZIP"),
    ("infinity-brotli.parquet", "BROTLI"),
    ("infinity-lz4.parquet", "LZ4_RAW"),
    ("infinity-zstd.parquet", "ZSTD"),
    ("infinity-none.parquet", "UNCOMPRESSED"),
];

/// Conversations as `(from, value)` turns: synthetic ones plus hand-written text that JSON
/// escaping and byte-level tokenizers get wrong first.
fn rows() -> Vec<(Vec<(&'static str, String)>, &'static str)> {
    let from = |role: Role| match role {
        Role::System => "system",
        Role::User => "human",
        Role::Assistant => "gpt",
    };
    let options = SynthOptions { max_words: 25, ..SynthOptions::default() };
    let mut rows: Vec<_> = (0..40)
        .map(|i| {
            let row = synth_row(17, i, &options);
            (row.turns.into_iter().map(|(r, c)| (from(r), c)).collect(), "en")
        })
        .collect();
    let pair = |q: &str, a: &str| vec![("human", q.to_string()), ("gpt", a.to_string())];
    rows.push((pair("用中文回答：天空为什么是蓝色的？", "因为瑞利散射。🌤️ 短波长的光散射得更多。"), "zh"));
    rows.push((pair("Emoji: 👩‍👩‍👧 🇯🇵 🧑🏽‍💻", "Family, flag, technologist: 👍🏿 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 (astral plane)."), "en"));
    rows.push((pair("Literal escapes: \\u00e9 \\ud83d\\ude00 \\n \"quoted\" \\\\", "They stay text: \\u0041 is not A.\t\u{7f}"), "en"));
    rows.push((pair("مرحبا، كيف حالك؟", "أنا بخير، شكرا! — עברית too."), "ar"));
    rows.push((pair("Combining: e\u{301} vs é, ﬁ ligature, Å vs Å", "Zero width\u{200b}space and NBSP\u{a0}end"), "en"));
    rows.push((
        vec![
            ("system", "You are a helpful assistant. Réponds en français.".into()),
            ("human", "Bonjour ! Ça va ?".into()),
            ("gpt", "Oui, très bien.".into()),
            ("human", "Et la météo ?".into()),
            ("gpt", "\n\nIl fait beau — 25 °C ☀️\n".into()),
        ],
        "fr",
    ));
    rows.push((pair("Code?", "```rust\nfn main() { println!(\"{}\", \"\\u{1F600}\"); }\n```"), "en"));
    rows.push((pair("Привет", "Здравствуйте! Ёж и ещё."), "ru"));
    rows
}

struct Fixture {
    tokenizer: PathBuf,
    files: PathBuf,
    rows: usize,
    /// Per row: (context ids, target ids) from transformers.
    reference: Vec<(Vec<u32>, Vec<u32>)>,
}

/// FNV-1a: a stable content hash without extra dependencies.
fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// The files and reference, made once per version of the inputs and scripts into a cache
/// folder beside the test executables (`<target>/release/real-files-cache/<hash>`). `None` (with
/// a printed reason) when the project's Python is missing.
fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture).as_ref()
}

fn build_fixture() -> Option<Fixture> {
    if !common::python().is_file() {
        eprintln!("SKIP: {} is absent (run scripts/setup.sh)", common::python().display());
        return None;
    }
    let exe = std::env::current_exe().expect("test executable path");
    let cache = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").join("real-files-cache");
    std::fs::create_dir_all(&cache).expect("cache folder");
    // The real Llama 3.2 tokenizer where present, else the tiny one (written into the cache).
    let tokenizer = match common::llama_fixture() {
        Some(dir) => dir,
        None => {
            eprintln!("real_files: using the tiny tokenizer instead");
            let dir = cache.join("tiny-tokenizer");
            if !dir.join("tokenizer.json").is_file() {
                let tmp = tempfile::Builder::new().prefix(".tok").tempdir_in(&cache).expect("temp dir");
                write_tiny_tokenizer(tmp.path()).expect("tiny tokenizer");
                let tmp = tmp.keep();
                if std::fs::rename(&tmp, &dir).is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
            dir
        }
    };
    let rows = rows();
    let request = json!({
        "tokenizer": tokenizer,
        "rows": rows.iter().map(|(turns, lang)| json!({
            "conversations": turns.iter().map(|(f, v)| json!({"from": f, "value": v})).collect::<Vec<_>>(),
            "langdetect": lang,
        })).collect::<Vec<_>>(),
        "glob_parts": GLOB_PARTS,
    })
    .to_string();
    let script = common::repo_root().join("tests/python/write_real_files.py");
    let mut hash = 0xcbf29ce484222325u64;
    for part in [
        std::fs::read(&script).expect("write_real_files.py"),
        std::fs::read(common::repo_root().join("tests/python/preprocess_ref.py")).expect("preprocess_ref.py"),
        std::fs::read(tokenizer.join("tokenizer.json")).expect("tokenizer.json"),
        request.clone().into_bytes(),
    ] {
        hash = fnv(hash, &part);
    }
    let files = cache.join(format!("{hash:016x}"));
    if !files.join("done").is_file() {
        let tmp = tempfile::Builder::new().prefix(".building").tempdir_in(&cache).expect("temp dir");
        let request_path = tmp.path().join("request.json");
        std::fs::write(&request_path, &request).expect("request");
        let out = Command::new(common::python()).arg(&script).arg(&request_path).arg(tmp.path()).output().expect("run python");
        assert!(out.status.success(), "write_real_files.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(tmp.path().join("done"), "").expect("marker");
        let tmp = tmp.keep();
        if std::fs::rename(&tmp, &files).is_err() {
            let _ = std::fs::remove_dir_all(&tmp); // another test binary finished first
        }
    }
    let refs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(files.join("reference.json")).expect("reference.json")).expect("reference json");
    assert_eq!(refs.len(), rows.len());
    let reference = refs
        .iter()
        .map(|r| {
            let ids = |k: &str| -> Vec<u32> { r[k].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect() };
            let (full, context) = (ids("full_ids"), ids("context_ids"));
            assert_eq!(full[..context.len()], context[..], "the reference context must prefix the full ids");
            let target = full[context.len()..].to_vec();
            (context, target)
        })
        .collect();
    Some(Fixture { tokenizer, files, rows: rows.len(), reference })
}

/// Every row of a shard folder (train and validation), by row id.
fn shard_rows(out: &Path) -> BTreeMap<u64, (Vec<u32>, Vec<u32>)> {
    let mut all = BTreeMap::new();
    for split in [Split::Train, Split::Val] {
        let data = ShardDataset::open_split(out, split).unwrap_or_else(|e| panic!("{}: {e:#}", out.display()));
        for i in 0..data.len() {
            let e = data.get(i).expect("example");
            assert!(all.insert(e.row_id, (e.context_ids, e.target_ids)).is_none(), "row {} twice", e.row_id);
        }
    }
    all
}

/// The shards hold every input row, each with exactly transformers' context and target ids.
fn assert_matches_reference(fx: &Fixture, out: &Path, what: &str) {
    let got = shard_rows(out);
    assert_eq!(got.len(), fx.rows, "{what}: rows kept");
    for (row_id, (context, target)) in &got {
        let (want_context, want_target) = &fx.reference[*row_id as usize];
        assert_eq!(context, want_context, "{what}: row {row_id}: context ids differ from transformers");
        assert_eq!(target, want_target, "{what}: row {row_id}: target ids differ from transformers");
    }
}

fn api_preprocess(fx: &Fixture, input: &Path, out: &Path) -> overfill_data::manifest::Manifest {
    let config = common::config(&[input], &fx.tokenizer, out);
    run_preprocess(&config).unwrap_or_else(|e| panic!("{}: {e:#}", input.display())).manifest
}

/// The `overfill` binary of this build, when it has been built (a workspace `cargo test` builds
/// it; it belongs to the pipeline package, so this package cannot ask Cargo for it).
fn overfill_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("overfill");
    if bin.is_file() {
        Some(bin)
    } else {
        eprintln!("real_files: {} is not built (`cargo build --release -p overfill`); running the stage through the library instead", bin.display());
        None
    }
}

fn cli_preprocess(bin: &Path, fx: &Fixture, input: &str, format: &str, out: &Path) -> Output {
    Command::new(bin)
        .args(["preprocess", "--input", input, "--format", format, "--template", "llama3", "--val-size", "0"])
        .arg("--tokenizer")
        .arg(&fx.tokenizer)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run overfill")
}

/// `overfill preprocess --input INPUT --format FORMAT` where the binary is built (else the same
/// stage through the library), then the shards against the reference.
fn preprocess_matches_reference(fx: &Fixture, input: &Path, format: &str, out: &Path) {
    let what = format!("preprocess --input {} --format {format}", input.display());
    match overfill_binary() {
        Some(bin) => {
            let output = cli_preprocess(&bin, fx, &input.display().to_string(), format, out);
            assert!(output.status.success(), "overfill {what}: {}", String::from_utf8_lossy(&output.stderr));
            let summary: Value = serde_json::from_slice(&output.stdout).expect("summary json");
            assert_eq!(summary["raw_rows"], fx.rows as u64, "{what}");
        }
        None => {
            api_preprocess(fx, input, out);
        }
    }
    let manifest = overfill_data::manifest::Manifest::load(out).expect("manifest");
    assert_eq!((manifest.counts.raw_rows, manifest.counts.bad_rows), (fx.rows as u64, 0), "{what}");
    assert_matches_reference(fx, out, &what);
}

/// The codecs of a file's column chunks, without levels (`ZSTD(ZstdLevel(1))` → `ZSTD`).
fn codec_of(path: &Path) -> Vec<String> {
    let reader = SerializedFileReader::new(File::open(path).expect("open")).expect("parquet footer");
    let mut codecs: Vec<String> = reader
        .metadata()
        .row_groups()
        .iter()
        .flat_map(|g| g.columns().iter().map(|c| c.compression().to_string().split('(').next().unwrap_or_default().to_string()))
        .collect();
    codecs.sort();
    codecs.dedup();
    codecs
}

#[test]
fn every_codec_pyarrow_writes_matches_transformers() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (name, codec) in CODEC_FILES {
        let input = fx.files.join(name);
        // The file really carries the codec, in several row groups, with the 7M release's columns.
        assert_eq!(codec_of(&input), vec![codec.to_string()], "{name}");
        let reader = SerializedFileReader::new(File::open(&input).unwrap()).unwrap();
        assert!(reader.metadata().num_row_groups() >= 5, "{name}: row groups");
        let columns: Vec<String> = reader.metadata().file_metadata().schema_descr().root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
        assert_eq!(columns, ["id", "conversations", "label", "langdetect", "source", "reward"], "{name}");

        preprocess_matches_reference(fx, &input, "infinity", &tmp.path().join(name));
    }
}

/// pyarrow cannot write the legacy Hadoop-framed LZ4 codec (its `lz4` is LZ4_RAW); Spark and old
/// parquet-mr files use it. The `parquet` crate's writer does, so the pyarrow Snappy file is
/// re-encoded with it, batch by batch.
#[test]
fn legacy_hadoop_lz4_matches_transformers() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("infinity-lz4-hadoop.parquet");
    let source = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(File::open(fx.files.join("infinity-snappy.parquet")).unwrap()).unwrap();
    let schema = source.schema().clone();
    let props = parquet::file::properties::WriterProperties::builder().set_compression(Compression::LZ4).set_max_row_group_row_count(Some(7)).build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(File::create(&input).unwrap(), schema, Some(props)).unwrap();
    for batch in source.build().unwrap() {
        writer.write(&batch.unwrap()).unwrap();
    }
    writer.close().unwrap();
    assert_eq!(codec_of(&input), vec!["LZ4".to_string()]);
    let out = tmp.path().join("out");
    api_preprocess(fx, &input, &out);
    assert_matches_reference(fx, &out, "legacy LZ4");
}

#[test]
fn glob_of_mixed_codecs_is_one_input_and_resumes() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let glob = fx.files.join("mix/part-*.parquet");
    let mut parts: Vec<PathBuf> = std::fs::read_dir(fx.files.join("mix")).unwrap().map(|e| e.unwrap().path()).collect();
    parts.sort();
    let codecs: std::collections::BTreeSet<String> = parts.iter().flat_map(|p| codec_of(p)).collect();
    assert_eq!(codecs.len(), 6, "the glob mixes every codec: {codecs:?}");

    preprocess_matches_reference(fx, &glob, "infinity", &tmp.path().join("glob"));

    // Killed after two 10-row shards (row 20 lies inside a row group of the third file), then
    // resumed: identical to an uninterrupted run, and both equal to the reference.
    let child = env!("CARGO_BIN_EXE_preprocess_child");
    let run = |out: &Path, abort: Option<usize>| {
        let mut cmd = Command::new(child);
        cmd.arg(&glob).arg(&fx.tokenizer).arg(out).arg("10");
        if let Some(n) = abort {
            cmd.env(ABORT_ENV, n.to_string());
        }
        cmd.output().unwrap()
    };
    let whole = tmp.path().join("whole");
    let done = run(&whole, None);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let resumed = tmp.path().join("resumed");
    let killed = run(&resumed, Some(2));
    assert_eq!(killed.status.code(), Some(86), "{}", String::from_utf8_lossy(&killed.stderr));
    let again = run(&resumed, None);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming after 2"), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(shard_rows(&whole), shard_rows(&resumed));
    for split in [Split::Train, Split::Val] {
        let ids = |dir: &Path| {
            let d = ShardDataset::open_split(dir, split).unwrap();
            (0..d.len()).map(|i| d.row_id(i)).collect::<Vec<_>>()
        };
        assert_eq!(ids(&whole), ids(&resumed), "{split:?}: same rows in the same order");
    }
    assert_matches_reference(fx, &resumed, "resumed glob");
}

#[test]
fn missing_or_mistyped_conversations_column_fails_before_any_work() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let missing = fx.files.join("no-conversations.parquet");
    let wrong = fx.files.join("conversations-wrong-type.parquet");

    let out = tmp.path().join("out");
    let err = format!("{:#}", run_preprocess(&common::config(&[&missing], &fx.tokenizer, &out)).unwrap_err());
    assert!(err.contains(&missing.display().to_string()) && err.contains("`conversations`") && err.contains("missing"), "{err}");
    assert!(err.contains("id, label, langdetect, source, reward"), "lists the columns found: {err}");
    assert!(!out.exists(), "no work before failing");

    let err = format!("{:#}", run_preprocess(&common::config(&[&wrong], &fx.tokenizer, &out)).unwrap_err());
    assert!(err.contains(&wrong.display().to_string()) && err.contains("`conversations`"), "{err}");
    assert!(err.contains("has type List(") && err.contains("Utf8"), "names the type found: {err}");
    assert!(err.contains("expected a list of struct<from: string, value: string>") && err.contains("not structs"), "{err}");
    assert!(!out.exists(), "no work before failing");

    // One bad file among good ones: nothing is read or written either.
    let good = fx.files.join("infinity-snappy.parquet");
    let err = format!("{:#}", run_preprocess(&common::config(&[&good, &missing], &fx.tokenizer, &out)).unwrap_err());
    assert!(err.contains("no-conversations.parquet"), "{err}");
    assert!(!out.exists(), "no work before failing");

    if let Some(bin) = overfill_binary() {
        let output = cli_preprocess(&bin, fx, &missing.display().to_string(), "infinity", &out);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains("no-conversations.parquet") && stderr.contains("`conversations`"), "{stderr}");
        assert!(!out.exists(), "no work before failing");
    }
}

#[test]
fn openhermes_json_dump_with_and_without_ensure_ascii_matches_transformers() {
    let Some(fx) = fixture() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let utf8 = fx.files.join("openhermes-utf8.json");
    let ascii = fx.files.join("openhermes-ascii.json");
    // The files really are what the test claims: raw UTF-8 with indentation, and pure ASCII
    // with \uXXXX escapes and surrogate pairs for characters beyond the BMP.
    let utf8_text = std::fs::read_to_string(&utf8).unwrap();
    assert!(utf8_text.contains("天空") && utf8_text.contains("\n  {\n    \"custom_instruction\": null"), "indent=2, raw UTF-8");
    let ascii_text = std::fs::read_to_string(&ascii).unwrap();
    assert!(ascii_text.is_ascii());
    assert!(ascii_text.contains("\\u5929\\u7a7a") && ascii_text.contains("\\ud83d\\udc69"), "escapes and surrogate pairs");
    assert!(ascii_text.contains("\\\\u00e9"), "literal backslash-u text stays escaped");

    for input in [&utf8, &ascii] {
        preprocess_matches_reference(fx, input, "openhermes", &tmp.path().join(input.file_name().unwrap()));
    }
}
