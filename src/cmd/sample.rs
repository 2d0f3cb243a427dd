//! `pixel sample`: a grid from a finished (or interrupted) run's checkpoint.

use crate::error::{Error, Result};
use crate::experiment;
use crate::results::SAMPLES_DIR;
use crate::run;
use crate::session::{self, Session, Weights};
use std::path::{Path, PathBuf};

/// Writes a grid sampled from the run in `dir` to `out` (default `dir/samples/sample.png`), with
/// the experiment's temperature and seed unless given.
pub fn sample_results(
    dir: &Path,
    out: Option<PathBuf>,
    temperature: Option<f64>,
    seed: Option<u64>,
) -> Result<()> {
    // Each flag is named as the source of its value in the plan's errors.
    let flag = |key: &str, value: String, origin: &str| experiment::Override {
        key: key.into(),
        value,
        origin: origin.into(),
    };
    let mut sets = Vec::new();
    if let Some(t) = temperature {
        sets.push(flag(
            "sample.temperature",
            toml::Value::Float(t).to_string(),
            "--temperature",
        ));
    }
    if let Some(s) = seed {
        sets.push(flag("train.seed", s.to_string(), "--seed"));
    }
    let plan = session::recorded_plan(dir, &sets, "pixel sample")?;
    let session = Session::open(plan, Weights::Trained(dir))?;
    let out = out.unwrap_or_else(|| dir.join(SAMPLES_DIR).join("sample.png"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    let Session {
        plan,
        splits,
        state,
        device,
        ..
    } = &session;
    run::write_grid(plan, &state.model, &splits.test, 0, &out, &device.device)?;
    println!("wrote {}", out.display());
    Ok(())
}
