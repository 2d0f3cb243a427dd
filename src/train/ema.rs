//! Polyak averaging (Polyak & Juditsky 1992, as PixelCNN++ uses it): an exponential moving
//! average of the weights after every step, bias-corrected as Adam corrects its moments: after t
//! steps it is `sum_s decay^(t - s) w_s / sum_s decay^(t - s)` over the weights w_1..w_t after each
//! step, so that the random initial weights have no part in it. (openai/pixel-cnn starts its
//! average at the initial weights: with decay 0.9995 they are still 65 % of it after 860 steps,
//! one MNIST epoch at batch 64, and the first epochs' test numbers are those of a model mostly at
//! its initialisation; the two agree once decay^t is small.) As a recursion: `ema = d_t ema +
//! (1 - d_t) w` with `d_t = decay (1 - decay^(t - 1)) / (1 - decay^t)`, so that step 1 copies
//! the weights.
//!
//! The average is kept flat, over the parameters the optimizer moves, in one buffer beside the
//! optimizer's, and updated in three tensor operations per step (on libtorch in place); the model
//! that evaluation and checkpoints read is made from it when asked. A parameter the optimizer has
//! never moved keeps its starting value in the average, which is what the recursion gives for a
//! constant.

use crate::model::Model;
use crate::model::native::DeviceBuffer;
use crate::optim::{Flat, Layout, flatten, unflatten};
use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};
use std::cell::OnceCell;

/// The averaged weights: a model on the inference device, like the trained one.
#[derive(Clone)]
pub struct Ema {
    pub decay: f64,
    /// The average after the last update over the parameters moved so far; None before the first
    /// update (it is then `start`).
    average: Option<Flat>,
    /// The average it started from, and the shape of the model made from `average`.
    start: Model,
    model: OnceCell<Model>,
    /// On libtorch, the update's decay and its complement, on the device.
    scalars: DeviceBuffer,
}

impl Ema {
    /// Starts the average at `model`'s weights.
    pub fn new(decay: f64, model: &Model) -> Ema {
        Ema::from_average(decay, model.valid())
    }

    /// Goes on with an average read back from a checkpoint.
    pub fn from_average(decay: f64, average: Model) -> Ema {
        Ema {
            decay,
            average: None,
            start: average,
            model: OnceCell::new(),
            scalars: DeviceBuffer::default(),
        }
    }

    /// The averaged weights as a model (made once per update, when first asked for).
    pub fn model(&self) -> &Model {
        match &self.average {
            None => &self.start,
            Some(average) => self
                .model
                .get_or_init(|| unflatten(self.start.clone(), average)),
        }
    }

    /// The bias-corrected decay of the update after global step `t` (1 for the first).
    fn decay_at(&self, t: usize) -> f64 {
        let d = self.decay;
        let t = t.max(1) as i32;
        d * (1.0 - d.powi(t - 1)) / (1.0 - d.powi(t))
    }

    /// Writes the factors of the update after step `t` into their buffer on `device` now, on
    /// libtorch, so that the update itself takes nothing from the host.
    pub fn stage(&mut self, t: usize, device: &Device) {
        if crate::model::native::runs_fused(device) {
            self.scalars.write(&factors(self.decay_at(t)), device);
        }
    }

    /// What a step captured as a CUDA graph reads and writes of the average's: its values'
    /// buffer (address and other holders, once the model made from it is dropped: an update
    /// would drop it) and its scalars' (see `train::step::graph`). None before the first update
    /// (it makes the buffer).
    pub fn graph_buffers(&mut self) -> Option<Vec<Option<(usize, usize)>>> {
        self.model = OnceCell::new();
        let average = self.average.as_ref()?;
        let values = crate::model::native::address(&average.values)
            .zip(crate::model::native::other_holders(&average.values));
        Some(vec![values, self.scalars.address().map(|a| (a, 0))])
    }

    /// After a replay of a captured step: what its update did on the host (the model made from
    /// the average is made again when asked).
    pub fn replayed(&mut self) {
        self.model = OnceCell::new();
    }

