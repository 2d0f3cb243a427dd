//! The training step: the norm, learning-rate decay, clipping, Adam's betas, EMA, free bits, and
//! gradients that are not finite.

use super::*;
use crate::data::synthetic;
use crate::device::Precision;
use crate::model::{Context, GatedConfig, ModelConfig};
use crate::train::{Ema, Epoch, LossScale, PassStats, train_epoch};

/// Plain steps of `batch_size` images at learning rate 0.01, seed 1, epoch 1: what each test
/// changes is written beside it.
fn plain(batch_size: usize) -> Step {
    Step {
        batch_size,
        learning_rate: 0.01,
        lr_decay: 1.0,
        clip_grad_norm: 0.0,
        seed: 1,
        epoch: 1,
        kl_warmup_steps: 0,
        free_bits: 0.0,
        max_skipped_steps: 25,
        sync_phases: false,
        cuda_graph: false,
    }
}

/// A whole epoch from its first step, never stopped.
fn epoch<'a>(images: &'a Images, order: &'a [usize], step: Step, device: &'a Device) -> Epoch<'a> {
    Epoch {
        images,
        order,
        step,
        device,
        start_step: 0,
        so_far: PassStats::default(),
        stop: &|| false,
        world: Box::leak(Box::new(World::single())),
    }
}

/// A few steps computed in bf16 or in f16 with dynamic loss scaling (f32 weights and Adam
/// state) track the same steps in f32.
#[test]
fn bf16_and_f16_steps_track_f32() {
    let spec = synthetic::Spec {
        size: 8,
        colours: 3,
        train_images: 64,
    };
    let data = synthetic::generate(&spec, 4).train;
    let cfg = ModelConfig::Gated(GatedConfig {
        classes: Some(10),
        ..GatedConfig::plain(3, 3, 3, 12)
    });
    let device = Device::flex().autodiff();
    let order: Vec<usize> = (0..64).collect();
    // Adam, as runs train, and plain SGD, whose steps scale with the gradients: a loss scale
    // left in the gradients (65536 for f16) would throw SGD far off the f32 trajectory, where
    // Adam, nearly invariant to the gradients' scale, would hide it.
    let losses = |precision, sgd: bool| {
        let model = cfg.init(2, &device).with_precision(precision);
        let step = Step {
            learning_rate: if sgd { 0.5 } else { 1e-3 },
            seed: 2,
            ..plain(16)
        };
        let mut per_epoch = Vec::new();
        let mut state = TrainState {
            model,
            optimizer: if sgd {
                crate::optim::Optimizer::new(crate::optim::Rule::Sgd)
            } else {
                crate::optim::adam()
            },
            loss_scale: (precision == Precision::F16).then(LossScale::default),
            ema: None,
            inputs: Default::default(),
        };
        for _ in 0..3 {
            let (next, stats, _) =
                train_epoch(state, epoch(&data, &order, step, &device), |_| {}).unwrap();
            state = next;
            per_epoch.push(stats.bits_per_dim());
        }
        per_epoch
    };
    for sgd in [false, true] {
        let full = losses(Precision::F32, sgd);
        assert!(full[2] < full[0], "f32 learns (sgd: {sgd}): {full:?}");
        for precision in [Precision::Bf16, Precision::F16] {
            let half = losses(precision, sgd);
            assert!(half[2] < half[0], "{precision:?} learns: {half:?}");
            for (f, h) in full.iter().zip(&half) {
                assert!(
                    (f - h).abs() / f < 0.02,
                    "{precision:?} (sgd: {sgd}) {half:?} vs f32 {full:?}"
                );
            }
            assert_ne!(full, half, "{precision:?} really computed in low precision");
        }
    }
}

/// Every float parameter of `model`, flattened in visiting order.
fn flat_parameters(model: &Model) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let v: Vec<f32> = param
                .val()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .unwrap();
            self.0.extend(v);
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// `n` grey 6x6 training images and a small simple PixelCNN for them, on flex with autodiff.
fn tiny_simple(n: usize) -> (Images, Model, Device) {
    tiny_simple_on(n, Device::flex())
}

/// [`tiny_simple`] on `device` (with autodiff).
fn tiny_simple_on(n: usize, device: Device) -> (Images, Model, Device) {
    let spec = synthetic::Spec {
        size: 6,
        colours: 1,
        train_images: n,
    };
    let data = synthetic::generate(&spec, 1).train;
    let cfg = ModelConfig::Simple(crate::model::SimpleConfig {
        colours: 1,
        layers: 2,
        kernel: 3,
        channels: 4,
        likelihood: crate::model::Likelihood::Categorical,
    });
    let device = device.autodiff();
    let model = cfg.init(1, &device);
    (data, model, device)
}

