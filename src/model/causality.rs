//! The receptive field of a model, measured by gradients: which input sub-pixels the logits of an
//! output sub-pixel depend on. Used by the causality tests of every variant.

use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Raster order of sub-pixels: row, then column, then colour (R -> G -> B).
pub fn raster_index(colour: usize, y: usize, x: usize, colours: usize, width: usize) -> usize {
    (y * width + x) * colours + colour
}

/// Random inputs the dependencies are measured at. A ReLU that is inactive at one input hides
/// what lies behind it there, so a dependency counts when the gradient is nonzero at any of them.
const INPUTS: u64 = 3;

/// For every output sub-pixel (in raster order), the raster indices of the input sub-pixels whose
/// gradient is nonzero at one of `INPUTS` random images. `forward` maps `[1, c, h, w]` inputs
/// (0..255) to `[1, c, n, h, w]` values per sub-pixel (256 logits; a grey pixel's mixture
/// parameters) on an autodiff `device`.
pub fn dependencies(
    forward: impl Fn(Tensor<4>) -> Tensor<5>,
    colours: usize,
    height: usize,
    width: usize,
    device: &Device,
) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); colours * height * width];
    for seed in 11..11 + INPUTS {
        let at = dependencies_at(&forward, seed, colours, height, width, device);
        for (all, some) in out.iter_mut().zip(at) {
            all.extend(some);
            all.sort_unstable();
            all.dedup();
        }
    }
    out
}

/// `dependencies` at one random input, drawn from `seed`.
fn dependencies_at(
    forward: &impl Fn(Tensor<4>) -> Tensor<5>,
    seed: u64,
    colours: usize,
    height: usize,
    width: usize,
    device: &Device,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let input: Vec<f32> = (0..colours * height * width)
        .map(|_| f32::from(rng.random::<u8>()))
        .collect();
    let mut out = vec![Vec::new(); colours * height * width];
    for y in 0..height {
        for x in 0..width {
            for c in 0..colours {
                let inp = Tensor::<4>::from_data(
                    TensorData::new(input.clone(), [1, colours, height, width]),
                    device,
                )
                .require_grad();
                let values = forward(inp.clone());
                let n = values.dims()[2];
                let picked = values
                    .slice([0..1, c..c + 1, 0..n, y..y + 1, x..x + 1])
                    .sum();
                let grads = picked.backward();
                let g: Vec<f32> = inp
                    .grad(&grads)
                    .map(|g| g.into_data().convert::<f32>().try_into_vec().expect("f32"))
                    .unwrap_or_else(|| vec![0.0; input.len()]);
                let o = raster_index(c, y, x, colours, width);
                assert_finite_gradient(&g, o);
                let deps = &mut out[o];
                for (cc, yy, xx) in (0..colours).flat_map(|cc| {
                    (0..height).flat_map(move |yy| (0..width).map(move |xx| (cc, yy, xx)))
                }) {
                    if g[(cc * height + yy) * width + xx] != 0.0 {
                        deps.push(raster_index(cc, yy, xx, colours, width));
                    }
                }
                deps.sort_unstable();
            }
        }
    }
    out
}

/// Panics when a gradient value is not finite: a NaN or an infinity says that the model's values
/// overflowed, not which inputs an output depends on, and must never count as a dependency (a
/// false leak) or hide one.
pub fn assert_finite_gradient(g: &[f32], output: usize) {
    if let Some(i) = g.iter().position(|v| !v.is_finite()) {
        panic!(
            "the gradient of output {output} is {} at input {i}: not finite, so it proves \
             neither a dependency nor its absence",
            g[i]
        );
    }
}

/// For every output sub-pixel, the earlier sub-pixels it does not depend on: the blind spot.
pub fn blind_spot(deps: &[Vec<usize>]) -> Vec<(usize, usize)> {
    deps.iter()
        .enumerate()
        .flat_map(|(o, d)| (0..o).filter(move |i| !d.contains(i)).map(move |i| (o, i)))
        .collect()
}

