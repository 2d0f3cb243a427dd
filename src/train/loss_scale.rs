//! Dynamic loss scaling for f16 training: the scale, its schedule, and unscaling the gradients.

use crate::model::Model;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// Dynamic loss scaling for f16 training (Micikevicius et al. 2018, "Mixed Precision Training"):
/// the loss is multiplied by `scale` before the backward pass so that small gradients survive in
/// f16, and the gradients are divided by it before the optimizer sees them. A step whose gradients
/// overflow is skipped and the scale halved; after `GROWTH_INTERVAL` good steps in a row it doubles.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: usize,
    /// Steps skipped so far because of overflow.
    pub skipped: usize,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: 65536.0,
            good_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScale {
    pub const GROWTH_INTERVAL: usize = 2000;

    /// Records whether the last step's gradients were finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(f64::from(f32::MAX) / 2.0);
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
        }
    }
}

/// Multiplies every gradient of `model` by `factor` (none for 1) and returns their global L2 norm
/// after it: infinite or NaN when a gradient is not finite.
pub(super) fn rescale_gradients(model: &Model, grads: &mut GradientsParams, factor: f64) -> f64 {
    struct Rescale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Rescale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                let g = if self.factor == 1.0 {
                    g
                } else {
                    g * self.factor
                };
                let size = g.clone().powi_scalar(2).sum();
                self.total = Some(match self.total.take() {
                    None => size,
                    Some(t) => t + size,
                });
                self.grads.register(param.id, g);
            }
        }
    }
    let mut visitor = Rescale {
        grads,
        factor,
        total: None,
    };
    model.visit(&mut visitor);
    visitor
        .total
        .map_or(0.0, |t| f64::from(t.into_scalar::<f32>()).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_good_steps() {
        let mut ls = LossScale::default();
        ls.update(false);
        assert_eq!((ls.scale, ls.skipped), (32768.0, 1));
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            ls.update(true);
        }
        assert_eq!(ls.scale, 32768.0);
        ls.update(true);
        assert_eq!((ls.scale, ls.good_steps), (65536.0, 0));
        for _ in 0..40 {
            ls.update(false);
        }
        assert_eq!(ls.scale, 1.0, "never below 1");
    }
}
