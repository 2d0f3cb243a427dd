//! One epoch of optimisation and passes of evaluation. Returns plain numbers; never prints or
//! writes files. Imports only the layers below it: `data`, `model`, `loss`, `rng`, `cluster`.

mod ema;
mod evaluate;
mod loss_scale;
mod parallel;
pub mod receptive;
mod step;

pub use ema::Ema;
pub use evaluate::{
    ACTIVE_VARIANCE, Bounds, LatentSpread, evaluate, evaluate_range, importance_bounds,
};
pub use loss_scale::LossScale;
pub use parallel::{evaluate_sharded, weights_checksum};
use step::StepAt;
pub use step::{GraphCounts, Step, StepGraph, StepPhases, StepReport};

use crate::cluster::World;
use crate::data::Images;
use crate::model::{Context, Model};
use burn::tensor::{Device, Int, Tensor, TensorData};
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
    /// Builds a batch from the images at `indices`, in one upload (on a GPU each upload waits for
    /// the device): the bytes and the labels as one f32 buffer, cut and cast on the device. The
    /// targets are the bytes' values exactly (integers up to 2^24 are exact in f32).
    pub fn gather(images: &Images, indices: &[usize], device: &Device) -> Batch {
        Batch::upload(images, indices, device, None).batch()
    }

    /// The upload of [`Batch::gather`], written into `buffer` where one is given and
    /// [`crate::model::native::runs_fused`]: one address for every batch (a training step's),
    /// which the step's work on the device then reads ([`Uploaded::batch`]); else a fresh tensor.
    pub fn upload(
        images: &Images,
        indices: &[usize],
        device: &Device,
        buffer: Option<&mut crate::model::native::DeviceBuffer>,
    ) -> Uploaded {
        let (pixels, labels) = images.gather(indices);
        let shape = [indices.len(), images.colours, images.height, images.width];
        let (n, k) = (pixels.len(), labels.len());
        let bytes: Vec<f32> = pixels
            .iter()
            .chain(&labels)
            .map(|&b| f32::from(b))
            .collect();
        let all = match buffer {
            Some(buffer) if crate::model::native::runs_fused(device) && !bytes.is_empty() => {
                buffer.write_on(&bytes, device)
            }
            _ => Tensor::<1>::from_data(TensorData::new(bytes, [n + k]), device),
        };
        Uploaded {
            all,
            shape,
            labels: k,
        }
    }
}

/// A batch's bytes and labels on the device, as one f32 buffer ([`Batch::upload`]).
pub struct Uploaded {
    all: Tensor<1>,
    shape: [usize; 4],
    labels: usize,
}

impl Uploaded {
    /// The batch: the buffer cut and cast on the device.
    pub fn batch(self) -> Batch {
        let Uploaded { all, shape, labels } = self;
        let n = all.dims()[0] - labels;
        if n == 0 {
            let device = all.device();
            return Batch {
                input: all.clone().reshape(shape),
                target: all.int().reshape(shape),
                context: Context::from_labels(&[], &device),
            };
        }
        let input = all.clone().narrow(0, 0, n).reshape(shape);
        Batch {
            target: input.clone().int(),
            input,
            context: Context::with_labels(all.narrow(0, n, labels).int()),
        }
    }
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
    pub optimizer: crate::optim::Optimizer,
    pub loss_scale: Option<LossScale>,
    /// Polyak averaging of the weights (`train.ema`), updated after every step taken.
    pub ema: Option<Ema>,
    /// On libtorch, the buffers a step's data from the host is written into. Not saved.
    pub inputs: StepInputs,
}

/// The buffers, on libtorch, that each step's batch, dropout keys, PixelVAE noise and f16 loss
/// scale are written
/// into before its work on the device, at one address step after step (what a CUDA graph's
/// replay would read); made by the first step.
#[derive(Clone, Debug, Default)]
pub struct StepInputs {
    pub batch: crate::model::native::DeviceBuffer,
    pub dropout_keys: crate::model::native::DeviceBuffer,
    pub noise: crate::model::native::DeviceBuffer,
    /// f16 where the device decides to skip a step: the loss scale and its inverse.
    pub loss_scale: crate::model::native::DeviceBuffer,
    /// With `runtime.cuda_graph`, the step captured as a CUDA graph, which replays read these
    /// buffers.
    pub graph: StepGraph,
}