/// On libtorch, nothing in a training step (the norm, the update, the average, the reads) keeps
/// the weights beyond it: after an epoch of Adam steps with an average, the next step would
/// still write the weights in place rather than copy them, and the gradients into the buffer the
/// last step spent (held for one process, in f16 too where the device decides its skips).
#[test]
fn training_steps_leave_the_weights_to_be_written_in_place() {
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let (data, model, device) = tiny_simple_on(8, device);
        let state = TrainState {
            ema: Some(Ema::new(0.9, &model)),
            model,
            optimizer: crate::optim::adam(),
            loss_scale: None,
            inputs: Default::default(),
        };
        let order: Vec<usize> = (0..8).collect();
        let (state, _, _) =
            train_epoch(state, epoch(&data, &order, plain(2), &device), |_| {}).unwrap();
        assert!(state.optimizer.writes_in_place(&state.model));
        // The next step's gradients go where the last step's were...
        assert!(state.optimizer.holds_gradients());
        // ...in f16 too.
        let f16 = TrainState {
            model: state.model.with_precision(Precision::F16),
            optimizer: crate::optim::adam(),
            loss_scale: Some(LossScale {
                scale: 1.0,
                ..LossScale::default()
            }),
            ema: None,
            inputs: Default::default(),
        };
        let mut skipped = 0;
        let (state, _, _) = train_epoch(f16, epoch(&data, &order, plain(2), &device), |r| {
            skipped += usize::from(r.skipped)
        })
        .unwrap();
        assert_eq!(skipped, 0);
        assert!(state.optimizer.holds_gradients());
        assert!(state.optimizer.writes_in_place(&state.model));
    }
}

/// The reported gradient norm is the size of the step plain SGD takes: |w1 - w0| = lr |g|.
#[test]
fn reported_gradient_norm_is_the_sgd_step_over_the_learning_rate() {
    let (data, model, device) = tiny_simple(8);
    let before = flat_parameters(&model);
    let step = plain(8);
    let state = TrainState {
        model,
        optimizer: crate::optim::Optimizer::new(crate::optim::Rule::Sgd),
        loss_scale: None,
        ema: None,
        inputs: Default::default(),
    };
    let order: Vec<usize> = (0..8).collect();
    let mut norms = Vec::new();
    let (state, _, _) = train_epoch(state, epoch(&data, &order, step, &device), |r| {
        norms.push(r.gradient_norm)
    })
    .unwrap();
    let after = flat_parameters(&state.model);
    let moved: f64 = before
        .iter()
        .zip(&after)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert_eq!(norms.len(), 1);
    let expected = 0.01 * norms[0];
    assert!(norms[0] > 0.0);
    assert!(
        (moved - expected).abs() < 1e-3 * expected,
        "{moved} vs {expected}"
    );
}

/// One SGD (or Adam with `betas`) step per epoch over 8 images of a tiny model, `steps` times:
/// the weights before and after each step, the reported norms and the final state.
fn steps_of(
    steps: usize,
    configure: impl Fn(&mut Step),
    optimizer: crate::optim::Optimizer,
    ema: Option<f64>,
) -> (Vec<Vec<f32>>, Vec<StepReport>, TrainState) {
    let (data, model, device) = tiny_simple(8);
    let mut state = TrainState {
        ema: ema.map(|d| Ema::new(d, &model)),
        model,
        optimizer,
        loss_scale: None,
        inputs: Default::default(),
    };
    let order: Vec<usize> = (0..8).collect();
    let mut weights = vec![flat_parameters(&state.model)];
    let mut reports = Vec::new();
    for n in 1..=steps {
        let mut step = Step {
            epoch: n,
            ..plain(8)
        };
        configure(&mut step);
        let (next, _, _) = train_epoch(state, epoch(&data, &order, step, &device), |r| {
            reports.push(*r)
        })
        .unwrap();
        state = next;
        weights.push(flat_parameters(&state.model));
    }
    (weights, reports, state)
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// With `lr_decay`, step n moves the SGD weights by lr * decay^(n-1) * |g|, and reports that
/// learning rate.
#[test]
fn lr_decay_multiplies_the_learning_rate_after_every_step() {
    let sgd = || crate::optim::Optimizer::new(crate::optim::Rule::Sgd);
    let (w, reports, _) = steps_of(3, |s| s.lr_decay = 0.5, sgd(), None);
    for n in 0..3 {
        let lr = 0.01 * 0.5f64.powi(n as i32);
        assert!(
            (reports[n].learning_rate - lr).abs() < 1e-15,
            "{:?}",
            reports[n]
        );
        let expected = lr * reports[n].gradient_norm;
        let moved = distance(&w[n], &w[n + 1]);
        assert!(
            (moved - expected).abs() < 1e-3 * expected,
            "step {n}: {moved} vs {expected}"
        );
    }
}

/// `clip_grad_norm` below the gradient's norm: the SGD step is lr * clip long, and the norm
/// reported is the one before clipping. Above it: nothing changes.
#[test]
fn clipping_rescales_only_gradients_above_the_norm() {
    let sgd = || crate::optim::Optimizer::new(crate::optim::Rule::Sgd);
    let clip = 1e-3;
    let (w, reports, _) = steps_of(1, |s| s.clip_grad_norm = clip, sgd(), None);
    assert!(reports[0].gradient_norm > 10.0 * clip, "{:?}", reports[0]);
    let moved = distance(&w[0], &w[1]);
    assert!((moved - 0.01 * clip).abs() < 1e-3 * 0.01 * clip, "{moved}");
    let (w, reports, _) = steps_of(1, |s| s.clip_grad_norm = 1e9, sgd(), None);
    let expected = 0.01 * reports[0].gradient_norm;
    assert!((distance(&w[0], &w[1]) - expected).abs() < 1e-3 * expected);
}

/// On libtorch, clipping scales the flat gradients where they lie (nothing else holds them by
/// then): no second buffer of all the gradients; their norm is then the clip.
#[test]
fn clipping_scales_the_gradients_in_place() {
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let (data, model, device) = tiny_simple_on(4, device);
        let grads = gradients(&model, &data, &device, None);
        let totals = Tensor::<1>::zeros([1], &device.clone().without_autodiff());
        let gathered = gather(Flat::gradients(&model, grads), totals, false, 1.0);
        let at = crate::model::native::address(&gathered.grads.values);
        let norm = gathered.square_sum.clone().into_scalar::<f64>().sqrt();
        let clip = norm / 2.0;
        let scaled = clipped(gathered.grads, &gathered.square_sum, clip);
        assert_eq!(crate::model::native::address(&scaled.values), at);
        let after: f64 = crate::optim::square_sum(scaled.values).into_scalar();
        assert!((after.sqrt() / clip - 1.0).abs() < 1e-5, "{after} {clip}");
    }
}

