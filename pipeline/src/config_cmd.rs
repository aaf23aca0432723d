//! `overfill config`: print the fully resolved recipe — built-in defaults, the recipe file's values
//! and command-line overrides, each marked `# default`, `# recipe` or `# flag` — as TOML that
//! `--config` reads back to the same values. Every stage writes the same text next to its output
//! (`resolved-recipe.toml`).
//!
//! Overrides: `--set TABLE.KEY=VALUE` for any key of any table (e.g. `--set train.learning_rate=1e-4`),
//! and the recipe flags of `preprocess` and `calibrate-prune` under their own names (each flag's
//! help names the key it sets). The output-folder flag `--out` is each stage's own: use
//! `--set data.shards=DIR` or `--set prune.out=DIR` here.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::recipe::RecipeArgs;
use crate::{calibrate_prune, preprocess};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Write the resolved recipe to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten, next_help_heading = "preprocess overrides")]
    preprocess: preprocess::Flags,
    #[command(flatten, next_help_heading = "calibrate-prune overrides")]
    calibrate_prune: calibrate_prune::Flags,
}

pub fn run(args: Args) -> Result<()> {
    let mut recipe = args.recipe.load()?;
    args.preprocess.apply(&mut recipe);
    args.calibrate_prune.apply(&mut recipe);
    recipe.check()?;
    let text = recipe.to_toml()?;
    match &args.output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}
