//! The discretized mixture of logistics (Salimans et al. 2017, PixelCNN++; openai/pixel-cnn's
//! `discretized_mix_logistic_loss` and `sample_from_discretized_mix_logistic`): per pixel, K
//! logistic components over [-1, 1], each value 0..255 a bin of width 2/255, the ends open; for RGB
//! the green and blue means shift linearly with the earlier colours of the same pixel.
//!
//! Parameters per pixel, channels first (`[batch, K + colours * 3K, h, w]`, grey: `[batch, 3K, h, w]`):
//! K mixture logits, then per colour K means, K raw log-scales and (RGB) K raw coefficients. The
//! coefficients of colour 0 move green by red, of colour 1 blue by red, of colour 2 blue by green.

use crate::model::native;
use burn::tensor::activation::{log_softmax, sigmoid, softplus};
use burn::tensor::{Int, Tensor};
use rand::RngExt;
use rand::rngs::StdRng;

/// Log-scales are floored here (as in openai/pixel-cnn) so that a bin never has all the mass of a
/// component whose scale collapsed.
pub const MIN_LOG_SCALE: f64 = -7.0;

/// Parameters per pixel for `colours` colours and `components` components.
pub fn channels(colours: usize, components: usize) -> usize {
    if colours == 1 {
        3 * components
    } else {
        components + colours * 3 * components
    }
}

/// Bytes 0..255 as the model's [-1, 1] (bin centres at (2v - 255) / 255).
pub fn scale(bytes: Tensor<4>) -> Tensor<4> {
    (bytes - 127.5) / 127.5
}

/// The log-probability of each pixel's value, `[batch, h, w]`, in f32.
///
/// # Shapes
/// - params: `[batch, channels(colours, k), h, w]`
/// - targets: `[batch, colours, h, w]`, values 0..255
pub fn log_prob(params: Tensor<4>, targets: Tensor<4, Int>, k: usize) -> Tensor<3> {
    let [b, _, h, w] = params.dims();
    let colours = targets.dims()[1];
    let x = scale(targets.float()); // [b, colours, h, w]
    let logits = params.clone().narrow(1, 0, k); // [b, k, h, w]
    let per_colour = if colours == 1 { 2 * k } else { 3 * k };
    let block = |c: usize, j: usize| params.clone().narrow(1, k + c * per_colour + j * k, k);
    let colour = |c: usize| x.clone().narrow(1, c, 1); // [b, 1, h, w], broadcast over k
    let mut total = log_softmax(logits, 1); // [b, k, h, w]
    for c in 0..colours {
        let mut mean = block(c, 0);
        let log_s = block(c, 1).clamp_min(MIN_LOG_SCALE);
        if colours == 3 && c > 0 {
            let coef = |i: usize| block(i, 2).tanh();
            mean = match c {
                1 => mean + coef(0) * colour(0),
                _ => mean + coef(1) * colour(0) + coef(2) * colour(1),
            };
        }
        total = total + log_prob_colour(colour(c), mean, log_s);
    }
    // logsumexp over the components
    let max = total.clone().max_dim(1); // [b, 1, h, w]
    let lse = (total - max.clone()).exp().sum_dim(1).log() + max;
    lse.reshape([b, h, w])
}

