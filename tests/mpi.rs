//! Data-parallel runs on two ranks started by `mpirun` on localhost, against one process at the
//! same global batch, on every backend compiled in. Built only with `--features mpi` (which needs
//! Open MPI's `mpirun` on the PATH): `cargo test --release --features tch,mpi --test mpi`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `pixel ARGS` as one process.
fn single(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pixel"));
    c.args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .env_remove("PIXEL_DATA");
    c
}

/// `mpirun -n RANKS pixel ARGS` on this machine (as root too; more ranks than cores allowed).
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &ranks.to_string(),
    ])
    .args(["-x", "RUST_LOG=warn", env!("CARGO_BIN_EXE_pixel")])
    .args(args)
    .current_dir(repo())
    .env_remove("PIXEL_DATA");
    c
}

fn output(mut c: Command) -> Output {
    c.output().expect("the command starts")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(c: Command) -> Output {
    let out = output(c);
    assert!(out.status.success(), "{}", text(&out));
    out
}

/// The backends compiled in, as `--set` pairs.
fn backends() -> Vec<Vec<&'static str>> {
    let mut b = vec![vec!["--set", "runtime.backend=flex"]];
    if cfg!(feature = "tch") {
        b.push(vec![
            "--set",
            "runtime.backend=libtorch",
            "--set",
            "runtime.device=cpu",
        ]);
    }
    b
}

/// metrics.csv without its timing columns and the gradient norm: one row of numbers (empty
/// cells as NaN) per epoch. The norm (a mean over the epoch's steps, not bits per dimension) is
/// compared on its own by [`assert_same_metrics`].
fn metrics(dir: &Path) -> Vec<Vec<f64>> {
    columns(dir, |name| {
        !name.contains("second") && name != "gradient_norm"
    })
}

/// The columns of metrics.csv whose names `keep` keeps.
fn columns(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<Vec<f64>> {
    let body = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = body.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len()).filter(|&i| keep(header[i])).collect();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            keep.iter()
                .map(|&i| cells[i].parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect()
}

/// The two runs' metrics agree within `tolerance` bits per dimension, epoch by epoch, and their
/// mean gradient norms within 1 % (f16 gradients differ by ~0.2 % between batch splits; a lost
/// rank would be off by far more).
fn assert_same_metrics(a: &Path, b: &Path, tolerance: f64) {
    let norms = |d: &Path| columns(d, |name| name == "gradient_norm");
    for (na, nb) in norms(a).iter().zip(norms(b)) {
        assert!(
            (na[0] - nb[0]).abs() <= 1e-2 * na[0],
            "gradient norms {na:?} vs {nb:?}"
        );
    }
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "{} vs {}", a.display(), b.display());
    for (ra, rb) in ma.iter().zip(&mb) {
        for (x, y) in ra.iter().zip(rb) {
            assert!(
                (x.is_nan() && y.is_nan()) || (x - y).abs() <= tolerance,
                "{} vs {}: {ra:?} vs {rb:?}",
                a.display(),
                b.display()
            );
        }
    }
}

fn run_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

