//! Architectures. A config enum paired with a module enum and one `match` each (as Burn's
//! `activation_wrapper.rs` does): every variant is trained, evaluated and sampled by the same code.
//! Imports only `device` (precisions, test devices) and `rng` (the weight stream); the plan builds
//! the configs.

mod cache;
pub mod causality;
mod estimate;
pub mod export;
pub mod gated;
pub mod masked_conv;
pub mod native;
pub mod pixelcnnpp;
pub mod simple;
pub mod vae;

use crate::rng::Purpose;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use serde::Serialize;

pub use gated::{GatedConfig, GatedPixelCnn};
pub use pixelcnnpp::{DropoutDraws, PixelCnnPp, PixelCnnPpConfig};
pub use simple::{SimpleConfig, SimplePixelCnn};
pub use vae::{PixelVae, VaeConditioning, VaeConfig};

/// What will be built (decided by the plan).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "variant", rename_all = "lowercase")]
pub enum ModelConfig {
    Simple(SimpleConfig),
    Gated(GatedConfig),
    Vae(VaeConfig),
    PixelCnnPp(PixelCnnPpConfig),
}

/// The distribution a model predicts for the values 0..255.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Likelihood {
    /// A 256-way softmax per sub-pixel, R -> G -> B within a pixel.
    Categorical,
    /// A discretized mixture of `components` logistics per pixel (Salimans et al. 2017), the
    /// colours of a pixel coupled linearly (`loss::logistic` has the layout and the formula).
    LogisticMixture { components: usize },
}

impl Likelihood {
    /// The values a network outputs per pixel for `colours` colours: 256 logits per colour, or
    /// the mixture's K logits and per colour and component a mean, a log-scale and (RGB) a
    /// coefficient (3K grey, 10K RGB).
    pub fn outputs(self, colours: usize) -> usize {
        match self {
            Likelihood::Categorical => 256 * colours,
            Likelihood::LogisticMixture { components: k } if colours == 1 => 3 * k,
            Likelihood::LogisticMixture { components: k } => k + colours * 3 * k,
        }
    }
}

/// What a model predicts at every position: the parameters of its likelihood, f32 under every
/// compute precision.
#[derive(Clone, Debug)]
pub enum Prediction {
    /// Logits, `[batch, colours, 256, h, w]`.
    Categorical(Tensor<5>),
    /// A logistic mixture's parameters per pixel, `[batch, outputs, h, w]`.
    LogisticMixture {
        params: Tensor<4>,
        components: usize,
    },
}

impl Prediction {
    /// Every value predicted, `[batch, groups, n, h, w]`: the logits `[batch, colours, 256, h,
    /// w]`, or the mixture's parameters as one group, `[batch, 1, outputs, h, w]` (what a
    /// dependency analysis differentiates).
    pub fn values(self) -> Tensor<5> {
        match self {
            Prediction::Categorical(logits) => logits,
            Prediction::LogisticMixture { params, .. } => params.unsqueeze_dim(1),
        }
    }

    /// The values predicted at pixel (`y`, `x`), `[batch, outputs]`: 256 logits per colour,
    /// colour after colour, or the mixture's parameters.
    pub fn at(self, y: usize, x: usize) -> Tensor<2> {
        match self {
            Prediction::Categorical(logits) => {
                let [b, c, n, _, _] = logits.dims();
                logits.narrow(3, y, 1).narrow(4, x, 1).reshape([b, c * n])
            }
            Prediction::LogisticMixture { params, .. } => {
                let [b, n, _, _] = params.dims();
                params.narrow(2, y, 1).narrow(3, x, 1).reshape([b, n])
            }
        }
    }

    fn into_f32(self) -> Self {
        match self {
            Prediction::Categorical(l) => Prediction::Categorical(l.cast(FloatDType::F32)),
            Prediction::LogisticMixture { params, components } => Prediction::LogisticMixture {
                params: params.cast(FloatDType::F32),
                components,
            },
        }
    }
}

// One model per run: the size of the enum does not matter, and Burn's Module derive wants the modules
// inline.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Net {
    Simple(SimplePixelCnn),
    Gated(GatedPixelCnn),
    Vae(PixelVae),
    PixelCnnPp(PixelCnnPp),
}

/// A network and the float type its convolutions compute in. The weights (and the optimizer's
/// state) stay f32; with a lower compute precision each forward pass casts them, and the logits
/// come back to f32 for the softmax and the loss (mixed precision, as Burn 0.22 has no autocast).
#[derive(Module, Debug)]
pub struct Model {
    net: Net,
    #[module(skip)]
    compute: Option<FloatDType>,
    #[module(skip)]
    likelihood: Likelihood,
}

