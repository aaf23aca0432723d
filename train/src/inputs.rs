//! What a run trains on (the shards by content, the models by path), recorded in every
//! checkpoint's `trainer_state.json` and compared on `--resume`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overfill_data::reader::ShardDataset;
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

/// What a run trains on, recorded in every checkpoint's `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInputs {
    /// The shards by content (`Manifest::content_digest`): equal for a copy or another spelling
    /// of the folder's path, different for other shards.
    pub data_digest: String,
    /// The shard folder, full model and decoder as absolute paths (symbolic links resolved). The
    /// models are compared by these: hashing a full model's weights would cost as long as
    /// loading it.
    pub data: PathBuf,
    pub full: Option<PathBuf>,
    pub decoder: PathBuf,
}

impl RunInputs {
    /// The inputs of this run (its folders exist: `check_paths_exist` passed).
    pub fn of(settings: &Settings, train: &ShardDataset) -> Result<RunInputs> {
        let absolute = |path: &Path| path.canonicalize().with_context(|| format!("resolving {}", path.display()));
        Ok(RunInputs {
            data_digest: train.manifest.content_digest()?,
            data: absolute(&settings.data)?,
            full: settings.full.as_deref().map(absolute).transpose()?,
            decoder: absolute(&settings.decoder)?,
        })
    }

    /// Refuses to continue `checkpoint` (recorded `self`) with `now`, naming what differs.
    pub(crate) fn check_same(&self, now: &RunInputs, checkpoint: &Path) -> Result<()> {
        if self.data_digest != now.data_digest {
            bail!(
                "--resume: {} was trained on the shards of {} (content digest {}); --data {} holds other shards (content digest {}). \
                 Resuming would continue the run on other data; give the run's shards, or choose another --out",
                checkpoint.display(),
                self.data.display(),
                self.data_digest,
                now.data.display(),
                now.data_digest
            );
        }
        let models = [
            ("full model (--full)", self.full.as_deref(), now.full.as_deref()),
            ("decoder (--decoder)", Some(self.decoder.as_path()), Some(now.decoder.as_path())),
        ];
        let show = |path: Option<&Path>| path.map_or("none".to_string(), |p| p.display().to_string());
        for (what, then, now) in models {
            if then != now {
                bail!(
                    "--resume: {} was trained with the {what} {}; this run gives {}. Give the run's model, or choose another --out",
                    checkpoint.display(),
                    show(then),
                    show(now)
                );
            }
        }
        Ok(())
    }
}
