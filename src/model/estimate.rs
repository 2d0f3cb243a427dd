//! What a planned model will cost before it is built: its parameters and the floats a training step
//! keeps per image pixel, from the config alone, so that sizes that cannot fit are refused before
//! any data is read or any weight is drawn. The parameter count is exact for the PixelCNNs (a test
//! compares it with the built model); the activations are an estimate of what autodiff keeps.
//! Counted in u128: a config may ask for more than u64 holds (then u64::MAX).

use super::{GatedConfig, Likelihood, ModelConfig, SimpleConfig, VaeConditioning, VaeConfig};

/// Parameters of a k_h x k_w convolution from `inputs` to `outputs` channels, with bias.
fn conv(inputs: u128, outputs: u128, kh: u128, kw: u128) -> u128 {
    inputs * outputs * kh * kw + outputs
}

fn simple(c: &SimpleConfig) -> u128 {
    let (col, ch, k) = (c.colours as u128, c.channels as u128, c.kernel as u128);
    let first = conv(col, ch, k, k);
    let rest = (c.layers as u128).saturating_sub(1) * conv(ch, ch, k, k);
    first + rest + conv(ch, c.likelihood.outputs(c.colours) as u128, 1, 1)
}

fn gated(c: &GatedConfig) -> u128 {
    let (col, ch, k) = (c.colours as u128, c.channels as u128, c.kernel as u128);
    let g = if c.gates { 2 * ch } else { ch };
    let half = k / 2 + 1;
    let s = c.spatial_channels as u128;
    let layer = |input: u128, first: bool| {
        let mut n = conv(input, g, half, k) + conv(input, g, 1, half);
        n += 2 * conv(ch, ch, 1, 1); // out, skip
        if c.link {
            n += conv(g, g, 1, 1);
        }
        if let Some(classes) = c.classes {
            n += 2 * classes as u128 * g;
        }
        if s > 0 && !c.concat {
            n += 2 * conv(s, g, 1, 1);
        }
        if s > 0 && c.concat && first {
            n += conv(s, g, half, k) + conv(s, g, 1, half);
        }
        n
    };
    let rest = (c.layers as u128).saturating_sub(1) * layer(ch, false);
    let head = conv(ch, ch, 1, 1) + conv(ch, c.likelihood.outputs(c.colours) as u128, 1, 1);
    layer(col, true) + rest + head
}

fn vae(c: &VaeConfig) -> u128 {
    let (h, l, d) = (
        c.hidden as u128,
        c.latent_channels as u128,
        c.downsample as u128,
    );
    let encoder = conv(c.colours as u128, h, 3, 3) + d * conv(h, h, 3, 3) + conv(h, 2 * l, 3, 3);
    let maps = match c.conditioning {
        VaeConditioning::Linear => 0,
        _ => {
            conv(l, h, 3, 3)
                + d * conv(h, h, 3, 3)
                + conv(h, c.decoder.spatial_channels as u128, 1, 1)
        }
    };
    encoder + maps + gated(&c.decoder)
}

impl ModelConfig {
    /// Trainable scalars of the model this config builds.
    pub fn estimated_parameters(&self) -> u64 {
        let n = match self {
            ModelConfig::Simple(c) => simple(c),
            ModelConfig::Gated(c) => gated(c),
            ModelConfig::Vae(c) => vae(c),
            ModelConfig::PixelCnnPp(c) => c.parameters() as u128,
        };
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// f32 values a training step keeps per image pixel for the backward pass: each layer's
    /// activations (a ReLU layer keeps about 3 per channel; a gated layer's two stacks, gates and
    /// skips about 14 per channel; a PixelCNN++ gated resnet about 24 per filter in each of its two
    /// streams (two concat_elus, dropout's mask and product, the gate, the auxiliary input), its blocks at half and quarter resolution counting a quarter and a sixteenth),
    /// and the likelihood's: 256 logits per colour with their softmax and gradient, or the
    /// mixture's parameters with about 15 intermediate values per component and colour.
    pub fn activation_floats_per_pixel(&self) -> u64 {
        let (layers, channels, colours) = match self {
            ModelConfig::Simple(c) => (c.layers as u128, 3 * c.channels as u128, c.colours as u128),
            ModelConfig::Gated(c) => (c.layers as u128, 14 * c.channels as u128, c.colours as u128),
            ModelConfig::Vae(c) => (
                c.decoder.layers as u128,
                14 * c.decoder.channels as u128 + 3 * c.hidden as u128,
                c.colours as u128,
            ),
            // 2r + 1 blocks per stage and stream, at (1 + 1/4 + 1/16) = 21/16 of full resolution.
            ModelConfig::PixelCnnPp(c) => (
                (2 * c.resnets.max(1) as u128 + 1) * 21 / 16,
                2 * 24 * c.filters as u128,
                c.colours as u128,
            ),
        };
        let likelihood = match self.likelihood() {
            Likelihood::Categorical => 3 * 256 * colours,
            Likelihood::LogisticMixture { components } => {
                self.likelihood().outputs(colours as usize) as u128
                    + 15 * components as u128 * colours
            }
        };
        u64::try_from(layers * channels + likelihood).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
