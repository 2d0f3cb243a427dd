//! pixel-models: an experiment runner for autoregressive image models on Burn.
//!
//! Imports point down a stack of layers, from the commands to the building blocks; the stack is
//! `LAYERS` in `layering.rs`, whose test fails on an import that points up or sideways, and the
//! Layout table of docs/development.md says what each layer owns.

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
pub mod progress;
pub mod results;
pub mod rng;
pub mod run;
pub mod sample;
pub mod session;
pub mod train;

pub use error::{Error, Result};

#[cfg(test)]
mod layering;
