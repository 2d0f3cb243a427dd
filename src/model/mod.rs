//! Architectures. A config enum paired with a module enum and one `match` each (as Burn's
//! `activation_wrapper.rs` does): every variant is trained, evaluated and sampled by the same code.

pub mod causality;
pub mod gated;
pub mod masked_conv;
pub mod simple;

use burn::module::Module;
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

pub use gated::{GatedConfig, GatedPixelCnn};
pub use simple::{SimpleConfig, SimplePixelCnn};

/// What will be built (decided by the plan).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "variant", rename_all = "lowercase")]
pub enum ModelConfig {
    Simple(SimpleConfig),
    Gated(GatedConfig),
}

// One model per run: the size of the enum does not matter, and Burn's Module derive wants the modules
// inline.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Net {
    Simple(SimplePixelCnn),
    Gated(GatedPixelCnn),
}

/// A network and the float type its convolutions compute in. The weights (and the optimizer's
/// state) stay f32; with a lower compute precision each forward pass casts them, and the logits
/// come back to f32 for the softmax and the loss (mixed precision, as Burn 0.22 has no autocast).
#[derive(Module, Debug)]
pub struct Model {
    net: Net,
    #[module(skip)]
    compute: Option<FloatDType>,
}

/// What a model may condition on besides the pixels before the current one.
#[derive(Clone, Debug)]
pub struct Context {
    /// Class labels, `[batch]`.
    pub labels: Tensor<1, Int>,
    /// Feature maps for spatially conditioned models, `[batch, channels, h, w]`.
    pub maps: Option<Tensor<4>>,
}

impl Context {
    pub fn from_labels(labels: &[u8], device: &Device) -> Self {
        let v: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        Context {
            labels: Tensor::from_data(TensorData::new(v, [labels.len()]), device),
            maps: None,
        }
    }
}

impl ModelConfig {
    /// Builds the model with weights drawn from a generator seeded by `seed`.
    pub fn init(&self, seed: u64, device: &Device) -> Model {
        let mut rng = StdRng::seed_from_u64(seed);
        let net = match self {
            ModelConfig::Simple(c) => Net::Simple(c.init(&mut rng, device)),
            ModelConfig::Gated(c) => Net::Gated(c.init(&mut rng, device)),
        };
        Model { net, compute: None }
    }

    pub fn colours(&self) -> usize {
        match self {
            ModelConfig::Simple(c) => c.colours,
            ModelConfig::Gated(c) => c.colours,
        }
    }

    /// How many rows above a pixel its prediction can depend on (the sampler computes only those).
    pub fn context_rows(&self) -> usize {
        match self {
            ModelConfig::Simple(c) => c.context_rows(),
            ModelConfig::Gated(c) => c.context_rows(),
        }
    }
}

/// The fixed scaling from bytes to model inputs: 0..255 -> [0, 1].
pub fn scale_input(pixels: Tensor<4>) -> Tensor<4> {
    pixels / 255.0
}

impl Model {
    /// Computes in `precision` from now on (f32 weights either way).
    pub fn with_precision(mut self, precision: crate::experiment::Precision) -> Self {
        use crate::experiment::Precision;
        self.compute = match precision {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        };
        self
    }

    /// Logits for every sub-pixel.
    ///
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, bytes as floats (0..255); scaled here
    /// - returns: `[batch, colours, 256, h, w]`
    pub fn forward(&self, x: Tensor<4>, context: &Context) -> Tensor<5> {
        let [b, c, h, w] = x.dims();
        let mut x = scale_input(x);
        if let Some(dtype) = self.compute {
            x = x.cast(dtype);
        }
        let logits = match &self.net {
            Net::Simple(m) => m.forward(x), // [b, c * 256, h, w]
            Net::Gated(m) => m.forward(
                x,
                &gated::Conditioning {
                    labels: &context.labels,
                    maps: context.maps.as_ref(),
                },
            ),
        };
        let logits = match self.compute {
            Some(_) => logits.cast(FloatDType::F32),
            None => logits,
        };
        logits.reshape([b, c, 256, h, w])
    }

    /// Number of trainable scalars.
    pub fn parameters(&self) -> usize {
        self.num_params()
    }
}