/// What a model may condition on besides the pixels before the current one.
#[derive(Clone, Debug)]
pub struct Context {
    /// Class labels, `[batch]`.
    pub labels: Tensor<1, Int>,
    /// Feature maps for spatially conditioned models, `[batch, channels, h, w]`.
    pub maps: Option<Tensor<4>>,
    /// PixelVAE: the latents the decoder is conditioned on, `[batch, latent_channels, h', w']`.
    pub latent: Option<Tensor<4>>,
    /// A training step of a network with dropout: where its masks come from (None: no dropout,
    /// as in evaluation and sampling).
    pub dropout: Option<DropoutDraws>,
}

impl Context {
    pub fn from_labels(labels: &[u8], device: &Device) -> Self {
        let v: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        Context::with_labels(Tensor::from_data(
            TensorData::new(v, [labels.len()]),
            device,
        ))
    }

    /// A context of class labels already on the device, `[batch]`.
    pub fn with_labels(labels: Tensor<1, Int>) -> Self {
        Context {
            labels,
            maps: None,
            latent: None,
            dropout: None,
        }
    }
}

impl ModelConfig {
    /// Builds the model with weights drawn from the run's weight stream for `seed`.
    pub fn init(&self, seed: u64, device: &Device) -> Model {
        let mut rng = crate::rng::stream(seed, Purpose::Weights, 0, 0);
        let net = match self {
            ModelConfig::Simple(c) => Net::Simple(c.init(&mut rng, device)),
            ModelConfig::Gated(c) => Net::Gated(c.init(&mut rng, device)),
            ModelConfig::Vae(c) => Net::Vae(c.init(&mut rng, device)),
            ModelConfig::PixelCnnPp(c) => Net::PixelCnnPp(c.init(&mut rng, device)),
        };
        Model {
            net: number_parameters(net),
            compute: None,
            likelihood: self.likelihood(),
        }
    }

    pub fn likelihood(&self) -> Likelihood {
        match self {
            ModelConfig::Simple(c) => c.likelihood,
            ModelConfig::Gated(c) => c.likelihood,
            ModelConfig::Vae(c) => c.decoder.likelihood,
            ModelConfig::PixelCnnPp(c) => c.likelihood,
        }
    }

    pub fn colours(&self) -> usize {
        match self {
            ModelConfig::Simple(c) => c.colours,
            ModelConfig::Gated(c) => c.colours,
            ModelConfig::Vae(c) => c.colours,
            ModelConfig::PixelCnnPp(c) => c.colours,
        }
    }

    /// PixelVAE: the shape of one image's latent, `[channels, h', w']`.
    pub fn latent_shape(&self, height: usize, width: usize) -> Option<[usize; 3]> {
        match self {
            ModelConfig::Vae(c) => Some(c.latent_shape(height, width)),
            _ => None,
        }
    }
}

enum CacheNet {
    Simple(Box<simple::SimpleCache>),
    Gated(Box<gated::GatedCache>),
}

/// What the cached sampler keeps between sub-pixels (Ramachandran et al. 2017, "Fast Generation
/// for Convolutional Autoregressive Models"): each step computes every layer at one pixel from the
/// activations it already computed for earlier pixels, instead of a forward pass over the image.
/// Used in raster order: `logits` for each sub-pixel of a pixel, `commit` once the pixel is
/// final, `end_row` once its row is.
pub struct Cache {
    net: CacheNet,
    dtype: DType,
}

impl Cache {
    fn scaled(&self, x: Tensor<4>) -> Tensor<4> {
        let x = scale_input(x);
        if self.dtype == DType::F32 {
            x
        } else {
            x.cast(self.dtype)
        }
    }

    /// What the model predicts at pixel (`y`, `x`), given the earlier pixels and the sub-pixels
    /// of this one so far (the later ones are masked, whatever they hold): 256 logits per colour,
    /// colour after colour, or a grey pixel's mixture parameters, as [`Prediction::at`].
    ///
    /// # Shapes
    /// - pixel: `[batch, colours, 1, 1]`, bytes as floats
    /// - returns: `[batch, outputs]`, f32
    pub fn predict(&mut self, y: usize, x: usize, pixel: Tensor<4>) -> Tensor<2> {
        let [b, c, _, _] = pixel.dims();
        let pixel = self.scaled(pixel).reshape([b, c]);
        let out = match &mut self.net {
            CacheNet::Simple(m) => m.step(x, pixel),
            CacheNet::Gated(m) => {
                debug_assert!(y < m.height());
                m.step(x, pixel)
            }
        };
        out.cast(FloatDType::F32)
    }

