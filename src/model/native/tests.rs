//! Values and gradients of every operation against Burn's own, on every compiled backend.

use super::*;
use crate::device::test_devices;
use burn::tensor::module::conv2d;
use burn::tensor::{DType, Device, Distribution, TensorData, Tolerance};

fn random<const D: usize>(dims: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(dims, Distribution::Normal(0.0, 1.0), device)
}

/// Output and gradients of `valid_conv2d` against Burn's own convolution and its backward.
fn compare(device: &Device, x_tracked: bool, dtype: DType) {
    let device = device.clone().autodiff();
    device.seed(7);
    let x = random([3, 4, 9, 8], &device);
    let w = random([6, 4, 3, 5], &device);
    let b = random([6], &device);
    let g = random([3, 6, 7, 4], &device).cast(dtype);
    let run = |ours: bool| {
        let x = if x_tracked {
            x.clone().require_grad()
        } else {
            x.clone()
        };
        let (w, b) = (w.clone().require_grad(), b.clone().require_grad());
        // Each input used twice, so that gradients from two paths must add up.
        let (xc, wc, bc) = (
            x.clone().cast(dtype),
            w.clone().cast(dtype),
            b.clone().cast(dtype),
        );
        let out = if ours {
            valid_conv2d(xc.clone(), wc.clone(), bc.clone())
        } else {
            conv2d(xc.clone(), wc.clone(), Some(bc.clone()), options())
        };
        let loss = (out.clone() * g.clone()).sum().cast(DType::F32)
            + (xc.mean() + wc.sum() * 0.5 + bc.sum()).cast(DType::F32);
        let grads = loss.backward();
        let gx = x.grad(&grads).map(|t| t.into_data());
        (
            out.cast(DType::F32).into_data(),
            gx,
            w.grad(&grads).unwrap().into_data(),
            b.grad(&grads).unwrap().into_data(),
        )
    };
    let (ours, theirs) = (run(true), run(false));
    let tol = if dtype == DType::F32 {
        Tolerance::<f32>::rel_abs(1e-4, 1e-4)
    } else {
        Tolerance::<f32>::rel_abs(2e-2, 2e-1)
    };
    ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
    assert_eq!(ours.1.is_some(), x_tracked);
    if let (Some(a), Some(b)) = (ours.1, theirs.1) {
        a.assert_approx_eq::<f32>(&b, tol);
    }
    ours.2.assert_approx_eq::<f32>(&theirs.2, tol);
    ours.3.assert_approx_eq::<f32>(&theirs.3, tol);
}

#[test]
fn gradients_match_burns_convolution() {
    for device in test_devices() {
        compare(&device, true, DType::F32);
        compare(&device, false, DType::F32);
        compare(&device, true, DType::BF16);
    }
}

