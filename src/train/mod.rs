//! One epoch of optimisation and passes of evaluation. Returns plain numbers; never prints or
//! writes files. Imports only the layers below it: `data`, `model`, `loss`, `rng`, `cluster`.

mod ema;
mod evaluate;
mod loss_scale;
mod parallel;
pub mod receptive;

pub use ema::Ema;
pub use evaluate::{
    ACTIVE_VARIANCE, Bounds, LatentSpread, evaluate, evaluate_range, importance_bounds,
};
use loss_scale::GradientNorm;
pub use loss_scale::LossScale;
pub use parallel::{evaluate_sharded, weights_checksum};

use crate::cluster::World;
use crate::data::Images;
use crate::loss::nll_nats;
use crate::model::{Context, Model};
use crate::rng::Purpose;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use std::time::Instant;

/// Totals over one pass of a split. Bits per dimension are exact: total nats over every sub-pixel.
/// For a PixelVAE `nats` is the reconstruction term and `kl_nats` the KL term of the negative
/// ELBO; their sum is what `bits_per_dim` reports. A checkpoint keeps the totals of a part-done
/// epoch in this form.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct PassStats {
    pub nats: f64,
    pub subpixels: u64,
    pub images: usize,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_nats: Option<f64>,
    /// The KL weight of the last step (warm-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_weight: Option<f64>,
    /// Training: the learning rate of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Training: the sum of the steps' gradient norms before clipping, over the steps whose
    /// gradients were finite, and how many they were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gradient_norm_sum: f64,
    #[serde(default, skip_serializing_if = "is_zero_steps")]
    pub gradient_norm_steps: usize,
    /// Training in f16: the steps skipped because their gradients overflowed.
    #[serde(default, skip_serializing_if = "is_zero_steps")]
    pub skipped_steps: usize,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_zero_steps(n: &usize) -> bool {
    *n == 0
}

impl PassStats {
    /// Negative log-likelihood (PixelCNNs) or negative ELBO (PixelVAE) in bits per dimension.
    pub fn bits_per_dim(&self) -> f64 {
        crate::loss::bits_per_dim(self.nats + self.kl_nats.unwrap_or(0.0), self.subpixels)
    }

    /// PixelVAE: the reconstruction term in bits per dimension.
    pub fn recon_bits_per_dim(&self) -> Option<f64> {
        self.kl_nats
            .map(|_| crate::loss::bits_per_dim(self.nats, self.subpixels))
    }

    /// PixelVAE: the KL term in bits per dimension.
    pub fn kl_bits_per_dim(&self) -> Option<f64> {
        self.kl_nats
            .map(|kl| crate::loss::bits_per_dim(kl, self.subpixels))
    }

    /// Training: the mean gradient norm before clipping over the pass's steps with finite
    /// gradients; infinite when every step's overflowed (f16), None only when no step ran.
    pub fn mean_gradient_norm(&self) -> Option<f64> {
        if self.gradient_norm_steps > 0 {
            Some(self.gradient_norm_sum / self.gradient_norm_steps as f64)
        } else {
            (self.skipped_steps > 0).then_some(f64::INFINITY)
        }
    }

    /// An error naming `what` (a pass) when its loss is not finite: a likelihood that overflowed
    /// or weights that are no longer numbers, never a result to report.
    pub fn check_finite(&self, what: &str) -> Result<(), String> {
        let total = self.nats + self.kl_nats.unwrap_or(0.0);
        if total.is_finite() {
            Ok(())
        } else {
            Err(format!(
                "the {what} pass's negative log-likelihood is {total} over {} images, not a number \
                 of bits/dim",
                self.images
            ))
        }
    }

    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
}

/// A batch on the device: float inputs (0..255), integer targets, and the context.
pub struct Batch {
    pub input: Tensor<4>,
    pub target: Tensor<4, Int>,
    pub context: Context,
}

impl Batch {
    /// Builds a batch from the images at `indices`. Targets come from the bytes, never from floats.
    pub fn gather(images: &Images, indices: &[usize], device: &Device) -> Batch {
        let (pixels, labels) = images.gather(indices);
        let shape = [indices.len(), images.colours, images.height, images.width];
        Batch::from_bytes(&pixels, &labels, shape, device)
    }

