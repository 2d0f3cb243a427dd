//! `pixel sample`: a grid from a finished (or interrupted) run's checkpoint.

use crate::error::{Error, Result};
use crate::experiment::{self, Plan};
use crate::results::{EXPERIMENT_FILE, SAMPLES_DIR};
use crate::{data, device, run};
use std::path::{Path, PathBuf};

pub fn sample_results(
    dir: &Path,
    out: Option<PathBuf>,
    temperature: Option<f64>,
    seed: Option<u64>,
) -> Result<()> {
    let exp_path = dir.join(EXPERIMENT_FILE);
    if !exp_path.is_file() {
        return Err(Error::Usage {
            flag: format!("pixel sample {}", dir.display()),
            message: format!("expected a results folder holding {EXPERIMENT_FILE}"),
        });
    }
    let mut sets = Vec::new();
    if let Some(t) = temperature {
        sets.push(experiment::parse_set(&format!("sample.temperature={t}"))?);
    }
    if let Some(s) = seed {
        sets.push(experiment::parse_set(&format!("train.seed={s}"))?);
    }
    let (exp, overrides) = experiment::load(&exp_path, &sets)?;
    let plan = Plan::new(exp, overrides, &exp_path, None)?;
    let opened = device::open(&plan.device, plan.experiment.train.seed);
    let model = run::load_latest_model(&plan, dir, &opened.device)?;
    let splits = data::load(&plan.data)?;
    let out = out.unwrap_or_else(|| dir.join(SAMPLES_DIR).join("sample.png"));
    run::write_grid(&plan, &model, &splits.test, 0, &out, &opened.device)?;
    println!("wrote {}", out.display());
    Ok(())
}
