//! The one function that knows the order of the steps: device, data, results folder, model, then
//! train / evaluate / sample / checkpoint for each epoch; and the same from a checkpoint.

use crate::checkpoint::{self, Position};
use crate::cluster::{self, World};
use crate::data;
use crate::device::Precision;
use crate::error::{Error, Result};
use crate::experiment::Plan;
use crate::model::Model;
use crate::progress::Progress;
use crate::results::tensorboard::Board;
use crate::results::{self, MetricsRow, RankInfo, RunDir, RunInfo, Status};
use crate::rng::{self, Purpose};
use crate::sample;
use crate::session::{self, Session, Weights};
use crate::train::{self, EpochEnd, PassStats};
use burn::module::Module;
use burn::tensor::Device;
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

/// Trains the planned experiment into a new results folder, on the ranks of `world` (rank 0
/// writes it). Returns the folder.
pub fn execute(plan: Plan, options: &Options, world: &World) -> Result<PathBuf> {
    let dir = options.results_root.join(&plan.name);
    let free = match world.is_root() && dir.exists() && !options.force {
        true => refuse_existing(&dir, &plan),
        false => Ok(()),
    };
    session::agree(world, free)?;
    let session = Session::open(plan, Weights::Initial, world)?;
    let run = match world.is_root() {
        true => RunDir::create(&dir, options.force, &session.plan.resolved_toml()).map(Some),
        false => Ok(None),
    };
    let run = session::agree(world, run)?;
    let plan = &session.plan;
    let info = RunInfo {
        name: plan.name.clone(),
        crate_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: env!("BUILD_GIT_REVISION").into(),
        backend: session.device.backend.name().into(),
        backend_choice: session.device.reason.clone(),
        device: session.device.description.clone(),
        float_dtype: match plan.device.precision {
            Precision::F32 => "f32".into(),
            p => format!("{p:?} compute, f32 weights").to_lowercase(),
        },
        seed: plan.experiment.train.seed,
        parameters: session.state.model.parameters(),
        started: results::now(),
        ended: None,
        status: Status::Running,
        epochs_completed: 0,
        error: None,
        overrides: plan.overrides.clone(),
        resumed: Vec::new(),
        hardware: results::hardware(session.device.gpu.as_deref()),
        validation_images: session.splits.validation.as_ref().map_or(0, |v| v.len()),
        world_size: world.size(),
        ranks: ranks(world, &session),
        cuda_graph: None,
    };
    run_and_record_the_end(session, dir, run, info, world)
}

/// Continues the run in `dir` from its newest checkpoint (or from the start if it has none), on
/// the ranks of `world`, however many the run had before.
pub fn resume(dir: &Path, world: &World) -> Result<PathBuf> {
    let info = results::read_info(dir).and_then(|info| match info.status {
        Status::Completed => Err(Error::Usage {
            flag: format!("--resume {}", dir.display()),
            message: "this run has already completed; nothing to resume".into(),
        }),
        _ => Ok(info),
    });
    let mut info = session::agree(world, info)?;
    let plan = session::agree(
        world,
        session::recorded_plan(dir, &[], "pixel run --resume"),
    )?;
    let session = Session::open(plan, Weights::Resume(dir), world)?;
    if let Some(ckpt) = &session.checkpoint {
        tracing::info!(checkpoint = %ckpt.display(), "resuming");
    }
    let run = match world.is_root() {
        true => RunDir::reopen(dir, session.position.epochs_done).map(Some),
        false => Ok(None),
    };
    let run = session::agree(world, run)?;
    info.status = Status::Running;
    info.error = None;
    info.ended = None;
    info.epochs_completed = session.position.epochs_done;
    info.resumed.push(results::now());
    info.world_size = world.size();
    info.ranks = ranks(world, &session);
    info.cuda_graph = None;
    run_and_record_the_end(session, dir.to_path_buf(), run, info, world)
}

