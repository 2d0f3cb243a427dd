//! Autoregressive sampling in raster order, R -> G -> B within a pixel, and completion of images
//! whose first rows are given. Random draws come from the run's seeded generator on the host, so the
//! same seed gives the same samples on every backend (up to float differences in the logits).

use crate::data::Images;
use crate::loss::logistic;
use crate::model::{Cache, Context, Likelihood, Model};
use crate::progress::Progress;
use burn::tensor::{Device, Tensor, TensorData};
use rand::RngExt;
use rand::rngs::StdRng;

/// Draws one value from `softmax(logits / temperature)` by the Gumbel-max trick: the argmax of
/// `logits / temperature + g` with `g` standard Gumbel noise, one uniform draw per value.
///
/// Unlike inverting the CDF, where a rounding difference in any logit moves every later bin
/// edge, this draw changes only when the two best perturbed scores are within rounding of each
/// other: the cached and naive samplers, whose logits differ in the last bits, draw the same
/// values.
pub fn draw(logits: &[f32], temperature: f64, rng: &mut StdRng) -> u8 {
    let t = temperature.max(1e-6);
    let mut best = (f64::NEG_INFINITY, 0);
    for (v, &l) in logits.iter().enumerate() {
        // u in (0, 1): -ln(-ln u) is finite.
        let u = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let score = f64::from(l) / t - (-u.ln()).ln();
        if score > best.0 {
            best = (score, v);
        }
    }
    best.1 as u8
}

/// How `fill` computes what the model predicts at each pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Each layer computed at the new pixel only, from the activations kept for earlier pixels.
    /// PixelCNN++ has no cached sampler: it samples as [`Method::Naive`].
    Cached,
    /// One forward pass over the whole image per sub-pixel (per pixel for a logistic mixture):
    /// the reference the cached sampler is tested against, and what the seed did.
    Naive,
}

/// Fills rows `from_row..` of every image in `canvas` in raster order: with 256 logits, one
/// sub-pixel at a time, R -> G -> B within a pixel; with a logistic mixture, a pixel at a time
/// (the component by Gumbel-max, then each colour given the ones drawn, as
/// `loss::logistic::sample_pixel`). Both methods draw in the same order from `rng`, so they give
/// the same images for the same seed. Asks `stop` before each pixel, and returns false, the
/// canvas unfinished, when it says so.
#[allow(clippy::too_many_arguments)]
pub fn fill(
    model: &Model,
    canvas: &mut Images,
    from_row: usize,
    context: &Context,
    method: Method,
    temperature: f64,
    rng: &mut StdRng,
    device: &Device,
    (progress, stop): (&Progress, &dyn Fn() -> bool),
) -> bool {
    let (n, c, h, w) = (canvas.len(), canvas.colours, canvas.height, canvas.width);
    if n == 0 {
        return true;
    }
    let mut cache = match method {
        Method::Cached => model.cache(context, h, w),
        Method::Naive => None,
    };
    if let Some(cache) = &mut cache {
        for y in 0..from_row {
            cache.given_row(y, rows(canvas, y, 1, device));
        }
    }
    // PixelCNN++, which has no cache, sees rows 0..=y only: its prediction on row y does not
    // depend on the rows below, nor on the image's height (its stride-2 layers are aligned at
    // the top; a test checks), so that a pass costs (y + 1) / h of a full one.
    let crop = !model.has_cache();
    // What the model predicts at (y, x) given the canvas so far: `[n, outputs]`.
    let predict = |cache: &mut Option<Cache>, canvas: &Images, y: usize, x: usize| match cache {
        Some(cache) => cache.predict(y, x, rows(canvas, y, 1, device).narrow(3, x, 1)),
        None => {
            let visible = if crop { y + 1 } else { h };
            model
                .forward(rows(canvas, 0, visible, device), context)
                .at(y, x)
        }
    };
    let at = |i: usize, colour: usize, y: usize, x: usize| ((i * c + colour) * h + y) * w + x;
    for y in from_row..h {
        for x in 0..w {
            if stop() {
                return false;
            }
            match model.likelihood() {
                Likelihood::Categorical => {
                    for colour in 0..c {
                        let logits = predict(&mut cache, canvas, y, x).narrow(1, colour * 256, 256);
                        for (i, l) in to_vec(logits).chunks(256).enumerate() {
                            canvas.pixels[at(i, colour, y, x)] = draw(l, temperature, rng);
                        }
                    }
                }
                Likelihood::LogisticMixture { components } => {
                    let params = to_vec(predict(&mut cache, canvas, y, x));
                    for (i, p) in params.chunks(params.len() / n).enumerate() {
                        let values = logistic::sample_pixel(p, c, components, temperature, rng);
                        for (colour, v) in values.into_iter().enumerate() {
                            canvas.pixels[at(i, colour, y, x)] = v;
                        }
                    }
                }
            }
            if let Some(cache) = &mut cache {
                cache.commit(rows(canvas, y, 1, device).narrow(3, x, 1));
            }
            progress.advance(1);
        }
        if let Some(cache) = &mut cache {
            cache.end_row(y, rows(canvas, y, 1, device));
        }
    }
    true
}

