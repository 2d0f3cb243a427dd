//! Sweeps: a base experiment and a grid over dotted keys, expanded into runs with deterministic,
//! readable names under `results/<sweep>/`, run one after another or as a Slurm job array.

use super::{self as experiment, Override, Plan};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A sweep file.
#[derive(Deserialize, schemars::JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Free text: what the sweep compares.
    #[serde(default)]
    pub description: String,
    /// The base experiment, relative to the sweep file.
    pub base: PathBuf,
    /// Dotted experiment keys and the values each takes, e.g. `"model.layers" = [5, 9]`.
    /// Runs are the Cartesian product, keys in sorted order.
    pub grid: BTreeMap<String, Vec<serde_json::Value>>,
    /// How `pixel sweep --emit slurm` asks for each run's resources; `--ranks`,
    /// `--gpus-per-rank` and `--sbatch` override it.
    #[serde(default)]
    pub slurm: SlurmFile,
}

/// What each array task of `pixel sweep --emit slurm` asks Slurm for; `--ranks`,
/// `--gpus-per-rank` and `--sbatch` override it.
#[derive(Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlurmFile {
    /// MPI ranks (Slurm tasks) that train each run together. Default: 1.
    pub ranks: Option<usize>,
    /// GPUs for each rank (Slurm's `--gpus-per-task`). Default: none.
    pub gpus_per_rank: Option<usize>,
    /// `srun`'s MPI plugin for runs of several ranks; `$SLURM_MPI_TYPE` at submission overrides
    /// it. Default: "pmix".
    pub mpi: Option<String>,
    /// More `#SBATCH --KEY=VALUE` lines, e.g. `time = "04:00:00"` (without a time limit the
    /// checkpoint-and-requeue signal never comes), `mem = "16G"`, `partition = "gpu"`,
    /// `account = "lab"`, `cpus-per-task = 4`.
    #[serde(default)]
    pub sbatch: BTreeMap<String, SbatchValue>,
}

/// The value of an sbatch option: text or a whole number.
#[derive(Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum SbatchValue {
    Text(String),
    Number(u64),
}

/// One run of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepRun {
    pub index: usize,
    /// Readable and unique: `layers=5_learning_rate=0.001_seed=1`.
    pub name: String,
    pub sets: Vec<Override>,
}

/// An expanded sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub name: String,
    pub file: PathBuf,
    pub base: PathBuf,
    pub runs: Vec<SweepRun>,
    /// The file's `[slurm]` table.
    pub slurm: SlurmFile,
}

/// The JSON Schema of the sweep format, as written to `schemas/sweep.schema.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(SweepFile);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema always serialises");
    text.push('\n');
    text
}

/// Whether a TOML file is a sweep (it has a top-level `base` key) rather than an experiment.
pub fn is_sweep(text: &str) -> bool {
    toml::from_str::<toml::Table>(text)
        .is_ok_and(|t| t.contains_key("base") && t.contains_key("grid"))
}

/// Reads and expands a sweep file, and plans every run (so that a bad key or value fails before
/// anything runs).
pub fn load(path: &Path) -> Result<(Sweep, Vec<Plan>)> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let file: SweepFile = toml::from_str(&text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| experiment::line_column(&text, s.start))
            .unwrap_or((1, 1));
        Error::Parse {
            file: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    let base = path.parent().unwrap_or(Path::new(".")).join(&file.base);
    let sweep = Sweep {
        slurm: file.slurm,
        ..expand(path, base, &file.grid)?
    };
    let plans = sweep
        .runs
        .iter()
        .map(|run| plan(&sweep, run))
        .collect::<Result<Vec<_>>>()?;
    Ok((sweep, plans))
}

/// The plan of one run: the base experiment with the run's values, named after the run.
pub fn plan(sweep: &Sweep, run: &SweepRun) -> Result<Plan> {
    let plan = experiment::plan_file(&sweep.base, &run.sets)?;
    Ok(Plan {
        name: run.name.clone(),
        ..plan
    })
}

