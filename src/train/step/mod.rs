//! One training step, the same for one process and for N ranks (one process is a world of one):
//! each rank's forward and backward pass over its share of the global batch, the ranks'
//! agreement (their gradients, the batch's nats and the decision to stop, summed in one
//! exchange), and the update every rank then takes alike. The global batch's loss is the mean
//! over all its sub-pixels whatever the number of ranks: each rank divides its nats by the global
//! batch's sub-pixels, and the sum of the ranks' gradients is the gradient of the whole. A world
//! of one exchanges nothing: its gradients stay on the device, clipping's factor is computed
//! there, and the step reads the host once, after the update (the gradients' square sum and the
//! batch's nats together), so that a GPU runs the update right behind the backward pass instead
//! of waiting for the host's decision. A loss or gradient that is not finite then stops the run
//! with the step's update dropped: the state is not returned. In f16, whose overflowing steps
//! are skipped and the run goes on, the device decides: on libtorch the loss scale is staged
//! in a buffer, and the optimizer's step and the average's update are taken where the
//! gradients' square sum is finite and changed by nothing where it is not (the host counts
//! the skip once it reads the sum). The read comes before the update over several ranks, in
//! f16 off libtorch and before Adam's moments exist, and for the f16 step whose skip would
//! stop the run (`train.max_skipped_steps`), so that the error can name the parameter.

mod graph;

use super::Ema;
use super::loss_scale::{self, GradientNorm};
use super::{Batch, TrainState};
use crate::cluster::World;
use crate::data::Images;
use crate::loss::nll_nats;
use crate::model::{Model, vae};
use crate::optim::{Flat, Layout, Optimizer, f32_flat};
use crate::rng::Purpose;
use burn::optim::GradientsParams;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
pub use graph::{GraphCounts, StepGraph};
use rand::rngs::StdRng;
use std::time::Instant;

/// How each optimisation step is taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub batch_size: usize,
    /// The learning rate of the run's first step, and the factor it is multiplied by after each.
    pub learning_rate: f64,
    pub lr_decay: f64,
    /// Gradients whose global norm exceeds this are rescaled to it (0: never).
    pub clip_grad_norm: f64,
    /// The run's seed and this epoch (from 1): a PixelVAE's noise for step i of the epoch comes
    /// from a generator seeded by the three, so that a resumed run draws the same noise.
    pub seed: u64,
    pub epoch: usize,
    /// PixelVAE: steps of linear KL warm-up (0 = none) and free bits in nats per latent dimension.
    pub kl_warmup_steps: usize,
    pub free_bits: f64,
    /// f16: the steps skipped in a row (gradients that overflow) after which the run stops.
    pub max_skipped_steps: usize,
    /// Wait for the device at each phase boundary (`pixel bench --sync`), so that
    /// [`StepPhases`] are the device's time rather than the host's.
    pub sync_phases: bool,
    /// Capture the step of one process on libtorch CUDA once as a CUDA graph and replay it
    /// (`runtime.cuda_graph`; see [`graph`]). Ignored elsewhere (the plan refuses it).
    pub cuda_graph: bool,
}

impl Step {
    /// Where the dropout masks of global step `n` come from, for the images of the global batch
    /// from `first` on (a network without dropout draws none).
    pub fn dropout(&self, n: usize, first: usize) -> crate::model::DropoutDraws {
        crate::model::DropoutDraws {
            seed: self.seed,
            step: n as u64,
            first: first as u64,
            staged: None,
        }
    }

    /// The learning rate of step `n` of the run (from 1): `learning_rate * lr_decay^(n-1)`.
    pub fn learning_rate_at(&self, n: usize) -> f64 {
        if self.lr_decay == 1.0 {
            self.learning_rate
        } else {
            self.learning_rate * self.lr_decay.powf(n.saturating_sub(1) as f64)
        }
    }

    /// The KL weight at step `n` of the run (from 1).
    pub fn kl_weight(&self, n: usize) -> f64 {
        if self.kl_warmup_steps == 0 {
            1.0
        } else {
            (n as f64 / self.kl_warmup_steps as f64).min(1.0)
        }
    }
}

/// What `train_epoch` reports after each step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Steps of this epoch taken so far, this one included.
    pub step: usize,
    pub images_done: usize,
    /// The step's batch, in bits per dimension (negative ELBO for a PixelVAE).
    pub bits_per_dim: f64,
    /// f16: the loss scale after the step.
    pub loss_scale: Option<f64>,
    /// The global L2 norm of the (unscaled) gradients before clipping; not finite for a skipped
    /// f16 step.
    pub gradient_norm: f64,
    /// f16: the step was skipped because its gradients overflowed.
    pub skipped: bool,
    /// The learning rate of the step.
    pub learning_rate: f64,
    /// Where the step's time went, measured in one process only (with several ranks the
    /// phases interleave with the all-reduce; `pixel bench` reports its share instead).
    pub phases: Option<StepPhases>,
}

