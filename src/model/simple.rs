//! The simple PixelCNN: masked convolutions and ReLUs, no gates or residuals. The seed README's
//! "simple" model: one k x k convolution of type A, then type B ones, then a 1x1 head.

use super::masked_conv::{MaskKind, MaskedConv2d};
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use rand::rngs::StdRng;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SimpleConfig {
    pub colours: usize,
    pub layers: usize,
    pub kernel: usize,
    pub channels: usize,
}

#[derive(Module, Debug)]
pub struct SimplePixelCnn {
    convs: Vec<MaskedConv2d>,
    /// 1x1, type B: 256 logits per colour, grouped by colour so that R -> G -> B holds.
    head: MaskedConv2d,
    colours: usize,
}

impl SimpleConfig {
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
            256 * self.colours,
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

    /// How many rows above a pixel its prediction can depend on.
    pub fn context_rows(&self) -> usize {
        self.layers * (self.kernel / 2)
    }
}

impl SimplePixelCnn {
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, scaled inputs
    /// - returns: `[batch, colours * 256, h, w]`, logits grouped by colour
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = x;
        for conv in &self.convs {
            h = relu(conv.forward(h)); // [batch, channels, h, w]
        }
        self.head.forward(h)
    }
}
