//! PixelCNN++ (Salimans et al. 2017, "PixelCNN++: Improving the PixelCNN with Discretized
//! Logistic Mixture Likelihood and Other Modifications"), laid out as openai/pixel-cnn builds it.
//!
//! Two streams replace the vertical and horizontal stacks: `u` sees the rows above the current
//! pixel (down-shifted 2x3 convolutions), `ul` the rows above and the pixels to the left
//! (down-right-shifted 2x2 convolutions). An up pass of three stages of gated resnets, with a
//! stride-2 convolution halving the resolution between stages, feeds a down pass of three stages
//! whose blocks take the matching up-pass activations as extra inputs, with stride-2 transposed
//! convolutions doubling it back. The output is the parameters of a discretized logistic mixture
//! per pixel (`loss::logistic`, a layer above): all colours of a pixel are predicted from features
//! that see only earlier pixels, so the network is causal per pixel.
//!
//! Differences from openai/pixel-cnn: no weight normalisation (PyTorch's default initialisation
//! instead); any image size (a transposed convolution's output is cropped to the size of the
//! matching up-pass activation, so that 28 halves to 14 and 7 and 7 to 4).

use super::Likelihood;
use super::masked_conv::{MaskKind, MaskedConv2d, uniform};
use super::native::{
    ResnetShape, gated_resnet, pad_zeros, strided_conv2d, transposed_conv2d_stride2, valid_conv2d,
};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use dropout::Dropout;
pub use dropout::DropoutDraws;
use rand::RngExt;
use rand::rngs::StdRng;

/// The size of a PixelCNN++.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PixelCnnPpConfig {
    pub colours: usize,
    /// Channels of both streams (openai/pixel-cnn: 160).
    pub filters: usize,
    /// Gated resnets per stage of the up pass (the down pass has one more in its last two).
    pub resnets: usize,
    /// What the output parameterises: openai/pixel-cnn's logistic mixture, or 256 logits per
    /// colour (for RGB through a head that sees the earlier colours of the pixel).
    pub likelihood: Likelihood,
    /// Class-conditional: the number of classes, whose one-hot label enters every gated resnet.
    pub classes: Option<usize>,
    /// Dropout probability inside every gated resnet (openai/pixel-cnn: 0.5), in training only.
    pub dropout: f64,
}

/// Where a shifted convolution's kernel sits over the output pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shift {
    /// The kernel's last row is the pixel's row, its columns centred on the pixel.
    Down,
    /// The kernel's last row and last column are the pixel's.
    DownRight,
}

impl Shift {
    /// `[top, bottom, left, right]` padding that puts the kernel so.
    fn padding(self, [kh, kw]: [usize; 2]) -> [usize; 4] {
        match self {
            Shift::Down => [kh - 1, 0, (kw - 1) / 2, (kw - 1) / 2],
            Shift::DownRight => [kh - 1, 0, kw - 1, 0],
        }
    }
}

/// PyTorch's default initialisation: uniform with bound 1 / sqrt(fan in).
fn init(rng: &mut StdRng, dims: [usize; 4], fan_in: usize, device: &Device) -> Param<Tensor<4>> {
    let n = dims.iter().product();
    let bound = 1.0 / (fan_in as f32).sqrt();
    Param::from_tensor(Tensor::from_data(
        TensorData::new(uniform(rng, n, bound), dims),
        device,
    ))
}

fn init_bias(rng: &mut StdRng, n: usize, fan_in: usize, device: &Device) -> Param<Tensor<1>> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    Param::from_tensor(Tensor::from_data(
        TensorData::new(uniform(rng, n, bound), [n]),
        device,
    ))
}

/// A convolution padded so that it sees only the rows above (and, down-right, the columns to the
/// left) of its kernel's last row; stride 2 halves the image (to ceil(h / 2)).
#[derive(Module, Debug)]
struct ShiftedConv {
    weight: Param<Tensor<4>>,
    bias: Param<Tensor<1>>,
    padding: [usize; 4],
    stride: usize,
}

impl ShiftedConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        shift: Shift,
        n_in: usize,
        n_out: usize,
        kernel: [usize; 2],
        stride: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> Self {
        let fan_in = n_in * kernel[0] * kernel[1];
        ShiftedConv {
            weight: init(rng, [n_out, n_in, kernel[0], kernel[1]], fan_in, device),
            bias: init_bias(rng, n_out, fan_in, device),
            padding: shift.padding(kernel),
            stride,
        }
    }

    /// # Shapes
    /// - x: `[batch, in, h, w]`
    /// - returns: `[batch, out, h, w]`, or `[batch, out, ceil(h/2), ceil(w/2)]` with stride 2
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let (weight, bias) = (self.weight.val().cast(dtype), self.bias.val().cast(dtype));
        let padded = pad_zeros(x, self.padding);
        if self.stride == 1 {
            valid_conv2d(padded, weight, bias)
        } else {
            strided_conv2d(padded, weight, bias, self.stride)
        }
    }
}

