//! PixelCNN++'s table, `[model.pixelcnnpp]`: its keys and defaults, their checks, and the
//! network's configuration (the network and its size: `model/pixelcnnpp/`).

use super::super::Checker;
use crate::error::Result;
use crate::experiment::Experiment;
use crate::model::{Likelihood, PixelCnnPpConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// PixelCNN++'s depth and regularisation (openai/pixel-cnn's `nr_resnet` and `dropout_p`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PixelCnnPpSection {
    /// Gated resnets per stage of the up pass (the down pass has one more in its last two
    /// stages); three stages at full, half and quarter resolution. Default: 5.
    pub resnets: usize,
    /// Dropout probability inside every gated resnet, in training only. Default: 0.5.
    pub dropout: f64,
}

impl Default for PixelCnnPpSection {
    fn default() -> Self {
        PixelCnnPpSection {
            resnets: 5,
            dropout: 0.5,
        }
    }
}

/// `[model.pixelcnnpp]`.
pub(super) fn check(ctx: &Checker, pp: &PixelCnnPpSection) -> Result<()> {
    ctx.require(
        pp.resnets >= 1,
        "model.pixelcnnpp.resnets",
        pp.resnets,
        "at least 1 gated resnet per stage",
    )?;
    ctx.require(
        pp.dropout.is_finite() && (0.0..1.0).contains(&pp.dropout),
        "model.pixelcnnpp.dropout",
        pp.dropout,
        "a probability from 0 (off) up to, not including, 1",
    )
}

/// The network for images of `colours` colours: `model.channels` filters.
pub(super) fn config(
    e: &Experiment,
    colours: usize,
    likelihood: Likelihood,
    classes: Option<usize>,
) -> PixelCnnPpConfig {
    PixelCnnPpConfig {
        colours,
        filters: e.model.channels,
        resnets: e.model.pixelcnnpp.resnets,
        likelihood,
        classes,
        dropout: e.model.pixelcnnpp.dropout,
    }
}
