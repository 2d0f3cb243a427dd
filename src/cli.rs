//! Argument syntax, help and dispatch. No TOML parsing or tensors here.

use crate::cluster::{self, World};
use crate::cmd;
use crate::error::{Error, Result};
use crate::experiment;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Train and sample autoregressive image models (PixelCNN and relatives) from TOML experiments.
#[derive(Parser, Debug)]
#[command(name = "pixel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where stderr is not a terminal (a Slurm log, a pipe): log a long pass's progress (images
    /// done, rate, bits/dim) every this many seconds; 0 turns the lines off. On a terminal a bar
    /// shows it instead.
    #[arg(
        long,
        global = true,
        default_value_t = 60.0,
        value_name = "SECONDS",
        allow_negative_numbers = true
    )]
    pub log_every: f64,
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
        /// Where to write: the grid's PNG (default: RESULTS_DIR/samples/sample.png), or with
        /// --count the folder of images (default: RESULTS_DIR/samples/draws/).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Softmax temperature (default: the experiment's).
        #[arg(long, allow_negative_numbers = true)]
        temperature: Option<f64>,
        /// Seed of the sampler (default: the experiment's).
        #[arg(long)]
        seed: Option<u64>,
        /// Draw N single images from scratch instead of a grid: OUT/sample-00000.png ...
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        count: Option<usize>,
        /// With --count, for a class-conditional model: the class of every image (default: image i
        /// gets class i mod 10).
        #[arg(long, value_name = "K", requires = "count")]
        class: Option<u8>,
        /// With --count: also write OUT/samples.npy, shape [N, colours, height, width], uint8.
        #[arg(long, requires = "count")]
        npy: bool,
        /// With --count: images sampled at once.
        #[arg(long, value_name = "N", default_value_t = 64, requires = "count")]
        batch_size: usize,
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
        /// Instead of the NLL: which earlier pixels the trained model's likelihood of a few
        /// pixels depends on (gradients), as RESULTS_DIR/receptive-field.png and .json.
        #[arg(long, conflicts_with_all = ["importance_samples", "batch_size"])]
        receptive_field: bool,
        /// With --receptive-field: the first N test images, over which gradients are averaged.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 16,
            requires = "receptive_field"
        )]
        images: usize,
    },
    /// Write a run's weights (its last finished epoch) as safetensors for PyTorch: the
    /// parameters under the names of the twins in bench/ (`bench/pixel_twins.py` loads them) and
    /// the model and the resolved experiment as metadata; the average too where the run keeps one.
    Export {
        /// A results folder written by `pixel run`.
        results_dir: PathBuf,
        /// The weights file (default RESULTS_DIR/model.safetensors); the average goes beside it
        /// as <name>-ema.safetensors.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Also write the first N test images (or `all`) beside it, with their labels and pixel's
        /// log-likelihood of each sub-pixel (the mixture: of each pixel) in nats, as .npy.
        #[arg(long, value_name = "N|all")]
        test_images: Option<crate::cmd::export::TestImages>,
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
        /// With --emit: MPI ranks (Slurm tasks) that train each run together (default: the
        /// sweep file's `slurm.ranks`, else 1).
        #[arg(long, value_name = "R", requires = "emit")]
        ranks: Option<usize>,
        /// With --emit: GPUs for each rank (Slurm's --gpus-per-task; default: the sweep file's
        /// `slurm.gpus_per_rank`, else none).
        #[arg(long, value_name = "G", requires = "emit")]
        gpus_per_rank: Option<usize>,
        /// With --emit: one more `#SBATCH --KEY=VALUE` line for every task, e.g. --sbatch
        /// time=04:00:00 --sbatch mem=16G --sbatch partition=gpu --sbatch account=lab
        /// (repeatable; replaces the sweep file's `slurm.sbatch` value of the same key).
        #[arg(long, value_name = "KEY=VALUE", requires = "emit")]
        sbatch: Vec<String>,
        /// Folder holding the results folders.
        #[arg(long, default_value = "results", value_name = "DIR")]
        results: PathBuf,
    },
    /// Copy the figures of finished runs into docs/figures/ and rewrite the README's results table
    /// and the gallery of docs/results.md.
    Figures {
        /// Folder holding the results folders.
        #[arg(long, default_value = "results", value_name = "DIR")]
        results: PathBuf,
        /// The file whose results table is rewritten between its markers.
        #[arg(long, default_value = "README.md", value_name = "FILE")]
        readme: PathBuf,
        /// The file whose gallery of figures is rewritten between its markers.
        #[arg(long, default_value = "docs/results.md", value_name = "FILE")]
        gallery: PathBuf,
        /// The tracked folder the figures and the runs' records are copied into.
        #[arg(long, default_value = "docs/figures", value_name = "DIR")]
        figures: PathBuf,
        /// The folder of experiments whose results are shown.
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
        /// Wait for the device at each phase boundary of a training step, so that the phases it
        /// prints are the GPU's time, not the time to queue its work (as the twins' --sync).
        #[arg(long)]
        sync: bool,
        /// After the timed steps, record 3 more with libtorch's profiler (host operators; GPU
        /// kernels and copies on CUDA) and write its Chrome trace to this file (libtorch only;
        /// `bench/profile_summary.py` compares it with a twin's).
        #[arg(long, value_name = "TRACE.json")]
        profile: Option<PathBuf>,
        /// Override one key, e.g. --set runtime.backend=libtorch (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print the JSON Schema of the experiment format.
    Schema {
        /// Instead: the reference of the experiment and sweep files as Markdown (docs/reference.md).
        #[arg(long)]
        reference: bool,
    },
}

