//! One integration binary: drives the real `pixel` CLI in temporary folders, and checks the files
//! that users see (schema, experiments, bundled data).

use pixel_models::data::mnist;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pixel(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("PIXEL_DATA")
        .output()
        .expect("pixel runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const TINY: &str = r#"
[model]
layers = 2
kernel = 3
channels = 4
[data]
dataset = "synthetic"
synthetic_size = 6
synthetic_images = 40
[train]
epochs = 2
batch_size = 16
[sample]
every = 1
grid = 4
"#;

fn png_size(path: &Path) -> (u32, u32, png::ColorType) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    (info.width, info.height, info.color_type)
}

#[test]
fn run_writes_every_result_file_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY).unwrap();
    let out = pixel(dir.path(), &["run", "tiny.toml", "--set", "train.seed=3"]);
    assert!(out.status.success(), "{}", text(&out));

    let res = dir.path().join("results/tiny");
    for f in [
        "experiment.toml",
        "run.json",
        "metrics.csv",
        "learning-curve.png",
    ] {
        assert!(res.join(f).is_file(), "missing {f}");
    }
    // One TensorBoard event file of TFRecords: each record's length, checksummed, and its data,
    // end to end (CI reads it with TensorBoard's own loader).
    let events: Vec<_> = std::fs::read_dir(res.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].to_string_lossy().contains("tfevents"));
    let bytes = std::fs::read(&events[0]).unwrap();
    let (mut at, mut records) = (0, 0);
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 12 + len + 4;
        records += 1;
    }
    assert_eq!(at, bytes.len(), "records tile the file");
    // Version, experiment text, 4 scalars per step after the first (2 epochs of 2 steps: 3 per
    // step at least), the epoch scalars and grids.
    assert!(records > 20, "{records} records");

    // One checkpoint per epoch, the newest two kept.
    let ckpts: Vec<_> = std::fs::read_dir(res.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(ckpts.len(), 2);
    for f in ["model.bpk", "optimizer.bpk", "state.json"] {
        assert!(
            res.join("checkpoints/0002-000000").join(f).is_file(),
            "missing {f}"
        );
    }
    // The resolved experiment records the override and reproduces the run.
    let resolved = std::fs::read_to_string(res.join("experiment.toml")).unwrap();
    assert!(resolved.contains("seed = 3"), "{resolved}");
    assert!(
        resolved.contains("override: train.seed = 3 (from --set)"),
        "{resolved}"
    );
    assert!(
        resolved.contains("eval_batch_size = 256"),
        "defaults are written out"
    );

    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "completed");
    assert_eq!(info["epochs_completed"], 2);
    assert_eq!(info["backend"], "flex");
    assert_eq!(info["float_dtype"], "f32");
    assert!(info["ended"].is_string());

    let csv = std::fs::read_to_string(res.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "epoch,train_bits_per_dim,test_bits_per_dim,train_seconds,test_seconds,\
         train_images_per_second,train_recon_bits_per_dim,train_kl_bits_per_dim,\
         test_recon_bits_per_dim,test_kl_bits_per_dim,kl_weight,validation_bits_per_dim,\
         learning_rate,gradient_norm,skipped_steps"
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| {
            let fields: Vec<&str> = l.split(',').collect();
            // The PixelVAE columns stay empty for a PixelCNN, validation without a split.
            assert_eq!(fields[6..12], ["", "", "", "", "", ""], "{l}");
            // The learning rate in force (constant here) and the mean gradient norm.
            assert_eq!(fields[12], "0.001", "{l}");
            assert!(fields[13].parse::<f64>().unwrap() > 0.0, "{l}");
            // Skipped steps are counted in f16 only.
            assert_eq!(fields[14], "", "{l}");
            fields[..6].iter().map(|v| v.parse().unwrap()).collect()
        })
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert!(
            r[1] > 0.0 && r[1] < 9.0 && r[2] > 0.0 && r[2] < 9.0,
            "{r:?}"
        );
    }

    // A 4x4 grid of 6x6 grey images with 2-pixel padding.
    for epoch in ["epoch-0001.png", "epoch-0002.png"] {
        let (w, h, colour) = png_size(&res.join("samples").join(epoch));
        assert_eq!(
            (w, h, colour),
            (4 * 8 + 2, 4 * 8 + 2, png::ColorType::Grayscale)
        );
    }

    let again = pixel(dir.path(), &["run", "tiny.toml"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("--force"), "{}", text(&again));

    // The checkpoint loads again.
    let sampled = pixel(
        dir.path(),
        &[
            "sample",
            "results/tiny",
            "--out",
            "again.png",
            "--temperature",
            "0.5",
        ],
    );
    assert!(sampled.status.success(), "{}", text(&sampled));
    assert_eq!(png_size(&dir.path().join("again.png")).0, 34);

    let forced = pixel(
        dir.path(),
        &["run", "tiny.toml", "--force", "--set", "train.epochs=1"],
    );
    assert!(forced.status.success(), "{}", text(&forced));
    let csv = std::fs::read_to_string(res.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2);
}

#[test]
fn same_seed_same_metrics_colour_images() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = TINY
        .replace(
            "synthetic_size = 6",
            "synthetic_size = 5\nsynthetic_colours = 3",
        )
        .replace("channels = 4", "channels = 6")
        .replace("every = 1", "every = 0");
    std::fs::write(dir.path().join("a.toml"), &rgb).unwrap();
    std::fs::write(dir.path().join("b.toml"), &rgb).unwrap();
    for name in ["a.toml", "b.toml"] {
        let out = pixel(dir.path(), &["run", name]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let metrics = |n: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join("results").join(n).join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(metrics("a"), metrics("b"));
    let grid = |n: &str| {
        std::fs::read(
            dir.path()
                .join(format!("results/{n}/samples/epoch-0002.png")),
        )
        .unwrap()
    };
    assert_eq!(grid("a"), grid("b"));
    let (w, _, colour) = png_size(&dir.path().join("results/a/samples/epoch-0002.png"));
    assert_eq!((w, colour), (4 * 7 + 2, png::ColorType::Rgb));
}

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown.toml",
            "[model]\nlayrs = 3\n",
            &["unknown.toml:2:1", "did you mean `layers`"],
        ),
        (
            "type.toml",
            "[train]\nepochs = \"many\"\n",
            &["type.toml:2:", "`train.epochs`"],
        ),
        ("syntax.toml", "[model\n", &["syntax.toml:1:"]),
        (
            "even.toml",
            "[model]\nkernel = 4\n[data]\ndataset = \"synthetic\"\n",
            &["`model.kernel` = 4", "odd"],
        ),
        (
            "channels.toml",
            "[model]\nchannels = 10\n[data]\ndataset = \"synthetic\"\nsynthetic_colours = 3\n",
            &["`model.channels` = 10", "multiple of 3"],
        ),
        (
            "nodata.toml",
            "[data]\ndataset = \"mnist\"\npath = \"nowhere\"\ndownload = false\n",
            &[
                "dataset `mnist` not found",
                "nowhere",
                "t10k-labels-idx1-ubyte",
            ],
        ),
        (
            "variant.toml",
            "[model]\nvariant = \"pixelsnail\"\n",
            &["variant.toml:2:", "`model.variant`", "simple"],
        ),
    ];
    for (name, body, expected) in cases {
        std::fs::write(dir.path().join(name), body).unwrap();
        let out = pixel(dir.path(), &["run", name]);
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {msg}");
        for e in *expected {
            assert!(msg.contains(e), "{name}: expected {e:?} in {msg}");
        }
        assert!(
            msg.lines().count() < 25,
            "{name}: one screen at most: {msg}"
        );
    }
    let out = pixel(dir.path(), &["run", "even.toml", "--set", "train.epochs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("KEY=VALUE"));
    let out = pixel(dir.path(), &["run", "missing.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("missing.toml"));
    assert!(
        !dir.path().join("results").exists(),
        "nothing written for bad input"
    );
}

#[test]
fn environment_overrides_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("env.toml"), TINY).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "env.toml"])
        .current_dir(dir.path())
        .env("PIXEL_TRAIN__EPOCHS", "1")
        .env("PIXEL_DATA", "/nonexistent") // the data folder, not an override
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let resolved = std::fs::read_to_string(dir.path().join("results/env/experiment.toml")).unwrap();
    assert!(resolved.contains("epochs = 1"), "{resolved}");
    assert!(resolved.contains("from PIXEL_TRAIN__EPOCHS"), "{resolved}");
}