/// Seconds of one training step in each of its phases. Backends that queue work (CUDA) are
/// timed when they hand it over, not when it runs, unless [`Step::sync_phases`] asks to wait for
/// the device at each boundary; on the CPU each operation finishes before the next starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// The batch's tensors and the model's forward pass.
    pub forward: f64,
    /// The negative log-likelihood (and a PixelVAE's KL term).
    pub loss: f64,
    /// The backward pass.
    pub backward: f64,
    /// The gradient norm, clipping, the optimizer's step, the EMA's update, and the read of the
    /// loss and the norm on the host (one wait for the device; in f16 and over several ranks it
    /// comes before the update).
    pub update: f64,
}

/// Which step of the run to take, on which images.
pub(super) struct StepAt<'a> {
    pub images: &'a Images,
    /// The global batch: every rank's images, in order.
    pub indices: &'a [usize],
    /// The step's place in its epoch (from 0) and in the run (from 1).
    pub i: usize,
    pub run_step: usize,
}

/// What one step did, the same on every rank.
pub(super) struct Taken {
    /// Nats of the global batch, and for a PixelVAE its KL nats and weight.
    pub nats: f64,
    pub kl_nats: Option<f64>,
    pub kl_weight: Option<f64>,
    /// The global norm of the unscaled gradients before clipping (not finite when skipped).
    pub gradient_norm: f64,
    /// f16: no update was taken, the gradients overflowed.
    pub skipped: bool,
    pub learning_rate: f64,
    /// Whether any rank was asked to stop.
    pub stop: bool,
    /// One process only: where the time went.
    pub phases: Option<StepPhases>,
}