/// log P(value | component) of one colour for every component, the value `x` on [-1, 1].
///
/// # Shapes
/// - x: `[b, 1, h, w]`; mean, log_s: `[b, k, h, w]`; returns `[b, k, h, w]`
fn log_prob_colour(x: Tensor<4>, mean: Tensor<4>, log_s: Tensor<4>) -> Tensor<4> {
    let d = x.clone() - mean; // broadcast over k
    let inv_s = log_s.clone().neg().exp();
    let plus = inv_s.clone() * (d.clone() + 1.0 / 255.0);
    let minus = inv_s.clone() * (d.clone() - 1.0 / 255.0);
    let log_cdf_plus = plus.clone() - softplus(plus.clone(), 1.0); // log sigmoid(plus): x = 0
    let log_one_minus_cdf_minus = softplus(minus.clone(), 1.0).neg(); // x = 255
    let mid = inv_s * d;
    // The bin's mass as a difference of two sigmoids on the side of the mean where they are small:
    // right of it both are near 1 and f32 would keep only a few digits of their difference
    // (openai/pixel-cnn's f32 formula loses them there). Equal in exact arithmetic.
    let cdf_delta = (sigmoid(plus.clone()) - sigmoid(minus.clone())).mask_where(
        mid.clone().greater_elem(0.0),
        sigmoid(minus.clone().neg()) - sigmoid(plus.clone().neg()),
    );
    let log_pdf_mid = mid.clone() - log_s - softplus(mid, 1.0) * 2.0;
    let interior = cdf_delta
        .clone()
        .clamp_min(1e-12)
        .log()
        .mask_where(cdf_delta.lower_elem(1e-5), log_pdf_mid - 127.5f64.ln());
    let x = x.expand(interior.dims());
    interior
        .mask_where(x.clone().greater_elem(0.999), log_one_minus_cdf_minus)
        .mask_where(x.lower_elem(-0.999), log_cdf_plus)
}

/// Total negative log-likelihood in nats over the batch, as `loss::nll_nats` for the categorical.
/// On libtorch it is one operation, forward and backward in libtorch (`native::logistic_nll`).
pub fn nll_nats(params: Tensor<4>, targets: Tensor<4, Int>, k: usize) -> Tensor<1> {
    if native::runs_fused(&params.device()) {
        return native::logistic_nll(params, targets, k, MIN_LOG_SCALE);
    }
    log_prob(params, targets, k).sum().neg()
}