/// Adam's betas reach the optimizer: with both 0 every step is lr * g / |g| per weight (the
/// second step too, where the default betas average it with the first).
#[test]
fn adam_betas_are_the_ones_configured() {
    let moves = |b1, b2| {
        let (w, ..) = steps_of(2, |_| {}, crate::optim::adam_with_betas(b1, b2), None);
        w[1].iter()
            .zip(&w[2])
            .map(|(a, b)| f64::from((a - b).abs()))
            .collect::<Vec<_>>()
    };
    let zero = moves(0.0, 0.0);
    let moved = zero.iter().filter(|&&m| m > 1e-4).count();
    assert!(moved > zero.len() / 2, "most weights have a gradient");
    // lr * g / (|g| + eps): exactly lr but for the few gradients within a few eps of 0.
    let sign_steps = zero.iter().filter(|&&m| (m - 0.01).abs() < 1e-5).count();
    assert!(sign_steps * 10 >= moved * 9, "{sign_steps} of {moved}");
    assert!(zero.iter().all(|&m| m < 0.01 + 1e-5), "never more than lr");
    let default = moves(0.9, 0.999);
    let off = default
        .iter()
        .filter(|&&m| m > 1e-4 && (m - 0.01).abs() > 1e-3)
        .count();
    assert!(off > 0, "the default betas do not give sign steps");
}

/// The bias-corrected average after two steps with decay d is (d w1 + w2) / (1 + d), without
/// the initial weights w0, and the state's evaluation weights are the average.
#[test]
fn ema_is_the_decayed_average_of_the_weights_after_each_step() {
    let sgd = crate::optim::Optimizer::new(crate::optim::Rule::Sgd);
    let d = 0.75f32;
    let (w, _, state) = steps_of(2, |_| {}, sgd, Some(f64::from(d)));
    let ema = flat_parameters(state.ema.as_ref().unwrap().model());
    let eval = flat_parameters(state.eval_model());
    assert_eq!(ema, eval);
    for i in 0..ema.len() {
        let expected = (d * w[1][i] + w[2][i]) / (1.0 + d);
        assert!(
            (ema[i] - expected).abs() < 1e-6,
            "{i}: {} vs {expected}",
            ema[i]
        );
    }
    assert!(distance(&ema, &w[2]) > 1e-4, "the average lags the weights");
}

/// Free bits floor each latent dimension's batch-mean KL; without them the penalty is the KL.
/// The gradient reaches only the dimensions above the floor.
#[test]
fn free_bits_floor_each_latent_dimension() {
    let device = Device::flex().autodiff();
    // Two images, two latent dimensions: batch means 0.1 and 1.0 nats.
    let kl = Tensor::<4>::from_data(
        TensorData::new(vec![0.0f32, 1.5, 0.2, 0.5], [2, 2, 1, 1]),
        &device,
    );
    let total: f32 = kl_penalty(kl.clone(), 0.0, 2, &World::single()).into_scalar();
    assert!((total - 2.2).abs() < 1e-6, "{total}");
    // max(0.1, 0.3) + max(1.0, 0.3) = 1.3 nats per image, times 2 images.
    let kl = kl.require_grad();
    let penalty = kl_penalty(kl.clone(), 0.3, 2, &World::single());
    let floored: f32 = penalty.clone().into_scalar();
    assert!((floored - 2.6).abs() < 1e-6, "{floored}");
    let grads = penalty.backward();
    let grad: Vec<f32> = kl.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
    assert_eq!(
        grad,
        [0.0, 1.0, 0.0, 1.0],
        "the floored dimension has no gradient"
    );
}

