//! `pixel bench`: training throughput, forward latency, the time to sample a grid and peak memory
//! for one experiment on its backend, measured the same way on every backend.

use crate::cluster::World;
use crate::error::{Error, Result};
use crate::experiment::{Override, Plan, plan_file};
use crate::rng::{self, Purpose};
use crate::sample;
use crate::session::{Session, Weights};
use crate::train::{self, PassStats, StepPhases};
use burn::module::Module;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Serialize, Debug)]
pub struct Report {
    pub experiment: String,
    pub device: String,
    pub precision: String,
    /// The global batch, split over `ranks` processes.
    pub batch_size: usize,
    pub ranks: usize,
    pub steps: usize,
    /// Median seconds per optimisation step.
    pub seconds_per_step: f64,
    pub train_images_per_second: f64,
    /// Median milliseconds of one forward pass over a batch, without gradients.
    pub forward_ms: f64,
    /// Median milliseconds of each phase of a training step (one process only): where the
    /// time of `seconds_per_step` goes. `bench/pytorch_*.py` report the same phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_phases_ms: Option<StepPhases>,
    /// Seconds to sample the experiment's grid with the cached sampler (None when skipped).
    pub grid_seconds: Option<f64>,
    /// The same grid with the naive sampler, one forward pass per sub-pixel (None unless asked).
    pub naive_grid_seconds: Option<f64>,
    /// Share of the timed steps spent in collectives (the all-reduce and waiting for the other
    /// ranks); 0 for one process.
    pub collective_share: f64,
    /// Of that, the share spent waiting for the slowest rank (a barrier before the all-reduce);
    /// the rest is the all-reduce itself.
    pub waiting_share: f64,
    /// Peak resident memory of the process, MiB (Linux only); with several ranks the largest.
    pub peak_rss_mib: Option<f64>,
    /// With several ranks: each rank's peak resident memory, MiB.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peak_rss_mib_per_rank: Vec<f64>,
    /// On CUDA: the most memory held in tensors on the GPU during the steps and forward passes,
    /// MiB, as the twins' `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`;
    /// with several ranks the largest. None off CUDA.
    pub peak_gpu_mib: Option<f64>,
    /// With `runtime.cuda_graph`: the steps (warm-up included) captured as a CUDA graph,
    /// replayed from it and run eagerly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graph: Option<train::GraphCounts>,
    /// f16: the timed steps skipped because their gradients overflowed (their time is in
    /// `seconds_per_step`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<usize>,
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

/// What `pixel bench` measures besides the timed training steps.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Timed training steps and forward passes (after two of warm-up each).
    pub steps: usize,
    /// Time the cached sampler's grid, and the naive sampler's.
    pub grid: bool,
    pub naive_grid: bool,
    /// Wait for the device at each phase boundary of a step.
    pub sync: bool,
    /// Profile [`PROFILED_STEPS`] more steps after the timed ones with libtorch's profiler and
    /// write its Chrome trace here.
    pub profile: Option<std::path::PathBuf>,
}

/// Training steps `--profile` records, after the timed ones (whose times it would change).
pub const PROFILED_STEPS: usize = 3;

/// `pixel bench FILE`: measures the experiment and prints a Markdown row and the JSON report.
pub fn bench(experiment: &Path, sets: &[Override], options: &Options, world: &World) -> Result<()> {
    let plan = crate::session::agree(world, plan_file(experiment, sets))?;
    if let Some(path) = &options.profile {
        check_profile(path, &plan, world)?;
    }
    let report = run(plan, options, world)?;
    if !world.is_root() {
        return Ok(());
    }
    println!(
        "| experiment | device | precision | batch | s/step | train images/s | forward ms | grid s | naive grid s | peak MiB |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n{}",
        report.markdown_row()
    );
    if let Some(p) = &report.step_phases_ms {
        println!(
            "step phases (median ms): forward {:.1}, loss {:.1}, backward {:.1}, update {:.1}",
            p.forward, p.loss, p.backward, p.update
        );
    }
    if let Some(n) = report.skipped_steps.filter(|&n| n > 0) {
        println!(
            "f16: {n} of {} timed steps skipped (their gradients overflowed; the loss scale \
             halved each time)",
            report.steps
        );
    }
    if let Some(c) = &report.cuda_graph {
        println!(
            "CUDA graph: {} step(s) captured, {} replayed, {} eager (warm-up included; a \
             replayed step has no phases)",
            c.captured, c.replayed, c.eager
        );
    }
    println!(
        "{}",
        serde_json::to_string(&report).expect("a report serialises")
    );
    if report.device.starts_with("libtorch:cuda") && report.peak_gpu_mib.is_none() {
        eprintln!(
            "note: no peak GPU memory: libtorch's CUDA allocator did not report its statistics \
             (a build without them says so in a warning when it is built)"
        );
    }
    Ok(())
}

