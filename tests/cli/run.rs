//! `pixel run`: the files a run writes, its numbers, overrides, failures during a run, the
//! validation split, the backend it picks, PixelVAE's terms.

use super::*;

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

/// A file that cannot be written once training has started fails the run (exit code 1, not the 2
/// of bad input), and run.json says so.
#[test]
fn a_write_failing_during_the_run_exits_with_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("long.toml"), TINY).unwrap();
    let child = pixel_in_background(d, &["run", "long.toml", "--set", "train.epochs=100000"]);
    let samples = d.join("results/long/samples");
    wait_for(&samples, 60, "the run never started");
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

/// The same experiment run twice writes the same files to the byte: metrics (but for times), the
/// grids, and the checkpoint's files (Burn's random parameter ids, which the weights and the
/// optimizer's state record, are numbered instead).
#[test]
fn the_same_experiment_twice_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let mut runs = Vec::new();
    for results in ["first", "second"] {
        let out = pixel(
            d,
            &[
                "run",
                "tiny.toml",
                "--results",
                results,
                "--set",
                "train.ema=0.9",
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        runs.push(d.join(results).join("tiny"));
    }
    assert_eq!(
        metrics_without_times(&runs[0]),
        metrics_without_times(&runs[1])
    );
    let checkpoint = runs[0].join("checkpoints/0002-000000");
    let mut compared = 0;
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let name = entry.unwrap().file_name();
        let [a, b] = [0, 1]
            .map(|i| std::fs::read(runs[i].join("checkpoints/0002-000000").join(&name)).unwrap());
        assert!(
            a == b,
            "{} differs between the two runs",
            name.to_string_lossy()
        );
        compared += 1;
    }
    assert_eq!(compared, 5, "model, average, optimizer, state and manifest");
    for grid in ["samples/epoch-0001.png", "samples/epoch-0002.png"] {
        assert_eq!(
            std::fs::read(runs[0].join(grid)).unwrap(),
            std::fs::read(runs[1].join(grid)).unwrap(),
            "{grid}"
        );
    }
}

/// `runtime.deterministic` is taken by libtorch (else the run fails) and no operation of the
/// model refuses it; on the CPU the numbers are the same either way.
#[cfg(feature = "tch")]
#[test]
fn libtorch_takes_deterministic_algorithms_and_its_cpu_numbers_do_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let mut metrics = Vec::new();
    for on in ["true", "false"] {
        let out = pixel(
            d,
            &[
                "run",
                "tiny.toml",
                "--force",
                "--set",
                "runtime.backend=libtorch",
                "--set",
                &format!("runtime.deterministic={on}"),
                "--set",
                "train.epochs=1",
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        metrics.push(metrics_without_times(&d.join("results/tiny")));
    }
    assert_eq!(metrics[0], metrics[1]);
}

/// `runtime.cuda_graph` where libtorch's "auto" device turns out to be the CPU (no GPU here) is
/// refused when the device is opened, before anything is written: exit 2, naming the key and
/// the device.
#[cfg(feature = "tch")]
#[test]
fn a_cuda_graph_on_a_device_that_is_not_cuda_is_refused() {
    if tch::Cuda::is_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(
        d,
        &[
            "run",
            "tiny.toml",
            "--set",
            "runtime.backend=libtorch",
            "--set",
            "runtime.cuda_graph=true",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let message = text(&out);
    assert!(message.contains("runtime.cuda_graph = true"), "{message}");
    assert!(message.contains("libtorch:cpu"), "{message}");
    assert!(!d.join("results").exists());
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

/// Where stderr is not a terminal (here a pipe, as in a Slurm log), long passes log their progress
/// every `--log-every` seconds: the epoch with images done, rate and bits/dim, the test pass, the
/// sample grid. `--log-every 0` turns the lines off; a negative value is refused.
#[test]
fn progress_is_logged_where_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY).unwrap();
    let run = |every: &str, results: &str| {
        Command::new(env!("CARGO_BIN_EXE_pixel"))
            .args([
                "run",
                "tiny.toml",
                "--results",
                results,
                "--log-every",
                every,
            ])
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .output()
            .expect("pixel runs")
    };
    let out = run("0.000001", "a");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for expected in [
        "epoch 2/2: ",
        " images/s, ",
        " bits/dim",
        "test: ",
        "sample grid: ",
    ] {
        assert!(log.contains(expected), "{expected:?} in {log}");
    }
    let quiet = text(&run("0", "b"));
    assert!(
        !quiet.contains("epoch 2/2: ") && quiet.contains("epoch done"),
        "{quiet}"
    );
    let bad = run("-1", "c");
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("--log-every -1"), "{}", text(&bad));
    assert!(!dir.path().join("c").exists());
}
