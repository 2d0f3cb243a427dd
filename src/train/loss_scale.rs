//! Dynamic loss scaling for f16 training: the scale, its schedule, and unscaling the gradients.

use crate::model::Model;
use burn::module::{Module, ModuleVisitor, Param};
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
    /// Steps skipped in a row up to the last one (0 after a step taken).
    #[serde(default)]
    pub skipped_in_a_row: usize,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: 65536.0,
            good_steps: 0,
            skipped: 0,
            skipped_in_a_row: 0,
        }
    }
}

impl LossScale {
    pub const GROWTH_INTERVAL: usize = 2000;

    /// Records whether the last step's gradients were finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.skipped_in_a_row = 0;
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(f64::from(f32::MAX) / 2.0);
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
            self.skipped_in_a_row += 1;
        }
    }
}

/// The global L2 norm of a step's gradients, and where it is not finite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GradientNorm {
    /// Not finite when a gradient is not (or its square sum overflows f32).
    pub norm: f64,
    /// The first parameter, in visiting order ([`parameter_names`]), whose gradient is not finite.
    pub first_not_finite: Option<usize>,
}

impl GradientNorm {
    /// Whether every gradient was finite, so that a step can be taken on them (where one is
    /// not, it may not be named: the norm says).
    pub fn is_finite(&self) -> bool {
        self.norm.is_finite()
    }

    /// The norm from each parameter's square sum (`None` for one without a gradient), in visiting
    /// order, summed in f64.
    pub fn from_square_sums(sums: impl IntoIterator<Item = Option<f64>>) -> GradientNorm {
        let (mut total, mut first_not_finite) = (0.0f64, None);
        for (i, s) in sums.into_iter().enumerate() {
            if let Some(s) = s {
                if !s.is_finite() && first_not_finite.is_none() {
                    first_not_finite = Some(i);
                }
                total += s;
            }
        }
        GradientNorm {
            norm: if first_not_finite.is_some() {
                f64::NAN
            } else {
                total.sqrt()
            },
            first_not_finite,
        }
    }
}

/// The dotted names of `model`'s float parameters in visiting order, as
/// `net.Gated.layers.3.vertical.weight`: what an error about one of them names.
pub(crate) fn parameter_names(model: &Model) -> Vec<String> {
    #[derive(Default)]
    struct Names {
        path: Vec<String>,
        names: Vec<String>,
    }
    impl ModuleVisitor for Names {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.names.push(self.path.join("."));
        }
    }
    let mut names = Names::default();
    model.visit(&mut names);
    names.names
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
