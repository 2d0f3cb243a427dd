//! `pixel eval`: the test set's negative log-likelihood from a run's newest checkpoint. Exact for
//! the PixelCNNs; for a PixelVAE an importance-sampled estimate (Burda et al. 2016) with K draws
//! from q(z|x) per image, beside the ELBO from the same draws, which bounds it from above.

use crate::data::Images;
use crate::error::{Error, Result};
use crate::experiment::{self, Plan};
use crate::loss::bits_per_dim;
use crate::model::{Context, Model, vae};
use crate::results::{EXPERIMENT_FILE, write_atomic};
use crate::train::Batch;
use crate::{data, device, run};
use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use std::path::Path;

/// The file `pixel eval` writes into the results folder.
pub const EVAL_FILE: &str = "eval.json";

/// Negative log-likelihood of each image in nats.
///
/// # Shapes
/// - logits: `[batch, colours, 256, h, w]`
/// - targets: `[batch, colours, h, w]`
/// - returns: `[batch]`
pub fn nll_per_image(logits: Tensor<5>, targets: Tensor<4, Int>) -> Tensor<1> {
    let [b, ..] = logits.dims();
    let picked = log_softmax(logits, 2).gather(2, targets.unsqueeze_dim(2)); // [b, c, 1, h, w]
    picked.reshape([b as i64, -1]).sum_dim(1).reshape([b]).neg()
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

/// For every image of `images` (in batches of `batch_size`), draws `k` latents from q(z|x) with
/// noise from `rng` and combines the log-weights w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x).
/// None for a model without latents.
pub fn importance_bounds(
    model: &Model,
    images: &Images,
    k: usize,
    batch_size: usize,
    rng: &mut StdRng,
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
        for _ in 0..k.max(1) {
            let z = vae::reparameterise(mean.clone(), log_var.clone(), rng);
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

#[derive(Serialize, Debug)]
pub struct Report {
    /// The epoch after which the evaluated checkpoint was written.
    pub epochs: usize,
    pub images: usize,
    /// Exact (PixelCNNs) or importance-sampled (PixelVAE) test NLL, bits per dimension.
    pub test_bits_per_dim: f64,
    /// PixelVAE: the negative ELBO with the same draws (at least `test_bits_per_dim`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_elbo_bits_per_dim: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub importance_samples: Option<usize>,
    /// PixelVAE: latent dimensions whose posterior mean varies over the test images (variance
    /// above 0.01, Burda et al. 2016); 0 when the latent has collapsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_latent_dimensions: Option<usize>,
    /// PixelVAE: latent dimensions in all (channels x positions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_dimensions: Option<usize>,
    pub seconds: f64,
}

/// A finished epoch of a run, loaded for `pixel eval` and `pixel sample`.
pub struct LoadedRun {
    pub plan: Plan,
    pub opened: device::Opened,
    pub model: Model,
    /// The epoch whose end the checkpoint was written at.
    pub epochs: usize,
}

/// Loads the run in `dir`: its resolved experiment and the newest checkpoint written at an
/// epoch's end (the model of the last `metrics.csv` row, not that of a later interrupt), for
/// `command`'s errors.
pub fn load_run(dir: &Path, sets: &[experiment::Override], command: &str) -> Result<LoadedRun> {
    let exp_path = dir.join(EXPERIMENT_FILE);
    if !exp_path.is_file() {
        return Err(Error::Usage {
            flag: format!("{command} {}", dir.display()),
            message: format!("expected a results folder holding {EXPERIMENT_FILE}"),
        });
    }
    let (exp, overrides) = experiment::load(&exp_path, sets)?;
    let plan = Plan::new(exp, overrides, &exp_path, None)?;
    let opened = device::open(&plan.device, plan.experiment.train.seed);
    let (model, epochs) = run::load_latest_model(&plan, dir, &opened.device)?;
    Ok(LoadedRun {
        plan,
        opened,
        model,
        epochs,
    })
}

/// `pixel eval DIR`: evaluates on the run's test split and writes `DIR/eval.json`.
pub fn eval_results(
    dir: &Path,
    importance_samples: usize,
    batch_size: Option<usize>,
) -> Result<Report> {
    if importance_samples == 0 {
        return Err(Error::Usage {
            flag: "--importance-samples".into(),
            message: "expected at least 1 draw per image, got 0".into(),
        });
    }
    let LoadedRun {
        plan,
        opened,
        model,
        epochs,
    } = load_run(dir, &[], "pixel eval")?;
    let model = model.valid();
    let device = opened.device.clone().without_autodiff();
    let splits = data::load(&plan.data)?;
    let batch = batch_size.unwrap_or(plan.experiment.train.eval_batch_size);
    let started = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(plan.experiment.train.seed ^ 0x1_5A3E);
    let report = match importance_bounds(
        &model,
        &splits.test,
        importance_samples,
        batch,
        &mut rng,
        &device,
    ) {
        Some(b) => Report {
            epochs,
            images: b.images,
            test_bits_per_dim: bits_per_dim(b.importance_nats, b.subpixels),
            test_elbo_bits_per_dim: Some(bits_per_dim(b.elbo_nats, b.subpixels)),
            importance_samples: Some(importance_samples),
            active_latent_dimensions: Some(b.latent_means.active()),
            latent_dimensions: Some(b.latent_means.dimensions()),
            seconds: started.elapsed().as_secs_f64(),
        },
        None => {
            let stats = crate::train::evaluate(
                &model,
                &splits.test,
                batch,
                plan.experiment.train.seed,
                &device,
            );
            Report {
                epochs,
                images: stats.images,
                test_bits_per_dim: stats.bits_per_dim(),
                test_elbo_bits_per_dim: None,
                importance_samples: None,
                active_latent_dimensions: None,
                latent_dimensions: None,
                seconds: started.elapsed().as_secs_f64(),
            }
        }
    };
    let json = serde_json::to_string_pretty(&report).expect("a report serialises");
    write_atomic(&dir.join(EVAL_FILE), json.as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::loss::nll_nats;
    use crate::model::{GatedConfig, ModelConfig, VaeConditioning, VaeConfig};

    fn tiny_vae() -> ModelConfig {
        ModelConfig::Vae(VaeConfig {
            colours: 1,
            latent_channels: 2,
            downsample: 1,
            hidden: 6,
            conditioning: VaeConditioning::Gates,
            decoder: GatedConfig {
                colours: 1,
                layers: 2,
                kernel: 3,
                channels: 6,
                classes: None,
                spatial_channels: 3,
                concat: false,
                residual: true,
                gates: true,
                link: true,
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
        let run = |k| {
            let mut rng = StdRng::seed_from_u64(7);
            importance_bounds(&model, &test, k, 4, &mut rng, &device).unwrap()
        };
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
        let mut rng = StdRng::seed_from_u64(0);
        assert!(importance_bounds(&cfg.init(0, &device), &test, 2, 4, &mut rng, &device).is_none());
    }
}
