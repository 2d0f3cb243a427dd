//! Everything under `results/<name>/`: the resolved experiment, `run.json`, `metrics.csv`, sample
//! grids and the checkpoint. Plain values only; never a tensor. Imports `error` and the format's
//! `Override` (recorded in `run.json`), nothing above.

pub mod npy;
pub mod plot;
pub mod png;
pub mod summary;
pub mod tensorboard;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const EXPERIMENT_FILE: &str = "experiment.toml";
pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const SAMPLES_DIR: &str = "samples";
pub const CURVE_FILE: &str = "learning-curve.png";
/// TensorBoard's event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";
/// What `pixel eval` writes.
pub const EVAL_FILE: &str = "eval.json";
/// `pixel eval --receptive-field`'s counts and heat maps.
pub const RECEPTIVE_JSON: &str = "receptive-field.json";
pub const RECEPTIVE_PNG: &str = "receptive-field.png";

/// How far a run got.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Completed,
    Failed,
    /// Stopped by Ctrl-C or SIGTERM after writing a checkpoint.
    Interrupted,
}

/// `run.json`: what ran, where, and how far it got.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RunInfo {
    pub name: String,
    pub crate_version: String,
    pub git_revision: String,
    pub backend: String,
    pub device: String,
    pub float_dtype: String,
    pub seed: u64,
    pub parameters: usize,
    pub started: String,
    pub ended: Option<String>,
    pub status: Status,
    pub epochs_completed: usize,
    pub error: Option<String>,
    /// Values that came from `--set` or `PIXEL_*` rather than the experiment file.
    pub overrides: Vec<crate::experiment::Override>,
    /// When the run was resumed from a checkpoint, if ever.
    #[serde(default)]
    pub resumed: Vec<String>,
    /// The CPU the run started on, and how many threads it could use.
    #[serde(default)]
    pub hardware: String,
    /// Why this backend: as written, or what `backend = "auto"` found.
    #[serde(default)]
    pub backend_choice: String,
    /// Training images held out for validation (`data.validation`, chosen by the seed).
    #[serde(default)]
    pub validation_images: usize,
    /// Processes that trained it: 1, or the ranks of a data-parallel run (its latest start).
    #[serde(default = "one")]
    pub world_size: usize,
    /// A data-parallel run's ranks: host, device, threads and, after each epoch, a checksum of
    /// the weights (equal on every rank).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<RankInfo>,
    /// With `runtime.cuda_graph`: the training steps of its latest start so far that were
    /// captured as a CUDA graph, replayed from one, and run eagerly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graph: Option<crate::train::GraphCounts>,
}

fn one() -> usize {
    1
}

/// One rank of a data-parallel run, in `run.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RankInfo {
    pub rank: usize,
    pub host: String,
    pub device: String,
    /// Backend threads, when pixel chose them (several ranks on a node, none set by the user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_checksum: Option<String>,
}

impl RunInfo {
    pub fn status_word(&self) -> String {
        format!("{:?}", self.status).to_lowercase()
    }
}

/// "CPU model, N threads", from /proc/cpuinfo where there is one, then the GPU's name if any.
pub fn hardware(gpu: Option<&str>) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    match gpu {
        Some(gpu) => format!("{gpu}; {cpu}, {threads} threads"),
        None => format!("{cpu}, {threads} threads"),
    }
}

/// The header of `metrics.csv`, in the order of [`MetricsRow`]'s fields.
pub const METRICS_COLUMNS: [&str; 15] = [
    "epoch",
    "train_bits_per_dim",
    "test_bits_per_dim",
    "train_seconds",
    "test_seconds",
    "train_images_per_second",
    "train_recon_bits_per_dim",
    "train_kl_bits_per_dim",
    "test_recon_bits_per_dim",
    "test_kl_bits_per_dim",
    "kl_weight",
    "validation_bits_per_dim",
    "learning_rate",
    "gradient_norm",
    "skipped_steps",
];

