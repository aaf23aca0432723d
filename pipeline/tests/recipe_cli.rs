//! The strict recipe through the real commands: a misspelt key or a value of the wrong type in any
//! table stops `preprocess`, `calibrate-prune` and `config` before they write anything, with a
//! message naming the file, line, table, key and the closest valid key; `overfill config` prints
//! the resolved recipe, which reads back to the same values; every stage writes it next to its
//! output; calibrate-prune's own output rules (stale staging folders, --out over the model).
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{overfill, paths_under};

const RECIPE: &str = r#"name = "cli"

[model]
path = "full"

[data]
shards = "shards"
tokenizer = "tok"
template = "llama3"

[[sources]]
name = "synthetic"
path = "raw.json"
format = "openhermes"

[preprocess]
max_seq_length = 256
val_size = 4
seed = 0
rows_per_shard = 100

[calibrate]
calib_size = 8
batch_size = 4
max_seq_len = 32
dtype = "f32"
device = "cpu"

[prune]
width_hidden = 0.5
width_intermediate = 0.25
out = "pruned"

[train]
max_steps = 2
device = "cpu"
dtype = "f32"
"#;

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Every path under `dir` (relative), to show that a refused run wrote nothing.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    paths_under(dir).iter().map(|path| path.strip_prefix(dir).unwrap().to_path_buf()).collect()
}

/// The resolved recipe's values: lines without their origin comment, unset keys and header left out.
fn values(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split("  #").next().unwrap_or(l).trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// A work folder with a tokenizer, raw data and a tiny random model, as the recipe expects.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(overfill(d, &["synth-data", "--tokenizer-out", "tok"]), "synth-data tokenizer");
    ok(overfill(d, &["synth-data", "--format", "openhermes", "--rows", "60", "--seed", "2", "--out", "raw.json"]), "synth-data");
    let model_config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/tiny-llama.json");
    ok(overfill(d, &["init-model", "--config", model_config.to_str().unwrap(), "--out", "full", "--seed", "1", "--tokenizer", "tok"]), "init-model");
    dir
}

