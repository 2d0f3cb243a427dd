//! The `[model]` table: the keys each variant reads, their checks, the likelihood, and the model
//! configuration that will be built. A variant with a table of its own has a file here with the
//! table's keys and defaults, their checks and its configuration (`pixelcnnpp.rs`, `vae.rs`);
//! its network and its size are in `model/`. A new variant is such a file, one arm in `config`
//! and one in `model::ModelConfig`.

pub mod pixelcnnpp;
pub mod vae;

use super::Checker;
use crate::error::Result;
use crate::experiment::{
    Conditional, DatasetKind, Experiment, LikelihoodKind, ModelSection, PixelCnnPpSection,
    VaeSection, Variant,
};
use crate::model::{GatedConfig, Likelihood, ModelConfig, SimpleConfig};

/// The network's depth, kernel and width: the masked-convolution variants' `layers`, `kernel` and
/// `channels` (one group per colour), PixelCNN++'s `channels` as its filters.
pub(super) fn check_shape_keys(ctx: &Checker, e: &Experiment, colours: usize) -> Result<()> {
    let m = &e.model;
    let pixelcnnpp = m.variant == Variant::Pixelcnnpp;
    if pixelcnnpp {
        let defaults = ModelSection::default();
        for (key, value, default) in [
            ("model.layers", m.layers, defaults.layers),
            ("model.kernel", m.kernel, defaults.kernel),
        ] {
            ctx.require(
                value == default,
                key,
                value,
                "unset for variant \"pixelcnnpp\" (its depth is model.pixelcnnpp.resnets, \
                 its kernels are openai/pixel-cnn's 2x3 and 2x2)",
            )?;
        }
        ctx.require(
            m.channels >= 1,
            "model.channels",
            m.channels,
            "at least 1 filter",
        )?;
    }
    ctx.require(m.layers >= 1, "model.layers", m.layers, "at least 1 layer")?;
    ctx.require(
        m.kernel % 2 == 1,
        "model.kernel",
        m.kernel,
        "an odd kernel size (1, 3, 5, ...) so that the mask has a centre",
    )?;
    ctx.require(
        pixelcnnpp || (m.channels >= colours && m.channels.is_multiple_of(colours)),
        "model.channels",
        m.channels,
        &format!(
            "a positive multiple of {colours}, the number of colours of `{}` \
             (channels are split into one group per colour)",
            e.data.dataset.name()
        ),
    )
}

/// The model that will be built for images of `colours` colours, and the likelihood chosen.
pub(super) fn config(
    ctx: &Checker,
    e: &Experiment,
    colours: usize,
) -> Result<(ModelConfig, LikelihoodKind)> {
    let m = &e.model;
    let classes = classes(ctx, e)?;
    check_tables(ctx, e)?;
    if m.variant == Variant::Pixelcnnpp {
        pixelcnnpp::check(ctx, &m.pixelcnnpp)?;
    }
    let (likelihood_kind, likelihood) = likelihood(ctx, e, colours)?;
    if m.variant == Variant::Vae {
        vae::check(ctx, &m.vae)?;
    }
    let gated = |spatial_channels, concat| GatedConfig {
        classes,
        spatial_channels,
        concat,
        residual: m.residual,
        gates: m.gates,
        link: m.link,
        likelihood,
        ..GatedConfig::plain(colours, m.layers, m.kernel, m.channels)
    };
    let model = match m.variant {
        Variant::Simple => ModelConfig::Simple(SimpleConfig {
            colours,
            layers: m.layers,
            kernel: m.kernel,
            channels: m.channels,
            likelihood,
        }),
        Variant::Gated => ModelConfig::Gated(gated(0, false)),
        Variant::Vae => ModelConfig::Vae(vae::config(&m.vae, colours, gated)),
        Variant::Pixelcnnpp => {
            ModelConfig::PixelCnnPp(pixelcnnpp::config(e, colours, likelihood, classes))
        }
    };
    Ok((model, likelihood_kind))
}

