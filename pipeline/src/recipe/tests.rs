//! Unit tests of the recipe reader: strictness and its messages, origins, the printed form.
use std::path::{Path, PathBuf};

use overfill_data::recipe::RESOLVED_FILE;

use super::*;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn parse(text: &str) -> Result<Recipe> {
    Recipe::parse(text, Path::new("my.toml"))
}

fn error(text: &str) -> String {
    format!("{:#}", parse(text).expect_err("the recipe should be refused"))
}

/// The values of a recipe (what the printed form must preserve), without origins.
fn values(recipe: &Recipe) -> serde_json::Value {
    serde_json::to_value(recipe).unwrap()
}

const BASE: &str = "name = 'x'\n[model]\npath = 'm'\n[data]\nshards = 's'\n[[sources]]\npath = 'a.json'\n[preprocess]\nseed = 1\n[calibrate]\ncalib_size = 8\n[prune]\nwidth_hidden = 0.5\n[train]\nlearning_rate = 1e-4\n";

#[test]
fn every_recipe_in_configs_loads_and_checks() {
    let mut count = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let recipe = Recipe::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            recipe.check().unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(recipe.name.is_some(), "{} has a name", path.display());
            count += 1;
        }
    }
    assert!(count >= 3, "configs/*.toml: {count} recipes");
}

#[test]
fn a_misspelt_key_in_each_table_names_file_line_table_and_the_closest_key() {
    // (text, the misspelt key, the table as printed, the suggestion)
    let cases = [
        ("nmae = 'x'\n", "nmae", "top-level key", "`name`"),
        ("[model]\npaht = 'm'\n", "paht", "[model]", "`path`"),
        ("[data]\nshard = 's'\n", "shard", "[data]", "`shards`"),
        ("[[sources]]\npath = 'a'\n[[sources]]\npath = 'b'\nfractoin = 0.5\n", "fractoin", "[[sources]] #2", "`fraction`"),
        ("[preprocess]\nseed = 1\nmax_seq_lenght = 16\n", "max_seq_lenght", "[preprocess]", "`max_seq_length`"),
        ("[calibrate]\ncalib_sise = 8\n", "calib_sise", "[calibrate]", "`calib_size`"),
        ("[prune]\nwidth_hiden = 0.5\n", "width_hiden", "[prune]", "`width_hidden`"),
        ("[train]\nlearning_rte = 1e-4\n", "learning_rte", "[train]", "`learning_rate`"),
        ("[calibrte]\ncalib_size = 8\n", "calibrte", "unknown table", "[calibrate]"),
    ];
    for (text, key, table, suggestion) in cases {
        let err = error(text);
        assert!(err.starts_with("my.toml:"), "{err}");
        assert!(err.contains(&format!("`{key}`")) || err.contains(&format!("[{key}]")), "{key}: {err}");
        assert!(err.contains(table), "{key}: {err}");
        assert!(err.contains(&format!("did you mean {suggestion}?")), "{key}: {err}");
    }
    // Line and column of the key, and the line itself.
    let err = error("name = 'x'\n\n[preprocess]\nmax_seq_lenght = 16\n");
    assert!(err.starts_with("my.toml:4:1: unknown key `max_seq_lenght` in [preprocess]; did you mean `max_seq_length`?"), "{err}");
    assert!(err.contains("4 | max_seq_lenght = 16"), "{err}");
    // Nothing close: the valid keys are listed instead.
    let err = error("[prune]\nzzz = 1\n");
    assert!(err.contains("unknown key `zzz` in [prune] (valid keys:") && err.contains("`width_hidden`"), "{err}");
}