/// Takes step `at` of the run on this rank's share of its global batch, agrees with the other
/// ranks, and updates the state as they all do. `stop` is asked once, before the agreement.
/// Errors name the step: a loss that is not finite; gradients that are not finite in f32 and
/// bf16, or in f16 more than `step.max_skipped_steps` times in a row; a CUDA graph that could not
/// be captured or replayed.
pub(super) fn take(
    state: TrainState,
    at: StepAt,
    step: &Step,
    stop: &dyn Fn() -> bool,
    world: &World,
    device: &Device,
) -> Result<(TrainState, Taken), String> {
    let TrainState {
        mut model,
        mut optimizer,
        mut loss_scale,
        mut ema,
        mut inputs,
    } = state;
    let (images, indices, i, run_step) = (at.images, at.indices, at.i, at.run_step);
    let mut clock = Clock::new(step.sync_phases, device, i);
    let share = world.share(indices.len());
    let local = &indices[share.clone()];
    let latent = model.latent_shape(images.height, images.width);
    let kl_weight = latent.map(|_| step.kl_weight(run_step));
    let inner = device.clone().without_autodiff();
    let learning_rate = step.learning_rate_at(run_step);
    let work = Work {
        step,
        world,
        global_images: indices.len(),
        global_dims: (indices.len() * images.dims()) as f64,
        kl_weight,
        scale: loss_scale.as_ref().map(|ls| ls.scale),
    };
    // f16 on libtorch: whether the device decides to skip the step (the loss scale staged, the
    // update masked), so that one process reads the host after the update as in f32 and bf16.
    // Not where a skip would stop the run: that step reads first, to name the parameter.
    let masked = loss_scale.as_ref().is_some_and(|ls| {
        ls.skipped_in_a_row < step.max_skipped_steps
            && optimizer.decides_on_device(&inner)
            && !host_decides()
    });
    // What the step takes from the host, written before its work on the device.
    let stage_all = |inputs: &mut super::StepInputs,
                     optimizer: &mut Optimizer,
                     ema: Option<&mut Ema>,
                     model: &Model| {
        let mut staged = stage(inputs, &at, share.clone(), step, model, device);
        if let (true, Some(scale)) = (masked, work.scale) {
            let values = [scale as f32, (1.0 / scale) as f32];
            staged.scale = Some(inputs.loss_scale.write_on(&values, device));
        }
        optimizer.stage(learning_rate, &inner);
        if let Some(ema) = ema {
            ema.stage(run_step, &inner);
        }
        staged
    };
    let (agreed, finite) = if world.size() == 1 && (loss_scale.is_none() || masked) {
        // Update first, read after: an error drops the state, so the update need not wait.
        let staged = stage_all(&mut inputs, &mut optimizer, ema.as_mut(), &model);
        let update = Update {
            learning_rate,
            clip: step.clip_grad_norm,
            run_step,
            masked,
        };
        let index = crate::model::native::cuda_index(device).filter(|_| step.cuda_graph);
        let plan = match index {
            Some(_) => {
                let numbers = numbers(&work, local.len());
                let signature = signature(numbers, &model, &optimizer, ema.as_mut(), &inputs);
                inputs.graph.plan(signature, run_step)
            }
            None => graph::Plan::Eager,
        };
        // The step's work on the device, run eagerly or captured.
        let work_on_device = |model, optimizer: &mut Optimizer, ema, clock: &mut Clock| {
            one_process(&work, model, optimizer, ema, staged, update, stop(), clock)
        };
        let pending = match plan {
            graph::Plan::Eager => {
                let pending;
                (model, pending) = work_on_device(model, &mut optimizer, ema.as_mut(), &mut clock);
                pending
            }
            graph::Plan::Warm => {
                let index = index.expect("planned on CUDA");
                inputs.graph.warm(index).map_err(|e| graph_error(i, &e))?;
                let pending;
                (model, pending) = work_on_device(model, &mut optimizer, ema.as_mut(), &mut clock);
                inputs.graph.cool().map_err(|e| graph_error(i, &e))?;
                pending
            }
            graph::Plan::Capture => {
                let index = index.expect("planned on CUDA");
                // Nothing may wait for the device while capturing.
                clock.sync = false;
                let capture = || -> Result<(Model, Pending), String> {
                    inputs.graph.begin(index)?;
                    let captured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        work_on_device(model, &mut optimizer, ema.as_mut(), &mut clock)
                    }));
                    let (model, pending) = captured.map_err(|panic| {
                        inputs.graph.abandon();
                        panic_message(&panic)
                    })?;
                    let (square_sum, totals) = (pending.square_sum.clone(), pending.totals.clone());
                    inputs.graph.end(run_step, square_sum, totals)?;
                    Ok((model, pending))
                };
                let captured = match std::env::var_os(GRAPH_TRACE) {
                    None => capture(),
                    Some(path) => {
                        let (lines, captured) =
                            crate::model::native::graph::operator_trace(capture);
                        let text = lines.map_or_else(|e| e + "\n", |l| l.join("\n") + "\n");
                        if let Err(e) = std::fs::write(&path, text) {
                            let path = std::path::Path::new(&path).display();
                            tracing::warn!("{GRAPH_TRACE}={path} could not be written: {e}");
                        }
                        captured
                    }
                };
                let pending;
                (model, pending) = captured.map_err(|e| graph_error(i, &e))?;
                clock.no_phases();
                pending
            }
            graph::Plan::Replay => {
                drop(work_on_device);
                // What the captured step did on the host besides its work on the device.
                optimizer.replayed(masked);
                if let Some(ema) = ema.as_mut() {
                    ema.replayed();
                }
                let (square_sum, totals) = inputs.graph.replay().map_err(|e| graph_error(i, &e))?;
                clock.no_phases();
                Pending {
                    square_sum,
                    totals,
                    weights: optimizer.last_weights().filter(|_| !masked),
                    stop: stop(),
                }
            }
        };
        let agreed = pending.read(&model);
        let loss = agreed.totals.iter().sum();
        let finite = check_finite(loss, &agreed.norm, loss_scale.as_mut(), &model, i, step)?;
        optimizer.settle(finite);
        (agreed, finite)
    } else {
        if let (true, Some(_)) = (step.cuda_graph, crate::model::native::cuda_index(device)) {
            // An f16 step that reads first (see the module's documentation) runs eagerly.
            inputs.graph.plan(None, run_step);
        }
        let (grads, totals) = if local.is_empty() {
            // A rank without images this step (a global batch smaller than the world) adds
            // zeros, to the free bits' sums too.
            if let (Some([c, h, w]), true) = (latent, step.free_bits > 0.0) {
                sum_over_ranks(Tensor::<4>::zeros([1, c, h, w], &inner), world);
            }
            (
                None,
                Tensor::zeros([1 + usize::from(latent.is_some())], &inner),
            )
        } else {
            let staged = stage_all(&mut inputs, &mut optimizer, ema.as_mut(), &model);
            crate::model::native::trace_mark(c"step: device");
            let (grads, totals) = forward_backward(&work, &model, staged, &mut clock);
            (Some(grads), totals)
        };
        // Unscaled (f16) and measured: the norm is what a step's update is made of.
        let scale = work.scale.unwrap_or(1.0);
        let (mut grads, agreed) = agree(&model, grads, totals, stop(), 1.0 / scale, world, &inner);
        let loss = agreed.totals.iter().sum();
        let norm = agreed.norm;
        let finite = check_finite(loss, &norm, loss_scale.as_mut(), &model, i, step)?;
        if finite {
            if step.clip_grad_norm > 0.0 && norm.norm > step.clip_grad_norm {
                grads.values = grads.values * (step.clip_grad_norm / norm.norm);
            }
            let (next, weights) = optimizer.step(learning_rate, model, grads);
            model = next;
            // These gradients are made afresh each step (from the ranks' sum, or scaled): the
            // buffer they leave would be held to no use.
            optimizer.release_gradients();
            if let Some(ema) = ema.as_mut() {
                ema.update(&weights, &model, run_step, None);
            }
        }
        (agreed, finite)
    };
    let nats = agreed.totals[0];
    let kl_nats = latent.map(|_| agreed.totals[1]);
    let norm = agreed.norm;
    let phases = clock.phases()?.filter(|_| world.size() == 1);
    let state = TrainState {
        model,
        optimizer,
        loss_scale,
        ema,
        inputs,
    };
    let taken = Taken {
        nats,
        kl_nats,
        kl_weight,
        gradient_norm: norm.norm,
        skipped: !finite,
        learning_rate,
        stop: agreed.stop,
        phases,
    };
    Ok((state, taken))
}

