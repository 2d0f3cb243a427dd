//! The context a trained model uses: the gradient of the log-likelihood of one pixel's true value
//! with respect to every input pixel, over a few test images. The causality tests prove which
//! pixels a model *can* see at initialisation; this measures which ones a trained model's
//! predictions actually depend on, and checks on the trained weights that none is later.

use crate::data::Images;
use crate::loss::log_prob_per_pixel;
use crate::model::{Context, Model, vae};
use crate::progress::Progress;
use crate::rng::{self, Purpose};
use burn::tensor::Device;

/// The receptive field of one pixel.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Field {
    /// The pixel whose log-likelihood is differentiated, `[y, x]`.
    pub pixel: [usize; 2],
    /// Pixels before it in raster order: what a causal model may see.
    pub earlier_pixels: usize,
    /// Earlier pixels with a nonzero gradient in at least one image.
    pub nonzero_earlier: usize,
    /// The fewest earlier pixels that hold 90 % of the summed absolute gradient: how local the
    /// context is that the model leans on.
    pub pixels_for_90_percent: usize,
    /// Sub-pixels of the pixel itself with a nonzero gradient: for RGB with 256 logits per
    /// colour, green's and blue's likelihoods depend on the pixel's red (and blue's on green), as
    /// they should; 0 for a logistic mixture.
    pub own_subpixels: usize,
    /// Later pixels with a nonzero gradient: a leak, 0 for a causal model.
    pub later_pixels: usize,
    /// Mean over the images of |d log p(pixel) / d input| summed over colours, `h * w` values in
    /// raster order (not serialised: drawn as a PNG).
    #[serde(skip)]
    pub map: Vec<f64>,
}

/// Default pixels: the centre, one left of centre in the lower half, and the last pixel.
pub fn default_pixels(height: usize, width: usize) -> Vec<[usize; 2]> {
    let mut pixels = vec![
        [height / 2, width / 2],
        [(3 * height) / 4, width / 4],
        [height - 1, width - 1],
    ];
    pixels.dedup();
    pixels
}

/// The receptive field at each of `pixels` over `images` (one batch): the gradient of each
/// image's log-likelihood at the pixel with respect to its own input. A PixelVAE decodes from a
/// draw of q(z|x) held fixed (its encoder sees the whole image by design). `device` must be an
/// autodiff device and `model` live on it; dropout stays off. A gradient that is not finite is
/// an error naming the pixel, never counted as a dependency (a NaN is not a leak).
pub fn receptive_fields(
    model: &Model,
    images: &Images,
    pixels: &[[usize; 2]],
    seed: u64,
    device: &Device,
) -> Result<Vec<Field>, String> {
    let (n, c, h, w) = (images.len(), images.colours, images.height, images.width);
    let all: Vec<usize> = (0..n).collect();
    let batch = super::Batch::gather(images, &all, device);
    let mut context = Context {
        dropout: None,
        ..batch.context.clone()
    };
    if let Some((mean, log_var)) = model.encode(batch.input.clone()) {
        let mut rng = rng::stream(seed, Purpose::EvalNoise, 1, 0);
        let eps = vae::normal_tensor(&mut rng, mean.dims(), device);
        let z = mean + (log_var * 0.5).exp() * eps;
        context.latent = Some(z.detach());
    }
    let progress = Progress::new("receptive field", pixels.len() as u64, "pixels");
    let fields = pixels
        .iter()
        .map(|&[y, x]| {
            let input = batch.input.clone().detach().require_grad();
            let log_p =
                log_prob_per_pixel(model.forward(input.clone(), &context), batch.target.clone());
            let picked = log_p.narrow(1, y, 1).narrow(2, x, 1).sum();
            let grads = picked.backward();
            let g: Vec<f32> = input
                .grad(&grads)
                .map(|g| g.into_data().convert::<f32>().try_into_vec().expect("f32"))
                .unwrap_or_else(|| vec![0.0; n * c * h * w]);
            progress.advance(1);
            field([y, x], &g, (n, c, h, w))
        })
        .collect();
    progress.finish();
    fields
}