#[test]
fn a_wrong_type_in_each_table_names_file_line_table_and_key() {
    let cases = [
        ("name = 3\n", "`name`", "invalid type: integer `3`"),
        ("[model]\npath = 3\n", "[model] path", "invalid type: integer `3`"),
        ("[data]\ntemplate = true\n", "[data] template", "invalid type: boolean `true`"),
        ("[[sources]]\npath = 'a'\nfraction = '0.5'\n", "[[sources]] #1 fraction", "invalid type: string \"0.5\", expected a number"),
        ("[preprocess]\nmax_seq_length = '16'\n", "[preprocess] max_seq_length", "invalid type: string \"16\", expected a whole number >= 0"),
        ("[preprocess]\nlanguages = 'en'\n", "[preprocess] languages", "invalid type: string \"en\""),
        ("[calibrate]\ncalib_size = -3\n", "[calibrate] calib_size", "invalid value: integer `-3`"),
        ("[prune]\nwidth_hidden = '0.5'\n", "[prune] width_hidden", "invalid type: string \"0.5\", expected a number"),
        ("[train]\nsave_steps = 1.5\n", "[train] save_steps", "invalid type: floating point `1.5`"),
        ("[train]\nmode = 'overfil'\n", "[train] mode", "did you mean `overfill`?"),
        ("preprocess = 5\n", "`preprocess`", "invalid type: integer `5`"),
        ("[[sources]]\nformat = 'jsonl'\n", "[[sources]] #1", "missing key `path`"),
    ];
    for (text, location, what) in cases {
        let err = error(text);
        assert!(err.starts_with("my.toml:"), "{err}");
        assert!(err.contains(&format!("{location}: ")), "{location}: {err}");
        assert!(err.contains(what), "{what}: {err}");
    }
}

#[test]
fn checks_refuse_values_types_cannot_express() {
    let refused = [
        ("[prune]\nwidth_hidden = 40\n", "to keep 40 channels write hidden_size = 40"),
        ("[prune]\nwidth_intermediate = 1.0\n", "outside [0, 1)"),
        ("[prune]\nwidth_hidden = 0.5\nhidden_size = 40\n", "both width_hidden"),
        ("[preprocess]\nval_size = 3\nval_fraction = 0.1\n", "both val_size and val_fraction"),
        ("[calibrate]\nseq_agg = 'median'\n", "seq_agg"),
        ("[calibrate]\nnorm = 'l3'\n", "norm"),
        ("[calibrate]\ndtype = 'f64'\n", "dtype"),
        ("[train]\ndevice = 'gpu'\n", "device"),
    ];
    for (text, what) in refused {
        let err = format!("{:#}", parse(text).unwrap().check().expect_err(text));
        // The position of the (second) offending key: line 2 or 3, column 1.
        assert!(err.starts_with("my.toml:2:1: ") || err.starts_with("my.toml:3:1: "), "{err}");
        assert!(err.contains(what), "{what}: {err}");
    }
    let mut flagged = parse("[prune]\nwidth_hidden = 0.5\n").unwrap();
    flagged.flag(&["prune.width_hidden"], Some(3.0), |r, v| r.prune.width_hidden = Some(v));
    let err = format!("{:#}", flagged.check().unwrap_err());
    assert!(err.starts_with("command line: [prune] width_hidden = 3"), "{err}");
    parse("[prune]\nwidth_hidden = 0\nintermediate_size = 40\n").unwrap().check().unwrap();
}

#[test]
fn origins_say_default_recipe_or_flag() {
    let mut recipe = parse(BASE).unwrap();
    assert_eq!(recipe.origin("preprocess.seed"), Origin::Recipe);
    assert_eq!(recipe.origin("preprocess.max_seq_length"), Origin::Default);
    assert_eq!(recipe.origin("sources.path"), Origin::Recipe);
    assert_eq!(recipe.origin("train.learning_rate"), Origin::Recipe);
    recipe.flag(&["preprocess.max_seq_length"], Some(512), |r, v| r.preprocess.max_seq_length = v);
    recipe.flag(&["preprocess.rows_per_shard"], None, |r, v| r.preprocess.rows_per_shard = v);
    assert_eq!(recipe.preprocess.max_seq_length, 512);
    assert_eq!(recipe.origin("preprocess.max_seq_length"), Origin::Flag);
    assert_eq!(recipe.origin("preprocess.rows_per_shard"), Origin::Default);

    recipe.set("train.learning_rate=3e-4").unwrap();
    recipe.set("data.shards=work/other").unwrap();
    recipe.set("preprocess.languages=[\"en\", \"de\"]").unwrap();
    assert_eq!(recipe.train.learning_rate, 3e-4);
    assert_eq!(recipe.data.shards.as_deref(), Some("work/other"));
    assert_eq!(recipe.preprocess.languages, ["en", "de"]);
    assert_eq!(recipe.preprocess.max_seq_length, 512, "--set keeps earlier overrides");
    assert_eq!(recipe.origin("train.learning_rate"), Origin::Flag);
    assert_eq!(recipe.origin("preprocess.seed"), Origin::Recipe);
    assert_eq!(recipe.file(), Some(Path::new("my.toml")));

    let err = format!("{:#}", recipe.set("preprocess.max_seq_lenght=16").unwrap_err());
    assert!(err.contains("unknown key `max_seq_lenght` in [preprocess]; did you mean `max_seq_length`?"), "{err}");
    let err = format!("{:#}", recipe.set("train.learning_rate=fast").unwrap_err());
    assert!(err.contains("[train] learning_rate: invalid type: string \"fast\""), "{err}");
    let err = format!("{:#}", recipe.set("trian.seed=1").unwrap_err());
    assert!(err.contains("unknown table [trian]; did you mean [train]?"), "{err}");
    assert!(recipe.set("no-equals-sign").is_err());
}