    pub fn from_bytes(pixels: &[u8], labels: &[u8], shape: [usize; 4], device: &Device) -> Batch {
        let floats: Vec<f32> = pixels.iter().map(|&p| f32::from(p)).collect();
        let ints: Vec<i64> = pixels.iter().map(|&p| i64::from(p)).collect();
        Batch {
            input: Tensor::from_data(TensorData::new(floats, shape), device),
            target: Tensor::from_data(TensorData::new(ints, shape), device),
            context: Context::from_labels(labels, device),
        }
    }
}

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
}

impl Step {
    /// Where the dropout masks of global step `n` come from, for the images of the global batch
    /// from `first` on (a network without dropout draws none).
    pub fn dropout(&self, n: usize, first: usize) -> crate::model::DropoutDraws {
        crate::model::DropoutDraws {
            seed: self.seed,
            step: n as u64,
            first: first as u64,
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

/// The error of a step whose loss is not finite.
fn not_finite(i: usize, loss: f64) -> String {
    format!("step {}: the training loss became {loss}", i + 1)
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
            "step {}: the gradient of {which} is not finite (NaN or infinite, or too large to \
             square in f32), so no update can be taken; the weights before this step were finite",
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

/// The generator of the noise of step `i` (from 0) of `epoch`.
pub(crate) fn noise_rng(seed: u64, epoch: usize, i: usize) -> StdRng {
    crate::rng::stream(seed, Purpose::TrainNoise, epoch as u64, i as u64)
}

/// Below this test KL (bits per dimension) at full KL weight, a PixelVAE's latent carries next
/// to nothing: the decoder models the images without z.
pub const COLLAPSED_KL_BITS_PER_DIM: f64 = 1e-3;

/// A warning when an epoch's test KL says the latent has collapsed (q(z|x) = p(z)) and nothing in
/// the objective keeps it in use; None otherwise, and while KL warm-up is still under way.
pub fn collapse_warning(
    test_kl: Option<f64>,
    kl_weight: Option<f64>,
    free_bits: f64,
) -> Option<String> {
    let kl = test_kl?;
    (kl < COLLAPSED_KL_BITS_PER_DIM && kl_weight? >= 1.0 && free_bits <= 0.0).then(|| {
        format!(
            "the latent looks collapsed: test KL {kl:.1e} bits/dim, so the decoder ignores z; \
             set model.vae.free_bits (0.25 nats per latent dimension keeps it in use in \
             experiments/mnist-vae-5x5.toml) and check with `pixel eval`'s active latent dimensions"
        )
    })
}

/// The KL penalty of the training loss: the total KL, or with free bits the KL of each latent
/// dimension (channel and position) averaged over the batch, floored at `free_bits` nats, times
/// the batch size.
///
/// # Shapes
/// - kl: `[batch, latent_channels, h', w']`, nats
fn kl_penalty(kl: Tensor<4>, free_bits: f64) -> Tensor<1> {
    if free_bits <= 0.0 {
        return kl.sum();
    }
    let [b, ..] = kl.dims();
    let per_dimension = kl.sum_dim(0) / b as f64; // [1, latent_channels, h', w']
    per_dimension.clamp_min(free_bits).sum() * b as f64
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
/// timed when they hand it over, not when it runs: the phases add up on the CPU, where each
/// operation finishes before the next starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// The batch's tensors and the model's forward pass.
    pub forward: f64,
    /// The negative log-likelihood (and a PixelVAE's KL term).
    pub loss: f64,
    /// The backward pass.
    pub backward: f64,
    /// The gradient norm with the loss read on the host (one wait for the device), clipping,
    /// the optimizer's step and the EMA's update.
    pub update: f64,
}

/// How an epoch ended.
pub enum EpochEnd {
    /// Every step was taken.
    Finished,
    /// `stop` asked to stop after this many steps of the epoch.
    Stopped { steps_done: usize },
}

/// What training changes from step to step: the weights, the optimizer's state and, for f16, the
/// dynamic loss scale.
pub struct TrainState {
    pub model: Model,
    pub optimizer: ModuleOptimizer,
    pub loss_scale: Option<LossScale>,
    /// Polyak averaging of the weights (`train.ema`), updated after every step taken.
    pub ema: Option<Ema>,
}

impl TrainState {
    /// The weights that evaluation and sampling use: the average with `train.ema`, else the
    /// trained ones.
    pub fn eval_model(&self) -> &Model {
        self.ema.as_ref().map_or(&self.model, |e| &e.model)
    }
}

/// One epoch's work: the images, the order they are visited in, how each step is taken, and
/// where the epoch starts.
pub struct Epoch<'a> {
    pub images: &'a Images,
    /// The epoch's image order; steps take it in chunks of `step.batch_size`.
    pub order: &'a [usize],
    pub step: Step,
    pub device: &'a Device,
    /// Steps of this epoch already taken (a run resumed after an interrupt), whose totals are
    /// `so_far`.
    pub start_step: usize,
    pub so_far: PassStats,
    /// Asked after every step: true stops the epoch there.
    pub stop: &'a dyn Fn() -> bool,
    /// The ranks that share every batch (each takes its part; the gradients are summed).
    pub world: &'a World,
}

/// Trains over `epoch.order`, starting after `epoch.start_step` steps, and stopping early when
/// `epoch.stop()` says so after a step. With a loss scale (f16), steps are loss-scaled and those
/// whose gradients overflow are skipped. Calls `progress` with a [`StepReport`] after each step. Returns the updated state, the totals so far and how the epoch ended; a loss that
/// is not finite is an error naming the step.
pub fn train_epoch(
    state: TrainState,
    epoch: Epoch,
    mut progress: impl FnMut(&StepReport),
) -> Result<(TrainState, PassStats, EpochEnd), String> {
    let TrainState {
        mut model,
        mut optimizer,
        mut loss_scale,
        mut ema,
    } = state;
    let Epoch {
        images,
        order,
        step,
        device,
        start_step,
        so_far: mut stats,
        stop,
        world,
    } = epoch;
    let start = Instant::now();
    let before = stats.seconds;
    let mut end = EpochEnd::Finished;
    let steps_per_epoch = order.len().div_ceil(step.batch_size);
    for (i, indices) in order.chunks(step.batch_size).enumerate().skip(start_step) {
        let dims = (indices.len() * images.dims()) as u64;
        let run_step = (step.epoch.max(1) - 1) * steps_per_epoch + i + 1;
        let scale = loss_scale.as_ref().map_or(1.0, |ls| ls.scale);
        let started = Instant::now();
        let mut phases = None;
        let (grads, batch_nats, batch_kl, gradient_norm, stopping) = if world.size() == 1 {
            let mut batch = Batch::gather(images, indices, device);
            batch.context.dropout = Some(step.dropout(run_step, 0));
            let mut noise = noise_rng(step.seed, step.epoch, i);
            let (logits, kl) = model.forward_with_kl(batch.input, &batch.context, &mut noise);
            let forward = started.elapsed().as_secs_f64();
            let nats = nll_nats(logits, batch.target);
            // The batch's nats (and KL), read with the gradients' norm after the backward pass:
            // one wait for the device per step.
            let mut totals = vec![nats.clone().inner()];
            let mut loss = nats;
            if let Some(kl) = kl {
                totals.push(kl.clone().sum().inner());
                let weight = step.kl_weight(run_step);
                loss = loss + kl_penalty(kl, step.free_bits) * weight;
                stats.kl_weight = Some(weight);
            }
            let mut loss = loss / dims as f64;
            if loss_scale.is_some() {
                loss = loss * scale;
            }
            let loss_done = started.elapsed().as_secs_f64();
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            let backward_done = started.elapsed().as_secs_f64();
            // Unscaled (f16) and measured: the norm is what a step's update is made of.
            let (norm, totals) =
                loss_scale::rescale_gradients(&model, &mut grads, 1.0 / scale, totals);
            let (batch_nats, batch_kl) = (totals[0], totals.get(1).copied().unwrap_or(0.0));
            if !(batch_nats + batch_kl).is_finite() {
                return Err(not_finite(i, batch_nats + batch_kl));
            }
            if totals.len() > 1 {
                *stats.kl_nats.get_or_insert(0.0) += batch_kl;
            }
            phases = Some(StepPhases {
                forward,
                loss: loss_done - forward,
                backward: backward_done - loss_done,
                update: 0.0,
            });
            (grads, batch_nats, batch_kl, norm, None)
        } else {
            let r = parallel::step(
                &model,
                images,
                indices,
                (&step, i, run_step),
                scale,
                stop(),
                world,
                device,
            );
            let batch_kl = r.kl_nats.unwrap_or(0.0);
            if !(r.nats + batch_kl).is_finite() {
                return Err(not_finite(i, r.nats + batch_kl));
            }
            if let Some(kl) = r.kl_nats {
                *stats.kl_nats.get_or_insert(0.0) += kl;
                stats.kl_weight = r.kl_weight;
            }
            (r.grads, r.nats, batch_kl, r.gradient_norm, Some(r.stop))
        };
        let learning_rate = step.learning_rate_at(run_step);
        let finite = gradient_norm.is_finite();
        match loss_scale.as_mut() {
            // f16: an overflow is expected now and then (the scale halves and the step is
            // skipped), but not for ever.
            Some(ls) => {
                ls.update(finite);
                if !finite {
                    stats.skipped_steps += 1;
                    if ls.skipped_in_a_row > step.max_skipped_steps {
                        let n = Some(ls.skipped_in_a_row);
                        return Err(gradient_not_finite(&model, i, gradient_norm, n));
                    }
                }
            }
            // f32, bf16: a gradient that is not finite is a defect; no step is taken on it.
            None if !finite => return Err(gradient_not_finite(&model, i, gradient_norm, None)),
            None => {}
        }
        let gradient_norm = gradient_norm.norm;
        if finite {
            let mut grads = grads;
            if step.clip_grad_norm > 0.0 && gradient_norm > step.clip_grad_norm {
                let factor = step.clip_grad_norm / gradient_norm;
                loss_scale::scale_gradients(&model, &mut grads, factor);
            }
            model = optimizer.step(learning_rate, model, grads);
            if let Some(ema) = ema.as_mut() {
                ema.update(&model, run_step);
            }
            stats.gradient_norm_sum += gradient_norm;
            stats.gradient_norm_steps += 1;
        }
        if let Some(p) = phases.as_mut() {
            p.update = started.elapsed().as_secs_f64() - p.forward - p.loss - p.backward;
        }
        stats.learning_rate = Some(learning_rate);
        stats.nats += batch_nats;
        stats.subpixels += dims;
        stats.images += indices.len();
        progress(&StepReport {
            step: i + 1,
            images_done: stats.images,
            bits_per_dim: crate::loss::bits_per_dim(batch_nats + batch_kl, dims),
            loss_scale: loss_scale.map(|ls| ls.scale),
            gradient_norm,
            skipped: !finite,
            learning_rate,
            phases,
        });
        // Several ranks stop where any of them was asked to, all at the same step.
        if stopping.unwrap_or_else(stop) && (i + 1) * step.batch_size < order.len() {
            end = EpochEnd::Stopped { steps_done: i + 1 };
            break;
        }
    }
    stats.seconds = before + start.elapsed().as_secs_f64();
    let state = TrainState {
        model,
        optimizer,
        loss_scale,
        ema,
    };
    Ok((state, stats, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::device::Precision;
    use crate::model::{GatedConfig, ModelConfig};

    /// A whole epoch from its first step, never stopped.
    fn epoch<'a>(
        images: &'a Images,
        order: &'a [usize],
        step: Step,
        device: &'a Device,
    ) -> Epoch<'a> {
        Epoch {
            images,
            order,
            step,
            device,
            start_step: 0,
            so_far: PassStats::default(),
            stop: &|| false,
            world: Box::leak(Box::new(World::single())),
        }
    }

    /// A few steps computed in bf16 or in f16 with dynamic loss scaling (f32 weights and Adam
    /// state) track the same steps in f32.
    /// The collapse warning fires at full KL weight without free bits and a KL below the
    /// threshold, and not for PixelCNNs, during warm-up, with free bits or with a used latent.
    #[test]
    fn collapse_warning_only_for_an_unused_latent() {
        assert!(collapse_warning(Some(5e-7), Some(1.0), 0.0).is_some());
        assert!(collapse_warning(None, None, 0.0).is_none());
        assert!(collapse_warning(Some(5e-7), Some(0.5), 0.0).is_none());
        assert!(collapse_warning(Some(5e-7), Some(1.0), 0.25).is_none());
        assert!(collapse_warning(Some(0.07), Some(1.0), 0.0).is_none());
    }

    #[test]
    fn bf16_and_f16_steps_track_f32() {
        let spec = synthetic::Spec {
            size: 8,
            colours: 3,
            train_images: 64,
        };
        let data = synthetic::generate(&spec, 4).train;
        let cfg = ModelConfig::Gated(GatedConfig {
            colours: 3,
            layers: 3,
            kernel: 3,
            channels: 12,
            classes: Some(10),
            spatial_channels: 0,
            concat: false,
            residual: true,
            gates: true,
            link: true,
            likelihood: crate::model::Likelihood::Categorical,
        });
        let device = Device::flex().autodiff();
        let order: Vec<usize> = (0..64).collect();
        // Adam, as runs train, and plain SGD, whose steps scale with the gradients: a loss scale
        // left in the gradients (65536 for f16) would throw SGD far off the f32 trajectory, where
        // Adam, nearly invariant to the gradients' scale, would hide it.
        let losses = |precision, sgd: bool| {
            let model = cfg.init(2, &device).with_precision(precision);
            let step = Step {
                batch_size: 16,
                learning_rate: if sgd { 0.5 } else { 1e-3 },
                lr_decay: 1.0,
                clip_grad_norm: 0.0,
                seed: 2,
                epoch: 1,
                kl_warmup_steps: 0,
                free_bits: 0.0,
                max_skipped_steps: 25,
            };
            let mut per_epoch = Vec::new();
            let mut state = TrainState {
                model,
                optimizer: if sgd {
                    burn::optim::SgdConfig::new().init()
                } else {
                    crate::optim::adam()
                },
                loss_scale: (precision == Precision::F16).then(LossScale::default),
                ema: None,
            };
            for _ in 0..3 {
                let (next, stats, _) =
                    train_epoch(state, epoch(&data, &order, step, &device), |_| {}).unwrap();
                state = next;
                per_epoch.push(stats.bits_per_dim());
            }
            per_epoch
        };
        for sgd in [false, true] {
            let full = losses(Precision::F32, sgd);
            assert!(full[2] < full[0], "f32 learns (sgd: {sgd}): {full:?}");
            for precision in [Precision::Bf16, Precision::F16] {
                let half = losses(precision, sgd);
                assert!(half[2] < half[0], "{precision:?} learns: {half:?}");
                for (f, h) in full.iter().zip(&half) {
                    assert!(
                        (f - h).abs() / f < 0.02,
                        "{precision:?} (sgd: {sgd}) {half:?} vs f32 {full:?}"
                    );
                }
                assert_ne!(full, half, "{precision:?} really computed in low precision");
            }
        }
    }

    /// Every float parameter of `model`, flattened in visiting order.
    fn flat_parameters(model: &Model) -> Vec<f32> {
        use burn::module::{Module, ModuleVisitor, Param};
        struct Collect(Vec<f32>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let v: Vec<f32> = param
                    .val()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec()
                    .unwrap();
                self.0.extend(v);
            }
        }
        let mut c = Collect(Vec::new());
        model.visit(&mut c);
        c.0
    }

    /// `n` grey 6x6 training images and a small simple PixelCNN for them, on the autodiff device.
    fn tiny_simple(n: usize) -> (Images, Model, Device) {
        let spec = synthetic::Spec {
            size: 6,
            colours: 1,
            train_images: n,
        };
        let data = synthetic::generate(&spec, 1).train;
        let cfg = ModelConfig::Simple(crate::model::SimpleConfig {
            colours: 1,
            layers: 2,
            kernel: 3,
            channels: 4,
            likelihood: crate::model::Likelihood::Categorical,
        });
        let device = Device::flex().autodiff();
        let model = cfg.init(1, &device);
        (data, model, device)
    }

    /// The reported gradient norm is the size of the step plain SGD takes: |w1 - w0| = lr |g|.
    #[test]
    fn reported_gradient_norm_is_the_sgd_step_over_the_learning_rate() {
        let (data, model, device) = tiny_simple(8);
        let before = flat_parameters(&model);
        let step = Step {
            batch_size: 8,
            learning_rate: 0.01,
            lr_decay: 1.0,
            clip_grad_norm: 0.0,
            seed: 1,
            epoch: 1,
            kl_warmup_steps: 0,
            free_bits: 0.0,
            max_skipped_steps: 25,
        };
        let state = TrainState {
            model,
            optimizer: burn::optim::SgdConfig::new().init(),
            loss_scale: None,
            ema: None,
        };
        let order: Vec<usize> = (0..8).collect();
        let mut norms = Vec::new();
        let (state, _, _) = train_epoch(state, epoch(&data, &order, step, &device), |r| {
            norms.push(r.gradient_norm)
        })
        .unwrap();
        let after = flat_parameters(&state.model);
        let moved: f64 = before
            .iter()
            .zip(&after)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert_eq!(norms.len(), 1);
        let expected = 0.01 * norms[0];
        assert!(norms[0] > 0.0);
        assert!(
            (moved - expected).abs() < 1e-3 * expected,
            "{moved} vs {expected}"
        );
    }

    /// One SGD (or Adam with `betas`) step per epoch over 8 images of a tiny model, `steps` times:
    /// the weights before and after each step, the reported norms and the final state.
    fn steps_of(
        steps: usize,
        configure: impl Fn(&mut Step),
        optimizer: ModuleOptimizer,
        ema: Option<f64>,
    ) -> (Vec<Vec<f32>>, Vec<StepReport>, TrainState) {
        let (data, model, device) = tiny_simple(8);
        let mut state = TrainState {
            ema: ema.map(|d| Ema::new(d, &model)),
            model,
            optimizer,
            loss_scale: None,
        };
        let order: Vec<usize> = (0..8).collect();
        let mut weights = vec![flat_parameters(&state.model)];
        let mut reports = Vec::new();
        for n in 1..=steps {
            let mut step = Step {
                batch_size: 8,
                learning_rate: 0.01,
                lr_decay: 1.0,
                clip_grad_norm: 0.0,
                seed: 1,
                epoch: n,
                kl_warmup_steps: 0,
                free_bits: 0.0,
                max_skipped_steps: 25,
            };
            configure(&mut step);
            let (next, _, _) = train_epoch(state, epoch(&data, &order, step, &device), |r| {
                reports.push(*r)
            })
            .unwrap();
            state = next;
            weights.push(flat_parameters(&state.model));
        }
        (weights, reports, state)
    }

    fn distance(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// With `lr_decay`, step n moves the SGD weights by lr * decay^(n-1) * |g|, and reports that
    /// learning rate.
    #[test]
    fn lr_decay_multiplies_the_learning_rate_after_every_step() {
        let sgd = || burn::optim::SgdConfig::new().init();
        let (w, reports, _) = steps_of(3, |s| s.lr_decay = 0.5, sgd(), None);
        for n in 0..3 {
            let lr = 0.01 * 0.5f64.powi(n as i32);
            assert!(
                (reports[n].learning_rate - lr).abs() < 1e-15,
                "{:?}",
                reports[n]
            );
            let expected = lr * reports[n].gradient_norm;
            let moved = distance(&w[n], &w[n + 1]);
            assert!(
                (moved - expected).abs() < 1e-3 * expected,
                "step {n}: {moved} vs {expected}"
            );
        }
    }

    /// `clip_grad_norm` below the gradient's norm: the SGD step is lr * clip long, and the norm
    /// reported is the one before clipping. Above it: nothing changes.
    #[test]
    fn clipping_rescales_only_gradients_above_the_norm() {
        let sgd = || burn::optim::SgdConfig::new().init();
        let clip = 1e-3;
        let (w, reports, _) = steps_of(1, |s| s.clip_grad_norm = clip, sgd(), None);
        assert!(reports[0].gradient_norm > 10.0 * clip, "{:?}", reports[0]);
        let moved = distance(&w[0], &w[1]);
        assert!((moved - 0.01 * clip).abs() < 1e-3 * 0.01 * clip, "{moved}");
        let (w, reports, _) = steps_of(1, |s| s.clip_grad_norm = 1e9, sgd(), None);
        let expected = 0.01 * reports[0].gradient_norm;
        assert!((distance(&w[0], &w[1]) - expected).abs() < 1e-3 * expected);
    }

    /// Adam's betas reach the optimizer: with both 0 every step is lr * g / |g| per weight (the
    /// second step too, where the default betas average it with the first).
    #[test]
    fn adam_betas_are_the_ones_configured() {
        let moves = |b1, b2| {
            let (w, ..) = steps_of(2, |_| {}, crate::optim::adam_with_betas(b1, b2), None);
            w[1].iter()
                .zip(&w[2])
                .map(|(a, b)| f64::from((a - b).abs()))
                .collect::<Vec<_>>()
        };
        let zero = moves(0.0, 0.0);
        let moved = zero.iter().filter(|&&m| m > 1e-4).count();
        assert!(moved > zero.len() / 2, "most weights have a gradient");
        // lr * g / (|g| + eps): exactly lr but for the few gradients within a few eps of 0.
        let sign_steps = zero.iter().filter(|&&m| (m - 0.01).abs() < 1e-5).count();
        assert!(sign_steps * 10 >= moved * 9, "{sign_steps} of {moved}");
        assert!(zero.iter().all(|&m| m < 0.01 + 1e-5), "never more than lr");
        let default = moves(0.9, 0.999);
        let off = default
            .iter()
            .filter(|&&m| m > 1e-4 && (m - 0.01).abs() > 1e-3)
            .count();
        assert!(off > 0, "the default betas do not give sign steps");
    }

    /// The bias-corrected average after two steps with decay d is (d w1 + w2) / (1 + d), without
    /// the initial weights w0, and the state's evaluation weights are the average.
    #[test]
    fn ema_is_the_decayed_average_of_the_weights_after_each_step() {
        let sgd = burn::optim::SgdConfig::new().init();
        let d = 0.75f32;
        let (w, _, state) = steps_of(2, |_| {}, sgd, Some(f64::from(d)));
        let ema = flat_parameters(&state.ema.as_ref().unwrap().model);
        let eval = flat_parameters(state.eval_model());
        assert_eq!(ema, eval);
        for i in 0..ema.len() {
            let expected = (d * w[1][i] + w[2][i]) / (1.0 + d);
            assert!(
                (ema[i] - expected).abs() < 1e-6,
                "{i}: {} vs {expected}",
                ema[i]
            );
        }
        assert!(distance(&ema, &w[2]) > 1e-4, "the average lags the weights");
    }

    /// Free bits floor each latent dimension's batch-mean KL; without them the penalty is the KL.
    #[test]
    fn free_bits_floor_each_latent_dimension() {
        let device = Device::flex();
        // Two images, two latent dimensions: batch means 0.1 and 1.0 nats.
        let kl = Tensor::<4>::from_data(
            TensorData::new(vec![0.0f32, 1.5, 0.2, 0.5], [2, 2, 1, 1]),
            &device,
        );
        let total: f32 = kl_penalty(kl.clone(), 0.0).into_scalar();
        assert!((total - 2.2).abs() < 1e-6, "{total}");
        // max(0.1, 0.3) + max(1.0, 0.3) = 1.3 nats per image, times 2 images.
        let floored: f32 = kl_penalty(kl, 0.3).into_scalar();
        assert!((floored - 2.6).abs() < 1e-6, "{floored}");
    }

    /// `model` with its first parameter times `first` and its last two times `last`.
    fn rescaled(model: Model, first: f64, last: f64) -> Model {
        use burn::module::{Module, ModuleMapper, Param};
        struct Scale {
            at: usize,
            count: usize,
            factors: [f64; 2],
        }
        impl ModuleMapper for Scale {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let at = self.at;
                self.at += 1;
                let factor = match at {
                    0 => self.factors[0],
                    i if i + 2 >= self.count => self.factors[1],
                    _ => return param,
                };
                param.map(|t| t * factor)
            }
        }
        let count = super::loss_scale::parameter_names(&model).len();
        model.map(&mut Scale {
            at: 0,
            count,
            factors: [first, last],
        })
    }

    /// In f32 a gradient that is not finite stops the epoch with an error naming the step and
    /// the parameter. Here the head is scaled by 1e30: its logits of ~1e30 still give a finite
    /// loss, but the gradients below it square-sum past f32.
    #[test]
    fn a_gradient_that_is_not_finite_stops_f32_training() {
        let (data, model, device) = tiny_simple(8);
        let model = rescaled(model, 1.0, 1e30);
        let step = Step {
            batch_size: 8,
            learning_rate: 0.01,
            lr_decay: 1.0,
            clip_grad_norm: 0.0,
            seed: 1,
            epoch: 1,
            kl_warmup_steps: 0,
            free_bits: 0.0,
            max_skipped_steps: 25,
        };
        let state = TrainState {
            model,
            optimizer: crate::optim::adam(),
            loss_scale: None,
            ema: None,
        };
        let order: Vec<usize> = (0..8).collect();
        let err = train_epoch(state, epoch(&data, &order, step, &device), |_| {})
            .err()
            .expect("the step cannot be taken");
        assert!(
            err.starts_with("step 1: the gradient of `") && err.contains("is not finite"),
            "{err}"
        );
        let names = super::loss_scale::parameter_names(&tiny_simple(8).1);
        assert!(names.iter().all(|n| !n.is_empty()), "{names:?}");
        assert!(
            names.iter().any(|n| err.contains(&format!("`{n}`"))),
            "{err} vs {names:?}"
        );
    }

    /// The norm of square sums: f64 over the parameters, the first that is not finite named
    /// (parameters without a gradient skipped).
    #[test]
    fn the_norm_names_the_first_parameter_that_is_not_finite() {
        let ok = GradientNorm::from_square_sums([Some(9.0), None, Some(16.0)]);
        assert_eq!((ok.norm, ok.first_not_finite), (5.0, None));
        let bad =
            GradientNorm::from_square_sums([Some(1.0), None, Some(f64::NAN), Some(f64::INFINITY)]);
        assert_eq!(bad.first_not_finite, Some(2));
        assert!(bad.norm.is_nan());
    }

    /// f16: more than `max_skipped_steps` overflowing steps in a row stop the run.
    #[test]
    fn f16_stops_after_too_many_skipped_steps_in_a_row() {
        let (data, model, device) = tiny_simple(16);
        let state = TrainState {
            model: model.with_precision(Precision::F16),
            optimizer: crate::optim::adam(),
            loss_scale: Some(LossScale {
                scale: 1e9,
                ..LossScale::default()
            }),
            ema: None,
        };
        let step = Step {
            batch_size: 8,
            learning_rate: 1e-2,
            lr_decay: 1.0,
            clip_grad_norm: 0.0,
            seed: 1,
            epoch: 1,
            kl_warmup_steps: 0,
            free_bits: 0.0,
            max_skipped_steps: 1,
        };
        let order: Vec<usize> = (0..16).collect();
        let mut skipped = Vec::new();
        let err = train_epoch(state, epoch(&data, &order, step, &device), |r| {
            skipped.push(r.skipped)
        })
        .err()
        .expect("two overflows in a row with max_skipped_steps = 1");
        assert_eq!(skipped, [true], "the first is reported, the second stops");
        assert!(err.contains("2 steps in a row were skipped"), "{err}");
    }

    /// An overflowing f16 step is skipped (the weights stay as they were) and the scale halves.
    #[test]
    fn overflowing_f16_step_is_skipped() {
        let (data, model, device) = tiny_simple(16);
        let model = model.with_precision(Precision::F16);
        let before: f32 = model
            .forward(
                Batch::gather(&data, &[0], &device).input,
                &Context::from_labels(&[0], &device),
            )
            .values()
            .sum()
            .into_scalar();
        // A scale at which the loss stays finite in f32 (a few bits per sub-pixel times 1e9) but
        // the gradients overflow f16 (largest value 65504) in the backward pass.
        let loss_scale = Some(LossScale {
            scale: 1e9,
            ..LossScale::default()
        });
        let step = Step {
            batch_size: 16,
            learning_rate: 1e-2,
            lr_decay: 1.0,
            clip_grad_norm: 0.0,
            seed: 1,
            epoch: 1,
            kl_warmup_steps: 0,
            free_bits: 0.0,
            max_skipped_steps: 25,
        };
        let order: Vec<usize> = (0..16).collect();
        let state = TrainState {
            model,
            optimizer: crate::optim::adam(),
            loss_scale,
            ema: None,
        };
        let (
            TrainState {
                model, loss_scale, ..
            },
            _,
            _,
        ) = train_epoch(state, epoch(&data, &order, step, &device), |_| {}).unwrap();
        let ls = loss_scale.unwrap();
        assert_eq!((ls.scale, ls.skipped), (5e8, 1), "{ls:?}");
        let after: f32 = model
            .forward(
                Batch::gather(&data, &[0], &device).input,
                &Context::from_labels(&[0], &device),
            )
            .values()
            .sum()
            .into_scalar();
        assert_eq!(before, after, "the overflowing step changed the weights");
    }
}