    /// Moves the average towards the weights after global step `t` (1 for the first): `weights`
    /// are the values the optimizer gave the parameters it moved, `model` holds them all. With
    /// `keep` (`[1]`, on the device), only where it is true: decided on libtorch's device, read
    /// elsewhere (a skipped f16 step; see `Optimizer::step_unless`).
    pub fn update(
        &mut self,
        weights: &Flat,
        model: &Model,
        t: usize,
        keep: Option<Tensor<1, Bool>>,
    ) {
        // The model made from the average holds views of it: dropped first, so that the average
        // is written in place.
        self.model = OnceCell::new();
        let (average, current) = match self.average.take() {
            // Every step in practice: the optimizer moves the same parameters each time.
            Some(average) if average.layout == weights.layout => (average, weights.values.clone()),
            None => {
                let values = flatten(&self.start, &weights.layout);
                let average = Flat {
                    values,
                    layout: weights.layout.clone(),
                };
                (average, weights.values.clone())
            }
            // A parameter missed a step, or one moved for the first time: the average covers
            // both, and moves towards every one of their current values.
            Some(average) => {
                let layout = Layout::union(model, &average.layout, &weights.layout);
                let start = unflatten(self.start.clone(), &average);
                let values = flatten(&start, &layout);
                self.start = start;
                let current = flatten(model, &layout);
                (Flat { values, layout }, current)
            }
        };
        let decay = self.decay_at(t);
        let values = if crate::model::native::runs_fused(&current.device()) {
            let scalars = self.scalars.holding(&factors(decay), &current.device());
            crate::model::native::ema_in_place(average.values, current, scalars, keep)
        } else if keep.is_some_and(|k| !k.into_scalar::<bool>()) {
            average.values
        } else {
            average.values * decay + current * (1.0 - decay)
        };
        self.average = Some(Flat {
            values,
            layout: average.layout,
        });
    }
}

/// `decay` and `1 - decay` as the f32 factors that ATen makes of Burn's scalars (the second
/// computed in f64 first, as Burn's caller does); then 1 and 0, the factors of an update not
/// taken (`average * 1 + current * 0`).
fn factors(decay: f64) -> [f32; 4] {
    [decay as f32, (1.0 - decay) as f32, 1.0, 0.0]
}

#[cfg(test)]
mod tests {
    use super::factors;
    use crate::model::native::DeviceBuffer;
    use crate::optim::first_difference;
    use burn::tensor::{Tensor, TensorData};

    /// On libtorch the average is brought forward in place (piece by piece on the CPU, where
    /// more than two pieces are here) with the bits of Burn's `average * decay + current * (1 -
    /// decay)` (its factors read from one buffer of the device, whatever the decay), and a copy
    /// of it held elsewhere keeps its values.
    #[test]
    fn the_average_in_place_is_burns_formula() {
        for device in crate::device::test_devices() {
            if !crate::model::native::runs_fused(&device) {
                continue;
            }
            let n = 2 * crate::model::native::CPU_PIECE + 3;
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
            let mut values = || -> Tensor<1> {
                let v: Vec<f32> = (0..n)
                    .map(|_| rand::RngExt::random_range(&mut rng, -2.0f32..2.0))
                    .collect();
                Tensor::from_data(TensorData::new(v, [n]), &device)
            };
            let (average, current) = (values(), values());
            let before = average.clone() * 1.0;
            let mut scalars = DeviceBuffer::default();
            let mut at = Vec::new();
            for decay in [0.0, 0.9995, 0.3, 1.0 - 1e-9] {
                let burns = average.clone() * decay + current.clone() * (1.0 - decay);
                let s = scalars.write(&factors(decay), &device);
                let shared = crate::model::native::ema_in_place(
                    average.clone(),
                    current.clone(),
                    s.clone(),
                    None,
                );
                let own = crate::model::native::ema_in_place(
                    average.clone() * 1.0,
                    current.clone(),
                    s.clone(),
                    None,
                );
                // Decided on the device: kept, the same bits; declined, the average as it was.
                for k in [true, false] {
                    let keep = Tensor::<1, burn::tensor::Bool>::from_data([k], &device);
                    let masked = crate::model::native::ema_in_place(
                        average.clone() * 1.0,
                        current.clone(),
                        s.clone(),
                        Some(keep),
                    );
                    let expected = if k { &burns } else { &average };
                    assert_eq!(first_difference(&masked, expected), None, "{decay} {k}");
                }
                assert_eq!(first_difference(&shared, &burns), None, "{decay}");
                at.push(scalars.address().expect("written"));
                assert_eq!(first_difference(&own, &burns), None, "{decay}");
            }
            assert_eq!(
                first_difference(&average, &before),
                None,
                "the held average changed"
            );
            assert!(
                at.iter().all(|&a| a == at[0]),
                "one buffer of scalars: {at:x?}"
            );
        }
    }
}
