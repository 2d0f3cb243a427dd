//! The one function that knows the order of the steps: device, data, results folder, model, then
//! train / evaluate / sample / checkpoint for each epoch.

use crate::data::{self, Splits};
use crate::device;
use crate::error::{Error, Result};
use crate::experiment::Plan;
use crate::model::Model;
use crate::optim;
use crate::results::{self, MetricsRow, RunDir, RunInfo, Status};
use crate::{sample, train};
use burn::module::Module;
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::path::{Path, PathBuf};

/// Command-line choices that are not part of the experiment.
#[derive(Clone, Debug)]
pub struct Options {
    /// Folder that holds one results folder per experiment.
    pub results_root: PathBuf,
    /// Replace an existing results folder.
    pub force: bool,
}

/// Trains the planned experiment and writes its results folder. Returns the folder.
pub fn execute(plan: &Plan, options: &Options) -> Result<PathBuf> {
    let seed = plan.experiment.train.seed;
    let opened = device::open(&plan.device, seed);
    let splits = data::load(&plan.data)?;
    check_splits(plan, &splits)?;

    let dir = options.results_root.join(&plan.name);
    let mut run = RunDir::create(&dir, options.force, &plan.resolved_toml())?;
    let train_device = opened.device.clone().autodiff();
    let model = plan.model.init(seed, &train_device);
    let mut info = RunInfo {
        name: plan.name.clone(),
        crate_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: env!("BUILD_GIT_REVISION").into(),
        backend: format!("{:?}", plan.device.backend).to_lowercase(),
        device: opened.description.clone(),
        float_dtype: format!("{:?}", plan.device.precision).to_lowercase(),
        seed,
        parameters: model.parameters(),
        started: results::now(),
        ended: None,
        status: Status::Running,
        epochs_completed: 0,
        error: None,
        overrides: plan.overrides.clone(),
    };
    run.write_info(&info)?;
    tracing::info!(
        name = %plan.name,
        device = %opened.description,
        parameters = info.parameters,
        train_images = splits.train.len(),
        test_images = splits.test.len(),
        "starting run in {}",
        dir.display()
    );

    let outcome = epochs(plan, model, &splits, &train_device, &mut run, &mut info);
    info.ended = Some(results::now());
    match &outcome {
        Ok(()) => info.status = Status::Completed,
        Err(e) => {
            info.status = Status::Failed;
            info.error = Some(e.to_string());
        }
    }
    run.write_info(&info)?;
    outcome.map(|()| dir)
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

fn epochs(
    plan: &Plan,
    mut model: Model,
    splits: &Splits,
    device: &Device,
    run: &mut RunDir,
    info: &mut RunInfo,
) -> Result<()> {
    let t = &plan.experiment.train;
    let mut optimizer = optim::adam();
    for epoch in 1..=t.epochs {
        let order = data::epoch_order(splits.train.len(), t.seed, epoch);
        let bar = progress_bar(epoch, t.epochs, order.len());
        let (next, train_stats) = train::train_epoch(
            model,
            &mut optimizer,
            &splits.train,
            &order,
            train::Step {
                batch_size: t.batch_size,
                learning_rate: t.learning_rate,
            },
            device,
            |done, bits| {
                bar.set_position(done as u64);
                bar.set_message(format!("{bits:.3} bits/dim"));
            },
        )
        .map_err(|e| Error::Run(format!("epoch {epoch}: {e}")))?;
        bar.finish_and_clear();
        model = next;
        let test_stats = train::evaluate(&model, &splits.test, t.eval_batch_size, device);
        let row = MetricsRow {
            epoch,
            train_bits_per_dim: train_stats.bits_per_dim(),
            test_bits_per_dim: test_stats.bits_per_dim(),
            train_seconds: train_stats.seconds,
            test_seconds: test_stats.seconds,
            train_images_per_second: train_stats.images_per_second(),
        };
        tracing::info!(
            epoch,
            train_bits_per_dim = format!("{:.4}", row.train_bits_per_dim),
            test_bits_per_dim = format!("{:.4}", row.test_bits_per_dim),
            images_per_second = format!("{:.1}", row.train_images_per_second),
            "epoch done"
        );
        run.append_metrics(&row)?;
        save_checkpoint(&model, &run.checkpoint_path())?;
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
        info.epochs_completed = epoch;
        run.write_info(info)?;
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

/// Saves the model's weights (burnpack; the writer replaces the file atomically).
pub fn save_checkpoint(model: &Model, path: &Path) -> Result<()> {
    model
        .valid()
        .save_file(path)
        .map_err(|e| Error::Run(format!("{}: cannot write checkpoint: {e}", path.display())))
}

/// Loads weights saved by [`save_checkpoint`] into a freshly built model of the planned shape.
pub fn load_checkpoint(plan: &Plan, path: &Path, device: &Device) -> Result<Model> {
    plan.model
        .init(plan.experiment.train.seed, device)
        .try_load_file(path)
        .map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("does not fit the model of this experiment: {e}"),
        })
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
    let cells = sample::grid(
        &model.valid(),
        test,
        s.grid,
        plan.model.context_rows(),
        s.temperature,
        &mut rng,
        &device.clone().without_autodiff(),
    );
    let (planes, gh, gw) = results::png::tile(
        &cells,
        test.colours,
        test.height,
        test.width,
        s.grid,
        s.grid,
    );
    let tmp = path.with_extension("png.tmp");
    results::png::write_rgb_or_grey(&tmp, &planes, test.colours, gh, gw)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(Error::io(path))?;
    tracing::info!(
        path = %path.display(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "wrote sample grid"
    );
    Ok(())
}
