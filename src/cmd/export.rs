//! `pixel export`: a run's weights as safetensors, for PyTorch. The twins in `bench/` build the
//! network from the file's metadata and load it (`bench/pixel_twins.py`). With `--test-images`,
//! the first test images beside it, with pixel's log-likelihood of each sub-pixel (or, under the
//! logistic mixture, each pixel), so that the twin's numbers can be checked against pixel's.

use crate::data::Images;
use crate::error::{Error, Result};
use crate::loss::log_prob_per_factor;
use crate::model::{Model, ModelConfig};
use crate::progress::Progress;
use crate::results::{npy, write_atomic};
use crate::session::{self, Session};
use crate::train::Batch;
use burn::module::Module;
use burn::tensor::Device;
use std::path::{Path, PathBuf};

/// How many test images `--test-images` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestImages {
    All,
    First(usize),
}

impl std::str::FromStr for TestImages {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(TestImages::All),
            _ => match s.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!(
                    "expected a number of images (1 or more) or `all`, got `{s}`"
                )),
                Ok(n) => Ok(TestImages::First(n)),
            },
        }
    }
}

/// The files written beside the weights with `--test-images`.
pub const TEST_IMAGES_FILE: &str = "test-images.npy";
pub const TEST_LABELS_FILE: &str = "test-labels.npy";
pub const TEST_LOG_PROBS_FILE: &str = "test-log-probs.npy";

/// `pixel export DIR`: writes `out` (default `DIR/model.safetensors`) with the trained weights
/// of the run's last finished epoch and, where the run averages its weights, the average beside
/// it (`model-ema.safetensors`), which is what `pixel eval` and `pixel sample` use.
pub fn export(dir: &Path, out: Option<PathBuf>, test_images: Option<TestImages>) -> Result<()> {
    let out = out.unwrap_or_else(|| dir.join("model.safetensors"));
    let Some(stem) = out
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".safetensors"))
        .filter(|s| !s.is_empty())
    else {
        return Err(Error::Usage {
            flag: format!("--out {}", out.display()),
            message: "expected a file name ending in .safetensors".into(),
        });
    };
    let average_path = out.with_file_name(format!("{stem}-ema.safetensors"));
    let plan = session::recorded_plan(dir, &[], "pixel export")?;
    if let (Some(_), ModelConfig::Vae(_)) = (test_images, &plan.model) {
        return Err(Error::Usage {
            flag: "--test-images".into(),
            message: "a PixelVAE's likelihood of an image is not a product of per-pixel \
                      factors (it integrates over z): export its weights without it, and use \
                      `pixel eval` for its test NLL"
                .into(),
        });
    }
    let (
        _lock,
        Session {
            plan,
            device: opened,
            splits,
            state,
            position,
            ..
        },
    ) = Session::open_trained(dir, plan)?;
    // Refused before anything is written.
    let test_count = match test_images {
        None => None,
        Some(TestImages::All) => Some(splits.test.len()),
        Some(TestImages::First(n)) if n <= splits.test.len() => Some(n),
        Some(TestImages::First(n)) => {
            return Err(Error::Usage {
                flag: format!("--test-images {n}"),
                message: format!(
                    "the test split of {} has {} images (`all` takes every one)",
                    dir.display(),
                    splits.test.len()
                ),
            });
        }
    };
    let folder = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&folder).map_err(Error::io(&folder))?;

    let metadata = |weights: &str| {
        vec![
            ("pixel.model", plan.model.to_json()),
            ("pixel.experiment", plan.resolved_toml()),
            ("pixel.weights", weights.to_string()),
            ("pixel.epochs", position.epochs_done.to_string()),
            ("pixel.version", env!("CARGO_PKG_VERSION").to_string()),
        ]
    };
    let write = |path: &Path, model: &Model, weights: &str| -> Result<()> {
        let bytes = crate::model::export::safetensors(model, &metadata(weights))
            .map_err(|message| Error::Run(format!("{}: {message}", path.display())))?;
        write_atomic(path, &bytes)?;
        println!("wrote {} ({weights} weights)", path.display());
        Ok(())
    };
    write(&out, &state.model, "trained")?;
    if let Some(ema) = &state.ema {
        write(&average_path, ema.model(), "average")?;
    }
    if let ModelConfig::Vae(_) = plan.model {
        println!(
            "note: bench/ has no PyTorch twin of the PixelVAE; the names are its module paths"
        );
    }

    let Some(n) = test_count else {
        return Ok(());
    };
    let batch = plan.experiment.train.eval_batch_size.max(1);
    let device = opened.device.clone().without_autodiff();
    let (files, bits) = test_set(state.eval_model(), &splits.test, n, batch, &device)
        .map_err(|message| Error::Run(format!("{}: {message}", dir.display())))?;
    for (name, bytes) in files {
        let path = folder.join(name);
        write_atomic(&path, &bytes)?;
        println!("wrote {}", path.display());
    }
    println!(
        "{n} test images, {bits:.6} bits/dim under the {} weights",
        if state.ema.is_some() {
            "average"
        } else {
            "trained"
        }
    );
    Ok(())
}

/// A file's name and bytes.
type NamedFile = (&'static str, Vec<u8>);

/// The first `n` images of `test`, their labels and `model`'s log-likelihood of each factor, as
/// `.npy` files, and their bits/dim.
fn test_set(
    model: &Model,
    test: &Images,
    n: usize,
    batch: usize,
    device: &Device,
) -> Result<(Vec<NamedFile>, f64), String> {
    let model = model.valid();
    let indices: Vec<usize> = (0..n).collect();
    let progress = Progress::new("test log-probs", n as u64, "images");
    let mut log_probs: Vec<f32> = Vec::with_capacity(n * test.dims());
    let mut factors = 0;
    for chunk in indices.chunks(batch) {
        let b = Batch::gather(test, chunk, device);
        let per_factor = log_prob_per_factor(model.forward(b.input, &b.context), b.target);
        factors = per_factor.dims()[1];
        let values = per_factor
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| format!("reading the log-probabilities: {e:?}"))?;
        log_probs.extend(values);
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    if let Some(bad) = log_probs.iter().find(|v| !v.is_finite()) {
        return Err(format!(
            "a test log-probability came out as {bad}: the weights are not finite"
        ));
    }
    let (pixels, labels) = test.gather(&indices);
    let (h, w) = (test.height, test.width);
    let bits = -log_probs.iter().map(|&v| f64::from(v)).sum::<f64>()
        / ((n * test.dims()) as f64 * std::f64::consts::LN_2);
    let files = vec![
        (
            TEST_IMAGES_FILE,
            npy::u8_array(&[n, test.colours, h, w], &pixels),
        ),
        (TEST_LABELS_FILE, npy::u8_array(&[n], &labels)),
        (
            TEST_LOG_PROBS_FILE,
            npy::f32_array(&[n, factors, h, w], &log_probs),
        ),
    ];
    Ok((files, bits))
}
