//! Placeholder: filled in by the issue that owns this stage.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    bail!("not implemented yet")
}
