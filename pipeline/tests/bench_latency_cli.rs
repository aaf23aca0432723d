//! `overfill bench-latency`: the CSV has one row per system and point with consistent timings,
//! the figures are written (and redrawn by --replot), and bad settings fail before any work.
//! No timing assertions: only structure and arithmetic.
mod common;

use common::here::overfill;
use common::repo_root;

#[test]
fn tiny_sweep_writes_csv_summary_and_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("bench");
    let config = repo_root().join("configs/models/tiny-llama.json");
    let out = overfill(&[
        "bench-latency",
        "--model-config",
        config.to_str().unwrap(),
        "--hidden-size",
        "64",
        "--intermediate-size",
        "176",
        "--gen-lengths",
        "3,5",
        "--prompt-lengths",
        "4,6",
        "--batch-sizes",
        "1,2",
        "--prompt-len",
        "4",
        "--gen-len",
        "3",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--runs",
        "2",
        "--threads",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(out_dir.join("latency.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    // 3 sweeps x 2 points x 3 systems.
    assert_eq!(rows.len(), 18, "{csv}");
    for (i, sweep) in ["gen", "prompt", "batch"].iter().enumerate() {
        for (j, system) in ["full", "pruned", "overfill"]
            .iter()
            .cycle()
            .take(6)
            .enumerate()
        {
            let r = &rows[i * 6 + j];
            assert_eq!((r[0], r[1]), (*sweep, *system), "{csv}");
        }
    }
    let points: Vec<(&str, &str, &str)> =
        rows.iter().step_by(3).map(|r| (r[2], r[3], r[4])).collect();
    assert_eq!(
        points,
        vec![
            ("2", "4", "3"),
            ("2", "4", "5"),
            ("2", "4", "3"),
            ("2", "6", "3"),
            ("1", "4", "3"),
            ("2", "4", "3")
        ]
    );
    for r in &rows {
        let v = |k: usize| r[k].parse::<f64>().unwrap();
        // total = prefill + decode per run, so the means add up (to the CSV's rounding).
        assert!((v(9) - v(5) - v(7)).abs() < 1e-5, "{r:?}");
        assert!(v(5) > 0.0 && v(7) > 0.0 && v(6) >= 0.0 && v(8) >= 0.0);
        let (batch, gen) = (v(2), v(4));
        assert!(
            (v(11) - batch * (gen - 1.0) / v(7)).abs() <= 0.01 * v(11) + 0.01,
            "{r:?}"
        );
        assert!(v(12) > 0.0);
    }
    // The pruned model's ceiling is the same for pruned and overfill (same decode model).
    assert_eq!(rows[1][12], rows[2][12]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    // tiny-llama (tied, f32): per layer q 128x128, k and v 128x64, o 128x128, MLP 3x128x352,
    // two norms of 128; 4 layers, the 512x128 embedding read once as the LM head, final norm.
    let per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 352 + 2 * 128;
    let full_params = 4 * per_layer + 512 * 128 + 128;
    assert_eq!(
        summary["decode_weight_bytes"]["full"].as_u64().unwrap(),
        4 * full_params as u64
    );
    assert!(
        summary["batch_1"].is_object()
            && summary["models"].as_str().unwrap().contains("pruned D=64")
    );
    let figures = [
        "fig3_latency_vs_generation_length.png",
        "fig4_latency_vs_prompt_length.png",
        "fig5_latency_vs_batch_size.png",
    ];
    for f in figures {
        let png = std::fs::read(out_dir.join(f)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{f}");
        std::fs::remove_file(out_dir.join(f)).unwrap();
    }
    let out = overfill(&["bench-latency", "--replot", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in figures {
        assert!(out_dir.join(f).is_file(), "--replot redraws {f}");
    }
}

#[test]
fn bad_settings_fail_before_any_work() {
    let config = repo_root().join("configs/models/tiny-llama.json");
    let config = config.to_str().unwrap();
    let err = |args: &[&str]| {
        let out = overfill(&[&["bench-latency", "--model-config", config][..], args].concat());
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    if tch::Cuda::device_count() == 0 {
        let e = err(&["--device", "cuda"]);
        assert!(e.contains("0 CUDA device(s) are available"), "{e}");
    }
    let e = err(&["--sweeps", "gen,speed"]);
    assert!(e.contains("unknown sweep \"speed\""), "{e}");
    let e = err(&["--batch-sizes", "1,0"]);
    assert!(e.contains("--batch-sizes must list numbers > 0"), "{e}");
    let e = err(&["--runs", "0"]);
    assert!(e.contains("--runs must be at least 1"), "{e}");
    let e = err(&["--speculative", "2,0"]);
    assert!(e.contains("--speculative must list draft lengths > 0"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let shallow = tmp.path().join("shallow.json");
    let mut tiny: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    tiny["num_hidden_layers"] = 28.into();
    std::fs::write(&shallow, tiny.to_string()).unwrap();
    let e = err(&["--decoder-config", shallow.to_str().unwrap()]);
    assert!(
        e.contains("num_hidden_layers: full model 4, decoder 28"),
        "{e}"
    );
}

/// `--speculative K,..`: a `speculative-kK` system per draft length, its acceptance rate in the
/// CSV's last column and the summary. With the full model as its own drafter every draft is kept
/// (acceptance exactly 1), which is the only value random weights can promise.
#[test]
fn speculative_systems_report_their_acceptance_and_replot() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, full, out_dir) = (tmp.path().join("tok"), tmp.path().join("full"), tmp.path().join("bench"));
    let config = repo_root().join("configs/models/tiny-llama.json");
    for args in [
        vec!["synth-data", "--tokenizer-out", tok.to_str().unwrap()],
        vec!["init-model", "--config", config.to_str().unwrap(), "--out", full.to_str().unwrap(), "--seed", "0", "--tokenizer", tok.to_str().unwrap()],
    ] {
        let out = overfill(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let full = full.to_str().unwrap();
    let out = overfill(&[
        "bench-latency", "--model", full, "--decoder", full, "--speculative", "2,3", "--sweeps", "batch",
        "--batch-sizes", "1,2", "--batch", "2", "--prompt-len", "5", "--gen-len", "9", "--warmup", "0", "--runs", "1",
        "--threads", "1", "--out", out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(out_dir.join("latency.csv")).unwrap();
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().ends_with(",acceptance_rate"), "{csv}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let systems: Vec<&str> = rows.iter().map(|r| r[1]).collect();
    let expected = ["full", "pruned", "overfill", "speculative-k2", "speculative-k3"];
    assert_eq!(systems, [expected, expected].concat(), "{csv}");
    for r in &rows {
        assert_eq!(r.len(), 14, "{csv}");
        match r[1].starts_with("speculative") {
            true => assert_eq!(r[13], "1.0000", "the full model agrees with itself: {csv}"),
            false => assert_eq!(r[13], "", "{csv}"),
        }
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let speculative = summary["speculative"].as_array().unwrap();
    let points: Vec<(u64, u64)> = speculative.iter().map(|s| (s["draft_len"].as_u64().unwrap(), s["batch"].as_u64().unwrap())).collect();
    assert_eq!(points, [(2, 1), (3, 1), (2, 2), (3, 2)], "{summary}");
    assert!(speculative.iter().all(|s| s["acceptance_rate"] == 1.0 && s["decode_seconds_over_full"].as_f64().unwrap() > 0.0));
    std::fs::remove_file(out_dir.join("fig5_latency_vs_batch_size.png")).unwrap();
    let out = overfill(&["bench-latency", "--replot", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out_dir.join("fig5_latency_vs_batch_size.png").is_file());
}