#[test]
fn without_autodiff_they_are_burns_operations() {
    for device in test_devices() {
        let x = random([2, 3, 6, 6], &device);
        let w = random([4, 3, 2, 3], &device);
        let b = random([4], &device);
        let expected = conv2d(x.clone(), w.clone(), Some(b.clone()), options());
        valid_conv2d(x.clone(), w, b)
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::default());
        let expected = x
            .clone()
            .pad((1, 0, 2, 3), burn::tensor::ops::PadMode::Constant(0.0));
        pad_zeros(x.clone(), [2, 3, 1, 0])
            .into_data()
            .assert_eq(&expected.into_data(), true);
        let x = random([2, 4, 3, 3], &device);
        let expected = burn::tensor::activation::tanh(x.clone().narrow(1, 0, 2))
            * burn::tensor::activation::sigmoid(x.clone().narrow(1, 2, 2));
        gate(x)
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::default());
    }
}
#[test]
fn nll_and_its_gradient_match_log_softmax_and_gather() {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, TensorData};
    for device in test_devices() {
        let device = device.autodiff();
        device.seed(3);
        let (b, c, h, w) = (2, 3, 4, 5);
        let logits = (random([b, c, 256, h, w], &device) * 3.0).require_grad();
        let targets: Vec<i64> = (0..b * c * h * w).map(|i| (i * 61 % 256) as i64).collect();
        let targets = Tensor::<4, Int>::from_data(TensorData::new(targets, [b, c, h, w]), &device);
        let reference = log_softmax(logits.clone(), 2)
            .gather(2, targets.clone().unsqueeze_dim(2))
            .sum()
            .neg();
        let ours = categorical_nll(logits.clone(), targets);
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-4);
        ours.clone()
            .into_data()
            .assert_approx_eq::<f32>(&reference.clone().into_data(), tol);
        // A second use of the logits, so that gradients from two paths must add up.
        let g_ours = (ours * 0.5 + logits.clone().sum()).backward();
        let g_ref = (reference * 0.5 + logits.clone().sum()).backward();
        logits
            .grad(&g_ours)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&logits.grad(&g_ref).unwrap().into_data(), tol);
    }
}
/// Value and input gradient of `ours` and `reference` on the same random input, tracked,
/// with a second use of the input so that gradients from two paths must add up.
fn same_value_and_gradient(
    dims: [usize; 4],
    ours: impl Fn(Tensor<4>) -> Tensor<4>,
    reference: impl Fn(Tensor<4>) -> Tensor<4>,
) {
    for device in test_devices() {
        let device = device.autodiff();
        device.seed(5);
        let x = random(dims, &device).require_grad();
        let (a, b) = (ours(x.clone()), reference(x.clone()));
        let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
        a.clone()
            .into_data()
            .assert_approx_eq::<f32>(&b.clone().into_data(), tol);
        let weights = random(a.dims(), &device);
        let ga = ((a * weights.clone()).sum() + x.clone().sum()).backward();
        let gb = ((b * weights).sum() + x.clone().sum()).backward();
        x.grad(&ga)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&x.grad(&gb).unwrap().into_data(), tol);
    }
}

#[test]
fn gate_matches_tanh_times_sigmoid() {
    use burn::tensor::activation::{sigmoid, tanh};
    same_value_and_gradient([2, 6, 3, 4], gate, |x| {
        tanh(x.clone().narrow(1, 0, 3)) * sigmoid(x.narrow(1, 3, 3))
    });
}

#[test]
fn glu_matches_a_times_sigmoid_b() {
    use burn::tensor::activation::sigmoid;
    same_value_and_gradient([2, 6, 3, 4], glu, |x| {
        x.clone().narrow(1, 0, 3) * sigmoid(x.narrow(1, 3, 3))
    });
}

/// The strided and transposed convolutions against Burn's, values and the gradients of all
/// three inputs.
#[test]
fn strided_and_transposed_convolutions_match_burns() {
    use burn::tensor::module::conv_transpose2d;
    for device in test_devices() {
        let device = device.autodiff();
        device.seed(9);
        let x = random([2, 3, 7, 6], &device).require_grad();
        let w = random([4, 3, 2, 3], &device).require_grad();
        let wt = random([3, 4, 2, 2], &device).require_grad();
        let b = random([4], &device).require_grad();
        let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
        let pairs: [(Tensor<4>, Tensor<4>); 2] = [
            (
                strided_conv2d(x.clone(), w.clone(), b.clone(), 2),
                conv2d(
                    x.clone(),
                    w.clone(),
                    Some(b.clone()),
                    ConvOptions::new([2, 2], [0, 0], [1, 1], 1),
                ),
            ),
            (
                transposed_conv2d_stride2(x.clone(), wt.clone(), b.clone()),
                conv_transpose2d(
                    x.clone(),
                    wt.clone(),
                    Some(b.clone()),
                    ConvTransposeOptions::new([2, 2], [0, 0], [0, 0], [1, 1], 1),
                ),
            ),
        ];
        for (ours, theirs) in pairs {
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&theirs.clone().into_data(), tol);
            let weights = random(ours.dims(), &device);
            let ga = (ours * weights.clone()).sum().backward();
            let gb = (theirs * weights).sum().backward();
            for t in [&x, &w, &wt] {
                if let (Some(a), Some(b)) = (t.grad(&ga), t.grad(&gb)) {
                    a.into_data().assert_approx_eq::<f32>(&b.into_data(), tol);
                }
            }
            let (a, bb) = (b.grad(&ga).unwrap(), b.grad(&gb).unwrap());
            a.into_data().assert_approx_eq::<f32>(&bb.into_data(), tol);
        }
    }
}

