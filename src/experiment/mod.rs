//! The experiment file format: what a user writes in `experiments/X.toml`.
//!
//! Serde types own the format (unknown keys are rejected, every field has a default), the JSON
//! Schema is generated from them, and [`load`] layers defaults <- file <- `PIXEL_*` environment <-
//! `--set key=value`. Cross-field checks live in [`plan`], which maps what the user wrote onto the
//! types of the layers below (`model`, `data`, `device`, `train`); sweeps over experiments in
//! [`sweep`]. Imports those layers and `error`; nothing here creates a tensor or writes a file.

mod load;
pub mod plan;
pub mod reference;
pub mod sweep;

pub(crate) use load::line_column;
pub use load::{Override, environment_overrides, load, load_recorded, parse, parse_set};
pub use plan::Plan;
pub use plan::model::pixelcnnpp::PixelCnnPpSection;
pub use plan::model::vae::{VaeConditioningKind, VaeSection};
// The kinds the format names live with the layers that use them; the format re-exports them.
pub use crate::data::DatasetKind;
pub use crate::device::{BackendKind, Precision};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One run: model, data, training, sampling and runtime settings.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    /// Free text: what this run reproduces. Default: empty.
    pub description: String,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub sample: SampleSection,
    pub runtime: RuntimeSection,
}

/// The architecture.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Model variant. Default: "simple".
    pub variant: Variant,
    /// Number of masked k x k convolution layers (the first is of type A). Default: 5.
    pub layers: usize,
    /// Kernel size k of the masked convolutions, odd. Default: 5.
    pub kernel: usize,
    /// Hidden channels per layer; must be divisible by the number of colours. Default: 30.
    pub channels: usize,
    /// Conditioning: "none", or "class" for the image's class label inside every gate or block
    /// (variants "gated", "vae" and "pixelcnnpp"; 10 classes). Default: "none".
    pub conditional: Conditional,
    /// Gated only, an ablation when false: the residual connection of the horizontal stack.
    /// Default: true.
    pub residual: bool,
    /// Gated only, an ablation when false: tanh(a) * sigmoid(b) gates (false: ReLU). Default: true.
    pub gates: bool,
    /// Gated only, an ablation when false: the link from the vertical to the horizontal stack
    /// (without it the model sees only the current row). Default: true.
    pub link: bool,
    /// The distribution of each value 0..255: "categorical" (a 256-way softmax per sub-pixel,
    /// R -> G -> B) or "logistic_mixture" (PixelCNN++'s discretized mixture of `mixtures`
    /// logistics per pixel, computed in f32 under every precision; grey images with every
    /// variant, RGB with "pixelcnnpp"). Default: "logistic_mixture" for variant "pixelcnnpp",
    /// else "categorical".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood: Option<LikelihoodKind>,
    /// Components of the logistic mixture (likelihood "logistic_mixture" only). Default: 10.
    pub mixtures: usize,
    /// PixelVAE settings (variant "vae" only); `layers`, `kernel` and `channels` describe its
    /// gated PixelCNN decoder.
    pub vae: VaeSection,
    /// PixelCNN++ settings (variant "pixelcnnpp" only); `channels` is its number of filters and
    /// `layers` and `kernel` stay unset.
    pub pixelcnnpp: PixelCnnPpSection,
}

/// The distribution a model predicts for each value.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LikelihoodKind {
    /// 256 logits per sub-pixel.
    Categorical,
    /// A discretized mixture of logistics per pixel (Salimans et al. 2017).
    LogisticMixture,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            variant: Variant::Simple,
            layers: 5,
            kernel: 5,
            channels: 30,
            conditional: Conditional::None,
            residual: true,
            gates: true,
            link: true,
            likelihood: None,
            mixtures: 10,
            vae: VaeSection::default(),
            pixelcnnpp: PixelCnnPpSection::default(),
        }
    }
}

