//! PixelVAE (Gulrajani et al. 2016, "PixelVAE: A Latent Variable Model for Natural Images"): a
//! convolutional encoder to a diagonal Gaussian q(z|x) over a spatial latent (the image
//! downsampled `downsample` times by 2), and a gated PixelCNN decoder conditioned on feature maps
//! computed from z.
//!
//! Conditioning modes: `Gates` upsamples z with learned convolutions to maps at the image's
//! resolution that enter every gate through 1x1 convolutions; `Concat` feeds the same maps to the
//! first layer's kernels, which equals concatenating them with the image as the paper does;
//! `Linear` is the paper's variant without upsampling: z itself, repeated over the pixels of its
//! block, enters every gate through a 1x1 convolution (a linear map of z in every layer).

use super::gated::{Conditioning, GatedConfig, GatedPixelCnn};
use super::masked_conv::uniform;
use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::RngExt;
use rand::rngs::StdRng;
use serde::Serialize;

/// How the decoder sees z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VaeConditioning {
    Gates,
    Concat,
    Linear,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VaeConfig {
    pub colours: usize,
    /// Channels of the latent; it has `ceil(side / 2^downsample)` positions per side.
    pub latent_channels: usize,
    /// Stride-2 convolutions in the encoder (and upsamplings by 2 in the decoder).
    pub downsample: usize,
    /// Channels of the encoder's and the upsampler's convolutions.
    pub hidden: usize,
    pub conditioning: VaeConditioning,
    /// The PixelCNN decoder; its `spatial_channels` are the conditioning maps' channels.
    pub decoder: GatedConfig,
}

/// A plain convolution with PyTorch's default initialisation from the run's seeded generator.
#[derive(Module, Debug)]
pub struct Conv {
    weight: Param<Tensor<4>>,
    bias: Param<Tensor<1>>,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        n_in: usize,
        n_out: usize,
        k: usize,
        stride: usize,
        rng: &mut StdRng,
        d: &Device,
    ) -> Conv {
        let bound = 1.0 / ((n_in * k * k) as f32).sqrt();
        let w = uniform(rng, n_out * n_in * k * k, bound);
        let b = uniform(rng, n_out, bound);
        Conv {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(w, [n_out, n_in, k, k]),
                d,
            )),
            bias: Param::from_tensor(Tensor::from_data(TensorData::new(b, [n_out]), d)),
            stride,
            padding: k / 2,
        }
    }

    /// Runs in the input's float type (mixed precision); f32 weights.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let (s, p) = (self.stride, self.padding);
        conv2d(
            x,
            self.weight.val().cast(dtype),
            Some(self.bias.val().cast(dtype)),
            ConvOptions::new([s, s], [p, p], [1, 1], 1),
        )
    }
}

#[derive(Module, Debug)]
pub struct Encoder {
    first: Conv,
    down: Vec<Conv>,
    /// Mean and log-variance of q(z|x), `2 * latent_channels` channels.
    stats: Conv,
}

/// z -> maps at the image's resolution: a convolution, then per level a nearest-neighbour
/// upsampling by 2 and a convolution, and a 1x1 to the maps' channels.
#[derive(Module, Debug)]
pub struct Upsampler {
    first: Conv,
    up: Vec<Conv>,
    out: Conv,
}

#[derive(Module, Debug)]
pub struct PixelVae {
    encoder: Encoder,
    upsampler: Option<Upsampler>,
    decoder: GatedPixelCnn,
    downsample: usize,
}

/// Repeats every pixel `factor` x `factor` times.
fn upsample(x: Tensor<4>, factor: usize) -> Tensor<4> {
    if factor == 1 {
        return x;
    }
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, factor, w, factor])
        .reshape([b, c, h * factor, w * factor])
}

/// Latent positions along a side of `side` pixels after `downsample` stride-2 convolutions.
pub fn latent_side(side: usize, downsample: usize) -> usize {
    (0..downsample).fold(side, |s, _| s.div_ceil(2))
}

impl VaeConfig {
    /// Trained parameters, counted from the layout (in u128; a test compares the count with the
    /// built model's): the encoder, the maps from z and the gated decoder.
    pub fn parameters(&self) -> u128 {
        use super::estimate::conv;
        let (h, l, d) = (
            self.hidden as u128,
            self.latent_channels as u128,
            self.downsample as u128,
        );
        let encoder =
            conv(self.colours as u128, h, 3, 3) + d * conv(h, h, 3, 3) + conv(h, 2 * l, 3, 3);
        let maps = match self.conditioning {
            VaeConditioning::Linear => 0,
            _ => {
                conv(l, h, 3, 3)
                    + d * conv(h, h, 3, 3)
                    + conv(h, self.decoder.spatial_channels as u128, 1, 1)
            }
        };
        encoder + maps + self.decoder.parameters()
    }