/// Runs `steps` timed training steps (after two for warm-up; with `runtime.cuda_graph` four, the
/// capture's step included, so that the timed ones replay) on the ranks of `world`, then on
/// rank 0 as many forward passes, and optionally one sample grid with each sampler.
pub fn run(plan: Plan, options: &Options, world: &World) -> Result<Report> {
    let steps = options.steps.max(1);
    let session = Session::open(plan, Weights::Initial, world)?;
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
    opened.reset_gpu_peak();
    let mut times = Vec::new();
    let mut phases = Vec::new();
    let (mut collective, mut waiting) = (0.0, 0.0);
    world.separate_waiting(true);
    let step = train::Step {
        sync_phases: options.sync,
        ..plan.step(1)
    };
    // One training step of `batch` images.
    let one_step = |state| {
        let work = train::Epoch {
            images: &splits.train,
            order: &order,
            step,
            device: &train_device,
            start_step: 0,
            so_far: PassStats::default(),
            stop: &|| false,
            world,
        };
        let (mut step_phases, mut skipped) = (None, false);
        let (next, _, _) = train::train_epoch(state, work, |r| {
            step_phases = r.phases;
            skipped = r.skipped;
        })
        .map_err(Error::Run)?;
        Ok::<_, Error>((next, step_phases, skipped))
    };
    let cuda_graph = plan.experiment.runtime.cuda_graph;
    let warm_up = if cuda_graph { 4 } else { 2 };
    let mut skipped_steps = 0;
    for i in 0..steps + warm_up {
        let start = Instant::now();
        let (before, waited) = (world.collective_seconds(), world.waiting_seconds());
        let (next, step_phases, skipped) = one_step(state)?;
        state = next;
        if i >= warm_up {
            skipped_steps += usize::from(skipped);
            times.push(start.elapsed().as_secs_f64());
            phases.extend(step_phases);
            collective += world.collective_seconds() - before;
            waiting += world.waiting_seconds() - waited;
        }
    }
    world.separate_waiting(false);
    let collective_share = collective / times.iter().sum::<f64>();
    let waiting_share = waiting / times.iter().sum::<f64>();
    let seconds_per_step = median(times);
    let phase = |f: fn(&StepPhases) -> f64| median(phases.iter().map(f).collect()) * 1e3;
    // Phases of every timed step or none (replayed steps have none).
    let step_phases_ms = (phases.len() == steps).then(|| StepPhases {
        forward: phase(|p| p.forward),
        loss: phase(|p| p.loss),
        backward: phase(|p| p.backward),
        update: phase(|p| p.update),
    });

    // Rank 0 alone measures inference while the others wait.
    let root = world.is_root();
    let valid = state.model.valid();
    let inference = opened.device.clone();
    let forward = match root {
        true => forward_ms(&valid, &splits.test, batch, steps, t.seed, &inference),
        false => Vec::new(),
    };

    let (_, peak_gpu_mib) = every_rank(
        world,
        opened
            .gpu_peak_bytes()
            .map(|b| b as f64 / f64::from(1 << 20)),
    );

    let time_grid = |method| {
        let mut rng = rng::stream(t.seed, Purpose::Sampling, 0, 0);
        let start = Instant::now();
        sample::grid(
            &valid,
            &splits.test,
            plan.experiment.sample.grid,
            (method, plan.experiment.sample.temperature),
            &mut rng,
            &inference,
        );
        start.elapsed().as_secs_f64()
    };
    let grid_seconds = (options.grid && root).then(|| time_grid(sample::Method::Cached));
    let naive_grid_seconds = (options.naive_grid && root).then(|| time_grid(sample::Method::Naive));
    let (per_rank, peak_rss_mib) = every_rank(world, peak_rss_mib());
    // Last, so that the profiler's own memory and time are in no measure above.
    if let Some(path) = &options.profile {
        let profiler = opened.start_profiler().map_err(Error::Run)?;
        for _ in 0..PROFILED_STEPS {
            let _range = profiler.range("step");
            state = one_step(state)?.0;
        }
        // The last update's kernels, queued after the step's host read, into the trace.
        train_device
            .sync()
            .map_err(|e| Error::Run(format!("the device failed: {e:?}")))?;
        save_trace(profiler, path)?;
    }

    Ok(Report {
        experiment: plan.name.clone(),
        device: opened.description,
        precision: format!("{:?}", plan.device.precision).to_lowercase(),
        batch_size: batch,
        ranks: world.size(),
        steps,
        seconds_per_step,
        train_images_per_second: batch as f64 / seconds_per_step,
        forward_ms: if forward.is_empty() {
            0.0
        } else {
            median(forward)
        },
        step_phases_ms,
        grid_seconds,
        naive_grid_seconds,
        collective_share,
        waiting_share,
        peak_rss_mib,
        peak_rss_mib_per_rank: if world.size() > 1 {
            per_rank
        } else {
            Vec::new()
        },
        peak_gpu_mib,
        cuda_graph: cuda_graph.then(|| state.inputs.graph.counts()),
        skipped_steps: state.loss_scale.is_some().then_some(skipped_steps),
    })
}