/// The gradients of a real backward pass of `model` on `data`'s first four images, with every
/// gradient value of parameter `at` (a 4-d weight) replaced by `value` where `plant` says.
fn gradients(
    model: &Model,
    data: &Images,
    device: &Device,
    plant: Option<(usize, f32)>,
) -> GradientsParams {
    let batch = Batch::gather(data, &[0, 1, 2, 3], device);
    let loss = nll_nats(model.forward(batch.input, &batch.context), batch.target);
    let mut grads = GradientsParams::from_grads(loss.backward(), model);
    if let Some((at, value)) = plant {
        let id = Layout::of(model).ids[at];
        let g: Tensor<4> = grads.remove(id).expect("a 4-d weight");
        grads.register(id, g.clone().mask_fill(g.ones_like().bool(), value));
    }
    grads
}

/// The agreement (one process) on a real backward pass of `tiny_simple`'s model, with every
/// gradient value of parameter `at` (a 4-d weight) replaced by `value`.
fn agreed_with(at: usize, value: f32) -> (Model, Agreed) {
    let (data, model, device) = tiny_simple(4);
    let grads = gradients(&model, &data, &device, Some((at, value)));
    let inner = device.clone().without_autodiff();
    let totals = Tensor::<1>::zeros([1], &inner);
    let (_, agreed) = agree(
        &model,
        Some(grads),
        totals,
        false,
        1.0,
        &World::single(),
        &inner,
    );
    (model, agreed)
}

/// One process in f32 updates before it reads, spending the gradients: a gradient that is not
/// finite is named from the new weights, the same parameter as from the gradients, with Adam
/// (its first step by Burn's operations, the next in place on libtorch) and SGD, an average or
/// not, a NaN or an infinity, clipped or not (a NaN norm would make clipping's factor NaN, and
/// every weight with it).
#[test]
fn a_gradient_that_is_not_finite_is_named_after_the_update() {
    let bad = 2;
    for device in crate::device::test_devices() {
        for (sgd, clip, value) in [
            (false, 0.0, f32::NAN),
            (false, 1.0, f32::NAN),
            (false, 1.0, f32::INFINITY),
            (false, 0.0, f32::NEG_INFINITY),
            (true, 1.0, f32::NAN),
            (true, 0.0, f32::INFINITY),
        ] {
            let case = format!("{device:?}, sgd {sgd}, clip {clip}, gradient {value}");
            let (data, mut model, device) = tiny_simple_on(4, device.clone());
            let inner = device.clone().without_autodiff();
            let mut optimizer = if sgd {
                crate::optim::Optimizer::new(crate::optim::Rule::Sgd)
            } else {
                crate::optim::adam()
            };
            let mut ema = (!sgd).then(|| Ema::new(0.9, &model));
            for (run_step, plant) in [(1, None), (2, Some((bad, value)))] {
                let grads = gradients(&model, &data, &device, plant);
                let totals = Tensor::<1>::zeros([1], &inner);
                let update = Update {
                    learning_rate: 0.01,
                    clip,
                    run_step,
                    masked: false,
                };
                let pending;
                (model, pending) = gather(Flat::gradients(&model, grads), totals, false, 1.0)
                    .update(model, &mut optimizer, ema.as_mut(), update);
                let agreed = pending.read(&model);
                let first = agreed.norm.first_not_finite;
                assert_eq!(first, plant.map(|(at, _)| at), "{case}");
                assert_eq!(agreed.norm.is_finite(), plant.is_none(), "{case}");
            }
        }
    }
}

/// A gradient that is not finite is found where the step's gradients are agreed on, and the
/// error names the step and that parameter (its first infinite value planted in a real
/// backward pass: no finite loss of these small models has one, and a gradient merely too
/// large to square in f32 is summed in f64).
#[test]
fn a_gradient_that_is_not_finite_is_named() {
    let bad = 2; // the second layer's weight
    let (model, agreed) = agreed_with(bad, f32::INFINITY);
    let names = loss_scale::parameter_names(&model);
    assert!(!agreed.norm.is_finite());
    assert_eq!(agreed.norm.first_not_finite, Some(bad));
    let err = gradient_not_finite(&model, 6, agreed.norm, None);
    assert!(
        err.starts_with(&format!(
            "step 7: the gradient of `{}` is not finite",
            names[bad]
        )),
        "{err}"
    );
}