#[test]
fn schema_file_is_fresh() {
    let path = repo().join("schemas/experiment.schema.json");
    let current = pixel_models::experiment::schema_json();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == current,
        "schemas/experiment.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test cli schema` \
         or `pixel schema > schemas/experiment.schema.json`"
    );
}

#[test]
fn sweep_schema_file_is_fresh() {
    let path = repo().join("schemas/sweep.schema.json");
    let current = pixel_models::experiment::sweep::schema_json();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    assert!(
        std::fs::read_to_string(&path).unwrap_or_default() == current,
        "schemas/sweep.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test cli schema`"
    );
}

#[test]
fn every_shipped_experiment_has_a_schema_line_and_checks() {
    let mut files = Vec::new();
    for dir in [
        "experiments",
        "experiments/smoke",
        "experiments/sweeps",
        "experiments/smoke/sweeps",
    ] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 5);
    for f in &files {
        let first = std::fs::read_to_string(f).unwrap();
        assert!(
            first.starts_with("#:schema "),
            "{} lacks a #:schema line",
            f.display()
        );
    }
    let out = pixel(&repo(), &["check", "experiments"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out).matches("ok ").count(),
        files.len(),
        "{}",
        text(&out)
    );
}

#[test]
fn check_reports_every_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("good.toml"), TINY).unwrap();
    std::fs::write(dir.path().join("sub/bad.toml"), "[train]\nbatch_size = 0\n").unwrap();
    std::fs::write(dir.path().join("sub/good.toml"), TINY).unwrap();
    let out = pixel(dir.path(), &["check", "."]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(msg.contains("`train.batch_size` = 0"), "{msg}");
    assert!(
        msg.contains("results folder name `good` is already used"),
        "{msg}"
    );
}