/// A stride-2 transposed convolution that doubles the image, cropped so that an output pixel
/// depends only on input pixels at or above (and, down-right, left of) its half-resolution
/// position.
#[derive(Module, Debug)]
struct ShiftedDeconv {
    /// `[in, out, kh, kw]`, as transposed convolutions take it.
    weight: Param<Tensor<4>>,
    bias: Param<Tensor<1>>,
    /// First output column kept.
    left: usize,
}

impl ShiftedDeconv {
    fn new(
        shift: Shift,
        filters: usize,
        kernel: [usize; 2],
        rng: &mut StdRng,
        device: &Device,
    ) -> Self {
        let fan_in = filters * kernel[0] * kernel[1];
        ShiftedDeconv {
            weight: init(
                rng,
                [filters, filters, kernel[0], kernel[1]],
                fan_in,
                device,
            ),
            bias: init_bias(rng, filters, fan_in, device),
            left: match shift {
                Shift::Down => (kernel[1] - 1) / 2,
                Shift::DownRight => 0,
            },
        }
    }

    /// # Shapes
    /// - x: `[batch, f, h', w']`
    /// - returns: `[batch, f, h, w]` for `size = [h, w]` with h <= 2 h', w <= 2 w'
    fn forward(&self, x: Tensor<4>, [h, w]: [usize; 2]) -> Tensor<4> {
        let dtype = x.dtype();
        let (weight, bias) = (self.weight.val().cast(dtype), self.bias.val().cast(dtype));
        let out = transposed_conv2d_stride2(x, weight, bias);
        out.narrow(2, 0, h).narrow(3, self.left, w)
    }
}

/// A 1x1 convolution ("network in network"): a matrix product over the channels.
#[derive(Module, Debug)]
struct Nin {
    weight: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

impl Nin {
    fn new(n_in: usize, n_out: usize, rng: &mut StdRng, device: &Device) -> Self {
        let bound = 1.0 / (n_in as f32).sqrt();
        Nin {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(uniform(rng, n_out * n_in, bound), [n_out, n_in]),
                device,
            )),
            bias: init_bias(rng, n_out, n_in, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let [b, n_in, h, w] = x.dims();
        let [n_out, _] = self.weight.dims();
        let out = self
            .weight
            .val()
            .cast(dtype)
            .reshape([1, n_out, n_in])
            .matmul(x.reshape([b, n_in, h * w]))
            + self.bias.val().cast(dtype).reshape([1, n_out, 1]);
        out.reshape([b, n_out, h, w])
    }
}

/// Shifts the image down by one row (zeros on top).
fn down_shift(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, _] = x.dims();
    pad_zeros(x, [1, 0, 0, 0]).narrow(2, 0, h)
}

/// Shifts the image right by one column (zeros on the left).
fn right_shift(x: Tensor<4>) -> Tensor<4> {
    let [_, _, _, w] = x.dims();
    pad_zeros(x, [0, 0, 1, 0]).narrow(3, 0, w)
}

/// `x + a * sigmoid(b)` with `[a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) [+ nin(
/// concat_elu(aux))]))) [+ W label]`.
#[derive(Module, Debug)]
struct GatedResnet {
    conv1: ShiftedConv,
    aux: Option<Nin>,
    conv2: ShiftedConv,
    /// `[classes, 2 filters]`: the label's contribution to the gate's input.
    class: Option<Param<Tensor<2>>>,
}

impl GatedResnet {
    /// A block of `filters` channels with `kernel`s placed by `shift`, taking an auxiliary input
    /// of `aux` channels (0: none).
    fn new(
        shift: Shift,
        kernel: [usize; 2],
        (filters, aux, classes): (usize, usize, Option<usize>),
        rng: &mut StdRng,
        device: &Device,
    ) -> Self {
        let f = filters;
        GatedResnet {
            conv1: ShiftedConv::new(shift, 2 * f, f, kernel, 1, rng, device),
            aux: (aux > 0).then(|| Nin::new(2 * aux, f, rng, device)),
            conv2: ShiftedConv::new(shift, 2 * f, 2 * f, kernel, 1, rng, device),
            class: classes.map(|k| {
                let values: Vec<f32> = (0..k * 2 * f)
                    .map(|_| rng.random_range(-0.05..0.05))
                    .collect();
                Param::from_tensor(Tensor::from_data(
                    TensorData::new(values, [k, 2 * f]),
                    device,
                ))
            }),
        }
    }