#[test]
fn the_printed_recipe_reads_back_to_the_same_values() {
    let mut recipes: Vec<Recipe> = vec![Recipe::default(), parse(BASE).unwrap()];
    for name in ["8b-3b.toml", "3b-1b.toml", "tiny.toml"] {
        recipes.push(Recipe::load(&configs_dir().join(name)).unwrap());
    }
    let mut overridden = parse(BASE).unwrap();
    overridden.flag(&["sources"], Some(vec![]), |r, v| r.sources = v);
    overridden.flag(&["prune.width_hidden", "prune.hidden_size"], Some(40), |r, v| (r.prune.width_hidden, r.prune.hidden_size) = (None, Some(v)));
    overridden.set("train.max_steps=7").unwrap();
    overridden.set("data.template=\"a \\\"quoted\\\" name\"").unwrap();
    recipes.push(overridden);
    for recipe in recipes {
        let text = recipe.to_toml().unwrap();
        let back = parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(values(&back), values(&recipe), "{text}");
        assert_eq!(back.to_toml().unwrap().lines().skip(1).filter(|l| !l.contains('#')).collect::<Vec<_>>(),
                   text.lines().skip(1).filter(|l| !l.contains('#')).collect::<Vec<_>>());
    }
}

#[test]
fn the_printed_recipe_marks_each_value() {
    let mut recipe = parse(BASE).unwrap();
    recipe.flag(&["preprocess.max_seq_length"], Some(512), |r, v| r.preprocess.max_seq_length = v);
    let text = recipe.to_toml().unwrap();
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in\n{text}")).to_string();
    assert!(line("seed = 1").ends_with("# recipe"));
    assert!(line("max_seq_length = 512").ends_with("# flag"));
    assert!(line("rows_per_shard = 50000").ends_with("# default"));
    assert!(line("learning_rate = 0.0001").ends_with("# recipe"));
    assert!(line("# max_context_length = (not set)").ends_with("# default"));
    assert!(line("[[sources]]").ends_with("# recipe"));
    assert!(line("name = \"x\"").ends_with("# recipe"));
    // Sections in the order of the stages.
    let order: Vec<usize> = ["[model]", "[data]", "[[sources]]", "[preprocess]", "[calibrate]", "[prune]", "[train]"]
        .iter()
        .map(|h| text.find(&format!("\n{h}")).unwrap_or_else(|| panic!("{h} in\n{text}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
}

#[test]
fn suggestions_pick_close_names_only() {
    let keys: Vec<String> = ["max_seq_length", "seed", "val_size", "val_fraction"].iter().map(|s| s.to_string()).collect();
    assert_eq!(explain::closest("max_seq_lenght", &keys), Some("max_seq_length"));
    assert_eq!(explain::closest("max-seq-length", &keys), Some("max_seq_length"));
    assert_eq!(explain::closest("val_fracton", &keys), Some("val_fraction"));
    assert_eq!(explain::closest("learning_rate", &keys), None);
}

#[test]
fn write_resolved_writes_the_printed_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = parse(BASE).unwrap();
    write_resolved(&recipe, dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join(RESOLVED_FILE)).unwrap();
    assert_eq!(text, recipe.to_toml().unwrap());
    assert!(!dir.path().join(format!("{RESOLVED_FILE}.tmp")).exists());
}
