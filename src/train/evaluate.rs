//! Evaluation passes: the loss of a split in plain numbers, and for a PixelVAE the
//! importance-sampled likelihood (Burda et al. 2016) with K draws from q(z|x) per image, beside
//! the ELBO from the same draws, which bounds it from above.

use super::{Batch, PassStats};
use crate::data::Images;
use crate::loss::{nll_nats, nll_per_image};
use crate::model::{Context, Model, vae};
use crate::progress::Progress;
use crate::rng::{self, Purpose};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use std::time::Instant;

/// Standard normal noise `[batch, ...]` for the images `first..first + batch` of a split, each
/// image's from its own stream (`purpose`, `draw`, its index): the draws do not depend on how the
/// split is cut into batches.
fn per_image_noise(
    (seed, purpose, draw): (u64, Purpose, u64),
    first: usize,
    shape: [usize; 4],
    device: &Device,
) -> Tensor<4> {
    let [batch, c, h, w] = shape;
    let values: Vec<f32> = (first..first + batch)
        .flat_map(|i| {
            let mut rng = rng::stream(seed, purpose, draw, i as u64);
            vae::standard_normal(&mut rng, c * h * w)
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Evaluates the model on every image of `images`, in order. A PixelVAE's negative ELBO uses one
/// z per image, with noise from a stream of `seed` and the image's index: every epoch and every
/// `batch_size` sees the same.
pub fn evaluate(
    label: &str,
    model: &Model,
    images: &Images,
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> PassStats {
    evaluate_range(
        label,
        model,
        images,
        0..images.len(),
        batch_size,
        seed,
        device,
    )
}

/// [`evaluate`] on the images `range` of `images` (a rank's share of a split).
pub fn evaluate_range(
    label: &str,
    model: &Model,
    images: &Images,
    range: std::ops::Range<usize>,
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> PassStats {
    let start = Instant::now();
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let mut stats = PassStats::default();
    let all: Vec<usize> = range.collect();
    let progress = Progress::new(label, all.len() as u64, "images");
    for indices in all.chunks(batch_size.max(1)) {
        let batch = Batch::gather(images, indices, &device);
        let dims = batch.target.shape().num_elements() as u64;
        let first = indices[0];
        let (logits, kl) = model.forward_with_noise(batch.input, &batch.context, |shape, dev| {
            per_image_noise((seed, Purpose::EvalNoise, 0), first, shape, dev)
        });
        if let Some(kl) = kl {
            *stats.kl_nats.get_or_insert(0.0) += f64::from(kl.sum().into_scalar::<f32>());
        }
        let nats = nll_nats(logits, batch.target);
        stats.nats += f64::from(nats.into_scalar::<f32>());
        stats.subpixels += dims;
        stats.images += indices.len();
        progress.advance(indices.len() as u64);
    }
    progress.finish();
    stats.seconds = start.elapsed().as_secs_f64();
    stats
}

/// Totals of an importance-sampled evaluation, in nats over `subpixels` sub-pixels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bounds {
    /// -sum over images of mean_k w_k: the negative ELBO estimated with the K draws.
    pub elbo_nats: f64,
    /// -sum over images of (logsumexp_k w_k - ln K): the importance-sampled NLL.
    pub importance_nats: f64,
    pub subpixels: u64,
    pub images: usize,
    /// How much each latent dimension's posterior mean varies over the images.
    pub latent_means: LatentSpread,
}

/// Running sums of q(z|x)'s mean per latent dimension (channel and position) over images, for
/// Burda et al.'s (2016) count of active units: a dimension is active when Var_x E_q[z] > 0.01.
/// A collapsed latent (q(z|x) = p(z) for every x) has none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatentSpread {
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    images: usize,
}

/// Burda et al.'s threshold on Var_x E_q[z] for an active latent dimension.
pub const ACTIVE_VARIANCE: f64 = 0.01;

impl LatentSpread {
    /// Adds a batch of means, `[batch, latent_channels, h', w']`, as f32 values in that order.
    pub fn add(&mut self, means: &[f32], batch: usize) {
        let dims = means.len() / batch.max(1);
        if dims == 0 {
            return;
        }
        if self.sum.is_empty() {
            self.sum = vec![0.0; dims];
            self.sum_sq = vec![0.0; dims];
        }
        for image in means.chunks(dims) {
            for (d, &m) in image.iter().enumerate() {
                self.sum[d] += f64::from(m);
                self.sum_sq[d] += f64::from(m) * f64::from(m);
            }
        }
        self.images += batch;
    }

    /// Latent dimensions in all.
    pub fn dimensions(&self) -> usize {
        self.sum.len()
    }

    /// Dimensions whose mean varies over the images by more than `ACTIVE_VARIANCE`.
    pub fn active(&self) -> usize {
        let n = self.images.max(1) as f64;
        self.sum
            .iter()
            .zip(&self.sum_sq)
            .filter(|&(&s, &sq)| sq / n - (s / n).powi(2) > ACTIVE_VARIANCE)
            .count()
    }
}

/// For every image of `images` (in batches of `batch_size`), draws `k` latents from q(z|x), draw
/// `j` of image `i` from the importance-sampling stream of (`seed`, `j`, `i`), and combines the
/// log-weights w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x). None for a model without latents.
pub fn importance_bounds(
    model: &Model,
    images: &Images,
    k: usize,
    batch_size: usize,
    seed: u64,
    device: &Device,
) -> Option<Bounds> {
    let all: Vec<usize> = (0..images.len()).collect();
    let mut bounds = Bounds::default();
    for indices in all.chunks(batch_size.max(1)) {
        let batch = Batch::gather(images, indices, device);
        let (mean, log_var) = model.encode(batch.input.clone())?;
        let means: Vec<f32> = mean
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 means");
        bounds.latent_means.add(&means, indices.len());
        let mut weights = vec![Vec::with_capacity(k); indices.len()]; // [b][k]
        for draw in 0..k.max(1) {
            let eps = per_image_noise(
                (seed, Purpose::ImportanceSampling, draw as u64),
                indices[0],
                mean.dims(),
                device,
            );
            let z = mean.clone() + (log_var.clone() * 0.5).exp() * eps;
            let zeros = z.zeros_like();
            let log_p_z = vae::gaussian_log_density(z.clone(), zeros.clone(), zeros);
            let log_q_z = vae::gaussian_log_density(z.clone(), mean.clone(), log_var.clone());
            let [b, ..] = z.dims();
            let prior_ratio = (log_p_z - log_q_z).reshape([b as i64, -1]).sum_dim(1);
            let context = Context {
                latent: Some(z),
                ..batch.context.clone()
            };
            let logits = model.forward(batch.input.clone(), &context);
            let log_w = prior_ratio.reshape([b]) - nll_per_image(logits, batch.target.clone());
            let log_w: Vec<f32> = log_w
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32");
            for (per_image, w) in weights.iter_mut().zip(log_w) {
                per_image.push(f64::from(w));
            }
        }
        for w in &weights {
            let max = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + w.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            bounds.importance_nats -= lse - (w.len() as f64).ln();
            bounds.elbo_nats -= w.iter().sum::<f64>() / w.len() as f64;
        }
        bounds.subpixels += batch.target.shape().num_elements() as u64;
        bounds.images += indices.len();
    }
    Some(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::loss::nll_nats;
    use crate::model::{GatedConfig, ModelConfig, VaeConditioning, VaeConfig};
    use burn::tensor::Device;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn tiny_vae() -> ModelConfig {
        ModelConfig::Vae(VaeConfig {
            colours: 1,
            latent_channels: 2,
            downsample: 1,
            hidden: 6,
            conditioning: VaeConditioning::Gates,
            decoder: GatedConfig {
                spatial_channels: 3,
                ..GatedConfig::plain(1, 2, 3, 6)
            },
        })
    }

    /// Active units: a dimension counts when its mean's variance over images exceeds 0.01.
    #[test]
    fn active_latent_dimensions_are_those_whose_mean_varies() {
        let mut spread = LatentSpread::default();
        // Three dimensions over four images (two batches of two): constant; +-0.2 (variance
        // 0.04, active); +-0.05 (variance 0.0025, not).
        spread.add(&[0.7, 0.2, 0.05, 0.7, -0.2, -0.05], 2);
        spread.add(&[0.7, 0.2, 0.05, 0.7, -0.2, -0.05], 2);
        assert_eq!((spread.dimensions(), spread.images), (3, 4));
        assert_eq!(spread.active(), 1);
        assert_eq!(LatentSpread::default().active(), 0);
        spread.add(&[], 0);
        assert_eq!(spread.images, 4, "an empty batch adds nothing");
    }

    /// With the same draws, the importance-sampled NLL is at most the ELBO's (Jensen), and with
    /// one draw the two are equal; both agree with the closed-form-KL ELBO within noise.
    #[test]
    fn importance_sampled_bound_is_at_most_the_elbo() {
        let device = Device::flex();
        let spec = synthetic::Spec {
            size: 8,
            colours: 1,
            train_images: 32,
        };
        let test = synthetic::generate(&spec, 2).test;
        let model = tiny_vae().init(3, &device);
        let run = |k| importance_bounds(&model, &test, k, 4, 7, &device).unwrap();
        let many = run(16);
        assert_eq!(many.images, test.len());
        assert!(
            many.importance_nats <= many.elbo_nats,
            "IS {} > ELBO {}",
            many.importance_nats,
            many.elbo_nats
        );
        assert!(
            many.elbo_nats - many.importance_nats > 1e-3,
            "a strict gap: {many:?}"
        );
        let one = run(1);
        assert!((one.importance_nats - one.elbo_nats).abs() < 1e-6 * one.elbo_nats.abs());
        // 2 channels of a 4 x 4 latent, the encoder's means gathered once per image.
        assert_eq!(many.latent_means.dimensions(), 2 * 4 * 4);
        assert_eq!(many.latent_means.images, test.len());

        // The closed-form-KL ELBO of one draw per image, against the 16-draw estimate.
        let mut rng = StdRng::seed_from_u64(9);
        let batch = Batch::gather(&test, &(0..test.len()).collect::<Vec<_>>(), &device);
        let mut total = 0.0;
        for _ in 0..16 {
            let (logits, kl) = model.forward_with_kl(batch.input.clone(), &batch.context, &mut rng);
            let recon: f32 = nll_nats(logits, batch.target.clone()).into_scalar();
            let kl: f32 = kl.unwrap().sum().into_scalar();
            total += f64::from(recon + kl) / 16.0;
        }
        let rel = (total - many.elbo_nats).abs() / many.elbo_nats;
        assert!(
            rel < 0.01,
            "closed-form ELBO {total} vs MC {}",
            many.elbo_nats
        );
    }

    /// With a one-dimensional latent, log p(x) = log of the integral of p(x|z) p(z) dz can be
    /// computed directly by quadrature; the importance-sampled estimate with many draws must agree
    /// with it, and the ELBO must lie above it. A wrong log q, log p(z) or weighting fails here.
    #[test]
    fn importance_sampled_nll_matches_quadrature_of_a_one_dimensional_latent() {
        let device = Device::flex();
        let cfg = ModelConfig::Vae(VaeConfig {
            colours: 1,
            latent_channels: 1,
            downsample: 2,
            hidden: 4,
            conditioning: VaeConditioning::Gates,
            decoder: GatedConfig {
                spatial_channels: 2,
                ..GatedConfig::plain(1, 2, 3, 4)
            },
        });
        let model = cfg.init(5, &device);
        let images = synthetic::generate(
            &synthetic::Spec {
                size: 4,
                colours: 1,
                train_images: 8,
            },
            3,
        )
        .test;
        assert_eq!(model.latent_shape(4, 4), Some([1, 1, 1]));
        let bounds = importance_bounds(&model, &images, 4000, 1, 11, &device).unwrap();
        // Quadrature over z in [-10, 10] (the prior's mass outside is below 1e-22).
        let points = 4001;
        let dz = 20.0 / (points - 1) as f64;
        let zs: Vec<f32> = (0..points)
            .map(|j| (-10.0 + j as f64 * dz) as f32)
            .collect();
        let mut exact = 0.0;
        for i in 0..images.len() {
            let batch = Batch::gather(&images, &vec![i; points], &device);
            let context = Context {
                latent: Some(Tensor::from_data(
                    TensorData::new(zs.clone(), [points, 1, 1, 1]),
                    &device,
                )),
                ..batch.context.clone()
            };
            let nll: Vec<f32> = nll_per_image(model.forward(batch.input, &context), batch.target)
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .unwrap();
            let terms: Vec<f64> = zs
                .iter()
                .zip(&nll)
                .map(|(&z, &n)| {
                    let z = f64::from(z);
                    -f64::from(n) - 0.5 * z * z - 0.5 * (2.0 * std::f64::consts::PI).ln() + dz.ln()
                })
                .collect();
            let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            exact -= max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
        }
        let per_image = (bounds.importance_nats - exact) / images.len() as f64;
        assert!(
            per_image.abs() < 0.01,
            "IS {} vs quadrature {exact} nats",
            bounds.importance_nats
        );
        assert!(
            bounds.elbo_nats > exact + 1e-3,
            "{} {exact}",
            bounds.elbo_nats
        );
    }

    /// The PixelVAE's evaluation draws one noise stream per image: the ELBO and the importance
    /// estimate do not depend on the batch size (up to f32 rounding of the sums).
    #[test]
    fn vae_evaluation_does_not_depend_on_the_batch_size() {
        let device = Device::flex();
        let spec = synthetic::Spec {
            size: 8,
            colours: 1,
            train_images: 28,
        };
        let test = synthetic::generate(&spec, 2).test;
        let model = tiny_vae().init(3, &device);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs();
        let (one, some) = (
            evaluate("test", &model, &test, 1, 4, &device),
            evaluate("test", &model, &test, 5, 4, &device),
        );
        assert!(
            close(one.bits_per_dim(), some.bits_per_dim()),
            "{one:?} {some:?}"
        );
        let (one, some) = (
            importance_bounds(&model, &test, 3, 1, 4, &device).unwrap(),
            importance_bounds(&model, &test, 3, 4, 4, &device).unwrap(),
        );
        assert!(
            close(one.importance_nats, some.importance_nats),
            "{one:?} {some:?}"
        );
        assert!(close(one.elbo_nats, some.elbo_nats));
    }

    #[test]
    fn pixel_cnns_have_no_latent_bound() {
        let device = Device::flex();
        let cfg = match tiny_vae() {
            ModelConfig::Vae(v) => ModelConfig::Gated(GatedConfig {
                spatial_channels: 0,
                ..v.decoder
            }),
            _ => unreachable!(),
        };
        let test = synthetic::generate(
            &synthetic::Spec {
                size: 4,
                colours: 1,
                train_images: 8,
            },
            1,
        )
        .test;
        assert!(importance_bounds(&cfg.init(0, &device), &test, 2, 4, 0, &device).is_none());
    }
}