/// A gradient too large to square in f32 still has a finite norm: the sums are in f64.
#[test]
fn the_norm_is_summed_in_f64() {
    let (model, agreed) = agreed_with(0, 1e30);
    let n = Layout::of(&model).sizes[0] as f64;
    assert!(agreed.norm.is_finite());
    let expected = 1e30 * n.sqrt();
    assert!(
        (agreed.norm.norm / expected - 1.0).abs() < 1e-3,
        "{}",
        agreed.norm.norm
    );
}

/// The norm of square sums: f64 over the parameters, the first that is not finite named
/// (parameters without a gradient skipped).
#[test]
fn the_norm_names_the_first_parameter_that_is_not_finite() {
    let ok = GradientNorm::from_square_sums([Some(9.0), None, Some(16.0)]);
    assert_eq!((ok.norm, ok.first_not_finite), (5.0, None));
    let bad =
        GradientNorm::from_square_sums([Some(1.0), None, Some(f64::NAN), Some(f64::INFINITY)]);
    assert_eq!(bad.first_not_finite, Some(2));
    assert!(bad.norm.is_nan());
}

/// f16: more than `max_skipped_steps` overflowing steps in a row stop the run.
#[test]
fn f16_stops_after_too_many_skipped_steps_in_a_row() {
    let (data, model, device) = tiny_simple(16);
    let state = TrainState {
        model: model.with_precision(Precision::F16),
        optimizer: crate::optim::adam(),
        loss_scale: Some(LossScale {
            scale: 1e9,
            ..LossScale::default()
        }),
        ema: None,
        inputs: Default::default(),
    };
    let step = Step {
        max_skipped_steps: 1,
        ..plain(8)
    };
    let order: Vec<usize> = (0..16).collect();
    let mut skipped = Vec::new();
    let err = train_epoch(state, epoch(&data, &order, step, &device), |r| {
        skipped.push(r.skipped)
    })
    .err()
    .expect("two overflows in a row with max_skipped_steps = 1");
    assert_eq!(skipped, [true], "the first is reported, the second stops");
    assert!(err.contains("2 steps in a row were skipped"), "{err}");
}

/// An overflowing f16 step is skipped (the weights stay as they were) and the scale halves.
#[test]
fn overflowing_f16_step_is_skipped() {
    let (data, model, device) = tiny_simple(16);
    let model = model.with_precision(Precision::F16);
    let before: f32 = model
        .forward(
            Batch::gather(&data, &[0], &device).input,
            &Context::from_labels(&[0], &device),
        )
        .values()
        .sum()
        .into_scalar();
    // A scale at which the loss stays finite in f32 (a few bits per sub-pixel times 1e9) but
    // the gradients overflow f16 (largest value 65504) in the backward pass.
    let loss_scale = Some(LossScale {
        scale: 1e9,
        ..LossScale::default()
    });
    let step = plain(16);
    let order: Vec<usize> = (0..16).collect();
    let state = TrainState {
        model,
        optimizer: crate::optim::adam(),
        loss_scale,
        ema: None,
        inputs: Default::default(),
    };
    let (
        TrainState {
            model, loss_scale, ..
        },
        _,
        _,
    ) = train_epoch(state, epoch(&data, &order, step, &device), |_| {}).unwrap();
    let ls = loss_scale.unwrap();
    assert_eq!((ls.scale, ls.skipped), (5e8, 1), "{ls:?}");
    let after: f32 = model
        .forward(
            Batch::gather(&data, &[0], &device).input,
            &Context::from_labels(&[0], &device),
        )
        .values()
        .sum()
        .into_scalar();
    assert_eq!(before, after, "the overflowing step changed the weights");
}

