//! Checkpoints: the model, the optimizer state and where training stood, written atomically into
//! `results/<name>/checkpoints/<epochs done>-<steps into the next epoch>/`, keeping the last few.
//!
//! No random-generator state is saved because none is carried: every stream (weights, each epoch's
//! shuffle, each step's noise, each sample grid) is derived afresh from the seed by `rng`, so a
//! resumed run draws the same numbers.

use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::Optimizer;
use crate::train::{LossScale, PassStats};
use burn::module::Module;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DIR: &str = "checkpoints";
const MODEL: &str = "model.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
/// The Polyak average of the weights (`train.ema`), beside the trained ones.
const EMA: &str = "ema.bpk";
const STATE: &str = "state.json";
/// Each weights file's size and CRC-32C, written after them: a file that was cut short or changed
/// afterwards is reported as damaged, not as a model that does not fit.
const MANIFEST: &str = "manifest.json";

/// A weights file as it was written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Written {
    bytes: u64,
    crc32c: String,
}

/// Reads `path` whole and describes it as [`Written`].
fn describe(path: &Path) -> Result<Written> {
    let data = std::fs::read(path).map_err(Error::io(path))?;
    Ok(Written {
        bytes: data.len() as u64,
        crc32c: format!("{:08x}", crc32c::crc32c(&data)),
    })
}

/// Flushes a file or folder to the disk, so that a rename publishing it cannot outlive its data
/// (a crash after the rename leaves the old checkpoint or the whole new one, never a torn one).
fn sync(path: &Path) -> Result<()> {
    crate::atomic::sync(path).map_err(Error::io(path))
}

/// Where training stood when a checkpoint was written.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct Position {
    /// Epochs finished (with their metrics row written).
    pub epochs_done: usize,
    /// Optimisation steps taken in the next epoch (nonzero after an interrupt).
    pub steps_done: usize,
    /// Training totals of the next epoch so far.
    pub partial: PassStats,
    /// f16 runs: the dynamic loss scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
}

fn name(p: &Position) -> String {
    format!("{:04}-{:06}", p.epochs_done, p.steps_done)
}

/// Writes a checkpoint into `run_dir/checkpoints/` (a temporary folder renamed into place), then
/// removes all but the newest `keep`. `ema`: the averaged weights, if the run keeps them.
pub fn save(
    run_dir: &Path,
    model: &Model,
    ema: Option<&Model>,
    optimizer: &Optimizer,
    position: &Position,
    keep: usize,
) -> Result<PathBuf> {
    let root = run_dir.join(DIR);
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Run(format!("{}: cannot write {what}: {e}", root.display()))
    };
    std::fs::create_dir_all(&root).map_err(Error::io(&root))?;
    let final_dir = root.join(name(position));
    let tmp = root.join(format!(".{}.tmp", name(position)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(Error::io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
    model
        .clone()
        .save_file(tmp.join(MODEL))
        .map_err(|e| fail("the model", &e))?;
    if let Some(ema) = ema {
        ema.clone()
            .save_file(tmp.join(EMA))
            .map_err(|e| fail("the averaged weights", &e))?;
    }
    optimizer
        .save(model, &tmp.join(OPTIMIZER))
        .map_err(|e| fail("the optimizer state", &e))?;
    let mut manifest = std::collections::BTreeMap::new();
    for file in [MODEL, EMA, OPTIMIZER] {
        let path = tmp.join(file);
        if path.is_file() {
            sync(&path)?;
            manifest.insert(file, describe(&path)?);
        }
    }
    let manifest = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    let state = serde_json::to_string_pretty(position).expect("a position serialises");
    for (file, text) in [(MANIFEST, manifest), (STATE, state)] {
        let path = tmp.join(file);
        std::fs::write(&path, text).map_err(Error::io(&path))?;
        sync(&path)?;
    }
    sync(&tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(Error::io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(Error::io(&final_dir))?;
    sync(&root)?;
    prune(run_dir, &final_dir, keep)?;
    Ok(final_dir)
}

/// Keeps the newest `keep` checkpoints, and whatever `keep` says the one just written (what a
/// resume reads) and the newest written at an epoch's end (what `pixel eval` and `pixel sample`
/// read; interrupts, each writing a mid-epoch one, must not push it out).
fn prune(run_dir: &Path, written: &Path, keep: usize) -> Result<()> {
    let epoch_end = latest_epoch_end(run_dir)?.map(|(dir, _)| dir);
    let pinned = |dir: &Path| dir == written || epoch_end.as_deref() == Some(dir);
    let all = list(run_dir)?;
    let mut others = keep
        .max(1)
        .saturating_sub(all.iter().filter(|d| pinned(d)).count());
    for dir in all.iter().rev().filter(|d| !pinned(d)) {
        if others > 0 {
            others -= 1;
        } else {
            std::fs::remove_dir_all(dir).map_err(Error::io(dir))?;
        }
    }
    Ok(())
}

/// Where training stood when the checkpoint folder `dir` was written.
pub fn position(dir: &Path) -> Result<Position> {
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(Error::io(&state_path))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: state_path.clone(),
        message: format!("unreadable: {e}"),
    })
}

/// The newest checkpoint written at the end of an epoch (the model a `metrics.csv` row
/// describes) and that epoch's number, if any.
pub fn latest_epoch_end(run_dir: &Path) -> Result<Option<(PathBuf, usize)>> {
    for dir in list(run_dir)?.into_iter().rev() {
        let at = position(&dir)?;
        if at.steps_done == 0 {
            return Ok(Some((dir, at.epochs_done)));
        }
    }
    Ok(None)
}

/// Where training stood, from a checkpoint folder's name (`<epochs>-<steps>`, any number of
/// digits), for ordering: names sort as numbers, not as strings.
fn order_key(dir: &Path) -> (u64, u64, String) {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parsed = name
        .split_once('-')
        .and_then(|(e, s)| Some((e.parse().ok()?, s.parse().ok()?)));
    let (epochs, steps) = parsed.unwrap_or((0, 0));
    (epochs, steps, name)
}

/// Finished checkpoint folders, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = run_dir.join(DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(Error::io(&root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.join(STATE).is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort_by_cached_key(|d| order_key(d));
    Ok(dirs)
}

/// The newest checkpoint, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop())
}