#[test]
fn bundled_mnist_sample_decodes_to_known_images() {
    let dir = repo().join("assets/mnist-sample");
    let s = mnist::load(&dir).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (2000, 500));
    assert_eq!(&s.train.labels[..10], &[5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
    assert_eq!(&s.test.labels[..5], &[7, 2, 1, 0, 4]);
    let first = s.train.image(0);
    assert_eq!(
        (first[6 * 28 + 12], first[14 * 28 + 14], first[0]),
        (170, 240, 0)
    );
    assert_eq!(first.iter().map(|&p| u32::from(p)).sum::<u32>(), 27525);
    assert_eq!(
        s.test.image(0).iter().map(|&p| u32::from(p)).sum::<u32>(),
        18454
    );
    assert_eq!(
        s.test.image(499).iter().map(|&p| u32::from(p)).sum::<u32>(),
        12770
    );
}

const LONG: &str = r#"
[model]
variant = "gated"
layers = 2
kernel = 3
channels = 4
[data]
dataset = "synthetic"
synthetic_size = 6
synthetic_images = 3000
[train]
epochs = 2
batch_size = 4
# The training tools, so that their state is checkpointed and resumed too.
lr_decay = 0.9995
adam_betas = [0.95, 0.9995]
clip_grad_norm = 0.5
ema = 0.99
[sample]
every = 0
grid = 2
"#;

fn metrics_without_times(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            // Everything but the timing columns 3, 4 and 5 (train/test seconds, images/s).
            l.split(',')
                .enumerate()
                .filter(|(i, _)| !(3..=5).contains(i))
                .map(|(_, c)| c)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[test]
fn interrupted_and_resumed_run_equals_an_uninterrupted_one() {
    interrupted_and_resumed(LONG);
}

/// As above for PixelCNN++ with its logistic mixture and dropout: the masks of the steps after
/// the resume are those of an uninterrupted run.
#[test]
fn interrupted_and_resumed_pixelcnnpp_equals_an_uninterrupted_one() {
    let body = LONG.replace(
        "variant = \"gated\"\nlayers = 2\nkernel = 3\nchannels = 4\n",
        "variant = \"pixelcnnpp\"\nchannels = 4\nmixtures = 2\n[model.pixelcnnpp]\nresnets = 1\ndropout = 0.5\n",
    );
    assert!(body.contains("pixelcnnpp"));
    interrupted_and_resumed(&body);
}

/// A results folder has one writer at a time: while a run trains into it, a second `run
/// --force`, a `--resume` and an `eval` are refused with exit code 2, naming the holder, and
/// write nothing; once the run is killed (-9 included) the folder is free again.
#[test]
fn a_results_folder_in_use_is_refused_to_a_second_writer() {
    let dir = tempfile::tempdir().unwrap();
    let long = LONG.replace("epochs = 2", "epochs = 50");
    std::fs::write(dir.path().join("long.toml"), long).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "long.toml", "--results", "r"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run_dir = dir.path().join("r/long");
    let t0 = std::time::Instant::now();
    while !run_dir.join("run.json").exists() {
        assert!(t0.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let holder = format!("in use by another pixel (pid {} on ", child.id());
    let before = std::fs::read_to_string(run_dir.join("experiment.toml")).unwrap();
    let attempts: [&[&str]; 3] = [
        &["run", "long.toml", "--results", "r", "--force"],
        &["run", "--resume", "r/long"],
        &["eval", "r/long"],
    ];
    for args in attempts {
        let out = pixel(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(&holder), "{args:?}: {}", text(&out));
    }
    assert!(!run_dir.join("eval.json").exists());
    assert_eq!(
        std::fs::read_to_string(run_dir.join("experiment.toml")).unwrap(),
        before
    );
    assert!(child.try_wait().unwrap().is_none(), "the run goes on");
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();
    pixel_models::results::FolderLock::take(&run_dir).expect("the OS released the lock");
}

fn interrupted_and_resumed(long: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("long.toml"), long).unwrap();
    let whole = pixel(dir.path(), &["run", "long.toml", "--results", "whole"]);
    assert!(whole.status.success(), "{}", text(&whole));

    let child = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "long.toml", "--results", "cut"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run_json = dir.path().join("cut/long/run.json");
    let t0 = std::time::Instant::now();
    while !run_json.exists() {
        assert!(t0.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Training starts right after run.json is written: the signal lands in the first epoch (it has
    // 750 steps), and the run stops after the step in progress.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(text(&out).contains("--resume"), "{}", text(&out));
    let info = std::fs::read_to_string(&run_json).unwrap();
    assert!(info.contains("\"status\": \"interrupted\""), "{info}");
    let ckpts: Vec<String> = std::fs::read_dir(dir.path().join("cut/long/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Stopped part-way through the first epoch: epochs done 0, some steps done.
    assert!(
        ckpts
            .iter()
            .any(|c| c.starts_with("0000-") && c != "0000-000000"),
        "{ckpts:?}"
    );

    // Nothing to evaluate before an epoch has finished: the mid-epoch checkpoint is for resuming.
    let early = pixel(dir.path(), &["eval", "cut/long"]);
    assert_eq!(early.status.code(), Some(2), "{}", text(&early));
    assert!(
        text(&early).contains("no checkpoint at an epoch's end"),
        "{}",
        text(&early)
    );

    // Running the experiment again without --resume or --force explains what to do.
    let again = pixel(dir.path(), &["run", "long.toml", "--results", "cut"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again).contains("unfinished run (interrupted"),
        "{}",
        text(&again)
    );

    let resumed = pixel(dir.path(), &["run", "--resume", "cut/long"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    let info = std::fs::read_to_string(&run_json).unwrap();
    assert!(info.contains("\"status\": \"completed\""), "{info}");

    let (a, b) = (dir.path().join("whole/long"), dir.path().join("cut/long"));
    assert_eq!(metrics_without_times(&a), metrics_without_times(&b));
    assert_eq!(
        std::fs::read(a.join("samples/epoch-0002.png")).unwrap(),
        std::fs::read(b.join("samples/epoch-0002.png")).unwrap(),
        "same weights give the same grid"
    );
    // The final weights are the same: both models give bit-identical logits on one input.
    assert_eq!(final_logits(&a), final_logits(&b));
    // The grids above come from the averaged weights, kept in every checkpoint; the learning
    // rate decayed and the gradients were clipped (the mean norm before clipping is above 0.5 in
    // an epoch).
    let ckpts = std::fs::read_dir(b.join("checkpoints")).unwrap();
    for c in ckpts {
        assert!(c.unwrap().path().join("ema.bpk").is_file());
    }
    let rows = std::fs::read_to_string(b.join("metrics.csv")).unwrap();
    let header: Vec<&str> = rows.lines().next().unwrap().split(',').collect();
    let col = |name: &str, line: &str| -> f64 {
        let i = header.iter().position(|h| *h == name).unwrap();
        line.split(',').nth(i).unwrap().parse().unwrap()
    };
    let last = rows.lines().last().unwrap();
    let lr = 1e-3 * 0.9995f64.powi(2 * 750 - 1);
    assert!((col("learning_rate", last) - lr).abs() < 1e-12, "{rows}");
    assert!(
        rows.lines().skip(1).any(|l| col("gradient_norm", l) > 0.5),
        "{rows}"
    );
}

/// Latent dimensions of a PixelVAE run whose posterior mean varies over its test images by more
/// than 0.01 (Burda et al. 2016).
fn active_dimensions(dir: &Path) -> u64 {
    use pixel_models::session::{Session, Weights, recorded_plan};
    let plan = recorded_plan(dir, &[], "active_dimensions").unwrap();
    let session = Session::open(
        plan,
        Weights::Trained(dir),
        &pixel_models::cluster::World::single(),
    )
    .unwrap();
    let test = &session.splits.test;
    let all: Vec<usize> = (0..test.len()).collect();
    let batch = pixel_models::train::Batch::gather(test, &all, &session.device.device);
    let (mean, _) = session.state.model.encode(batch.input).unwrap();
    let means: Vec<f32> = mean.into_data().convert::<f32>().try_into_vec().unwrap();
    let dims = means.len() / test.len();
    let per_dim = |d: usize| means.iter().skip(d).step_by(dims).map(|&m| f64::from(m));
    (0..dims)
        .filter(|&d| {
            let n = test.len() as f64;
            let mu = per_dim(d).sum::<f64>() / n;
            per_dim(d).map(|m| (m - mu).powi(2)).sum::<f64>() / n > 0.01
        })
        .count() as u64
}

/// The logits of a run's last epoch-end checkpoint on a fixed input.
fn final_logits(dir: &Path) -> Vec<f32> {
    use burn::tensor::{Tensor, TensorData};
    use pixel_models::session::{Session, Weights, recorded_plan};
    let plan = recorded_plan(dir, &[], "final_logits").unwrap();
    let session = Session::open(
        plan,
        Weights::Trained(dir),
        &pixel_models::cluster::World::single(),
    )
    .unwrap();
    let (device, model) = (session.device.device, session.state.model);
    let x: Vec<f32> = (0..36).map(|i| (i * 37 % 256) as f32).collect();
    let x = Tensor::<4>::from_data(TensorData::new(x, [1, 1, 6, 6]), &device);
    let ctx = pixel_models::model::Context::from_labels(&[3], &device);
    model
        .forward(x, &ctx)
        .values()
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap()
}

#[test]
fn a_diverging_run_stops_with_the_epoch_and_step() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nan.toml"), TINY).unwrap();
    let out = pixel(
        dir.path(),
        &["run", "nan.toml", "--set", "train.learning_rate=1e30"],
    );
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("epoch 1, step"), "{msg}");
    assert!(msg.contains("NaN") || msg.contains("inf"), "{msg}");
    let info = std::fs::read_to_string(dir.path().join("results/nan/run.json")).unwrap();
    assert!(info.contains("\"status\": \"failed\""), "{info}");
}

#[test]
fn commands_on_a_finished_run_check_their_flags_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(d, &["run", "tiny.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let run = "results/tiny";
    for (args, expected) in [
        (
            vec!["eval", run, "--batch-size", "0"],
            vec!["--batch-size 0", "at least 1"],
        ),
        (
            vec!["sample", run, "--temperature", "-1"],
            vec!["--temperature", "`sample.temperature` = -1", "positive"],
        ),
        (
            vec!["sample", run, "--temperature", "0"],
            vec!["`sample.temperature` = 0"],
        ),
        // More images than any disk holds: refused before sampling, nothing written.
        (
            vec!["sample", run, "--count", "1000000000000000", "--npy"],
            vec![
                "--count 1000000000000000",
                "GiB free",
                "(PNGs and samples.npy)",
            ],
        ),
        (
            vec!["sample", run, "--count", "18446744073709551615"],
            vec!["more than 2^64 bytes"],
        ),
    ] {
        let out = pixel(d, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        for e in expected {
            assert!(text(&out).contains(e), "{args:?}: {e:?} in {}", text(&out));
        }
    }
    assert!(
        !d.join(run).join("samples/draws").exists(),
        "nothing written"
    );
    // An environment override would change the recorded run without a record: refused.
    let info = d.join(run).join("run.json");
    let json = std::fs::read_to_string(&info).unwrap();
    std::fs::write(&info, json.replace("\"completed\"", "\"interrupted\"")).unwrap();
    for args in [
        vec!["run", "--resume", run],
        vec!["sample", run],
        vec!["eval", run],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
            .args(&args)
            .current_dir(d)
            .env("PIXEL_TRAIN__EPOCHS", "2")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("PIXEL_TRAIN__EPOCHS=2"),
            "{}",
            text(&out)
        );
    }
    // Without it, the resume continues exactly the recorded experiment (one epoch, done).
    let out = pixel(d, &["run", "--resume", run]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        metrics_without_times(&d.join(run)).len(),
        2,
        "header and one epoch"
    );
}

/// A file that cannot be written once training has started fails the run (exit code 1, not the 2
/// of bad input), and run.json says so.
#[test]
fn a_write_failing_during_the_run_exits_with_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("long.toml"), TINY).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "long.toml", "--set", "train.epochs=100000"])
        .current_dir(d)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let samples = d.join("results/long/samples");
    let t0 = std::time::Instant::now();
    while !samples.is_dir() {
        assert!(t0.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The next epoch's grid has nowhere to go.
    std::fs::remove_dir_all(&samples).unwrap();
    std::fs::write(&samples, "not a folder").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("samples"), "{}", text(&out));
    let info = std::fs::read_to_string(d.join("results/long/run.json")).unwrap();
    assert!(info.contains("\"status\": \"failed\""), "{info}");
}

/// `data.validation` holds out training images chosen by the seed, evaluates them every epoch and
/// records how many; asking for all of them is refused before training.
#[test]
fn a_validation_split_is_held_out_evaluated_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(d, &["run", "tiny.toml", "--set", "data.validation=8"]);
    assert!(out.status.success(), "{}", text(&out));
    let rows = read_csv(&d.join("results/tiny/metrics.csv"));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let v: f64 = row["validation_bits_per_dim"].parse().unwrap();
        let t: f64 = row["test_bits_per_dim"].parse().unwrap();
        assert!(v > 0.0 && v < 9.0 && v != t, "{row:?}");
    }
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("results/tiny/run.json")).unwrap())
            .unwrap();
    assert_eq!(info["validation_images"], 8);
    // A fraction: a quarter of the 40 training images.
    let out = pixel(
        d,
        &[
            "run",
            "tiny.toml",
            "--set",
            "data.validation=0.25",
            "--force",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let info = std::fs::read_to_string(d.join("results/tiny/run.json")).unwrap();
    assert!(info.contains("\"validation_images\": 10"), "{info}");
    let out = pixel(
        d,
        &[
            "run",
            "tiny.toml",
            "--set",
            "data.validation=2.5",
            "--force",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = pixel(
        d,
        &["run", "tiny.toml", "--set", "data.validation=40", "--force"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("`data.validation` = 40"),
        "{}",
        text(&out)
    );
}

/// `backend = "auto"` runs on the fastest backend compiled in, and run.json says which and why.
#[test]
fn auto_backend_records_what_it_chose() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(
        d,
        &[
            "run",
            "tiny.toml",
            "--set",
            "runtime.backend=auto",
            "--set",
            "train.epochs=1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("results/tiny/run.json")).unwrap())
            .unwrap();
    let expected = if cfg!(feature = "tch") {
        "libtorch"
    } else {
        "flex"
    };
    assert_eq!(info["backend"], expected, "{info}");
    let why = info["backend_choice"].as_str().unwrap();
    assert!(
        why.starts_with("backend auto: ") && why.contains(expected),
        "{why}"
    );
}

/// `pixel sample --count N` writes N single images and, with --npy, one array of the same bytes;
/// `--class` needs a class-conditional model.
#[test]
fn sample_count_writes_single_images_and_an_npy_array() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conditional = TINY.replace(
        "[model]\n",
        "[model]\nvariant = \"gated\"\nconditional = \"class\"\n",
    );
    std::fs::write(d.join("cond.toml"), conditional).unwrap();
    let out = pixel(d, &["run", "cond.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let args = [
        "sample",
        "results/cond",
        "--count",
        "5",
        "--npy",
        "--class",
        "3",
    ];
    let out = pixel(
        d,
        &[&args[..], &["--batch-size", "2", "--out", "draws"]].concat(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let npy = std::fs::read(d.join("draws/samples.npy")).unwrap();
    let len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = std::str::from_utf8(&npy[10..10 + len]).unwrap();
    assert!(header.contains("'shape': (5, 1, 6, 6)"), "{header}");
    let data = &npy[10 + len..];
    assert_eq!(data.len(), 5 * 36);
    for i in 0..5 {
        let png = d.join(format!("draws/sample-{i:05}.png"));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..36], &data[i * 36..(i + 1) * 36], "image {i}");
    }
    assert!(!d.join("draws/sample-00005.png").exists());
    // The same seed and batch size draw the same images.
    let again = pixel(
        d,
        &[&args[..], &["--batch-size", "2", "--out", "again"]].concat(),
    );
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(std::fs::read(d.join("again/samples.npy")).unwrap(), npy);

    std::fs::write(d.join("plain.toml"), TINY).unwrap();
    let out = pixel(d, &["run", "plain.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(
        d,
        &["sample", "results/plain", "--count", "2", "--class", "3"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--class 3") && text(&out).contains("not class-conditional"));
    let out = pixel(
        d,
        &["sample", "results/plain", "--count", "2", "--class", "12"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn conflicting_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["run", "a.toml", "--resume", "results/a"],
        vec!["run", "--resume", "results/a", "--force"],
        vec!["run", "--resume", "results/a", "--set", "train.epochs=1"],
        vec!["run"],
    ] {
        let out = pixel(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    let out = pixel(dir.path(), &["run", "--resume", "nowhere"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("nowhere"), "{}", text(&out));
}

/// Fifty-odd mistakes a user can make. Each must exit with 2, print a short error that quotes what
/// is wrong, and write nothing.
#[test]
fn bad_inputs_each_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Data files for the dataset cases.
    let imgs = pixel_models::data::Images {
        pixels: vec![7; 3 * 28 * 28],
        labels: vec![1, 2, 3],
        colours: 1,
        height: 28,
        width: 28,
    };
    for (name, corrupt) in [("mnist-truncated", true), ("mnist-magic", false)] {
        let m = d.join(name);
        std::fs::create_dir(&m).unwrap();
        for (i, l) in [
            ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        ] {
            mnist::write_idx(&imgs, &m.join(i), &m.join(l)).unwrap();
        }
        let f = m.join("train-images-idx3-ubyte");
        let mut bytes = std::fs::read(&f).unwrap();
        if corrupt {
            bytes.truncate(bytes.len() - 100);
        } else {
            bytes[3] = 9;
        }
        std::fs::write(&f, bytes).unwrap();
    }
    let cifar = d.join("cifar-truncated");
    std::fs::create_dir(&cifar).unwrap();
    for f in pixel_models::data::cifar10::FILES {
        std::fs::write(cifar.join(f), vec![1u8; 3073 * 2 - 10]).unwrap();
    }
    for (name, second) in [
        ("folder-sizes", vec![0u8; 3 * 20]),
        ("folder-broken", vec![]),
    ] {
        let sub = d.join(name).join("train/x");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(d.join(name).join("valid/x")).unwrap();
        pixel_models::results::png::write_rgb_or_grey(&sub.join("a.png"), &[0; 48], 3, 4, 4)
            .unwrap();
        if second.is_empty() {
            std::fs::write(sub.join("b.png"), b"\x89PNG garbage").unwrap();
        } else {
            pixel_models::results::png::write_rgb_or_grey(&sub.join("b.png"), &second, 3, 4, 5)
                .unwrap();
        }
    }
    std::fs::write(d.join("not-a-folder"), "x").unwrap();
    // Degenerate and mismatched files: train images of height 0; a 20x20 test set beside a 28x28
    // train set; a folder of 4x8 images cropped to 6.
    for (name, train_height, test_side) in [("mnist-height0", 0, 28), ("mnist-mismatch", 28, 20)] {
        let m = d.join(name);
        std::fs::create_dir(&m).unwrap();
        let split = |height: usize, width: usize| pixel_models::data::Images {
            pixels: vec![7; 3 * height * width],
            labels: vec![1, 2, 3],
            colours: 1,
            height,
            width,
        };
        let (i, l) = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte");
        mnist::write_idx(&split(train_height, 28), &m.join(i), &m.join(l)).unwrap();
        let (i, l) = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte");
        mnist::write_idx(&split(test_side, test_side), &m.join(i), &m.join(l)).unwrap();
    }
    for split in ["train/x", "valid/x"] {
        let sub = d.join("folder-wide").join(split);
        std::fs::create_dir_all(&sub).unwrap();
        pixel_models::results::png::write_rgb_or_grey(&sub.join("a.png"), &[9; 96], 3, 4, 8)
            .unwrap();
    }

    let syn = "[data]\ndataset = \"synthetic\"\n";
    let rgb = "[data]\ndataset = \"synthetic\"\nsynthetic_colours = 3\n";
    #[rustfmt::skip]
    let cases: Vec<(String, Vec<&str>, Vec<&str>)> = vec![
        ("[model\n".into(), vec![], vec![":1:"]),
        ("[model]\nlayers = = 3\n".into(), vec![], vec![":2:"]),
        ("epochs = 3\n".into(), vec![], vec!["`epochs`", ":1:1"]),
        ("[optim]\nlr = 1\n".into(), vec![], vec!["`optim`"]),
        ("[model]\nlayrs = 3\n".into(), vec![], vec!["did you mean `layers`"]),
        ("[data]\ndatset = \"mnist\"\n".into(), vec![], vec!["did you mean `dataset`"]),
        ("[train]\nepoch = 3\n".into(), vec![], vec!["did you mean `epochs`"]),
        ("[sample]\ntemprature = 1.0\n".into(), vec![], vec!["did you mean `temperature`"]),
        ("[runtime]\ndevise = \"cpu\"\n".into(), vec![], vec!["did you mean `device`"]),
        ("[model]\nlayers = \"five\"\n".into(), vec![], vec!["`model.layers`", "integer"]),
        ("[train]\nlearning_rate = \"fast\"\n".into(), vec![], vec!["`train.learning_rate`", "number"]),
        ("[train]\nseed = -1\n".into(), vec![], vec!["`train.seed`"]),
        ("[data]\ndownload = \"yes\"\n".into(), vec![], vec!["`data.download`", "bool"]),
        ("model = 3\n".into(), vec![], vec!["`model`"]),
        ("[model]\nvariant = \"pixelsnail\"\n".into(), vec![], vec!["`model.variant`", "gated"]),
        ("[data]\ndataset = \"imagenet\"\n".into(), vec![], vec!["`data.dataset`", "cifar10"]),
        ("[runtime]\nbackend = \"cuda\"\n".into(), vec![], vec!["`runtime.backend`", "libtorch"]),
        ("[runtime]\nprecision = \"f8\"\n".into(), vec![], vec!["`runtime.precision`", "bf16"]),
        ("[model]\nconditional = \"label\"\n".into(), vec![], vec!["`model.conditional`", "class"]),
        (format!("{syn}[model]\nlayers = 0\n"), vec![], vec!["`model.layers` = 0"]),
        (format!("{syn}[model]\nkernel = 4\n"), vec![], vec!["`model.kernel` = 4", "odd"]),
        (format!("{syn}[model]\nkernel = 0\n"), vec![], vec!["`model.kernel` = 0"]),
        (format!("{syn}[model]\nchannels = 0\n"), vec![], vec!["`model.channels` = 0"]),
        (format!("{rgb}[model]\nchannels = 10\n"), vec![], vec!["`model.channels` = 10", "multiple of 3"]),
        ("[data]\ndataset = \"cifar10\"\n[model]\nchannels = 31\n".into(), vec![], vec!["`model.channels` = 31"]),
        (format!("{syn}[train]\nbatch_size = 0\n"), vec![], vec!["`train.batch_size` = 0"]),
        (format!("{syn}[train]\neval_batch_size = 0\n"), vec![], vec!["`train.eval_batch_size` = 0"]),
        (format!("{syn}[train]\nlearning_rate = -0.1\n"), vec![], vec!["`train.learning_rate` = -0.1"]),
        (format!("{syn}[train]\nlearning_rate = 0.0\n"), vec![], vec!["`train.learning_rate` = 0"]),
        (format!("{syn}[train]\nlearning_rate = nan\n"), vec![], vec!["`train.learning_rate` = NaN"]),
        (format!("{syn}[train]\nepochs = 0\n"), vec![], vec!["`train.epochs` = 0"]),
        (format!("{syn}[train]\nkeep_checkpoints = 0\n"), vec![], vec!["`train.keep_checkpoints` = 0"]),
        (format!("{syn}[sample]\ntemperature = 0.0\n"), vec![], vec!["`sample.temperature` = 0"]),
        (format!("{syn}[sample]\ntemperature = -1.0\n"), vec![], vec!["`sample.temperature` = -1"]),
        (format!("{syn}[sample]\ngrid = 5\n"), vec![], vec!["`sample.grid` = 5", "even"]),
        (format!("{syn}[sample]\ngrid = 0\n"), vec![], vec!["`sample.grid` = 0"]),
        (format!("{syn}[sample]\ngrid = 100000\n"), vec![], vec!["`sample.grid` = 100000", "to 64"]),
        (format!("{syn}[model]\nchannels = 1000000000\n"), vec![], vec!["channels = 1000000000", "GiB", "runtime.allow_large"]),
        (format!("{syn}[model]\nlayers = 100000\n"), vec![], vec!["layers = 100000", "parameters", "runtime.allow_large"]),
        (format!("{syn}[runtime]\ndevice = \"gpu\"\n"), vec![], vec!["`runtime.device` = \"gpu\""]),
        (format!("{syn}[runtime]\ndevice = \"cuda:x\"\n"), vec![], vec!["`runtime.device` = \"cuda:x\""]),
        (format!("{syn}[runtime]\ndevice = \"cuda\"\n"), vec![], vec!["`runtime.device`", "libtorch"]),
        (format!("{syn}[model]\nconditional = \"class\"\n"), vec![], vec!["`model.conditional`", "gated"]),
        ("[model]\nlikelihood = \"gaussian\"\n".into(), vec![], vec!["`model.likelihood`", "logistic_mixture"]),
        (format!("{rgb}[model]\nvariant = \"gated\"\nlikelihood = \"logistic_mixture\"\nchannels = 30\n"), vec![], vec!["`model.likelihood`", "pixelcnnpp"]),
        (format!("{syn}[model]\nlikelihood = \"logistic_mixture\"\nmixtures = 0\n"), vec![], vec!["`model.mixtures` = 0"]),
        (format!("{syn}[model]\nmixtures = 3\n"), vec![], vec!["`model.mixtures` = 3", "categorical"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\nkernel = 3\n"), vec![], vec!["`model.kernel` = 3", "resnets"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\n[model.pixelcnnpp]\ndropout = 1.0\n"), vec![], vec!["`model.pixelcnnpp.dropout` = 1"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\n[model.pixelcnnpp]\nresnet = 1\n"), vec![], vec!["did you mean `resnets`"]),
        (format!("{syn}[model.pixelcnnpp]\nresnets = 1\n"), vec![], vec!["no [model.pixelcnnpp] table"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\nchannels = 100000\n[model.pixelcnnpp]\nresnets = 50\n"), vec![], vec!["GiB", "runtime.allow_large"]),
        (format!("{syn}[model.vae]\nlatent_channels = 8\n"), vec![], vec!["`model.vae`", "variant = \"vae\""]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nfree_bits = -1.0\n"), vec![], vec!["`model.vae.free_bits` = -1"]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nlatent_channels = 0\n"), vec![], vec!["`model.vae.latent_channels` = 0"]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nconditioning = \"film\"\n"), vec![], vec!["model.vae.conditioning", "film"]),
        (format!("{syn}[model]\nvariant = \"vae\"\n[model.vae]\nlatent = 3\n"), vec![], vec!["latent", "latent_channels"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-sizes\"\n[model]\nvariant = \"gated\"\nconditional = \"class\"\n".into(), vec![], vec!["`model.conditional`", "folder"]),
        ("[data]\ndataset = \"synthetic\"\nsynthetic_colours = 2\n".into(), vec![], vec!["`data.synthetic_colours` = 2"]),
        ("[data]\ndataset = \"synthetic\"\nsynthetic_size = 1\n".into(), vec![], vec!["`data.synthetic_size` = 1"]),
        ("[data]\ndataset = \"synthetic\"\nsynthetic_images = 0\n".into(), vec![], vec!["`data.synthetic_images` = 0"]),
        ("[data]\ndataset = \"cifar10\"\ncrop = 40\ndownload = false\n".into(), vec![], vec!["`data.crop` = 40", "32"]),
        (format!("{syn}crop = 1\n"), vec![], vec!["`data.crop` = 1"]),
        ("[data]\npath = \"nowhere\"\ndownload = false\n".into(), vec![], vec!["`mnist` not found", "nowhere", "train-images-idx3-ubyte"]),
        ("[data]\ndataset = \"cifar10\"\npath = \"nowhere\"\ndownload = false\n".into(), vec![], vec!["`cifar10` not found", "data_batch_1.bin"]),
        ("[data]\ndataset = \"folder\"\n".into(), vec![], vec!["`folder` not found", "data.path"]),
        ("[data]\npath = \"mnist-truncated\"\n".into(), vec![], vec!["train-images-idx3-ubyte", "truncated"]),
        ("[data]\npath = \"mnist-magic\"\n".into(), vec![], vec!["train-images-idx3-ubyte", "wrong magic number"]),
        ("[data]\ndataset = \"cifar10\"\npath = \"cifar-truncated\"\n".into(), vec![], vec!["data_batch_1.bin", "truncated"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-sizes\"\n".into(), vec![], vec!["b.png", "expected 4x4"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-broken\"\n".into(), vec![], vec!["b.png", "unreadable PNG"]),
        ("[data]\npath = \"mnist-height0\"\n".into(), vec![], vec!["train-images-idx3-ubyte", "0x28 pixels", "at least 2x2"]),
        ("[data]\npath = \"mnist-mismatch\"\n".into(), vec![], vec!["mnist-mismatch", "1x28x28", "1x20x20"]),
        ("[data]\ndataset = \"folder\"\npath = \"folder-wide\"\ncrop = 6\n".into(), vec![], vec!["`data.crop` = 6", "4x8", "at most 4"]),
        (syn.into(), vec!["--set", "train.epochs"], vec!["--set train.epochs", "KEY=VALUE"]),
        (syn.into(), vec!["--set", "=3"], vec!["--set =3", "dotted key"]),
        (syn.into(), vec!["--set", "train.epoch=3"], vec!["--set", "did you mean `epochs`"]),
        (syn.into(), vec!["--set", "train.epochs=many"], vec!["--set", "`train.epochs` = \"many\""]),
        (syn.into(), vec!["--set", "model.kernel=6"], vec!["--set (overriding", "`model.kernel` = 6"]),
        // A size that cannot fit is blamed on the flag that set it, variant-specific keys included.
        (syn.into(), vec!["--set", "model.channels=300000"], vec!["--set (overriding", "`model.channels` = 300000 (with model.layers", "GiB"]),
        (format!("{syn}[model]\nvariant = \"pixelcnnpp\"\n"), vec!["--set", "model.pixelcnnpp.resnets=100000"], vec!["--set (overriding", "`model.pixelcnnpp.resnets` = 100000", "GiB"]),
        (syn.into(), vec!["--results", "not-a-folder"], vec!["not-a-folder"]),
        (syn.into(), vec!["--bogus"], vec!["--bogus"]),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    for (i, (body, args, expected)) in cases.iter().enumerate() {
        let file = format!("case{i:02}.toml");
        std::fs::write(d.join(&file), body).unwrap();
        let mut all = vec!["run", file.as_str()];
        all.extend(args.iter().copied());
        let out = pixel(d, &all);
        let msg = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "case {i} ({body:?} {args:?}): {msg}"
        );
        for e in expected {
            assert!(
                msg.contains(e),
                "case {i} ({body:?} {args:?}): expected {e:?} in:\n{msg}"
            );
        }
        // The error names the experiment file or the data file it is about (flags name themselves).
        if args.is_empty() {
            let tmp = d.to_string_lossy();
            assert!(
                msg.contains(&file) || msg.contains(tmp.as_ref()),
                "case {i}: neither the experiment nor a data file is named:\n{msg}"
            );
        }
        assert!(
            msg.lines().count() <= 12,
            "case {i}: more than a screen:\n{msg}"
        );
        assert!(!d.join("results").exists(), "case {i} wrote results");
    }

    // Environment overrides with a wrong type name the variable.
    std::fs::write(d.join("env.toml"), syn).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(["run", "env.toml"])
        .current_dir(d)
        .env("PIXEL_TRAIN__EPOCHS", "abc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("PIXEL_TRAIN__EPOCHS"), "{}", text(&out));
    // A folder given as the experiment.
    let out = pixel(d, &["run", "mnist-magic"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("mnist-magic"), "{}", text(&out));
    assert!(!d.join("results").exists());
}

#[test]
fn checkpoint_of_a_different_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY).unwrap();
    let out = pixel(dir.path(), &["run", "tiny.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let exp = dir.path().join("results/tiny/experiment.toml");
    let changed = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("channels = 4", "channels = 8");
    std::fs::write(&exp, changed).unwrap();
    let out = pixel(dir.path(), &["sample", "results/tiny"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("does not fit the model"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("model.bpk"), "{}", text(&out));
    let out = pixel(dir.path(), &["sample", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("nowhere"));
    let out = pixel(dir.path(), &["run", "--resume", "results/tiny"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already completed"), "{}", text(&out));
}

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
    assert!(
        body.contains(&format!(
            "PIXEL=${{PIXEL:-{}}}",
            env!("CARGO_BIN_EXE_pixel")
        )),
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
    let t0 = std::time::Instant::now();
    while !run.join("checkpoints").exists() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the task never finished an epoch"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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

#[test]
fn figures_copies_grids_and_curves_and_rewrites_the_table_and_the_gallery() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("experiments")).unwrap();
    std::fs::write(d.join("experiments/tiny.toml"), TINY).unwrap();
    std::fs::write(d.join("experiments/absent.toml"), TINY).unwrap();
    let readme = format!(
        "# Title\n\n{}\nstale\n{}\n\nrest\n",
        pixel_models::cmd::figures::START,
        pixel_models::cmd::figures::END
    );
    std::fs::write(d.join("README.md"), readme).unwrap();
    std::fs::create_dir(d.join("docs")).unwrap();
    let page = format!(
        "# Results\n\n{}\nstale\n{}\n",
        pixel_models::cmd::figures::GALLERY_START,
        pixel_models::cmd::figures::GALLERY_END
    );
    std::fs::write(d.join("docs/results.md"), page).unwrap();
    let out = pixel(d, &["run", "experiments/tiny.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["eval", "results/tiny"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["figures"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not run: absent"), "{}", text(&out));
    let new = std::fs::read_to_string(d.join("README.md")).unwrap();
    assert!(
        new.starts_with("# Title\n\n") && new.ends_with("\n\nrest\n"),
        "{new}"
    );
    assert!(!new.contains("stale"));
    let row: Vec<&str> = new
        .lines()
        .find(|l| l.starts_with("| `tiny` | 2 |"))
        .unwrap_or_else(|| panic!("{new}"))
        .split(" | ")
        .collect();
    // `pixel eval` of a PixelCNN recomputes exactly the last epoch's test bits/dim.
    assert_eq!(row[2], row[3], "{new}");
    assert!(new.contains("| completed | flex:cpu |"), "{new}");
    assert!(new.contains("Not run here yet: `absent`."), "{new}");
    let gallery = std::fs::read_to_string(d.join("docs/results.md")).unwrap();
    assert!(
        gallery.starts_with("# Results\n\n")
            && !gallery.contains("stale")
            && gallery.contains("![tiny-samples.png](figures/tiny-samples.png)"),
        "{gallery}"
    );
    assert!(d.join("docs/figures/tiny-samples.png").is_file());
    assert!(d.join("docs/figures/tiny-curve.png").is_file());
    for kept in ["run.json", "metrics.csv", "eval.json"] {
        assert!(
            d.join("docs/figures/runs/tiny").join(kept).is_file(),
            "{kept}"
        );
    }
    // A clone without results/ (it is never tracked) rewrites the same table from the kept records.
    std::fs::rename(d.join("results"), d.join("results-elsewhere")).unwrap();
    let out = pixel(d, &["figures"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(d.join("README.md")).unwrap(), new);
    assert_eq!(
        std::fs::read_to_string(d.join("docs/results.md")).unwrap(),
        gallery
    );
    // A run started over has fewer epochs than the kept one: the kept one stays in the table.
    let out = pixel(
        d,
        &["run", "experiments/tiny.toml", "--set", "train.epochs=1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["figures"]);
    assert!(
        text(&out).contains("showing the kept run"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(d.join("README.md")).unwrap(), new);
    // Once it gets as far, the new run replaces it.
    std::fs::remove_dir_all(d.join("results")).unwrap();
    let out = pixel(
        d,
        &["run", "experiments/tiny.toml", "--set", "train.epochs=3"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["figures"]);
    assert!(out.status.success(), "{}", text(&out));
    let newest = std::fs::read_to_string(d.join("README.md")).unwrap();
    assert!(
        newest.contains("| `tiny` | 3 |") && newest.contains(" | - | completed"),
        "{newest}"
    );
    // Without the markers: an error that says what is missing.
    std::fs::write(d.join("README.md"), "# none\n").unwrap();
    let out = pixel(d, &["figures"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("results:start"), "{}", text(&out));
}

#[test]
fn bench_reports_every_measure() {
    // Every model kind: a PixelVAE's forward pass encodes before it decodes.
    for (name, toml) in [("tiny", TINY), ("tiny-vae", TINY_VAE)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{name}.toml")), toml).unwrap();
        let file = format!("{name}.toml");
        let out = pixel(dir.path(), &["bench", &file, "--steps", "2"]);
        assert!(out.status.success(), "{name}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("| {name} | flex:cpu | f32 |")),
            "{stdout}"
        );
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(json["seconds_per_step"].as_f64().unwrap() > 0.0);
        assert!(json["grid_seconds"].as_f64().unwrap() > 0.0);
        assert!(json["forward_ms"].as_f64().unwrap() > 0.0);
        // Where a step's time goes: each phase measured, and together not more than a step.
        let phases = &json["step_phases_ms"];
        let ms = |k: &str| phases[k].as_f64().unwrap_or_else(|| panic!("{k}: {json}"));
        assert!(
            ms("forward") > 0.0 && ms("backward") > 0.0 && ms("update") > 0.0,
            "{json}"
        );
        assert!(ms("loss") >= 0.0, "{json}");
        let sum = ms("forward") + ms("loss") + ms("backward") + ms("update");
        let step = json["seconds_per_step"].as_f64().unwrap() * 1e3;
        assert!(sum < 1.5 * step, "phases {sum} ms, step {step} ms: {json}");
        assert!(
            stdout.contains("step phases (median ms): forward "),
            "{stdout}"
        );
        assert!(
            !dir.path().join("results").exists(),
            "bench writes no results"
        );
    }
}

const TINY_VAE: &str = r#"
[model]
variant = "vae"
layers = 2
kernel = 3
channels = 4
[model.vae]
latent_channels = 2
downsample = 1
hidden = 4
maps = 2
kl_warmup_steps = 4
[data]
dataset = "synthetic"
synthetic_size = 6
synthetic_images = 40
[train]
epochs = 2
batch_size = 16
[sample]
grid = 4
"#;

#[test]
fn pixel_vae_runs_reports_the_elbo_terms_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vae.toml"), TINY_VAE).unwrap();
    let out = pixel(dir.path(), &["run", "vae.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let res = dir.path().join("results/vae");
    let rows = read_csv(&res.join("metrics.csv"));
    assert_eq!(rows.len(), 2);
    for (i, r) in rows.iter().enumerate() {
        let f = |k: &str| r[k].parse::<f64>().unwrap();
        for split in ["train", "test"] {
            let (total, recon, kl) = (
                f(&format!("{split}_bits_per_dim")),
                f(&format!("{split}_recon_bits_per_dim")),
                f(&format!("{split}_kl_bits_per_dim")),
            );
            assert!((total - recon - kl).abs() < 1e-9, "{r:?}");
            assert!(kl >= 0.0 && recon > 0.0, "{r:?}");
        }
        // 3 steps per epoch, warm-up over 4: the weight at the end of epochs 1 and 2.
        assert_eq!(f("kl_weight"), [0.75, 1.0][i], "{r:?}");
    }
    for f in ["epoch-0002.png", "reconstructions-epoch-0002.png"] {
        let (w, h, _) = png_size(&res.join("samples").join(f));
        assert_eq!((w, h), (4 * 8 + 2, 4 * 8 + 2), "{f}");
    }

    let eval = pixel(
        dir.path(),
        &["eval", "results/vae", "--importance-samples", "8"],
    );
    assert!(eval.status.success(), "{}", text(&eval));
    assert!(
        text(&eval).contains("importance sampled, K = 8"),
        "{}",
        text(&eval)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("eval.json")).unwrap()).unwrap();
    let (nll, elbo) = (
        report["test_bits_per_dim"].as_f64().unwrap(),
        report["test_elbo_bits_per_dim"].as_f64().unwrap(),
    );
    assert!(nll <= elbo && nll > 0.0, "{report}");
    assert_eq!(report["images"], 10);
    assert_eq!(report["epochs"], 2, "the last finished epoch: {report}");
    // 2 channels of a 3 x 3 latent for 6 x 6 images.
    assert_eq!(report["latent_dimensions"], 18, "{report}");
    // The active count, recomputed here from the encoder's means in two passes (mean, then
    // variance), agrees with the one `pixel eval` keeps as running sums.
    assert_eq!(
        report["active_latent_dimensions"].as_u64().unwrap(),
        active_dimensions(&res),
        "{report}"
    );
    assert!(
        text(&eval).contains("latent dimensions active"),
        "{}",
        text(&eval)
    );

    let zero = pixel(
        dir.path(),
        &["eval", "results/vae", "--importance-samples", "0"],
    );
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero));
    assert!(
        text(&zero).contains("--importance-samples"),
        "{}",
        text(&zero)
    );
}

/// The rows of a CSV file as maps from column to value.
fn read_csv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

/// A trained PixelCNN++ (logistic mixture, EMA, dropout): `pixel eval --receptive-field` writes a
/// PNG with one heat map per pixel and a JSON whose counts say the trained model sees no later
/// pixel and most of the earlier ones; `pixel eval` and `pixel sample` work on it as on the others.
#[test]
fn receptive_field_of_a_trained_pixelcnnpp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let exp = repo().join("experiments/smoke/pixelcnnpp-synthetic-rgb.toml");
    let out = pixel(
        d,
        &[
            "run",
            exp.to_str().unwrap(),
            "--results",
            "results",
            "--set",
            "train.epochs=1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let run = d.join("results/pixelcnnpp-synthetic-rgb");
    let r = run.to_str().unwrap();
    let out = pixel(d, &["eval", r, "--receptive-field", "--images", "4"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pixel (4, 4)"), "{}", text(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("receptive-field.json")).unwrap())
            .unwrap();
    assert_eq!(json["images"], 4);
    let fields = json["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 3);
    for f in fields {
        assert_eq!(f["later_pixels"], 0, "{f}");
        // A mixture's pixel depends on none of its own sub-pixels.
        assert_eq!(f["own_subpixels"], 0, "{f}");
        let (seen, earlier) = (
            f["nonzero_earlier"].as_u64().unwrap(),
            f["earlier_pixels"].as_u64().unwrap(),
        );
        assert!(seen <= earlier && seen * 2 > earlier, "{f}");
    }
    // Three 8x8 maps scaled 12 times, side by side with padding.
    let (w, h, colour) = png_size(&run.join("receptive-field.png"));
    assert_eq!(
        (w, h, colour),
        (3 * (96 + 2) + 2, 96 + 4, png::ColorType::Rgb)
    );
    // The flags of the other mode are refused with it.
    let out = pixel(d, &["eval", r, "--receptive-field", "--batch-size", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = pixel(d, &["eval", r, "--images", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = pixel(d, &["eval", r, "--receptive-field", "--images", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--images 0"), "{}", text(&out));
    // The exact NLL and samples from the averaged weights.
    let out = pixel(d, &["eval", r]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(exact)"), "{}", text(&out));
    let out = pixel(d, &["sample", r, "--count", "3"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A run with `train.ema` whose checkpoint lost its averaged weights: `pixel eval` and `pixel
/// sample` say so and stop (exit 2) rather than use the trained weights in their place; a weights
/// file cut short is reported as damaged, not as a model that does not fit.
#[test]
fn eval_and_sample_refuse_a_checkpoint_without_its_average_or_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(
        d,
        &[
            "run",
            "tiny.toml",
            "--set",
            "train.epochs=1",
            "--set",
            "train.ema=0.9",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let ckpt = d.join("results/tiny/checkpoints/0001-000000");
    let ema = std::fs::read(ckpt.join("ema.bpk")).unwrap();
    std::fs::remove_file(ckpt.join("ema.bpk")).unwrap();
    for args in [
        vec!["eval", "results/tiny"],
        vec!["sample", "results/tiny", "--count", "2", "--out", "draws"],
    ] {
        let out = pixel(d, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("ema.bpk: damaged: missing"),
            "{}",
            text(&out)
        );
    }
    assert!(!d.join("results/tiny/eval.json").exists());
    assert!(!d.join("draws").exists());
    std::fs::write(ckpt.join("ema.bpk"), &ema[..ema.len() - 10]).unwrap();
    let out = pixel(d, &["eval", "results/tiny"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("damaged") && text(&out).contains("cut short"),
        "{}",
        text(&out)
    );
    std::fs::write(ckpt.join("ema.bpk"), &ema).unwrap();
    let out = pixel(d, &["eval", "results/tiny"]);
    assert!(out.status.success(), "{}", text(&out));
}
