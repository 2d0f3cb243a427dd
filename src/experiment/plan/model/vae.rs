//! The PixelVAE's table, `[model.vae]`: its keys and defaults, their checks, and the model's
//! configuration (the network and its size: `model/vae.rs`). `model.layers`, `kernel` and
//! `channels` describe its gated decoder.

use super::super::Checker;
use crate::error::Result;
use crate::model::{GatedConfig, VaeConditioning, VaeConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The PixelVAE's latent, encoder, conditioning and objective.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaeSection {
    /// Channels of the latent z. Default: 4.
    pub latent_channels: usize,
    /// Stride-2 convolutions of the encoder: z has ceil(side / 2^downsample) positions per side
    /// (28x28 MNIST with 2: 7x7). Default: 2.
    pub downsample: usize,
    /// Channels of the encoder's and the upsampler's convolutions. Default: 32.
    pub hidden: usize,
    /// Channels of the feature maps computed from z ("gates" and "concat"). Default: 16.
    pub maps: usize,
    /// How the decoder sees z: "gates" (upsampled maps into every gate through 1x1 convolutions),
    /// "concat" (the maps concatenated with the image, as in the paper), or "linear" (the paper's
    /// variant without upsampling: a linear map of z in every layer). Default: "gates".
    pub conditioning: VaeConditioningKind,
    /// Steps over which the KL term's weight rises linearly from 0 to 1 (0 = always 1).
    /// Default: 0.
    pub kl_warmup_steps: usize,
    /// Free bits (Kingma et al. 2016): the KL of each latent dimension (channel and position),
    /// averaged over the batch, counts at least this many nats in the training loss (0 = off).
    /// Reported numbers always use the real KL. Default: 0.
    pub free_bits: f64,
}

impl Default for VaeSection {
    fn default() -> Self {
        VaeSection {
            latent_channels: 4,
            downsample: 2,
            hidden: 32,
            maps: 16,
            conditioning: VaeConditioningKind::Gates,
            kl_warmup_steps: 0,
            free_bits: 0.0,
        }
    }
}

/// How the PixelVAE decoder sees z.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VaeConditioningKind {
    /// Upsampled feature maps into every gate through 1x1 convolutions.
    Gates,
    /// Upsampled feature maps concatenated with the image (into the first layer's kernels).
    Concat,
    /// Without upsampling: z repeated over its block of pixels, a 1x1 into every gate.
    Linear,
}

/// `[model.vae]`.
pub(super) fn check(ctx: &Checker, v: &VaeSection) -> Result<()> {
    ctx.require(
        v.latent_channels >= 1,
        "model.vae.latent_channels",
        v.latent_channels,
        "at least 1",
    )?;
    ctx.require(
        v.downsample <= 6,
        "model.vae.downsample",
        v.downsample,
        "0 to 6 stride-2 convolutions",
    )?;
    ctx.require(
        v.hidden >= 1,
        "model.vae.hidden",
        v.hidden,
        "at least 1 channel",
    )?;
    ctx.require(
        v.maps >= 1 || v.conditioning == VaeConditioningKind::Linear,
        "model.vae.maps",
        v.maps,
        "at least 1 channel",
    )?;
    ctx.require(
        v.free_bits.is_finite() && v.free_bits >= 0.0,
        "model.vae.free_bits",
        v.free_bits,
        "0 (off) or a positive number of nats per latent dimension",
    )
}

/// The model for images of `colours` colours, its decoder `gated(spatial channels, concat)`.
pub(super) fn config(
    v: &VaeSection,
    colours: usize,
    gated: impl Fn(usize, bool) -> GatedConfig,
) -> VaeConfig {
    let (conditioning, maps) = match v.conditioning {
        VaeConditioningKind::Gates => (VaeConditioning::Gates, v.maps),
        VaeConditioningKind::Concat => (VaeConditioning::Concat, v.maps),
        VaeConditioningKind::Linear => (VaeConditioning::Linear, v.latent_channels),
    };
    VaeConfig {
        colours,
        latent_channels: v.latent_channels,
        downsample: v.downsample,
        hidden: v.hidden,
        conditioning,
        decoder: gated(maps, conditioning == VaeConditioning::Concat),
    }
}