    /// The pixel of the last `predict` call is final, with these values.
    ///
    /// # Shapes
    /// - pixel: `[batch, colours, 1, 1]`, bytes as floats
    pub fn commit(&mut self, pixel: Tensor<4>) {
        let [b, c, _, _] = pixel.dims();
        let pixel = self.scaled(pixel).reshape([b, c]);
        match &mut self.net {
            CacheNet::Simple(m) => m.commit(pixel),
            CacheNet::Gated(m) => m.commit(pixel),
        }
    }

    /// Row `y` is final, with these values.
    ///
    /// # Shapes
    /// - row: `[batch, colours, 1, width]`, bytes as floats
    pub fn end_row(&mut self, y: usize, row: Tensor<4>) {
        let row = self.scaled(row);
        match &mut self.net {
            CacheNet::Simple(m) => m.end_row(),
            CacheNet::Gated(m) => m.end_row(y, row),
        }
    }

    /// Takes row `y` as given (the known top of an image being completed).
    ///
    /// # Shapes
    /// - row: `[batch, colours, 1, width]`, bytes as floats
    pub fn given_row(&mut self, y: usize, row: Tensor<4>) {
        if let CacheNet::Simple(_) = self.net {
            // The simple model keeps every layer's activations along the row: compute them.
            let [b, c, _, w] = row.dims();
            for x in 0..w {
                let pixel = row.clone().slice([0..b, 0..c, 0..1, x..x + 1]);
                let _ = self.predict(y, x, pixel.clone());
                self.commit(pixel);
            }
        }
        self.end_row(y, row);
    }
}

/// The fixed scaling from bytes to model inputs: 0..255 -> [0, 1].
pub fn scale_input(pixels: Tensor<4>) -> Tensor<4> {
    pixels / 255.0
}

impl Model {
    /// Computes in `precision` from now on (f32 weights either way).
    pub fn with_precision(mut self, precision: crate::device::Precision) -> Self {
        use crate::device::Precision;
        self.compute = match precision {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        };
        self
    }

    /// The likelihood the network's outputs parameterise.
    pub fn likelihood(&self) -> Likelihood {
        self.likelihood
    }

    /// The likelihood's parameters at every position, from the positions before it.
    ///
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, bytes as floats (0..255); scaled here
    /// - returns: logits `[batch, colours, 256, h, w]` or mixture parameters `[batch, outputs,
    ///   h, w]`
    pub fn forward(&self, x: Tensor<4>, context: &Context) -> Prediction {
        let [b, c, h, w] = x.dims();
        let cast = |x: Tensor<4>| match self.compute {
            Some(dtype) => x.cast(dtype),
            None => x,
        };
        let out = match &self.net {
            Net::Simple(m) => m.forward(cast(scale_input(x))), // [b, outputs, h, w]
            Net::Gated(m) => m.forward(
                cast(scale_input(x)),
                &gated::Conditioning {
                    labels: &context.labels,
                    maps: context.maps.as_ref(),
                },
            ),
            Net::Vae(m) => {
                let x = cast(scale_input(x));
                let z = context
                    .latent
                    .clone()
                    .expect("a PixelVAE decodes given latents (Context::latent)");
                m.forward(x.clone(), z.cast(x.dtype()), &context.labels)
            }
            Net::PixelCnnPp(m) => {
                let label = m.classes().map(|n| {
                    // On the device: Burn's `one_hot` reads the labels back to the host first.
                    let classes = Tensor::<1, Int>::arange(0..n as i64, &context.labels.device());
                    let one_hot: Tensor<2> = context
                        .labels
                        .clone()
                        .reshape([b, 1])
                        .equal(classes.reshape([1, n]))
                        .float();
                    match self.compute {
                        Some(dtype) => one_hot.cast(dtype),
                        None => one_hot,
                    }
                });
                m.forward(cast(x), label.as_ref(), context.dropout.clone())
            }
        };
        let prediction = match self.likelihood {
            Likelihood::Categorical => Prediction::Categorical(out.reshape([b, c, 256, h, w])),
            Likelihood::LogisticMixture { components } => Prediction::LogisticMixture {
                params: out,
                components,
            },
        };
        match self.compute {
            Some(_) => prediction.into_f32(),
            None => prediction,
        }
    }

    /// The float type the convolutions compute in.
    fn compute_dtype(&self) -> DType {
        self.compute.map_or(DType::F32, DType::from)
    }

    /// How many dropout masks a training step's forward pass draws (None without dropout).
    pub fn dropout_masks(&self) -> Option<usize> {
        match &self.net {
            Net::PixelCnnPp(m) => m.dropout_masks(),
            _ => None,
        }
    }

