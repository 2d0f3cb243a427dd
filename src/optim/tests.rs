use super::*;
use crate::model::{Context, GatedConfig, ModelConfig};
use burn::optim::{AdamConfig, ModuleOptimizer};
use burn::tensor::Device;

/// A small class-conditional gated PixelCNN on `device` (autodiff), and a function giving the
/// gradients of a fixed loss of its outputs.
fn gated(device: &Device) -> (Model, impl Fn(&Model) -> GradientsParams) {
    let device = device.clone().autodiff();
    let model = gated_model(2, 6, &device);
    let pixels: Vec<f32> = (0..2 * 3 * 4 * 4)
        .map(|i| ((i * 37) % 256) as f32)
        .collect();
    let x = Tensor::<4>::from_data(TensorData::new(pixels, [2, 3, 4, 4]), &device);
    let context = Context::from_labels(&[0, 2], &device);
    let grads = move |model: &Model| {
        let v = model.forward(x.clone(), &context).values();
        let loss = (v.clone() * v).mean();
        GradientsParams::from_grads(loss.backward(), model)
    };
    (model, grads)
}

fn gated_model(layers: usize, channels: usize, device: &Device) -> Model {
    ModelConfig::Gated(GatedConfig {
        classes: Some(3),
        ..GatedConfig::plain(3, layers, 3, channels)
    })
    .init(1, device)
}

fn bits(model: &Model) -> Vec<u32> {
    let layout = Layout::of(model);
    let values: Vec<f32> = flatten(model, &layout)
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap();
    values.into_iter().map(f32::to_bits).collect()
}

fn burn_adam() -> ModuleOptimizer {
    AdamConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .init()
}

/// Step for step, the flat Adam gives bit for bit the weights of Burn's Adam (configured the
/// same), on every backend: while every parameter has a gradient, when one misses a step
/// (its step count falls behind the others'), and across a save and load in either
/// direction, where each reads the other's file.
#[test]
fn flat_adam_is_burns_adam_bit_for_bit() {
    for device in crate::device::test_devices() {
        let (start, grads_of) = gated(&device);
        let (mut ours, mut theirs) = (start.clone(), start.clone());
        let mut flat = adam();
        let mut burn = burn_adam();
        let first_id = Layout::of(&start).ids[0];
        // Burn's loaded state reads its file lazily: the folder outlives the loop.
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=5 {
            let lr = 0.01 / step as f64;
            let mut g_ours = grads_of(&ours);
            let mut g_theirs = grads_of(&theirs);
            if step == 3 {
                // The first parameter misses this step.
                g_ours.remove::<4>(first_id).expect("a gradient to drop");
                g_theirs.remove::<4>(first_id).expect("a gradient to drop");
            }
            (ours, _) = flat.step(lr, ours, Flat::gradients(&start, g_ours));
            theirs = burn.step(lr, theirs, g_theirs);
            assert_eq!(bits(&ours), bits(&theirs), "{device:?}, step {step}");
            assert_ne!(bits(&ours), bits(&start), "the step moved the weights");
            if step == 4 {
                let (a, b) = (dir.path().join("ours.bpk"), dir.path().join("burn.bpk"));
                flat.save(&ours, &a).unwrap();
                burn.save(&b).unwrap();
                // Each reads the other's file, and goes on as if nothing happened.
                flat = adam().load(&ours, &b).unwrap();
                burn = burn_adam().load(&a).unwrap();
            }
        }
    }
}

/// The square sum is Burn's `cast(F64).square().sum()` to the bit on every backend, at the
/// extremes too: overflowing f32 squares, subnormals, infinities and NaN.
#[test]
fn square_sum_is_burns_on_every_backend() {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let random: Vec<f32> = (0..(1 << 17) + 3)
        .map(|_| rand::RngExt::random_range(&mut rng, -3.0f32..3.0))
        .collect();
    let cases: Vec<Vec<f32>> = vec![
        random,
        vec![f32::MAX, -f32::MAX, 1e-45, -1e-40, 0.0, -0.0],
        vec![1.0, f32::INFINITY, 2.0],
        vec![1.0, f32::NAN],
        vec![3.0],
    ];
    for device in crate::device::test_devices() {
        for values in &cases {
            let x =
                Tensor::<1>::from_data(TensorData::new(values.clone(), [values.len()]), &device);
            let ours = f64_of(square_sum(x.clone()));
            let burns = f64_of(x.cast(FloatDType::F64).square().sum());
            assert!(values.len() <= crate::model::native::CPU_PIECE);
            assert_eq!(
                ours.to_bits(),
                burns.to_bits(),
                "{device:?}, {} values",
                values.len()
            );
        }
    }
}