/// The output sub-pixels that depend on themselves or a later sub-pixel, as
/// `(output, offending input)` raster-index pairs.
pub fn leaks(deps: &[Vec<usize>]) -> Vec<(usize, usize)> {
    deps.iter()
        .enumerate()
        .flat_map(|(o, d)| d.iter().filter(move |&&i| i >= o).map(move |&i| (o, i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::masked_conv::{MaskKind, MaskedConv2d};
    use crate::model::{Context, GatedConfig, ModelConfig, SimpleConfig};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    /// `cfg`'s model with the weights that its masks hide (zeros at initialisation) drawn at
    /// random: after training they are anything, and only the masks applied in the forward pass
    /// keep a model causal, which a freshly initialised model's zeros would not show.
    fn redrawn(cfg: &ModelConfig, seed: u64, dev: &Device) -> crate::model::Model {
        use burn::module::{Module, ModuleMapper, Param};
        use burn::tensor::Distribution;
        struct Redraw;
        impl ModuleMapper for Redraw {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let (id, tensor, mapper) = param.consume();
                let inner = tensor.clone().inner();
                let hidden = inner.clone().equal_elem(0.0);
                let drawn = inner.random_like(Distribution::Uniform(-0.3, 0.3));
                let mut value = Tensor::from_inner(inner.mask_where(hidden, drawn));
                if tensor.is_require_grad() {
                    value = value.require_grad();
                }
                Param::from_mapped_value(id, value, mapper)
            }
        }
        dev.seed(seed);
        cfg.init(seed, dev).map(&mut Redraw)
    }

    /// A model whose values overflow (here: a NaN gradient everywhere) fails the measurement with
    /// its own message instead of reporting every input as a dependency.
    #[test]
    #[should_panic(expected = "not finite, so it proves neither a dependency nor its absence")]
    fn a_gradient_that_is_not_finite_is_not_a_dependency() {
        let dev = device();
        dependencies(
            |x| (x.clone() * f64::NAN).reshape([1, 1, 1, 2, 2]),
            1,
            2,
            2,
            &dev,
        );
    }

    /// On every compiled backend: no leak, and no missing predecessor.
    fn check_simple(colours: usize, side: usize, layers: usize, kernel: usize) {
        for dev in crate::device::test_devices() {
            check_simple_on(colours, side, layers, kernel, &dev.autodiff());
        }
    }

    fn check_simple_on(colours: usize, side: usize, layers: usize, kernel: usize, dev: &Device) {
        let cfg = ModelConfig::Simple(SimpleConfig {
            colours,
            layers,
            kernel,
            channels: 16 * colours,
            likelihood: crate::model::Likelihood::Categorical,
        });
        let dev = dev.clone();
        let model = redrawn(&cfg, 3, &dev);
        let ctx = Context::from_labels(&[0], &dev);
        let deps = dependencies(
            |x| model.forward(x, &ctx).values(),
            colours,
            side,
            side,
            &dev,
        );
        assert_eq!(leaks(&deps), vec![], "the simple model leaks");
        // Not vacuous: every sub-pixel after the first sees the one right before it
        // (the previous colour of its pixel, or the pixel to its left).
        for (o, d) in deps.iter().enumerate().skip(1) {
            let (y, x) = ((o / colours) / side, (o / colours) % side);
            if o % colours == 0 && x == 0 {
                continue; // first sub-pixel of a row: its left neighbour is on the row above
            }
            assert!(
                d.contains(&(o - 1)),
                "sub-pixel {o} at ({y},{x}) misses its predecessor"
            );
        }
    }

    fn gated(colours: usize, layers: usize, kernel: usize, classes: Option<usize>) -> ModelConfig {
        ModelConfig::Gated(GatedConfig {
            classes,
            ..GatedConfig::plain(colours, layers, kernel, 8 * colours)
        })
    }

    /// The exact receptive field: every earlier sub-pixel and nothing else, on every backend.
    fn check_exact(cfg: &ModelConfig, side: usize) {
        let colours = cfg.colours();
        for dev in crate::device::test_devices() {
            let dev = dev.autodiff();
            let model = redrawn(cfg, 5, &dev);
            let ctx = Context::from_labels(&[3], &dev);
            let deps = dependencies(
                |x| model.forward(x, &ctx).values(),
                colours,
                side,
                side,
                &dev,
            );
            assert_eq!(leaks(&deps), vec![], "{cfg:?} leaks on {dev:?}");
            assert_eq!(
                blind_spot(&deps),
                vec![],
                "{cfg:?} has a blind spot on {dev:?}"
            );
        }
    }

    /// With a logistic mixture head (grey: a pixel is a sub-pixel), the simple and gated models
    /// are as causal as with 256 logits, and PixelCNN++ with 256 logits per colour (its RGB head
    /// sees the earlier colours of the pixel) is exactly causal per sub-pixel.
    #[test]
    fn every_likelihood_head_sees_exactly_the_past() {
        use crate::model::{Likelihood, PixelCnnPpConfig};
        let mixture = Likelihood::LogisticMixture { components: 3 };
        let ModelConfig::Gated(g) = gated(1, 4, 5, None) else {
            unreachable!()
        };
        check_exact(
            &ModelConfig::Gated(GatedConfig {
                likelihood: mixture,
                ..g
            }),
            8,
        );
        for dev in crate::device::test_devices() {
            let dev = dev.autodiff();
            let cfg = ModelConfig::Simple(SimpleConfig {
                colours: 1,
                layers: 3,
                kernel: 3,
                channels: 8,
                likelihood: mixture,
            });
            let model = redrawn(&cfg, 3, &dev);
            let ctx = Context::from_labels(&[0], &dev);
            let deps = dependencies(|x| model.forward(x, &ctx).values(), 1, 6, 6, &dev);
            assert_eq!(leaks(&deps), vec![], "{cfg:?} leaks");
            assert!(
                deps[7].contains(&6) && deps[7].contains(&1),
                "{:?}",
                deps[7]
            );
        }
        for (colours, likelihood) in [(3, Likelihood::Categorical), (1, Likelihood::Categorical)] {
            let cfg = ModelConfig::PixelCnnPp(PixelCnnPpConfig {
                colours,
                filters: 6,
                resnets: 2,
                likelihood,
                classes: Some(10),
                dropout: 0.0,
            });
            check_exact(&cfg, 5);
        }
    }

    #[test]
    fn gated_model_sees_exactly_the_past_grey() {
        // Deep enough to cover an 8x8 image: layers * (kernel / 2) >= 7.
        check_exact(&gated(1, 7, 3, None), 8);
        check_exact(&gated(1, 4, 5, None), 8);
        check_exact(&gated(1, 3, 7, None), 8);
    }

    #[test]
    fn gated_model_sees_exactly_the_past_rgb() {
        check_exact(&gated(3, 4, 5, None), 8);
        check_exact(&gated(3, 5, 3, None), 6);
    }

    #[test]
    fn conditional_gated_model_is_causal_and_uses_the_label() {
        let cfg = gated(3, 3, 5, Some(10));
        check_exact(&cfg, 6);
        let dev = Device::flex();
        let model = redrawn(&cfg, 5, &dev);
        let x = Tensor::<4>::from_data(TensorData::new(vec![100.0f32; 3 * 16], [1, 3, 4, 4]), &dev);
        let out = |label: u8| {
            model
                .forward(x.clone(), &Context::from_labels(&[label], &dev))
                .values()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let (a, b) = (out(1), out(2));
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(&b).any(|(p, q)| (p - q).abs() > 1e-4),
            "the label changes nothing"
        );
        // The label reaches every pixel, the first too, which sees no earlier pixel: its 256
        // logits of red (`[1, 3, 256, 4, 4]`, pixel (0, 0)) differ between the labels.
        let first = |v: &[f32]| (0..256).map(|i| v[i * 16]).collect::<Vec<f32>>();
        assert!(
            first(&a)
                .iter()
                .zip(first(&b))
                .any(|(p, q)| (p - q).abs() > 1e-4),
            "the first pixel ignores the label"
        );
    }

    #[test]
    fn spatial_conditioning_keeps_causality_and_matters() {
        let cfg = ModelConfig::Gated(GatedConfig {
            spatial_channels: 2,
            ..GatedConfig::plain(1, 3, 5, 8)
        });
        let dev = device();
        let model = redrawn(&cfg, 9, &dev);
        let maps = |v: f32| Tensor::<4>::full([1, 2, 6, 6], v, &dev);
        let mut ctx = Context::from_labels(&[0], &dev);
        ctx.maps = Some(maps(0.5));
        let deps = dependencies(|x| model.forward(x, &ctx).values(), 1, 6, 6, &dev);
        assert_eq!(leaks(&deps), vec![]);
        assert_eq!(blind_spot(&deps), vec![]);
        let x = Tensor::<4>::zeros([1, 1, 6, 6], &dev);
        let a = model
            .forward(x.clone(), &ctx)
            .values()
            .sum()
            .into_scalar::<f32>();
        ctx.maps = Some(maps(-0.5));
        let b = model.forward(x, &ctx).values().sum().into_scalar::<f32>();
        assert!((a - b).abs() > 1e-3, "the maps change nothing");
    }

    /// The PixelVAE decoder given z sees exactly the earlier sub-pixels, in every conditioning
    /// mode, and z matters.
    #[test]
    fn pixel_vae_decoder_is_causal_given_z() {
        use crate::model::{VaeConditioning, VaeConfig};
        let dev = device();
        for (colours, mode) in [
            (1, VaeConditioning::Gates),
            (3, VaeConditioning::Concat),
            (1, VaeConditioning::Linear),
            (3, VaeConditioning::Gates),
        ] {
            let maps = if mode == VaeConditioning::Linear {
                2
            } else {
                3
            };
            let cfg = ModelConfig::Vae(VaeConfig {
                colours,
                latent_channels: 2,
                downsample: 1,
                hidden: 6,
                conditioning: mode,
                decoder: GatedConfig {
                    spatial_channels: maps,
                    concat: mode == VaeConditioning::Concat,
                    ..GatedConfig::plain(colours, 3, 5, 6 * colours)
                },
            });
            let model = redrawn(&cfg, 4, &dev);
            let z = |v: f32| Tensor::<4>::full([1, 2, 3, 3], v, &dev);
            let mut ctx = Context::from_labels(&[0], &dev);
            ctx.latent = Some(z(0.7));
            let deps = dependencies(|x| model.forward(x, &ctx).values(), colours, 6, 6, &dev);
            assert_eq!(leaks(&deps), vec![], "{mode:?}");
            assert_eq!(blind_spot(&deps), vec![], "{mode:?}");
            let x = Tensor::<4>::zeros([1, colours, 6, 6], &dev);
            let a = model
                .forward(x.clone(), &ctx)
                .values()
                .sum()
                .into_scalar::<f32>();
            ctx.latent = Some(z(-0.7));
            let b = model.forward(x, &ctx).values().sum().into_scalar::<f32>();
            assert!((a - b).abs() > 1e-3, "{mode:?}: z changes nothing");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(6))]
        /// Any gated model deep enough to cover its image sees exactly the earlier sub-pixels.
        #[test]
        fn gated_receptive_field_is_exact(
            rgb in proptest::bool::ANY,
            side in 2usize..7,
            kernel in proptest::sample::select(vec![3usize, 5, 7]),
            extra in 0usize..2,
        ) {
            let colours = if rgb { 3 } else { 1 };
            let layers = (side - 1).div_ceil(kernel / 2).max(1) + extra;
            let cfg = gated(colours, layers, kernel, None);
            let dev = device();
            let ctx = Context::from_labels(&[0], &dev);
            // No leak for any weights; no blind spot in the architecture: a dependency is one that
            // some initialisation has (with few channels, every unit of the head can be inactive
            // at a pixel of the first row for one set of weights, whatever the earlier pixels).
            let mut union = vec![Vec::new(); colours * side * side];
            for seed in [side as u64, side as u64 + 1000] {
                let model = redrawn(&cfg, seed, &dev);
                let deps = dependencies(|x| model.forward(x, &ctx).values(), colours, side, side, &dev);
                proptest::prop_assert_eq!(leaks(&deps), vec![]);
                for (all, some) in union.iter_mut().zip(deps) {
                    all.extend(some);
                    all.sort_unstable();
                    all.dedup();
                }
            }
            proptest::prop_assert_eq!(blind_spot(&union), vec![]);
        }
    }

    #[test]
    fn ablations_stay_leak_free_and_without_the_link_lose_the_rows_above() {
        let with = |residual, gates, link| {
            let ModelConfig::Gated(g) = gated(1, 4, 5, None) else {
                unreachable!()
            };
            ModelConfig::Gated(GatedConfig {
                residual,
                gates,
                link,
                ..g
            })
        };
        check_exact(&with(false, true, true), 8);
        let cfg = with(true, false, true);
        let dev = device();
        let model = redrawn(&cfg, 5, &dev);
        let ctx = Context::from_labels(&[0], &dev);
        let deps = dependencies(|x| model.forward(x, &ctx).values(), 1, 8, 8, &dev);
        assert_eq!(leaks(&deps), vec![], "no gates: ReLUs, still causal");
        // Without the link the horizontal stack never hears of the rows above.
        let cfg = with(true, true, false);
        let model = redrawn(&cfg, 5, &dev);
        let deps = dependencies(|x| model.forward(x, &ctx).values(), 1, 8, 8, &dev);
        assert_eq!(leaks(&deps), vec![]);
        assert!(
            blind_spot(&deps).iter().all(|&(o, i)| i / 8 < o / 8),
            "only rows above are missing"
        );
        assert!(blind_spot(&deps).contains(&(8, 0)));
    }

    #[test]
    fn simple_model_blind_spot_is_reported() {
        // Deep enough to cover the image, yet the stacked square masks never reach the pixels up and
        // to the right: the blind spot of the original PixelCNN, which the gated model removes.
        let cfg = ModelConfig::Simple(SimpleConfig {
            colours: 1,
            layers: 7,
            kernel: 3,
            channels: 16,
            likelihood: crate::model::Likelihood::Categorical,
        });
        let dev = device();
        let model = redrawn(&cfg, 5, &dev);
        let ctx = Context::from_labels(&[0], &dev);
        let deps = dependencies(|x| model.forward(x, &ctx).values(), 1, 8, 8, &dev);
        assert_eq!(leaks(&deps), vec![]);
        let blind = blind_spot(&deps);
        assert!(!blind.is_empty());
        // Every missing input is on an earlier row, to the right of the output's column.
        for &(o, i) in &blind {
            let ((oy, ox), (iy, ix)) = ((o / 8, o % 8), (i / 8, i % 8));
            assert!(iy < oy && ix > ox, "({oy},{ox}) misses ({iy},{ix})");
        }
        // For example, (2, 0) does not see (1, 2) nor (0, 3..): a triangle up and to the right.
        assert!(blind.contains(&(16, 10)));
    }

    #[test]
    fn simple_model_is_causal_grey() {
        check_simple(1, 5, 3, 3);
        check_simple(1, 4, 2, 5);
    }

    #[test]
    fn simple_model_is_causal_rgb() {
        check_simple(3, 4, 3, 3);
    }

    #[test]
    fn the_checker_catches_a_leak() {
        // A type B first layer lets each colour see itself at the centre: a leak.
        let dev = device();
        let mut rng = StdRng::seed_from_u64(1);
        let conv = MaskedConv2d::square(MaskKind::B, 1, 256, 1, 3, &mut rng, &dev);
        let deps = dependencies(
            |x| conv.forward(x).reshape([1, 1, 256, 4, 4]),
            1,
            4,
            4,
            &dev,
        );
        let l = leaks(&deps);
        assert!(l.contains(&(5, 5)), "{l:?}");
        // And a type A layer does not leak.
        let conv = MaskedConv2d::square(MaskKind::A, 1, 256, 1, 3, &mut rng, &dev);
        let deps = dependencies(
            |x| conv.forward(x).reshape([1, 1, 256, 4, 4]),
            1,
            4,
            4,
            &dev,
        );
        assert_eq!(leaks(&deps), vec![]);
    }
}