/// The Cartesian product of the grid, in sorted key order, the last key varying fastest.
pub fn expand(
    path: &Path,
    base: PathBuf,
    grid: &BTreeMap<String, Vec<serde_json::Value>>,
) -> Result<Sweep> {
    let origin = format!("{} [grid]", path.display());
    let mut axes: Vec<(String, Vec<String>)> = Vec::new();
    for (key, values) in grid {
        if values.is_empty() {
            return Err(Error::Invalid {
                source_name: origin.clone(),
                key: key.clone(),
                value: "[]".into(),
                expected: "a list of at least one value".into(),
            });
        }
        let texts = values
            .iter()
            .map(|v| {
                toml::Value::try_from(v)
                    .map(|t| t.to_string())
                    .map_err(|e| Error::Invalid {
                        source_name: origin.clone(),
                        key: key.clone(),
                        value: v.to_string(),
                        expected: format!("a TOML value ({e})"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        axes.push((key.clone(), texts));
    }
    let short = short_names(axes.iter().map(|(k, _)| k.as_str()));
    let total: usize = axes.iter().map(|(_, v)| v.len()).product();
    let mut runs = Vec::with_capacity(total);
    for index in 0..total {
        let mut rest = index;
        let mut picks = vec![0; axes.len()];
        for (a, (_, values)) in axes.iter().enumerate().rev() {
            picks[a] = rest % values.len();
            rest /= values.len();
        }
        let mut sets = Vec::new();
        let mut parts = Vec::new();
        for (a, (key, values)) in axes.iter().enumerate() {
            let value = &values[picks[a]];
            parts.push(format!("{}={}", short[a], slug(value)));
            sets.push(Override {
                key: key.clone(),
                value: value.clone(),
                origin: origin.clone(),
            });
        }
        let name = if parts.is_empty() {
            "base".into()
        } else {
            parts.join("_")
        };
        if let Some(first) = runs.iter().find(|r: &&SweepRun| r.name == name) {
            let show = |sets: &[Override]| {
                sets.iter()
                    .map(|s| format!("{}={}", s.key, s.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Error::Invalid {
                source_name: origin,
                key: "grid".into(),
                value: format!(
                    "runs {} ({}) and {index} ({})",
                    first.index,
                    show(&first.sets),
                    show(&sets)
                ),
                expected: format!(
                    "values that give every run its own results folder; both are named `{name}` \
                     (a value repeated, or values that differ only in characters a name drops)"
                ),
            });
        }
        runs.push(SweepRun { index, name, sets });
    }
    Ok(Sweep {
        name: experiment::plan::name_of(path),
        file: path.to_path_buf(),
        base,
        runs,
        slurm: SlurmFile::default(),
    })
}

/// The last segment of each dotted key, or the whole key where two last segments clash.
fn short_names<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Vec<String> {
    let last = |k: &'a str| k.rsplit('.').next().unwrap_or(k);
    keys.clone()
        .map(|k| {
            if keys.clone().filter(|o| last(o) == last(k)).count() > 1 {
                k.to_string()
            } else {
                last(k).to_string()
            }
        })
        .collect()
}

/// A value as it appears in a run's name: quotes dropped, odd characters replaced.
fn slug(value: &str) -> String {
    value
        .trim_matches('"')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// What each array task of a Slurm script asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slurm {
    /// MPI ranks (Slurm tasks) that train the task's run together.
    pub ranks: usize,
    /// GPUs for each of them.
    pub gpus_per_rank: Option<usize>,
    /// `srun`'s MPI plugin when there are several ranks.
    pub mpi: String,
    /// More `#SBATCH --KEY="VALUE"` lines (time, memory, partition, account...).
    pub directives: Vec<(String, String)>,
}

impl Default for Slurm {
    fn default() -> Slurm {
        Slurm {
            ranks: 1,
            gpus_per_rank: None,
            mpi: "pmix".into(),
            directives: Vec::new(),
        }
    }
}

/// The flags of `pixel sweep --emit slurm` that override the sweep file's `[slurm]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlurmFlags {
    pub ranks: Option<usize>,
    pub gpus_per_rank: Option<usize>,
    /// `--sbatch KEY=VALUE`, each replacing the file's value of the same key.
    pub sbatch: Vec<String>,
}

impl Sweep {
    /// What each task asks for: the flags over the file's `[slurm]` over the defaults. Every
    /// value is checked, naming the flag or the file and key it came from.
    pub fn slurm(&self, flags: &SlurmFlags) -> Result<Slurm> {
        let file = &self.slurm;
        let origin = format!("{} [slurm]", self.file.display());
        let ranks = match (flags.ranks, file.ranks) {
            (Some(0), _) => {
                return Err(Error::Usage {
                    flag: "--ranks 0".into(),
                    message: "expected at least one rank per run".into(),
                });
            }
            (Some(r), _) => r,
            (None, Some(0)) => {
                return Err(Error::Invalid {
                    source_name: origin,
                    key: "slurm.ranks".into(),
                    value: "0".into(),
                    expected: "at least one rank per run".into(),
                });
            }
            (None, r) => r.unwrap_or(1),
        };
        let mpi = file.mpi.clone().unwrap_or_else(|| "pmix".into());
        if mpi.is_empty() || !mpi.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::Invalid {
                source_name: origin,
                key: "slurm.mpi".into(),
                value: format!("{mpi:?}"),
                expected: "the name of one of srun's MPI plugins (`srun --mpi=list`), e.g. \
                           \"pmix\" or \"pmi2\""
                    .into(),
            });
        }
        let mut directives: Vec<(String, String)> = Vec::new();
        for (key, value) in &file.sbatch {
            let text = match value {
                SbatchValue::Text(t) => t.clone(),
                SbatchValue::Number(n) => n.to_string(),
            };
            let (key, value) =
                sbatch_directive(&format!("{key}={text}")).map_err(|e| Error::Invalid {
                    source_name: origin.clone(),
                    key: format!("slurm.sbatch.{key}"),
                    value: format!("{text:?}"),
                    expected: match e {
                        Error::Usage { message, .. } => message,
                        other => other.to_string(),
                    },
                })?;
            directives.push((key, value));
        }
        for flag in &flags.sbatch {
            let (key, value) = sbatch_directive(flag)?;
            directives.retain(|(k, _)| *k != key);
            directives.push((key, value));
        }
        Ok(Slurm {
            ranks,
            gpus_per_rank: flags.gpus_per_rank.or(file.gpus_per_rank),
            mpi,
            directives,
        })
    }
}

/// `--sbatch KEY=VALUE` as a directive: a key of letters, digits and dashes (an sbatch long
/// option, without its dashes) and a value on one line without double quotes.
pub fn sbatch_directive(s: &str) -> Result<(String, String)> {
    let usage = |message: String| Error::Usage {
        flag: format!("--sbatch {s}"),
        message,
    };
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| usage("expected KEY=VALUE, e.g. time=04:00:00".into()))?;
    let key = key.trim_start_matches('-');
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(usage(format!(
            "`{key}` is not an sbatch option name (letters, digits and dashes, e.g. mem)"
        )));
    }
    if value.is_empty() || value.contains(['"', '\n', '\r']) {
        return Err(usage(
            "expected a value on one line without double quotes".into(),
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// `s` as one bash word: as it is when it holds only characters bash leaves alone, else in single
/// quotes.
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `s` as the value of an `#SBATCH` option: in double quotes, which sbatch strips.
fn sbatch_value(s: &str) -> String {
    format!("\"{s}\"")
}

/// A Slurm job-array script that runs task `$SLURM_ARRAY_TASK_ID` of the sweep, one run per task,
/// on `slurm.ranks` ranks started by `srun` (a binary built with the `mpi` feature) when more
/// than one. Every path in it is absolute, so it can be submitted from anywhere: the sweep file,
/// the results folder and `pixel` (the binary that wrote it, unless `$PIXEL` says otherwise).
pub fn slurm_script(sweep: &Sweep, results_root: &Path, slurm: &Slurm, pixel: &Path) -> String {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (file, results_root) = (absolute(&sweep.file), absolute(results_root));
    let out = results_root.join(&sweep.name);
    let word = |p: &Path| shell_quote(&p.display().to_string());
    // `%` is a file-name pattern in --output: a literal one is doubled.
    let folder = out.display().to_string().replace('%', "%%");
    let output = format!("\"{folder}/slurm-%A_%a.out\"");
    let mut resources = String::new();
    if slurm.ranks > 1 {
        resources += &format!("#SBATCH --ntasks={}\n", slurm.ranks);
    }
    if let Some(g) = slurm.gpus_per_rank {
        resources += &format!("#SBATCH --gpus-per-task={g}\n");
    }
    for (key, value) in &slurm.directives {
        resources += &format!("#SBATCH --{key}={}\n", sbatch_value(value));
    }
    // One rank runs in the batch shell, which gets the time limit's signal (B:) and passes it
    // on. Several run under `srun`: a signal to `srun` makes it kill the step's tasks, so the
    // shell signals the job's steps instead (scancel without --batch), every rank gets it,
    // checkpoints at the same step and exits 130, and so does `srun`.
    let (launch, what, forward) = match slurm.ranks {
        1 => (
            String::new(),
            "one per array task".to_string(),
            "kill -TERM \"$pid\" 2>/dev/null || true",
        ),
        r => (
            format!("srun --mpi=\"${{SLURM_MPI_TYPE:-{}}}\" ", slurm.mpi),
            format!(
                "one per array task, each on {r} MPI ranks (srun with the MPI plugin \
                 $SLURM_MPI_TYPE, {} unless set; PIXEL must be built with --features mpi)",
                slurm.mpi
            ),
            "scancel --signal=TERM \"$SLURM_JOB_ID\" || true",
        ),
    };
    format!(
        "#!/usr/bin/env bash\n\
         # Slurm job array for the sweep {file}: {n} runs, {what} (see runs.txt).\n\
         # Submit from anywhere: sbatch {script}\n\
         # Two minutes before a task's time limit Slurm sends SIGTERM to this script, which\n\
         # passes it to pixel (to every rank: all of them finish the same step); pixel writes a\n\
         # checkpoint and exits with 130, and the task requeues itself; the requeued task\n\
         # resumes the run from that checkpoint. Without a time limit (--sbatch time=...) no\n\
         # signal comes.\n\
         #SBATCH --job-name={name}\n\
         #SBATCH --array=0-{last}\n\
         {resources}\
         #SBATCH --output={output}\n\
         #SBATCH --open-mode=append\n\
         #SBATCH --signal=B:TERM@120\n\
         #SBATCH --requeue\n\
         set -euo pipefail\n\
         cd \"${{SLURM_SUBMIT_DIR:-.}}\"\n\
         PIXEL=${{PIXEL:-{pixel}}}\n\
         {launch}\"$PIXEL\" sweep {file} --results {root} --only \"$SLURM_ARRAY_TASK_ID\" &\n\
         pid=$!\n\
         term=0\n\
         trap 'term=1; {forward}' TERM\n\
         status=0\n\
         wait \"$pid\" || status=$?\n\
         # A trapped signal interrupts `wait`; wait again for pixel's own exit status.\n\
         if [ \"$term\" = 1 ]; then status=0; wait \"$pid\" || status=$?; fi\n\
         if [ \"$status\" = 130 ]; then\n\
         \x20 scontrol requeue \"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\"\n\
         \x20 exit 0\n\
         fi\n\
         exit \"$status\"\n",
        file = word(&file),
        n = sweep.runs.len(),
        script = word(&out.join("slurm.sh")),
        name = sbatch_value(&sweep.name),
        last = sweep.runs.len().saturating_sub(1),
        root = word(&results_root),
        pixel = word(&absolute(pixel)),
    )
}

/// `runs.txt`: the array index, the run name and its values, one run per line.
pub fn run_list(sweep: &Sweep) -> String {
    sweep
        .runs
        .iter()
        .map(|r| {
            let sets: Vec<String> = r
                .sets
                .iter()
                .map(|s| format!("{}={}", s.key, s.value))
                .collect();
            format!("{}\t{}\t{}\n", r.index, r.name, sets.join(" "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<serde_json::Value>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::from_str(v).unwrap()))
            .collect()
    }

    /// Words bash reads back as they were.
    #[test]
    fn shell_quoting_round_trips_through_bash() {
        for s in [
            "plain/path.toml",
            "with space",
            "it's",
            "$HOME",
            "a\"b",
            "",
            "x;rm -rf y",
            "*",
        ] {
            let q = shell_quote(s);
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(format!("printf %s {q}"))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s, "{q}");
        }
        assert_eq!(shell_quote("results/a=1_b=2"), "results/a=1_b=2");
    }

    /// Two runs that would share a results folder (the second would be skipped as "already
    /// completed") are refused before anything runs, naming both.
    #[test]
    fn colliding_run_names_are_refused() {
        for values in [r#"["a/b", "a-b"]"#, "[0.001, 0.001]"] {
            let g = grid(&[("data.path", values), ("train.seed", "[1]")]);
            let err = expand(Path::new("s.toml"), PathBuf::from("b.toml"), &g)
                .unwrap_err()
                .to_string();
            assert!(err.contains("runs 0 (") && err.contains("and 1 ("), "{err}");
            assert!(err.contains("both are named `path="), "{err}");
        }
    }

    #[test]
    fn expands_the_product_with_readable_unique_names() {
        let g = grid(&[
            ("model.layers", "[5, 9]"),
            ("train.learning_rate", "[0.001, 0.0001]"),
            ("train.seed", "[1, 2, 3]"),
        ]);
        let s = expand(Path::new("sweeps/depth.toml"), "base.toml".into(), &g).unwrap();
        assert_eq!(s.name, "depth");
        assert_eq!(s.runs.len(), 12);
        assert_eq!(s.runs[0].name, "layers=5_learning_rate=0.001_seed=1");
        assert_eq!(s.runs[1].name, "layers=5_learning_rate=0.001_seed=2");
        assert_eq!(s.runs[11].name, "layers=9_learning_rate=0.0001_seed=3");
        let mut names: Vec<_> = s.runs.iter().map(|r| r.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12, "names are unique");
        // Deterministic.
        let again = expand(Path::new("sweeps/depth.toml"), "base.toml".into(), &g).unwrap();
        assert_eq!(again.runs, s.runs);
        assert_eq!(s.runs[11].sets[1].value, "0.0001");
    }

    #[test]
    fn clashing_last_segments_keep_the_whole_key() {
        let g = grid(&[
            ("a.x", "[1]"),
            ("b.x", "[2]"),
            ("data.dataset", "[\"cifar10\"]"),
        ]);
        let s = expand(Path::new("s.toml"), "b.toml".into(), &g).unwrap();
        assert_eq!(s.runs[0].name, "a.x=1_b.x=2_dataset=cifar10");
    }

    #[test]
    fn empty_value_list_is_an_error() {
        let g = grid(&[("train.seed", "[]")]);
        let err = expand(Path::new("s.toml"), "b.toml".into(), &g)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.toml [grid]") && err.contains("`train.seed`"),
            "{err}"
        );
    }
}