/// Every rank's host and device, for a run of several ranks.
fn ranks(world: &World, session: &Session) -> Vec<RankInfo> {
    if world.size() == 1 {
        return Vec::new();
    }
    let threads = session
        .device
        .threads
        .map_or(String::new(), |t| t.to_string());
    let mine = format!(
        "{}\t{}\t{threads}",
        cluster::host_name(),
        session.device.description
    );
    world
        .gather_text(&mine)
        .into_iter()
        .enumerate()
        .map(|(rank, text)| {
            let mut parts = text.split('\t');
            let mut next = || parts.next().unwrap_or_default().to_string();
            RankInfo {
                rank,
                host: next(),
                device: next(),
                threads: next().parse().ok(),
                weights_checksum: None,
            }
        })
        .collect()
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

/// What rank 0 writes as the run goes: the results folder, `run.json` and the TensorBoard
/// events. The other ranks have none of it.
struct Record {
    run: RunDir,
    info: RunInfo,
    board: Option<Board>,
}

/// Runs the epochs and records how the run ended in `run.json`.
fn run_and_record_the_end(
    session: Session,
    dir: PathBuf,
    run: Option<RunDir>,
    info: RunInfo,
    world: &World,
) -> Result<PathBuf> {
    let (plan, splits) = (&session.plan, &session.splits);
    let mut record = run.map(|run| Record {
        run,
        info,
        board: None,
    });
    let started = match &mut record {
        Some(rec) => rec.run.write_info(&rec.info),
        None => Ok(()),
    };
    session::agree(world, started)?;
    tracing::info!(
        name = %plan.name,
        device = %session.device.description,
        parameters = session.state.model.parameters(),
        ranks = world.size(),
        train_images = splits.train.len(),
        test_images = splits.test.len(),
        "training in {}",
        dir.display()
    );
    // Once training has started, any failure (a full disk, say) is the run's: exit code 1, with
    // run.json saying how far it got.
    let outcome = train_remaining_epochs(session, &dir, &mut record, world).map_err(|e| match e {
        Error::Interrupted(_) | Error::Run(_) | Error::Peer { .. } => e,
        other => Error::Run(other.to_string()),
    });
    let ended = match &mut record {
        Some(Record { run, info, .. }) => {
            info.ended = Some(results::now());
            info.status = match &outcome {
                Ok(()) => Status::Completed,
                Err(Error::Interrupted(_)) => Status::Interrupted,
                Err(_) => Status::Failed,
            };
            if let Err(e) = &outcome {
                info.error = Some(e.to_string());
            }
            run.write_info(info).map_err(|e| Error::Run(e.to_string()))
        }
        None => Ok(()),
    };
    // Every rank leaves once rank 0 has written how the run ended.
    session::agree(world, ended)?;
    outcome.map(|()| dir)
}

/// What every epoch of a run reads.
struct Epochs<'a> {
    plan: &'a Plan,
    splits: &'a data::Splits,
    device: &'a Device,
    dir: &'a Path,
    world: &'a World,
}

/// Trains the epochs the run has left, each followed by its evaluation and records; returns
/// `Error::Interrupted` after checkpointing when asked to stop.
fn train_remaining_epochs(
    session: Session,
    dir: &Path,
    record: &mut Option<Record>,
    world: &World,
) -> Result<()> {
    let device = &session.train_device();
    let Session {
        plan,
        splits,
        position,
        mut state,
        ..
    } = session;
    let at = Epochs {
        plan: &plan,
        splits: &splits,
        device,
        dir,
        world,
    };
    let t = &plan.experiment.train;
    let steps_per_epoch = splits.train.len().div_ceil(t.batch_size);
    let steps_done = (position.epochs_done * steps_per_epoch + position.steps_done) as u64;
    let board = match record {
        Some(rec) => Board::open(
            &rec.run.path,
            steps_per_epoch,
            steps_done,
            &plan.resolved_toml(),
        )
        .map(|b| rec.board = Some(b)),
        None => Ok(()),
    };
    session::agree(world, board)?;
    for epoch in position.epochs_done + 1..=t.epochs {
        let resumed = if epoch == position.epochs_done + 1 {
            (position.steps_done, position.partial)
        } else {
            (0, PassStats::default())
        };
        let (next, train_stats, end) = at.train(state, epoch, resumed, record)?;
        state = next;
        if let EpochEnd::Stopped { steps_done } = end {
            at.checkpoint_stopped(&state, epoch, steps_done, train_stats, record)?;
            return Err(Error::Interrupted(dir.to_path_buf()));
        }
        let (row, sums) = at.evaluate(&state, epoch, &train_stats)?;
        let written = match record {
            Some(rec) => record_epoch(&plan, rec, &row, &state, &splits.test, &sums, device),
            None => Ok(()),
        };
        session::agree(world, written)?;
        if world.any(stop_requested()) && epoch < t.epochs {
            return Err(Error::Interrupted(dir.to_path_buf()));
        }
    }
    Ok(())
}

