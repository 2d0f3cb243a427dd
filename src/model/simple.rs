//! The simple PixelCNN: masked convolutions and ReLUs, no gates or residuals. The seed README's
//! "simple" model: one k x k convolution of type A, then type B ones, then a 1x1 head.

use super::cache::{self, RowInputs, RowsAbove};
use super::masked_conv::{Frozen, MaskKind, MaskedConv2d};
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{DType, Device, Tensor};
use rand::rngs::StdRng;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SimpleConfig {
    pub colours: usize,
    pub layers: usize,
    pub kernel: usize,
    pub channels: usize,
    /// The head's outputs: 256 logits per colour, or (grey) a logistic mixture's parameters.
    pub likelihood: super::Likelihood,
}

#[derive(Module, Debug)]
pub struct SimplePixelCnn {
    convs: Vec<MaskedConv2d>,
    /// 1x1, type B: the likelihood's outputs (256 logits per colour), grouped by colour so that
    /// R -> G -> B holds.
    head: MaskedConv2d,
    colours: usize,
}

impl SimpleConfig {
    /// Trained parameters, counted from the layout (in u128: a config may ask for more than u64
    /// holds; a test compares the count with the built model's).
    pub fn parameters(&self) -> u128 {
        use super::estimate::conv;
        let (col, ch, k) = (
            self.colours as u128,
            self.channels as u128,
            self.kernel as u128,
        );
        let first = conv(col, ch, k, k);
        let rest = (self.layers as u128).saturating_sub(1) * conv(ch, ch, k, k);
        first + rest + conv(ch, self.likelihood.outputs(self.colours) as u128, 1, 1)
    }

    /// f32 values a training step keeps per image pixel for the backward pass, the likelihood's
    /// aside: about 3 per channel of each ReLU layer.
    pub fn activations_per_pixel(&self) -> u128 {
        self.layers as u128 * 3 * self.channels as u128
    }

    pub fn init(&self, rng: &mut StdRng, device: &Device) -> SimplePixelCnn {
        let mut convs = Vec::with_capacity(self.layers);
        for l in 0..self.layers {
            let (kind, in_ch) = if l == 0 {
                (MaskKind::A, self.colours)
            } else {
                (MaskKind::B, self.channels)
            };
            convs.push(MaskedConv2d::square(
                kind,
                in_ch,
                self.channels,
                self.colours,
                self.kernel,
                rng,
                device,
            ));
        }
        let head = MaskedConv2d::square(
            MaskKind::B,
            self.channels,
            self.likelihood.outputs(self.colours),
            self.colours,
            1,
            rng,
            device,
        );
        SimplePixelCnn {
            convs,
            head,
            colours: self.colours,
        }
    }
}

impl SimplePixelCnn {
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, scaled inputs
    /// - returns: `[batch, outputs, h, w]`, logits grouped by colour or a mixture's parameters
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = x;
        for conv in &self.convs {
            h = relu(conv.forward(h)); // [batch, channels, h, w]
        }
        self.head.forward(h)
    }
}

/// One layer's state for cached sampling: its input rows above that its kernel reaches and its
/// inputs so far along the current row.
struct LayerCache {
    conv: Frozen,
    /// The last `k/2` rows of this layer's input.
    above: RowsAbove,
    row: RowInputs,
    /// `[batch, in, k/2, k]`: the kernel rows below the centre, all masked.
    below: Tensor<4>,
}

/// Cached sampling state of the simple PixelCNN: per sub-pixel every layer is computed at one
/// position from the activations it keeps of earlier pixels.
pub struct SimpleCache {
    layers: Vec<LayerCache>,
    head: Frozen,
    half: usize,
}

impl SimplePixelCnn {
    /// A cache for sampling `batch` images of `width` columns, computing in `dtype`.
    pub fn cache(&self, batch: usize, width: usize, dtype: DType, device: &Device) -> SimpleCache {
        let half = self.convs[0].kernel_width() / 2;
        let layers = self
            .convs
            .iter()
            .map(|c| {
                let conv = c.frozen(dtype);
                let n = conv.inputs();
                LayerCache {
                    above: RowsAbove::new(batch, n, width, (half, half), dtype, device),
                    row: RowInputs::new(batch, n, width, dtype, device),
                    below: Tensor::<4>::zeros([batch, n, half, 2 * half + 1], device).cast(dtype),
                    conv,
                }
            })
            .collect();
        SimpleCache {
            layers,
            head: self.head.frozen(dtype),
            half,
        }
    }
}

impl SimpleCache {
    /// Logits of pixel (`x` of the current row) given every earlier pixel and the sub-pixels of
    /// this one so far.
    ///
    /// # Shapes
    /// - pixel: `[batch, colours]`, scaled inputs in the compute type
    /// - returns: `[batch, colours * 256]`
    pub fn step(&mut self, x: usize, pixel: Tensor<2>) -> Tensor<2> {
        let (half, k) = (self.half, 2 * self.half + 1);
        let [batch, _] = pixel.dims();
        let mut a = pixel;
        for layer in &mut self.layers {
            let n = layer.row.zero().dims()[1];
            let window = if half == 0 {
                a.clone()
            } else {
                let mut row = layer.row.left_of(x, half);
                row.push(a.clone());
                row.extend(std::iter::repeat_n(layer.row.zero().clone(), half));
                let row = Tensor::stack::<3>(row, 2).reshape([batch, n, 1, k]);
                Tensor::cat(
                    vec![
                        layer.above.stacked().clone().narrow(3, x, k),
                        row,
                        layer.below.clone(),
                    ],
                    2,
                ) // [b, in, k, k]
                .reshape([batch, n * k * k])
            };
            layer.row.hold(a);
            a = relu(layer.conv.dense(window));
        }
        self.head.dense(a)
    }

    /// The pixel last passed to `step` is final, with these values (`[batch, colours]`, scaled).
    pub fn commit(&mut self, pixel: Tensor<2>) {
        cache::commit(self.layers.iter_mut().map(|l| &mut l.row), pixel);
    }

    /// The current row is final: it becomes the bottom row of what the next row sees above.
    pub fn end_row(&mut self) {
        for layer in &mut self.layers {
            let cols = layer.row.take_row();
            if self.half > 0 {
                layer.above.push(cache::row_of(cols));
            }
        }
    }
}