/// One row of `metrics.csv`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MetricsRow {
    pub epoch: usize,
    /// Negative log-likelihood, or for a PixelVAE the negative ELBO (reconstruction + KL).
    pub train_bits_per_dim: f64,
    pub test_bits_per_dim: f64,
    pub train_seconds: f64,
    pub test_seconds: f64,
    pub train_images_per_second: f64,
    /// PixelVAE only (empty otherwise): the two terms of the negative ELBO, and the KL weight in
    /// force at the epoch's last step (below 1 during warm-up; the bits above always use 1).
    #[serde(default)]
    pub train_recon_bits_per_dim: Option<f64>,
    #[serde(default)]
    pub train_kl_bits_per_dim: Option<f64>,
    #[serde(default)]
    pub test_recon_bits_per_dim: Option<f64>,
    #[serde(default)]
    pub test_kl_bits_per_dim: Option<f64>,
    #[serde(default)]
    pub kl_weight: Option<f64>,
    /// With `data.validation`: the held-out training images, as `test_bits_per_dim` (empty
    /// otherwise). What model selection uses.
    #[serde(default)]
    pub validation_bits_per_dim: Option<f64>,
    /// The learning rate of the epoch's last step (`train.lr_decay` lowers it step by step).
    #[serde(default)]
    pub learning_rate: Option<f64>,
    /// The mean over the epoch's steps of the gradients' global L2 norm before clipping.
    #[serde(default)]
    pub gradient_norm: Option<f64>,
    /// f16 only (empty otherwise): the epoch's steps skipped because their gradients overflowed.
    #[serde(default)]
    pub skipped_steps: Option<usize>,
}

/// The current time as RFC 3339, UTC, whole seconds.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The lock file of a results folder.
pub const LOCK_FILE: &str = ".lock";

/// The right to write a results folder: an OS advisory lock (`flock`) on its `.lock` file, held
/// while this value lives, and released by the OS when the process ends, however it ends (kill
/// -9 included). The file says who holds it (pid and host). A second writer (`run` into the same
/// folder, `--resume`, `--force`, `eval`) is refused, naming the holder; readers take no lock.
pub struct FolderLock {
    _file: std::fs::File,
}

impl FolderLock {
    /// Whether a process holds the lock of `dir` now (a shared lock cannot be had), without
    /// writing anything.
    pub fn held(dir: &Path) -> bool {
        let Ok(file) = std::fs::File::open(dir.join(LOCK_FILE)) else {
            return false; // never locked
        };
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    }

    /// Takes the lock of the existing folder `dir`, or says who holds it.
    pub fn take(dir: &Path) -> Result<FolderLock> {
        use std::io::Write;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "holder unknown".to_string(),
                    h => h.to_string(),
                };
                return Err(Error::InUse {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path)(e)),
        }
        let who = format!(
            "pid {} on {}\n",
            std::process::id(),
            crate::cluster::host_name()
        );
        file.set_len(0)
            .and_then(|()| file.write_all(who.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(Error::io(&path))?;
        Ok(FolderLock { _file: file })
    }
}

/// An open results folder, locked against other writers while this value lives.
pub struct RunDir {
    pub path: PathBuf,
    metrics: csv::Writer<std::fs::File>,
    _lock: FolderLock,
}

impl RunDir {
    /// Creates `path` (refusing an existing one unless `force`), and writes the resolved experiment
    /// and the header of the metrics CSV.
    /// With `force`, what the folder held is removed once its lock is taken (a run still writing
    /// it is refused first).
    pub fn create(path: &Path, force: bool, resolved_toml: &str) -> Result<RunDir> {
        let existed = path.exists();
        if existed && !force {
            return Err(Error::ResultsExist(path.to_path_buf()));
        }
        std::fs::create_dir_all(path).map_err(Error::io(path))?;
        let lock = FolderLock::take(path)?;
        if existed {
            for entry in std::fs::read_dir(path).map_err(Error::io(path))? {
                let entry = entry.map_err(Error::io(path))?;
                if entry.file_name() == LOCK_FILE {
                    continue;
                }
                let p = entry.path();
                let removed = match entry.file_type().map_err(Error::io(&p))?.is_dir() {
                    true => std::fs::remove_dir_all(&p),
                    false => std::fs::remove_file(&p),
                };
                removed.map_err(Error::io(&p))?;
            }
        }
        std::fs::create_dir_all(path.join(SAMPLES_DIR)).map_err(Error::io(path))?;
        write_atomic(&path.join(EXPERIMENT_FILE), resolved_toml.as_bytes())?;
        let metrics_path = path.join(METRICS_FILE);
        let metrics = csv::Writer::from_path(&metrics_path)
            .map_err(|e| Error::io(&metrics_path)(e.into()))?;
        Ok(RunDir {
            path: path.to_path_buf(),
            metrics,
            _lock: lock,
        })
    }

