//! `pixel eval`: the test set's negative log-likelihood from a run's newest checkpoint. Exact for
//! the PixelCNNs; for a PixelVAE an importance-sampled estimate (Burda et al. 2016) with K draws
//! from q(z|x) per image, beside the ELBO from the same draws, which bounds it from above.

use crate::error::{Error, Result};
use crate::loss::bits_per_dim;
use crate::results::{EVAL_FILE, RECEPTIVE_JSON, RECEPTIVE_PNG, write_atomic};
use crate::session::{self, Session};
use crate::train::receptive::{self, Field};
use crate::train::{evaluate, importance_bounds};
use burn::module::Module;
use serde::Serialize;
use std::path::Path;

#[derive(Serialize, Debug)]
pub struct Report {
    /// The epoch after which the evaluated checkpoint was written.
    pub epochs: usize,
    pub images: usize,
    /// Exact (PixelCNNs) or importance-sampled (PixelVAE) test NLL, bits per dimension.
    pub test_bits_per_dim: f64,
    /// PixelVAE: the negative ELBO with the same draws (at least `test_bits_per_dim`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_elbo_bits_per_dim: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub importance_samples: Option<usize>,
    /// PixelVAE: latent dimensions whose posterior mean varies over the test images (variance
    /// above 0.01, Burda et al. 2016); 0 when the latent has collapsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_latent_dimensions: Option<usize>,
    /// PixelVAE: latent dimensions in all (channels x positions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_dimensions: Option<usize>,
    pub seconds: f64,
}

/// `pixel eval DIR`: evaluates, writes `DIR/eval.json` and prints what it found.
pub fn eval(dir: &Path, importance_samples: usize, batch_size: Option<usize>) -> Result<()> {
    let r = eval_results(dir, importance_samples, batch_size)?;
    match (r.test_elbo_bits_per_dim, r.importance_samples) {
        (Some(elbo), Some(k)) => println!(
            "test NLL {:.4} bits/dim (importance sampled, K = {k}), ELBO {:.4} bits/dim, \
             {} of {} latent dimensions active, {} images, after epoch {}, {:.1} s",
            r.test_bits_per_dim,
            elbo,
            r.active_latent_dimensions.unwrap_or(0),
            r.latent_dimensions.unwrap_or(0),
            r.images,
            r.epochs,
            r.seconds
        ),
        _ => println!(
            "test NLL {:.4} bits/dim (exact), {} images, after epoch {}, {:.1} s",
            r.test_bits_per_dim, r.images, r.epochs, r.seconds
        ),
    }
    println!("wrote {}", dir.join(EVAL_FILE).display());
    Ok(())
}

/// `pixel eval DIR`: evaluates on the run's test split and writes `DIR/eval.json`.
pub fn eval_results(
    dir: &Path,
    importance_samples: usize,
    batch_size: Option<usize>,
) -> Result<Report> {
    if importance_samples == 0 {
        return Err(Error::Usage {
            flag: "--importance-samples".into(),
            message: "expected at least 1 draw per image, got 0".into(),
        });
    }
    if batch_size == Some(0) {
        return Err(Error::Usage {
            flag: "--batch-size 0".into(),
            message: "expected at least 1 image per forward pass".into(),
        });
    }
    let plan = session::recorded_plan(dir, &[], "pixel eval")?;
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
    let epochs = position.epochs_done;
    let model = state.eval_model().valid();
    let device = opened.device.clone().without_autodiff();
    let batch = batch_size.unwrap_or(plan.experiment.train.eval_batch_size);
    let started = std::time::Instant::now();
    let report = match importance_bounds(
        &model,
        &splits.test,
        importance_samples,
        batch,
        plan.experiment.train.seed,
        &device,
    ) {
        Some(b) => Report {
            epochs,
            images: b.images,
            test_bits_per_dim: bits_per_dim(b.importance_nats, b.subpixels),
            test_elbo_bits_per_dim: Some(bits_per_dim(b.elbo_nats, b.subpixels)),
            importance_samples: Some(importance_samples),
            active_latent_dimensions: Some(b.latent_means.active()),
            latent_dimensions: Some(b.latent_means.dimensions()),
            seconds: started.elapsed().as_secs_f64(),
        },
        None => {
            let stats = evaluate(
                "test",
                &model,
                &splits.test,
                batch,
                plan.experiment.train.seed,
                &device,
            );
            stats.check_finite("test").map_err(Error::Run)?;
            Report {
                epochs,
                images: stats.images,
                test_bits_per_dim: stats.bits_per_dim(),
                test_elbo_bits_per_dim: None,
                importance_samples: None,
                active_latent_dimensions: None,
                latent_dimensions: None,
                seconds: started.elapsed().as_secs_f64(),
            }
        }
    };
    if !report.test_bits_per_dim.is_finite() {
        return Err(Error::Run(format!(
            "the test bits/dim of {} came out as {}: the likelihood or the weights are not finite",
            dir.display(),
            report.test_bits_per_dim
        )));
    }
    let json = serde_json::to_string_pretty(&report).expect("a report serialises");
    write_atomic(&dir.join(EVAL_FILE), json.as_bytes())?;
    Ok(report)
}

