//! `overfill train`: OverFill decoder training (and the Pruned / SFT baselines) — see issue 8.
pub mod config;

pub use config::{LrSchedule, TrainMode, TrainSection};
