//! Long runs: interrupt and resume (equal to an uninterrupted run), one writer per results
//! folder, checkpoints of another model.

use super::*;

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
    let mut child = pixel_in_background(dir.path(), &["run", "long.toml", "--results", "r"]);
    let run_dir = dir.path().join("r/long");
    wait_for(&run_dir.join("run.json"), 60, "the run never started");
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

    let child = pixel_in_background(dir.path(), &["run", "long.toml", "--results", "cut"]);
    let run_json = dir.path().join("cut/long/run.json");
    wait_for(&run_json, 60, "the run never started");
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

/// SIGTERM during the final sample grid (a PixelCNN++ draws it a forward pass per pixel: seconds
/// here, minutes on real sizes) ends the grid at once: the epoch's checkpoint was written before
/// it, the run completes, and the warning says how to draw the grid later.
#[test]
fn sigterm_during_the_final_grid_stops_it_and_keeps_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let slow_grid = r#"
[model]
variant = "pixelcnnpp"
channels = 16
likelihood = "categorical"
[model.pixelcnnpp]
resnets = 2
dropout = 0.0
[data]
dataset = "synthetic"
synthetic_size = 16
synthetic_images = 16
[train]
epochs = 1
batch_size = 16
[sample]
grid = 12
"#;
    std::fs::write(d.join("slow.toml"), slow_grid).unwrap();
    let child = pixel_in_background(d, &["run", "slow.toml"]);
    // The epoch's checkpoint is written before its grid is drawn.
    let checkpoint = d.join("results/slow/checkpoints/0001-000000");
    wait_for(&checkpoint, 120, "the epoch never ended");
    let signalled = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let stopped_after = signalled.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("sample grid of epoch 1 was not finished"),
        "{}",
        text(&out)
    );
    assert!(!d.join("results/slow/samples/epoch-0001.png").exists());
    let info = std::fs::read_to_string(d.join("results/slow/run.json")).unwrap();
    assert!(info.contains("\"status\": \"completed\""), "{info}");
    // The whole grid takes many times longer (144 images of 256 pixels, a pass per pixel).
    assert!(stopped_after.as_secs() < 20, "{stopped_after:?}");
    // The epoch is there for `pixel eval` and `pixel sample` (which would draw the same grid).
    let out = pixel(d, &["eval", "results/slow"]);
    assert!(out.status.success(), "{}", text(&out));
}