/// What every part of a step needs to know of it.
struct Work<'a> {
    step: &'a Step,
    world: &'a World,
    /// The global batch's images and sub-pixels (the loss is their mean).
    global_images: usize,
    global_dims: f64,
    kl_weight: Option<f64>,
    /// f16: the loss scale.
    scale: Option<f64>,
}

thread_local! {
    /// Set by tests only: f16 steps read the host before their update, as where the device
    /// cannot decide, to compare the two.
    static HOST_DECIDES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test asked f16 steps to read the host first ([`HOST_DECIDES`]).
fn host_decides() -> bool {
    HOST_DECIDES.with(|h| h.get())
}

/// What a step took from the host, written into buffers that live across steps before its work
/// on the device (on libtorch; elsewhere uploaded).
struct Staged {
    uploaded: super::Uploaded,
    draws: crate::model::DropoutDraws,
    noise: Option<Tensor<1>>,
    /// f16 decided on the device: the loss scale and its inverse (`[2]`).
    scale: Option<Tensor<1>>,
}

/// Writes what step `at` takes from the host for this rank's part of its global batch (`share`):
/// its images, the dropout masks' keys and a PixelVAE's noise. (The update's scalars are the
/// optimizer's and the average's to stage.)
fn stage(
    inputs: &mut super::StepInputs,
    at: &StepAt,
    share: std::ops::Range<usize>,
    step: &Step,
    model: &Model,
    device: &Device,
) -> Staged {
    let inner = device.clone().without_autodiff();
    let images = at.images;
    let uploaded = Batch::upload(
        images,
        &at.indices[share.clone()],
        device,
        Some(&mut inputs.batch),
    );
    let mut draws = step.dropout(at.run_step, share.start);
    if let Some(masks) = model.dropout_masks()
        && crate::model::native::runs_fused(&inner)
    {
        let keys: Vec<f32> = draws.keys(masks).into_iter().map(f32::from_bits).collect();
        draws.staged = Some(inputs.dropout_keys.write_on(&keys, device));
    }
    // The noise of the whole global batch from the step's stream, of which this rank takes its
    // images' part: the same draws as one process makes for them.
    let noise = model
        .latent_shape(images.height, images.width)
        .map(|[c, h, w]| {
            let per_image = c * h * w;
            let mut rng = noise_rng(step.seed, step.epoch, at.i);
            let all = vae::standard_normal(&mut rng, at.indices.len() * per_image);
            let mine = &all[share.start * per_image..share.end * per_image];
            if crate::model::native::runs_fused(&inner) {
                inputs.noise.write_on(mine, device)
            } else {
                Tensor::from_data(TensorData::new(mine.to_vec(), [mine.len()]), device)
            }
        });
    Staged {
        uploaded,
        draws,
        noise,
        scale: None,
    }
}

/// The forward pass, the loss and the backward pass of this rank's images: the gradients, and
/// the totals still on the device (the images' nats, and a PixelVAE's KL nats).
fn forward_backward(
    work: &Work,
    model: &Model,
    staged: Staged,
    clock: &mut Clock,
) -> (GradientsParams, Tensor<1>) {
    let Staged {
        uploaded,
        draws,
        noise,
        scale,
    } = staged;
    let mut batch = uploaded.batch();
    batch.context.dropout = Some(draws);
    let (logits, kl) = model.forward_with_noise(batch.input, &batch.context, |shape, _| {
        noise.expect("a PixelVAE has a latent shape").reshape(shape)
    });
    clock.mark(0);
    let nats = nll_nats(logits, batch.target);
    // The batch's nats (and KL), read with the gradients' norm after the backward pass.
    let mut totals = vec![nats.clone().inner().cast(FloatDType::F32)];
    let mut loss = nats;
    if let (Some(kl), Some(weight)) = (kl, work.kl_weight) {
        totals.push(kl.clone().sum().inner().cast(FloatDType::F32));
        loss = loss + kl_penalty(kl, work.step.free_bits, work.global_images, work.world) * weight;
    }
    let mut loss = loss / work.global_dims;
    if let Some(staged) = scale {
        loss = loss * staged.narrow(0, 0, 1);
    } else if let Some(scale) = work.scale {
        loss = loss * scale;
    }
    clock.mark(1);
    let grads = GradientsParams::from_grads(loss.backward(), model);
    clock.mark(2);
    (grads, Tensor::cat(totals, 0))
}

/// One process (in f16 where the device decides its skips), all of it on the device (what a
/// CUDA graph captures): the forward and backward passes, unscaling, clipping, the optimizer's
/// step and the average's update. The model and what is left to read.
#[allow(clippy::too_many_arguments)]
fn one_process(
    work: &Work,
    model: Model,
    optimizer: &mut Optimizer,
    ema: Option<&mut Ema>,
    staged: Staged,
    update: Update,
    stop: bool,
    clock: &mut Clock,
) -> (Model, Pending) {
    // What a CUDA graph of the step captures begins here.
    crate::model::native::trace_mark(c"step: device");
    let unscale = staged
        .scale
        .as_ref()
        .map(|s| s.clone().inner().narrow(0, 1, 1));
    let (grads, totals) = forward_backward(work, &model, staged, clock);
    let mut grads = optimizer.flat_gradients(&model, grads);
    if let Some(unscale) = unscale {
        // In place: the gradients' buffer is the step's own.
        grads.values = grads.values * unscale;
    }
    gather(grads, totals, stop, 1.0).update(model, optimizer, ema, update)
}

/// The wall clock of a step and its phases' ends, waiting for the device at each where asked
/// (`pixel bench --sync`; never while a CUDA graph is captured).
struct Clock<'a> {
    started: Instant,
    sync: bool,
    device: &'a Device,
    i: usize,
    /// Seconds at the end of the forward pass, the loss and the backward pass.
    marks: [f64; 3],
    /// A captured or replayed step has no phases.
    whole: bool,
    failed: Option<String>,
}

