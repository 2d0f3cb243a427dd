//! Polyak averaging (Polyak & Juditsky 1992, as PixelCNN++ uses it): an exponential moving
//! average of the weights after every step, bias-corrected as Adam corrects its moments: after t
//! steps it is `sum_s decay^(t - s) w_s / sum_s decay^(t - s)` over the weights w_1..w_t after each
//! step, so that the random initial weights have no part in it. (openai/pixel-cnn starts its
//! average at the initial weights: with decay 0.9995 they are still 65 % of it after 860 steps,
//! one MNIST epoch at batch 64, and the first epochs' test numbers are those of a model mostly at
//! its initialisation; the two agree once decay^t is small.) As a recursion: `ema = d_t ema +
//! (1 - d_t) w` with `d_t = decay (1 - decay^(t - 1)) / (1 - decay^t)`, so that step 1 copies
//! the weights.

use crate::model::Model;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use std::collections::HashMap;

/// The averaged weights: a model on the inference device, like the trained one.
#[derive(Clone)]
pub struct Ema {
    pub decay: f64,
    pub model: Model,
}

impl Ema {
    /// Starts the average at `model`'s weights.
    pub fn new(decay: f64, model: &Model) -> Ema {
        Ema {
            decay,
            model: model.valid(),
        }
    }

    /// Moves the average towards `model`'s weights after global step `t` (1 for the first).
    pub fn update(&mut self, model: &Model, t: usize) {
        struct Collect(HashMap<ParamId, Tensor<1>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let value = param.val();
                let n = value.shape().num_elements();
                self.0.insert(param.id, value.reshape([n]));
            }
        }
        struct Average {
            current: HashMap<ParamId, Tensor<1>>,
            decay: f64,
        }
        impl ModuleMapper for Average {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let Some(w) = self.current.remove(&param.id) else {
                    return param;
                };
                let decay = self.decay;
                param.map(|e| {
                    let w: Tensor<D> = w.reshape(e.shape());
                    e * decay + w * (1.0 - decay)
                })
            }
        }
        let mut collect = Collect(HashMap::new());
        model.valid().visit(&mut collect);
        let d = self.decay;
        let t = t.max(1) as i32;
        let decay = d * (1.0 - d.powi(t - 1)) / (1.0 - d.powi(t));
        let mut average = Average {
            current: collect.0,
            decay,
        };
        self.model = self.model.clone().map(&mut average);
    }
}
