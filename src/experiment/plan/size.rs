//! The memory a training step needs, estimated before anything is built, and the refusal of a
//! model that cannot fit, blamed on the key the user changed.

use super::Checker;
use crate::device::{self, Target};
use crate::error::Result;
use crate::experiment::Experiment;
use crate::model::ModelConfig;

/// Refuses a model whose training step cannot fit in this machine's memory (CPU targets; a GPU's
/// memory is not known before the device opens): the weights with their gradients and Adam's two
/// moments (16 bytes a parameter), and the activations of a batch where the image size is known.
pub(super) fn check_size(
    ctx: &Checker,
    e: &Experiment,
    model: &ModelConfig,
    side: Option<usize>,
    target: &Target,
) -> Result<()> {
    if e.runtime.allow_large || matches!(target, Target::Cuda(_)) {
        return Ok(());
    }
    let Some(memory) = device::host_memory_bytes() else {
        return Ok(());
    };
    let parameters = model.estimated_parameters();
    let pixels = side.map_or(0, |s| (s * s) as u64);
    let activations = (e.train.batch_size as u64)
        .saturating_mul(pixels)
        .saturating_mul(model.activation_floats_per_pixel())
        .saturating_mul(4);
    let needed = parameters.saturating_mul(16).saturating_add(activations);
    if needed <= memory {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let m = &e.model;
    // The keys that size this variant, each with its value and, where a flag or the environment
    // set it, where from: the error is blamed on what the user changed.
    let mut keys: Vec<(&str, String)> = match model {
        ModelConfig::PixelCnnPp(_) => vec![
            ("model.channels", m.channels.to_string()),
            ("model.pixelcnnpp.resnets", m.pixelcnnpp.resnets.to_string()),
            ("model.mixtures", m.mixtures.to_string()),
        ],
        _ => vec![
            ("model.layers", m.layers.to_string()),
            ("model.kernel", m.kernel.to_string()),
            ("model.channels", m.channels.to_string()),
        ],
    };
    if let ModelConfig::Vae(_) = model {
        keys.push(("model.vae.hidden", m.vae.hidden.to_string()));
        keys.push(("model.vae.maps", m.vae.maps.to_string()));
        keys.push((
            "model.vae.latent_channels",
            m.vae.latent_channels.to_string(),
        ));
    }
    keys.push(("train.batch_size", e.train.batch_size.to_string()));
    let overridden = keys
        .iter()
        .rev()
        .find(|(k, _)| ctx.origin(k) != ctx.source)
        .map(|(k, _)| *k);
    let listed = |skip: Option<&str>| {
        keys.iter()
            .filter(|(k, _)| Some(*k) != skip)
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (key, value) = match overridden {
        Some(k) => {
            let v = &keys.iter().find(|(key, _)| *key == k).expect("listed").1;
            (k, format!("{v} (with {})", listed(Some(k))))
        }
        None => ("model", format!("{{ {} }}", listed(None))),
    };
    Err(ctx.invalid(
        key,
        value,
        &format!(
            "a model that fits: it has about {parameters} parameters and a training step needs \
             about {:.1} GiB ({:.1} GiB of weights, gradients and Adam state, {:.1} GiB of \
             activations), more than this machine's {:.1} GiB; make it smaller, or set \
             runtime.allow_large = true to try anyway",
            gib(needed),
            gib(parameters.saturating_mul(16)),
            gib(activations),
            gib(memory)
        ),
    ))
}