    /// Opens an existing results folder to continue a run that finished `epochs_done` epochs:
    /// metrics rows of later epochs (written before a crash, without their checkpoint) are dropped.
    pub fn reopen(path: &Path, epochs_done: usize) -> Result<RunDir> {
        let lock = FolderLock::take(path)?;
        let metrics_path = path.join(METRICS_FILE);
        let rows: Vec<MetricsRow> = read_metrics(path)?
            .into_iter()
            .filter(|r| r.epoch <= epochs_done)
            .collect();
        let mut writer = csv::Writer::from_writer(Vec::new());
        if rows.is_empty() {
            writer
                .write_record(METRICS_COLUMNS)
                .map_err(|e| Error::io(&metrics_path)(e.into()))?;
        }
        for r in &rows {
            writer
                .serialize(r)
                .map_err(|e| Error::io(&metrics_path)(e.into()))?;
        }
        let bytes = writer.into_inner().expect("an in-memory writer flushes");
        write_atomic(&metrics_path, &bytes)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(Error::io(&metrics_path))?;
        let metrics = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(file);
        std::fs::create_dir_all(path.join(SAMPLES_DIR)).map_err(Error::io(path))?;
        Ok(RunDir {
            path: path.to_path_buf(),
            metrics,
            _lock: lock,
        })
    }

    pub fn write_info(&self, info: &RunInfo) -> Result<()> {
        let text = serde_json::to_string_pretty(info).expect("RunInfo serialises");
        write_atomic(&self.path.join(RUN_FILE), format!("{text}\n").as_bytes())
    }

    /// Appends one row and flushes it, so a run that dies keeps every finished epoch.
    pub fn append_metrics(&mut self, row: &MetricsRow) -> Result<()> {
        let path = self.path.join(METRICS_FILE);
        self.metrics
            .serialize(row)
            .map_err(|e| Error::io(&path)(e.into()))?;
        self.metrics.flush().map_err(Error::io(&path))
    }

    /// Redraws `learning-curve.png` from `metrics.csv`.
    pub fn write_curve(&self, title: &str) -> Result<()> {
        let rows = read_metrics(&self.path)?;
        let path = self.path.join(CURVE_FILE);
        plot::learning_curve(title, &rows, &path).map_err(Error::io(&path))
    }

    pub fn sample_path(&self, epoch: usize) -> PathBuf {
        self.path
            .join(SAMPLES_DIR)
            .join(format!("epoch-{epoch:04}.png"))
    }
}

/// Writes `bytes` to `path` whole or not at all ([`crate::atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic::write(path, bytes).map_err(Error::io(path))
}

/// Reads `metrics.csv`.
pub fn read_metrics(dir: &Path) -> Result<Vec<MetricsRow>> {
    let path = dir.join(METRICS_FILE);
    let mut reader = csv::Reader::from_path(&path).map_err(|e| Error::io(&path)(e.into()))?;
    reader
        .deserialize()
        .collect::<Result<Vec<MetricsRow>, _>>()
        .map_err(|e| Error::Checkpoint {
            path: path.clone(),
            message: format!("unreadable metrics: {e}"),
        })
}