/// run.json of a run on `ranks` ranks: their count, and one checksum of the final weights,
/// the same on every rank.
fn assert_same_weights(dir: &Path, ranks: usize) {
    let info = run_json(dir);
    assert_eq!(info["world_size"], ranks, "{info}");
    let sums: Vec<&str> = info["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["weights_checksum"].as_str().unwrap())
        .collect();
    assert_eq!(sums.len(), ranks);
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
}

/// The sub-pixels' float sums differ in order between one process and two ranks: about 1e-7
/// bits/dim after a few hundred steps here. 1e-5 leaves room and still catches a lost image, a
/// wrong scale (a mean of means) or a rank that steps alone.
const SAME: f64 = 1e-5;

/// Every smoke experiment (simple, gated, conditional, PixelVAE with free bits, grey and RGB) on
/// two ranks matches one process, on every backend; the weights stay equal on both ranks.
#[test]
fn two_ranks_train_every_smoke_experiment_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    for (b, backend) in backends().iter().enumerate() {
        for entry in std::fs::read_dir(repo().join("experiments/smoke")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let file = path.to_str().unwrap();
            let results = |ranks: usize| tmp.path().join(format!("{b}-{ranks}"));
            let (one, two) = (results(1), results(2));
            let args = |root: &Path| {
                let mut a = vec!["run".to_string(), file.to_string(), "--results".into()];
                a.push(root.to_str().unwrap().into());
                a.extend(backend.iter().map(|s| s.to_string()));
                a
            };
            let a1 = args(&one);
            let a2 = args(&two);
            ok(single(&a1.iter().map(String::as_str).collect::<Vec<_>>()));
            ok(mpirun(
                2,
                &a2.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
            assert_same_metrics(&one.join(&name), &two.join(&name), SAME);
            assert_same_weights(&two.join(&name), 2);
        }
    }
}

/// Batches whose last one leaves a rank with no image (17 images in batches of 2), and a PixelVAE
/// with free bits whose last batch has one image; f16 with loss scaling and bf16.
#[test]
fn uneven_last_batches_and_low_precision_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        (
            "synthetic-grey",
            &[
                "--set",
                "data.synthetic_images=17",
                "--set",
                "train.batch_size=2",
            ],
        ),
        (
            "vae-mnist-sample-crop",
            &["--set", "data.train_limit=9", "--set", "train.batch_size=4"],
        ),
        ("gated-synthetic-rgb", &["--set", "runtime.precision=f16"]),
        ("synthetic-rgb", &["--set", "runtime.precision=bf16"]),
    ];
    for (i, (name, sets)) in cases.iter().enumerate() {
        let file = format!("experiments/smoke/{name}.toml");
        let root = |ranks: usize| tmp.path().join(format!("{i}-{ranks}"));
        let args = |r: &Path| {
            let mut a = vec!["run", &file, "--results", r.to_str().unwrap()];
            a.extend_from_slice(sets);
            a.extend_from_slice(&["--set", "runtime.backend=flex"]);
            a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        let (one, two) = (root(1), root(2));
        let (a1, a2) = (args(&one), args(&two));
        ok(single(&a1.iter().map(String::as_str).collect::<Vec<_>>()));
        ok(mpirun(
            2,
            &a2.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        assert_same_metrics(&one.join(name), &two.join(name), SAME);
        assert_same_weights(&two.join(name), 2);
    }
}

/// The pids of the `pixel` processes that `mpirun` started, by rank.
fn ranks_of(launcher: &Child) -> Vec<(usize, u32)> {
    let out = Command::new("pgrep")
        .args(["-P", &launcher.id().to_string()])
        .output()
        .unwrap();
    let mut found = Vec::new();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        for var in env.split(|&b| b == 0) {
            if let Some(rank) = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                let rank = String::from_utf8_lossy(rank).parse().unwrap();
                found.push((rank, pid.parse().unwrap()));
            }
        }
    }
    found.sort();
    found
}

/// Starts `command` and, once `metrics` has an epoch's row, sends `signal` to the process that
/// `pick` chooses among the ranks (the launcher itself for one process). Returns how it ended.
fn signal_after_an_epoch(
    mut command: Command,
    metrics: &Path,
    signal: &str,
    pick: Option<usize>,
) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let rows = std::fs::read_to_string(metrics).map_or(0, |m| m.lines().count());
        if rows >= 2 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no epoch in 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = match pick {
        None => child.id(),
        Some(rank) => {
            let ranks = ranks_of(&child);
            ranks.iter().find(|(r, _)| *r == rank).unwrap().1
        }
    };
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // A hang would stop the test here: every rank must end within a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the job did not end after {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A run of a few seconds in a release build, so that a signal sent after its first epoch (which
/// `mpirun` takes about half a second to pass on) lands in the middle.
const LONG: [&str; 6] = [
    "--set",
    "train.epochs=6",
    "--set",
    "data.synthetic_images=4096",
    "--set",
    "train.batch_size=8",
];

/// SIGTERM to one rank stops both at the same step with one checkpoint; resumed on one process
/// the run ends exactly like a run never stopped. The reverse too: a one-process checkpoint
/// resumed on two ranks. On every backend.
#[test]
fn sigterm_to_one_rank_checkpoints_and_resumes_on_another_rank_count() {
    let tmp = tempfile::tempdir().unwrap();
    for (b, backend) in backends().iter().enumerate() {
        let root = |what: &str| tmp.path().join(format!("{b}-{what}"));
        let args = |r: &Path| {
            let mut a = vec![
                "run".to_string(),
                "experiments/smoke/synthetic-grey.toml".into(),
                "--results".into(),
                r.to_str().unwrap().into(),
            ];
            a.extend(LONG.iter().chain(backend.iter()).map(|s| s.to_string()));
            a
        };
        let strs = |a: &[String]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let reference = root("straight");
        let a = strs(&args(&reference));
        ok(single(&a.iter().map(String::as_str).collect::<Vec<_>>()));
        let reference = reference.join("synthetic-grey");

        // Two ranks, SIGTERM to rank 1, resumed on one process.
        let two = root("two-then-one");
        let a = strs(&args(&two));
        let run = two.join("synthetic-grey");
        let out = signal_after_an_epoch(
            mpirun(2, &a.iter().map(String::as_str).collect::<Vec<_>>()),
            &run.join("metrics.csv"),
            "-TERM",
            Some(1),
        );
        assert_eq!(out.status.code(), Some(130), "{}", text(&out));
        let info = run_json(&run);
        assert_eq!(info["status"], "interrupted", "{info}");
        let checkpoints = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
        assert!(checkpoints >= 1, "the interrupt's checkpoint");
        assert!(metrics(&run).len() < 6, "stopped before the end");
        ok(single(&["run", "--resume", run.to_str().unwrap()]));
        assert_same_metrics(&reference, &run, SAME);
        assert_eq!(run_json(&run)["world_size"], 1);

        // One process, SIGTERM, resumed on two ranks.
        let one = root("one-then-two");
        let a = strs(&args(&one));
        let run = one.join("synthetic-grey");
        let out = signal_after_an_epoch(
            single(&a.iter().map(String::as_str).collect::<Vec<_>>()),
            &run.join("metrics.csv"),
            "-TERM",
            None,
        );
        assert_eq!(out.status.code(), Some(130), "{}", text(&out));
        ok(mpirun(2, &["run", "--resume", run.to_str().unwrap()]));
        assert_same_metrics(&reference, &run, SAME);
        assert_same_weights(&run, 2);
    }
}

/// SIGTERM to `mpirun` itself (what Ctrl-C at its terminal or Slurm's time limit do): it passes
/// the signal to every rank, and the run stops with a checkpoint.
#[test]
fn sigterm_to_the_launcher_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("r");
    let mut a = vec![
        "run",
        "experiments/smoke/synthetic-grey.toml",
        "--results",
        root.to_str().unwrap(),
    ];
    a.extend_from_slice(&LONG);
    let run = root.join("synthetic-grey");
    let out = signal_after_an_epoch(mpirun(2, &a), &run.join("metrics.csv"), "-TERM", None);
    assert!(!out.status.success());
    assert_eq!(run_json(&run)["status"], "interrupted", "{}", text(&out));
    assert!(text(&out).contains("checkpoint written"), "{}", text(&out));
}

