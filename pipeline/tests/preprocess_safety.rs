//! `overfill preprocess` never loses or corrupts data (issue 13): it refuses an `--out` it did not
//! write, never deletes or replaces a file it did not create, locks its output folder against a
//! second run, rejects a truncated JSON array, and leaves nothing a later stage would take for
//! finished output when it fails. Inputs are written by other tools (Python's `json.dump`,
//! pyarrow); every check also asserts that the files that were there before are byte-identical.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::here::overfill;
use common::{paths_under, python, stderr};
use overfill_data::out_lock::OutputLock;

/// Run a Python snippet (`sys.argv[1:]` = `args`); panics with its stderr when it fails.
fn run_python(code: &str, args: &[&Path]) {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} (run `bash scripts/setup.sh`): {e}", python().display()));
    assert!(out.status.success(), "python failed:\n{}", stderr(&out));
}

/// Python that builds OpenHermes rows tagged with `tag`: `rows(tag, n, bad=())` gives `n` rows, those
/// in `bad` malformed (a turn without `value`).
const ROWS_PY: &str = r#"
import json, sys
def rows(tag, n, bad=()):
    out = []
    for i in range(n):
        human = {"from": "human", "value": f"{tag} question {i}: " + "word " * (i % 7)}
        gpt = {"from": "gpt", "value": f"{tag} answer {i}"}
        if i in bad:
            gpt = {"from": "gpt"}
        out.append({"conversations": [human, gpt]})
    return out
"#;

/// An OpenHermes JSON array of `n` rows tagged `tag`, written by `json.dump`.
fn write_openhermes(path: &Path, tag: &str, n: usize) {
    run_python(&format!("{ROWS_PY}\njson.dump(rows({tag:?}, {n}), open(sys.argv[1], 'w'))"), &[path]);
}

/// An Infinity-Instruct style Parquet file written by pyarrow with its defaults.
fn write_infinity_parquet(path: &Path, tag: &str, n: usize) {
    let code = format!(
        "{ROWS_PY}\nimport pyarrow as pa, pyarrow.parquet as pq\nr = rows({tag:?}, {n})\npq.write_table(pa.table({{'conversations': [x['conversations'] for x in r], 'langdetect': ['en'] * {n}}}), sys.argv[1])"
    );
    run_python(&code, &[path]);
}

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    paths_under(dir)
        .into_iter()
        .filter(|path| !path.is_dir())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

