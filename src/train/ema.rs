//! Polyak averaging (Polyak & Juditsky 1992, as PixelCNN++ uses it): an exponential moving
//! average of the weights, `ema = decay * ema + (1 - decay) * w` after every step, started at
//! the initial weights (no bias correction, as TensorFlow's `ExponentialMovingAverage` without
//! `num_updates`).

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

    /// Moves the average towards `model`'s current weights.
    pub fn update(&mut self, model: &Model) {
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
        let mut average = Average {
            current: collect.0,
            decay: self.decay,
        };
        self.model = self.model.clone().map(&mut average);
    }
}