impl<'a> Clock<'a> {
    fn new(sync: bool, device: &'a Device, i: usize) -> Clock<'a> {
        Clock {
            started: Instant::now(),
            sync,
            device,
            i,
            marks: [0.0; 3],
            whole: false,
            failed: None,
        }
    }

    fn now(&mut self) -> f64 {
        if self.sync
            && self.failed.is_none()
            && let Err(e) = self.device.sync()
        {
            self.failed = Some(format!("step {}: the device failed: {e:?}", self.i + 1));
        }
        self.started.elapsed().as_secs_f64()
    }

    fn mark(&mut self, k: usize) {
        self.marks[k] = self.now();
    }

    /// A captured or replayed step: its phases are not the device's (a capture queues nothing,
    /// a replay is one launch).
    fn no_phases(&mut self) {
        self.whole = true;
    }

    /// The phases (None for a captured or replayed step), or the device's failure.
    fn phases(mut self) -> Result<Option<StepPhases>, String> {
        let end = self.now();
        if let Some(e) = self.failed {
            return Err(e);
        }
        let m = self.marks;
        Ok((!self.whole).then(|| StepPhases {
            forward: m[0],
            loss: m[1] - m[0],
            backward: m[2] - m[1],
            update: end - m[2],
        }))
    }
}

/// What a CUDA graph's step depends on that could change (see [`graph`]), where the step can be
/// captured: Adam in place, the average made. None where it cannot yet. `numbers`: what its
/// kernels take from the host as arguments ([`numbers`]).
fn signature(
    numbers: Vec<u64>,
    model: &Model,
    optimizer: &Optimizer,
    ema: Option<&mut Ema>,
    inputs: &super::StepInputs,
) -> Option<graph::Signature> {
    let mut buffers = optimizer.graph_buffers(model)?;
    if let Some(ema) = ema {
        buffers.extend(ema.graph_buffers()?);
    }
    let staged = [
        &inputs.batch,
        &inputs.dropout_keys,
        &inputs.noise,
        &inputs.loss_scale,
    ];
    buffers.extend(staged.map(|b| b.address().map(|a| (a, 0))));
    Some(graph::Signature { numbers, buffers })
}

/// The numbers a step of `images` images passes its kernels as arguments: the loss is divided
/// by the batch's sub-pixels, and times the KL weight; clipping's norm and the free bits.
fn numbers(work: &Work, images: usize) -> Vec<u64> {
    vec![
        images as u64,
        work.kl_weight.unwrap_or(0.0).to_bits(),
        work.step.clip_grad_norm.to_bits(),
        work.step.free_bits.to_bits(),
    ]
}

/// The environment variable naming a file to write the operators of a CUDA graph's capture to
/// (whether it succeeds or not): where a capture fails, what it ran up to there.
pub const GRAPH_TRACE: &str = "PIXEL_GRAPH_TRACE";

/// The error of step `i` whose CUDA graph failed.
fn graph_error(i: usize, message: &str) -> String {
    format!(
        "step {}: {message} (runtime.cuda_graph = true; set it to false to train without one, \
         or {GRAPH_TRACE}=FILE to write the operators a capture runs to FILE)",
        i + 1
    )
}

/// The message of a panic caught while capturing.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    format!("capturing the step as a CUDA graph failed: {text}")
}