impl Epochs<'_> {
    /// One epoch's training steps from `resumed` (the step and partial totals to start from), with
    /// the progress bar and the TensorBoard steps. The ranks fail together.
    fn train(
        &self,
        state: train::TrainState,
        epoch: usize,
        resumed: (usize, PassStats),
        record: &mut Option<Record>,
    ) -> Result<(train::TrainState, PassStats, EpochEnd)> {
        let (plan, world) = (self.plan, self.world);
        let t = &plan.experiment.train;
        let order = data::epoch_order(self.splits.train.len(), t.seed, epoch);
        let bar = Progress::new(
            &format!("epoch {epoch}/{}", t.epochs),
            order.len() as u64,
            "images",
        );
        let work = train::Epoch {
            images: &self.splits.train,
            order: &order,
            step: plan.step(epoch),
            device: self.device,
            start_step: resumed.0,
            so_far: resumed.1,
            stop: &stop_requested,
            world,
        };
        let mut board = record.as_mut().and_then(|rec| rec.board.as_mut());
        let trained = train::train_epoch(state, work, |report| {
            if report.skipped && world.is_root() {
                bar.suspend(|| {
                    tracing::warn!(
                        epoch,
                        step = report.step,
                        loss_scale = report.loss_scale,
                        "f16 gradients overflowed: step skipped, loss scale halved"
                    )
                });
            }
            let message = format!("{:.3} bits/dim", report.bits_per_dim);
            bar.update(report.images_done as u64, Some(message));
            if let Some(board) = board.as_mut() {
                board.step(epoch, report);
            }
        })
        .map_err(|e| {
            let kept = checkpoint::latest(self.dir)
                .ok()
                .flatten()
                .map(|p| format!("; the last good checkpoint is {}", p.display()))
                .unwrap_or_default();
            Error::Run(format!("epoch {epoch}, {e}{kept}"))
        });
        // A loss that is not finite is the same sum on every rank.
        let trained = session::agree(world, trained)?;
        bar.finish();
        Ok(trained)
    }

    /// The checkpoint of a run stopped inside `epoch`, after `steps_done` of its steps.
    fn checkpoint_stopped(
        &self,
        state: &train::TrainState,
        epoch: usize,
        steps_done: usize,
        partial: PassStats,
        record: &mut Option<Record>,
    ) -> Result<()> {
        let at = Position {
            epochs_done: epoch - 1,
            steps_done,
            partial,
            loss_scale: state.loss_scale,
        };
        let saved = match record {
            Some(rec) => checkpoint::save(
                self.dir,
                &state.model.valid(),
                state.ema.as_ref().map(train::Ema::model),
                &state.optimizer,
                &at,
                self.plan.experiment.train.keep_checkpoints,
            )
            .and_then(|_| rec.board.as_mut().map_or(Ok(()), Board::flush)),
            None => Ok(()),
        };
        session::agree(self.world, saved)
    }

    /// The test (and validation) pass after `epoch`, checked finite, the ranks' weights checked
    /// equal (their checksums returned), and the epoch's metrics row, logged.
    fn evaluate(
        &self,
        state: &train::TrainState,
        epoch: usize,
        train_stats: &PassStats,
    ) -> Result<(MetricsRow, Vec<u64>)> {
        let (device, world) = (self.device, self.world);
        let t = &self.plan.experiment.train;
        // The averaged weights with `train.ema`; the checksum is of the trained ones.
        let model = state.eval_model();
        let (batch, seed) = (t.eval_batch_size, t.seed);
        let test =
            train::evaluate_sharded("test", model, &self.splits.test, batch, seed, device, world);
        let validation =
            self.splits.validation.as_ref().map(|v| {
                train::evaluate_sharded("validation", model, v, batch, seed, device, world)
            });
        // The sums are the same on every rank, so every rank stops here alike.
        let finite = test
            .check_finite("test")
            .and_then(|()| validation.map_or(Ok(()), |v| v.check_finite("validation")));
        finite.map_err(|e| Error::Run(format!("epoch {epoch}: {e}")))?;
        let sums = session::agree(world, check_same_weights(&state.model, world))?;
        let row = MetricsRow {
            epoch,
            train_bits_per_dim: train_stats.bits_per_dim(),
            test_bits_per_dim: test.bits_per_dim(),
            train_seconds: train_stats.seconds,
            test_seconds: test.seconds,
            train_images_per_second: train_stats.images_per_second(),
            train_recon_bits_per_dim: train_stats.recon_bits_per_dim(),
            train_kl_bits_per_dim: train_stats.kl_bits_per_dim(),
            test_recon_bits_per_dim: test.recon_bits_per_dim(),
            test_kl_bits_per_dim: test.kl_bits_per_dim(),
            kl_weight: train_stats.kl_weight,
            validation_bits_per_dim: validation.map(|v| v.bits_per_dim()),
            learning_rate: train_stats.learning_rate,
            gradient_norm: train_stats.mean_gradient_norm(),
            skipped_steps: state.loss_scale.map(|_| train_stats.skipped_steps),
        };
        tracing::info!(
            epoch,
            train_bits_per_dim = format!("{:.4}", row.train_bits_per_dim),
            test_bits_per_dim = format!("{:.4}", row.test_bits_per_dim),
            images_per_second = format!("{:.1}", row.train_images_per_second),
            "epoch done"
        );
        if self.plan.experiment.runtime.cuda_graph {
            let c = state.inputs.graph.counts();
            tracing::info!(
                epoch,
                captured = c.captured,
                replayed = c.replayed,
                eager = c.eager,
                "runtime.cuda_graph: steps so far"
            );
            if c.replayed == 0 {
                tracing::warn!(
                    epoch,
                    "runtime.cuda_graph: no step has replayed a CUDA graph yet (every step ran \
                     eagerly: its buffers never settled, or the epoch was shorter than the four \
                     steps a capture waits for)"
                );
            }
        }
        if let Some(warning) = train::collapse_warning(
            row.test_kl_bits_per_dim,
            row.kl_weight,
            self.plan.experiment.model.vae.free_bits,
        ) {
            tracing::warn!(epoch, "{warning}");
        }
        Ok((row, sums))
    }
}

