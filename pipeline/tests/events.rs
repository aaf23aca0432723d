//! TensorBoard event files written by `overfill` (train::events, through the hidden
//! `debug-write-events` command) read back by TensorBoard's own `EventAccumulator`
//! (tests/python/read_events.py); `overfill plot-curves` plots what TensorBoard reads.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{python, repo_root};
use serde_json::Value;

/// What one `debug-write-events` run wrote: (tag, step) -> value, and the text tags.
struct Written {
    scalars: BTreeMap<(String, u64), f64>,
    texts: Vec<(String, u64, String)>,
}

fn write_events(dir: &Path, steps: u64, resume_step: Option<u64>) -> Written {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overfill"));
    cmd.args(["debug-write-events", "--out"]).arg(dir);
    cmd.args(["--steps", &steps.to_string()]);
    if let Some(step) = resume_step {
        cmd.args(["--resume-step", &step.to_string()]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "debug-write-events failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let scalars = report["scalars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let key = (row[0].as_str().unwrap().to_string(), row[1].as_u64().unwrap());
            (key, row[2].as_f64().unwrap())
        })
        .collect();
    let texts = report["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let tag = row[0].as_str().unwrap().to_string();
            (tag, row[1].as_u64().unwrap(), row[2].as_str().unwrap().to_string())
        })
        .collect();
    Written { scalars, texts }
}

/// TensorBoard's view of the folder: tag -> [(step, value)] in its order, and the text tags.
struct Read {
    scalars: BTreeMap<String, Vec<(u64, f64)>>,
    texts: BTreeMap<String, Vec<(u64, String)>>,
}

fn read_events(dir: &Path) -> Read {
    let out = Command::new(python())
        .arg(repo_root().join("tests/python/read_events.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "read_events.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = |v: &Value| -> Vec<(u64, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].clone()))
            .collect()
    };
    let scalars = json["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, v)| {
            let steps = points(v).into_iter().map(|(s, x)| (s, x.as_f64().unwrap()));
            (tag.clone(), steps.collect())
        })
        .collect();
    let texts = json["texts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, v)| {
            let steps = points(v)
                .into_iter()
                .map(|(s, x)| (s, x.as_str().unwrap().to_string()));
            (tag.clone(), steps.collect())
        })
        .collect();
    Read { scalars, texts }
}

const TRAINING_TAGS: [&str; 8] = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_sec",
    "train/skipped_steps",
    "eval/loss",
    "memory/rss_mib",
    "memory/peak_rss_mib",
];

/// Every tag has exactly the steps `1..=last`, once each and in order, with the f32 of `expected`.
fn assert_scalars(read: &Read, expected: &BTreeMap<(String, u64), f64>, last: u64) {
    let tags: Vec<&str> = read.scalars.keys().map(String::as_str).collect();
    let mut want_tags = TRAINING_TAGS.to_vec();
    want_tags.sort();
    assert_eq!(tags, want_tags);
    for (tag, points) in &read.scalars {
        let steps: Vec<u64> = points.iter().map(|&(s, _)| s).collect();
        assert_eq!(steps, (1..=last).collect::<Vec<_>>(), "{tag}");
        for &(step, value) in points {
            let want = expected[&(tag.clone(), step)] as f32;
            assert_eq!(value as f32, want, "{tag} at step {step}");
        }
    }
}

#[test]
fn tensorboard_reads_every_scalar_and_the_text() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let written = write_events(&run, 12, None);
    assert_eq!(written.scalars.len(), 12 * TRAINING_TAGS.len());
    let rss = written.scalars[&("memory/rss_mib".to_string(), 12)];
    assert!(rss > 1.0, "the resident set of the writer is {rss} MiB");

    let read = read_events(&run);
    assert_scalars(&read, &written.scalars, 12);
    let (tag, step, markdown) = &written.texts[0];
    assert_eq!(read.texts[tag], vec![(*step, markdown.clone())]);
}

#[test]
fn resumed_run_replaces_the_steps_after_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first = write_events(&run, 20, None);
    // The interrupted run logged 1..20; its checkpoint was step 14, so the resumed run logs 15..30.
    let second = write_events(&run, 30, Some(15));
    let event_files = std::fs::read_dir(&run).unwrap().count();
    assert_eq!(event_files, 2, "each writer opens its own file");

    let mut expected = first.scalars.clone();
    for ((tag, step), value) in &second.scalars {
        let old = expected.insert((tag.clone(), *step), *value);
        // The made-up values differ between the runs, so a stale point would be caught (the
        // measured memory may happen to repeat).
        if let (Some(old), false) = (old, tag.starts_with("memory/")) {
            assert_ne!(old as f32, *value as f32, "{tag} at step {step}");
        }
    }
    let read = read_events(&run);
    assert_scalars(&read, &expected, 30);
    // The recipe text of the first run (step 0) survives the purge, once.
    assert_eq!(read.texts.len(), 1);
    assert!(read.texts.values().all(|points| points.len() == 1));
}

/// `plot-curves` reads the points TensorBoard shows: after a resume, the resumed run's values.
#[test]
fn plot_curves_reads_what_tensorboard_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, resumed) = (tmp.path().join("plain"), tmp.path().join("resumed"));
    write_events(&plain, 12, None);
    write_events(&resumed, 20, None);
    write_events(&resumed, 30, Some(15));
    let png = tmp.path().join("curves.png");
    let out = Command::new(env!("CARGO_BIN_EXE_overfill"))
        .args(["plot-curves", "--tag", "eval/loss", "--json", "--out"])
        .arg(&png)
        .arg(format!("overfill-s0={}", plain.display()))
        .arg(format!("pruned-s0={}", resumed.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "plot-curves failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let plotted: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, dir) in [("overfill-s0", &plain), ("pruned-s0", &resumed)] {
        let want: Vec<(u64, f32)> = read_events(dir).scalars["eval/loss"].iter().map(|&(s, v)| (s, v as f32)).collect();
        let got: Vec<(u64, f32)> = plotted["runs"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(got, want, "{name}");
    }
    // A PNG of the default size.
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 960, "width");
}