/// Every file of `before` still exists with the same bytes.
fn assert_unchanged(before: &BTreeMap<PathBuf, Vec<u8>>) {
    for (path, bytes) in before {
        let now = std::fs::read(path).unwrap_or_else(|e| panic!("{} is gone: {e}", path.display()));
        assert!(&now == bytes, "{} changed", path.display());
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

fn shard_names(dir: &Path) -> Vec<String> {
    names(dir).into_iter().filter(|n| n.ends_with(".parquet")).collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    tok: String,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let tok = root.join("tok").display().to_string();
    let out = overfill(&["synth-data", "--tokenizer-out", &tok]);
    assert!(out.status.success(), "{}", stderr(&out));
    Setup { _tmp: tmp, root, tok }
}

impl Setup {
    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    fn preprocess(&self, input: &str, out: &str, extra: &[&str]) -> Output {
        let args = [&["preprocess", "--input", input, "--tokenizer", &self.tok, "--out", out][..], extra].concat();
        overfill(&args)
    }
}

/// `--out` at a Hugging Face download folder: refused, and every file in it (the inputs named
/// like shards, an unrelated `val-notes.parquet`) is untouched; nothing is added to it.
#[test]
fn out_at_a_download_folder_is_refused_and_nothing_touched() {
    let s = setup();
    let download = s.root.join("download");
    std::fs::create_dir_all(&download).unwrap();
    write_infinity_parquet(&download.join("train-00000-of-00002.parquet"), "a", 30);
    write_infinity_parquet(&download.join("train-00001-of-00002.parquet"), "b", 30);
    write_infinity_parquet(&download.join("val-notes.parquet"), "c", 5);
    let before = snapshot(&s.root);
    let listing = names(&download);
    let glob = download.join("train-*-of-*.parquet").display().to_string();
    let out = s.preprocess(&glob, &download.display().to_string(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("is not empty and was not written by `preprocess`") && err.contains("download"), "{err}");
    assert_unchanged(&before);
    assert_eq!(names(&download), listing, "nothing added to the folder");
    assert_eq!(snapshot(&s.root).len(), before.len(), "no file added anywhere (the lock file is gone)");

    // An input named like one of our shards, with --out at its own folder.
    let own = s.root.join("own");
    std::fs::create_dir_all(&own).unwrap();
    write_infinity_parquet(&own.join("train-00000.parquet"), "d", 20);
    let before = snapshot(&s.root);
    let out = s.preprocess(&own.join("train-00000.parquet").display().to_string(), &own.display().to_string(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not empty and was not written by `preprocess`"), "{}", stderr(&out));
    assert_unchanged(&before);
    assert_eq!(snapshot(&s.root).len(), before.len());
}

/// In a folder of ours, files the user put there survive a rebuild, and a file in the way of a
/// shard name stops the run before anything is deleted.
#[test]
fn foreign_files_in_our_folder_are_never_deleted_or_replaced() {
    let s = setup();
    let input = s.path("in.json");
    write_openhermes(Path::new(&input), "a", 120);
    let out_dir = s.root.join("shards");
    let out = s.path("shards");
    let first = s.preprocess(&input, &out, &["--rows-per-shard", "50", "--val-size", "10"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(shard_names(&out_dir), ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet", "val-00000.parquet"]);

    // Foreign files with our kind of names and others: a rebuild (new seed) leaves them alone.
    write_infinity_parquet(&out_dir.join("val-notes.parquet"), "x", 3);
    std::fs::write(out_dir.join("notes.txt"), "my notes").unwrap();
    let foreign = snapshot(&out_dir).into_iter().filter(|(p, _)| p.ends_with("val-notes.parquet") || p.ends_with("notes.txt")).collect();
    let rebuilt = s.preprocess(&input, &out, &["--rows-per-shard", "50", "--val-size", "10", "--seed", "2"]);
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    assert_unchanged(&foreign);
    assert!(!stderr(&rebuilt).contains("up to date"));

    // A foreign file holding a shard name this run would write: refused before anything changes.
    write_infinity_parquet(&out_dir.join("train-00003.parquet"), "y", 3);
    let before = snapshot(&s.root);
    let refused = s.preprocess(&input, &out, &["--rows-per-shard", "20", "--val-size", "10", "--seed", "3"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = stderr(&refused);
    assert!(err.contains("train-00003.parquet") && err.contains("not created by preprocess"), "{err}");
    assert_unchanged(&before);
    assert_eq!(snapshot(&s.root).len(), before.len(), "nothing added");
}

/// A JSON array cut at a row boundary or inside a row is an error naming the file and the byte
/// offset; no manifest is written.
#[test]
fn truncated_json_array_is_an_error_naming_file_and_offset() {
    let s = setup();
    let whole = s.root.join("whole.json");
    write_openhermes(&whole, "a", 40);
    let bytes = std::fs::read(&whole).unwrap();
    // json.dump writes `[row, row, ...]`: the end of row 24 is where the 25-row array's `]` is.
    let boundary = s.root.join("rows25.json");
    write_openhermes(&boundary, "a", 25);
    let cut_at_row = std::fs::metadata(&boundary).unwrap().len() as usize - 1;
    assert_eq!(&bytes[..cut_at_row], &std::fs::read(&boundary).unwrap()[..cut_at_row]);
    for (name, cut, where_) in [
        ("cut-at-row.json", cut_at_row, "after 25 complete rows".to_string()),
        ("cut-mid-row.json", cut_at_row + 30, format!("inside row 25, which starts at byte offset {}", cut_at_row + 2)),
    ] {
        let input = s.root.join(name);
        std::fs::write(&input, &bytes[..cut]).unwrap();
        let before = snapshot(&s.root);
        let out_dir = s.root.join(format!("out-{name}"));
        let out = s.preprocess(&input.display().to_string(), &out_dir.display().to_string(), &[]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&input.display().to_string()), "{err}");
        assert!(err.contains(&format!("ends at byte offset {cut}, {where_}")) && err.contains("truncated"), "{err}");
        assert!(out.stdout.is_empty());
        assert_unchanged(&before);
        assert!(!out_dir.join("manifest.json").exists());
        assert!(shard_names(&out_dir).is_empty());
        let inspect = overfill(&["inspect", &out_dir.display().to_string()]);
        assert!(!inspect.status.success());
        assert!(stderr(&inspect).contains("unfinished preprocess run"), "{}", stderr(&inspect));
    }
    // The whole file is fine.
    let out = s.preprocess(&whole.display().to_string(), &s.path("out-whole"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Too many malformed rows: exit 1, no shards, a manifest marked failed that `inspect` and
/// `calibrate-prune --data` refuse with the reason; a looser limit then finishes the run.
#[test]
fn failed_run_leaves_nothing_later_stages_take_for_finished() {
    let s = setup();
    let input = s.root.join("bad.json");
    run_python(&format!("{ROWS_PY}\njson.dump(rows('a', 50, bad={{3, 13, 23, 33, 43}}), open(sys.argv[1], 'w'))"), &[&input]);
    let out_dir = s.root.join("shards");
    let out = s.path("shards");
    let before = snapshot(&s.root);
    let failed = s.preprocess(&input.display().to_string(), &out, &["--val-size", "5"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(stderr(&failed).contains("5 of 50 input rows (10.00%) are malformed, above --max-bad-fraction 0.01"), "{}", stderr(&failed));
    assert_unchanged(&before);
    assert!(shard_names(&out_dir).is_empty(), "{:?}", names(&out_dir));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["failed"].as_str().unwrap().contains("malformed"));
    assert_eq!(manifest["counts"]["bad_rows"], 5);
    assert_eq!(manifest["counts"]["bad_samples"][0]["row"], 3);

    let inspect = overfill(&["inspect", &out]);
    assert!(!inspect.status.success());
    assert!(stderr(&inspect).contains("failed preprocess run") && stderr(&inspect).contains("5 of 50"), "{}", stderr(&inspect));

    // calibrate-prune reading the failed folder stops with the reason.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = s.path("full");
    let init = overfill(&["init-model", "--config", &root.join("configs/models/tiny-llama.json").display().to_string(), "--out", &model, "--tokenizer", &s.tok]);
    assert!(init.status.success(), "{}", stderr(&init));
    let prune = overfill(&[
        "calibrate-prune", "--model", &model, "--data", &out, "--out", &s.path("pruned"), "--width-hidden", "0.5", "--width-intermediate", "0.5",
        "--calib-size", "4", "--batch-size", "2", "--device", "cpu",
    ]);
    assert!(!prune.status.success());
    assert!(stderr(&prune).contains("failed preprocess run"), "{}", stderr(&prune));
    assert!(!s.root.join("pruned").exists());

    // A looser limit finishes from the failed run's work and gives a readable folder.
    let finished = s.preprocess(&input.display().to_string(), &out, &["--val-size", "5", "--max-bad-fraction", "0.2"]);
    assert!(finished.status.success(), "{}", stderr(&finished));
    assert!(stderr(&finished).contains("resuming"), "{}", stderr(&finished));
    let inspect = overfill(&["inspect", &out]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("matches the manifest"));
}

/// Small ones: malformed JSONL rows report the malformed count (not the validation size), and an
/// up-to-date rerun removes the work folder an interrupted run of other settings left.
#[test]
fn malformed_jsonl_reports_the_count_and_up_to_date_rerun_cleans_partial() {
    let s = setup();
    let input = s.root.join("bad.jsonl");
    run_python(
        &format!("{ROWS_PY}\nwith open(sys.argv[1], 'w') as f:\n    for r in rows('a', 10, bad=set(range(10))):\n        f.write(json.dumps(r) + '\\n')"),
        &[&input],
    );
    let before = snapshot(&s.root);
    let out = s.preprocess(&input.display().to_string(), &s.path("out-bad"), &["--val-size", "10"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("10 of 10 input rows (100.00%) are malformed"), "{err}");
    assert!(!err.contains("validation size"), "{err}");
    assert_unchanged(&before);

    let good = s.root.join("good.json").display().to_string();
    write_openhermes(Path::new(&good), "a", 300);
    let (out, out_dir) = (s.path("shards"), s.root.join("shards"));
    let args = ["--rows-per-shard", "50", "--val-size", "10"];
    let first = s.preprocess(&good, &out, &args);
    assert!(first.status.success(), "{}", stderr(&first));
    // A run of other settings killed after two work chunks leaves `.partial/` (and no lock); it
    // retired the earlier manifest before starting, so nothing reads the folder meanwhile.
    let killed = Command::new(env!("CARGO_BIN_EXE_overfill"))
        .args(["preprocess", "--input", &good, "--tokenizer", &s.tok, "--out", &out, "--seed", "9"])
        .args(args)
        .env(overfill_data::preprocess::ABORT_ENV, "2")
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), Some(86), "{}", stderr(&killed));
    assert!(!out_dir.join("manifest.json").exists());
    let inspect = overfill(&["inspect", &out]);
    assert!(stderr(&inspect).contains("unfinished preprocess run"), "{}", stderr(&inspect));
    let stale = s.root.join("stale-partial");
    std::fs::rename(out_dir.join(".partial"), &stale).unwrap();
    let rebuilt = s.preprocess(&good, &out, &args);
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    assert!(!out_dir.join(".partial").exists());
    // A run killed between writing its manifest and removing its work folder leaves both, with
    // the work folder in the record of our files: put the killed run's work back that way.
    std::fs::rename(&stale, out_dir.join(".partial")).unwrap();
    let record_path = out_dir.join(overfill_data::owned_files::OWNED_FILE);
    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    record["files"].as_array_mut().unwrap().push(".partial".into());
    std::fs::write(&record_path, record.to_string()).unwrap();
    let up_to_date = s.preprocess(&good, &out, &args);
    assert!(up_to_date.status.success());
    assert!(stderr(&up_to_date).contains("up to date"), "{}", stderr(&up_to_date));
    assert!(!out_dir.join(".partial").exists(), "the up-to-date rerun removes the stale work folder");
}

/// While another process holds the folder's lock, preprocess and calibrate-prune fail at once
/// naming the holder; the folder is not created or touched.
#[test]
fn a_held_lock_makes_a_second_run_fail_naming_the_holder() {
    let s = setup();
    let input = s.root.join("in.json");
    write_openhermes(&input, "a", 20);
    let out_dir = s.root.join("shards");
    let lock = OutputLock::acquire(&out_dir, "preprocess").unwrap();
    let before = snapshot(&s.root);
    let out = s.preprocess(&input.display().to_string(), &s.path("shards"), &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let pid = format!("preprocess (pid {} on host", std::process::id());
    assert!(err.contains("is in use by another run") && err.contains(&pid), "{err}");
    assert!(!out_dir.exists());
    assert_unchanged(&before);
    drop(lock);
    let out = s.preprocess(&input.display().to_string(), &s.path("shards"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // calibrate-prune's output folder takes the same lock.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = s.path("full");
    let init = overfill(&["init-model", "--config", &root.join("configs/models/tiny-llama.json").display().to_string(), "--out", &model, "--tokenizer", &s.tok]);
    assert!(init.status.success(), "{}", stderr(&init));
    let pruned = s.root.join("pruned");
    let lock = OutputLock::acquire(&pruned, "calibrate-prune").unwrap();
    let prune = overfill(&[
        "calibrate-prune", "--model", &model, "--data", &s.path("shards"), "--out", &pruned.display().to_string(), "--width-hidden", "0.5",
        "--width-intermediate", "0.5", "--calib-size", "4", "--batch-size", "2", "--device", "cpu",
    ]);
    assert!(!prune.status.success());
    let err = stderr(&prune);
    assert!(err.contains("is in use by another run") && err.contains(&format!("calibrate-prune (pid {}", std::process::id())), "{err}");
    assert!(!pruned.exists());
    drop(lock);
}

/// Two runs with different inputs started together on one folder, ten times: each either
/// finishes or fails at once naming the other, and the folder holds exactly the rows of the run
/// its manifest names, as a run alone produces them.
#[test]
fn concurrent_runs_never_mix_their_rows() {
    let s = setup();
    let inputs = [s.root.join("a.json"), s.root.join("b.json")];
    write_openhermes(&inputs[0], "a", 1500);
    write_openhermes(&inputs[1], "b", 1000);
    let args = ["--rows-per-shard", "200", "--val-size", "20"];
    // What each input gives when run alone.
    let reference: Vec<BTreeSet<(String, u64, Vec<u32>, Vec<u32>)>> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let out = s.path(&format!("alone-{i}"));
            let run = s.preprocess(&input.display().to_string(), &out, &args);
            assert!(run.status.success(), "{}", stderr(&run));
            shard_rows(Path::new(&out))
        })
        .collect();
    let before = snapshot(&s.root);
    let mut contended = 0;
    for round in 0..10 {
        let out = s.path(&format!("race-{round}"));
        let children: Vec<_> = inputs
            .iter()
            .map(|input| {
                Command::new(env!("CARGO_BIN_EXE_overfill"))
                    .args(["preprocess", "--input", &input.display().to_string(), "--tokenizer", &s.tok, "--out", &out])
                    .args(args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        for (i, output) in outputs.iter().enumerate() {
            if !output.status.success() {
                contended += 1;
                let err = stderr(output);
                let holder = format!("preprocess (pid {} on host", pids[1 - i]);
                assert!(err.contains("is in use by another run") && err.contains(&holder), "round {round}, run {i}: {err}");
            }
        }
        assert!(outputs.iter().any(|o| o.status.success()), "round {round}: both failed");
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(&out).join("manifest.json")).unwrap()).unwrap();
        let named = manifest["inputs"][0]["path"].as_str().unwrap().to_string();
        let survivor = inputs.iter().position(|p| p.display().to_string() == named).unwrap();
        assert!(outputs[survivor].status.success());
        assert_eq!(shard_rows(Path::new(&out)), reference[survivor], "round {round}: the shards differ from input {survivor} run alone");
    }
    eprintln!("{contended} of 10 rounds had a run refused by the lock");
    assert_unchanged(&before);
}

/// Every row of every Parquet file in a shard folder: (source, row_id, context, target).
fn shard_rows(dir: &Path) -> BTreeSet<(String, u64, Vec<u32>, Vec<u32>)> {
    let mut rows = BTreeSet::new();
    let mut count = 0;
    for name in shard_names(dir) {
        for e in overfill_data::shard::read_examples(&dir.join(name)).unwrap() {
            rows.insert((e.source, e.row_id, e.context_ids, e.target_ids));
            count += 1;
        }
    }
    assert_eq!(rows.len(), count, "a row appears twice in {}", dir.display());
    rows
}
