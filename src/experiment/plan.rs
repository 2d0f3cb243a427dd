//! Experiment -> Plan: every cross-field check, before any tensor exists, and the mapping from what
//! the user wrote to what will run.

use super::{BackendKind, Conditional, DatasetKind, Experiment, LikelihoodKind, Override, Variant};
use crate::data::{self, DataError, DataSpec, synthetic};
use crate::device::{self, DeviceChoice, Target};
use crate::error::{Error, Result};
use crate::model::{
    GatedConfig, Likelihood, ModelConfig, PixelCnnPpConfig, SimpleConfig, VaeConditioning,
    VaeConfig,
};
use crate::train::Step;
use std::path::{Path, PathBuf};

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
        let m = &e.model;

        let (colours, side) = match e.data.dataset {
            DatasetKind::Mnist => (1, Some(28)),
            DatasetKind::Cifar10 => (3, Some(32)),
            DatasetKind::Folder => (3, None),
            DatasetKind::Synthetic => {
                ctx.require(
                    matches!(e.data.synthetic_colours, 1 | 3),
                    "data.synthetic_colours",
                    e.data.synthetic_colours,
                    "1 (grey) or 3 (RGB)",
                )?;
                ctx.require(
                    (2..=256).contains(&e.data.synthetic_size),
                    "data.synthetic_size",
                    e.data.synthetic_size,
                    "an image side between 2 and 256 pixels",
                )?;
                ctx.require(
                    e.data.synthetic_images >= 1,
                    "data.synthetic_images",
                    e.data.synthetic_images,
                    "at least 1 image",
                )?;
                (e.data.synthetic_colours, Some(e.data.synthetic_size))
            }
        };

        let pixelcnnpp = m.variant == Variant::Pixelcnnpp;
        if pixelcnnpp {
            let defaults = super::ModelSection::default();
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
        )?;
        if let Some(side) = side {
            ctx.require(
                e.data.crop == 0 || (2..=side).contains(&e.data.crop),
                "data.crop",
                e.data.crop,
                &format!("0 (no crop) or a side between 2 and {side} pixels"),
            )?;
        } else {
            ctx.require(
                e.data.crop != 1,
                "data.crop",
                e.data.crop,
                "0 (no crop) or at least 2 pixels",
            )?;
        }

        let v = e.data.validation;
        ctx.require(
            v.is_finite() && v >= 0.0 && (v < 1.0 || v.fract() == 0.0),
            "data.validation",
            v,
            "0 (none), a count of training images such as 5000, or a fraction below 1 such as 0.1",
        )?;
        let t = &e.train;
        ctx.require(t.epochs >= 1, "train.epochs", t.epochs, "at least 1 epoch")?;
        ctx.require(
            t.batch_size >= 1,
            "train.batch_size",
            t.batch_size,
            "at least 1 image",
        )?;
        ctx.require(
            t.eval_batch_size >= 1,
            "train.eval_batch_size",
            t.eval_batch_size,
            "at least 1 image",
        )?;
        ctx.require(
            t.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            t.keep_checkpoints,
            "at least 1 (resuming needs the newest checkpoint)",
        )?;
        ctx.require(
            t.learning_rate.is_finite() && t.learning_rate > 0.0,
            "train.learning_rate",
            t.learning_rate,
            "a positive number such as 0.001",
        )?;
        ctx.require(
            t.lr_decay > 0.0 && t.lr_decay <= 1.0,
            "train.lr_decay",
            t.lr_decay,
            "a factor in (0, 1] per step, such as 0.999995 (1 keeps the learning rate)",
        )?;
        for (i, beta) in t.adam_betas.iter().enumerate() {
            ctx.require(
                (0.0..1.0).contains(beta),
                &format!("train.adam_betas[{i}]"),
                beta,
                "a number in [0, 1), such as 0.9 and 0.999",
            )?;
        }
        ctx.require(
            t.clip_grad_norm.is_finite() && t.clip_grad_norm >= 0.0,
            "train.clip_grad_norm",
            t.clip_grad_norm,
            "a norm of 0 (no clipping) or more",
        )?;
        ctx.require(
            (0.0..1.0).contains(&t.ema),
            "train.ema",
            t.ema,
            "a decay in [0, 1) per step, such as 0.9995 (0 turns averaging off)",
        )?;

        let s = &e.sample;
        ctx.require(
            s.temperature.is_finite() && s.temperature > 0.0,
            "sample.temperature",
            s.temperature,
            "a positive number (1.0 samples the model's own distribution)",
        )?;
        ctx.require(
            s.grid >= 2 && s.grid.is_multiple_of(2) && s.grid <= MAX_GRID,
            "sample.grid",
            s.grid,
            &format!("an even number of images per side, from 2 to {MAX_GRID}"),
        )?;

        let r = &e.runtime;
        let Some(target) = Target::parse(&r.device) else {
            return Err(ctx.invalid(
                "runtime.device",
                format!("{:?}", r.device),
                "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
            ));
        };
        let backend_name = format!("\"{}\"", r.backend.name());
        if !device::compiled_in(r.backend) {
            return Err(ctx.invalid(
                "runtime.backend",
                backend_name.clone(),
                &format!(
                    "a backend compiled into this binary; for {backend_name} use {}",
                    device::rebuild_hint(r.backend)
                ),
            ));
        }
        let flex_only = r.backend == BackendKind::Flex
            || (r.backend == BackendKind::Auto && !device::compiled_in(BackendKind::Libtorch));
        ctx.require(
            !(matches!(target, Target::Cuda(_)) && flex_only),
            "runtime.device",
            format!("{:?}", r.device),
            &format!(
                "\"cpu\" or \"auto\" with the flex backend (CUDA needs libtorch: {})",
                device::rebuild_hint(BackendKind::Libtorch)
            ),
        )?;

        let classes = match m.conditional {
            Conditional::None => None,
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
                Some(10)
            }
        };
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
        if m.variant != Variant::Vae && m.vae != super::VaeSection::default() {
            return Err(ctx.invalid(
                "model.vae",
                "a [model.vae] table".into(),
                "no [model.vae] table unless variant = \"vae\"",
            ));
        }
        if !pixelcnnpp && m.pixelcnnpp != super::PixelCnnPpSection::default() {
            return Err(ctx.invalid(
                "model.pixelcnnpp",
                "a [model.pixelcnnpp] table".into(),
                "no [model.pixelcnnpp] table unless variant = \"pixelcnnpp\"",
            ));
        }
        let pp = &m.pixelcnnpp;
        if pixelcnnpp {
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
            )?;
        }
        let likelihood_kind = m.likelihood.unwrap_or(if pixelcnnpp {
            LikelihoodKind::LogisticMixture
        } else {
            LikelihoodKind::Categorical
        });
        let likelihood = match likelihood_kind {
            LikelihoodKind::Categorical => {
                ctx.require(
                    m.mixtures == super::ModelSection::default().mixtures,
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
        let v = &m.vae;
        if m.variant == Variant::Vae {
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
                v.maps >= 1 || v.conditioning == super::VaeConditioningKind::Linear,
                "model.vae.maps",
                v.maps,
                "at least 1 channel",
            )?;
            ctx.require(
                v.free_bits.is_finite() && v.free_bits >= 0.0,
                "model.vae.free_bits",
                v.free_bits,
                "0 (off) or a positive number of nats per latent dimension",
            )?;
        }
        let gated = |spatial_channels, concat| GatedConfig {
            colours,
            layers: m.layers,
            kernel: m.kernel,
            channels: m.channels,
            classes,
            spatial_channels,
            concat,
            residual: m.residual,
            gates: m.gates,
            link: m.link,
            likelihood,
        };
        let model = match m.variant {
            Variant::Simple => ModelConfig::Simple(SimpleConfig {
                colours,
                layers: m.layers,
                kernel: m.kernel,
                channels: m.channels,
                likelihood,
            }),
            Variant::Pixelcnnpp => ModelConfig::PixelCnnPp(PixelCnnPpConfig {
                colours,
                filters: m.channels,
                resnets: pp.resnets,
                likelihood,
                classes,
                dropout: pp.dropout,
            }),
            Variant::Gated => ModelConfig::Gated(gated(0, false)),
            Variant::Vae => {
                use super::VaeConditioningKind as Kind;
                let (conditioning, maps) = match v.conditioning {
                    Kind::Gates => (VaeConditioning::Gates, v.maps),
                    Kind::Concat => (VaeConditioning::Concat, v.maps),
                    Kind::Linear => (VaeConditioning::Linear, v.latent_channels),
                };
                ModelConfig::Vae(VaeConfig {
                    colours,
                    latent_channels: v.latent_channels,
                    downsample: v.downsample,
                    hidden: v.hidden,
                    conditioning,
                    decoder: gated(maps, conditioning == VaeConditioning::Concat),
                })
            }
        };

        let image_side = match (e.data.crop, side) {
            (0, side) => side,
            (crop, _) => Some(crop),
        };
        check_size(&ctx, e, &model, image_side, &target)?;

        let dir = match e.data.dataset {
            DatasetKind::Synthetic => None,
            kind => Some(locate(&ctx, e, kind, source, pixel_data)?),
        };
        let data = DataSpec {
            kind: e.data.dataset,
            dir,
            download: e.data.download,
            train_limit: e.data.train_limit,
            test_limit: e.data.test_limit,
            validation: e.data.validation,
            crop: e.data.crop,
            synthetic: synthetic::Spec {
                size: e.data.synthetic_size,
                colours: e.data.synthetic_colours,
                train_images: e.data.synthetic_images,
            },
            seed: t.seed,
        };

        let mut experiment = experiment.clone();
        experiment.data.path = data.dir.clone();
        experiment.model.likelihood = Some(likelihood_kind);
        Ok(Plan {
            name: name_of(source),
            experiment,
            overrides,
            model,
            data,
            device: DeviceChoice {
                backend: r.backend,
                target,
                precision: r.precision,
            },
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

/// Refuses a model whose training step cannot fit in this machine's memory (CPU targets; a GPU's
/// memory is not known before the device opens): the weights with their gradients and Adam's two
/// moments (16 bytes a parameter), and the activations of a batch where the image size is known.
fn check_size(
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

/// The results folder's name: the experiment file's stem.
pub fn name_of(source: &Path) -> String {
    source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "experiment".into())
}

/// Finds the dataset's folder, or where it will be downloaded to.
fn locate(
    ctx: &Checker,
    e: &Experiment,
    kind: DatasetKind,
    source: &Path,
    pixel_data: Option<&Path>,
) -> Result<PathBuf> {
    // Relative paths in an experiment are relative to the experiment file.
    let explicit = e.data.path.as_ref().map(|p| {
        if p.is_absolute() {
            p.clone()
        } else {
            source.parent().unwrap_or(Path::new(".")).join(p)
        }
    });
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    match data::locate(kind, explicit.as_deref(), pixel_data) {
        Ok(dir) => Ok(absolute(dir)),
        Err(tried) => {
            let downloadable = matches!(kind, DatasetKind::Mnist | DatasetKind::Cifar10);
            if downloadable && e.data.download {
                let target = explicit.unwrap_or_else(|| Path::new("data").join(kind.name()));
                return Ok(absolute(target));
            }
            let tried = tried
                .iter()
                .map(|p| format!("  {}", p.display()))
                .collect::<Vec<_>>()
                .join("\n");
            let mut hint = data::expected_files(kind);
            if downloadable {
                hint.push_str(&format!(
                    "; or set data.download = true in {} to fetch it",
                    ctx.source
                ));
            } else {
                hint.push_str(&format!("; set data.path in {}", ctx.source));
            }
            Err(DataError::Missing {
                dataset: kind.name().into(),
                tried,
                hint,
            }
            .into())
        }
    }
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
mod tests {
    use super::*;

    fn synthetic() -> Experiment {
        let mut e = Experiment::default();
        e.data.dataset = DatasetKind::Synthetic;
        e
    }

    fn plan(e: Experiment) -> Result<Plan> {
        Plan::new(e, vec![], Path::new("experiments/x.toml"), None)
    }

    fn err(e: Experiment) -> String {
        plan(e).unwrap_err().to_string()
    }

    /// PixelCNN++: its defaults (the logistic mixture, openai's sizes), its table, and the keys
    /// that mean nothing to it or to the other variants.
    #[test]
    fn pixelcnnpp_keys_and_likelihoods() {
        use crate::experiment::{LikelihoodKind, PixelCnnPpSection};
        let mut e = synthetic();
        e.model.variant = Variant::Pixelcnnpp;
        e.model.channels = 16;
        e.data.synthetic_colours = 3;
        let p = plan(e.clone()).unwrap();
        let ModelConfig::PixelCnnPp(c) = &p.model else {
            panic!("{:?}", p.model)
        };
        assert_eq!(
            (c.filters, c.resnets, c.dropout, c.likelihood),
            (16, 5, 0.5, Likelihood::LogisticMixture { components: 10 })
        );
        // The resolved experiment says which likelihood was chosen.
        assert!(
            p.resolved_toml()
                .contains("likelihood = \"logistic_mixture\""),
            "{}",
            p.resolved_toml()
        );
        assert!(p.resolved_toml().contains("[model.pixelcnnpp]"));
        // 16 filters need not be a multiple of the 3 colours.
        let mut k = e.clone();
        k.model.kernel = 3;
        assert!(err(k).contains("`model.kernel` = 3"));
        let mut l = e.clone();
        l.model.layers = 8;
        assert!(err(l).contains("model.pixelcnnpp.resnets"));
        let mut d = e.clone();
        d.model.pixelcnnpp.dropout = 1.0;
        assert!(err(d).contains("`model.pixelcnnpp.dropout` = 1"));
        let mut r = e.clone();
        r.model.pixelcnnpp.resnets = 0;
        assert!(err(r).contains("`model.pixelcnnpp.resnets` = 0"));
        let mut g = e.clone();
        g.model.gates = false;
        assert!(err(g).contains("`model.gates` = false"));
        // Categorical: 256 logits per colour; then mixtures means nothing.
        let mut cat = e.clone();
        cat.model.likelihood = Some(LikelihoodKind::Categorical);
        assert_eq!(
            plan(cat.clone()).unwrap().model.likelihood(),
            Likelihood::Categorical
        );
        cat.model.mixtures = 5;
        assert!(err(cat).contains("`model.mixtures` = 5"));
        // The other variants: categorical by default; a mixture on grey images only.
        let mut gated = synthetic();
        gated.model.variant = Variant::Gated;
        assert_eq!(
            plan(gated.clone()).unwrap().model.likelihood(),
            Likelihood::Categorical
        );
        gated.model.likelihood = Some(LikelihoodKind::LogisticMixture);
        gated.model.mixtures = 4;
        assert_eq!(
            plan(gated.clone()).unwrap().model.likelihood(),
            Likelihood::LogisticMixture { components: 4 }
        );
        gated.data.synthetic_colours = 3;
        gated.model.channels = 30;
        let msg = err(gated.clone());
        assert!(
            msg.contains("`model.likelihood`") && msg.contains("pixelcnnpp"),
            "{msg}"
        );
        gated.data.synthetic_colours = 1;
        gated.model.mixtures = 0;
        assert!(err(gated.clone()).contains("`model.mixtures` = 0"));
        gated.model.mixtures = 4;
        gated.model.pixelcnnpp = PixelCnnPpSection {
            resnets: 2,
            ..PixelCnnPpSection::default()
        };
        assert!(err(gated.clone()).contains("no [model.pixelcnnpp] table"));
        gated.model.pixelcnnpp = PixelCnnPpSection::default();
        assert!(
            !plan(gated)
                .unwrap()
                .resolved_toml()
                .contains("[model.pixelcnnpp]")
        );
    }

    #[test]
    fn valid_synthetic_plan() {
        let p = plan(synthetic()).unwrap();
        assert_eq!(p.name, "x");
        assert_eq!(p.model.colours(), 1);
    }

    #[test]
    fn out_of_range_values_name_file_key_and_value() {
        let mut e = synthetic();
        e.model.kernel = 4;
        let msg = err(e);
        assert!(msg.contains("experiments/x.toml"), "{msg}");
        assert!(msg.contains("`model.kernel` = 4"), "{msg}");
        assert!(msg.contains("odd"), "{msg}");

        let mut e = synthetic();
        e.data.synthetic_colours = 3;
        e.model.channels = 31;
        assert!(err(e).contains("`model.channels` = 31"));

        let mut e = synthetic();
        e.model.layers = 0;
        assert!(err(e).contains("`model.layers` = 0"));

        let mut e = synthetic();
        e.train.batch_size = 0;
        assert!(err(e).contains("`train.batch_size` = 0"));

        let mut e = synthetic();
        e.train.learning_rate = -0.1;
        assert!(err(e).contains("`train.learning_rate` = -0.1"));

        let mut e = synthetic();
        e.sample.grid = 5;
        assert!(err(e).contains("`sample.grid` = 5"));

        let mut e = synthetic();
        e.train.lr_decay = 0.0;
        assert!(err(e).contains("`train.lr_decay` = 0"));
        let mut e = synthetic();
        e.train.lr_decay = 1.5;
        assert!(err(e).contains("`train.lr_decay` = 1.5"));
        let mut e = synthetic();
        e.train.adam_betas = [0.9, 1.0];
        assert!(err(e).contains("`train.adam_betas[1]` = 1"));
        let mut e = synthetic();
        e.train.clip_grad_norm = -1.0;
        assert!(err(e).contains("`train.clip_grad_norm` = -1"));
        let mut e = synthetic();
        e.train.ema = 1.0;
        assert!(err(e).contains("`train.ema` = 1: expected a decay in [0, 1)"));

        let mut e = synthetic();
        e.runtime.device = "gpu".into();
        assert!(err(e).contains("`runtime.device` = \"gpu\""));
    }

    /// Sizes that cannot fit are refused from the config alone, with the estimate; the key
    /// `runtime.allow_large` lets them through knowingly. (Assumes a machine with less than
    /// 1000 TiB of memory.)
    #[test]
    fn sizes_that_cannot_fit_are_refused_before_anything_is_built() {
        let mut e = synthetic();
        e.model.channels = 1_000_000_000;
        let msg = err(e.clone());
        assert!(msg.contains("channels = 1000000000"), "{msg}");
        assert!(msg.contains("parameters") && msg.contains("GiB"), "{msg}");
        e.runtime.allow_large = true;
        assert!(plan(e).is_ok());
        // The default model at the default batch fits anywhere this runs.
        assert!(plan(synthetic()).is_ok());
    }

    #[test]
    fn class_conditioning_needs_the_gated_variant() {
        let mut e = synthetic();
        e.model.conditional = Conditional::Class;
        assert!(err(e.clone()).contains("`model.conditional`"));
        e.model.variant = Variant::Gated;
        let p = plan(e).unwrap();
        assert!(matches!(
            p.model,
            ModelConfig::Gated(GatedConfig {
                classes: Some(10),
                ..
            })
        ));
    }

    #[test]
    fn override_is_named_as_the_source() {
        let mut e = synthetic();
        e.train.epochs = 0;
        let o = Override {
            key: "train.epochs".into(),
            value: "0".into(),
            origin: "--set".into(),
        };
        let msg = Plan::new(e, vec![o], Path::new("a.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("--set (overriding a.toml)"), "{msg}");
    }

    #[test]
    fn missing_dataset_without_download_says_what_to_put_where() {
        let mut e = Experiment::default();
        e.data.download = false;
        e.data.path = Some("no/such/folder".into());
        let msg = err(e);
        assert!(msg.contains("no/such/folder"), "{msg}");
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    }

    /// `auto` plans everywhere, but CUDA needs libtorch compiled in.
    #[cfg(not(feature = "tch"))]
    #[test]
    fn auto_backend_needs_libtorch_only_for_cuda() {
        let mut e = synthetic();
        e.runtime.backend = BackendKind::Auto;
        assert!(plan(e.clone()).is_ok());
        e.runtime.device = "cuda:1".into();
        let msg = err(e);
        assert!(msg.contains("`runtime.device` = \"cuda:1\""), "{msg}");
        assert!(msg.contains("--features tch"), "{msg}");
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn backend_not_compiled_in_says_how_to_rebuild() {
        let mut e = synthetic();
        e.runtime.backend = BackendKind::Libtorch;
        let msg = err(e);
        assert!(msg.contains("--features tch"), "{msg}");
    }
}
