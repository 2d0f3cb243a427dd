//! pixel-models: an experiment runner for autoregressive image models on Burn.
//!
//! Data flows one way, and imports point the same way (down this list, never up; a test checks):
//!
//! - `cli` parses flags and dispatches to `cmd/`, one file per command.
//! - `run` is the training loop's order of steps; `session` opens a run (plan -> device -> data ->
//!   model -> checkpoint) for every command that needs one.
//! - `results` and `checkpoint` are the files under `results/<name>/`.
//! - `experiment` is the file format and the plan: what the user wrote, checked and mapped onto
//!   the types of the layers below. `error` is the vocabulary of every layer above the core.
//! - `train` and `sample` (the core) run models on data and return plain values.
//! - `model`, `data`, `loss`, `device`, `optim`, `rng` know nothing of the file format, the commands
//!   or the run; `cluster` is the ranks of a data-parallel run (one process without MPI).

pub mod atomic;
pub mod checkpoint;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod data;
pub mod device;
pub mod error;
pub mod experiment;
pub mod loss;
pub mod model;
pub mod optim;
pub mod results;
pub mod rng;
pub mod run;
pub mod sample;
pub mod session;
pub mod train;

pub use error::{Error, Result};

#[cfg(test)]
mod layering;