/// Whether step `i`'s gradients are finite, so that it can be taken. A loss that is not finite
/// stops the run; so do gradients that are not finite in f32 and bf16, and in f16 (where an
/// overflow is expected now and then: the scale halves and the step is skipped) more than
/// `step.max_skipped_steps` skips in a row.
fn check_finite(
    loss: f64,
    norm: &GradientNorm,
    loss_scale: Option<&mut loss_scale::LossScale>,
    model: &Model,
    i: usize,
    step: &Step,
) -> Result<bool, String> {
    if !loss.is_finite() {
        return Err(format!("step {}: the training loss became {loss}", i + 1));
    }
    let finite = norm.is_finite();
    match loss_scale {
        Some(ls) => {
            ls.update(finite);
            if ls.skipped_in_a_row > step.max_skipped_steps {
                let n = Some(ls.skipped_in_a_row);
                return Err(gradient_not_finite(model, i, *norm, n));
            }
        }
        None if !finite => return Err(gradient_not_finite(model, i, *norm, None)),
        None => {}
    }
    Ok(finite)
}

/// The generator of the noise of step `i` (from 0) of `epoch`.
fn noise_rng(seed: u64, epoch: usize, i: usize) -> StdRng {
    crate::rng::stream(seed, Purpose::TrainNoise, epoch as u64, i as u64)
}

/// The KL penalty of the training loss: the total KL, or with free bits the KL of each latent
/// dimension (channel and position) averaged over the global batch of `batch` images, floored
/// at `free_bits` nats, times `batch`. With several ranks each holds the part of its images
/// (the parts sum to the whole); which dimensions are floored is decided on the global sums,
/// alike on every rank.
///
/// # Shapes
/// - kl: `[images of this rank, latent_channels, h', w']`, nats
fn kl_penalty(kl: Tensor<4>, free_bits: f64, batch: usize, world: &World) -> Tensor<1> {
    if free_bits <= 0.0 {
        return kl.sum();
    }
    let per_dimension = kl.sum_dim(0); // [1, latent_channels, h', w']: this rank's sums
    let floor = free_bits * batch as f64;
    let global = sum_over_ranks(per_dimension.clone().inner(), world);
    let floored = global.lower_equal_elem(floor);
    // Below the floor the value is the floor's share and the gradient zero.
    let share = floor / world.size() as f64;
    per_dimension.mask_fill(floored, share).sum()
}

/// `t` summed over the ranks (itself in a world of one, without leaving the device).
fn sum_over_ranks(t: Tensor<4>, world: &World) -> Tensor<4> {
    if world.size() == 1 {
        return t;
    }
    let (dims, device) = (t.dims(), t.device());
    let mut values: Vec<f32> = t
        .cast(FloatDType::F32)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("f32 sums");
    world.sum_f32(&mut values);
    Tensor::from_data(TensorData::new(values, dims), &device)
}

/// The error of a step whose gradients are not finite (f32 and bf16, or f16 past
/// `max_skipped_steps` skipped steps in a row), naming the first parameter concerned.
fn gradient_not_finite(
    model: &Model,
    i: usize,
    norm: GradientNorm,
    skipped: Option<usize>,
) -> String {
    let names = loss_scale::parameter_names(model);
    let which = norm
        .first_not_finite
        .and_then(|p| names.get(p))
        .map_or_else(|| "a parameter".to_string(), |n| format!("`{n}`"));
    match skipped {
        None => format!(
            "step {}: the gradient of {which} is not finite (NaN or infinite), so no update can be taken; the weights before this step were finite",
            i + 1
        ),
        Some(n) => format!(
            "step {}: {n} steps in a row were skipped because their f16 gradients overflowed \
             (the last at {which}), more than train.max_skipped_steps; the loss scale cannot \
             fall further: train in bf16 or f32",
            i + 1
        ),
    }
}

/// What the ranks agree on after their backward passes, besides the gradients.
struct Agreed {
    /// The gradients' global L2 norm (not finite when one of them is not).
    norm: GradientNorm,
    /// The summed totals (the batch's nats, and KL nats).
    totals: Vec<f64>,
    /// Whether any rank was asked to stop.
    stop: bool,
}

/// Sums the ranks' gradients (a rank without any passes None), `totals` and stop flags, and
/// multiplies the gradients by `factor`: the gradients of the global batch's loss, on every rank
/// the same, and what was agreed. A world of one keeps its gradients on the device and reads
/// only their square sum (in f64) with the totals, in one transfer; several ranks exchange one
/// host buffer.
fn agree(
    model: &Model,
    grads: Option<GradientsParams>,
    totals: Tensor<1>,
    stop: bool,
    factor: f64,
    world: &World,
    device: &Device,
) -> (Flat, Agreed) {
    if world.size() > 1 {
        return all_reduce(model, grads, totals, stop, factor, world, device);
    }
    let grads = grads.expect("a world of one takes the whole batch");
    gather(Flat::gradients(model, grads), totals, stop, factor).read(model)
}

/// A world of one's gradients (times a factor), flat, with their square sum (f64, `[1]`) and the
/// totals still on the device, until [`Gathered::read`] (or [`Gathered::update`]).
struct Gathered {
    grads: Flat,
    square_sum: Tensor<1>,
    totals: Tensor<1>,
    stop: bool,
}