    /// PixelVAE: the shape of one image's latent, `[channels, h', w']`.
    pub fn latent_shape(&self, height: usize, width: usize) -> Option<[usize; 3]> {
        match &self.net {
            Net::Vae(m) => Some(m.latent_shape(height, width)),
            _ => None,
        }
    }

    /// PixelVAE: the mean and log-variance of q(z|x), each `[batch, latent_channels, h', w']`, f32.
    ///
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, bytes as floats
    pub fn encode(&self, x: Tensor<4>) -> Option<(Tensor<4>, Tensor<4>)> {
        let Net::Vae(m) = &self.net else {
            return None;
        };
        let mut x = scale_input(x);
        if let Some(dtype) = self.compute {
            x = x.cast(dtype);
        }
        Some(m.encode(x))
    }

    /// The prediction and, for a PixelVAE, the KL of q(z|x) from the prior per latent dimension (nats,
    /// `[batch, latent_channels, h', w']`), with z = mean + sd * `noise` drawn from `rng`
    /// (reparameterised). Other models ignore `rng`.
    pub fn forward_with_kl(
        &self,
        x: Tensor<4>,
        context: &Context,
        rng: &mut StdRng,
    ) -> (Prediction, Option<Tensor<4>>) {
        self.forward_with_noise(x, context, |shape, device| {
            vae::normal_tensor(rng, shape, device)
        })
    }

    /// [`Model::forward_with_kl`] with the standard normal noise of z from `noise(shape, device)`.
    pub fn forward_with_noise(
        &self,
        x: Tensor<4>,
        context: &Context,
        noise: impl FnOnce([usize; 4], &Device) -> Tensor<4>,
    ) -> (Prediction, Option<Tensor<4>>) {
        let Some((mean, log_var)) = self.encode(x.clone()) else {
            return (self.forward(x, context), None);
        };
        let eps = noise(mean.dims(), &mean.device());
        let z = mean.clone() + (log_var.clone() * 0.5).exp() * eps;
        let context = Context {
            latent: Some(z),
            ..context.clone()
        };
        // In f32 whatever the compute precision: a mean of a few hundred squares past f16's range.
        let kl = vae::gaussian_kl(mean.cast(FloatDType::F32), log_var.cast(FloatDType::F32));
        (self.forward(x, &context), Some(kl))
    }

    /// Whether [`Model::cache`] gives a cached sampler (every variant but PixelCNN++).
    pub fn has_cache(&self) -> bool {
        !matches!(self.net, Net::PixelCnnPp(_))
    }

    /// State for cached sampling of `context.labels.len()` images of `height` x `width`; None for
    /// PixelCNN++, which has no cached sampler (its images are drawn by a forward pass per
    /// pixel).
    pub fn cache(&self, context: &Context, height: usize, width: usize) -> Option<Cache> {
        let dtype = self.compute_dtype();
        let [batch] = context.labels.dims();
        let device = context.labels.device();
        let net = match &self.net {
            Net::Simple(m) => CacheNet::Simple(Box::new(m.cache(batch, width, dtype, &device))),
            Net::Gated(m) => CacheNet::Gated(Box::new(m.cache(
                &gated::Conditioning {
                    labels: &context.labels,
                    maps: context.maps.as_ref(),
                },
                height,
                width,
                dtype,
            ))),
            Net::Vae(m) => {
                let z = context
                    .latent
                    .clone()
                    .expect("a PixelVAE samples given latents (Context::latent)")
                    .cast(dtype);
                let maps = m.maps(z, height, width);
                CacheNet::Gated(Box::new(m.decoder().cache(
                    &gated::Conditioning {
                        labels: &context.labels,
                        maps: Some(&maps),
                    },
                    height,
                    width,
                    dtype,
                )))
            }
            Net::PixelCnnPp(_) => return None,
        };
        Some(Cache { net, dtype })
    }

    /// Number of trainable scalars.
    pub fn parameters(&self) -> usize {
        self.num_params()
    }
}

/// Numbers a new network's parameters 0, 1, 2, ... in visiting order. Burn draws each parameter's
/// id at random from the system, and checkpoints record the ids (the optimizer's state is keyed by
/// them), so without this the same experiment would write different checkpoint bytes each time.
fn number_parameters(net: Net) -> Net {
    struct Number(u64);
    impl ModuleMapper for Number {
        fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.id = ParamId::from(self.0);
            self.0 += 1;
            param
        }
        fn map_int<const D: usize>(
            &mut self,
            mut param: Param<Tensor<D, Int>>,
        ) -> Param<Tensor<D, Int>> {
            param.id = ParamId::from(self.0);
            self.0 += 1;
            param
        }
    }
    net.map(&mut Number(0))
}