/// Cluster schedulers `pixel sweep --emit` writes scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    Slurm,
}

/// Runs the command. Each lives in `cmd/`; this only maps flags onto its arguments.
///
/// `pixel run`, `pixel sweep` and `pixel bench` join the ranks of an MPI job when a launcher
/// started several; the other commands run in one process and refuse a launcher of several. In a
/// job of several ranks the errors are handled here: each rank prints its own (prefixed with its
/// rank) and exits with its code once every rank has; an error that only some ranks saw before
/// they could agree on it ends the whole job (MPI_Abort) instead of leaving the others waiting.
pub fn dispatch(cli: Cli) -> Result<()> {
    let parallel = matches!(
        cli.command,
        Command::Run { .. } | Command::Sweep { .. } | Command::Bench { .. }
    );
    let world = match cluster::launch() {
        Some(launch) if launch.size > 1 && !parallel => {
            return Err(Error::Usage {
                flag: launch.launcher.into(),
                message: format!(
                    "started as rank {} of {}: only `pixel run`, `pixel sweep` and `pixel bench` \
                     train on several ranks; start this command as a single process",
                    launch.rank, launch.size
                ),
            });
        }
        _ => World::join().map_err(|message| Error::Usage {
            flag: cluster::launch().map_or("launcher", |l| l.launcher).into(),
            message,
        })?,
    };
    if !(cli.log_every.is_finite() && cli.log_every >= 0.0) {
        return Err(Error::Usage {
            flag: format!("--log-every {}", cli.log_every),
            message: "expected a number of seconds, 0 or more (0: no progress lines)".into(),
        });
    }
    crate::progress::configure(
        world.is_root(),
        std::time::Duration::from_secs_f64(cli.log_every),
    );
    let outcome = route(cli, &world);
    match outcome {
        Err(e) if world.size() > 1 => {
            let code = e.exit_code();
            if world.is_root() || !matches!(e, Error::Peer { .. }) {
                let prefix = match world.rank() {
                    0 => String::new(),
                    r => format!("rank {r}: "),
                };
                crate::error::report(&e, &prefix);
            }
            let agreed =
                world.failure_agreed() || matches!(e, Error::Interrupted(_) | Error::Peer { .. });
            if !agreed {
                world.abort(code);
            }
            // Finalises MPI (built with `mpi`) before the exit, which skips destructors.
            #[allow(clippy::drop_non_drop)]
            drop(world);
            std::process::exit(code)
        }
        outcome => outcome,
    }
}

fn route(cli: Cli, world: &World) -> Result<()> {
    match cli.command {
        Command::Run {
            resume: Some(dir), ..
        } => cmd::run::resume(&dir, world),
        Command::Run {
            experiment,
            sets,
            force,
            results,
            ..
        } => {
            let experiment = experiment.expect("clap requires an experiment without --resume");
            cmd::run::run(&experiment, &parse_sets(&sets)?, &results, force, world)
        }
        Command::Check { paths } => cmd::check::check(&paths),
        Command::Sample {
            results_dir,
            out,
            temperature,
            seed,
            count,
            class,
            npy,
            batch_size,
        } => {
            let draws = count.map(|count| cmd::sample::Draws {
                count,
                class,
                npy,
                batch_size,
            });
            cmd::sample::sample_results(&results_dir, out, temperature, seed, draws)
        }
        Command::Eval {
            results_dir,
            importance_samples,
            batch_size,
            receptive_field,
            images,
        } => match receptive_field {
            true => cmd::eval::print_receptive_field(&results_dir, images),
            false => cmd::eval::eval(&results_dir, importance_samples, batch_size),
        },
        Command::Export {
            results_dir,
            out,
            test_images,
        } => cmd::export::export(&results_dir, out, test_images),
        Command::Sweep {
            file,
            dry_run,
            emit,
            only,
            summarize,
            results,
            ranks,
            gpus_per_rank,
            sbatch,
        } => {
            use cmd::sweep::Action;
            let action = if dry_run {
                Action::DryRun
            } else if emit.is_some() {
                Action::EmitSlurm(crate::experiment::sweep::SlurmFlags {
                    ranks,
                    gpus_per_rank,
                    sbatch,
                })
            } else if summarize {
                Action::Summarize
            } else {
                Action::Run { only }
            };
            cmd::sweep::sweep(&file, &results, action, world)
        }
        Command::Figures {
            results,
            readme,
            gallery,
            figures,
            experiments,
        } => cmd::figures::regenerate(&cmd::figures::Places {
            results: &results,
            table: &readme,
            gallery: &gallery,
            figures: &figures,
            experiments: &experiments,
        }),
        Command::Bench {
            experiment,
            steps,
            no_grid,
            naive_grid,
            sync,
            profile,
            sets,
        } => cmd::bench::bench(
            &experiment,
            &parse_sets(&sets)?,
            &cmd::bench::Options {
                steps,
                grid: !no_grid,
                naive_grid,
                sync,
                profile,
            },
            world,
        ),
        Command::Schema { reference } => {
            match reference {
                true => print!("{}", experiment::reference::markdown()),
                false => print!("{}", experiment::schema_json()),
            }
            Ok(())
        }
    }
}

fn parse_sets(sets: &[String]) -> Result<Vec<experiment::Override>> {
    sets.iter().map(|s| experiment::parse_set(s)).collect()
}