fn gather(grads: Flat, totals: Tensor<1>, stop: bool, factor: f64) -> Gathered {
    let grads = Flat {
        values: if factor == 1.0 {
            grads.values
        } else {
            grads.values * factor
        },
        layout: grads.layout,
    };
    let square_sum = crate::optim::square_sum(grads.values.clone());
    Gathered {
        grads,
        square_sum,
        totals,
        stop,
    }
}

impl Gathered {
    /// The gradients, and the square sum and the totals in one read of the device (each
    /// parameter's square sum in a second one when the whole is not finite, to name the first
    /// parameter concerned).
    fn read(self, model: &Model) -> (Flat, Agreed) {
        let (square_sum, totals) = read_sums(self.square_sum, self.totals);
        let norm = norm_or_first(square_sum, model, &self.grads);
        let stop = self.stop;
        (self.grads, Agreed { norm, totals, stop })
    }

    /// One process (in f16 where the device decides to skip, `update.masked`): clipping, the
    /// optimizer's step and the EMA's update on the device, taken in f16 only where the square
    /// sum is finite; the square sum and the totals are left to [`Pending::read`]. The update
    /// spends the gradients (clipped in place, then Adam's scratch), so a square sum that is
    /// not finite names (in f32 and bf16) the first parameter whose new weights are not finite:
    /// an update leaves a weight finite where its gradient was (its weights were finite, or the
    /// last step would have stopped the run) and not where it was not (Adam's `inf / inf`,
    /// SGD's `w - lr inf`), and clipping's factor is 1 when the norm is not a number, so that
    /// one NaN does not spread to every gradient.
    fn update(
        self,
        model: Model,
        optimizer: &mut Optimizer,
        ema: Option<&mut Ema>,
        update: Update,
    ) -> (Model, Pending) {
        let grads = clipped(self.grads, &self.square_sum, update.clip);
        // NaN and infinity are not below infinity.
        let keep = (update.masked).then(|| self.square_sum.clone().lower_elem(f64::INFINITY));
        let (model, weights) =
            optimizer.step_unless(update.learning_rate, model, grads, keep.clone());
        if let Some(ema) = ema {
            ema.update(&weights, &model, update.run_step, keep);
        }
        // What a CUDA graph of the step captures ends here.
        crate::model::native::trace_mark(c"step: read");
        // A step not taken leaves the weights finite: they cannot name a parameter.
        let pending = Pending {
            square_sum: self.square_sum,
            totals: self.totals,
            weights: (!update.masked).then_some(weights),
            stop: self.stop,
        };
        (model, pending)
    }
}

/// A step of one process after its update: the square sum of its gradients and its totals, still
/// on the device, and the new weights they name a parameter from where the sum is not finite.
struct Pending {
    square_sum: Tensor<1>,
    totals: Tensor<1>,
    weights: Option<Flat>,
    stop: bool,
}

impl Pending {
    /// The square sum and the totals in one read of the device (the new weights' square sums
    /// in a second one when the sum is not finite, to name the first parameter concerned).
    fn read(self, model: &Model) -> Agreed {
        let (square_sum, totals) = read_sums(self.square_sum, self.totals);
        let norm = match &self.weights {
            Some(weights) => norm_or_first(square_sum, model, weights),
            None => GradientNorm {
                norm: square_sum.sqrt(),
                first_not_finite: None,
            },
        };
        Agreed {
            norm,
            totals,
            stop: self.stop,
        }
    }
}

/// What [`Gathered::update`] needs of the step.
#[derive(Clone, Copy, Debug)]
struct Update {
    learning_rate: f64,
    /// Clipping's norm (0: none).
    clip: f64,
    /// The step's number in the run (the EMA's bias correction counts them).
    run_step: usize,
    /// f16: the update is taken where the gradients are finite, as the device decides.
    masked: bool,
}

/// A square sum (f64, `[1]`) and totals in one read of the device.
fn read_sums(square_sum: Tensor<1>, totals: Tensor<1>) -> (f64, Vec<f64>) {
    let read: Vec<f64> = Tensor::cat(vec![square_sum, totals.cast(FloatDType::F64)], 0)
        .into_data()
        .convert::<f64>()
        .try_to_vec()
        .expect("f64 sums");
    (read[0], read[1..].to_vec())
}

/// `grads` rescaled to norm `clip` where their norm exceeds it (0: never), on the device: times
/// `min(1, clip / sqrt(square_sum))`, computed in f64 and then rounded to f32, the factor the host
/// would give them (times 1 when the norm is below `clip`: the same values). Times 1 also when
/// the square sum is NaN (a gradient is): the values that are not finite stay so, the others
/// as they were (an infinite sum gives 0, which keeps them not finite too: `inf * 0` is NaN).
fn clipped(grads: Flat, square_sum: &Tensor<1>, clip: f64) -> Flat {
    if clip <= 0.0 {
        return grads;
    }
    // `clip` in f64 made on the device (a `full` of f64 is an upload on libtorch).
    let clip = square_sum.ones_like().mul_scalar(clip);
    let factor = (clip / square_sum.clone().sqrt()).clamp_max(1.0);
    let factor = factor.clone().mask_fill(factor.is_nan(), 1.0);
    Flat {
        values: grads.values * factor.cast(FloatDType::F32),
        layout: grads.layout,
    }
}