fn to_vec<const D: usize>(logits: Tensor<D>) -> Vec<f32> {
    logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 logits")
}

/// Rows `top..top + count` of every image, `[n, c, count, w]`, bytes as floats.
fn rows(canvas: &Images, top: usize, count: usize, device: &Device) -> Tensor<4> {
    let shape = [canvas.len(), canvas.colours, count, canvas.width];
    Tensor::from_data(TensorData::new(window(canvas, top, count), shape), device)
}

/// Rows `top..top + rows` of every image, as floats `[n, c, rows, w]`.
fn window(canvas: &Images, top: usize, rows: usize) -> Vec<f32> {
    let (c, h, w) = (canvas.colours, canvas.height, canvas.width);
    let mut out = Vec::with_capacity(canvas.len() * c * rows * w);
    for i in 0..canvas.len() {
        for colour in 0..c {
            let start = ((i * c + colour) * h + top) * w;
            out.extend(
                canvas.pixels[start..start + rows * w]
                    .iter()
                    .map(|&p| f32::from(p)),
            );
        }
    }
    out
}

/// The seed's sample grid, `grid x grid` cells in row-major order: the top half is generated from
/// scratch, with label `q mod 10` in column `q` (what a class-conditional model is asked to draw;
/// other models ignore it); in the bottom half column `q` holds `grid / 2` completions of test image `q`, each
/// given the image's top half. Returns `[grid * grid, colours, h, w]` bytes.
pub fn grid(
    model: &Model,
    test: &Images,
    grid: usize,
    (method, temperature): (Method, f64),
    rng: &mut StdRng,
    device: &Device,
) -> Vec<u8> {
    grid_until(
        model,
        test,
        grid,
        (method, temperature),
        rng,
        device,
        &|| false,
    )
    .expect("never asked to stop")
}

/// [`grid`], or None as soon as `stop` says so (asked before each pixel).
pub fn grid_until(
    model: &Model,
    test: &Images,
    grid: usize,
    (method, temperature): (Method, f64),
    rng: &mut StdRng,
    device: &Device,
    stop: &dyn Fn() -> bool,
) -> Option<Vec<u8>> {
    let (c, h, w) = (test.colours, test.height, test.width);
    let half = grid / 2;
    let labels: Vec<u8> = (0..half * grid).map(|i| ((i % grid) % 10) as u8).collect();
    let progress = Progress::new("sample grid", ((h + h - h / 2) * w) as u64, "pixels");
    let scratch = from_scratch(
        model,
        &labels,
        (c, h, w),
        (method, temperature),
        rng,
        device,
        (&progress, stop),
    )?;

    // Completions, ordered as the grid's cells: row r of the bottom half, column q.
    let indices: Vec<usize> = (0..half * grid)
        .map(|cell| (cell % grid) % test.len())
        .collect();
    let (pixels, labels) = test.gather(&indices);
    let mut completions = Images {
        pixels,
        labels,
        colours: c,
        height: h,
        width: w,
    };
    let context = sampling_context(model, &completions, Latent::Posterior, rng, device);
    let finished = fill(
        model,
        &mut completions,
        h / 2,
        &context,
        method,
        temperature,
        rng,
        device,
        (&progress, stop),
    );
    progress.finish();
    if !finished {
        return None;
    }
    let mut cells = scratch;
    cells.extend(completions.pixels);
    Some(cells)
}