/// The fused gated resnet against Burn's own operations one by one (elu, pad, convolution,
/// matrix product, mask, sigmoid), with and without each optional input, values and the
/// gradients of every input.
#[test]
fn gated_resnet_matches_burns_operations() {
    use burn::tensor::activation::{elu, sigmoid};
    use burn::tensor::ops::PadMode;
    let (b, f, a, h, w) = (2, 3, 4, 5, 6);
    let padding = [1, 0, 1, 1]; // a 2x3 kernel, down-shifted
    let reference = |x: Tensor<4>,
                     [(w1, b1), (w2, b2)]: ResnetConvs,
                     aux: Option<ResnetAux>,
                     shift: Option<Tensor<4>>,
                     kept: Option<Tensor<4, Bool>>,
                     keep: f64| {
        let ce = |t: Tensor<4>| elu(Tensor::cat(vec![t.clone(), t.neg()], 1), 1.0);
        let pad = |t: Tensor<4>| t.pad((1, 1, 1, 0), PadMode::Constant(0.0));
        let mut c1 = conv2d(pad(ce(x.clone())), w1, Some(b1), options());
        if let Some((input, weight, bias)) = aux {
            let [n_out, n_in] = weight.dims();
            let weight = weight.reshape([n_out, n_in, 1, 1]);
            c1 = c1 + conv2d(ce(input), weight, Some(bias), options());
        }
        let mut c1 = ce(c1);
        if let Some(k) = kept {
            c1 = c1.mask_fill(k.bool_not(), 0.0) * keep;
        }
        let mut c2 = conv2d(pad(c1), w2, Some(b2), options());
        if let Some(s) = shift {
            c2 = c2 + s;
        }
        x + c2.clone().narrow(1, 0, f) * sigmoid(c2.narrow(1, f, f))
    };
    for device in test_devices() {
        let device = device.autodiff();
        device.seed(11);
        let leaf = |dims: Vec<usize>| {
            Tensor::<1>::random(
                [dims.iter().product::<usize>()],
                Distribution::Normal(0.0, 0.5),
                &device,
            )
            .require_grad()
        };
        let x = leaf(vec![b, f, h, w]);
        let params = [
            leaf(vec![f, 2 * f, 2, 3]),
            leaf(vec![f]),
            leaf(vec![2 * f, 2 * f, 2, 3]),
            leaf(vec![2 * f]),
            leaf(vec![b, a, h, w]),
            leaf(vec![f, 2 * a]),
            leaf(vec![f]),
            leaf(vec![b, 2 * f, 1, 1]),
        ];
        let mask: Vec<bool> = (0..b * 2 * f * h * w).map(|i| i * 7 % 5 < 2).collect();
        let mask = Tensor::<4, Bool>::from_data(
            burn::tensor::TensorData::new(mask, [b, 2 * f, h, w]),
            &device,
        );
        let weights = random([b, f, h, w], &device);
        let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
        for (with_aux, with_shift, with_dropout) in [
            (false, false, false),
            (true, false, true),
            (false, true, true),
            (true, true, false),
        ] {
            let run = |ours: bool| {
                let x4 = x.clone().reshape([b, f, h, w]);
                let p = &params;
                let convs = [
                    (p[0].clone().reshape([f, 2 * f, 2, 3]), p[1].clone()),
                    (p[2].clone().reshape([2 * f, 2 * f, 2, 3]), p[3].clone()),
                ];
                let aux = with_aux.then(|| {
                    (
                        p[4].clone().reshape([b, a, h, w]),
                        p[5].clone().reshape([f, 2 * a]),
                        p[6].clone(),
                    )
                });
                let shift = with_shift.then(|| p[7].clone().reshape([b, 2 * f, 1, 1]));
                let kept = with_dropout.then(|| mask.clone());
                let out = if ours {
                    let shape = ResnetShape { padding, keep: 2.0 };
                    gated_resnet(x4, convs, aux, shift, kept, shape)
                } else {
                    reference(x4, convs, aux, shift, kept, 2.0)
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let mut all = vec![out.into_data(), x.grad(&grads).unwrap().into_data()];
                for t in &params {
                    if let Some(g) = t.grad(&grads) {
                        all.push(g.into_data());
                    }
                }
                all
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours.len(), theirs.len());
            assert_eq!(
                ours.len(),
                6 + 3 * usize::from(with_aux) + usize::from(with_shift)
            );
            for (a, b) in ours.iter().zip(&theirs) {
                a.assert_approx_eq::<f32>(b, tol);
            }
        }
    }
}

/// Every activation of the models at the extremes, on every backend: finite values and
/// gradients at +-100 in f32 and bf16 and +-20 in f16 (the largest activations a layer of a
/// diverging or saturated network hands on), and the values they should have there.
#[test]
fn activations_are_finite_at_the_extremes() {
    use burn::tensor::FloatDType;
    type Activation = (&'static str, fn(Tensor<4>) -> Tensor<4>);
    let activations: [Activation; 4] = [
        ("elu", crate::model::pixelcnnpp::elu),
        ("concat_elu", concat_elu),
        ("gate", gate),
        ("glu", glu),
    ];
    for device in test_devices() {
        let device = device.autodiff();
        for (dtype, big) in [
            (FloatDType::F32, 100.0f32),
            (FloatDType::BF16, 100.0),
            (FloatDType::F16, 20.0),
        ] {
            let values = vec![-big, -big / 2.0, -1.0, 0.0, 1.0, 3.0, big / 2.0, big];
            for (name, activation) in activations {
                let x =
                    Tensor::<4>::from_data(TensorData::new(values.clone(), [1, 8, 1, 1]), &device)
                        .require_grad();
                let y = activation(x.clone().cast(dtype)).cast(FloatDType::F32);
                let grads = y.clone().sum().backward();
                let y: Vec<f32> = y.into_data().convert::<f32>().try_into_vec().unwrap();
                let g: Vec<f32> = x
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec()
                    .unwrap();
                let at = format!("{name} at +-{big} in {dtype:?} on {device:?}");
                assert!(y.iter().all(|v| v.is_finite()), "{at}: values {y:?}");
                assert!(g.iter().all(|v| v.is_finite()), "{at}: gradients {g:?}");
                if name == "elu" {
                    // elu(x) = x above 0 (gradient 1), -1 far below (gradient exp(x) ~ 0).
                    let tol = if dtype == FloatDType::F32 { 1e-6 } else { 0.1 };
                    assert!(
                        (y[7] - big).abs() <= tol * big && (y[0] + 1.0).abs() < 1e-3,
                        "{at}: {y:?}"
                    );
                    // exp(-100) is a denormal in f32; at 0 both sides' slope is 1.
                    assert!(g[7] == 1.0 && g[0] < 1e-8 && g[3] == 1.0, "{at}: {g:?}");
                }
            }
        }
    }
}

#[test]
fn concat_elu_matches_burns_elu() {
    use burn::tensor::activation::elu;
    same_value_and_gradient([2, 3, 4, 5], concat_elu, |x| {
        elu(Tensor::cat(vec![x.clone(), x.neg()], 1), 1.0)
    });
}

#[test]
fn pad_zeros_matches_burns_pad() {
    use burn::tensor::ops::PadMode;
    same_value_and_gradient(
        [2, 3, 4, 5],
        |x| pad_zeros(x, [2, 0, 1, 3]),
        |x| x.pad((1, 3, 2, 0), PadMode::Constant(0.0)),
    );
}

/// Each float parameter's gradient (None where it has none), in the order `model` visits them.
fn parameter_gradients(
    model: &impl burn::module::Module,
    grads: burn::optim::GradientsParams,
) -> Vec<Option<TensorData>> {
    use burn::module::{ModuleVisitor, Param};
    struct Visit(burn::optim::GradientsParams, Vec<Option<TensorData>>);
    impl ModuleVisitor for Visit {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let grad = self.0.get::<D>(param.id);
            self.1.push(grad.map(Tensor::into_data));
        }
    }
    let mut visit = Visit(grads, Vec::new());
    model.visit(&mut visit);
    visit.1
}

/// The gated layers and head as one libtorch operation each against `GatedLayer::forward` and
/// `GatedPixelCnn::head`, which define them: the output and the gradients of the image, the maps
/// and every parameter, for every
/// layout (grey and RGB, each ablation, class and spatial conditioning, concat), in f32 and bf16,
/// with and without autodiff. Flex has no fused layer.
#[test]
fn fused_gated_layers_match_burns_layers() {
    use crate::model::gated::{Conditioning, GatedConfig};
    use burn::optim::GradientsParams;
    use rand::SeedableRng;
    assert!(!runs_fused(&Device::flex()));
    assert!(!runs_fused(&Device::flex().autodiff()));
    // Not vacuous: with libtorch compiled in, its devices (with or without autodiff) fuse, so the
    // comparisons below run there (and `loss::logistic`'s test compares the fused likelihood).
    #[cfg(feature = "tch")]
    #[allow(deprecated)]
    {
        assert!(runs_fused(&Device::libtorch()));
        assert!(runs_fused(&Device::libtorch().autodiff()));
        assert!(test_devices().iter().any(runs_fused));
    }
    let (b, h, w) = (2, 5, 6);
    let plain = |colours| GatedConfig::plain(colours, 3, 3, 2 * colours);
    let layouts = [
        ("grey", plain(1), DType::F32),
        ("rgb", plain(3), DType::F32),
        (
            "no residual",
            GatedConfig {
                residual: false,
                ..plain(1)
            },
            DType::F32,
        ),
        (
            "no gates",
            GatedConfig {
                gates: false,
                ..plain(3)
            },
            DType::F32,
        ),
        (
            "no link",
            GatedConfig {
                link: false,
                ..plain(1)
            },
            DType::F32,
        ),
        (
            "class",
            GatedConfig {
                classes: Some(4),
                ..plain(3)
            },
            DType::F32,
        ),
        (
            "spatial and class",
            GatedConfig {
                spatial_channels: 2,
                classes: Some(3),
                ..plain(1)
            },
            DType::F32,
        ),
        (
            "concat",
            GatedConfig {
                spatial_channels: 2,
                concat: true,
                ..plain(3)
            },
            DType::F32,
        ),
        (
            "one row",
            GatedConfig {
                kernel: 5,
                ..plain(1)
            },
            DType::F32,
        ),
        (
            "rgb bf16",
            GatedConfig {
                classes: Some(2),
                ..plain(3)
            },
            DType::BF16,
        ),
    ];
    for device in test_devices().into_iter().filter(runs_fused) {
        for (name, cfg, dtype) in &layouts {
            let device = device.clone().autodiff();
            device.seed(5);
            let rows = if *name == "one row" { 1 } else { h };
            let model = cfg.init(&mut rand::rngs::StdRng::seed_from_u64(3), &device);
            let x = random([b, cfg.colours, rows, w], &device).require_grad();
            let maps = random([b, cfg.spatial_channels.max(1), rows, w], &device).require_grad();
            let labels = Tensor::<1, Int>::from_ints([1, 0], &device);
            let outputs = cfg.likelihood.outputs(cfg.colours);
            let weights = random([b, outputs, rows, w], &device);
            let run = |fused: bool, dtype: DType| {
                let cond = Conditioning {
                    labels: &labels,
                    maps: (cfg.spatial_channels > 0).then_some(&maps),
                };
                let input = x.clone().cast(dtype);
                let out = if fused {
                    model.forward(input, &cond)
                } else {
                    model.head(model.skips(input, &cond))
                };
                let out = out.cast(DType::F32);
                let grads = (out.clone() * weights.clone()).sum().backward();
                let mut all = vec![Some(out.into_data()), x.grad(&grads).map(Tensor::into_data)];
                if cfg.spatial_channels > 0 {
                    all.push(maps.grad(&grads).map(Tensor::into_data));
                }
                all.extend(parameter_gradients(
                    &model,
                    GradientsParams::from_grads(grads, &model),
                ));
                all
            };
            let (ours, theirs) = (run(true, *dtype), run(false, *dtype));
            assert_eq!(ours.len(), theirs.len(), "{name}");
            // What the output does not reach: the last layer's `out` (and its vertical gate's
            // class bias or maps), without the link every vertical stack.
            let missing = |all: &[Option<TensorData>]| {
                (0..all.len())
                    .filter(|&i| all[i].is_none())
                    .collect::<Vec<_>>()
            };
            assert_eq!(missing(&ours), missing(&theirs), "{name}");
            assert!(missing(&ours).len() < ours.len() / 2, "{name}");
            if *dtype == DType::F32 {
                let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
                for (a, b) in ours.iter().zip(&theirs) {
                    if let (Some(a), Some(b)) = (a, b) {
                        a.assert_approx_eq::<f32>(b, tol);
                    }
                }
            } else {
                // bf16 rounds after each of Burn's ~50 operations per layer and at far fewer
                // places in the fused one, which must be at least as close to the f32 result.
                let exact = run(false, DType::F32);
                for (i, ((a, b), e)) in ours.iter().zip(&theirs).zip(&exact).enumerate() {
                    let (Some(a), Some(b), Some(e)) = (a, b, e) else {
                        continue;
                    };
                    let error = |t: &TensorData| {
                        let pairs = t.iter::<f32>().zip(e.iter::<f32>());
                        pairs.fold(0.0f32, |m, (v, w)| m.max((v - w).abs()))
                    };
                    let scale = e.iter::<f32>().fold(0.0f32, |m, v| m.max(v.abs()));
                    let (fused, burns) = (error(a), error(b));
                    // Measured: fused within 1.5 % of each tensor's largest entry, Burn's 9 %.
                    assert!(
                        fused <= burns + 1e-3 * scale && fused <= 3e-2 * scale,
                        "{name}: tensor {i}: bf16 error {fused} fused, {burns} Burn's (scale {scale})"
                    );
                }
            }
            for (i, a) in ours.iter().flatten().enumerate() {
                assert!(a.iter::<f32>().all(f32::is_finite), "{name}: tensor {i}");
            }
            // Without autodiff (evaluation, sampling).
            let valid = burn::module::Module::valid(&model);
            let maps = maps.clone().inner();
            let cond = Conditioning {
                labels: &labels.clone().inner(),
                maps: (cfg.spatial_channels > 0).then_some(&maps),
            };
            let input = x.clone().inner().cast(*dtype);
            let fused = valid.forward(input.clone(), &cond).cast(DType::F32);
            let burns = valid.head(valid.skips(input, &cond)).cast(DType::F32);
            let tol = if *dtype == DType::F32 {
                Tolerance::<f32>::rel_abs(1e-4, 1e-4)
            } else {
                Tolerance::<f32>::rel_abs(2e-2, 5e-2)
            };
            fused
                .into_data()
                .assert_approx_eq::<f32>(&burns.into_data(), tol);
        }
    }
}