    /// f32 values a training step keeps per image pixel for the backward pass, the likelihood's
    /// aside: the decoder's, and about 3 per hidden channel of the encoder and maps per layer.
    pub fn activations_per_pixel(&self) -> u128 {
        self.decoder.layers as u128 * (14 * self.decoder.channels as u128 + 3 * self.hidden as u128)
    }

    pub fn init(&self, rng: &mut StdRng, device: &Device) -> PixelVae {
        let (h, l) = (self.hidden, self.latent_channels);
        let encoder = Encoder {
            first: Conv::new(self.colours, h, 3, 1, rng, device),
            down: (0..self.downsample)
                .map(|_| Conv::new(h, h, 3, 2, rng, device))
                .collect(),
            stats: Conv::new(h, 2 * l, 3, 1, rng, device),
        };
        let upsampler = (self.conditioning != VaeConditioning::Linear).then(|| Upsampler {
            first: Conv::new(l, h, 3, 1, rng, device),
            up: (0..self.downsample)
                .map(|_| Conv::new(h, h, 3, 1, rng, device))
                .collect(),
            out: Conv::new(h, self.decoder.spatial_channels, 1, 1, rng, device),
        });
        PixelVae {
            encoder,
            upsampler,
            decoder: self.decoder.init(rng, device),
            downsample: self.downsample,
        }
    }

    /// `[latent_channels, h', w']` for `height` x `width` images.
    pub fn latent_shape(&self, height: usize, width: usize) -> [usize; 3] {
        [
            self.latent_channels,
            latent_side(height, self.downsample),
            latent_side(width, self.downsample),
        ]
    }
}

impl PixelVae {
    /// Mean and log-variance of q(z|x), each `[batch, latent_channels, h', w']`, in f32.
    ///
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, scaled inputs in the compute type
    pub fn encode(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let e = &self.encoder;
        let mut h = relu(e.first.forward(x));
        for conv in &e.down {
            h = relu(conv.forward(h));
        }
        let stats = e.stats.forward(h).cast(burn::tensor::FloatDType::F32);
        let l = stats.dims()[1] / 2;
        let mean = stats.clone().narrow(1, 0, l);
        // Bounded so that exp() stays finite in any precision.
        let log_var = stats.narrow(1, l, l).clamp(-12.0, 8.0);
        (mean, log_var)
    }

    /// The decoder's conditioning maps for latents `z`, `[batch, maps, height, width]`.
    pub fn maps(&self, z: Tensor<4>, height: usize, width: usize) -> Tensor<4> {
        let factor = 1 << self.downsample;
        let crop = |x: Tensor<4>| x.narrow(2, 0, height).narrow(3, 0, width);
        match &self.upsampler {
            None => crop(upsample(z, factor)),
            Some(u) => {
                let mut h = relu(u.first.forward(z));
                for conv in &u.up {
                    h = relu(conv.forward(upsample(h, 2)));
                }
                u.out.forward(crop(h))
            }
        }
    }

    /// Logits of the decoder p(x|z).
    ///
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, scaled inputs in the compute type
    /// - z: `[batch, latent_channels, h', w']` in the compute type
    /// - returns: `[batch, colours * 256, h, w]`
    pub fn forward(&self, x: Tensor<4>, z: Tensor<4>, labels: &Tensor<1, Int>) -> Tensor<4> {
        let [_, _, height, width] = x.dims();
        let maps = self.maps(z, height, width);
        self.decoder.forward(
            x,
            &Conditioning {
                labels,
                maps: Some(&maps),
            },
        )
    }

    /// `[latent_channels, h', w']` for `height` x `width` images.
    pub fn latent_shape(&self, height: usize, width: usize) -> [usize; 3] {
        [
            self.encoder.stats.weight.dims()[0] / 2,
            latent_side(height, self.downsample),
            latent_side(width, self.downsample),
        ]
    }

    pub fn decoder(&self) -> &GatedPixelCnn {
        &self.decoder
    }
}

/// KL(N(mean, exp(log_var)) || N(0, 1)) per latent dimension, in nats (same shape as the inputs).
pub fn gaussian_kl(mean: Tensor<4>, log_var: Tensor<4>) -> Tensor<4> {
    (mean.powi_scalar(2) + log_var.clone().exp() - log_var - 1.0) * 0.5
}

/// log N(x; mean, exp(log_var)) per dimension, in nats.
pub fn gaussian_log_density(x: Tensor<4>, mean: Tensor<4>, log_var: Tensor<4>) -> Tensor<4> {
    let ln_2pi = (2.0 * std::f64::consts::PI).ln();
    ((x - mean).powi_scalar(2) / log_var.clone().exp() + log_var + ln_2pi) * -0.5
}