impl TrainState {
    /// The weights that evaluation and sampling use: the average with `train.ema`, else the
    /// trained ones.
    pub fn eval_model(&self) -> &Model {
        self.ema.as_ref().map_or(&self.model, Ema::model)
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
/// `epoch.stop()` says so during a step (on any rank). With a loss scale (f16), steps are
/// loss-scaled and those whose gradients overflow are skipped. Calls `progress` with a
/// [`StepReport`] after each step. Returns the updated state, the totals so far and how the epoch
/// ended; a step that cannot be taken is an error naming it (see [`step::take`]).
pub fn train_epoch(
    mut state: TrainState,
    epoch: Epoch,
    mut progress: impl FnMut(&StepReport),
) -> Result<(TrainState, PassStats, EpochEnd), String> {
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
        let run_step = (step.epoch.max(1) - 1) * steps_per_epoch + i + 1;
        let at = StepAt {
            images,
            indices,
            i,
            run_step,
        };
        let (next, taken) = step::take(state, at, &step, stop, world, device)?;
        state = next;
        let dims = (indices.len() * images.dims()) as u64;
        if let Some(kl) = taken.kl_nats {
            *stats.kl_nats.get_or_insert(0.0) += kl;
            stats.kl_weight = taken.kl_weight;
        }
        if taken.skipped {
            stats.skipped_steps += 1;
        } else {
            stats.gradient_norm_sum += taken.gradient_norm;
            stats.gradient_norm_steps += 1;
        }
        stats.learning_rate = Some(taken.learning_rate);
        stats.nats += taken.nats;
        stats.subpixels += dims;
        stats.images += indices.len();
        progress(&StepReport {
            step: i + 1,
            images_done: stats.images,
            bits_per_dim: crate::loss::bits_per_dim(
                taken.nats + taken.kl_nats.unwrap_or(0.0),
                dims,
            ),
            loss_scale: state.loss_scale.map(|ls| ls.scale),
            gradient_norm: taken.gradient_norm,
            skipped: taken.skipped,
            learning_rate: taken.learning_rate,
            phases: taken.phases,
        });
        // Every rank stops where any of them was asked to, all at the same step.
        if taken.stop && (i + 1) * step.batch_size < order.len() {
            end = EpochEnd::Stopped { steps_done: i + 1 };
            break;
        }
    }
    stats.seconds = before + start.elapsed().as_secs_f64();
    Ok((state, stats, end))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The one upload of a batch gives inputs and targets equal to the bytes, every byte value
    /// among them, and the labels, in the order of the indices; an empty batch is empty.
    #[test]
    fn a_batch_is_its_bytes_and_labels() {
        let first: Vec<u8> = (0..=255).collect();
        let second: Vec<u8> = first.iter().rev().copied().collect();
        let images = Images {
            pixels: [first.clone(), second.clone()].concat(),
            labels: vec![9, 0],
            colours: 1,
            height: 16,
            width: 16,
        };
        let ints = |t: Tensor<4, Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        for device in crate::device::test_devices() {
            let batch = Batch::gather(&images, &[1, 0], &device);
            let expected: Vec<i64> = second.iter().chain(&first).map(|&b| i64::from(b)).collect();
            assert_eq!(batch.target.dims(), [2, 1, 16, 16]);
            assert_eq!(ints(batch.target), expected);
            let input = batch
                .input
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            assert!(input.iter().zip(&expected).all(|(&x, &b)| x == b as f32));
            let labels = batch.context.labels.into_data().convert::<i64>();
            assert_eq!(labels.try_to_vec::<i64>().unwrap(), [0, 9]);
            let empty = Batch::gather(&images, &[], &device);
            assert_eq!(empty.target.dims(), [0, 1, 16, 16]);
            assert_eq!(empty.context.labels.dims(), [0]);
        }
    }
}
