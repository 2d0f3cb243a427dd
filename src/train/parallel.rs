//! Data-parallel steps and passes over the ranks of a [`World`]: each rank takes its share of
//! every global batch, and one all-reduce per step sums the gradients, the batch's nats and the
//! stop flag, so every rank steps the same optimizer with the same numbers. The global batch's
//! loss is the mean over all its sub-pixels, as in one process: each rank divides its nats by the
//! global batch's sub-pixels, and the sum of the ranks' gradients is the gradient of the whole.

use super::loss_scale::GradientNorm;
use super::{Batch, PassStats, Step, evaluate, evaluate_range, kl_penalty, noise_rng};
use crate::cluster::World;
use crate::data::Images;
use crate::loss::nll_nats;
use crate::model::{Model, vae};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use sha2::{Digest, Sha256};

/// One step's work on this rank, summed over the ranks.
pub(super) struct Reduced {
    /// The gradients of the global batch's loss, unscaled, on every rank the same.
    pub grads: GradientsParams,
    /// Their global L2 norm (not finite when one of them is not).
    pub gradient_norm: GradientNorm,
    /// Nats of the global batch, and for a PixelVAE its KL nats and weight.
    pub nats: f64,
    pub kl_nats: Option<f64>,
    pub kl_weight: Option<f64>,
    /// Whether any rank was asked to stop.
    pub stop: bool,
}

/// Trains step `i` (from 0) of the epoch on this rank's share of the global batch `indices`,
/// and sums the result over the ranks. `run_step` is the step's number in the run (from 1), for
/// the KL warm-up; `scale` the f16 loss scale (1 otherwise); `stop` this rank's stop flag.
#[allow(clippy::too_many_arguments)]
pub(super) fn step(
    model: &Model,
    images: &Images,
    indices: &[usize],
    (step, i, run_step): (&Step, usize, usize),
    scale: f64,
    stop: bool,
    world: &World,
    device: &Device,
) -> Reduced {
    let share = world.share(indices.len());
    let local = &indices[share.clone()];
    let global_dims = (indices.len() * images.colours * images.height * images.width) as f64;
    let latent = model.latent_shape(images.height, images.width);
    let kl_weight = latent.map(|_| step.kl_weight(run_step));
    let mut local_grads = None;
    let (mut nats, mut kl_nats) = (0.0f32, 0.0f32);
    // Free bits floor each latent dimension's mean over the *global* batch: its sum over the
    // ranks decides, for every rank alike, which dimensions the penalty's gradient reaches.
    let floored = latent.filter(|_| step.free_bits > 0.0);
    if local.is_empty() {
        if let Some([c, h, w]) = floored {
            world.sum_f32(&mut vec![0.0; c * h * w]);
        }
    } else {
        let mut batch = Batch::gather(images, local, device);
        batch.context.dropout = Some(step.dropout(run_step, share.start));
        // The noise of the whole global batch from the step's stream, of which this rank takes
        // its images' part: the same draws as one process makes for them.
        let mut rng = noise_rng(step.seed, step.epoch, i);
        let (logits, kl) = model.forward_with_noise(batch.input, &batch.context, |shape, dev| {
            let [_, c, h, w] = shape;
            let all = vae::standard_normal(&mut rng, indices.len() * c * h * w);
            let mine = all[share.start * c * h * w..share.end * c * h * w].to_vec();
            Tensor::from_data(TensorData::new(mine, shape), dev)
        });
        let local_nats = nll_nats(logits, batch.target);
        nats = local_nats.clone().into_scalar::<f32>();
        let mut loss = local_nats;
        if let (Some(kl), Some(weight)) = (kl, kl_weight) {
            kl_nats = kl.clone().sum().into_scalar::<f32>();
            let penalty = match floored {
                None => kl_penalty(kl, 0.0),
                Some(_) => {
                    let per_dimension = kl.sum_dim(0); // [1, c, h', w']: this rank's sums
                    let mut global: Vec<f32> = per_dimension
                        .clone()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec()
                        .expect("f32 KL");
                    world.sum_f32(&mut global);
                    let b = indices.len() as f64;
                    let mask: Vec<f32> = global
                        .iter()
                        .map(|&s| f32::from(f64::from(s) / b > step.free_bits))
                        .collect();
                    let mask = Tensor::from_data(
                        TensorData::new(mask, per_dimension.dims()),
                        &per_dimension.device(),
                    );
                    (per_dimension * mask).sum()
                }
            };
            loss = loss + penalty * weight;
        }
        let loss = loss / global_dims * scale;
        local_grads = Some(GradientsParams::from_grads(loss.backward(), model));
    }
    let (grads, gradient_norm, [nats, kl_nats, stop]) = all_reduce(
        model,
        local_grads,
        [nats, kl_nats, f32::from(stop)],
        1.0 / scale,
        world,
        &device.clone().without_autodiff(),
    );
    Reduced {
        grads,
        gradient_norm,
        nats: f64::from(nats),
        kl_nats: latent.map(|_| f64::from(kl_nats)),
        kl_weight,
        stop: stop > 0.0,
    }
}