/// A rank killed outright takes the job down (mpirun ends the others) instead of a hang; the
/// results folder keeps the epochs it finished.
#[test]
fn a_rank_that_dies_ends_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("r");
    let mut a = vec![
        "run",
        "experiments/smoke/synthetic-grey.toml",
        "--results",
        root.to_str().unwrap(),
    ];
    a.extend_from_slice(&LONG);
    let run = root.join("synthetic-grey");
    let out = signal_after_an_epoch(mpirun(2, &a), &run.join("metrics.csv"), "-KILL", Some(1));
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("signal 9") || said.contains("Killed"),
        "{said}"
    );
    assert!(!metrics(&run).is_empty());
}

/// A global batch that does not split over the ranks is refused before anything is written.
#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("r");
    let out = output(mpirun(
        2,
        &[
            "run",
            "experiments/smoke/synthetic-grey.toml",
            "--results",
            root.to_str().unwrap(),
            "--set",
            "train.batch_size=33",
        ],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("`train.batch_size` = 33") && said.contains("the 2 ranks"),
        "{said}"
    );
    assert!(!root.exists(), "nothing written");
}

/// `pixel bench` on two ranks reports them, the share of a step spent in the all-reduce and
/// each rank's peak memory.
#[test]
fn bench_on_two_ranks_reports_the_collective_share() {
    let out = ok(mpirun(
        2,
        &[
            "bench",
            "experiments/smoke/gated-synthetic-grey.toml",
            "--steps",
            "3",
            "--no-grid",
            "--set",
            "runtime.backend=flex",
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout.lines().find(|l| l.starts_with('{')).unwrap();
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(report["ranks"], 2);
    let share = report["collective_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{report}");
    assert_eq!(report["peak_rss_mib_per_rank"].as_array().unwrap().len(), 2);
    assert!(
        report.get("step_phases_ms").is_none(),
        "phases interleave with the all-reduce on several ranks: {report}"
    );
    assert_eq!(
        stdout.matches("| gated-synthetic-grey").count(),
        1,
        "rank 0 prints"
    );
}

/// An error that only one rank sees ends every rank with an exit code and that rank's message,
/// never a hang: an experiment that differs between ranks (an environment variable set on one
/// rank only), and a value that one rank alone rejects.
#[test]
fn an_error_on_one_rank_ends_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (env, said)) in [
        (
            "PIXEL_TRAIN__EPOCHS=3",
            "every rank must train the same experiment",
        ),
        ("PIXEL_TRAIN__BATCH_SIZE=0", "`train.batch_size` = 0"),
    ]
    .iter()
    .enumerate()
    {
        let root = tmp.path().join(i.to_string());
        let script = format!(
            "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then export {env}; fi; exec \"$0\" run \
             experiments/smoke/synthetic-grey.toml --results {}",
            root.display()
        );
        let mut c = Command::new("timeout");
        c.args([
            "120",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            "2",
        ])
        .args([
            "-x",
            "RUST_LOG=warn",
            "sh",
            "-c",
            &script,
            env!("CARGO_BIN_EXE_pixel"),
        ])
        .current_dir(repo())
        .env_remove("PIXEL_DATA");
        let out = output(c);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(said), "{}", text(&out));
        assert!(!root.exists(), "nothing written");
    }
}