/// Images drawn from scratch, one per label (`[labels.len(), colours, height, width]` bytes): the
/// top half of a grid without the grid, for `pixel sample --count`. A PixelVAE draws z from the
/// prior. None as soon as `stop` says so.
pub fn from_scratch(
    model: &Model,
    labels: &[u8],
    (colours, height, width): (usize, usize, usize),
    (method, temperature): (Method, f64),
    rng: &mut StdRng,
    device: &Device,
    watch: (&Progress, &dyn Fn() -> bool),
) -> Option<Vec<u8>> {
    let mut canvas = Images {
        pixels: vec![0; labels.len() * colours * height * width],
        labels: labels.to_vec(),
        colours,
        height,
        width,
    };
    let context = sampling_context(model, &canvas, Latent::Prior, rng, device);
    fill(
        model,
        &mut canvas,
        0,
        &context,
        method,
        temperature,
        rng,
        device,
        watch,
    )
    .then_some(canvas.pixels)
}

/// Where a PixelVAE's latents come from when sampling.
#[derive(Clone, Copy, Debug)]
pub enum Latent {
    /// z ~ N(0, I).
    Prior,
    /// z ~ q(z|x) for the whole images (for completions too, so that z is inferred from the test
    /// image whose top half is given, as the paper does). A draw, not the mean: the decoder was
    /// trained on draws, and where the latent has collapsed (q(z|x) = N(0, I)) the mean, z = 0,
    /// is far from any z it saw and it decodes blank images.
    Posterior,
}

/// The labels of `images` and, for a PixelVAE, latents for them.
pub fn sampling_context(
    model: &Model,
    images: &Images,
    latent: Latent,
    rng: &mut StdRng,
    device: &Device,
) -> Context {
    let mut context = Context::from_labels(&images.labels, device);
    let (n, h, w) = (images.len(), images.height, images.width);
    let Some([lc, lh, lw]) = model.latent_shape(h, w) else {
        return context;
    };
    context.latent = Some(match latent {
        Latent::Prior => crate::model::vae::normal_tensor(rng, [n, lc, lh, lw], device),
        Latent::Posterior => {
            let x = rows(images, 0, h, device);
            let (mean, log_var) = model.encode(x).expect("a PixelVAE encodes");
            crate::model::vae::reparameterise(mean, log_var, rng)
        }
    });
    context
}

