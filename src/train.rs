//! One epoch of optimisation and one pass of evaluation. Returns plain numbers; never prints or
//! writes files.

use crate::data::Images;
use crate::loss::nll_nats;
use crate::model::{Context, Model};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Instant;

/// Totals over one pass of a split. Bits per dimension are exact: total nats over every sub-pixel.
/// For a PixelVAE `nats` is the reconstruction term and `kl_nats` the KL term of the negative
/// ELBO; their sum is what `bits_per_dim` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassStats {
    pub nats: f64,
    pub subpixels: u64,
    pub images: usize,
    pub seconds: f64,
    pub kl_nats: Option<f64>,
    /// The KL weight of the last step (warm-up).
    pub kl_weight: Option<f64>,
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
    pub learning_rate: f64,
    /// The run's seed and this epoch (from 1): a PixelVAE's noise for step i of the epoch comes
    /// from a generator seeded by the three, so that a resumed run draws the same noise.
    pub seed: u64,
    pub epoch: usize,
    /// PixelVAE: steps of linear KL warm-up (0 = none) and free bits in nats per latent channel.
    pub kl_warmup_steps: usize,
    pub free_bits: f64,
}

impl Step {
    /// The settings of `plan` for `epoch` (from 1).
    pub fn of(plan: &crate::experiment::Plan, epoch: usize) -> Step {
        let e = &plan.experiment;
        Step {
            batch_size: e.train.batch_size,
            learning_rate: e.train.learning_rate,
            seed: e.train.seed,
            epoch,
            kl_warmup_steps: e.model.vae.kl_warmup_steps,
            free_bits: e.model.vae.free_bits,
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

/// The generator of the noise of step `i` (from 0) of `epoch`.
fn noise_rng(seed: u64, epoch: usize, i: usize) -> StdRng {
    let mix = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    StdRng::seed_from_u64(mix)
}

/// The KL penalty of the training loss: the total KL, or with free bits the KL of each latent
/// channel averaged over the batch, floored at `free_bits` nats, times the batch size.
///
/// # Shapes
/// - kl: `[batch, latent_channels, h', w']`, nats
fn kl_penalty(kl: Tensor<4>, free_bits: f64) -> Tensor<1> {
    if free_bits <= 0.0 {
        return kl.sum();
    }
    let [b, l, _, _] = kl.dims();
    let per_channel = kl.sum_dim(3).sum_dim(2).sum_dim(0).reshape([l]) / b as f64;
    per_channel.clamp_min(free_bits).sum() * b as f64
}

/// How an epoch ended.
pub enum EpochEnd {
    /// Every step was taken.
    Finished,
    /// `stop` asked to stop after this many steps of the epoch.
    Stopped { steps_done: usize },
}

/// Trains over `order` (one epoch's image order), starting after `start_step` steps whose totals
/// are `stats`, and stopping early when `stop()` says so after a step. Calls
/// `progress(images_done, batch_bits_per_dim)` after each step. Returns the updated model, the
/// totals so far and how the epoch ended; a loss that is not finite is an error naming the step.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(
    mut model: Model,
    optimizer: &mut ModuleOptimizer,
    images: &Images,
    order: &[usize],
    step: Step,
    device: &Device,
    start_step: usize,
    mut stats: PassStats,
    stop: &dyn Fn() -> bool,
    mut progress: impl FnMut(usize, f64),
) -> Result<(Model, PassStats, EpochEnd), String> {
    let start = Instant::now();
    let before = stats.seconds;
    let mut end = EpochEnd::Finished;
    let steps_per_epoch = order.len().div_ceil(step.batch_size);
    for (i, indices) in order.chunks(step.batch_size).enumerate().skip(start_step) {
        let batch = Batch::gather(images, indices, device);
        let dims = batch.target.shape().num_elements() as u64;
        let mut noise = noise_rng(step.seed, step.epoch, i);
        let (logits, kl) = model.forward_with_kl(batch.input, &batch.context, &mut noise);
        let nats = nll_nats(logits, batch.target);
        let batch_nats = f64::from(nats.clone().into_scalar::<f32>());
        let mut loss = nats;
        let mut batch_kl = 0.0;
        if let Some(kl) = kl {
            batch_kl = f64::from(kl.clone().sum().into_scalar::<f32>());
            let weight = step.kl_weight((step.epoch.max(1) - 1) * steps_per_epoch + i + 1);
            loss = loss + kl_penalty(kl, step.free_bits) * weight;
            *stats.kl_nats.get_or_insert(0.0) += batch_kl;
            stats.kl_weight = Some(weight);
        }
        if !(batch_nats + batch_kl).is_finite() {
            return Err(format!(
                "step {}: the training loss became {}",
                i + 1,
                batch_nats + batch_kl
            ));
        }
        let loss = loss / dims as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(step.learning_rate, model, grads);
        stats.nats += batch_nats;
        stats.subpixels += dims;
        stats.images += indices.len();
        progress(
            stats.images,
            crate::loss::bits_per_dim(batch_nats + batch_kl, dims),
        );
        if stop() && (i + 1) * step.batch_size < order.len() {
            end = EpochEnd::Stopped { steps_done: i + 1 };
            break;
        }
    }
    stats.seconds = before + start.elapsed().as_secs_f64();
    Ok((model, stats, end))
}

/// Evaluates the model on every image of `images`, in order. A PixelVAE's negative ELBO uses one
/// z per image, with noise from a generator seeded by `seed` alone: every epoch sees the same.
pub fn evaluate(
    model: &Model,
    images: &Images,
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> PassStats {
    let start = Instant::now();
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let mut stats = PassStats::default();
    let mut noise = noise_rng(seed, usize::MAX, 0);
    let all: Vec<usize> = (0..images.len()).collect();
    for indices in all.chunks(batch_size) {
        let batch = Batch::gather(images, indices, &device);
        let dims = batch.target.shape().num_elements() as u64;
        let (logits, kl) = model.forward_with_kl(batch.input, &batch.context, &mut noise);
        if let Some(kl) = kl {
            *stats.kl_nats.get_or_insert(0.0) += f64::from(kl.sum().into_scalar::<f32>());
        }
        let nats = nll_nats(logits, batch.target);
        stats.nats += f64::from(nats.into_scalar::<f32>());
        stats.subpixels += dims;
        stats.images += indices.len();
    }
    stats.seconds = start.elapsed().as_secs_f64();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::experiment::Precision;
    use crate::model::{GatedConfig, ModelConfig};

    /// A few steps computed in bf16 (f32 weights and Adam state) track the same steps in f32.
    #[test]
    fn bf16_steps_track_f32() {
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
        });
        let device = Device::flex().autodiff();
        let order: Vec<usize> = (0..64).collect();
        let losses = |precision| {
            let model = cfg.init(2, &device).with_precision(precision);
            let mut optimizer = crate::optim::adam();
            let step = Step {
                batch_size: 16,
                learning_rate: 1e-3,
                seed: 2,
                epoch: 1,
                kl_warmup_steps: 0,
                free_bits: 0.0,
            };
            let mut per_epoch = Vec::new();
            let mut model = model;
            for _ in 0..3 {
                let (m, stats, _) = train_epoch(
                    model,
                    &mut optimizer,
                    &data,
                    &order,
                    step,
                    &device,
                    0,
                    PassStats::default(),
                    &|| false,
                    |_, _| {},
                )
                .unwrap();
                model = m;
                per_epoch.push(stats.bits_per_dim());
            }
            per_epoch
        };
        let (full, half) = (losses(Precision::F32), losses(Precision::Bf16));
        assert!(full[2] < full[0], "f32 learns: {full:?}");
        assert!(half[2] < half[0], "bf16 learns: {half:?}");
        for (f, h) in full.iter().zip(&half) {
            assert!((f - h).abs() / f < 0.02, "bf16 {half:?} vs f32 {full:?}");
        }
        assert_ne!(full, half, "bf16 really computed in bf16");
    }
}
