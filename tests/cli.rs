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
    for f in ["experiment.toml", "run.json", "metrics.csv"] {
        assert!(res.join(f).is_file(), "missing {f}");
    }
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
        "epoch,train_bits_per_dim,test_bits_per_dim,train_seconds,test_seconds,train_images_per_second"
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
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
fn every_shipped_experiment_has_a_schema_line_and_checks() {
    let mut files = Vec::new();
    for dir in ["experiments", "experiments/smoke"] {
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
[sample]
every = 0
grid = 2
"#;

fn metrics_without_times(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
        .collect()
}

#[test]
fn interrupted_and_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("long.toml"), LONG).unwrap();
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
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
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
