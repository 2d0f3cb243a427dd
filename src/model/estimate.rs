//! What a planned model will cost before it is built: its parameters and the floats a training step
//! keeps per image pixel, from the config alone (each variant counts its own network beside its
//! definition; the likelihood's share is counted here), so that sizes that cannot fit are refused before
//! any data is read or any weight is drawn. The parameter count is exact for the PixelCNNs (a test
//! compares it with the built model); the activations are an estimate of what autodiff keeps.
//! Counted in u128: a config may ask for more than u64 holds (then u64::MAX).

use super::{Likelihood, ModelConfig};

/// Parameters of a k_h x k_w convolution from `inputs` to `outputs` channels, with bias.
pub(super) fn conv(inputs: u128, outputs: u128, kh: u128, kw: u128) -> u128 {
    inputs * outputs * kh * kw + outputs
}

impl ModelConfig {
    /// Trainable scalars of the model this config builds.
    pub fn estimated_parameters(&self) -> u64 {
        let n = match self {
            ModelConfig::Simple(c) => c.parameters(),
            ModelConfig::Gated(c) => c.parameters(),
            ModelConfig::Vae(c) => c.parameters(),
            ModelConfig::PixelCnnPp(c) => c.parameters(),
        };
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// f32 values a training step keeps per image pixel for the backward pass: the network's
    /// (each variant's `activations_per_pixel`) and the likelihood's: 256 logits per colour with
    /// their softmax and gradient, or the mixture's parameters with about 15 intermediate values
    /// per component and colour.
    pub fn activation_floats_per_pixel(&self) -> u64 {
        let network = match self {
            ModelConfig::Simple(c) => c.activations_per_pixel(),
            ModelConfig::Gated(c) => c.activations_per_pixel(),
            ModelConfig::Vae(c) => c.activations_per_pixel(),
            ModelConfig::PixelCnnPp(c) => c.activations_per_pixel(),
        };
        let colours = self.colours() as u128;
        let likelihood = match self.likelihood() {
            Likelihood::Categorical => 3 * 256 * colours,
            Likelihood::LogisticMixture { components } => {
                self.likelihood().outputs(colours as usize) as u128
                    + 15 * components as u128 * colours
            }
        };
        u64::try_from(network + likelihood).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GatedConfig, SimpleConfig, VaeConditioning, VaeConfig};
    use burn::tensor::Device;

    fn gated_config(classes: Option<usize>, spatial: usize, concat: bool) -> GatedConfig {
        GatedConfig {
            classes,
            spatial_channels: spatial,
            concat,
            ..GatedConfig::plain(3, 3, 5, 12)
        }
    }

    /// The estimate counts exactly what the built models hold.
    #[test]
    fn parameter_estimate_is_the_built_models_count() {
        let device = Device::flex();
        let mut configs = vec![
            ModelConfig::Simple(SimpleConfig {
                colours: 1,
                layers: 5,
                kernel: 5,
                channels: 30,
                likelihood: Likelihood::Categorical,
            }),
            ModelConfig::Simple(SimpleConfig {
                colours: 1,
                layers: 2,
                kernel: 3,
                channels: 8,
                likelihood: Likelihood::LogisticMixture { components: 4 },
            }),
            ModelConfig::Gated(GatedConfig {
                colours: 1,
                likelihood: Likelihood::LogisticMixture { components: 3 },
                ..gated_config(None, 0, false)
            }),
            ModelConfig::PixelCnnPp(crate::model::PixelCnnPpConfig {
                colours: 3,
                filters: 5,
                resnets: 1,
                likelihood: Likelihood::Categorical,
                classes: Some(10),
                dropout: 0.5,
            }),
            ModelConfig::PixelCnnPp(crate::model::PixelCnnPpConfig {
                colours: 1,
                filters: 4,
                resnets: 1,
                likelihood: Likelihood::Categorical,
                classes: None,
                dropout: 0.0,
            }),
            ModelConfig::Gated(gated_config(None, 0, false)),
            ModelConfig::Gated(gated_config(Some(10), 0, false)),
            ModelConfig::Gated(GatedConfig {
                gates: false,
                link: false,
                ..gated_config(None, 0, false)
            }),
        ];
        for conditioning in [
            VaeConditioning::Gates,
            VaeConditioning::Concat,
            VaeConditioning::Linear,
        ] {
            let spatial = if conditioning == VaeConditioning::Linear {
                2
            } else {
                4
            };
            configs.push(ModelConfig::Vae(VaeConfig {
                colours: 3,
                latent_channels: 2,
                downsample: 2,
                hidden: 8,
                conditioning,
                decoder: gated_config(None, spatial, conditioning == VaeConditioning::Concat),
            }));
        }
        for cfg in configs {
            let built = cfg.init(1, &device).parameters() as u64;
            assert_eq!(cfg.estimated_parameters(), built, "{cfg:?}");
        }
    }
}
