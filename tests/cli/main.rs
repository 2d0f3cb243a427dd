//! One integration binary: drives the real `pixel` CLI in temporary folders, and checks the files
//! that users see (schema, experiments, bundled data). One module per command or concern; the
//! helpers and the small experiments they share are here.

mod errors;
mod export;
mod files;
mod resume;
mod run;
mod sweep;
mod trained;

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

/// `pixel ARGS` started in `dir` in the background, its output piped.
fn pixel_in_background(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_pixel"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("PIXEL_DATA")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pixel starts")
}

/// Waits until `path` exists, failing the test with `what` after `seconds`.
fn wait_for(path: &Path, seconds: u64, what: &str) {
    let t0 = std::time::Instant::now();
    while !path.exists() {
        assert!(t0.elapsed().as_secs() < seconds, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
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

fn png_size(path: &Path) -> (u32, u32, png::ColorType) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    (info.width, info.height, info.color_type)
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