/// A PixelVAE's reconstruction grid, `grid x grid` cells: rows 1, 3, 5, ... hold test images
/// `0..grid * grid / 2` in order, and the row below each holds their reconstructions, decoded
/// pixel by pixel with z drawn from q(z|x) for the whole image. None for other models, and as
/// soon as `stop` says so.
pub fn reconstructions(
    model: &Model,
    test: &Images,
    grid: usize,
    (method, temperature): (Method, f64),
    rng: &mut StdRng,
    device: &Device,
    stop: &dyn Fn() -> bool,
) -> Option<Vec<u8>> {
    let (h, w, c) = (test.height, test.width, test.colours);
    model.latent_shape(h, w)?;
    let half = grid / 2;
    let indices: Vec<usize> = (0..half * grid).map(|i| i % test.len()).collect();
    let (pixels, labels) = test.gather(&indices);
    let originals = Images {
        pixels,
        labels,
        colours: c,
        height: h,
        width: w,
    };
    let context = sampling_context(model, &originals, Latent::Posterior, rng, device);
    let mut decoded = originals.clone();
    decoded.pixels.fill(0);
    let progress = Progress::new("reconstructions", (h * w) as u64, "pixels");
    let finished = fill(
        model,
        &mut decoded,
        0,
        &context,
        method,
        temperature,
        rng,
        device,
        (&progress, stop),
    );
    progress.finish();
    if !finished {
        return None;
    }
    let dims = c * h * w;
    let mut cells = Vec::with_capacity(grid * grid * dims);
    for pair in 0..half {
        let row = pair * grid * dims..(pair + 1) * grid * dims;
        cells.extend_from_slice(&originals.pixels[row.clone()]);
        cells.extend_from_slice(&decoded.pixels[row]);
    }
    Some(cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::device::Precision;
    use crate::model::{GatedConfig, ModelConfig, SimpleConfig};
    use rand::SeedableRng;

    fn gated(colours: usize, kernel: usize, classes: Option<usize>) -> GatedConfig {
        GatedConfig {
            classes,
            ..GatedConfig::plain(colours, 3, kernel, 3 * colours * 2)
        }
    }

    /// The cached sampler draws exactly the naive sampler's grid (scratch and completions) for
    /// the same seed, for every architecture and option.
    #[test]
    fn cached_sampler_draws_exactly_what_the_naive_one_draws() {
        let simple = |colours, kernel| {
            ModelConfig::Simple(SimpleConfig {
                colours,
                layers: 3,
                kernel,
                channels: 6,
                likelihood: crate::model::Likelihood::Categorical,
            })
        };
        let mut cases = vec![
            (simple(1, 3), Precision::F32),
            (simple(3, 5), Precision::F32),
            (ModelConfig::Gated(gated(1, 3, None)), Precision::F32),
            (ModelConfig::Gated(gated(3, 5, Some(10))), Precision::F32),
            (ModelConfig::Gated(gated(3, 3, Some(10))), Precision::Bf16),
            (ModelConfig::Gated(gated(3, 3, Some(10))), Precision::F16),
            (simple(3, 3), Precision::F16),
        ];
        // Grey with a logistic mixture: a pixel at a time from the mixture. In f32 only: a draw
        // rounds a continuous value to its bin, so that bf16's differences between the two
        // methods' parameters move a value at a bin edge by one level (the categorical's
        // Gumbel-max draw does not move).
        let mixture = crate::model::Likelihood::LogisticMixture { components: 3 };
        cases.push((
            ModelConfig::Gated(GatedConfig {
                likelihood: mixture,
                ..gated(1, 3, Some(10))
            }),
            Precision::F32,
        ));
        if let ModelConfig::Simple(c) = simple(1, 3) {
            cases.push((
                ModelConfig::Simple(SimpleConfig {
                    likelihood: mixture,
                    ..c
                }),
                Precision::F32,
            ));
        }
        for ablation in 0..3 {
            let mut cfg = gated(3, 3, None);
            match ablation {
                0 => cfg.residual = false,
                1 => cfg.gates = false,
                _ => cfg.link = false,
            }
            cases.push((ModelConfig::Gated(cfg), Precision::F32));
        }
        for mode in [
            crate::model::VaeConditioning::Gates,
            crate::model::VaeConditioning::Concat,
            crate::model::VaeConditioning::Linear,
        ] {
            let colours = if mode == crate::model::VaeConditioning::Concat {
                3
            } else {
                1
            };
            let mut decoder = gated(colours, 3, Some(10));
            decoder.spatial_channels = if mode == crate::model::VaeConditioning::Linear {
                2
            } else {
                3
            };
            decoder.concat = mode == crate::model::VaeConditioning::Concat;
            let vae = crate::model::VaeConfig {
                colours,
                latent_channels: 2,
                downsample: 1,
                hidden: 6,
                conditioning: mode,
                decoder,
            };
            cases.push((ModelConfig::Vae(vae), Precision::F32));
        }
        for device in crate::device::test_devices() {
            for (cfg, precision) in &cases {
                let spec = synthetic::Spec {
                    size: 7,
                    colours: cfg.colours(),
                    train_images: 16,
                };
                let test = synthetic::generate(&spec, 3).test;
                let model = cfg.init(5, &device).with_precision(*precision);
                let grid_of = |method| {
                    let mut rng = StdRng::seed_from_u64(11);
                    grid(&model, &test, 4, (method, 1.0), &mut rng, &device)
                };
                let (cached, naive) = (grid_of(Method::Cached), grid_of(Method::Naive));
                assert_eq!(cached, naive, "{cfg:?} {precision:?} on {device:?}");
                // Not a degenerate grid: the random model draws varied values.
                let distinct: std::collections::BTreeSet<u8> = cached.iter().copied().collect();
                assert!(distinct.len() > 50, "{cfg:?}: {distinct:?}");
            }
        }
    }

    /// Completions and reconstructions condition on a draw from q(z|x), not on its mean: the
    /// standardised latent (z - mean) / sd has unit variance and the draw follows the seed.
    #[test]
    fn posterior_latents_are_draws_from_q() {
        let device = burn::tensor::Device::flex();
        let mut decoder = gated(1, 3, None);
        decoder.spatial_channels = 3;
        let cfg = ModelConfig::Vae(crate::model::VaeConfig {
            colours: 1,
            latent_channels: 2,
            downsample: 1,
            hidden: 6,
            conditioning: crate::model::VaeConditioning::Gates,
            decoder,
        });
        let model = cfg.init(5, &device);
        let spec = synthetic::Spec {
            size: 8,
            colours: 1,
            train_images: 64,
        };
        let images = synthetic::generate(&spec, 3).train;
        let (mean, log_var) = model
            .encode(rows(&images, 0, 8, &device))
            .expect("a PixelVAE encodes");
        let latent = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            sampling_context(&model, &images, Latent::Posterior, &mut rng, &device)
                .latent
                .expect("a latent")
        };
        let z = latent(1);
        let standard: Vec<f32> = ((z.clone() - mean) / (log_var * 0.5).exp())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let n = standard.len() as f64;
        let m = standard.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = standard
            .iter()
            .map(|&v| (f64::from(v) - m).powi(2))
            .sum::<f64>()
            / n;
        // 64 * 2 * 4 * 4 = 2048 draws: the sample variance is within 0.1 of 1 by a wide margin.
        assert!(
            m.abs() < 0.1 && (var - 1.0).abs() < 0.15,
            "mean {m}, variance {var}"
        );
        let same: Vec<f32> = latent(1).into_data().try_to_vec::<f32>().unwrap();
        let other: Vec<f32> = latent(2).into_data().try_to_vec::<f32>().unwrap();
        let z: Vec<f32> = z.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(z, same);
        assert_ne!(z, other);
    }

    /// PixelCNN++'s prediction on row y from rows 0..=y only is its prediction from the whole
    /// image (what its sampler relies on), for even and odd heights, grey and RGB.
    #[test]
    fn pixelcnnpp_rows_do_not_depend_on_the_rows_below() {
        use crate::model::{Likelihood, PixelCnnPpConfig};
        let device = burn::tensor::Device::flex();
        for (colours, h, likelihood) in [
            (1, 7, Likelihood::LogisticMixture { components: 2 }),
            (3, 8, Likelihood::LogisticMixture { components: 2 }),
            (3, 6, Likelihood::Categorical),
        ] {
            let cfg = ModelConfig::PixelCnnPp(PixelCnnPpConfig {
                colours,
                filters: 6,
                resnets: 1,
                likelihood,
                classes: None,
                dropout: 0.5,
            });
            let model = cfg.init(4, &device);
            let spec = synthetic::Spec {
                size: h,
                colours,
                train_images: 8,
            };
            let test = synthetic::generate(&spec, 2).test;
            let context = Context::from_labels(&test.labels, &device);
            let full = model.forward(rows(&test, 0, h, &device), &context);
            for y in 0..h {
                let top = model.forward(rows(&test, 0, y + 1, &device), &context);
                for x in [0, h / 2, h - 1] {
                    let diff: f32 = (top.clone().at(y, x) - full.clone().at(y, x))
                        .abs()
                        .max()
                        .into_scalar();
                    assert!(
                        diff < 1e-5,
                        "{colours} colours, {h} rows, ({y}, {x}): {diff}"
                    );
                }
            }
        }
    }

    /// Logits from the cache match a full forward pass at every sub-pixel of a given image.
    #[test]
    fn cached_logits_match_the_forward_pass() {
        let device = burn::tensor::Device::flex();
        for cfg in [
            ModelConfig::Gated(gated(3, 5, Some(10))),
            ModelConfig::Gated(gated(1, 3, None)),
            ModelConfig::Simple(SimpleConfig {
                colours: 3,
                layers: 2,
                kernel: 3,
                channels: 6,
                likelihood: crate::model::Likelihood::Categorical,
            }),
            ModelConfig::Simple(SimpleConfig {
                colours: 1,
                layers: 3,
                kernel: 3,
                channels: 6,
                likelihood: crate::model::Likelihood::Categorical,
            }),
        ] {
            let spec = synthetic::Spec {
                size: 6,
                colours: cfg.colours(),
                train_images: 8,
            };
            let test = synthetic::generate(&spec, 1).test;
            let model = cfg.init(9, &device);
            let (n, c, h, w) = (test.len(), cfg.colours(), 6, 6);
            let context = Context::from_labels(&test.labels, &device);
            let full = model.forward(rows(&test, 0, h, &device), &context).values(); // [n, c, 256, h, w]
            let mut cache = model.cache(&context, h, w).expect("a cached sampler");
            for y in 0..h {
                for x in 0..w {
                    let pixel = rows(&test, y, 1, &device).narrow(3, x, 1); // [n, c, 1, 1]
                    for colour in 0..c {
                        // As in sampling: this sub-pixel and the later ones are not drawn yet.
                        let keep = (0..c).map(|k| f32::from(u8::from(k < colour))).collect();
                        let keep =
                            Tensor::<4>::from_data(TensorData::new(keep, [1, c, 1, 1]), &device);
                        let got = cache
                            .predict(y, x, pixel.clone() * keep)
                            .reshape([n, c, 256])
                            .narrow(1, colour, 1);
                        let want = full
                            .clone()
                            .slice([0..n, colour..colour + 1, 0..256, y..y + 1, x..x + 1])
                            .reshape([n, 1, 256]);
                        let diff: f32 = (got - want).abs().max().into_scalar();
                        assert!(diff < 1e-5, "{cfg:?} at ({y}, {x}, {colour}): {diff}");
                    }
                    cache.commit(pixel);
                }
                cache.end_row(y, rows(&test, y, 1, &device));
            }
        }
    }

    #[test]
    fn draw_follows_the_distribution_and_temperature() {
        let mut rng = StdRng::seed_from_u64(0);
        let mut logits = vec![f32::NEG_INFINITY; 256];
        logits[3] = 0.0;
        logits[200] = (3.0f32).ln(); // p = 0.75
        let n = 4000;
        let hits = (0..n)
            .filter(|_| draw(&logits, 1.0, &mut rng) == 200)
            .count();
        let p = hits as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.03, "{p}");
        // Very low temperature: always the mode.
        assert!((0..100).all(|_| draw(&logits, 1e-3, &mut rng) == 200));
    }
}