/// Model variants.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Masked convolutions and ReLUs, no gates or residuals (van den Oord et al. 2016, PixelRNN paper).
    Simple,
    /// Gated PixelCNN with vertical and horizontal stacks, no blind spot (van den Oord et al. 2016,
    /// "Conditional Image Generation with PixelCNN Decoders").
    Gated,
    /// PixelVAE (Gulrajani et al. 2016): a VAE whose decoder is a gated PixelCNN; settings in
    /// `[model.vae]`.
    Vae,
    /// PixelCNN++ (Salimans et al. 2017): two shifted streams over three resolutions, gated
    /// resnets with dropout, a logistic mixture per pixel; settings in `[model.pixelcnnpp]`.
    Pixelcnnpp,
}

/// What a model is conditioned on besides earlier pixels.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Conditional {
    /// Nothing.
    None,
    /// The class label (MNIST digit, CIFAR-10 class, synthetic label): 10 classes.
    Class,
}

/// Where the images come from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Dataset kind. Default: "mnist".
    pub dataset: DatasetKind,
    /// Folder holding the dataset's files. Relative paths are relative to the experiment file.
    /// Default: unset, which searches `$PIXEL_DATA/<dataset>`, then `data/<dataset>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Use only the first N training images (0 = all). Default: 0.
    pub train_limit: usize,
    /// Use only the first N test images (0 = all). Default: 0.
    pub test_limit: usize,
    /// Training images held out as a validation split: a count (5000), or a fraction of the
    /// training images below 1 (0.1); 0 = none. Chosen by `train.seed`, taken after
    /// `train_limit`, evaluated every epoch (`validation_bits_per_dim` in metrics.csv); the best
    /// epoch of a sweep is chosen on it, never on test. An image folder's `valid/` stays its test
    /// split. Default: 0.
    pub validation: f64,
    /// Centre-crop every image to crop x crop pixels (0 = no crop). Default: 0.
    pub crop: usize,
    /// Download MNIST or CIFAR-10 into `data/` when no copy is found. Default: true.
    pub download: bool,
    /// Synthetic data only: image side in pixels. Default: 8.
    pub synthetic_size: usize,
    /// Synthetic data only: colour channels, 1 or 3. Default: 1.
    pub synthetic_colours: usize,
    /// Synthetic data only: training images (the test split has a quarter as many). Default: 256.
    pub synthetic_images: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            dataset: DatasetKind::Mnist,
            path: None,
            train_limit: 0,
            test_limit: 0,
            validation: 0.0,
            crop: 0,
            download: true,
            synthetic_size: 8,
            synthetic_colours: 1,
            synthetic_images: 256,
        }
    }
}

/// Optimisation.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Passes over the training set. Default: 15.
    pub epochs: usize,
    /// Images per optimisation step. Default: 64.
    pub batch_size: usize,
    /// Images per evaluation batch (memory only; results do not depend on it). Default: 256.
    pub eval_batch_size: usize,
    /// Adam learning rate at the first step. Default: 0.001.
    pub learning_rate: f64,
    /// Multiplies the learning rate after every step (exponential decay per step, as PixelCNN++:
    /// 0.999995); step n uses `learning_rate * lr_decay^(n-1)`. 1 = constant. Default: 1.0.
    pub lr_decay: f64,
    /// Adam's beta1 and beta2 (PixelCNN++: [0.95, 0.9995]). Default: [0.9, 0.999].
    pub adam_betas: [f64; 2],
    /// Rescales the gradients whose global L2 norm exceeds this to this norm (0 = never). The norm
    /// before clipping is in metrics.csv and TensorBoard. Default: 0.
    pub clip_grad_norm: f64,
    /// Polyak averaging: an exponential moving average of the weights with this decay per step
    /// (PixelCNN++: 0.9995), bias-corrected so that the initial weights have no part in it, which
    /// evaluation, sample grids, `pixel eval` and `pixel sample` use; checkpoints keep it beside
    /// the trained weights. 0 = off. Default: 0.
    pub ema: f64,
    /// f16 only: the run stops with an error after this many steps in a row were skipped
    /// because their gradients overflowed (each halves the loss scale; 16 in a row take it from
    /// 65536 to 1, where nothing is left to gain). Skipped steps are warned about and counted in
    /// metrics.csv. In f32 and bf16 the first gradient that is not finite stops the run. Default: 25.
    pub max_skipped_steps: usize,
    /// Seed for weights, shuffling and sampling. Default: 1.
    pub seed: u64,
    /// Checkpoints kept in `results/<name>/checkpoints/` (one is written per epoch and on
    /// interrupt; older ones are removed, except the newest written at an epoch's end, which
    /// `pixel eval` and `pixel sample` read). Default: 2.
    pub keep_checkpoints: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 15,
            batch_size: 64,
            eval_batch_size: 256,
            learning_rate: 1e-3,
            lr_decay: 1.0,
            adam_betas: [0.9, 0.999],
            clip_grad_norm: 0.0,
            ema: 0.0,
            max_skipped_steps: 25,
            seed: 1,
            keep_checkpoints: 2,
        }
    }
}

