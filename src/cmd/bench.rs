//! `pixel bench`: training throughput, forward latency, the time to sample a grid and peak memory
//! for one experiment on its backend, measured the same way on every backend.

use crate::error::{Error, Result};
use crate::experiment::{Override, Plan, plan_file};
use crate::rng::{self, Purpose};
use crate::sample;
use crate::session::{Session, Weights};
use crate::train::{self, PassStats};
use burn::module::Module;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Serialize, Debug)]
pub struct Report {
    pub experiment: String,
    pub device: String,
    pub precision: String,
    pub batch_size: usize,
    pub steps: usize,
    /// Median seconds per optimisation step.
    pub seconds_per_step: f64,
    pub train_images_per_second: f64,
    /// Median milliseconds of one forward pass over a batch, without gradients.
    pub forward_ms: f64,
    /// Seconds to sample the experiment's grid with the cached sampler (None when skipped).
    pub grid_seconds: Option<f64>,
    /// The same grid with the naive sampler, one forward pass per sub-pixel (None unless asked).
    pub naive_grid_seconds: Option<f64>,
    /// Peak resident memory of the process, MiB (Linux only).
    pub peak_rss_mib: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set size from /proc/self/status, in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `pixel bench FILE`: measures the experiment and prints a Markdown row and the JSON report.
pub fn bench(
    experiment: &Path,
    sets: &[Override],
    steps: usize,
    with_grid: bool,
    with_naive: bool,
) -> Result<()> {
    let plan = plan_file(experiment, sets)?;
    let report = run(plan, steps.max(1), with_grid, with_naive)?;
    println!(
        "| experiment | device | precision | batch | s/step | train images/s | forward ms | grid s | naive grid s | peak MiB |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n{}",
        report.markdown_row()
    );
    println!(
        "{}",
        serde_json::to_string(&report).expect("a report serialises")
    );
    Ok(())
}

/// Runs `steps` timed training steps (after two for warm-up), as many forward passes, and
/// optionally one sample grid with each sampler.
pub fn run(plan: Plan, steps: usize, with_grid: bool, with_naive: bool) -> Result<Report> {
    let session = Session::open(plan, Weights::Initial)?;
    let train_device = session.train_device();
    let Session {
        plan,
        device: opened,
        splits,
        mut state,
        ..
    } = session;
    let t = &plan.experiment.train;
    let batch = t.batch_size;
    let order: Vec<usize> = (0..batch).map(|i| i % splits.train.len()).collect();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let start = Instant::now();
        let work = train::Epoch {
            images: &splits.train,
            order: &order,
            step: plan.step(1),
            device: &train_device,
            start_step: 0,
            so_far: PassStats::default(),
            stop: &|| false,
        };
        let (next, _, _) = train::train_epoch(state, work, |_| {}).map_err(Error::Run)?;
        state = next;
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let seconds_per_step = median(times);

    let valid = state.model.valid();
    let inference = opened.device.clone();
    let indices: Vec<usize> = (0..batch).map(|i| i % splits.test.len()).collect();
    let mut forward = Vec::new();
    for i in 0..steps + 2 {
        let b = train::Batch::gather(&splits.test, &indices, &inference);
        let start = Instant::now();
        // A PixelVAE encodes, then decodes: what evaluating a batch costs.
        let mut rng = rng::stream(t.seed, Purpose::EvalNoise, 0, 0);
        let (logits, _) = valid.forward_with_kl(b.input, &b.context, &mut rng);
        let sum: f32 = logits.sum().into_scalar();
        std::hint::black_box(sum);
        if i >= 2 {
            forward.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }

    let time_grid = |method| {
        let mut rng = rng::stream(t.seed, Purpose::Sampling, 0, 0);
        let start = Instant::now();
        sample::grid(
            &valid,
            &splits.test,
            plan.experiment.sample.grid,
            method,
            plan.experiment.sample.temperature,
            &mut rng,
            &inference,
        );
        start.elapsed().as_secs_f64()
    };
    let grid_seconds = with_grid.then(|| time_grid(sample::Method::Cached));
    let naive_grid_seconds = with_naive.then(|| time_grid(sample::Method::Naive));

    Ok(Report {
        experiment: plan.name.clone(),
        device: opened.description,
        precision: format!("{:?}", plan.device.precision).to_lowercase(),
        batch_size: batch,
        steps,
        seconds_per_step,
        train_images_per_second: batch as f64 / seconds_per_step,
        forward_ms: median(forward),
        grid_seconds,
        naive_grid_seconds,
        peak_rss_mib: peak_rss_mib(),
    })
}

impl Report {
    /// A Markdown table row: experiment, device, precision, batch, s/step, images/s, forward ms,
    /// grid seconds (cached, naive), peak MiB.
    pub fn markdown_row(&self) -> String {
        let seconds = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1}"));
        format!(
            "| {} | {} | {} | {} | {:.3} | {:.1} | {:.1} | {} | {} | {} |",
            self.experiment,
            self.device,
            self.precision,
            self.batch_size,
            self.seconds_per_step,
            self.train_images_per_second,
            self.forward_ms,
            seconds(self.grid_seconds),
            seconds(self.naive_grid_seconds),
            self.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0}")),
        )
    }
}