/// `n` standard normal draws (Box-Muller) from the run's generator, so that the noise of a step
/// is the same on every backend and after a resume.
pub fn standard_normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A draw of z ~ N(mean, exp(log_var)) as mean + sd * noise, the noise drawn from `rng` (so that
/// gradients reach the encoder).
pub fn reparameterise(mean: Tensor<4>, log_var: Tensor<4>, rng: &mut StdRng) -> Tensor<4> {
    let noise = normal_tensor(rng, mean.dims(), &mean.device());
    mean + (log_var * 0.5).exp() * noise
}

/// A tensor of standard normal draws of `shape`.
pub fn normal_tensor(rng: &mut StdRng, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(standard_normal(rng, n), shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn config(conditioning: VaeConditioning, colours: usize) -> VaeConfig {
        let maps = if conditioning == VaeConditioning::Linear {
            3
        } else {
            5
        };
        VaeConfig {
            colours,
            latent_channels: 3,
            downsample: 2,
            hidden: 8,
            conditioning,
            decoder: GatedConfig {
                spatial_channels: maps,
                concat: conditioning == VaeConditioning::Concat,
                ..GatedConfig::plain(colours, 2, 3, 6)
            },
        }
    }

    /// The closed-form KL against a Monte Carlo estimate E_q[log q(z) - log p(z)].
    #[test]
    fn closed_form_kl_matches_monte_carlo() {
        let device = Device::flex();
        let mut rng = StdRng::seed_from_u64(1);
        let (mean, log_var) = ([0.7f32, -1.2, 0.0, 2.0], [-0.5f32, 0.8, 0.0, -2.0]);
        let shape = [1, 4, 1, 1];
        let t = |v: [f32; 4]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape), &device);
        let closed: Vec<f32> = gaussian_kl(t(mean), t(log_var))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let n = 200_000;
        let eps = normal_tensor(&mut rng, [n, 4, 1, 1], &device);
        let (m, lv) = (t(mean), t(log_var));
        let z = m.clone() + (lv.clone() * 0.5).exp() * eps;
        let zeros = Tensor::<4>::zeros([1, 4, 1, 1], &device);
        let log_q = gaussian_log_density(z.clone(), m, lv);
        let log_p = gaussian_log_density(z, zeros.clone(), zeros);
        let mc: Vec<f32> = ((log_q - log_p).sum_dim(0) / n as f64)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (c, m) in closed.iter().zip(&mc) {
            // The estimator's spread is below 0.01 for these parameters at this many draws.
            assert!(
                (c - m).abs() < 0.02 + 0.01 * c.abs(),
                "closed {closed:?} vs MC {mc:?}"
            );
        }
        assert!(closed[2].abs() < 1e-7, "KL(N(0,1) || N(0,1)) = 0");
    }

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut rng = StdRng::seed_from_u64(3);
        let v = standard_normal(&mut rng, 100_001);
        assert_eq!(v.len(), 100_001);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    /// Encoder and decoder shapes for 28, 32 and 64 pixel images, grey and RGB, every mode.
    #[test]
    fn shapes_for_28_32_and_64_pixel_images() {
        let device = Device::flex();
        for (side, colours) in [(28, 1), (32, 3), (64, 3)] {
            for mode in [
                VaeConditioning::Gates,
                VaeConditioning::Concat,
                VaeConditioning::Linear,
            ] {
                let cfg = config(mode, colours);
                let vae = cfg.init(&mut StdRng::seed_from_u64(0), &device);
                let x = Tensor::<4>::zeros([2, colours, side, side], &device);
                let (mean, log_var) = vae.encode(x.clone());
                let want = cfg.latent_shape(side, side);
                assert_eq!(want[1], side.div_ceil(4), "{side}");
                assert_eq!(mean.dims(), [2, want[0], want[1], want[2]]);
                assert_eq!(log_var.dims(), mean.dims());
                let maps = vae.maps(mean.clone(), side, side);
                assert_eq!(maps.dims(), [2, cfg.decoder.spatial_channels, side, side]);
                let labels = Tensor::<1, Int>::zeros([2], &device);
                let logits = vae.forward(x, mean, &labels);
                assert_eq!(logits.dims(), [2, colours * 256, side, side], "{mode:?}");
            }
        }
        assert_eq!(latent_side(7, 2), 2);
        assert_eq!(latent_side(28, 0), 28);
    }

    #[test]
    fn upsample_repeats_pixels() {
        let device = Device::flex();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2., 3., 4.], [1, 1, 2, 2]),
            &device,
        );
        let up: Vec<f32> = upsample(x, 2).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(
            up,
            vec![
                1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.
            ]
        );
    }
}