/// Rank 0's files at the end of an epoch: the metrics row, the curves, the sample grid, the
/// checkpoint and `run.json`.
fn record_epoch(
    plan: &Plan,
    rec: &mut Record,
    row: &MetricsRow,
    state: &train::TrainState,
    test: &data::Images,
    sums: &[u64],
    device: &Device,
) -> Result<()> {
    let epoch = row.epoch;
    let board = rec.board.as_mut().expect("rank 0 opened the board");
    rec.run.append_metrics(row)?;
    board.epoch(row)?;
    rec.run.write_curve(&plan.name)?;
    // The checkpoint first: a grid can take minutes, and a stop or a kill during it loses only
    // the grid.
    let at = Position {
        epochs_done: epoch,
        loss_scale: state.loss_scale,
        ..Position::default()
    };
    let keep = plan.experiment.train.keep_checkpoints;
    checkpoint::save(
        &rec.run.path,
        &state.model.valid(),
        state.ema.as_ref().map(train::Ema::model),
        &state.optimizer,
        &at,
        keep,
    )?;
    let every = plan.experiment.sample.every;
    if epoch == plan.experiment.train.epochs || (every > 0 && epoch.is_multiple_of(every)) {
        let path = rec.run.sample_path(epoch);
        let model = state.eval_model();
        if write_grid(plan, model, test, epoch, &path, device, &stop_requested)? {
            board.image("samples/grid", epoch, &path)?;
            let recon = reconstructions_path(&path);
            if recon.is_file() {
                board.image("samples/reconstructions", epoch, &recon)?;
            }
        } else {
            tracing::warn!(
                "the sample grid of epoch {epoch} was not finished: stopped; `pixel sample {}` \
                 draws it from this epoch's checkpoint",
                rec.run.path.display()
            );
        }
    }
    rec.info.epochs_completed = epoch;
    if plan.experiment.runtime.cuda_graph {
        rec.info.cuda_graph = Some(state.inputs.graph.counts());
    }
    for (rank, sum) in rec.info.ranks.iter_mut().zip(sums) {
        rank.weights_checksum = Some(format!("{sum:016x}"));
    }
    rec.run.write_info(&rec.info)
}

