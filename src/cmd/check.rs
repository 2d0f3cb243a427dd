//! `pixel check`: validates experiment and sweep files (or folders of them) without training.

use crate::data::DataError;
use crate::error::{Error, Result};
use crate::experiment::{plan_file, sweep};
use std::path::{Path, PathBuf};

/// Plans every experiment and expands every sweep under `paths`, reporting each; fails when any is
/// invalid or two experiments would write the same results folder.
pub fn check(paths: &[PathBuf]) -> Result<()> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            collect_toml(p, &mut files).map_err(Error::io(p))?;
        } else {
            files.push(p.clone());
        }
    }
    files.sort();
    let mut failures = Vec::new();
    let mut names: std::collections::BTreeMap<String, PathBuf> = Default::default();
    for f in &files {
        if std::fs::read_to_string(f).is_ok_and(|t| sweep::is_sweep(&t)) {
            match sweep::load(f) {
                Ok((sweep, _)) => {
                    println!("ok    {} (sweep of {} runs)", f.display(), sweep.runs.len())
                }
                Err(e) => failures.push(e.to_string()),
            }
            continue;
        }
        match plan_file(f, &[]) {
            Ok(plan) => {
                if let Some(first) = names.insert(plan.name.clone(), f.clone()) {
                    failures.push(format!(
                        "{}: results folder name `{}` is already used by {}",
                        f.display(),
                        plan.name,
                        first.display()
                    ));
                } else {
                    println!("ok    {}", f.display());
                }
            }
            // Data that only the user can provide (an image folder) may live elsewhere than
            // where the experiment is checked: valid, with a note.
            Err(Error::Data(missing @ DataError::Missing { .. })) => {
                println!("ok    {} (note: {missing})", f.display());
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    for f in &failures {
        eprintln!("error: {f}");
    }
    Err(Error::Usage {
        flag: "pixel check".into(),
        message: format!(
            "{} of {} experiment files are invalid",
            failures.len(),
            files.len()
        ),
    })
}

fn collect_toml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_toml(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    Ok(())
}