/// Beyond one of libtorch's CPU pieces, the square sum is each piece's, as Burn's, summed in f64
/// (one sum over all everywhere else), which may differ from one sum in the last bits.
#[test]
fn square_sums_of_pieces_are_summed() {
    for device in crate::device::test_devices() {
        let x = long_values(9, &device);
        let ours = f64_of(square_sum(x.clone()));
        let burns = |x: Tensor<1>| x.cast(FloatDType::F64).square().sum();
        // The test devices are CPUs.
        let expected = if crate::model::native::runs_fused(&device) {
            let piece = crate::model::native::CPU_PIECE;
            let n = x.dims()[0];
            let sums = (0..n)
                .step_by(piece)
                .map(|start| burns(x.clone().narrow(0, start, piece.min(n - start))))
                .collect();
            f64_of(Tensor::cat(sums, 0).sum())
        } else {
            f64_of(burns(x))
        };
        assert_eq!(ours.to_bits(), expected.to_bits(), "{device:?}");
    }
}

fn f64_of(t: Tensor<1>) -> f64 {
    t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()[0]
}

/// Gradients written into the buffer the last step spent give the same steps, bit for bit, as
/// gradients in a fresh buffer each step.
#[test]
fn reused_gradient_buffers_give_the_same_steps() {
    for device in crate::device::test_devices() {
        let (start, grads_of) = gated(&device);
        let (mut reused, mut fresh) = (adam(), adam());
        let (mut a, mut b) = (start.clone(), start);
        for _ in 0..4 {
            let grads = reused.flat_gradients(&a, grads_of(&a));
            (a, _) = reused.step(0.01, a, grads);
            (b, _) = fresh.step(0.01, b.clone(), Flat::gradients(&b, grads_of(&b)));
            assert_eq!(bits(&a), bits(&b), "{device:?}");
        }
    }
}

/// A step writes in place only what nothing else holds: an optimizer kept from before the
/// step (a clone, as a checkpoint being written holds one) takes the same step alike, and the
/// model the step started from keeps its weights.
#[test]
fn a_step_leaves_what_others_hold_as_it_was() {
    for device in crate::device::test_devices() {
        let (start, grads_of) = gated(&device);
        let step = |optimizer: &mut Optimizer, model: &Model| {
            let grads = Flat::gradients(model, grads_of(model));
            optimizer.step(0.01, model.clone(), grads).0
        };
        let mut flat = adam();
        let one = step(&mut flat, &start);
        let kept = flat.clone();
        let before = bits(&one);
        let a = step(&mut flat, &one);
        let b = step(&mut kept.clone(), &one);
        assert_eq!(bits(&a), bits(&b), "{device:?}");
        assert_eq!(bits(&one), before, "{device:?}");
        assert_ne!(bits(&a), before, "{device:?}: the step moved the weights");
        // And the kept optimizer's second step is still the first's twin.
        let c = step(&mut kept.clone(), &one);
        assert_eq!(bits(&c), bits(&b), "{device:?}");
    }
}

/// The weights after a step keep their autodiff and `require_grad`: the next step trains
/// them (a model without them would have no gradients).
#[test]
fn stepped_weights_still_train() {
    let device = Device::flex();
    let (model, grads_of) = gated(&device);
    let mut flat = adam();
    let first = Flat::gradients(&model, grads_of(&model));
    let layout = first.layout.clone();
    assert!(!layout.ids.is_empty());
    let (model, new) = flat.step(0.01, model, first);
    assert_eq!(new.layout, layout);
    let again = Flat::gradients(&model, grads_of(&model));
    assert_eq!(again.layout, layout, "the same parameters have gradients");
}

