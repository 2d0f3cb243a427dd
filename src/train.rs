//! One epoch of optimisation and one pass of evaluation. Returns plain numbers; never prints or
//! writes files.

use crate::data::Images;
use crate::loss::nll_nats;
use crate::model::{Context, Model};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::time::Instant;

/// Totals over one pass of a split. Bits per dimension are exact: total nats over every sub-pixel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassStats {
    pub nats: f64,
    pub subpixels: u64,
    pub images: usize,
    pub seconds: f64,
}

impl PassStats {
    pub fn bits_per_dim(&self) -> f64 {
        crate::loss::bits_per_dim(self.nats, self.subpixels)
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
    for (i, indices) in order.chunks(step.batch_size).enumerate().skip(start_step) {
        let batch = Batch::gather(images, indices, device);
        let dims = batch.target.shape().num_elements() as u64;
        let logits = model.forward(batch.input, &batch.context);
        let nats = nll_nats(logits, batch.target);
        let batch_nats = f64::from(nats.clone().into_scalar::<f32>());
        if !batch_nats.is_finite() {
            return Err(format!(
                "step {}: the training loss became {batch_nats}",
                i + 1
            ));
        }
        let loss = nats / dims as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(step.learning_rate, model, grads);
        stats.nats += batch_nats;
        stats.subpixels += dims;
        stats.images += indices.len();
        progress(stats.images, crate::loss::bits_per_dim(batch_nats, dims));
        if stop() && (i + 1) * step.batch_size < order.len() {
            end = EpochEnd::Stopped { steps_done: i + 1 };
            break;
        }
    }
    stats.seconds = before + start.elapsed().as_secs_f64();
    Ok((model, stats, end))
}

/// Evaluates the model on every image of `images`, in order.
pub fn evaluate(model: &Model, images: &Images, batch_size: usize, device: &Device) -> PassStats {
    let start = Instant::now();
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let mut stats = PassStats::default();
    let all: Vec<usize> = (0..images.len()).collect();
    for indices in all.chunks(batch_size) {
        let batch = Batch::gather(images, indices, &device);
        let dims = batch.target.shape().num_elements() as u64;
        let nats = nll_nats(model.forward(batch.input, &batch.context), batch.target);
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