    fn forward(
        &self,
        x: Tensor<4>,
        aux: Option<Tensor<4>>,
        label: Option<&Tensor<2>>,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<4> {
        let dtype = x.dtype();
        let [b, f, h, w] = x.dims();
        let cast = |c: &ShiftedConv| (c.weight.val().cast(dtype), c.bias.val().cast(dtype));
        let aux = match (&self.aux, aux) {
            (Some(nin), Some(a)) => {
                Some((a, nin.weight.val().cast(dtype), nin.bias.val().cast(dtype)))
            }
            _ => None,
        };
        let shift = match (&self.class, label) {
            (Some(w), Some(label)) => Some(
                label
                    .clone()
                    .cast(dtype)
                    .matmul(w.val().cast(dtype))
                    .reshape([b, 2 * f, 1, 1]),
            ),
            _ => None,
        };
        let (kept, keep) = match dropout.as_mut() {
            Some(d) => d.mask([b, 2 * f, h, w], &x.device()),
            None => (None, 1.0),
        };
        debug_assert_eq!(self.conv1.padding, self.conv2.padding);
        let shape = ResnetShape {
            padding: self.conv1.padding,
            keep,
        };
        gated_resnet(
            x,
            [cast(&self.conv1), cast(&self.conv2)],
            aux,
            shift,
            kept,
            shape,
        )
    }
}

/// The two-stream network; see the module's documentation.
#[derive(Module, Debug)]
pub struct PixelCnnPp {
    u_first: ShiftedConv,
    ul_first_above: ShiftedConv,
    ul_first_left: ShiftedConv,
    /// The up pass: `resnets` blocks per stage, stage after stage.
    up_u: Vec<GatedResnet>,
    up_ul: Vec<GatedResnet>,
    /// The stride-2 convolutions after the first two stages.
    halve_u: Vec<ShiftedConv>,
    halve_ul: Vec<ShiftedConv>,
    /// The down pass: `resnets`, then `resnets + 1` twice.
    down_u: Vec<GatedResnet>,
    down_ul: Vec<GatedResnet>,
    /// The transposed convolutions after the first two stages of the down pass.
    double_u: Vec<ShiftedDeconv>,
    double_ul: Vec<ShiftedDeconv>,
    out: Nin,
    /// RGB with 256 logits per colour: the head's second layer.
    in_pixel: Option<InPixel>,
    classes: Option<usize>,
    resnets: usize,
    dropout: f64,
}

/// The categorical head of an RGB network: `out(elu(features + colours(x)))`, with `features`
/// the network's 1x1 output (grouped by colour), `colours` a type A 1x1 convolution of the
/// pixel itself (green sees red, blue sees red and green) and `out` a type B 1x1 convolution to
/// 256 logits per colour, so that the network is causal per sub-pixel, R -> G -> B.
#[derive(Module, Debug)]
struct InPixel {
    colours: MaskedConv2d,
    out: MaskedConv2d,
}

/// Stages of each pass.
const STAGES: usize = 3;

impl PixelCnnPpConfig {
    /// Output channels per pixel: the mixture's parameters in the layout of `loss::logistic`
    /// (K logits, then per colour and component a mean, a log-scale and, for RGB, the
    /// coefficients: 3K for grey, 10K for RGB; a test there checks the two agree), or 256
    /// logits per colour.
    pub fn output_channels(&self) -> usize {
        self.likelihood.outputs(self.colours)
    }

    /// RGB with the categorical likelihood: the channels per colour of the head's hidden layer,
    /// where the earlier colours of the pixel join the features.
    fn in_pixel_channels(&self) -> Option<usize> {
        (self.colours > 1 && self.likelihood == Likelihood::Categorical).then_some(self.filters)
    }

