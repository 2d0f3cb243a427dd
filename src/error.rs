//! The error vocabulary. Every variant carries what it is about (file, key or flag, value) so that
//! the message printed once at the top tells the user exactly what to change.

use std::path::PathBuf;

/// Errors caught before a run starts (exit code 2) and errors of a run that started (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The experiment file is not valid TOML, or a value has the wrong type or an unknown key.
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A key has a value that parses but is not allowed.
    #[error("{source_name}: `{key}` = {value}: expected {expected}")]
    Invalid {
        /// The file, environment variable or flag the value came from.
        source_name: String,
        key: String,
        value: String,
        expected: String,
    },
    /// A value from the environment or `--set` that does not fit the format.
    #[error("{source_name}: `{key}` = {value}: {message}")]
    Rejected {
        source_name: String,
        key: String,
        value: String,
        message: String,
    },
    /// A command-line flag is malformed or conflicts with another.
    #[error("{flag}: {message}")]
    Usage { flag: String, message: String },
    /// A dataset is missing, truncated or malformed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The results folder exists and `--force` was not given.
    #[error(
        "{0}: results folder already exists; pass --force to replace it, or choose another experiment name"
    )]
    ResultsExist(PathBuf),
    /// Another `pixel` holds the results folder's lock.
    #[error(
        "{dir}: in use by another pixel ({holder}); wait for it to end or stop it, then try again \
         (readers such as `pixel sample` and `pixel figures` work on a live run)"
    )]
    InUse { dir: PathBuf, holder: String },
    /// A checkpoint or results folder does not match what was asked of it.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// The results folder holds a run that did not finish.
    #[error(
        "{dir}: holds an unfinished run ({status}, {epochs_done} of {epochs} epochs done); continue it \
         with `pixel run --resume {dir}`, or pass --force to start over"
    )]
    Unfinished {
        dir: PathBuf,
        status: String,
        epochs_done: usize,
        epochs: usize,
    },
    /// Ctrl-C or SIGTERM stopped the run after a checkpoint.
    #[error("interrupted: checkpoint written; continue with `pixel run --resume {0}`")]
    Interrupted(PathBuf),
    /// Something failed while the run was going (the results folder says how far it got).
    #[error("run failed: {0}")]
    Run(String),
    /// Another rank of a data-parallel run failed; it printed why.
    #[error("rank {rank} failed (its message says why); this rank stops with it")]
    Peer { rank: usize, code: i32 },
}

impl Error {
    /// 2 for anything caught before a run starts, 1 for a run that failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Run(_) => 1,
            Error::Interrupted(_) => 130,
            Error::Peer { code, .. } => *code,
            _ => 2,
        }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |error| Error::Io { path, error }
    }
}

/// Prints `e` and the chain of its causes to stderr, each line after `prefix`.
pub fn report(e: &Error, prefix: &str) {
    eprintln!("{prefix}error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        eprintln!("{prefix}  caused by: {cause}");
        source = cause.source();
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