/// The weights' checksum on every rank, which must all be equal (data-parallel ranks step the
/// same optimizer with the same summed gradients). Empty for a single process.
fn check_same_weights(model: &crate::model::Model, world: &World) -> Result<Vec<u64>> {
    if world.size() == 1 {
        return Ok(Vec::new());
    }
    let sums = world.gather_u64(train::weights_checksum(model));
    if sums.iter().any(|&s| s != sums[0]) {
        return Err(Error::Run(format!(
            "the ranks' weights have diverged ({}): a bug; please report it",
            session::checksums(&sums)
        )));
    }
    Ok(sums)
}

/// Where a PixelVAE's reconstructions go beside the grid at `grid`: `reconstructions-<name>`.
fn reconstructions_path(grid: &Path) -> PathBuf {
    let name = grid
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("grid.png");
    grid.with_file_name(format!("reconstructions-{name}"))
}

/// Tiles `grid x grid` images like `test`'s into a PNG at `path` (written whole or not at all).
fn write_cells(cells: &[u8], test: &data::Images, grid: usize, path: &Path) -> Result<()> {
    let (planes, gh, gw) =
        results::png::tile(cells, test.colours, test.height, test.width, grid, grid);
    results::png::write_rgb_or_grey(path, &planes, test.colours, gh, gw).map_err(Error::io(path))
}

/// Samples the grid with a generator seeded by the run's seed and the epoch, and writes it (a
/// PixelVAE's reconstructions beside it). Returns false, with nothing written, when `stop` says
/// so before the grid is finished (asked before each pixel).
pub fn write_grid(
    plan: &Plan,
    model: &Model,
    test: &data::Images,
    epoch: usize,
    path: &Path,
    device: &Device,
    stop: &dyn Fn() -> bool,
) -> Result<bool> {
    let s = &plan.experiment.sample;
    let mut rng = rng::stream(
        plan.experiment.train.seed,
        Purpose::Sampling,
        epoch as u64,
        0,
    );
    let started = std::time::Instant::now();
    let (model, device) = (model.valid(), device.clone().without_autodiff());
    let how = (sample::Method::Cached, s.temperature);
    let Some(cells) = sample::grid_until(&model, test, s.grid, how, &mut rng, &device, stop) else {
        return Ok(false);
    };
    // A PixelVAE also shows what it makes of test images: `reconstructions-epoch-N.png`.
    let recon = sample::reconstructions(&model, test, s.grid, how, &mut rng, &device, stop);
    if stop() {
        return Ok(false);
    }
    write_cells(&cells, test, s.grid, path)?;
    tracing::info!(
        path = %path.display(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "wrote sample grid"
    );
    if let Some(cells) = recon {
        let path = reconstructions_path(path);
        write_cells(&cells, test, s.grid, &path)?;
        tracing::info!(path = %path.display(), "wrote reconstructions");
    }
    Ok(true)
}