/// Draws one pixel from its parameters (`channels(colours, k)` values) as openai/pixel-cnn samples:
/// the component by Gumbel-max over logits / temperature, then each colour in order, its mean
/// shifted by the colours already drawn, a logistic draw at scale * temperature, clipped to [-1, 1]
/// and rounded to the nearest of the 256 values.
pub fn sample_pixel(
    params: &[f32],
    colours: usize,
    k: usize,
    temperature: f64,
    rng: &mut StdRng,
) -> Vec<u8> {
    let t = temperature.max(1e-6);
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, &l) in params[..k].iter().enumerate() {
        let u = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let score = f64::from(l) / t - (-u.ln()).ln();
        if score > best.0 {
            best = (score, i);
        }
    }
    let j = best.1;
    let per_colour = if colours == 1 { 2 * k } else { 3 * k };
    let at = |c: usize, block: usize| f64::from(params[k + c * per_colour + block * k + j]);
    let mut drawn: Vec<f64> = Vec::with_capacity(colours);
    for c in 0..colours {
        let mut mean = at(c, 0);
        if colours == 3 {
            mean += match c {
                1 => at(0, 2).tanh() * drawn[0],
                2 => at(1, 2).tanh() * drawn[0] + at(2, 2).tanh() * drawn[1],
                _ => 0.0,
            };
        }
        let s = at(c, 1).max(MIN_LOG_SCALE).exp() * t;
        let u: f64 = rng.random_range(1e-5..1.0 - 1e-5);
        drawn.push((mean + s * (u.ln() - (1.0 - u).ln())).clamp(-1.0, 1.0));
    }
    drawn
        .iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};
    use rand::SeedableRng;

    /// The PixelCNN++ network outputs exactly the parameters this likelihood reads.
    #[test]
    fn the_network_outputs_this_layout() {
        for (colours, k) in [(1, 1), (1, 5), (3, 1), (3, 10)] {
            let cfg = crate::model::pixelcnnpp::PixelCnnPpConfig {
                colours,
                filters: 4,
                resnets: 1,
                likelihood: crate::model::Likelihood::LogisticMixture { components: k },
                classes: None,
                dropout: 0.0,
            };
            assert_eq!(cfg.output_channels(), channels(colours, k));
        }
    }

    /// `n` copies of one pixel's parameters, `[n, len, 1, 1]`.
    fn repeated(params: &[f32], n: usize, device: &Device) -> Tensor<4> {
        let v: Vec<f32> = (0..n).flat_map(|_| params.iter().copied()).collect();
        Tensor::from_data(TensorData::new(v, [n, params.len(), 1, 1]), device)
    }

    fn probabilities(params: &[f32], targets: Vec<i64>, colours: usize, k: usize) -> Vec<f64> {
        log_probabilities(params, targets, colours, k)
            .iter()
            .map(|l| l.exp())
            .collect()
    }

    fn log_probabilities(params: &[f32], targets: Vec<i64>, colours: usize, k: usize) -> Vec<f64> {
        let device = Device::flex();
        let n = targets.len() / colours;
        let t = Tensor::<4, Int>::from_data(TensorData::new(targets, [n, colours, 1, 1]), &device);
        let lp: Vec<f32> = log_prob(repeated(params, n, &device), t, k)
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        lp.iter().map(|&l| f64::from(l)).collect()
    }

    fn random_params(rng: &mut StdRng, colours: usize, k: usize) -> Vec<f32> {
        (0..channels(colours, k))
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect()
    }

    /// Grey, for random parameters and at the extremes (a mean at an edge, the smallest scale, a
    /// wide one): the 256 values' probabilities sum to 1.
    #[test]
    fn the_256_probabilities_of_a_grey_pixel_sum_to_one() {
        let mut rng = StdRng::seed_from_u64(1);
        let k = 3;
        let mut cases: Vec<Vec<f32>> = (0..5).map(|_| random_params(&mut rng, 1, k)).collect();
        // logits, means, log-scales
        cases.push(vec![0.0, 1.0, -1.0, 0.999, -0.999, 0.0, -7.0, -9.0, 3.0]);
        for params in cases {
            let p = probabilities(&params, (0..256).collect(), 1, k);
            let sum: f64 = p.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{sum} for {params:?}");
        }
    }

    /// RGB, with the coupling: for each red value, the probabilities of all 65536 (green, blue)
    /// pairs sum to the probability of that red alone (the grey mixture of red's parameters), so
    /// the 256^3 values sum to 1.
    #[test]
    fn rgb_probabilities_sum_to_the_marginal_of_the_earlier_colour() {
        let mut rng = StdRng::seed_from_u64(2);
        let k = 2;
        let params = random_params(&mut rng, 3, k);
        let red: Vec<f32> = params[..k]
            .iter()
            .chain(&params[k..3 * k]) // red's means and log-scales
            .copied()
            .collect();
        let red_marginal = probabilities(&red, (0..256).collect(), 1, k);
        for r in [0i64, 37, 128, 255] {
            let targets: Vec<i64> = (0..65536).flat_map(|gb| [r, gb / 256, gb % 256]).collect();
            let sum: f64 = probabilities(&params, targets, 3, k).iter().sum();
            let want = red_marginal[r as usize];
            assert!(
                (sum - want).abs() < 1e-5 * want.max(1e-3),
                "red {r}: {sum} vs {want}"
            );
        }
    }

    /// The formula evaluated directly, in f64, for one grey component.
    fn reference(byte: u8, mean: f64, log_s: f64) -> f64 {
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let softplus = |z: f64| if z > 30.0 { z } else { z.exp().ln_1p() };
        let x = (f64::from(byte) - 127.5) / 127.5;
        let log_s = log_s.max(MIN_LOG_SCALE);
        let inv = (-log_s).exp();
        let (plus, minus) = (
            inv * (x - mean + 1.0 / 255.0),
            inv * (x - mean - 1.0 / 255.0),
        );
        if byte == 0 {
            return plus - softplus(plus);
        }
        if byte == 255 {
            return -softplus(minus);
        }
        let delta = sig(plus) - sig(minus);
        if delta > 1e-5 {
            delta.ln()
        } else {
            let mid = inv * (x - mean);
            mid - log_s - 2.0 * softplus(mid) - 127.5f64.ln()
        }
    }

    /// openai/pixel-cnn's `discretized_mix_logistic_loss` for one pixel, transcribed in f64 from
    /// its TensorFlow (NHWC, the channel order is the same as here): `l[:nr_mix]` the logits, the
    /// rest reshaped to `[3, 3 * nr_mix]`: per colour the means, log-scales and coefficients;
    /// `m2 = means[1] + coeffs[0] * x[0]`, `m3 = means[2] + coeffs[1] * x[0] + coeffs[2] * x[1]`;
    /// the colours' log-probabilities summed per component, plus the log-softmax of the logits,
    /// log-sum-exp over the components.
    fn openai_log_prob(l: &[f64], bytes: &[u8], k: usize) -> f64 {
        let lse = |v: &[f64]| {
            let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|a| (a - m).exp()).sum::<f64>().ln()
        };
        let logits = &l[..k];
        let norm = lse(logits);
        let x: Vec<f64> = bytes
            .iter()
            .map(|&b| (f64::from(b) - 127.5) / 127.5)
            .collect();
        let colours = bytes.len();
        let per_colour = if colours == 1 { 2 * k } else { 3 * k };
        let at = |c: usize, block: usize, j: usize| l[k + c * per_colour + block * k + j];
        let totals: Vec<f64> = (0..k)
            .map(|j| {
                let mut total = logits[j] - norm;
                for (c, &byte) in bytes.iter().enumerate() {
                    let mean = match c {
                        0 => at(0, 0, j),
                        1 => at(1, 0, j) + at(0, 2, j).tanh() * x[0],
                        _ => at(2, 0, j) + at(1, 2, j).tanh() * x[0] + at(2, 2, j).tanh() * x[1],
                    };
                    total += reference(byte, mean, at(c, 1, j));
                }
                total
            })
            .collect();
        lse(&totals)
    }

    /// Random pixels: parameters in the ranges a trained network outputs, values from every class
    /// (0, 255, interior, the interior next to each end).
    fn random_pixels(
        rng: &mut StdRng,
        n: usize,
        colours: usize,
        k: usize,
    ) -> Vec<(Vec<f32>, Vec<u8>)> {
        (0..n)
            .map(|_| {
                let mut params = random_params(rng, colours, k);
                let per_colour = if colours == 1 { 2 * k } else { 3 * k };
                for c in 0..colours {
                    for j in 0..k {
                        // log-scales on [-4, 0]: sharp components whose bins do not underflow
                        params[k + c * per_colour + k + j] = rng.random_range(-4.0f32..0.0);
                    }
                }
                let bytes = (0..colours)
                    .map(|_| [0u8, 255, 1, 254, rng.random_range(0..=255)][rng.random_range(0..5)])
                    .collect();
                (params, bytes)
            })
            .collect()
    }

    /// The log-likelihood and its gradient with respect to every parameter, on flex's autodiff.
    fn with_gradient(params: &[f32], bytes: &[u8], k: usize) -> (f64, Vec<f64>) {
        let device = Device::flex().autodiff();
        let colours = bytes.len();
        let targets = bytes.iter().map(|&b| i64::from(b)).collect::<Vec<_>>();
        let t = Tensor::<4, Int>::from_data(TensorData::new(targets, [1, colours, 1, 1]), &device);
        let p = repeated(params, 1, &device).require_grad();
        let lp = log_prob(p.clone(), t, k).sum();
        let value = f64::from(lp.clone().into_scalar::<f32>());
        let grads = lp.backward();
        let g: Vec<f32> = p
            .grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap();
        (value, g.iter().map(|&v| f64::from(v)).collect())
    }

    /// The likelihood is openai/pixel-cnn's, grey and RGB, with several components: its value, and
    /// its gradient with respect to every parameter (logits, means, log-scales and the coefficients
    /// that move green by red and blue by red and green) against central differences of the
    /// transcription. The coefficients' gradients are there: green's follows red wherever green's
    /// bin is not saturated.
    #[test]
    fn the_likelihood_and_its_gradient_are_openais_formula() {
        let mut rng = StdRng::seed_from_u64(7);
        for (colours, k) in [(1, 3), (3, 1), (3, 3)] {
            let mut coefficient_gradient = 0.0f64;
            for (params, bytes) in random_pixels(&mut rng, 40, colours, k) {
                let l: Vec<f64> = params.iter().map(|&v| f64::from(v)).collect();
                let want = openai_log_prob(&l, &bytes, k);
                let (got, grad) = with_gradient(&params, &bytes, k);
                let what = format!("{colours} colours, K={k}, values {bytes:?}, params {params:?}");
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{what}: {got} vs {want}"
                );
                for (i, g) in grad.iter().enumerate() {
                    let h = 1e-5;
                    let (mut up, mut down) = (l.clone(), l.clone());
                    up[i] += h;
                    down[i] -= h;
                    let fd = (openai_log_prob(&up, &bytes, k) - openai_log_prob(&down, &bytes, k))
                        / (2.0 * h);
                    assert!(
                        (g - fd).abs() < 2e-3 * fd.abs().max(1.0),
                        "{what}: d/d param {i} = {g}, central difference {fd}"
                    );
                }
                if colours == 3 {
                    // green's coefficients: the third block of colour 0
                    coefficient_gradient += grad[k + 2 * k..k + 3 * k]
                        .iter()
                        .map(|g| g.abs())
                        .sum::<f64>();
                }
            }
            assert!(
                colours == 1 || coefficient_gradient > 1.0,
                "{colours}, {k}: {coefficient_gradient}"
            );
        }
    }

    /// Why near-binary data can stall the mixture (see docs/models.md): a component whose scale
    /// grows puts half its mass on each open end, 0 and 255, whatever its mean, and the gradients
    /// that would move its mean or shrink its scale fall like 1/scale. A colour that only takes
    /// the two end values is then a coin flip that costs 1 bit and barely learns.
    #[test]
    fn a_wide_component_is_a_coin_between_the_ends_with_vanishing_gradients() {
        for log_s in [2.0f32, 5.0, 10.0] {
            let s = f64::from(log_s).exp();
            for mean in [-0.5f32, 0.0, 0.5] {
                let params = [0.0, mean, log_s];
                for byte in [0u8, 255] {
                    let (lp, grad) = with_gradient(&params, &[byte], 1);
                    assert!(
                        (lp.exp() - 0.5).abs() < 1.0 / s,
                        "{log_s} {mean} {byte}: {lp}"
                    );
                    assert!(
                        grad[1].abs() < 1.0 / s && grad[2].abs() < 1.0 / s,
                        "{log_s} {mean} {byte}: {grad:?}"
                    );
                }
            }
        }
    }

    /// The loss equals the formula at hand-picked values: both edges, the middle, a bin whose mass
    /// underflows (far from a sharp component), and a log-scale below the floor.
    #[test]
    fn the_loss_is_the_formula_at_edges_middle_and_underflow() {
        for (byte, mean, log_s) in [
            (0u8, -0.9, -2.0),
            (255, 0.95, -3.0),
            (128, 0.0, -1.0),
            (10, 0.9, -7.0),   // cdf_delta ~ 0: the density branch
            (200, 0.2, -12.0), // floored to -7, and underflows too
            (64, -0.5, 1.0),
        ] {
            let params = [0.0, mean as f32, log_s as f32];
            let got = log_probabilities(&params, vec![i64::from(byte)], 1, 1)[0];
            let want = reference(byte, mean, log_s);
            assert!(
                (got - want).abs() < 1e-3 * want.abs().max(1.0),
                "{byte}: {got} vs {want}"
            );
        }
        assert!(
            reference(10, 0.9, -7.0) < -100.0,
            "the underflow case is one"
        );
    }

    /// Every parameter at an extreme (+-100, +-1e4 and mixed: logits, means, log-scales and
    /// coefficients), grey and RGB, every target value class (0, 255, interior): the
    /// log-likelihood and its gradient are finite on every backend.
    #[test]
    fn the_likelihood_is_finite_with_finite_gradients_at_the_extremes() {
        let mut rng = StdRng::seed_from_u64(4);
        for device in crate::device::test_devices() {
            let device = device.autodiff();
            for (colours, k) in [(1, 2), (3, 2)] {
                let n = channels(colours, k);
                let mut cases: Vec<Vec<f32>> = [100.0f32, -100.0, 1e4, -1e4]
                    .iter()
                    .map(|&v| vec![v; n])
                    .collect();
                for _ in 0..8 {
                    let extremes = [100.0f32, -100.0, 1e4, -1e4, 0.0, 30.0, -30.0];
                    cases.push((0..n).map(|_| extremes[rng.random_range(0..7)]).collect());
                }
                for params in cases {
                    let targets: Vec<i64> = [0i64, 255, 128]
                        .iter()
                        .flat_map(|&t| std::iter::repeat_n(t, colours))
                        .collect();
                    let t = Tensor::<4, Int>::from_data(
                        TensorData::new(targets, [3, colours, 1, 1]),
                        &device,
                    );
                    let p = repeated(&params, 3, &device).require_grad();
                    let lp = log_prob(p.clone(), t, k);
                    let values: Vec<f32> = lp
                        .clone()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec()
                        .unwrap();
                    let grads = lp.sum().backward();
                    let g: Vec<f32> = p
                        .grad(&grads)
                        .unwrap()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec()
                        .unwrap();
                    assert!(
                        values.iter().all(|v| v.is_finite() && *v <= 1e-6),
                        "{params:?}: {values:?}"
                    );
                    assert!(
                        g.iter().all(|v| v.is_finite()),
                        "{params:?}: gradient {g:?}"
                    );
                }
            }
        }
    }

    /// `nll_nats` (one libtorch operation on libtorch) against `log_prob`, which defines it: the
    /// value and the gradient of every parameter, grey and RGB, one and several components, random
    /// parameters over every target class (0, 255, interior) and parameters at the extremes.
    #[test]
    fn the_summed_loss_is_the_sum_of_log_prob_on_every_backend() {
        use burn::tensor::{Distribution, Tolerance};
        let mut rng = StdRng::seed_from_u64(8);
        for device in crate::device::test_devices() {
            let device = device.autodiff();
            device.seed(8);
            for (colours, k) in [(1, 1), (1, 4), (3, 1), (3, 3)] {
                let n = channels(colours, k);
                let (b, h, w) = (2, 3, 5);
                let spread =
                    Tensor::<4>::random([b, n, h, w], Distribution::Normal(0.0, 2.0), &device);
                let extreme: Vec<f32> = (0..b * n * h * w)
                    .map(|_| {
                        [100.0f32, -100.0, 1e4, -1e4, 0.0, 30.0, -30.0][rng.random_range(0..7)]
                    })
                    .collect();
                let extreme = Tensor::from_data(TensorData::new(extreme, [b, n, h, w]), &device);
                let bytes: Vec<i64> = (0..b * colours * h * w)
                    .map(|i| [0, 255, rng.random_range(1..255)][i % 3])
                    .collect();
                let t = Tensor::<4, Int>::from_data(
                    TensorData::new(bytes, [b, colours, h, w]),
                    &device,
                );
                for params in [spread, extreme] {
                    let run = |summed: bool| {
                        let p = params.clone().require_grad();
                        let loss = if summed {
                            nll_nats(p.clone(), t.clone(), k)
                        } else {
                            log_prob(p.clone(), t.clone(), k).sum().neg()
                        };
                        let grads = loss.backward();
                        (loss.into_data(), p.grad(&grads).unwrap().into_data())
                    };
                    let (ours, theirs) = (run(true), run(false));
                    let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-3);
                    ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
                    ours.1.assert_approx_eq::<f32>(&theirs.1, tol);
                    assert!(ours.1.iter::<f32>().all(f32::is_finite));
                }
            }
        }
    }

    /// At a very low temperature a draw is the mode: the most likely component's mean, rounded to
    /// its bin (for RGB with the means shifted by the colours drawn before).
    #[test]
    fn sampling_at_low_temperature_returns_the_mode() {
        let mut rng = StdRng::seed_from_u64(3);
        // Grey, two components: logits favour the second, whose mean is 0.3.
        let grey = [0.0, 2.0, -0.5, 0.3, -1.0, -2.0];
        for _ in 0..5 {
            assert_eq!(sample_pixel(&grey, 1, 2, 1e-4, &mut rng), vec![166]);
        }
        // RGB, one component: means 0.1, -0.2, 0.4; coefficients tanh(0.5), tanh(-1), tanh(0.2).
        let k = 1;
        let rgb = [0.0, 0.1, -3.0, 0.5, -0.2, -3.0, -1.0, 0.4, -3.0, 0.2];
        let r = 0.1f64;
        let g = -0.2 + 0.5f64.tanh() * r;
        let b = 0.4 + (-1.0f64).tanh() * r + 0.2f64.tanh() * g;
        let bytes = |v: f64| ((v + 1.0) * 127.5).round() as u8;
        assert_eq!(channels(3, k), rgb.len());
        assert_eq!(
            sample_pixel(&rgb, 3, k, 1e-4, &mut rng),
            vec![bytes(r), bytes(g), bytes(b)]
        );
        // At temperature 1 draws vary.
        let draws: std::collections::BTreeSet<Vec<u8>> = (0..50)
            .map(|_| sample_pixel(&grey, 1, 2, 1.0, &mut rng))
            .collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    /// The likelihood couples the colours as the sampler does: with sharp components, the most
    /// likely green for a given red sits at mean_G + tanh(c0) * red, and the most likely blue at
    /// mean_B + tanh(c1) * red + tanh(c2) * green (values on [-1, 1]).
    #[test]
    fn the_likelihood_shifts_green_and_blue_by_the_earlier_colours() {
        // One component: logit; R mean, log-scale, c0; G mean, log-scale, c1; B mean, log-scale, c2.
        let params = [0.0, 0.1, -4.0, 0.8, -0.2, -4.0, -0.6, 0.3, -4.0, 0.4];
        let byte = |v: f64| ((v + 1.0) * 127.5).round() as usize;
        let scaled = |b: usize| (b as f64 - 127.5) / 127.5;
        for r in [40usize, 200] {
            let targets: Vec<i64> = (0..65536)
                .flat_map(|gb| [r as i64, gb / 256, gb % 256])
                .collect();
            let p = probabilities(&params, targets, 3, 1);
            let green: Vec<f64> = (0..256)
                .map(|g| p[g * 256..(g + 1) * 256].iter().sum())
                .collect();
            let best_g = (0..256)
                .max_by(|&a, &b| green[a].total_cmp(&green[b]))
                .unwrap();
            let want_g = byte(-0.2 + 0.8f64.tanh() * scaled(r));
            assert!(
                best_g.abs_diff(want_g) <= 1,
                "red {r}: green {best_g} vs {want_g}"
            );
            let blue = &p[best_g * 256..(best_g + 1) * 256];
            let best_b = (0..256)
                .max_by(|&a, &b| blue[a].total_cmp(&blue[b]))
                .unwrap();
            let want_b = byte(0.3 + (-0.6f64).tanh() * scaled(r) + 0.4f64.tanh() * scaled(best_g));
            assert!(
                best_b.abs_diff(want_b) <= 1,
                "red {r}: blue {best_b} vs {want_b}"
            );
        }
    }
}