fn mismatch(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("does not fit the model of this experiment: {e}"),
    }
}

/// Checks `file` of the checkpoint folder `dir` against its manifest (folders written before
/// there was one are not checked): present, and the size and checksum it was written with.
fn check_intact(dir: &Path, file: &str) -> Result<()> {
    let manifest_path = dir.join(MANIFEST);
    let Ok(text) = std::fs::read_to_string(&manifest_path) else {
        return Ok(());
    };
    let manifest: std::collections::BTreeMap<String, Written> = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint {
            path: manifest_path.clone(),
            message: format!("damaged: unreadable ({e})"),
        })?;
    let Some(expected) = manifest.get(file) else {
        return Ok(());
    };
    let path = dir.join(file);
    if !path.is_file() {
        return Err(Error::Checkpoint {
            path,
            message: "damaged: missing, though the checkpoint was written with it".into(),
        });
    }
    let found = describe(&path)?;
    if &found != expected {
        return Err(Error::Checkpoint {
            path,
            message: format!(
                "damaged: {} bytes with CRC-32C {}, written as {} bytes with {} (cut short or \
                 changed since)",
                found.bytes, found.crc32c, expected.bytes, expected.crc32c
            ),
        });
    }
    Ok(())
}

/// Loads the weights of a checkpoint folder into `model` (built from the same plan).
pub fn load_model(dir: &Path, model: Model) -> Result<Model> {
    let path = dir.join(MODEL);
    if !path.is_file() {
        return Err(Error::Checkpoint {
            path,
            message: "missing: not a checkpoint written by pixel".into(),
        });
    }
    check_intact(dir, MODEL)?;
    model.try_load_file(&path).map_err(|e| mismatch(&path, e))
}

/// Loads the averaged weights of a checkpoint folder into `model`, if it was written with them
/// (a file its manifest lists but that is gone is damage, not an absence).
pub fn load_ema(dir: &Path, model: Model) -> Result<Option<Model>> {
    let path = dir.join(EMA);
    check_intact(dir, EMA)?;
    if !path.is_file() {
        return Ok(None);
    }
    model
        .try_load_file(&path)
        .map(Some)
        .map_err(|e| mismatch(&path, e))
}

