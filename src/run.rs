//! The one function that knows the order of the steps: device, data, results folder, model, then
//! train / evaluate / sample / checkpoint for each epoch; and the same from a checkpoint.

use crate::checkpoint::{self, Position};
use crate::data::{self, Splits};
use crate::device;
use crate::error::{Error, Result};
use crate::experiment::{Plan, Precision};
use crate::model::Model;
use crate::optim;
use crate::results::{self, MetricsRow, RunDir, RunInfo, Status};
use crate::sample;
use crate::train::{self, EpochEnd, PassStats};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Command-line choices that are not part of the experiment.
#[derive(Clone, Debug)]
pub struct Options {
    /// Folder that holds one results folder per experiment.
    pub results_root: PathBuf,
    /// Replace an existing results folder.
    pub force: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks a running training loop to stop after its current step (Ctrl-C, SIGTERM).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Trains the planned experiment into a new results folder. Returns the folder.
pub fn execute(plan: &Plan, options: &Options) -> Result<PathBuf> {
    let dir = options.results_root.join(&plan.name);
    if dir.exists() && !options.force {
        refuse_existing(&dir, plan)?;
    }
    let seed = plan.experiment.train.seed;
    let opened = device::open(&plan.device, seed);
    let splits = data::load(&plan.data)?;
    check_splits(plan, &splits)?;

    let run = RunDir::create(&dir, options.force, &plan.resolved_toml())?;
    let train_device = opened.device.clone().autodiff();
    let model = plan.init_model(&train_device);
    let info = RunInfo {
        name: plan.name.clone(),
        crate_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: env!("BUILD_GIT_REVISION").into(),
        backend: format!("{:?}", plan.device.backend).to_lowercase(),
        device: opened.description.clone(),
        float_dtype: match plan.device.precision {
            Precision::F32 => "f32".into(),
            p => format!("{p:?} compute, f32 weights").to_lowercase(),
        },
        seed,
        parameters: model.parameters(),
        started: results::now(),
        ended: None,
        status: Status::Running,
        epochs_completed: 0,
        error: None,
        overrides: plan.overrides.clone(),
        resumed: Vec::new(),
        hardware: results::hardware(opened.gpu.as_deref()),
    };
    let start = Start {
        model,
        optimizer: optim::adam(),
        position: Position::default(),
    };
    drive(plan, &splits, &train_device, run, info, start)
}

/// Continues the run in `dir` from its newest checkpoint (or from the start if it has none).
pub fn resume(dir: &Path) -> Result<PathBuf> {
    let mut info = results::read_info(dir)?;
    if info.status == Status::Completed {
        return Err(Error::Usage {
            flag: format!("--resume {}", dir.display()),
            message: "this run has already completed; nothing to resume".into(),
        });
    }
    let plan = crate::experiment::plan_file(&dir.join(results::EXPERIMENT_FILE), &[])?;
    let plan = Plan {
        name: info.name.clone(),
        overrides: info.overrides.clone(),
        ..plan
    };
    let seed = plan.experiment.train.seed;
    let opened = device::open(&plan.device, seed);
    let splits = data::load(&plan.data)?;
    check_splits(&plan, &splits)?;

    let train_device = opened.device.clone().autodiff();
    let model = plan.init_model(&train_device);
    let start = match checkpoint::latest(dir)? {
        Some(ckpt) => {
            let (model, optimizer, position) = checkpoint::load(&ckpt, model, optim::adam())?;
            tracing::info!(checkpoint = %ckpt.display(), "resuming");
            Start {
                model,
                optimizer,
                position,
            }
        }
        None => Start {
            model,
            optimizer: optim::adam(),
            position: Position::default(),
        },
    };
    let run = RunDir::reopen(dir, start.position.epochs_done)?;
    info.status = Status::Running;
    info.error = None;
    info.ended = None;
    info.epochs_completed = start.position.epochs_done;
    info.resumed.push(results::now());
    drive(&plan, &splits, &train_device, run, info, start)
}

/// Why an existing results folder is not replaced.
fn refuse_existing(dir: &Path, plan: &Plan) -> Result<()> {
    match results::read_info(dir) {
        Ok(info) if info.status != Status::Completed => Err(Error::Unfinished {
            dir: dir.to_path_buf(),
            status: format!("{:?}", info.status).to_lowercase(),
            epochs_done: info.epochs_completed,
            epochs: plan.experiment.train.epochs,
        }),
        _ => Err(Error::ResultsExist(dir.to_path_buf())),
    }
}

fn check_splits(plan: &Plan, splits: &Splits) -> Result<()> {
    for (name, images) in [("train", &splits.train), ("test", &splits.test)] {
        if images.is_empty() {
            return Err(Error::Invalid {
                source_name: plan.name.clone(),
                key: "data".into(),
                value: format!("{} split of {}", name, plan.data.kind.name()),
                expected: "at least one image".into(),
            });
        }
    }
    Ok(())
}

/// Where training starts: fresh, or from a checkpoint.
struct Start {
    model: Model,
    optimizer: ModuleOptimizer,
    position: Position,
}

/// Runs the epochs and records how the run ended in `run.json`.
fn drive(
    plan: &Plan,
    splits: &Splits,
    device: &Device,
    mut run: RunDir,
    mut info: RunInfo,
    start: Start,
) -> Result<PathBuf> {
    run.write_info(&info)?;
    tracing::info!(
        name = %plan.name,
        device = %info.device,
        parameters = info.parameters,
        train_images = splits.train.len(),
        test_images = splits.test.len(),
        "training in {}",
        run.path.display()
    );
    let outcome = epochs(plan, splits, device, &mut run, &mut info, start);
    info.ended = Some(results::now());
    info.status = match &outcome {
        Ok(()) => Status::Completed,
        Err(Error::Interrupted(_)) => Status::Interrupted,
        Err(_) => Status::Failed,
    };
    if let Err(e) = &outcome {
        info.error = Some(e.to_string());
    }
    run.write_info(&info)?;
    outcome.map(|()| run.path.clone())
}

fn epochs(
    plan: &Plan,
    splits: &Splits,
    device: &Device,
    run: &mut RunDir,
    info: &mut RunInfo,
    start: Start,
) -> Result<()> {
    let t = &plan.experiment.train;
    let keep = t.keep_checkpoints;
    let Start {
        mut model,
        mut optimizer,
        position,
    } = start;
    let mut loss_scale = position.loss_scale.or_else(|| {
        (plan.device.precision == crate::experiment::Precision::F16).then(train::LossScale::default)
    });
    for epoch in position.epochs_done + 1..=t.epochs {
        let order = data::epoch_order(splits.train.len(), t.seed, epoch);
        let (start_step, so_far) = if epoch == position.epochs_done + 1 {
            (position.steps_done, PassStats::from(position.partial))
        } else {
            (0, PassStats::default())
        };
        let bar = progress_bar(epoch, t.epochs, order.len());
        let (next, train_stats, end) = train::train_epoch(
            model,
            &mut optimizer,
            &splits.train,
            &order,
            train::Step::of(plan, epoch),
            device,
            start_step,
            so_far,
            &mut loss_scale,
            &stop_requested,
            |done, bits| {
                bar.set_position(done as u64);
                bar.set_message(format!("{bits:.3} bits/dim"));
            },
        )
        .map_err(|e| {
            let kept = checkpoint::latest(&run.path)
                .ok()
                .flatten()
                .map(|p| format!("; the last good checkpoint is {}", p.display()))
                .unwrap_or_default();
            Error::Run(format!("epoch {epoch}, {e}{kept}"))
        })?;
        bar.finish_and_clear();
        model = next;
        if let EpochEnd::Stopped { steps_done } = end {
            let at = Position {
                epochs_done: epoch - 1,
                steps_done,
                partial: train_stats.into(),
                loss_scale,
            };
            checkpoint::save(&run.path, &model.valid(), &optimizer, &at, keep)?;
            return Err(Error::Interrupted(run.path.clone()));
        }
        let test_stats = train::evaluate(&model, &splits.test, t.eval_batch_size, t.seed, device);
        let row = MetricsRow {
            epoch,
            train_bits_per_dim: train_stats.bits_per_dim(),
            test_bits_per_dim: test_stats.bits_per_dim(),
            train_seconds: train_stats.seconds,
            test_seconds: test_stats.seconds,
            train_images_per_second: train_stats.images_per_second(),
            train_recon_bits_per_dim: train_stats.recon_bits_per_dim(),
            train_kl_bits_per_dim: train_stats.kl_bits_per_dim(),
            test_recon_bits_per_dim: test_stats.recon_bits_per_dim(),
            test_kl_bits_per_dim: test_stats.kl_bits_per_dim(),
            kl_weight: train_stats.kl_weight,
        };
        tracing::info!(
            epoch,
            train_bits_per_dim = format!("{:.4}", row.train_bits_per_dim),
            test_bits_per_dim = format!("{:.4}", row.test_bits_per_dim),
            images_per_second = format!("{:.1}", row.train_images_per_second),
            "epoch done"
        );
        if let Some(warning) = train::collapse_warning(
            row.test_kl_bits_per_dim,
            row.kl_weight,
            plan.experiment.model.vae.free_bits,
        ) {
            tracing::warn!(epoch, "{warning}");
        }
        run.append_metrics(&row)?;
        run.write_curve(&plan.name)?;
        let every = plan.experiment.sample.every;
        if epoch == t.epochs || (every > 0 && epoch % every == 0) {
            write_grid(
                plan,
                &model,
                &splits.test,
                epoch,
                &run.sample_path(epoch),
                device,
            )?;
        }
        let at = Position {
            epochs_done: epoch,
            loss_scale,
            ..Position::default()
        };
        checkpoint::save(&run.path, &model.valid(), &optimizer, &at, keep)?;
        info.epochs_completed = epoch;
        run.write_info(info)?;
        if stop_requested() && epoch < t.epochs {
            return Err(Error::Interrupted(run.path.clone()));
        }
    }
    Ok(())
}

fn progress_bar(epoch: usize, epochs: usize, images: usize) -> ProgressBar {
    let bar = ProgressBar::new(images as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} images, {per_sec}, {eta} left, {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// Loads the weights of the newest checkpoint written at an epoch's end into a freshly built model
/// of the planned shape; returns it with that epoch.
pub fn load_latest_model(plan: &Plan, dir: &Path, device: &Device) -> Result<(Model, usize)> {
    let Some((ckpt, epochs)) = checkpoint::latest_epoch_end(dir)? else {
        return Err(Error::Checkpoint {
            path: dir.join(checkpoint::DIR),
            message: "no checkpoint at an epoch's end: the run has not finished an epoch yet"
                .into(),
        });
    };
    Ok((
        checkpoint::load_model(&ckpt, plan.init_model(device))?,
        epochs,
    ))
}

/// Tiles `grid x grid` images like `test`'s into a PNG at `path` (written whole or not at all).
fn write_cells(cells: &[u8], test: &data::Images, grid: usize, path: &Path) -> Result<()> {
    let (planes, gh, gw) =
        results::png::tile(cells, test.colours, test.height, test.width, grid, grid);
    let tmp = path.with_extension("png.tmp");
    results::png::write_rgb_or_grey(&tmp, &planes, test.colours, gh, gw)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(Error::io(path))
}

/// Samples the grid with a generator seeded by the run's seed and the epoch, and writes it.
pub fn write_grid(
    plan: &Plan,
    model: &Model,
    test: &data::Images,
    epoch: usize,
    path: &Path,
    device: &Device,
) -> Result<()> {
    let s = &plan.experiment.sample;
    let mut rng = StdRng::seed_from_u64(plan.experiment.train.seed.wrapping_add(epoch as u64));
    let started = std::time::Instant::now();
    let (model, device) = (model.valid(), device.clone().without_autodiff());
    let cells = sample::grid(
        &model,
        test,
        s.grid,
        sample::Method::Cached,
        s.temperature,
        &mut rng,
        &device,
    );
    write_cells(&cells, test, s.grid, path)?;
    tracing::info!(
        path = %path.display(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "wrote sample grid"
    );
    // A PixelVAE also shows what it makes of test images: `reconstructions-epoch-N.png`.
    if let Some(cells) = sample::reconstructions(
        &model,
        test,
        s.grid,
        sample::Method::Cached,
        s.temperature,
        &mut rng,
        &device,
    ) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("grid.png");
        let path = path.with_file_name(format!("reconstructions-{name}"));
        write_cells(&cells, test, s.grid, &path)?;
        tracing::info!(path = %path.display(), "wrote reconstructions");
    }
    Ok(())
}
