//! Negative log-likelihoods of a model's predictions (the categorical per sub-pixel here, the
//! logistic mixture per pixel in [`logistic`]), and nats <-> bits per dimension.

pub mod logistic;

use crate::model::Prediction;
use crate::model::native::categorical_nll;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Total negative log-likelihood in nats of `targets` under a prediction, summed over every
/// sub-pixel of the batch, in f32.
///
/// # Shapes
/// - prediction: logits `[batch, colours, 256, h, w]` or mixture parameters `[batch, outputs, h, w]`
/// - targets: `[batch, colours, h, w]`, values 0..255
/// - returns: `[1]`
///
/// On libtorch the categorical's backward pass is libtorch's fused cross-entropy backward (see
/// `model::native`).
pub fn nll_nats(prediction: Prediction, targets: Tensor<4, Int>) -> Tensor<1> {
    match prediction {
        Prediction::Categorical(logits) => categorical_nll(logits, targets),
        Prediction::LogisticMixture { params, components } => {
            logistic::nll_nats(params, targets, components)
        }
    }
}

/// Negative log-likelihood of each image in nats.
///
/// # Shapes
/// - prediction: as [`nll_nats`]
/// - targets: `[batch, colours, h, w]`
/// - returns: `[batch]`
pub fn nll_per_image(prediction: Prediction, targets: Tensor<4, Int>) -> Tensor<1> {
    match prediction {
        Prediction::Categorical(logits) => {
            let [b, ..] = logits.dims();
            let picked = log_softmax(logits, 2).gather(2, targets.unsqueeze_dim(2)); // [b, c, 1, h, w]
            picked.reshape([b as i64, -1]).sum_dim(1).reshape([b]).neg()
        }
        Prediction::LogisticMixture { params, components } => {
            let [b, ..] = params.dims();
            logistic::log_prob(params, targets, components)
                .reshape([b as i64, -1])
                .sum_dim(1)
                .reshape([b])
                .neg()
        }
    }
}

/// The log-likelihood of each pixel's values (summed over its colours), `[batch, h, w]`.
///
/// # Shapes
/// - prediction: as [`nll_nats`]
/// - targets: `[batch, colours, h, w]`
pub fn log_prob_per_pixel(prediction: Prediction, targets: Tensor<4, Int>) -> Tensor<3> {
    match prediction {
        Prediction::Categorical(logits) => {
            let [b, _, _, h, w] = logits.dims();
            log_softmax(logits, 2)
                .gather(2, targets.unsqueeze_dim(2)) // [b, c, 1, h, w]
                .sum_dim(1)
                .reshape([b, h, w])
        }
        Prediction::LogisticMixture { params, components } => {
            logistic::log_prob(params, targets, components)
        }
    }
}

/// The log-likelihood of each factor of a prediction's likelihood: each sub-pixel under the
/// categorical (p(R), p(G | R), p(B | R, G): `[batch, colours, h, w]`), each pixel under the
/// logistic mixture (its colours jointly: `[batch, 1, h, w]`). Their sum is the images'.
///
/// # Shapes
/// - prediction: as [`nll_nats`]
/// - targets: `[batch, colours, h, w]`
pub fn log_prob_per_factor(prediction: Prediction, targets: Tensor<4, Int>) -> Tensor<4> {
    match prediction {
        Prediction::Categorical(logits) => {
            let [b, c, _, h, w] = logits.dims();
            log_softmax(logits, 2)
                .gather(2, targets.unsqueeze_dim(2)) // [b, c, 1, h, w]
                .reshape([b, c, h, w])
        }
        Prediction::LogisticMixture { params, components } => {
            logistic::log_prob(params, targets, components).unsqueeze_dim(1)
        }
    }
}

