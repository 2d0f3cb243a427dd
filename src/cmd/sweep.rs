//! `pixel sweep`: run, plan or summarise the runs of a sweep.

use crate::cluster::World;
use crate::error::{Error, Result};
use crate::experiment::{Plan, sweep};
use crate::results::plot;
use crate::results::summary::{self, RunSummary};
use crate::results::{self, Status};
use crate::run;
use crate::session;
use std::path::Path;

/// What `pixel sweep` was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run every run (or one, with `only`), then write the summary.
    Run { only: Option<usize> },
    /// Print the expanded plan.
    DryRun,
    /// Write a Slurm job-array script and the list of runs; each array task trains its run on
    /// `ranks` MPI ranks with `gpus_per_rank` GPUs each.
    EmitSlurm(sweep::SlurmFlags),
    /// Only write the summary of the runs so far.
    Summarize,
}

pub fn sweep(file: &Path, results_root: &Path, action: Action, world: &World) -> Result<()> {
    let (sweep, plans) = session::agree(world, sweep::load(file))?;
    let root = results_root.join(&sweep.name);
    if !world.is_root() && !matches!(action, Action::Run { .. }) {
        return Ok(()); // rank 0 plans, emits and summarises
    }
    match action {
        Action::DryRun => {
            println!(
                "{} runs of {} into {}/",
                sweep.runs.len(),
                sweep.base.display(),
                root.display()
            );
            print!("{}", sweep::run_list(&sweep));
            Ok(())
        }
        Action::EmitSlurm(flags) => {
            let slurm = sweep.slurm(&flags)?;
            std::fs::create_dir_all(&root).map_err(Error::io(&root))?;
            let script = root.join("slurm.sh");
            results::write_atomic(&root.join("runs.txt"), sweep::run_list(&sweep).as_bytes())?;
            results::write_atomic(
                &script,
                sweep::slurm_script(&sweep, results_root, &slurm, &pixel_binary()?).as_bytes(),
            )?;
            println!(
                "wrote {} ({} array tasks) and runs.txt",
                script.display(),
                sweep.runs.len()
            );
            Ok(())
        }
        Action::Summarize => summarize(&sweep, &root),
        Action::Run { only } => {
            let selected: Vec<&Plan> = match only {
                None => plans.iter().collect(),
                Some(n) if n < plans.len() => vec![&plans[n]],
                Some(n) => {
                    return Err(Error::Usage {
                        flag: format!("--only {n}"),
                        message: format!(
                            "expected a run index from 0 to {} (see --dry-run)",
                            plans.len() - 1
                        ),
                    });
                }
            };
            for plan in selected {
                run_one(plan, &root, world)?;
            }
            if only.is_none() && world.is_root() {
                summarize(&sweep, &root)?;
            }
            Ok(())
        }
    }
}

/// Runs one run of the sweep: skipped when finished, resumed when unfinished. Rank 0 looks at
/// the folder and tells the other ranks what it found.
fn run_one(plan: &Plan, root: &Path, world: &World) -> Result<()> {
    const FRESH: i32 = 0;
    const REPLACE: i32 = 1;
    const RESUME: i32 = 2;
    const SKIP: i32 = 3;
    let dir = root.join(&plan.name);
    let found = match results::read_info(&dir) {
        _ if !dir.exists() => FRESH,
        Ok(info) if info.status == Status::Completed => SKIP,
        Ok(_) => RESUME,
        Err(_) => REPLACE,
    };
    match world.broadcast_i32(found) {
        SKIP => {
            tracing::info!(run = %plan.name, "already completed; skipped");
            Ok(())
        }
        RESUME => {
            tracing::info!(run = %plan.name, "unfinished; resuming");
            run::resume(&dir, world).map(|_| ())
        }
        decision => {
            let options = run::Options {
                results_root: root.to_path_buf(),
                force: decision == REPLACE,
            };
            run::execute(plan.clone(), &options, world).map(|_| ())
        }
    }
}

/// Writes `summary.csv` and `summary.md` over the runs that finished an epoch.
fn summarize(sweep: &sweep::Sweep, root: &Path) -> Result<()> {
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    for r in &sweep.runs {
        let dir = root.join(&r.name);
        let row = results::read_info(&dir).ok().and_then(|info| {
            let metrics = results::read_metrics(&dir).ok()?;
            RunSummary::new(&r.name, &info, &metrics)
        });
        match row {
            Some(row) => rows.push(row),
            None => missing.push(r.name.clone()),
        }
    }
    std::fs::create_dir_all(root).map_err(Error::io(root))?;
    results::write_atomic(&root.join("summary.csv"), summary::to_csv(&rows).as_bytes())?;
    let curves: Vec<plot::Curve> = sweep
        .runs
        .iter()
        .filter_map(|r| {
            let rows = results::read_metrics(&root.join(&r.name)).ok()?;
            Some(plot::Curve {
                label: r.name.clone(),
                points: rows
                    .iter()
                    .map(|m| (m.epoch as f64, m.test_bits_per_dim))
                    .collect(),
                dashed: false,
            })
        })
        .collect();
    let curve_path = root.join("test-curves.png");
    plot::curves_png(
        &format!("{}: test bits per dimension", sweep.name),
        &curves,
        &curve_path,
    )
    .map_err(Error::io(&curve_path))?;
    let md = summary::to_markdown(&rows, &missing);
    results::write_atomic(&root.join("summary.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
}

/// This `pixel` binary, which an emitted Slurm script runs unless `$PIXEL` names another.
fn pixel_binary() -> Result<std::path::PathBuf> {
    std::env::current_exe().map_err(|e| Error::Io {
        path: "the running pixel binary".into(),
        error: e,
    })
}
