//! `pixel sample`: a grid from a finished (or interrupted) run's checkpoint.

use crate::error::Result;
use crate::experiment;
use crate::results::SAMPLES_DIR;
use crate::{data, run};
use std::path::{Path, PathBuf};

pub fn sample_results(
    dir: &Path,
    out: Option<PathBuf>,
    temperature: Option<f64>,
    seed: Option<u64>,
) -> Result<()> {
    let mut sets = Vec::new();
    if let Some(t) = temperature {
        sets.push(experiment::parse_set(&format!("sample.temperature={t}"))?);
    }
    if let Some(s) = seed {
        sets.push(experiment::parse_set(&format!("train.seed={s}"))?);
    }
    let crate::eval::LoadedRun {
        plan,
        opened,
        model,
        ..
    } = crate::eval::load_run(dir, &sets, "pixel sample")?;
    let splits = data::load(&plan.data)?;
    let out = out.unwrap_or_else(|| dir.join(SAMPLES_DIR).join("sample.png"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(crate::error::Error::io(parent))?;
    }
    run::write_grid(&plan, &model, &splits.test, 0, &out, &opened.device)?;
    println!("wrote {}", out.display());
    Ok(())
}
