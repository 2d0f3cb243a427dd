//! Argument syntax, help and dispatch. No TOML parsing or tensors here.

use crate::error::{Error, Result};
use crate::experiment::{self, plan_file};
use crate::run;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// Train and sample autoregressive image models (PixelCNN and relatives) from TOML experiments.
#[derive(Parser, Debug)]
#[command(name = "pixel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train an experiment and write results/<experiment name>/, or resume a stopped run.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["experiment", "resume"])))]
    Run {
        /// The experiment file, e.g. experiments/mnist-simple-5x5.toml.
        experiment: Option<PathBuf>,
        /// Continue the run in this results folder from its newest checkpoint.
        #[arg(long, value_name = "RESULTS_DIR", conflicts_with_all = ["experiment", "sets", "force"])]
        resume: Option<PathBuf>,
        /// Override one key for this run, e.g. --set train.epochs=1 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Replace an existing results folder (finished or not).
        #[arg(long)]
        force: bool,
        /// Folder holding the results folders.
        #[arg(long, default_value = "results", value_name = "DIR")]
        results: PathBuf,
    },
    /// Validate experiment files (or folders of them) without training.
    Check {
        /// Files or folders; folders are searched for *.toml recursively.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Draw a sample grid from a trained run's last finished epoch.
    Sample {
        /// A results folder written by `pixel run`.
        results_dir: PathBuf,
        /// Where to write the PNG (default: RESULTS_DIR/samples/sample.png).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Softmax temperature (default: the experiment's).
        #[arg(long)]
        temperature: Option<f64>,
        /// Seed of the sampler (default: the experiment's).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Evaluate a run's last finished epoch on its test split and write RESULTS_DIR/eval.json:
    /// the exact NLL of a PixelCNN, or for a PixelVAE an importance-sampled NLL beside the ELBO.
    Eval {
        /// A results folder written by `pixel run`.
        results_dir: PathBuf,
        /// PixelVAE: latents drawn from q(z|x) per test image.
        #[arg(long, value_name = "K", default_value_t = 100)]
        importance_samples: usize,
        /// Images per forward pass (default: the experiment's train.eval_batch_size).
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
    },
    /// Run a sweep: every combination of a grid of values over a base experiment, into
    /// results/<sweep name>/<run name>/; finished runs are skipped, unfinished ones resumed.
    Sweep {
        /// The sweep file, e.g. experiments/sweeps/mnist-depth.toml.
        file: PathBuf,
        /// Print the expanded runs and stop.
        #[arg(long, conflicts_with_all = ["emit", "only", "summarize"])]
        dry_run: bool,
        /// Write a job-array script for a cluster (results/<sweep>/slurm.sh and runs.txt).
        #[arg(long, value_enum, conflicts_with_all = ["only", "summarize"])]
        emit: Option<Emit>,
        /// Run only the run with this index (what each Slurm array task does).
        #[arg(long, value_name = "N", conflicts_with = "summarize")]
        only: Option<usize>,
        /// Only write summary.csv and summary.md over the runs so far.
        #[arg(long)]
        summarize: bool,
        /// Folder holding the results folders.
        #[arg(long, default_value = "results", value_name = "DIR")]
        results: PathBuf,
    },
    /// Copy the figures of finished runs into figures/ and rewrite the README's results table.
    Figures {
        /// Folder holding the results folders.
        #[arg(long, default_value = "results", value_name = "DIR")]
        results: PathBuf,
        /// The README to rewrite between its results markers.
        #[arg(long, default_value = "README.md", value_name = "FILE")]
        readme: PathBuf,
        /// The tracked folder the figures are copied into (relative to the README's folder).
        #[arg(long, default_value = "figures", value_name = "DIR")]
        figures: PathBuf,
        /// The folder of experiments whose results the README shows.
        #[arg(long, default_value = "experiments", value_name = "DIR")]
        experiments: PathBuf,
    },
    /// Measure training speed, forward latency, sampling time and peak memory of an experiment.
    Bench {
        /// The experiment file; its model, batch size, data and runtime are used.
        experiment: PathBuf,
        /// Timed training steps and forward passes (after two of warm-up each).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Skip timing the sample grid (minutes for full-size images).
        #[arg(long)]
        no_grid: bool,
        /// Also time the grid with the naive sampler (one forward pass per sub-pixel: slow).
        #[arg(long, conflicts_with = "no_grid")]
        naive_grid: bool,
        /// Override one key, e.g. --set runtime.backend=libtorch (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print the JSON Schema of the experiment format.
    Schema,
}

/// Cluster schedulers `pixel sweep --emit` writes scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    Slurm,
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            resume: Some(dir), ..
        } => {
            let dir = run::resume(&dir)?;
            println!("results in {}", dir.display());
            Ok(())
        }
        Command::Run {
            experiment,
            sets,
            force,
            results,
            ..
        } => {
            let experiment = experiment.expect("clap requires an experiment without --resume");
            let sets = sets
                .iter()
                .map(|s| experiment::parse_set(s))
                .collect::<Result<Vec<_>>>()?;
            let plan = plan_file(&experiment, &sets)?;
            let options = run::Options {
                results_root: results,
                force,
            };
            let dir = run::execute(&plan, &options)?;
            println!("results in {}", dir.display());
            Ok(())
        }
        Command::Check { paths } => check(&paths),
        Command::Sample {
            results_dir,
            out,
            temperature,
            seed,
        } => crate::sample_cmd::sample_results(&results_dir, out, temperature, seed),
        Command::Eval {
            results_dir,
            importance_samples,
            batch_size,
        } => {
            let r = crate::eval::eval_results(&results_dir, importance_samples, batch_size)?;
            match (r.test_elbo_bits_per_dim, r.importance_samples) {
                (Some(elbo), Some(k)) => println!(
                    "test NLL {:.4} bits/dim (importance sampled, K = {k}), ELBO {:.4} bits/dim, \
                     {} of {} latent dimensions active, {} images, after epoch {}, {:.1} s",
                    r.test_bits_per_dim,
                    elbo,
                    r.active_latent_dimensions.unwrap_or(0),
                    r.latent_dimensions.unwrap_or(0),
                    r.images,
                    r.epochs,
                    r.seconds
                ),
                _ => println!(
                    "test NLL {:.4} bits/dim (exact), {} images, after epoch {}, {:.1} s",
                    r.test_bits_per_dim, r.images, r.epochs, r.seconds
                ),
            }
            println!(
                "wrote {}",
                results_dir.join(crate::eval::EVAL_FILE).display()
            );
            Ok(())
        }
        Command::Sweep {
            file,
            dry_run,
            emit,
            only,
            summarize,
            results,
        } => {
            use crate::sweep_cmd::Action;
            let action = if dry_run {
                Action::DryRun
            } else if emit.is_some() {
                Action::EmitSlurm
            } else if summarize {
                Action::Summarize
            } else {
                Action::Run { only }
            };
            crate::sweep_cmd::sweep(&file, &results, action)
        }
        Command::Figures {
            results,
            readme,
            figures,
            experiments,
        } => crate::figures::regenerate(&results, &readme, &figures, &experiments),
        Command::Bench {
            experiment,
            steps,
            no_grid,
            naive_grid,
            sets,
        } => {
            let sets = sets
                .iter()
                .map(|s| experiment::parse_set(s))
                .collect::<Result<Vec<_>>>()?;
            let plan = plan_file(&experiment, &sets)?;
            let report = crate::bench::run(&plan, steps.max(1), !no_grid, naive_grid)?;
            println!(
                "| experiment | device | precision | batch | s/step | train images/s | forward ms | grid s | naive grid s | peak MiB |\n\
                 |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n{}",
                report.markdown_row()
            );
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serialises")
            );
            Ok(())
        }
        Command::Schema => {
            print!("{}", experiment::schema_json());
            Ok(())
        }
    }
}

fn check(paths: &[PathBuf]) -> Result<()> {
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
        if std::fs::read_to_string(f).is_ok_and(|t| crate::sweep::is_sweep(&t)) {
            match crate::sweep::load(f) {
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
            Err(Error::Data(missing @ crate::data::DataError::Missing { .. })) => {
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