/// Bits per dimension from a total in nats over `dims` sub-pixels: nats / (dims * ln 2).
pub fn bits_per_dim(total_nats: f64, dims: u64) -> f64 {
    total_nats / (dims as f64 * std::f64::consts::LN_2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn uniform_prediction_is_exactly_eight_bits() {
        for device in crate::device::test_devices() {
            uniform_is_eight_bits_on(&device);
        }
    }

    fn uniform_is_eight_bits_on(device: &Device) {
        let device = device.clone();
        let (b, c, h, w) = (2, 3, 4, 5);
        let logits = Tensor::<5>::zeros([b, c, 256, h, w], &device);
        let targets: Vec<i64> = (0..b * c * h * w).map(|i| (i * 37 % 256) as i64).collect();
        let targets = Tensor::<4, Int>::from_data(TensorData::new(targets, [b, c, h, w]), &device);
        let nats: f32 = nll_nats(Prediction::Categorical(logits), targets).into_scalar();
        let bits = bits_per_dim(f64::from(nats), (b * c * h * w) as u64);
        assert!((bits - 8.0).abs() < 1e-5, "{bits}");
    }

    #[test]
    fn certain_prediction_is_zero_bits_and_wrong_certain_is_large() {
        let device = Device::flex();
        let mut v = vec![-1e4f32; 256];
        v[42] = 0.0;
        let logits = Tensor::<5>::from_data(TensorData::new(v, [1, 1, 256, 1, 1]), &device);
        let right =
            Tensor::<4, Int>::from_data(TensorData::new(vec![42i64], [1, 1, 1, 1]), &device);
        let wrong = Tensor::<4, Int>::from_data(TensorData::new(vec![7i64], [1, 1, 1, 1]), &device);
        let r: f32 = nll_nats(Prediction::Categorical(logits.clone()), right).into_scalar();
        let w: f32 = nll_nats(Prediction::Categorical(logits), wrong).into_scalar();
        assert!(r.abs() < 1e-4, "{r}");
        assert!(w > 1e3, "{w}");
    }

    /// Through every variant's head, the 256 values of a grey image's first pixel (which depends
    /// on no input) have probabilities that sum to 1, with either likelihood.
    #[test]
    fn every_model_puts_probability_one_on_the_256_values() {
        use crate::model::{GatedConfig, Likelihood, ModelConfig, PixelCnnPpConfig, SimpleConfig};
        let device = Device::flex();
        let mut configs = Vec::new();
        for likelihood in [
            Likelihood::Categorical,
            Likelihood::LogisticMixture { components: 4 },
        ] {
            configs.push(ModelConfig::Simple(SimpleConfig {
                colours: 1,
                layers: 2,
                kernel: 3,
                channels: 4,
                likelihood,
            }));
            configs.push(ModelConfig::Gated(GatedConfig {
                classes: Some(10),
                likelihood,
                ..GatedConfig::plain(1, 2, 3, 4)
            }));
            configs.push(ModelConfig::PixelCnnPp(PixelCnnPpConfig {
                colours: 1,
                filters: 4,
                resnets: 1,
                likelihood,
                classes: Some(10),
                dropout: 0.5,
            }));
        }
        for cfg in configs {
            let model = cfg.init(2, &device);
            let values: Vec<f32> = (0..256).map(|v| v as f32).collect();
            let x = Tensor::<4>::from_data(TensorData::new(values, [256, 1, 1, 1]), &device);
            let targets = x.clone().int();
            let ctx = crate::model::Context::from_labels(&[3; 256], &device);
            let nll: Vec<f32> = nll_per_image(model.forward(x, &ctx), targets)
                .into_data()
                .try_into_vec()
                .unwrap();
            let sum: f64 = nll.iter().map(|&n| (-f64::from(n)).exp()).sum();
            assert!((sum - 1.0).abs() < 1e-4, "{sum} for {cfg:?}");
        }
    }

    #[test]
    fn bits_from_nats() {
        assert!((bits_per_dim(std::f64::consts::LN_2 * 10.0, 5) - 2.0).abs() < 1e-12);
    }
}