/// Reads `run.json`. A run that says "running" while no process holds its folder's lock ended
/// without recording how (killed with SIGKILL, out of memory, its machine lost): it is read as
/// interrupted, with that said in its error, so that no table shows it running for ever.
pub fn read_info(dir: &Path) -> Result<RunInfo> {
    let path = dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
    let mut info: RunInfo = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path,
        message: format!("not a run.json written by pixel: {e}"),
    })?;
    if info.status == Status::Running && !FolderLock::held(dir) {
        info.status = Status::Interrupted;
        info.error.get_or_insert_with(|| {
            "its process ended without recording how (killed?); `pixel run --resume` goes on \
             from its last checkpoint"
                .into()
        });
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run.json left "running" by a process that is gone reads as interrupted; one whose
    /// folder is locked (a live run) reads as running.
    #[test]
    fn a_running_run_whose_lock_is_free_reads_as_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let info = RunInfo {
            name: "x".into(),
            crate_version: "0".into(),
            git_revision: "0".into(),
            backend: "flex".into(),
            backend_choice: String::new(),
            device: "flex:cpu".into(),
            float_dtype: "f32".into(),
            seed: 1,
            parameters: 1,
            started: now(),
            ended: None,
            status: Status::Running,
            epochs_completed: 2,
            error: None,
            overrides: Vec::new(),
            resumed: Vec::new(),
            hardware: String::new(),
            validation_images: 0,
            world_size: 1,
            cuda_graph: None,
            ranks: Vec::new(),
        };
        let json = serde_json::to_string(&info).unwrap();
        std::fs::write(d.join(RUN_FILE), &json).unwrap();
        let read = read_info(d).unwrap();
        assert_eq!(read.status, Status::Interrupted);
        assert!(read.error.unwrap().contains("--resume"));
        let lock = FolderLock::take(d).unwrap();
        assert_eq!(read_info(d).unwrap().status, Status::Running);
        drop(lock);
        assert_eq!(read_info(d).unwrap().status, Status::Interrupted);
        // The file itself is not changed by reading it.
        assert_eq!(std::fs::read_to_string(d.join(RUN_FILE)).unwrap(), json);
    }

    /// The lock is exclusive (two opens of the file conflict even in one process), says who holds
    /// it, and is free again once dropped.
    #[test]
    fn a_folder_lock_has_one_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::take(dir.path()).unwrap();
        let err = FolderLock::take(dir.path()).err().expect("held");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "in use by another pixel (pid {} on ",
                std::process::id()
            )),
            "{text}"
        );
        assert_eq!(err.exit_code(), 2);
        drop(first);
        FolderLock::take(dir.path()).expect("released");
    }

    #[test]
    fn refuses_existing_folder_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run");
        let mut run = RunDir::create(&p, false, "x = 1\n").unwrap();
        run.append_metrics(&MetricsRow {
            epoch: 1,
            train_bits_per_dim: 2.0,
            test_bits_per_dim: 2.5,
            train_seconds: 1.0,
            test_seconds: 0.5,
            train_images_per_second: 10.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 1);
        assert!(matches!(
            RunDir::create(&p, false, ""),
            Err(Error::ResultsExist(_))
        ));
        let row = |epoch| MetricsRow {
            epoch,
            train_bits_per_dim: 1.0,
            test_bits_per_dim: 1.5,
            train_seconds: 1.0,
            test_seconds: 0.5,
            train_images_per_second: 10.0,
            ..Default::default()
        };
        run.append_metrics(&row(2)).unwrap();
        drop(run);
        // Reopening after epoch 1 drops the row of epoch 2 and appends after epoch 1.
        let mut again = RunDir::reopen(&p, 1).unwrap();
        again.append_metrics(&row(2)).unwrap();
        let rows = read_metrics(&p).unwrap();
        assert_eq!(rows.iter().map(|r| r.epoch).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(rows[1].train_bits_per_dim, 1.0);
        assert!(matches!(RunDir::reopen(&p, 0), Err(Error::InUse { .. })));
        drop(again);
        RunDir::reopen(&p, 0).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 0);
        RunDir::create(&p, true, "").unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 0);
    }
}
