//! `overfill train`: OverFill decoder training (and the Pruned / SFT baselines) — see issue 8.
pub mod config;
pub mod events;
pub mod memory;

pub use config::{LrSchedule, TrainMode, TrainSection};
