//! Categorical negative log-likelihood per sub-pixel, and nats <-> bits per dimension.

pub mod logistic;

use crate::model::native::categorical_nll;
use burn::tensor::{Int, Tensor};

/// Total negative log-likelihood in nats of `targets` under `logits`, summed over every sub-pixel
/// of the batch.
///
/// # Shapes
/// - logits: `[batch, colours, 256, h, w]`
/// - targets: `[batch, colours, h, w]`, values 0..255
/// - returns: `[1]`
///
/// On libtorch its backward pass is libtorch's fused cross-entropy backward (see `model::native`).
pub fn nll_nats(logits: Tensor<5>, targets: Tensor<4, Int>) -> Tensor<1> {
    categorical_nll(logits, targets)
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
        let nats: f32 = nll_nats(logits, targets).into_scalar();
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
        let r: f32 = nll_nats(logits.clone(), right).into_scalar();
        let w: f32 = nll_nats(logits, wrong).into_scalar();
        assert!(r.abs() < 1e-4, "{r}");
        assert!(w > 1e3, "{w}");
    }

    #[test]
    fn bits_from_nats() {
        assert!((bits_per_dim(std::f64::consts::LN_2 * 10.0, 5) - 2.0).abs() < 1e-12);
    }
}