    /// Trained parameters, counted from the layout (equal to the built network's; a test checks),
    /// in u128: a config may ask for more than u64 holds.
    pub fn parameters(&self) -> u128 {
        let (f, r, c) = (
            self.filters as u128,
            self.resnets.max(1) as u128,
            self.colours as u128,
        );
        let conv = |n_in: u128, n_out: u128, taps: u128| n_out * n_in * taps + n_out;
        let classes = self.classes.unwrap_or(0) as u128;
        // conv1 (2f -> f), the auxiliary input's 1x1 (2 aux -> f), conv2 (2f -> 2f), the label.
        let block = |taps: u128, aux: u128| {
            conv(2 * f, f, taps)
                + if aux > 0 { conv(2 * aux, f, 1) } else { 0 }
                + conv(2 * f, 2 * f, taps)
                + classes * 2 * f
        };
        let (down, right) = (6, 4); // 2x3 and 2x2 kernels
        let stages = STAGES as u128;
        let first = conv(c + 1, f, 6) + conv(c + 1, f, 3) + conv(c + 1, f, 2);
        let up = stages * r * (block(down, 0) + block(right, f));
        let resample = (stages - 1) * (conv(f, f, down) + conv(f, f, right));
        let down_pass = (stages * r + stages - 1) * (block(down, f) + block(right, 2 * f));
        let outputs = self.output_channels() as u128;
        let head = match self.in_pixel_channels() {
            None => conv(f, outputs, 1),
            Some(g) => {
                let g = g as u128;
                conv(f, c * g, 1) + conv(c, c * g, 1) + conv(c * g, outputs, 1)
            }
        };
        first + up + 2 * resample + down_pass + head
    }

    /// f32 values a training step keeps per image pixel for the backward pass, the likelihood's
    /// aside: about 24 per filter of each gated resnet in each of the two streams (two
    /// concat_elus, dropout's mask and product, the gate, the auxiliary input), 2r + 1 blocks per
    /// stage and stream at (1 + 1/4 + 1/16) = 21/16 of full resolution.
    pub fn activations_per_pixel(&self) -> u128 {
        (2 * self.resnets.max(1) as u128 + 1) * 21 / 16 * 2 * 24 * self.filters as u128
    }

    /// The network with weights drawn from `rng`.
    pub fn init(&self, rng: &mut StdRng, device: &Device) -> PixelCnnPp {
        let (f, r, classes) = (self.filters, self.resnets.max(1), self.classes);
        let n_in = self.colours + 1; // the image and a channel of ones
        let (down, right) = (Shift::Down, Shift::DownRight);
        let block = |shift, aux, rng: &mut StdRng| {
            let kernel = if shift == Shift::Down { [2, 3] } else { [2, 2] };
            GatedResnet::new(shift, kernel, (f, aux, classes), rng, device)
        };
        let u_first = ShiftedConv::new(down, n_in, f, [2, 3], 1, rng, device);
        let ul_first_above = ShiftedConv::new(down, n_in, f, [1, 3], 1, rng, device);
        let ul_first_left = ShiftedConv::new(right, n_in, f, [2, 1], 1, rng, device);
        let (mut up_u, mut up_ul, mut halve_u, mut halve_ul) = (vec![], vec![], vec![], vec![]);
        for stage in 0..STAGES {
            for _ in 0..r {
                up_u.push(block(down, 0, rng));
                up_ul.push(block(right, f, rng));
            }
            if stage + 1 < STAGES {
                halve_u.push(ShiftedConv::new(down, f, f, [2, 3], 2, rng, device));
                halve_ul.push(ShiftedConv::new(right, f, f, [2, 2], 2, rng, device));
            }
        }
        let (mut down_u, mut down_ul, mut double_u, mut double_ul) =
            (vec![], vec![], vec![], vec![]);
        for stage in 0..STAGES {
            for _ in 0..r + usize::from(stage > 0) {
                down_u.push(block(down, f, rng));
                down_ul.push(block(right, 2 * f, rng));
            }
            if stage + 1 < STAGES {
                double_u.push(ShiftedDeconv::new(down, f, [2, 3], rng, device));
                double_ul.push(ShiftedDeconv::new(right, f, [2, 2], rng, device));
            }
        }
        PixelCnnPp {
            u_first,
            ul_first_above,
            ul_first_left,
            up_u,
            up_ul,
            halve_u,
            halve_ul,
            down_u,
            down_ul,
            double_u,
            double_ul,
            out: match self.in_pixel_channels() {
                None => Nin::new(f, self.output_channels(), rng, device),
                Some(g) => Nin::new(f, self.colours * g, rng, device),
            },
            in_pixel: self.in_pixel_channels().map(|g| {
                let c = self.colours;
                InPixel {
                    colours: MaskedConv2d::square(MaskKind::A, c, c * g, c, 1, rng, device),
                    out: MaskedConv2d::square(
                        MaskKind::B,
                        c * g,
                        self.output_channels(),
                        c,
                        1,
                        rng,
                        device,
                    ),
                }
            }),
            classes: self.classes,
            resnets: r,
            dropout: self.dropout,
        }
    }
}

impl PixelCnnPp {
    /// How many dropout masks a training step's forward pass draws (None without dropout).
    pub fn dropout_masks(&self) -> Option<usize> {
        (self.dropout > 0.0).then(|| {
            dropout::layers_by_size(self.resnets as u64)
                .iter()
                .map(Vec::len)
                .sum()
        })
    }