/// A state file whose moments do not fit the model is refused, naming what is wrong.
#[test]
fn a_state_for_another_model_is_refused() {
    let device = Device::flex();
    let (model, grads_of) = gated(&device);
    let mut flat = adam();
    let (model, _) = flat.step(
        0.01,
        model.clone(),
        Flat::gradients(&model, grads_of(&model)),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.bpk");
    flat.save(&model, &path).unwrap();
    // Parameters are numbered in visiting order: a wider model has other sizes under the
    // same numbers, a shallower one other sizes and fewer numbers.
    for other in [gated_model(2, 9, &device), gated_model(1, 6, &device)] {
        let err = adam().load(&other, &path).err().expect("another model");
        assert!(
            err.contains("no moment_1 of") || err.contains("which the model does not have"),
            "{err}"
        );
    }
}

/// On libtorch, a step after the first writes the weights where they are: the model's
/// parameters stay views of one buffer, at one address step after step (what a CUDA graph's
/// replay needs), and the update reads its scalars from one buffer too; the bits are those of
/// the steps that copy them (see `flat_adam_is_burns_adam_bit_for_bit`).
#[test]
fn the_weights_stay_where_they_are() {
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let (mut model, grads_of) = gated(&device);
        let mut flat = adam();
        let (mut at, mut scalars_at, mut grads_at) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let grads = flat.flat_gradients(&model, grads_of(&model));
            grads_at.push(crate::model::native::address(&grads.values).unwrap());
            let layout = grads.layout.clone();
            (model, _) = flat.step(0.01, model, grads);
            let weights = flat.weights.as_ref().expect("kept on libtorch");
            let parts = parameter_values(&model, &layout);
            assert!(crate::model::native::views_of(weights, &parts));
            drop(parts);
            // Besides the optimizer, only the model's parameters hold them.
            assert_eq!(
                crate::model::native::other_holders(weights),
                Some(layout.ids.len())
            );
            at.push(crate::model::native::address(weights).unwrap());
            scalars_at.push(flat.scalars.address());
        }
        // The first step (Burn's operations) makes the buffer; the others write into it, with
        // their scalars read from one buffer of the device too.
        assert!(at[1..].iter().all(|&a| a == at[1]), "{at:x?}");
        assert_eq!(scalars_at[0], None);
        assert!(scalars_at[1].is_some());
        assert!(scalars_at[1..].iter().all(|&a| a == scalars_at[1]));
        // The gradients of a step after the second land in the buffer the one before spent.
        assert!(
            grads_at[2..].iter().all(|&a| a == grads_at[1]),
            "{grads_at:x?}"
        );
    }
}

/// Values for the passes over all weights: more than two of libtorch's CPU pieces, so that
/// piece boundaries fall inside them, at a seed.
fn long_values(seed: u64, device: &Device) -> Tensor<1> {
    let n = 2 * crate::model::native::CPU_PIECE + 3;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let values: Vec<f32> = (0..n)
        .map(|_| rand::RngExt::random_range(&mut rng, -1.0f32..1.0))
        .collect();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Adam in place, piece by piece on the CPU, gives the bits of Burn's operations over the whole,
/// with weights, moments and gradients shared or not.
#[test]
fn adam_in_pieces_is_adam_whole() {
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let [w, g, m] = [1, 2, 3].map(|seed| long_values(seed, &device));
        let v = long_values(4, &device).abs();
        let layout = Layout {
            ids: vec![ParamId::new()],
            sizes: vec![w.dims()[0]],
        };
        let state = |time| Optimizer {
            groups: vec![Moments {
                layout: layout.clone(),
                time,
                first: m.clone(),
                second: v.clone(),
            }],
            ..adam()
        };
        let grads = Flat {
            values: g.clone(),
            layout: layout.clone(),
        };
        for time in [1, 1000] {
            let whole = state(time).step_by_burn(0.003, w.clone(), grads.clone());
            let (mut a, mut b) = (state(time), state(time));
            // Everything shared (the gradients' buffer takes no root), then nothing.
            let shared = a.adam_in_place(0.003, w.clone(), false, grads.clone(), None);
            let unshared = Flat {
                values: g.clone() * 1.0,
                layout: layout.clone(),
            };
            let own = b.adam_in_place(0.003, w.clone() * 1.0, false, unshared, None);
            assert_eq!(
                first_difference(&shared.values, &whole.values),
                None,
                "{time}"
            );
            assert_eq!(first_difference(&own.values, &whole.values), None, "{time}");
            for (x, y) in [(&a, &b), (&b, &a)] {
                let [p, q] = [x, y].map(|o| &o.groups[0]);
                assert_eq!(first_difference(&p.first, &q.first), None);
                assert_eq!(first_difference(&p.second, &q.second), None);
            }
        }
        // What was shared is as it was.
        for (seed, held) in [(1, &w), (2, &g), (3, &m)] {
            assert_eq!(
                first_difference(held, &long_values(seed, &device)),
                None,
                "{seed}"
            );
        }
    }
}