/// Sums a gradient `[n, c, h, w]` into one pixel's field; an error when a value is not finite.
fn field(
    pixel: [usize; 2],
    g: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Result<Field, String> {
    if let Some(bad) = g.iter().position(|v| !v.is_finite()) {
        let (image, rest) = (bad / (c * h * w), bad % (c * h * w));
        let (colour, p) = (rest / (h * w), rest % (h * w));
        return Err(format!(
            "the gradient of the log-likelihood at pixel ({}, {}) is {} with respect to colour \
             {colour} of pixel ({}, {}) of test image {image}: the model's likelihood or weights \
             are not finite there, so no receptive field can be measured",
            pixel[0],
            pixel[1],
            g[bad],
            p / w,
            p % w
        ));
    }
    let at = pixel[0] * w + pixel[1];
    let mut map = vec![0.0f64; h * w];
    let mut nonzero = vec![false; h * w];
    let mut own = vec![false; c];
    for i in 0..n {
        for colour in 0..c {
            for p in 0..h * w {
                let v = g[(i * c + colour) * h * w + p];
                map[p] += f64::from(v.abs()) / n as f64;
                if v != 0.0 {
                    nonzero[p] = true;
                    if p == at {
                        own[colour] = true;
                    }
                }
            }
        }
    }
    let mut earlier: Vec<f64> = map[..at].to_vec();
    earlier.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = earlier.iter().sum();
    let mut sum = 0.0;
    let mut for_90 = 0;
    for v in &earlier {
        if total <= 0.0 || sum >= 0.9 * total {
            break;
        }
        sum += v;
        for_90 += 1;
    }
    Ok(Field {
        pixel,
        earlier_pixels: at,
        nonzero_earlier: nonzero[..at].iter().filter(|&&b| b).count(),
        pixels_for_90_percent: for_90,
        own_subpixels: own.iter().filter(|&&b| b).count(),
        later_pixels: nonzero[at + 1..].iter().filter(|&&b| b).count(),
        map,
    })
}

/// The map as an 8-bit grey image, `h * w` bytes: the square root of |gradient| scaled so that
/// the largest earlier value is white (a square root so that weak but nonzero context stays
/// visible); the pixel itself is drawn mid-grey.
pub fn heat_map(field: &Field) -> Vec<u8> {
    let at = field.earlier_pixels;
    let peak = field.map[..at]
        .iter()
        .copied()
        .fold(0.0f64, f64::max)
        .sqrt();
    field
        .map
        .iter()
        .enumerate()
        .map(|(p, &v)| {
            if p == at {
                128
            } else if peak > 0.0 {
                ((v.sqrt() / peak).min(1.0) * 255.0).round() as u8
            } else {
                0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts from a hand-made gradient: two images, two colours, a 2 x 3 image, pixel (1, 1).
    #[test]
    fn counts_and_the_90_percent_set() {
        let (n, c, h, w) = (2, 2, 2, 3);
        let mut g = vec![0.0f32; n * c * h * w];
        // Image 0, colour 0: pixel 0 strongly, pixel 2 weakly; image 1, colour 1: pixel 3.
        g[0] = 9.0;
        g[2] = 0.5;
        g[(c + 1) * h * w + 3] = -1.0;
        // Own pixel (4), colour 1 of image 0; a later pixel (5), colour 0 of image 1.
        g[h * w + 4] = 0.25;
        g[c * h * w + 5] = 0.1;
        let f = field([1, 1], &g, (n, c, h, w)).unwrap();
        assert_eq!(f.earlier_pixels, 4);
        assert_eq!(f.nonzero_earlier, 3);
        assert_eq!(f.own_subpixels, 1);
        assert_eq!(f.later_pixels, 1);
        // Means over images: 4.5, 0, 0.25, 0.5 -> 4.5 alone is 86 % of 5.25; with 0.5, 95 %.
        assert_eq!(f.pixels_for_90_percent, 2);
        assert!((f.map[0] - 4.5).abs() < 1e-12);
        let heat = heat_map(&f);
        assert_eq!((heat[0], heat[1], heat[4]), (255, 0, 128));
    }

    /// A NaN or an infinity in the gradient, earlier or later than the pixel, is an error that
    /// names where it is, never a dependency or a leak.
    #[test]
    fn a_gradient_that_is_not_finite_is_an_error_not_a_leak() {
        let (n, c, h, w) = (2, 1, 2, 3);
        for (at, value) in [
            (5, f32::NAN),
            (0, f32::INFINITY),
            (c * h * w + 4, f32::NEG_INFINITY),
        ] {
            let mut g = vec![0.5f32; n * c * h * w];
            g[at] = value;
            let err = field([1, 1], &g, (n, c, h, w)).unwrap_err();
            assert!(
                err.contains("is not finite") || err.contains("are not finite"),
                "{err}"
            );
            assert!(err.contains(&format!("{value}")), "{err}");
        }
    }
}