/// Refuses `--profile PATH` before anything runs where it cannot be written: another backend
/// than libtorch, several ranks, or a folder that is not there.
fn check_profile(path: &Path, plan: &Plan, world: &World) -> Result<()> {
    use crate::device::BackendKind;
    let usage = |message: String| Error::Usage {
        flag: format!("--profile {}", path.display()),
        message,
    };
    // `auto` is libtorch wherever libtorch is compiled in.
    let libtorch = match plan.device.backend {
        BackendKind::Libtorch => true,
        BackendKind::Auto => cfg!(feature = "tch"),
        BackendKind::Flex => false,
    };
    if !libtorch {
        return Err(usage(format!(
            "the profiler is libtorch's, and this run's backend is {}{}; expected --set \
             runtime.backend=libtorch (in a build with --features tch)",
            plan.device.backend.name(),
            match plan.device.backend {
                BackendKind::Auto => " (flex: this build has no libtorch)",
                _ => "",
            }
        )));
    }
    if world.size() > 1 {
        return Err(usage(
            "expected one process: the profile is of one process's steps".into(),
        ));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() || path.is_dir() {
        return Err(usage(format!(
            "expected a file in a folder that exists ({} is not a folder{})",
            folder.display(),
            if path.is_dir() {
                ", or the path is one"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// Saves the profiler's trace at `path` through a temporary file beside it, so that a trace
/// there is whole.
fn save_trace(profiler: crate::device::Profiler, path: &Path) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    profiler.save(&partial).map_err(Error::Run)?;
    std::fs::rename(&partial, path).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Error::Run(format!("could not write {}: {e}", path.display()))
    })
}

/// Every rank's value (0 where a rank has none), and the largest where this rank has one.
fn every_rank(world: &World, mine: Option<f64>) -> (Vec<f64>, Option<f64>) {
    let all: Vec<f64> = world
        .gather_u64(mine.unwrap_or(0.0).to_bits())
        .into_iter()
        .map(f64::from_bits)
        .collect();
    let largest = all
        .iter()
        .copied()
        .reduce(f64::max)
        .filter(|_| mine.is_some());
    (all, largest)
}

/// Milliseconds of each timed forward pass over a batch of test images (after two of warm-up).
fn forward_ms(
    valid: &crate::model::Model,
    test: &crate::data::Images,
    batch: usize,
    steps: usize,
    seed: u64,
    device: &burn::tensor::Device,
) -> Vec<f64> {
    let indices: Vec<usize> = (0..batch).map(|i| i % test.len()).collect();
    let mut forward = Vec::new();
    for i in 0..steps + 2 {
        let b = train::Batch::gather(test, &indices, device);
        let start = Instant::now();
        // A PixelVAE encodes, then decodes: what evaluating a batch costs.
        let mut rng = rng::stream(seed, Purpose::EvalNoise, 0, 0);
        let (prediction, _) = valid.forward_with_kl(b.input, &b.context, &mut rng);
        let sum: f32 = prediction.values().sum().into_scalar();
        std::hint::black_box(sum);
        if i >= 2 {
            forward.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    forward
}

impl Report {
    /// A Markdown table row: experiment, device, precision, batch, s/step, images/s, forward ms,
    /// grid seconds (cached, naive), peak MiB (on the GPU on CUDA, as the twins print it).
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
            match (self.peak_gpu_mib, self.peak_rss_mib) {
                (Some(gpu), _) => format!("{gpu:.0} GPU"),
                (None, rss) => rss.map_or("-".into(), |m| format!("{m:.0}")),
            },
        )
    }
}
