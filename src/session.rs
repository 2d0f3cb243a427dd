//! Opening a run: the one place that knows the order of the setup, plan -> device -> data ->
//! checks -> model -> checkpoint. A new run, a resumed one, `pixel eval`, `pixel sample` and
//! `pixel bench` all start from [`Session::open`]; what differs is where the plan comes from and
//! which weights they want. A data-parallel run learns its rank here too.

use crate::checkpoint::{self, Position};
use crate::cluster::{self, World};
use crate::data::{self, Splits};
use crate::device::{self, Precision};
use crate::error::{Error, Result};
use crate::experiment::{self, Override, Plan};
use crate::results;
use crate::train::{self, LossScale, TrainState};
use burn::tensor::Device;
use std::path::{Path, PathBuf};

/// Which weights a session starts from.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// Drawn from the seed: a new run, a benchmark.
    Initial,
    /// The newest checkpoint in this results folder with its optimizer state and position, to
    /// continue training (the initial weights if the run never wrote one).
    Resume(&'a Path),
    /// The newest checkpoint written at an epoch's end in this results folder (the model of the
    /// last `metrics.csv` row, not that of a later interrupt), for evaluation and sampling.
    Trained(&'a Path),
}

/// A run, opened: what it will do, where, on which images, and the state it starts from.
pub struct Session {
    pub plan: Plan,
    pub device: device::Opened,
    pub splits: Splits,
    /// The model (on the autodiff device unless opened for `Weights::Trained`), its optimizer
    /// and the f16 loss scale.
    pub state: TrainState,
    /// Where training stands: the start for a new run, the checkpoint's position otherwise.
    pub position: Position,
    /// The checkpoint the weights were read from, if any.
    pub checkpoint: Option<PathBuf>,
}

impl Session {
    /// Opens the device, reads and checks the data, builds the model and loads `weights` into it:
    /// on every rank of `world`, which all fail when one does, and which must end up holding the
    /// same weights.
    pub fn open(plan: Plan, weights: Weights, world: &World) -> Result<Session> {
        if world.size() > 1 {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(plan.resolved_toml().as_bytes());
            let sums = world.gather_u64(u64::from_le_bytes(digest[..8].try_into().expect("8")));
            let same = match sums.iter().all(|&s| s == sums[0]) {
                true => Ok(()),
                false => Err(Error::Usage {
                    flag: "the ranks' experiments".into(),
                    message: format!(
                        "differ ({}): every rank must train the same experiment (an \
                         environment variable set on some ranks only?)",
                        checksums(&sums)
                    ),
                }),
            };
            agree(world, same)?;
        }
        let session = agree(world, Session::open_here(plan, weights, world))?;
        if world.size() > 1 {
            let sums = world.gather_u64(train::weights_checksum(&session.state.model));
            let same = match sums.iter().all(|&s| s == sums[0]) {
                true => Ok(()),
                false => Err(Error::Run(format!(
                    "the ranks start from different weights ({}): every rank must read the same \
                     checkpoint and build the same model",
                    checksums(&sums)
                ))),
            };
            agree(world, same)?;
        }
        Ok(session)
    }

    fn open_here(plan: Plan, weights: Weights, world: &World) -> Result<Session> {
        // Before anything that can fail on one rank alone: the data is read in turn.
        let splits = load_in_turn(&plan, world)?;
        check_world(&plan, world)?;
        let seed = plan.experiment.train.seed;
        let place = device::Place {
            local_rank: world.local_rank(),
            threads: cluster::threads_per_rank(world),
        };
        let opened = device::open(&plan.device, seed, place).map_err(|message| Error::Usage {
            flag: format!("runtime.device = \"{}\"", plan.experiment.runtime.device),
            message,
        })?;
        tracing::info!(device = %opened.description, "{}", opened.reason);
        if plan.experiment.runtime.cuda_graph && !opened.description.starts_with("libtorch:cuda") {
            return Err(Error::Usage {
                flag: "runtime.cuda_graph = true".into(),
                message: format!(
                    "the run is on {} ({}); expected a CUDA device: a CUDA graph runs on one \
                     (set runtime.device = \"cuda\", or runtime.cuda_graph = false)",
                    opened.description, opened.reason
                ),
            });
        }
        check_splits(&plan, &splits)?;

        let training = !matches!(weights, Weights::Trained(_));
        let model_device = if training {
            opened.device.clone().autodiff()
        } else {
            opened.device.clone()
        };
        let model = plan.init_model(&model_device);
        let decay = plan.experiment.train.ema;
        let fresh = TrainState {
            ema: (decay > 0.0).then(|| train::Ema::new(decay, &model)),
            model,
            optimizer: plan.optimizer(),
            loss_scale: (plan.device.precision == Precision::F16).then(LossScale::default),
            inputs: Default::default(),
        };
        let (state, position, checkpoint) = match weights {
            Weights::Initial => (fresh, Position::default(), None),
            Weights::Resume(dir) => match checkpoint::latest(dir)? {
                None => (fresh, Position::default(), None),
                Some(ckpt) => {
                    let (model, optimizer, position) =
                        checkpoint::load(&ckpt, fresh.model.clone(), fresh.optimizer)?;
                    // The average goes on from where it was (from the weights if the
                    // checkpoint was written without one: `train.ema` turned on at a resume).
                    let ema = match fresh.ema {
                        Some(e) => Some(match checkpoint::load_ema(&ckpt, e.model().clone())? {
                            Some(averaged) => train::Ema::from_average(decay, averaged),
                            None => train::Ema::new(decay, &model),
                        }),
                        None => None,
                    };
                    let state = TrainState {
                        model,
                        optimizer,
                        loss_scale: position.loss_scale.or(fresh.loss_scale),
                        ema,
                        inputs: Default::default(),
                    };
                    (state, position, Some(ckpt))
                }
            },
            Weights::Trained(dir) => {
                let Some((ckpt, epochs)) = checkpoint::latest_epoch_end(dir)? else {
                    return Err(Error::Checkpoint {
                        path: dir.join(checkpoint::DIR),
                        message: "no checkpoint at an epoch's end: the run has not finished an \
                                  epoch yet"
                            .into(),
                    });
                };
                // Evaluation and sampling use the averaged weights where the run kept them.
                let model = checkpoint::load_model(&ckpt, fresh.model.clone())?;
                let ema = checkpoint::load_ema(&ckpt, fresh.model)?
                    .map(|averaged| train::Ema::from_average(decay, averaged));
                // A run with `train.ema` is evaluated and sampled with its average: never with
                // the trained weights in its place without a word.
                if decay > 0.0 && ema.is_none() {
                    return Err(Error::Checkpoint {
                        path: ckpt.join("ema.bpk"),
                        message: format!(
                            "missing: the run averages its weights (train.ema = {decay}) and \
                             evaluation and sampling use the average, but this checkpoint has \
                             none"
                        ),
                    });
                }
                if ema.is_some() {
                    tracing::info!("using the averaged weights (train.ema = {decay})");
                }
                let state = TrainState {
                    model,
                    ema,
                    ..fresh
                };
                let position = Position {
                    epochs_done: epochs,
                    ..Position::default()
                };
                (state, position, Some(ckpt))
            }
        };
        Ok(Session {
            plan,
            device: opened,
            splits,
            state,
            position,
            checkpoint,
        })
    }

    /// The device training runs on (with autodiff).
    pub fn train_device(&self) -> Device {
        self.device.device.clone().autodiff()
    }

    /// The trained weights of the run in `dir`, in one process, for a command that reads its
    /// checkpoint and writes into its folder (`pixel eval`, `pixel export`): the folder's lock is
    /// taken first, so that no live run replaces the checkpoint or writes beside it meanwhile,
    /// and it is held as long as the returned guard lives.
    pub fn open_trained(dir: &Path, plan: Plan) -> Result<(results::FolderLock, Session)> {
        let lock = results::FolderLock::take(dir)?;
        let session = Session::open(plan, Weights::Trained(dir), &World::single())?;
        Ok((lock, session))
    }
}

/// The plan recorded in the results folder `dir` (its resolved `experiment.toml`, the name and
/// overrides of its `run.json`), with `sets` applied on top, for `command`'s errors. `PIXEL_*`
/// overrides in the environment are refused: they would change the run without a record.
pub fn recorded_plan(dir: &Path, sets: &[Override], command: &str) -> Result<Plan> {
    let exp_path = dir.join(results::EXPERIMENT_FILE);
    if !exp_path.is_file() {
        return Err(Error::Usage {
            flag: format!("{command} {}", dir.display()),
            message: format!(
                "expected a results folder holding {}",
                results::EXPERIMENT_FILE
            ),
        });
    }
    if let Some(env) = experiment::environment_overrides().first() {
        return Err(Error::Usage {
            flag: format!("{}={}", env.origin, env.value),
            message: format!(
                "{command} uses exactly the experiment recorded in {}; an environment override \
                 would change it without a record. Unset it (or start a new run with it)",
                exp_path.display()
            ),
        });
    }
    let (exp, overrides) = experiment::load_recorded(&exp_path, sets)?;
    let plan = Plan::new(exp, overrides, &exp_path, None)?;
    Ok(match results::read_info(dir) {
        Ok(info) => Plan {
            name: info.name,
            overrides: info.overrides,
            ..plan
        },
        Err(_) => plan,
    })
}

/// Runs `local`'s outcome past every rank: all go on only if all succeeded. A rank that
/// succeeded while another failed returns [`Error::Peer`] with the first failing rank's exit code
/// (that rank prints what went wrong). A single process returns `local` as it is.
pub fn agree<T>(world: &World, local: Result<T>) -> Result<T> {
    if world.size() == 1 {
        return local;
    }
    let code = local.as_ref().err().map_or(0, |e| e.exit_code());
    let codes = world.gather_u64(u64::from(code.unsigned_abs()));
    if codes.iter().any(|&c| c != 0) {
        world.note_failure_agreed();
    }
    match local {
        Err(e) => Err(e),
        Ok(value) => match codes.iter().position(|&c| c != 0) {
            None => Ok(value),
            Some(rank) => Err(Error::Peer {
                rank,
                code: i32::try_from(codes[rank]).unwrap_or(1),
            }),
        },
    }
}

/// Weight checksums as text, one per rank.
pub fn checksums(sums: &[u64]) -> String {
    sums.iter()
        .enumerate()
        .map(|(r, s)| format!("rank {r}: {s:016x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the data: rank 0 first, so that a dataset it downloads is whole before the other
/// ranks read it (they would otherwise download it into the same folder at the same time).
fn load_in_turn(plan: &Plan, world: &World) -> Result<Splits> {
    if world.size() == 1 {
        return Ok(data::load(&plan.data)?);
    }
    let first = world.is_root().then(|| data::load(&plan.data));
    let readable = world.broadcast_i32(i32::from(matches!(first, Some(Ok(_))))) == 1;
    match first {
        Some(loaded) => Ok(loaded?),
        None if readable => Ok(data::load(&plan.data)?),
        None => Err(Error::Peer { rank: 0, code: 2 }),
    }
}

/// The global batch must split evenly over the ranks.
fn check_world(plan: &Plan, world: &World) -> Result<()> {
    let batch = plan.experiment.train.batch_size;
    if !batch.is_multiple_of(world.size()) {
        return Err(Error::Invalid {
            source_name: plan.name.clone(),
            key: "train.batch_size".into(),
            value: batch.to_string(),
            expected: format!(
                "a multiple of the {} ranks the run was launched on: it is the global batch, of \
                 which every rank takes an equal part",
                world.size()
            ),
        });
    }
    if plan.experiment.runtime.cuda_graph && world.size() > 1 {
        return Err(Error::Invalid {
            source_name: plan.name.clone(),
            key: "runtime.cuda_graph".into(),
            value: "true".into(),
            expected: format!(
                "false on the {} ranks the run was launched on: a CUDA graph replays one \
                 process's step (the ranks' all-reduce is on the host)",
                world.size()
            ),
        });
    }
    Ok(())
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
