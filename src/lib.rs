//! pixel-models: an experiment runner for autoregressive image models on Burn.
//!
//! Data flows one way: `experiment` (file -> [`experiment::Experiment`] -> [`experiment::Plan`])
//! -> `run` (device, data, model, train, sample) -> `results`.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod figures;
pub mod loss;
pub mod model;
pub mod optim;
pub mod results;
pub mod run;
pub mod sample;
pub mod sample_cmd;
pub mod sweep;
pub mod sweep_cmd;
pub mod train;

pub use error::{Error, Result};
