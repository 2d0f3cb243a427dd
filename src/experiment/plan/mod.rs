//! Experiment -> Plan: every cross-field check, before any tensor exists, and the mapping from what
//! the user wrote to what will run. Each table's facts live in its own file: `data.rs` (datasets),
//! `model.rs` (variants and likelihoods), `settings.rs` (training, sampling, runtime), `size.rs`
//! (the memory estimate); `Plan::new` composes them in the order the checks are reported.

mod data;
pub(crate) mod model;
mod settings;
mod size;

use super::{Experiment, Override, Variant};
use crate::data::DataSpec;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::train::Step;
use std::path::Path;

/// What will run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The experiment's name: its file stem, also the results folder's name.
    pub name: String,
    /// The experiment as resolved: defaults, file, environment and `--set`.
    pub experiment: Experiment,
    pub overrides: Vec<Override>,
    pub model: ModelConfig,
    pub data: DataSpec,
    pub device: DeviceChoice,
}

impl Plan {
    /// Checks `experiment` (read from `source`) and decides what will run. `pixel_data` is
    /// `$PIXEL_DATA`, passed in so that tests do not depend on the environment.
    pub fn new(
        experiment: Experiment,
        overrides: Vec<Override>,
        source: &Path,
        pixel_data: Option<&Path>,
    ) -> Result<Plan> {
        let ctx = Checker {
            source: source.display().to_string(),
            overrides: &overrides,
        };
        let e = &experiment;
        let (colours, side) = data::image_shape(&ctx, e)?;
        model::check_shape_keys(&ctx, e, colours)?;
        data::check_split(&ctx, e, side)?;
        settings::check_train(&ctx, e)?;
        settings::check_sample(&ctx, e)?;
        let target = settings::target(&ctx, e)?;
        let (model, likelihood) = model::config(&ctx, e, colours)?;
        size::check_size(&ctx, e, &model, data::trained_side(e, side), &target)?;
        let data = data::spec(&ctx, e, source, pixel_data)?;

        let mut experiment = experiment.clone();
        experiment.data.path = data.dir.clone();
        experiment.model.likelihood = Some(likelihood);
        Ok(Plan {
            name: name_of(source),
            device: DeviceChoice {
                backend: experiment.runtime.backend,
                target,
                precision: experiment.runtime.precision,
                deterministic: experiment.runtime.deterministic,
                cudnn_benchmark: experiment.runtime.cudnn_benchmark,
            },
            experiment,
            overrides,
            model,
            data,
        })
    }

    /// How each optimisation step of `epoch` (from 1) is taken.
    pub fn step(&self, epoch: usize) -> Step {
        let e = &self.experiment;
        Step {
            batch_size: e.train.batch_size,
            learning_rate: e.train.learning_rate,
            lr_decay: e.train.lr_decay,
            clip_grad_norm: e.train.clip_grad_norm,
            seed: e.train.seed,
            epoch,
            kl_warmup_steps: e.model.vae.kl_warmup_steps,
            free_bits: e.model.vae.free_bits,
            max_skipped_steps: e.train.max_skipped_steps,
            sync_phases: false,
            cuda_graph: e.runtime.cuda_graph,
        }
    }

    /// Adam with the experiment's betas.
    pub fn optimizer(&self) -> crate::optim::Optimizer {
        let [beta1, beta2] = self.experiment.train.adam_betas;
        crate::optim::adam_with_betas(beta1, beta2)
    }

    /// The planned model with its initial weights (seeded) and compute precision.
    pub fn init_model(&self, device: &burn::tensor::Device) -> crate::model::Model {
        self.model
            .init(self.experiment.train.seed, device)
            .with_precision(self.device.precision)
    }

    /// The resolved experiment as TOML, headed by the `#:schema` line and the overrides applied.
    pub fn resolved_toml(&self) -> String {
        let mut out =
            String::from("# Resolved by `pixel run`: every default and override written out.\n");
        for o in &self.overrides {
            out.push_str(&format!(
                "# override: {} = {} (from {})\n",
                o.key, o.value, o.origin
            ));
        }
        let mut body = toml::to_string(&self.experiment).expect("an experiment serialises");
        // The PixelVAE's and PixelCNN++'s tables mean nothing to the other variants: leave them
        // out of theirs.
        let variant = self.experiment.model.variant;
        for (table, owner) in [
            ("[model.vae]\n", Variant::Vae),
            ("[model.pixelcnnpp]\n", Variant::Pixelcnnpp),
        ] {
            if variant != owner
                && let Some(start) = body.find(table)
            {
                let end = body[start + 1..]
                    .find("\n[")
                    .map_or(body.len(), |i| start + i + 2);
                body.replace_range(start..end, "");
            }
        }
        out.push_str(&body);
        out
    }
}

/// The largest sample grid side: 64 x 64 images, each drawn sub-pixel by sub-pixel.
pub const MAX_GRID: usize = 64;

/// The results folder's name: the experiment file's stem.
pub fn name_of(source: &Path) -> String {
    source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "experiment".into())
}

struct Checker<'a> {
    source: String,
    overrides: &'a [Override],
}

impl Checker<'_> {
    /// Where a key's value came from: the last override of it, else the file.
    fn origin(&self, key: &str) -> String {
        self.overrides
            .iter()
            .rev()
            .find(|o| o.key == key)
            .map(|o| format!("{} (overriding {})", o.origin, self.source))
            .unwrap_or_else(|| self.source.clone())
    }

    fn invalid(&self, key: &str, value: String, expected: &str) -> Error {
        Error::Invalid {
            source_name: self.origin(key),
            key: key.into(),
            value,
            expected: expected.into(),
        }
    }

    fn require(
        &self,
        ok: bool,
        key: &str,
        value: impl std::fmt::Display,
        expected: &str,
    ) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.invalid(key, value.to_string(), expected))
        }
    }
}

#[cfg(test)]
mod tests;