/// Loads a whole checkpoint: weights, optimizer state and position.
pub fn load(
    dir: &Path,
    model: Model,
    optimizer: Optimizer,
) -> Result<(Model, Optimizer, Position)> {
    let position = position(dir)?;
    let model = load_model(dir, model)?;
    let opt_path = dir.join(OPTIMIZER);
    check_intact(dir, OPTIMIZER)?;
    let optimizer = optimizer
        .load(&model, &opt_path)
        .map_err(|e| mismatch(&opt_path, e))?;
    Ok((model, optimizer, position))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Model, Optimizer) {
        let device = burn::tensor::Device::flex();
        let model = crate::model::ModelConfig::Simple(crate::model::SimpleConfig {
            colours: 1,
            layers: 1,
            kernel: 3,
            channels: 2,
            likelihood: crate::model::Likelihood::Categorical,
        })
        .init(1, &device);
        (model, crate::optim::adam())
    }

    /// A weights file cut short or changed after it was written, or one the checkpoint was
    /// written with that is gone, is reported as damaged (not as a model that does not fit);
    /// an intact one loads.
    #[test]
    fn damaged_checkpoints_are_reported_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let (model, optimizer) = tiny();
        let written = save(
            dir.path(),
            &model,
            Some(&model),
            &optimizer,
            &Position::default(),
            2,
        )
        .unwrap();
        assert!(load(&written, model.clone(), crate::optim::adam()).is_ok());
        assert!(load_ema(&written, model.clone()).unwrap().is_some());
        // Cut short.
        let path = written.join(MODEL);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_model(&written, model.clone()).unwrap_err().to_string();
        assert!(
            err.contains("damaged") && err.contains("cut short"),
            "{err}"
        );
        // Changed in place, same size.
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xFF;
        std::fs::write(&path, &flipped).unwrap();
        let err = load_model(&written, model.clone()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        // The averaged weights gone.
        std::fs::remove_file(written.join(EMA)).unwrap();
        let err = load_ema(&written, model.clone()).unwrap_err().to_string();
        assert!(err.contains("damaged: missing"), "{err}");
        // Written without an average: none, and no error.
        let at = Position {
            epochs_done: 1,
            ..Position::default()
        };
        let plain = save(dir.path(), &model, None, &optimizer, &at, 2).unwrap();
        assert!(load_ema(&plain, model).unwrap().is_none());
    }

    /// Pruning keeps the newest `keep` checkpoints and, whatever `keep` says, the newest one written
    /// at an epoch's end, which is what `pixel eval` and `pixel sample` load.
    #[test]
    fn pruning_keeps_the_newest_epoch_end_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (model, optimizer) = tiny();
        let names = || -> Vec<String> {
            list(dir.path())
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        let save_at = |epochs_done, steps_done| {
            let at = Position {
                epochs_done,
                steps_done,
                ..Position::default()
            };
            save(dir.path(), &model, None, &optimizer, &at, 2).unwrap();
        };
        save_at(1, 0);
        save_at(1, 5); // interrupted, resumed,
        save_at(1, 9); // and interrupted again
        assert_eq!(names(), ["0001-000000", "0001-000009"]);
        let (end, epochs) = latest_epoch_end(dir.path()).unwrap().unwrap();
        assert_eq!(epochs, 1);
        assert!(end.ends_with("0001-000000"));
        save_at(2, 0);
        assert_eq!(names(), ["0001-000009", "0002-000000"]);
        assert_eq!(latest_epoch_end(dir.path()).unwrap().unwrap().1, 2);
    }

    /// With `keep = 1`, an interrupt's checkpoint is kept beside the epoch-end one (the resume
    /// needs the first, `pixel eval` the second); past 999,999 steps, names still order as numbers.
    #[test]
    fn keep_one_keeps_the_interrupt_and_names_order_as_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (model, optimizer) = tiny();
        let save_at = |epochs_done, steps_done| {
            let at = Position {
                epochs_done,
                steps_done,
                ..Position::default()
            };
            save(dir.path(), &model, None, &optimizer, &at, 1).unwrap()
        };
        save_at(3, 0);
        let interrupt = save_at(3, 999_999);
        assert!(interrupt.is_dir(), "the checkpoint just written was pruned");
        assert_eq!(latest(dir.path()).unwrap().unwrap(), interrupt);
        assert_eq!(latest_epoch_end(dir.path()).unwrap().unwrap().1, 3);
        // "0003-1000000" sorts before "0003-999999" as a string.
        let later = save_at(3, 1_000_000);
        assert_eq!(latest(dir.path()).unwrap().unwrap(), later);
        assert_eq!(
            list(dir.path()).unwrap().len(),
            2,
            "the older interrupt goes"
        );
        let last = save_at(10_000, 0);
        assert_eq!(latest(dir.path()).unwrap().unwrap(), last);
        assert_eq!(latest_epoch_end(dir.path()).unwrap().unwrap().1, 10_000);
    }

    /// The loss scale of an f16 run survives a checkpoint; checkpoints without one (f32, bf16,
    /// or written before f16 existed) still read.
    #[test]
    fn position_round_trips_with_and_without_a_loss_scale() {
        let at = Position {
            epochs_done: 2,
            steps_done: 17,
            partial: PassStats {
                nats: 1.5,
                subpixels: 784,
                images: 1,
                seconds: 0.25,
                kl_nats: Some(0.5),
                kl_weight: Some(0.75),
                learning_rate: Some(9e-4),
                gradient_norm_sum: 12.5,
                gradient_norm_steps: 17,
                skipped_steps: 3,
            },
            loss_scale: Some(LossScale {
                scale: 1024.0,
                good_steps: 7,
                skipped: 3,
                skipped_in_a_row: 0,
            }),
        };
        let json = serde_json::to_string(&at).unwrap();
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), at);
        let old = r#"{"epochs_done":1,"steps_done":0,"partial":{"nats":0.0,"subpixels":0,"images":0,"seconds":0.0}}"#;
        let read: Position = serde_json::from_str(old).unwrap();
        assert_eq!((read.loss_scale, read.partial.kl_nats), (None, None));
    }
}