#[test]
fn misspelt_keys_and_wrong_types_are_refused_before_any_work() {
    // The same recipe, unchanged, writes shards and a pruned model (the test below); here nothing.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (line to change, its replacement, what the message must say)
    let cases: &[(&str, &str, &[&str])] = &[
        ("name = \"cli\"", "nmae = \"cli\"", &["unknown top-level key `nmae`; did you mean `name`?"]),
        ("name = \"cli\"", "name = 1", &["`name`: invalid type: integer `1`"]),
        ("[calibrate]", "[calibrte]", &["unknown table [calibrte]; did you mean [calibrate]?"]),
        ("path = \"full\"", "paht = \"full\"", &["unknown key `paht` in [model]; did you mean `path`?"]),
        ("path = \"full\"", "path = 3", &["[model] path: invalid type: integer `3`"]),
        ("tokenizer = \"tok\"", "tokeniser = \"tok\"", &["unknown key `tokeniser` in [data]; did you mean `tokenizer`?"]),
        ("tokenizer = \"tok\"", "tokenizer = [\"tok\"]", &["[data] tokenizer: invalid type: sequence"]),
        ("format = \"openhermes\"", "fromat = \"openhermes\"", &["unknown key `fromat` in [[sources]] #1; did you mean `format`?"]),
        ("format = \"openhermes\"", "format = 1", &["[[sources]] #1 format: invalid type: integer `1`"]),
        ("max_seq_length = 256", "max_seq_lenght = 256", &["unknown key `max_seq_lenght` in [preprocess]; did you mean `max_seq_length`?"]),
        ("max_seq_length = 256", "max_seq_length = \"256\"", &["[preprocess] max_seq_length: invalid type: string \"256\""]),
        ("calib_size = 8", "calib_sise = 8", &["unknown key `calib_sise` in [calibrate]; did you mean `calib_size`?"]),
        ("calib_size = 8", "calib_size = \"8\"", &["[calibrate] calib_size: invalid type: string \"8\""]),
        ("width_hidden = 0.5", "width_hiden = 0.5", &["unknown key `width_hiden` in [prune]; did you mean `width_hidden`?"]),
        ("width_hidden = 0.5", "width_hidden = \"0.5\"", &["[prune] width_hidden: invalid type: string \"0.5\""]),
        ("max_steps = 2", "max_step = 2", &["unknown key `max_step` in [train]; did you mean `max_steps`?"]),
        ("max_steps = 2", "max_steps = \"2\"", &["[train] max_steps: invalid type: string \"2\""]),
    ];
    let before = listing(d);
    for (i, (line, replacement, needles)) in cases.iter().enumerate() {
        assert_eq!(RECIPE.matches(line).count(), 1, "{line}");
        let text = RECIPE.replacen(line, replacement, 1);
        let line_no = RECIPE.lines().position(|l| l == *line).unwrap() + 1;
        let file = format!("bad-{i}.toml");
        std::fs::write(d.join(&file), &text).unwrap();
        let mut expected_files = before.clone();
        expected_files.insert(PathBuf::from(&file));
        // The three commands at once (most of their time is loading libtorch).
        let outputs: Vec<(&str, Output)> = std::thread::scope(|scope| {
            let runs: Vec<_> = ["preprocess", "calibrate-prune", "config"]
                .into_iter()
                .map(|command| {
                    let file = &file;
                    scope.spawn(move || (command, overfill(d, &[command, "--config", file])))
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (command, out) in outputs {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command} accepted {replacement:?}");
            assert!(stderr.contains(&format!("{file}:{line_no}:")), "{command}: no file:line in\n{stderr}");
            for needle in needles.iter() {
                assert!(stderr.contains(needle), "{command} {replacement:?}: {needle:?} not in\n{stderr}");
            }
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(out.stdout.is_empty(), "{command} printed {}", String::from_utf8_lossy(&out.stdout));
            assert_eq!(listing(d), expected_files, "{command} wrote something for {replacement:?}");
        }
        std::fs::remove_file(d.join(&file)).unwrap();
    }
}

#[test]
fn config_prints_the_resolved_recipe_which_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(&configs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    recipes.sort();
    assert!(recipes.len() >= 3, "{recipes:?}");
    std::fs::write(d.join("cli.toml"), RECIPE).unwrap();
    recipes.push(d.join("cli.toml"));
    let flags = [
        "--max-seq-length", "512", "--languages", "en,de", "--val-fraction", "0.1", "--hidden-size", "40",
        "--calib-size", "4", "--set", "train.learning_rate=3e-4", "--set", "data.shards=work/elsewhere",
    ];
    // Each recipe, as it is and with flags, printed, read back and printed again (in parallel: most
    // of a run's time is loading libtorch).
    let cases: Vec<(&PathBuf, &[&str])> = recipes.iter().flat_map(|r| [(r, &[][..]), (r, &flags[..])]).collect();
    std::thread::scope(|scope| {
        for (i, (recipe, extra)) in cases.into_iter().enumerate() {
            scope.spawn(move || {
                let path = recipe.to_str().unwrap();
                let first = String::from_utf8(ok(overfill(d, &[&["config", "--config", path], extra].concat()), "config").stdout).unwrap();
                let resolved = format!("resolved-{i}.toml");
                std::fs::write(d.join(&resolved), &first).unwrap();
                let second = String::from_utf8(ok(overfill(d, &["config", "--config", &resolved]), "config of config").stdout).unwrap();
                assert_eq!(values(&second), values(&first), "{path} {extra:?}:\n{first}\n---\n{second}");
                // Read back, every value is the file's.
                assert!(second.lines().filter(|l| !l.starts_with("# ") && l.contains("  # ")).all(|l| l.ends_with("# recipe")), "{second}");
            });
        }
    });
    // --output writes what stdout shows.
    let shown = ok(overfill(d, &[&["config", "--config", "cli.toml"], &flags[..]].concat()), "config").stdout;
    ok(overfill(d, &[&["config", "--config", "cli.toml", "--output", "out.toml"], &flags[..]].concat()), "config --output");
    assert_eq!(std::fs::read(d.join("out.toml")).unwrap(), shown);
    // Origins: a flag, a recipe value, a default, an unset key cleared by a flag.
    let text = String::from_utf8(ok(overfill(d, &[&["config", "--config", "cli.toml"], &flags[..]].concat()), "config").stdout).unwrap();
    let line = |start: &str| text.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{start:?} in\n{text}")).to_string();
    assert!(line("max_seq_length = 512").ends_with("# flag"), "{text}");
    assert!(line("languages = [\"en\", \"de\"]").ends_with("# flag"), "{text}");
    assert!(line("hidden_size = 40").ends_with("# flag"), "{text}");
    assert!(line("# width_hidden = (not set)").ends_with("# flag"), "{text}");
    assert!(line("# val_size = (not set)").ends_with("# flag"), "{text}");
    assert!(line("learning_rate = 0.0003").ends_with("# flag"), "{text}");
    assert!(line("shards = \"work/elsewhere\"").ends_with("# flag"), "{text}");
    assert!(line("rows_per_shard = 100").ends_with("# recipe"), "{text}");
    assert!(line("max_bad_fraction = 0.01").ends_with("# default"), "{text}");
    assert!(line("lr_schedule = \"cosine\"").ends_with("# default"), "{text}");
    // A flag value that breaks a rule is refused too.
    let out = overfill(d, &["config", "--config", "cli.toml", "--width-hidden", "2334"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--hidden-size 2334"));
    let out = overfill(d, &["config", "--config", "cli.toml", "--set", "preprocess.max_seq_lenght=9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean `max_seq_length`?"));
}

#[test]
fn stages_write_the_resolved_recipe_and_calibrate_prune_guards_its_output() {
    let dir = workdir();
    let d = dir.path();
    std::fs::write(d.join("recipe.toml"), RECIPE).unwrap();

    // preprocess writes what `overfill config` prints for the same recipe and flags.
    ok(overfill(d, &["preprocess", "--config", "recipe.toml", "--max-seq-length", "200"]), "preprocess");
    let expected = ok(overfill(d, &["config", "--config", "recipe.toml", "--max-seq-length", "200"]), "config").stdout;
    assert_eq!(std::fs::read(d.join("shards/resolved-recipe.toml")).unwrap(), expected);
    // Rerunning from the output folder alone gives the same shards (up to date).
    let rerun = ok(overfill(d, &["preprocess", "--config", "shards/resolved-recipe.toml"]), "preprocess from resolved");
    assert!(String::from_utf8_lossy(&rerun.stderr).contains("up to date"), "{}", String::from_utf8_lossy(&rerun.stderr));

    // A staging folder of a killed run (its marker: this machine, a process that cannot exist)
    // is removed; one without our marker is left alone.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let stale = d.join(".pruned.tmp-4194400");
    std::fs::create_dir_all(stale.join("pruned")).unwrap();
    let marker = serde_json::json!({"written_by": "calibrate-prune", "pid": 4194400u32, "host": host});
    std::fs::write(stale.join(".overfill-staging.json"), marker.to_string()).unwrap();
    let foreign = d.join(".pruned.tmp-notours");
    std::fs::create_dir_all(&foreign).unwrap();

    ok(overfill(d, &["calibrate-prune", "--config", "recipe.toml", "--hidden-size", "64", "--json"]), "calibrate-prune");
    let resolved = std::fs::read_to_string(d.join("pruned/resolved-recipe.toml")).unwrap();
    assert!(resolved.lines().any(|l| l.starts_with("hidden_size = 64") && l.ends_with("# flag")), "{resolved}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("pruned/config.json")).unwrap()).unwrap();
    assert_eq!(config["hidden_size"], 64);
    assert_eq!(config["intermediate_size"], 264, "int((1 - 0.25) * 352) from the recipe");
    if Path::new("/proc/self").exists() {
        assert!(!stale.exists(), "the stale staging folder is removed");
    }
    assert!(foreign.exists(), "a folder without our marker is left alone");
    let hidden: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pruned.tmp-") && n != ".pruned.tmp-notours")
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    assert!(!d.join("pruned/.overfill-staging.json").exists());

    // The output folder may not be (or hold) the model being read.
    for out in ["pruned", "."] {
        let refused = overfill(d, &["calibrate-prune", "--config", "recipe.toml", "--model", "pruned", "--out", out]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains("would replace the model"), "{stderr}");
    }
    assert!(d.join("pruned/config.json").is_file());
}