/// f16 on libtorch: the device decides which steps to skip (the update masked, the loss scale
/// staged), and the run is the one whose host reads each step before its update, to the bit:
/// the weights, the average, the loss scale's state and every report, through a stretch of
/// overflowing steps after Adam's moments exist (a scale raised mid-run), with clipping.
#[test]
fn f16_skips_decided_on_the_device_are_the_hosts() {
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let (data, model, device) = tiny_simple_on(16, device);
        let model = model.with_precision(Precision::F16);
        let order: Vec<usize> = (0..16).collect();
        let step = Step {
            clip_grad_norm: 0.5,
            ..plain(4)
        };
        let run = |host: bool| {
            HOST_DECIDES.with(|h| h.set(host));
            let mut state = TrainState {
                ema: Some(Ema::new(0.9, &model)),
                model: model.clone(),
                optimizer: crate::optim::adam(),
                loss_scale: Some(LossScale {
                    scale: 4.0,
                    ..LossScale::default()
                }),
                inputs: Default::default(),
            };
            let mut reports = Vec::new();
            for e in 0..6 {
                if e == 1 {
                    // Overflows until the scale has halved enough.
                    state.loss_scale.as_mut().unwrap().scale = 1e8;
                }
                let (next, _, _) = train_epoch(state, epoch(&data, &order, step, &device), |r| {
                    reports.push((r.bits_per_dim, r.gradient_norm, r.skipped, r.loss_scale))
                })
                .unwrap();
                state = next;
            }
            HOST_DECIDES.with(|h| h.set(false));
            (state, reports)
        };
        let (device_run, on_device) = run(false);
        let (host_run, on_host) = run(true);
        // The device decided in one run and not in the other.
        assert!(device_run.inputs.loss_scale.address().is_some());
        assert!(host_run.inputs.loss_scale.address().is_none());
        // None in the first epoch (4 steps: Adam's moments made), some after, and steps taken
        // again at the end.
        let skipped: Vec<bool> = on_device.iter().map(|r| r.2).collect();
        assert!(!skipped[..4].contains(&true), "{on_device:?}");
        assert!(skipped[4..].contains(&true), "{on_device:?}");
        assert!(!skipped[skipped.len() - 1], "{on_device:?}");
        let bits = |r: &(f64, f64, bool, Option<f64>)| {
            let norm = r.1.is_finite().then_some(r.1.to_bits());
            (r.0.to_bits(), norm, r.2, r.3.map(f64::to_bits))
        };
        let [a, b] = [&on_device, &on_host].map(|r| r.iter().map(bits).collect::<Vec<_>>());
        assert_eq!(a, b);
        assert_eq!(device_run.loss_scale, host_run.loss_scale);
        assert_eq!(
            flat_parameters(&device_run.model),
            flat_parameters(&host_run.model)
        );
        let ema = |s: &TrainState| flat_parameters(s.ema.as_ref().unwrap().model());
        assert_eq!(ema(&device_run), ema(&host_run));
    }
}

/// A step whose loss is not finite stops the run with an error naming the step, though in f32
/// its update is taken before the loss is read (clipping on the device too): nothing is
/// reported and no state comes back.
#[test]
fn a_loss_that_is_not_finite_stops_the_run() {
    use crate::optim::{Flat, Layout, flatten, unflatten};
    let (data, model, device) = tiny_simple(8);
    let layout = Layout::of(&model);
    let values = flatten(&model, &layout);
    let n = layout.values();
    let nan = values.clone().narrow(0, 0, 1).mul_scalar(f32::NAN);
    let values = Tensor::cat(vec![nan, values.narrow(0, 1, n - 1)], 0);
    let model = unflatten(model, &Flat { values, layout });
    let state = TrainState {
        ema: Some(Ema::new(0.9, &model)),
        model,
        optimizer: crate::optim::adam(),
        loss_scale: None,
        inputs: Default::default(),
    };
    let step = Step {
        clip_grad_norm: 1.0,
        ..plain(8)
    };
    let order: Vec<usize> = (0..8).collect();
    let mut reports = 0;
    let err = train_epoch(state, epoch(&data, &order, step, &device), |_| reports += 1)
        .err()
        .expect("a NaN weight gives a NaN loss");
    assert_eq!(err, "step 1: the training loss became NaN");
    assert_eq!(reports, 0);
}

/// Adam, clipping and the average over `model`: how the replay tests train.
#[cfg(feature = "tch")]
fn replay_state(model: Model, precision: Precision) -> TrainState {
    TrainState {
        ema: Some(Ema::new(0.9, &model)),
        model,
        optimizer: crate::optim::adam(),
        // f16: a scale at which these models' gradients do not overflow, so that each step
        // is taken.
        loss_scale: (precision == Precision::F16).then_some(LossScale {
            scale: 4.0,
            ..LossScale::default()
        }),
        inputs: Default::default(),
    }
}

/// Step `i` of the run (batches of 4, clipping at 0.5) on `indices`, and the canonical trace of
/// its work on the device (`model::native::replay`).
#[cfg(feature = "tch")]
fn traced_step(
    state: TrainState,
    images: &Images,
    indices: &[usize],
    i: usize,
    device: &Device,
) -> (TrainState, Vec<String>) {
    use crate::model::native::replay;
    let step = Step {
        clip_grad_norm: 0.5,
        ..plain(4)
    };
    let at = StepAt {
        images,
        indices,
        i,
        run_step: i + 1,
    };
    let world = World::single();
    let (lines, taken) = replay::trace(|| take(state, at, &step, &|| false, &world, device));
    // (Adam's first step in f16 reads the host before its update: nothing to capture.)
    let lines = match lines.iter().any(|l| l == "# step: read") {
        true => replay::between(&lines, "step: device", "step: read"),
        false => Vec::new(),
    };
    (taken.unwrap().0, replay::canonical(&lines))
}

