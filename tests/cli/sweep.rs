//! `pixel sweep`: local runs and summaries, Slurm scripts and their signals, launchers of several
//! ranks.

use super::*;

fn sweep_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.toml"),
        TINY.replace("every = 1", "every = 0"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("sw.toml"),
        "base = \"base.toml\"\n[grid]\n\"model.layers\" = [1, 2]\n\"train.seed\" = [1, 2]\n",
    )
    .unwrap();
    dir
}

#[test]
fn sweep_runs_skips_finished_runs_and_summarises() {
    let dir = sweep_dir();
    let d = dir.path();
    let plan = pixel(d, &["sweep", "sw.toml", "--dry-run"]);
    assert!(plan.status.success(), "{}", text(&plan));
    assert!(text(&plan).contains("4 runs"), "{}", text(&plan));
    assert!(
        text(&plan).contains("3\tlayers=2_seed=2\tmodel.layers=2 train.seed=2"),
        "{}",
        text(&plan)
    );
    assert!(!d.join("results").exists(), "a dry run writes nothing");

    let out = pixel(d, &["sweep", "sw.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    for run in [
        "layers=1_seed=1",
        "layers=1_seed=2",
        "layers=2_seed=1",
        "layers=2_seed=2",
    ] {
        let info =
            std::fs::read_to_string(d.join("results/sw").join(run).join("run.json")).unwrap();
        assert!(info.contains("\"status\": \"completed\""), "{run}: {info}");
    }
    let resolved =
        std::fs::read_to_string(d.join("results/sw/layers=2_seed=1/experiment.toml")).unwrap();
    assert!(
        resolved.contains("layers = 2") && resolved.contains("seed = 1"),
        "{resolved}"
    );
    let md = std::fs::read_to_string(d.join("results/sw/summary.md")).unwrap();
    assert!(md.contains("| layers=1_seed=2 | completed | 2 |"), "{md}");
    assert!(md.contains("| layers=2 | 2 |"), "seed spread: {md}");
    assert_eq!(png_size(&d.join("results/sw/test-curves.png")).0, 800);
    let csv = std::fs::read_to_string(d.join("results/sw/summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with(
        "run,status,epochs,final_test_bits_per_dim,best_epoch,best_validation_bits_per_dim,\
         test_bits_per_dim_at_best"
    ));

    // Again: everything is skipped, nothing changes.
    let before = std::fs::read(d.join("results/sw/layers=1_seed=1/metrics.csv")).unwrap();
    let again = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["sweep", "sw.toml"])
        .current_dir(d)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        text(&again).matches("already completed").count(),
        4,
        "{}",
        text(&again)
    );
    assert_eq!(
        before,
        std::fs::read(d.join("results/sw/layers=1_seed=1/metrics.csv")).unwrap()
    );
}