#[derive(Serialize, Debug)]
pub struct FieldReport {
    /// The epoch after which the evaluated checkpoint was written.
    pub epochs: usize,
    /// The first test images, over which the gradients' magnitudes are averaged.
    pub images: usize,
    pub fields: Vec<Field>,
}

/// `pixel eval DIR --receptive-field`: which earlier pixels the trained model's likelihood of a
/// few pixels depends on (the gradient over the first `images` test images), written as
/// `DIR/receptive-field.png` (one heat map per pixel, the pixel in red) and
/// `DIR/receptive-field.json`.
pub fn receptive_field(dir: &Path, images: usize) -> Result<FieldReport> {
    if images == 0 {
        return Err(Error::Usage {
            flag: "--images 0".into(),
            message: "expected at least 1 test image".into(),
        });
    }
    let plan = session::recorded_plan(dir, &[], "pixel eval")?;
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
    let test = &splits.test;
    let (c, h, w) = (test.colours, test.height, test.width);
    let n = images.min(test.len());
    let (pixels, labels) = test.gather(&(0..n).collect::<Vec<_>>());
    let subset = crate::data::Images {
        pixels,
        labels,
        colours: c,
        height: h,
        width: w,
    };
    let device = opened.device.clone().autodiff();
    let model = state.eval_model();
    let at = receptive::default_pixels(h, w);
    let fields =
        receptive::receptive_fields(model, &subset, &at, plan.experiment.train.seed, &device)
            .map_err(Error::Run)?;

    // One heat map per pixel, side by side, each value a square block, the pixel red.
    let scale = (96 / h.max(w)).max(1);
    let (sh, sw) = (h * scale, w * scale);
    let mut cells = Vec::with_capacity(fields.len() * 3 * sh * sw);
    for f in &fields {
        let heat = receptive::heat_map(f);
        for colour in 0..3 {
            for y in 0..sh {
                for x in 0..sw {
                    let p = (y / scale) * w + x / scale;
                    let v = if p == f.earlier_pixels {
                        [255, 0, 0][colour]
                    } else {
                        heat[p]
                    };
                    cells.push(v);
                }
            }
        }
    }
    let (planes, gh, gw) = crate::results::png::tile(&cells, 3, sh, sw, 1, fields.len());
    let png = dir.join(RECEPTIVE_PNG);
    crate::results::png::write_rgb_or_grey(&png, &planes, 3, gh, gw).map_err(Error::io(&png))?;
    let report = FieldReport {
        epochs: position.epochs_done,
        images: n,
        fields,
    };
    let json = serde_json::to_string_pretty(&report).expect("a report serialises");
    write_atomic(&dir.join(RECEPTIVE_JSON), json.as_bytes())?;
    Ok(report)
}

/// `pixel eval DIR --receptive-field`, printed.
pub fn print_receptive_field(dir: &Path, images: usize) -> Result<()> {
    let r = receptive_field(dir, images)?;
    println!(
        "receptive field after epoch {}, gradients over {} test images:",
        r.epochs, r.images
    );
    for f in &r.fields {
        println!(
            "  pixel ({}, {}): {} of {} earlier pixels with a nonzero gradient, 90 % of it in {}; \
             {} later pixels (a leak if not 0)",
            f.pixel[0],
            f.pixel[1],
            f.nonzero_earlier,
            f.earlier_pixels,
            f.pixels_for_90_percent,
            f.later_pixels
        );
    }
    println!(
        "wrote {} and {}",
        dir.join(RECEPTIVE_PNG).display(),
        dir.join(RECEPTIVE_JSON).display()
    );
    Ok(())
}
