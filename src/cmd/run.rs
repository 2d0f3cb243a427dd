//! `pixel run`: trains an experiment into `results/<name>/`, or resumes a stopped run.

use crate::error::Result;
use crate::experiment::{Override, plan_file};
use crate::run;
use std::path::Path;

/// `pixel run FILE [--set K=V ...]`.
pub fn run(experiment: &Path, sets: &[Override], results: &Path, force: bool) -> Result<()> {
    let plan = plan_file(experiment, sets)?;
    let options = run::Options {
        results_root: results.to_path_buf(),
        force,
    };
    let dir = run::execute(plan, &options)?;
    println!("results in {}", dir.display());
    Ok(())
}

/// `pixel run --resume DIR`.
pub fn resume(dir: &Path) -> Result<()> {
    let dir = run::resume(dir)?;
    println!("results in {}", dir.display());
    Ok(())
}