/// `--ranks R --gpus-per-rank G`: every array task asks Slurm for R tasks with G GPUs each and
/// starts its run on them with srun.
#[test]
fn sweep_emits_slurm_tasks_of_several_ranks() {
    let dir = sweep_dir();
    let d = dir.path();
    let out = pixel(
        d,
        &[
            "sweep",
            "sw.toml",
            "--emit",
            "slurm",
            "--ranks",
            "4",
            "--gpus-per-rank",
            "1",
            "--sbatch",
            "time=04:00:00",
            "--sbatch=--partition=gpu a100",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let script = d.join("results/sw/slurm.sh");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --ntasks=4\n"), "{body}");
    assert!(body.contains("#SBATCH --time=\"04:00:00\"\n"), "{body}");
    assert!(
        body.contains("#SBATCH --partition=\"gpu a100\"\n"),
        "{body}"
    );
    for bad in ["time", "=4", "mem=\"16G\"", "my option=1"] {
        let out = pixel(d, &["sweep", "sw.toml", "--emit", "slurm", "--sbatch", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(
            text(&out).contains(&format!("--sbatch {bad}")),
            "{}",
            text(&out)
        );
    }
    assert!(body.contains("#SBATCH --gpus-per-task=1\n"), "{body}");
    let expected = format!(
        "srun --mpi=\"${{SLURM_MPI_TYPE:-pmix}}\" \"$PIXEL\" sweep {} --results {} --only",
        d.join("sw.toml").display(),
        d.join("results").display()
    );
    assert!(body.contains(&expected), "{expected} in {body}");
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{}", text(&syntax));
    let out = pixel(d, &["sweep", "sw.toml", "--emit", "slurm", "--ranks", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--ranks 0"), "{}", text(&out));
}

/// The sweep file's `[slurm]` table sets what each task asks for; the flags override it, an
/// `--sbatch` key replacing the file's; bad values name the file and key.
#[test]
fn sweep_file_slurm_settings_and_their_overrides() {
    let dir = sweep_dir();
    let d = dir.path();
    let sweep = std::fs::read_to_string(d.join("sw.toml")).unwrap();
    let with = |slurm: &str| std::fs::write(d.join("sw.toml"), format!("{sweep}{slurm}")).unwrap();
    with(
        "[slurm]\nranks = 2\nmpi = \"pmi2\"\n[slurm.sbatch]\ntime = \"01:00:00\"\n\
         cpus-per-task = 4\nmem = \"8G\"\n",
    );
    let script = d.join("results/sw/slurm.sh");
    let out = pixel(d, &["sweep", "sw.toml", "--emit", "slurm"]);
    assert!(out.status.success(), "{}", text(&out));
    let body = std::fs::read_to_string(&script).unwrap();
    for line in [
        "#SBATCH --ntasks=2\n",
        "#SBATCH --time=\"01:00:00\"\n",
        "#SBATCH --cpus-per-task=\"4\"\n",
        "#SBATCH --mem=\"8G\"\n",
        "srun --mpi=\"${SLURM_MPI_TYPE:-pmi2}\" ",
        // Several ranks: the shell signals the job's steps, not srun (which would kill them).
        "trap 'term=1; scancel --signal=TERM \"$SLURM_JOB_ID\" || true' TERM\n",
    ] {
        assert!(body.contains(line), "{line} in {body}");
    }
    let out = pixel(
        d,
        &[
            "sweep",
            "sw.toml",
            "--emit",
            "slurm",
            "--ranks",
            "1",
            "--sbatch",
            "time=02:00:00",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(
        !body.contains("--ntasks") && !body.contains("srun"),
        "{body}"
    );
    assert!(body.contains("trap 'term=1; kill -TERM \"$pid\" 2>/dev/null || true' TERM"));
    assert_eq!(body.matches("--time=").count(), 1, "{body}");
    assert!(body.contains("#SBATCH --time=\"02:00:00\"\n") && body.contains("--mem=\"8G\""));

    for (slurm, said) in [
        ("[slurm]\nranks = 0\n", "`slurm.ranks` = 0"),
        ("[slurm]\nmpi = \"pm ix\"\n", "`slurm.mpi`"),
        (
            "[slurm.sbatch]\n\"my option\" = \"1\"\n",
            "`slurm.sbatch.my option`",
        ),
        ("[slurm.sbatch]\nmem = \"8\\\"G\"\n", "`slurm.sbatch.mem`"),
        ("[slurm]\nnodes = 2\n", "unknown field `nodes`"),
    ] {
        with(slurm);
        let out = pixel(d, &["sweep", "sw.toml", "--emit", "slurm"]);
        assert_eq!(out.status.code(), Some(2), "{slurm}: {}", text(&out));
        assert!(text(&out).contains(said), "{slurm}: {}", text(&out));
        assert!(text(&out).contains("sw.toml"), "{slurm}: {}", text(&out));
    }
}

/// A binary without the `mpi` feature that a launcher started as one of several ranks stops
/// before anything is written (each copy would train the whole run into one folder).
#[cfg(not(feature = "mpi"))]
#[test]
fn several_ranks_without_the_mpi_feature_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY).unwrap();
    for (rank, size) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
            .args(["run", "tiny.toml"])
            .current_dir(dir.path())
            .env(rank, "1")
            .env(size, "2")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let said = text(&out);
        assert!(
            said.contains("rank 1 of 2") && said.contains("--features mpi"),
            "{said}"
        );
        assert!(!dir.path().join("results").exists());
    }
    // One rank of one is a plain run.
    let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "tiny.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Commands that run in one process refuse a launcher of several ranks.
#[test]
fn eval_under_a_launcher_of_several_ranks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["eval", "results/none"])
        .current_dir(dir.path())
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("start this command as a single process"),
        "{}",
        text(&out)
    );
}

#[test]
fn sweep_emits_a_slurm_array_and_runs_one_task() {
    let dir = sweep_dir();
    let d = dir.path();
    let out = pixel(d, &["sweep", "sw.toml", "--emit", "slurm"]);
    assert!(out.status.success(), "{}", text(&out));
    let script = d.join("results/sw/slurm.sh");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --array=0-3"), "{body}");
    assert!(body.contains("--only \"$SLURM_ARRAY_TASK_ID\""), "{body}");
    assert!(
        !body.contains("srun") && !body.contains("--ntasks"),
        "{body}"
    );
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{}", text(&syntax));
    let runs = std::fs::read_to_string(d.join("results/sw/runs.txt")).unwrap();
    assert_eq!(runs.lines().count(), 4);
    let task2 = runs
        .lines()
        .nth(2)
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string();

    // What array task 2 runs: exactly the third run.
    let out = pixel(d, &["sweep", "sw.toml", "--only", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let done: Vec<String> = std::fs::read_dir(d.join("results/sw"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(done, vec![task2]);
    let out = pixel(d, &["sweep", "sw.toml", "--only", "4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--only 4"), "{}", text(&out));
}

/// An emitted script runs as submitted from anywhere, with paths holding spaces and quotes: the
/// sweep file, the results folder and the binary are absolute and quoted.
#[test]
fn an_emitted_slurm_script_runs_from_anywhere_with_awkward_paths() {
    let dir = sweep_dir();
    let d = dir.path().join("my sweeps");
    std::fs::create_dir(&d).unwrap();
    for f in ["base.toml", "sw.toml"] {
        std::fs::rename(dir.path().join(f), d.join(f)).unwrap();
    }
    let out = pixel(
        &d,
        &[
            "sweep",
            "sw.toml",
            "--emit",
            "slurm",
            "--results",
            "it's results",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let script = d.join("it's results/sw/slurm.sh");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(
        body.contains(&format!(
            "#SBATCH --output=\"{}/slurm-%A_%a.out\"",
            d.join("it's results/sw").display()
        )),
        "{body}"
    );
    // The running binary as the OS names it (a target folder reached through a link resolves).
    let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_pixel")).unwrap();
    assert!(
        body.contains(&format!("PIXEL=${{PIXEL:-{}}}", binary.display())),
        "{body}"
    );
    // Not from the submit folder, and without $PIXEL: what a user's `sbatch` from $HOME does.
    let elsewhere = tempfile::tempdir().unwrap();
    let task = Command::new("bash")
        .arg(&script)
        .current_dir(elsewhere.path())
        .env_remove("PIXEL")
        .env_remove("SLURM_SUBMIT_DIR")
        .env("SLURM_ARRAY_JOB_ID", "5")
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(task.status.success(), "{}", text(&task));
    let done: Vec<String> = std::fs::read_dir(d.join("it's results/sw"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(
        d.join("it's results/sw")
            .join(&done[0])
            .join("metrics.csv")
            .is_file()
    );
}

/// What Slurm does near a task's time limit (`--signal=B:TERM@120`): SIGTERM to the batch script.
/// The script passes it on, pixel checkpoints and exits with 130, and the task requeues itself
/// (here a stand-in `scontrol` records the call); the requeued task resumes the run.
#[test]
fn slurm_task_checkpoints_and_requeues_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.toml"), TINY).unwrap();
    std::fs::write(
        d.join("long.toml"),
        "base = \"base.toml\"\n[grid]\n\"train.epochs\" = [100000]\n",
    )
    .unwrap();
    let out = pixel(d, &["sweep", "long.toml", "--emit", "slurm"]);
    assert!(out.status.success(), "{}", text(&out));
    let script = d.join("results/long/slurm.sh");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --signal=B:TERM@120"), "{body}");
    assert!(body.contains("#SBATCH --requeue"), "{body}");
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(
        bin.join("scontrol"),
        "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/../requeued\"\n",
    )
    .unwrap();
    Command::new("chmod")
        .args(["+x", "bin/scontrol"])
        .current_dir(d)
        .status()
        .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let child = Command::new("bash")
        .arg(&script)
        .current_dir(d)
        .env("PATH", path)
        .env("PIXEL", env!("CARGO_BIN_EXE_pixel"))
        .env("SLURM_ARRAY_JOB_ID", "77")
        .env("SLURM_ARRAY_TASK_ID", "0")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = d.join("results/long/epochs=100000");
    wait_for(
        &run.join("checkpoints"),
        60,
        "the task never finished an epoch",
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "requeued, not failed: {}",
        text(&out)
    );
    let requeued = std::fs::read_to_string(d.join("requeued")).unwrap();
    assert_eq!(requeued.trim(), "requeue 77_0");
    let info = std::fs::read_to_string(run.join("run.json")).unwrap();
    assert!(info.contains("\"status\": \"interrupted\""), "{info}");
}

#[test]
fn sweep_with_an_unknown_key_fails_before_running() {
    let dir = sweep_dir();
    let d = dir.path();
    std::fs::write(
        d.join("bad.toml"),
        "base = \"base.toml\"\n[grid]\n\"model.layer\" = [1, 2]\n",
    )
    .unwrap();
    let out = pixel(d, &["sweep", "bad.toml"]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("bad.toml [grid]") && msg.contains("did you mean `layers`"),
        "{msg}"
    );
    assert!(!d.join("results").exists());
    std::fs::write(d.join("bad2.toml"), "base = \"base.toml\"\ngird = {}\n").unwrap();
    let out = pixel(d, &["sweep", "bad2.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("bad2.toml:2:"), "{}", text(&out));
}