/// Sample grids.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    /// Write a sample grid every N epochs (0 = only after the last epoch, which always gets one).
    /// Default: 5.
    pub every: usize,
    /// Softmax temperature for sampling (1 = the model's distribution). Default: 1.0.
    pub temperature: f64,
    /// Grid side in images, even: the top half is generated from scratch, the bottom half completes
    /// the top halves of test images. Default: 12.
    pub grid: usize,
}

impl Default for SampleSection {
    fn default() -> Self {
        SampleSection {
            every: 5,
            temperature: 1.0,
            grid: 12,
        }
    }
}

/// Where and how the tensors live.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// Burn backend: "flex" (pure Rust, always built), "libtorch" (needs `--features tch`), or
    /// "auto" (libtorch on CUDA when a GPU is visible, libtorch CPU when compiled in, else flex).
    /// Default: "flex".
    pub backend: BackendKind,
    /// "auto", "cpu", "cuda" or "cuda:N". "auto" picks CUDA on libtorch when it is available.
    /// Default: "auto".
    pub device: String,
    /// Float precision of the convolutions: "f32", "bf16", or "f16" (with dynamic loss scaling);
    /// weights, Adam state, softmax and loss stay f32. Default: "f32".
    pub precision: Precision,
    /// Train a model whose estimated training memory (weights, gradients, Adam's moments and the
    /// activations of a batch) exceeds this machine's memory; without it such a plan is refused
    /// before any data is read. Default: false.
    pub allow_large: bool,
    /// libtorch only: deterministic algorithms (an operation without one is an error), cuDNN's
    /// deterministic algorithms and no benchmarking, and cuBLAS's deterministic workspace
    /// (`CUBLAS_WORKSPACE_CONFIG=:4096:8` unless set), so that a CUDA run repeats to the bit, at
    /// some cost in speed. The CPU backends repeat to the bit either way. Default: false.
    pub deterministic: bool,
    /// libtorch on CUDA only: cuDNN times its convolution algorithms on the first batch of each
    /// shape and keeps the fastest (PyTorch's `torch.backends.cudnn.benchmark = True`): faster
    /// steps where shapes stay fixed, at the cost of slower first steps, and runs that do not
    /// repeat to the bit. Not with `deterministic`. Default: false.
    pub cudnn_benchmark: bool,
    /// libtorch on CUDA, one process: capture a training step once as a CUDA
    /// graph (after the first steps, once its buffers have settled) and replay it for each step
    /// after, so that the host no longer launches each kernel (PyTorch's
    /// `torch.compile(mode="reduce-overhead")` does the same). The same work as the eager
    /// step; a step that cannot replay (a last partial batch, a moved buffer) runs eagerly, and
    /// the log and `pixel bench` count them. Not yet run on a GPU. Default: false.
    pub cuda_graph: bool,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            backend: BackendKind::Flex,
            device: "auto".into(),
            precision: Precision::F32,
            allow_large: false,
            deterministic: false,
            cudnn_benchmark: false,
            cuda_graph: false,
        }
    }
}

/// Loads and plans one experiment file, with data searched in `$PIXEL_DATA` too.
pub fn plan_file(path: &std::path::Path, sets: &[Override]) -> crate::error::Result<Plan> {
    let (exp, overrides) = load(path, sets)?;
    let pixel_data = std::env::var_os("PIXEL_DATA").map(PathBuf::from);
    Plan::new(exp, overrides, path, pixel_data.as_deref())
}

/// The JSON Schema of the experiment format, as written to `schemas/experiment.schema.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(Experiment);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema always serialises");
    text.push('\n');
    text
}