/// Sums every float parameter's gradient (zeros where this rank has none), and `extras`, over
/// the ranks in one buffer; multiplies the gradients by `factor`. Returns the gradients of the
/// parameters some rank had one for, their global L2 norm and the summed extras.
fn all_reduce<const N: usize>(
    model: &Model,
    mut grads: Option<GradientsParams>,
    extras: [f32; N],
    factor: f64,
    world: &World,
    device: &Device,
) -> (GradientsParams, GradientNorm, [f32; N]) {
    struct Flatten<'a> {
        grads: Option<&'a mut GradientsParams>,
        parts: Vec<Tensor<1>>,
        sizes: Vec<usize>,
        present: Vec<f32>,
        device: &'a Device,
    }
    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().shape().num_elements();
            let grad = self.grads.as_mut().and_then(|g| g.remove::<D>(param.id));
            self.present.push(f32::from(grad.is_some()));
            self.sizes.push(n);
            self.parts.push(match grad {
                Some(g) => g.reshape([n]),
                None => Tensor::zeros([n], self.device),
            });
        }
    }
    let mut flatten = Flatten {
        grads: grads.as_mut(),
        parts: Vec::new(),
        sizes: Vec::new(),
        present: Vec::new(),
        device,
    };
    model.visit(&mut flatten);
    let Flatten {
        parts,
        sizes,
        present,
        ..
    } = flatten;
    let params = present.len();
    let mut buffer: Vec<f32> = Tensor::cat(parts, 0)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("f32 gradients");
    let values = buffer.len();
    buffer.extend_from_slice(&present);
    buffer.extend_from_slice(&extras);
    world.sum_f32(&mut buffer);

    let present: Vec<bool> = buffer[values..values + params]
        .iter()
        .map(|&p| p > 0.0)
        .collect();
    let sums: [f32; N] = buffer[values + params..]
        .try_into()
        .expect("the extras come back whole");
    buffer.truncate(values);
    if factor != 1.0 {
        for g in &mut buffer {
            *g = (f64::from(*g) * factor) as f32;
        }
    }
    let mut offset = 0;
    let norm = GradientNorm::from_square_sums(sizes.iter().zip(&present).map(|(&n, &p)| {
        let part = &buffer[offset..offset + n];
        offset += n;
        p.then(|| {
            part.iter()
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>()
        })
    }));

    struct Rebuild<'a> {
        flat: Tensor<1>,
        offset: usize,
        present: std::slice::Iter<'a, bool>,
        grads: GradientsParams,
    }
    impl ModuleVisitor for Rebuild<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let shape = param.val().shape();
            let n = shape.num_elements();
            if *self.present.next().expect("one flag per parameter") {
                let g: Tensor<D> = self.flat.clone().narrow(0, self.offset, n).reshape(shape);
                self.grads.register(param.id, g);
            }
            self.offset += n;
        }
    }
    let mut rebuild = Rebuild {
        flat: Tensor::from_data(TensorData::new(buffer, [values]), device),
        offset: 0,
        present: present.iter(),
        grads: GradientsParams::new(),
    };
    model.visit(&mut rebuild);
    (rebuild.grads, norm, sums)
}

/// Evaluates `images` sharded over the ranks (each its contiguous share, with every image's
/// noise from its own index) and sums the totals: the same numbers on every rank, and up to
/// float summation the same as one process.
pub fn evaluate_sharded(
    model: &Model,
    images: &Images,
    batch_size: usize,
    seed: u64,
    device: &Device,
    world: &World,
) -> PassStats {
    if world.size() == 1 {
        return evaluate(model, images, batch_size, seed, device);
    }
    let share = world.share(images.len());
    let local = evaluate_range(model, images, share, batch_size, seed, device);
    let mut sums = [
        local.nats,
        local.subpixels as f64,
        local.images as f64,
        local.kl_nats.unwrap_or(0.0),
        f64::from(u8::from(local.kl_nats.is_some())),
    ];
    world.sum_f64(&mut sums);
    let seconds = world.gather_u64(local.seconds.to_bits());
    PassStats {
        nats: sums[0],
        subpixels: sums[1] as u64,
        images: sums[2] as usize,
        seconds: seconds.into_iter().map(f64::from_bits).fold(0.0, f64::max),
        kl_nats: (sums[4] > 0.0).then_some(sums[3]),
        kl_weight: None,
        ..PassStats::default()
    }
}

/// A checksum of every float parameter's value (their f32 bits, in visiting order): equal on
/// every rank when the ranks hold the same weights.
pub fn weights_checksum(model: &Model) -> u64 {
    struct Hash(Sha256);
    impl ModuleVisitor for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values: Vec<f32> = param
                .val()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32 weights");
            for v in values {
                self.0.update(v.to_bits().to_le_bytes());
            }
        }
    }
    let mut hash = Hash(Sha256::new());
    model.visit(&mut hash);
    let digest = hash.0.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}