/// A step whose decision is the device's ([`Optimizer::step_unless`] in place): kept, it is the
/// plain step to the bit; not kept, with gradients that are not finite (NaN, both infinities,
/// one in each piece on the CPU), the weights and moments keep their values, and once settled
/// the step count too, so that the next step is the one it would have been.
#[test]
fn a_step_the_device_declines_changes_nothing() {
    use burn::tensor::Bool;
    for device in crate::device::test_devices() {
        if !crate::model::native::runs_fused(&device) {
            continue;
        }
        let model = gated_model(2, 4, &device.clone().autodiff());
        let layout = Layout::of(&model);
        let n = layout.values();
        let values = |seed: u64| {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            let v: Vec<f32> = (0..n)
                .map(|_| rand::RngExt::random_range(&mut rng, -1.0f32..1.0))
                .collect();
            Flat {
                values: Tensor::from_data(TensorData::new(v, [n]), &device),
                layout: layout.clone(),
            }
        };
        let keep = |k: bool| Some(Tensor::<1, Bool>::from_data(TensorData::from([k]), &device));
        // Two optimizers one step in (moments made), the same.
        let start = |opt: &mut Optimizer| {
            opt.stage(1e-3, &device);
            opt.step(1e-3, model.clone(), values(1)).0
        };
        let (mut plain, mut masked) = (adam(), adam());
        let (mut a, mut b) = (start(&mut plain), start(&mut masked));
        // Kept: the plain step's bits.
        plain.stage(1e-3, &device);
        masked.stage(1e-3, &device);
        let x;
        (a, x) = plain.step(1e-3, a, values(2));
        let y;
        (b, y) = masked.step_unless(1e-3, b, values(2), keep(true));
        masked.settle(true);
        assert_eq!(first_difference(&x.values, &y.values), None);
        // Declined, on gradients that are not finite.
        let before = flatten(&b, &layout);
        let moments = |o: &Optimizer| (o.groups[0].first.clone(), o.groups[0].second.clone());
        let (m, v) = moments(&masked);
        let [m, v] = [m, v].map(|t| t * 1.0); // copies: the step writes in place
        let mut bad: Vec<f32> = values(3)
            .values
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        for (k, at) in [1, n / 2, n - 1].into_iter().enumerate() {
            bad[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][k];
        }
        let bad = Flat {
            values: Tensor::from_data(TensorData::new(bad, [n]), &device),
            layout: layout.clone(),
        };
        masked.stage(1e-3, &device);
        let declined;
        (b, declined) = masked.step_unless(1e-3, b, bad, keep(false));
        masked.settle(false);
        let same = |p: &Tensor<1>, q: &Tensor<1>| {
            let [p, q] = [p, q].map(|t| t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap());
            p == q
        };
        assert!(same(&declined.values, &before), "the weights moved");
        let (m2, v2) = moments(&masked);
        assert!(same(&m, &m2) && same(&v, &v2), "the moments moved");
        assert_eq!(masked.groups[0].time, plain.groups[0].time);
        // The next step is the plain optimizer's next step.
        plain.stage(1e-3, &device);
        masked.stage(1e-3, &device);
        let x = plain.step(1e-3, a, values(4)).1;
        let y = masked.step_unless(1e-3, b, values(4), keep(true)).1;
        assert_eq!(first_difference(&x.values, &y.values), None);
    }
}
