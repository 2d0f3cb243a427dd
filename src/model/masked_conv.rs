//! Masked convolutions (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.4).
//!
//! The masks are pure functions, tested on their own. Channels are split into one contiguous group
//! per colour, so that within a pixel red sees nothing of the current pixel, green sees red, and
//! blue sees red and green (type B also lets a group see its own colour's features).

use burn::module::{Module, Param};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand::rngs::StdRng;

/// Which sub-pixels of the centre pixel a masked convolution may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// First layer: a colour group sees only earlier colour groups of the centre pixel.
    A,
    /// Later layers: a colour group also sees its own group at the centre.
    B,
}

/// The colour group of channel `ch` among `n` channels split evenly into `colours` groups.
pub fn colour_group(ch: usize, n: usize, colours: usize) -> usize {
    ch * colours / n
}

/// The mask as `[out, in, k, k]` values in {0, 1}: rows above the centre and the pixels left of
/// it on the centre row are visible; the centre pixel is visible by colour group as `kind` says.
pub fn mask(kind: MaskKind, in_ch: usize, out_ch: usize, colours: usize, k: usize) -> Vec<f32> {
    let c = k / 2;
    let mut m = vec![0.0; out_ch * in_ch * k * k];
    for o in 0..out_ch {
        let go = colour_group(o, out_ch, colours);
        for i in 0..in_ch {
            let gi = colour_group(i, in_ch, colours);
            for y in 0..k {
                for x in 0..k {
                    let visible = if y < c || (y == c && x < c) {
                        true
                    } else if y == c && x == c {
                        match kind {
                            MaskKind::A => gi < go,
                            MaskKind::B => gi <= go,
                        }
                    } else {
                        false
                    };
                    if visible {
                        m[((o * in_ch + i) * k + y) * k + x] = 1.0;
                    }
                }
            }
        }
    }
    m
}

/// Uniform values in [-bound, bound) from the run's seeded generator, so that the same seed gives
/// the same initial weights on every backend.
pub fn uniform(rng: &mut StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// A k x k convolution whose weight is multiplied by a fixed causal mask on every forward pass
/// (which masks its gradient too). "Same" padding keeps the image size.
#[derive(Module, Debug)]
pub struct MaskedConv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    /// Constant: rebuilt by `new`, never trained or saved.
    mask: Tensor<4>,
    kernel: usize,
}

impl MaskedConv2d {
    /// PyTorch's default initialisation (uniform, bound 1/sqrt(fan_in)) from a seeded generator.
    pub fn new(
        kind: MaskKind,
        in_ch: usize,
        out_ch: usize,
        colours: usize,
        k: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> Self {
        let shape = [out_ch, in_ch, k, k];
        let bound = 1.0 / ((in_ch * k * k) as f32).sqrt();
        let m = mask(kind, in_ch, out_ch, colours, k);
        let w: Vec<f32> = uniform(rng, m.len(), bound)
            .into_iter()
            .zip(&m)
            .map(|(w, m)| w * m)
            .collect();
        MaskedConv2d {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, shape), device)),
            bias: Param::from_tensor(Tensor::from_data(
                TensorData::new(uniform(rng, out_ch, bound), [out_ch]),
                device,
            )),
            mask: Tensor::from_data(TensorData::new(m, shape), device),
            kernel: k,
        }
    }

    /// # Shapes
    /// - input: `[batch, in, h, w]`
    /// - output: `[batch, out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let p = self.kernel / 2;
        let weight = self.weight.val() * self.mask.clone();
        conv2d(
            x,
            weight,
            Some(self.bias.val()),
            ConvOptions::new([1, 1], [p, p], [1, 1], 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(m: &[f32], in_ch: usize, k: usize, o: usize, i: usize, y: usize, x: usize) -> f32 {
        m[((o * in_ch + i) * k + y) * k + x]
    }

    #[test]
    fn grey_type_a_hides_centre_and_future() {
        let m = mask(MaskKind::A, 1, 1, 1, 5);
        let visible: Vec<_> = (0..25).filter(|&p| m[p] == 1.0).collect();
        assert_eq!(visible, (0..12).collect::<Vec<_>>());
        let m = mask(MaskKind::B, 1, 1, 1, 5);
        let visible: Vec<_> = (0..25).filter(|&p| m[p] == 1.0).collect();
        assert_eq!(visible, (0..13).collect::<Vec<_>>());
    }

    #[test]
    fn colour_groups_order_r_g_b_at_the_centre() {
        // 3 input colours -> 6 hidden channels (2 per colour).
        let a = mask(MaskKind::A, 3, 6, 3, 3);
        let b = mask(MaskKind::B, 6, 6, 3, 3);
        for o in 0..6 {
            for i in 0..3 {
                // type A: out group o/2 sees input colour i only if i < o/2
                assert_eq!(at(&a, 3, 3, o, i, 1, 1), f32::from(u8::from(i < o / 2)));
                assert_eq!(at(&a, 3, 3, o, i, 0, 2), 1.0, "row above always visible");
                assert_eq!(
                    at(&a, 3, 3, o, i, 1, 2),
                    0.0,
                    "right of centre never visible"
                );
            }
            for i in 0..6 {
                assert_eq!(
                    at(&b, 6, 3, o, i, 1, 1),
                    f32::from(u8::from(i / 2 <= o / 2))
                );
                assert_eq!(at(&b, 6, 3, o, i, 2, 0), 0.0, "row below never visible");
            }
        }
    }
}