/// The device's part of a step on libtorch could be captured once as a CUDA graph and replayed:
/// two consecutive steps (after the first, which makes the buffers that live across steps) call
/// the same operators with the same scalars on the same buffers, and take nothing from the host
/// (`model::native::replay`). Checked on the CPU with different images each step, Adam,
/// clipping and the average, for the simple model, the class-conditional gated model (grey,
/// and RGB with a logistic mixture), PixelCNN++ (RGB, classes, dropout) and a PixelVAE (its
/// noise), the RGB ones in bf16 too, the gated and simple ones in f16 too.
#[cfg(feature = "tch")]
#[test]
fn a_step_on_libtorch_could_be_replayed() {
    use crate::model::native::replay;
    use crate::model::{Likelihood, PixelCnnPpConfig, SimpleConfig};
    #[allow(deprecated)]
    let device = Device::libtorch().autodiff();
    let gated = |colours, likelihood| {
        ModelConfig::Gated(GatedConfig {
            classes: Some(10),
            likelihood,
            ..GatedConfig::plain(colours, 3, 3, 6)
        })
    };
    let mixture = Likelihood::LogisticMixture { components: 2 };
    let configs = [
        ModelConfig::Simple(SimpleConfig {
            colours: 1,
            layers: 2,
            kernel: 3,
            channels: 4,
            likelihood: Likelihood::Categorical,
        }),
        gated(1, Likelihood::Categorical),
        gated(3, mixture),
        ModelConfig::PixelCnnPp(PixelCnnPpConfig {
            colours: 3,
            filters: 4,
            resnets: 1,
            likelihood: mixture,
            classes: Some(10),
            dropout: 0.5,
        }),
        ModelConfig::Vae(crate::model::VaeConfig {
            colours: 1,
            latent_channels: 2,
            downsample: 1,
            hidden: 4,
            conditioning: crate::model::VaeConditioning::Gates,
            decoder: GatedConfig {
                spatial_channels: 5,
                ..GatedConfig::plain(1, 2, 3, 6)
            },
        }),
    ];
    // Each in f32, the RGB models in bf16 too, and the first three in f16 (its skips decided
    // on the device, its loss scale staged).
    let runs = configs.into_iter().enumerate().flat_map(|(k, cfg)| {
        let bf16 = (cfg.colours() == 3).then(|| (cfg.clone(), Precision::Bf16));
        let f16 = (k < 3).then(|| (cfg.clone(), Precision::F16));
        std::iter::once((cfg, Precision::F32))
            .chain(bf16)
            .chain(f16)
    });
    for (cfg, precision) in runs {
        let spec = synthetic::Spec {
            size: 6,
            colours: cfg.colours(),
            train_images: 16,
        };
        let data = synthetic::generate(&spec, 1).train;
        let model = cfg.init(1, &device).with_precision(precision);
        let mut state = replay_state(model, precision);
        let order: Vec<usize> = (0..16).collect();
        let mut traces = Vec::new();
        let mut signatures = Vec::new();
        for i in 0..4 {
            signatures.push(signature_of(&mut state));
            let trace;
            (state, trace) = traced_step(state, &data, &order[4 * i..4 * i + 4], i, &device);
            traces.push(trace);
        }
        // What the CUDA graph's driver reads from the same steps: the first two cannot be
        // captured (they make Adam's moments and the gradients' buffer), the next two have one
        // signature, so that the fourth would be captured and the ones after replay it.
        assert!(
            signatures[0].is_none() && signatures[1].is_none(),
            "{cfg:?}"
        );
        assert!(signatures[2].is_some(), "{cfg:?}");
        assert_eq!(signatures[2], signatures[3], "{cfg:?} {precision:?}");
        assert!(traces[3].len() > 50, "{cfg:?}: {:#?}", traces[3]);
        let uploads = replay::uploads(&traces[3]);
        assert!(
            uploads.is_empty(),
            "{cfg:?} {precision:?} uploads: {uploads:#?}"
        );
        for trace in &traces[2..] {
            let reads = replay::host_reads(trace);
            assert!(reads.is_empty(), "{cfg:?} {precision:?} reads: {reads:#?}");
            // runtime.deterministic on a GPU refuses these.
            let atomic = replay::cuda_nondeterministic(trace);
            assert!(atomic.is_empty(), "{cfg:?} {precision:?}: {atomic:#?}");
        }
        if let Some(d) = replay::differences(&traces[2], &traces[3]) {
            panic!("{cfg:?} {precision:?}:\n{d}");
        }
    }
}