/// `conditional`: the number of classes, for the variants and datasets that have them.
fn classes(ctx: &Checker, e: &Experiment) -> Result<Option<usize>> {
    let m = &e.model;
    match m.conditional {
        Conditional::None => Ok(None),
        Conditional::Class => {
            ctx.require(
                m.variant != Variant::Simple,
                "model.conditional",
                "\"class\"",
                "\"none\" for the simple variant (class conditioning needs variant = \"gated\", \
                 \"vae\" or \"pixelcnnpp\")",
            )?;
            ctx.require(
                e.data.dataset != DatasetKind::Folder,
                "model.conditional",
                "\"class\"",
                "\"none\" for an image folder (class conditioning needs the 10 labelled \
                 classes of mnist, cifar10 or synthetic)",
            )?;
            Ok(Some(10))
        }
    }
}

/// The keys that belong to one variant only: the gated model's ablations, `[model.vae]` and
/// `[model.pixelcnnpp]`.
fn check_tables(ctx: &Checker, e: &Experiment) -> Result<()> {
    let m = &e.model;
    if matches!(m.variant, Variant::Simple | Variant::Pixelcnnpp) {
        for (key, on) in [
            ("model.residual", m.residual),
            ("model.gates", m.gates),
            ("model.link", m.link),
        ] {
            ctx.require(
                on,
                key,
                on,
                "true for the simple and pixelcnnpp variants (the ablations are of the gated \
                 model)",
            )?;
        }
    }
    if m.variant != Variant::Vae && m.vae != VaeSection::default() {
        return Err(ctx.invalid(
            "model.vae",
            "a [model.vae] table".into(),
            "no [model.vae] table unless variant = \"vae\"",
        ));
    }
    if m.variant != Variant::Pixelcnnpp && m.pixelcnnpp != PixelCnnPpSection::default() {
        return Err(ctx.invalid(
            "model.pixelcnnpp",
            "a [model.pixelcnnpp] table".into(),
            "no [model.pixelcnnpp] table unless variant = \"pixelcnnpp\"",
        ));
    }
    Ok(())
}

/// `likelihood` and `mixtures`: the logistic mixture by default for PixelCNN++, the 256-way
/// softmax for the others; the mixture over RGB only with PixelCNN++.
fn likelihood(
    ctx: &Checker,
    e: &Experiment,
    colours: usize,
) -> Result<(LikelihoodKind, Likelihood)> {
    let m = &e.model;
    let pixelcnnpp = m.variant == Variant::Pixelcnnpp;
    let kind = m.likelihood.unwrap_or(if pixelcnnpp {
        LikelihoodKind::LogisticMixture
    } else {
        LikelihoodKind::Categorical
    });
    let likelihood = match kind {
        LikelihoodKind::Categorical => {
            ctx.require(
                m.mixtures == ModelSection::default().mixtures,
                "model.mixtures",
                m.mixtures,
                "unset with likelihood = \"categorical\" (components are of the logistic \
                 mixture)",
            )?;
            Likelihood::Categorical
        }
        LikelihoodKind::LogisticMixture => {
            ctx.require(
                (1..=100).contains(&m.mixtures),
                "model.mixtures",
                m.mixtures,
                "1 to 100 logistic components",
            )?;
            ctx.require(
                colours == 1 || pixelcnnpp,
                "model.likelihood",
                "\"logistic_mixture\"",
                &format!(
                    "\"categorical\" for RGB images (`{}`) with variant = \"{}\": its masked \
                     head predicts sub-pixel by sub-pixel, and the mixture couples the colours \
                     of a pixel; use variant = \"pixelcnnpp\" for a mixture over RGB",
                    e.data.dataset.name(),
                    format!("{:?}", m.variant).to_lowercase()
                ),
            )?;
            Likelihood::LogisticMixture {
                components: m.mixtures,
            }
        }
    };
    Ok((kind, likelihood))
}