    /// The number of classes of a class-conditional network.
    pub fn classes(&self) -> Option<usize> {
        self.classes
    }

    /// The mixture's parameters (or the logits) at every pixel, from the pixels before it. `label`: one-hot
    /// classes `[batch, classes]` of a class-conditional network. `dropout`: where the masks of a
    /// training step come from (None: no dropout, as in evaluation and sampling).
    ///
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, values 0..255
    /// - returns: `[batch, output_channels, h, w]`
    pub fn forward(
        &self,
        x: Tensor<4>,
        label: Option<&Tensor<2>>,
        dropout: Option<DropoutDraws>,
    ) -> Tensor<4> {
        let mut dropout = dropout.map(|draws| Dropout::new(self.dropout, draws, self.resnets));
        self.forward_with(x, label, &mut dropout)
    }

    /// [`PixelCnnPp::forward`] with the masks from `dropout`.
    fn forward_with(
        &self,
        x: Tensor<4>,
        label: Option<&Tensor<2>>,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<4> {
        let [b, _, h, w] = x.dims();
        let scaled = (x - 127.5) / 127.5;
        let pixel = scaled.clone();
        let ones = Tensor::<4>::ones([b, 1, h, w], &scaled.device()).cast(scaled.dtype());
        let x = Tensor::cat(vec![scaled, ones], 1);
        let r = self.resnets;

        let mut us = vec![down_shift(self.u_first.forward(x.clone()))];
        let mut uls = vec![
            down_shift(self.ul_first_above.forward(x.clone()))
                + right_shift(self.ul_first_left.forward(x)),
        ];
        for stage in 0..STAGES {
            for i in stage * r..(stage + 1) * r {
                let u = self.up_u[i].forward(last(&us), None, label, dropout);
                let ul = self.up_ul[i].forward(last(&uls), Some(u.clone()), label, dropout);
                us.push(u);
                uls.push(ul);
            }
            if stage + 1 < STAGES {
                us.push(self.halve_u[stage].forward(last(&us)));
                uls.push(self.halve_ul[stage].forward(last(&uls)));
            }
        }

        let (mut u, mut ul) = (pop(&mut us), pop(&mut uls));
        let mut block = 0;
        for stage in 0..STAGES {
            for _ in 0..r + usize::from(stage > 0) {
                u = self.down_u[block].forward(u, Some(pop(&mut us)), label, dropout);
                let aux = Tensor::cat(vec![u.clone(), pop(&mut uls)], 1);
                ul = self.down_ul[block].forward(ul, Some(aux), label, dropout);
                block += 1;
            }
            if stage + 1 < STAGES {
                let [_, _, h, w] = last(&us).dims();
                u = self.double_u[stage].forward(u, [h, w]);
                ul = self.double_ul[stage].forward(ul, [h, w]);
            }
        }
        debug_assert!(us.is_empty() && uls.is_empty());
        let out = self.out.forward(elu(ul));
        match &self.in_pixel {
            None => out,
            Some(head) => head.out.forward(elu(out + head.colours.forward(pixel))),
        }
    }
}

/// ELU, `max(x, 0) + exp(min(x, 0)) - 1`: finite with a finite gradient for every finite input in
/// every precision. (Burn 0.22's `elu` takes `exp` of the whole input and picks per element: above
/// ~88.7 in f32 and bf16, ~11 in f16, the branch not taken is infinite and its zero gradient times
/// it is NaN, which froze a PixelCNN++ whose outputs had grown that large.)
pub fn elu(x: Tensor<4>) -> Tensor<4> {
    burn::tensor::activation::relu(x.clone()) + x.clamp_max(0.0).exp() - 1.0
}

fn last(v: &[Tensor<4>]) -> Tensor<4> {
    v.last().expect("the up pass pushed it").clone()
}

fn pop(v: &mut Vec<Tensor<4>>) -> Tensor<4> {
    v.pop().expect("one up-pass activation per down-pass block")
}

mod dropout;
#[cfg(test)]
mod tests;