/// On libtorch the batch is written into one buffer step after step, a last partial batch at
/// its start: the next full batch finds it where it was (a captured step stays valid across
/// epochs), and the partial step reads exactly its own images (its loss is the one it has with
/// a buffer of its own).
#[test]
fn a_partial_batch_is_written_at_the_start_of_the_batch_buffer() {
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let (data, model, device) = tiny_simple_on(10, device);
        let fresh = |model: Model| TrainState {
            ema: None,
            model,
            optimizer: crate::optim::Optimizer::new(crate::optim::Rule::Sgd),
            loss_scale: None,
            inputs: Default::default(),
        };
        let mut state = fresh(model.clone());
        let order: Vec<usize> = (0..10).collect();
        let world = World::single();
        let mut addresses = Vec::new();
        let mut nats = Vec::new();
        for (i, indices) in [&order[0..4], &order[8..10], &order[4..8]]
            .into_iter()
            .enumerate()
        {
            let at = StepAt {
                images: &data,
                indices,
                i,
                run_step: i + 1,
            };
            let taken;
            (state, taken) = take(state, at, &plain(4), &|| false, &world, &device).unwrap();
            addresses.push(state.inputs.batch.address().unwrap());
            nats.push(taken.nats);
        }
        assert_eq!(addresses, vec![addresses[0]; 3]);
        // The partial step alone, from the weights it started from (one SGD step on 0..4).
        let mut alone = fresh(model);
        let at = StepAt {
            images: &data,
            indices: &order[0..4],
            i: 0,
            run_step: 1,
        };
        alone = take(alone, at, &plain(4), &|| false, &world, &device)
            .unwrap()
            .0;
        alone.inputs = Default::default();
        let at = StepAt {
            images: &data,
            indices: &order[8..10],
            i: 1,
            run_step: 2,
        };
        let (_, taken) = take(alone, at, &plain(4), &|| false, &world, &device).unwrap();
        assert_eq!(taken.nats.to_bits(), nats[1].to_bits());
    }
}

/// A batch gathered on an autodiff device is on it, its input ready to take a gradient (what the
/// receptive field asks of it), on every backend, written into a step's buffer or not.
#[test]
fn a_batch_on_an_autodiff_device_can_take_a_gradient() {
    for device in crate::device::test_devices() {
        let (data, _, device) = tiny_simple_on(4, device);
        let mut buffer = Default::default();
        for batch in [
            Batch::gather(&data, &[0, 1], &device),
            Batch::upload(&data, &[0, 1], &device, Some(&mut buffer)).batch(),
        ] {
            assert!(batch.input.is_autodiff(), "{device:?}");
            let input = batch.input.detach().require_grad();
            let grads = (input.clone() * 2.0).sum().backward();
            assert!(input.grad(&grads).is_some(), "{device:?}");
        }
    }
}

/// A step captured before an epoch's last, partial batch would still do the work of the next
/// epoch's first full step: neither the partial step (run eagerly) nor what a run does between
/// epochs (a checkpoint, a test pass with the averaged weights) moves a buffer a replay reads.
#[cfg(feature = "tch")]
#[test]
fn a_replayed_step_stays_valid_across_an_epoch_end() {
    use crate::model::native::replay;
    #[allow(deprecated)]
    let device = Device::libtorch().autodiff();
    let cfg = ModelConfig::Gated(GatedConfig {
        classes: Some(10),
        ..GatedConfig::plain(1, 3, 3, 6)
    });
    let spec = synthetic::Spec {
        size: 6,
        colours: 1,
        train_images: 14,
    };
    let data = synthetic::generate(&spec, 1).train;
    let model = cfg.init(1, &device);
    let mut state = replay_state(model, Precision::F32);
    let order: Vec<usize> = (0..14).collect();
    let batches = [0..4, 4..8, 8..12, 12..14, 0..4];
    let mut traces = Vec::new();
    let mut signatures = Vec::new();
    for (i, range) in batches.into_iter().enumerate() {
        signatures.push(signature_of(&mut state));
        let trace;
        (state, trace) = traced_step(state, &data, &order[range], i, &device);
        traces.push(trace);
        if i == 3 {
            // The end of the epoch: what a checkpoint writes (`checkpoint::save`, a layer up).
            let dir = tempfile::tempdir().unwrap();
            let valid = burn::module::Module::valid(&state.model);
            state
                .optimizer
                .save(&valid, &dir.path().join("optimizer"))
                .unwrap();
            for (name, model) in [
                ("model", Some(&valid)),
                ("ema", state.ema.as_ref().map(Ema::model)),
            ] {
                if let Some(model) = model {
                    burn::module::Module::save_file(model.clone(), dir.path().join(name)).unwrap();
                }
            }
            drop(valid);
            let batch = Batch::gather(&data, &order[0..4], &device.clone().without_autodiff());
            let tested = crate::loss::nll_nats(
                burn::module::Module::valid(state.eval_model())
                    .forward(batch.input, &batch.context),
                batch.target,
            );
            assert!(tested.into_scalar::<f32>().is_finite());
        }
    }
    if let Some(d) = replay::differences(&traces[2], &traces[4]) {
        panic!("{d}");
    }
    // The graph's driver sees the same buffers on either side (the partial batch only differs
    // in its number of images, so it runs eagerly beside the graph, which it keeps).
    assert!(signatures[2].is_some());
    assert_eq!(signatures[2], signatures[4]);
    assert_eq!(signatures[2], signatures[3]);
}

/// The signature the CUDA graph's driver would compute for the next step of `state` (its
/// buffers; the step's numbers are left out).
#[cfg(feature = "tch")]
fn signature_of(state: &mut TrainState) -> Option<graph::Signature> {
    signature(
        Vec::new(),
        &state.model,
        &state.optimizer,
        state.ema.as_mut(),
        &state.inputs,
    )
}
