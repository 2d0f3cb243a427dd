//! `pixel run`: trains an experiment into `results/<name>/`, or resumes a stopped run.

use crate::cluster::World;
use crate::error::Result;
use crate::experiment::{Override, plan_file};
use crate::run;
use std::path::Path;

/// `pixel run FILE [--set K=V ...]`.
pub fn run(
    experiment: &Path,
    sets: &[Override],
    results: &Path,
    force: bool,
    world: &World,
) -> Result<()> {
    let plan = crate::session::agree(world, plan_file(experiment, sets))?;
    let options = run::Options {
        results_root: results.to_path_buf(),
        force,
    };
    let dir = run::execute(plan, &options, world)?;
    if world.is_root() {
        println!("results in {}", dir.display());
    }
    Ok(())
}

/// `pixel run --resume DIR`.
pub fn resume(dir: &Path, world: &World) -> Result<()> {
    let dir = run::resume(dir, world)?;
    if world.is_root() {
        println!("results in {}", dir.display());
    }
    Ok(())
}