/// The norm of a square sum, or where it is not finite, the first parameter of `values` (the
/// gradients, or new weights) that is not: [`norm_of_each`].
fn norm_or_first(square_sum: f64, model: &Model, values: &Flat) -> GradientNorm {
    GradientNorm {
        norm: square_sum.sqrt(),
        first_not_finite: match square_sum.is_finite() {
            true => None,
            false => norm_of_each(model, values).first_not_finite,
        },
    }
}

/// The norm from each parameter's square sum, to name the first whose gradient (or new weight,
/// see [`Gathered::update`]) is not finite: only when the whole is not, in one more
/// read.
fn norm_of_each(model: &Model, grads: &Flat) -> GradientNorm {
    let mut offset = 0;
    let sums: Vec<Tensor<1>> = grads
        .layout
        .sizes
        .iter()
        .map(|&n| {
            let part = grads.values.clone().narrow(0, offset, n);
            offset += n;
            crate::optim::square_sum(part)
        })
        .collect();
    let sums: Vec<f64> = Tensor::cat(sums, 0)
        .into_data()
        .convert::<f64>()
        .try_to_vec()
        .expect("f64 sums");
    let mut present = grads.layout.ids.iter().zip(sums).peekable();
    GradientNorm::from_square_sums(
        Layout::of(model)
            .ids
            .iter()
            .map(|id| present.next_if(|(p, _)| *p == id).map(|(_, s)| s)),
    )
}

/// [`agree`] over several ranks: every float parameter's gradient (zeros where this rank has
/// none), the totals, a flag per parameter saying whether any rank had a gradient for it and
/// the stop flags, summed over the ranks in one buffer. The norm is summed in f64 on the host.
fn all_reduce(
    model: &Model,
    grads: Option<GradientsParams>,
    totals: Tensor<1>,
    stop: bool,
    factor: f64,
    world: &World,
    device: &Device,
) -> (Flat, Agreed) {
    let layout = Layout::of(model);
    let (mut parts, present): (Vec<Tensor<1>>, Vec<f32>) = match grads {
        None => (Vec::new(), vec![0.0; layout.ids.len()]),
        Some(grads) => {
            let mine = Flat::gradients(model, grads);
            // Zeros in the places of the parameters without a gradient here.
            let mut parts = Vec::new();
            let mut present = Vec::new();
            let (mut offset, mut k) = (0, 0);
            for (&id, &n) in layout.ids.iter().zip(&layout.sizes) {
                if mine.layout.ids.get(k) == Some(&id) {
                    parts.push(mine.values.clone().narrow(0, offset, n));
                    offset += n;
                    k += 1;
                    present.push(1.0);
                } else {
                    parts.push(Tensor::zeros([n], device));
                    present.push(0.0);
                }
            }
            (parts, present)
        }
    };
    if parts.is_empty() {
        parts.push(Tensor::zeros([layout.values()], device));
    }
    let extras = totals.dims()[0];
    parts.push(f32_flat(totals));
    // One read of the device: the gradients and the totals.
    let mut buffer: Vec<f32> = Tensor::cat(parts, 0)
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 gradients");
    let values = buffer.len() - extras;
    buffer.extend_from_slice(&present);
    buffer.push(f32::from(stop));
    world.sum_f32(&mut buffer);

    let totals = buffer[values..values + extras]
        .iter()
        .map(|&t| f64::from(t))
        .collect();
    let present: Vec<bool> = buffer[values + extras..values + extras + layout.ids.len()]
        .iter()
        .map(|&p| p > 0.0)
        .collect();
    let stop = buffer[values + extras + layout.ids.len()] > 0.0;
    // The parameters some rank had a gradient for, end to end.
    let mut kept = Vec::with_capacity(values);
    let mut agreed = Layout::default();
    let mut sums = Vec::with_capacity(present.len());
    let mut offset = 0;
    for ((&id, &n), &p) in layout.ids.iter().zip(&layout.sizes).zip(&present) {
        let part = &buffer[offset..offset + n];
        offset += n;
        if !p {
            sums.push(None);
            continue;
        }
        let start = kept.len();
        kept.extend(part.iter().map(|&g| {
            if factor == 1.0 {
                g
            } else {
                (f64::from(g) * factor) as f32
            }
        }));
        sums.push(Some(
            kept[start..]
                .iter()
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>(),
        ));
        agreed.ids.push(id);
        agreed.sizes.push(n);
    }
    let n = kept.len();
    let grads = Flat {
        values: Tensor::from_data(TensorData::new(kept, [n]), device),
        layout: agreed,
    };
    let agreed = Agreed {
        norm: GradientNorm::from_square_sums(sums),
        totals,
        stop,
    };
    (grads, agreed)
}

#[cfg(test)]
mod tests;
