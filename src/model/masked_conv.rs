//! Masked convolutions (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", section 3.4).
//!
//! The masks are pure functions, tested on their own. Channels are split into one contiguous group
//! per colour, so that within a pixel red sees nothing of the current pixel, green sees red, and
//! blue sees red and green (type B also lets a group see its own colour's features).

use super::native::{pad_zeros, valid_conv2d};
use burn::module::{Module, Param};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::RngExt;
use rand::rngs::StdRng;

/// Which sub-pixels of the centre pixel a masked convolution may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// First layer: a colour group sees only earlier colour groups of the centre pixel.
    A,
    /// Later layers: a colour group also sees its own group at the centre.
    B,
    /// No mask: every position and channel is visible (inputs that are already causal).
    Full,
}

/// The colour group of channel `ch` among `n` channels split evenly into `colours` groups.
pub fn colour_group(ch: usize, n: usize, colours: usize) -> usize {
    ch * colours / n
}

/// Colour groups of `n` channels in contiguous blocks: `[0, 0, .., 1, 1, .., 2, 2, ..]`.
pub fn groups(n: usize, colours: usize) -> Vec<usize> {
    (0..n).map(|ch| colour_group(ch, n, colours)).collect()
}

/// Colour groups of the `2 * n` channels that a gate splits into two halves of `n`: both halves
/// repeat the grouping of `n` channels, so that `tanh(a) * sigmoid(b)` pairs channels of one colour.
pub fn gate_groups(n: usize, colours: usize) -> Vec<usize> {
    let half = groups(n, colours);
    half.iter().chain(&half).copied().collect()
}

/// The mask as `[out, in, kh, kw]` values in {0, 1}. Positions before `centre` in raster order
/// are visible; positions after it are not; at the centre, an output channel sees the input
/// channels of earlier colour groups (and, for type B, of its own).
pub fn mask(
    kind: MaskKind,
    in_groups: &[usize],
    out_groups: &[usize],
    kernel: [usize; 2],
    centre: [usize; 2],
) -> Vec<f32> {
    let [kh, kw] = kernel;
    let (n_in, n_out) = (in_groups.len(), out_groups.len());
    let mut m = vec![0.0; n_out * n_in * kh * kw];
    for (o, &go) in out_groups.iter().enumerate() {
        for (i, &gi) in in_groups.iter().enumerate() {
            for y in 0..kh {
                for x in 0..kw {
                    let before = (y, x) < (centre[0], centre[1]);
                    let visible = match kind {
                        MaskKind::Full => true,
                        _ if before => true,
                        MaskKind::A => [y, x] == centre && gi < go,
                        MaskKind::B => [y, x] == centre && gi <= go,
                    };
                    if visible {
                        m[((o * n_in + i) * kh + y) * kw + x] = 1.0;
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

/// The shape and placement of a masked convolution's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// k x k, centred: "same" padding (the simple PixelCNN).
    Square(usize),
    /// 1 x (k/2 + 1): the current pixel and the k/2 to its left (the gated horizontal stack).
    RowLeft(usize),
    /// (k/2 + 1) x k: the current row and the k/2 above it, k columns centred (the gated
    /// vertical stack, before its shift down by one row).
    RowsAbove(usize),
    /// 1 x 1.
    Point,
}

impl Shape {
    fn kernel(self) -> [usize; 2] {
        match self {
            Shape::Square(k) => [k, k],
            Shape::RowLeft(k) => [1, k / 2 + 1],
            Shape::RowsAbove(k) => [k / 2 + 1, k],
            Shape::Point => [1, 1],
        }
    }

    /// The kernel position over the output pixel.
    fn centre(self) -> [usize; 2] {
        match self {
            Shape::Square(k) => [k / 2, k / 2],
            Shape::RowLeft(k) => [0, k / 2],
            Shape::RowsAbove(k) => [k / 2, k / 2],
            Shape::Point => [0, 0],
        }
    }

    /// (top, bottom), (left, right) padding that keeps the image size.
    fn padding(self) -> [(usize, usize); 2] {
        let [kh, kw] = self.kernel();
        let [cy, cx] = self.centre();
        [(cy, kh - 1 - cy), (cx, kw - 1 - cx)]
    }
}

/// A convolution whose weight is multiplied by a fixed causal mask on every forward pass (which
/// masks its gradient too). Padding keeps the image size.
#[derive(Module, Debug)]
pub struct MaskedConv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    /// Constant: rebuilt by `new`, never trained or saved.
    mask: Tensor<4>,
    padding: [usize; 4],
}

impl MaskedConv2d {
    /// PyTorch's default initialisation (uniform, bound 1/sqrt(fan_in)) from a seeded generator.
    pub fn new(
        kind: MaskKind,
        shape: Shape,
        in_groups: &[usize],
        out_groups: &[usize],
        rng: &mut StdRng,
        device: &Device,
    ) -> Self {
        let [kh, kw] = shape.kernel();
        let (n_in, n_out) = (in_groups.len(), out_groups.len());
        let dims = [n_out, n_in, kh, kw];
        let bound = 1.0 / ((n_in * kh * kw) as f32).sqrt();
        let m = mask(kind, in_groups, out_groups, [kh, kw], shape.centre());
        let w: Vec<f32> = uniform(rng, m.len(), bound)
            .into_iter()
            .zip(&m)
            .map(|(w, m)| w * m)
            .collect();
        let [(top, bottom), (left, right)] = shape.padding();
        MaskedConv2d {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, dims), device)),
            bias: Param::from_tensor(Tensor::from_data(
                TensorData::new(uniform(rng, n_out, bound), [n_out]),
                device,
            )),
            mask: Tensor::from_data(TensorData::new(m, dims), device),
            padding: [top, bottom, left, right],
        }
    }

    /// A k x k mask of `kind` between `n_in` and `n_out` channels split into `colours` groups.
    pub fn square(
        kind: MaskKind,
        n_in: usize,
        n_out: usize,
        colours: usize,
        k: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> Self {
        let shape = if k == 1 {
            Shape::Point
        } else {
            Shape::Square(k)
        };
        Self::new(
            kind,
            shape,
            &groups(n_in, colours),
            &groups(n_out, colours),
            rng,
            device,
        )
    }

    /// Weight, bias and mask, for an operation that masks the weight itself
    /// (`native::gated_layer`).
    pub fn masked(&self) -> (Tensor<4>, Tensor<1>, Tensor<4>) {
        (self.weight.val(), self.bias.val(), self.mask.clone())
    }

    /// Zero padding of the input that keeps the image size, `[top, bottom, left, right]`.
    pub fn padding(&self) -> [usize; 4] {
        self.padding
    }

    /// Width of the kernel.
    pub fn kernel_width(&self) -> usize {
        self.weight.dims()[3]
    }

    /// # Shapes
    /// - input: `[batch, in, h, w]`
    /// - output: `[batch, out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        // Weights are f32; the convolution runs in the input's float type (mixed precision).
        let dtype = x.dtype();
        let weight = (self.weight.val() * self.mask.clone()).cast(dtype);
        let [n_out, n_in, kh, kw] = weight.dims();
        if [kh, kw] == [1, 1] {
            // A 1x1 convolution is a matrix product over the channels, batched over the images:
            // its backward pass is two matrix products too.
            let [b, _, h, w] = x.dims();
            let out = weight
                .reshape([1, n_out, n_in])
                .matmul(x.reshape([b, n_in, h * w]))
                + self.bias.val().cast(dtype).reshape([1, n_out, 1]);
            return out.reshape([b, n_out, h, w]);
        }
        if kh == 1 {
            // One row (the gated horizontal stack): the padded input shifted to each of the kw
            // columns, stacked along the channels, and one batched matrix product. Its backward
            // is matrix products and slices, cheaper in Burn than a convolution's weight
            // gradient (~6 % per training step on libtorch, ~10 % on flex).
            let [b, _, h, w] = x.dims();
            let padded = pad_zeros(x, self.padding);
            let shifts = (0..kw).map(|dx| padded.clone().narrow(3, dx, w)).collect();
            let columns = Tensor::cat(shifts, 1).reshape([b, kw * n_in, h * w]);
            // [out, in, 1, kw] -> [out, kw * in], matching the columns' order (shift-major).
            let matrix = weight.permute([0, 2, 3, 1]).reshape([1, n_out, kw * n_in]);
            let out = matrix.matmul(columns) + self.bias.val().cast(dtype).reshape([1, n_out, 1]);
            return out.reshape([b, n_out, h, w]);
        }
        // Zero padding as its own operation and a convolution without padding: with padding
        // that differs between sides, Burn would pad inside the convolution's forward and
        // backward passes anyway; this is ~10 % faster per training step on libtorch.
        // On libtorch, `valid_conv2d`'s backward pass is libtorch's own (see `native`).
        let padded = pad_zeros(x, self.padding);
        valid_conv2d(padded, weight, self.bias.val().cast(dtype))
    }
}

/// A masked convolution's weight and bias, masked and cast once: what the cached sampler applies
/// thousands of times to small windows.
#[derive(Clone, Debug)]
pub struct Frozen {
    weight: Tensor<4>,
    bias: Tensor<1>,
    /// The weight as `[in * kh * kw, out]` and the bias as `[1, out]`, for `dense`.
    matrix: Tensor<2>,
    bias_row: Tensor<2>,
}

impl MaskedConv2d {
    /// The masked weights in `dtype` (the model's compute precision).
    pub fn frozen(&self, dtype: DType) -> Frozen {
        let weight = (self.weight.val() * self.mask.clone()).cast(dtype);
        let bias = self.bias.val().cast(dtype);
        let [out, n_in, kh, kw] = weight.dims();
        Frozen {
            matrix: weight.clone().reshape([out, n_in * kh * kw]).transpose(),
            bias_row: bias.clone().reshape([1, out]),
            weight,
            bias,
        }
    }
}

impl Frozen {
    /// Convolution without padding: the caller passes exactly the window the outputs see.
    ///
    /// # Shapes
    /// - x: `[batch, in, kh + r - 1, kw + c - 1]`
    /// - returns: `[batch, out, r, c]`
    pub fn valid(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
        )
    }

    /// The convolution at one position, as a matrix product.
    ///
    /// # Shapes
    /// - x: `[batch, in * kh * kw]`, the window flattened as `[in, kh, kw]`
    /// - returns: `[batch, out]`
    pub fn dense(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.matrix.clone()) + self.bias_row.clone()
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Input channels.
    pub fn inputs(&self) -> usize {
        self.weight.dims()[1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(m: &[f32], n_in: usize, k: [usize; 2], o: usize, i: usize, y: usize, x: usize) -> f32 {
        m[((o * n_in + i) * k[0] + y) * k[1] + x]
    }

    #[test]
    fn grey_type_a_hides_centre_and_future() {
        let g = groups(1, 1);
        let m = mask(MaskKind::A, &g, &g, [5, 5], [2, 2]);
        let visible: Vec<_> = (0..25).filter(|&p| m[p] == 1.0).collect();
        assert_eq!(visible, (0..12).collect::<Vec<_>>());
        let m = mask(MaskKind::B, &g, &g, [5, 5], [2, 2]);
        let visible: Vec<_> = (0..25).filter(|&p| m[p] == 1.0).collect();
        assert_eq!(visible, (0..13).collect::<Vec<_>>());
    }

    #[test]
    fn colour_groups_order_r_g_b_at_the_centre() {
        // 3 input colours -> 6 hidden channels (2 per colour).
        let k = [3, 3];
        let a = mask(MaskKind::A, &groups(3, 3), &groups(6, 3), k, [1, 1]);
        let b = mask(MaskKind::B, &groups(6, 3), &groups(6, 3), k, [1, 1]);
        for o in 0..6 {
            for i in 0..3 {
                assert_eq!(at(&a, 3, k, o, i, 1, 1), f32::from(u8::from(i < o / 2)));
                assert_eq!(at(&a, 3, k, o, i, 0, 2), 1.0, "row above always visible");
                assert_eq!(
                    at(&a, 3, k, o, i, 1, 2),
                    0.0,
                    "right of centre never visible"
                );
            }
            for i in 0..6 {
                assert_eq!(
                    at(&b, 6, k, o, i, 1, 1),
                    f32::from(u8::from(i / 2 <= o / 2))
                );
                assert_eq!(at(&b, 6, k, o, i, 2, 0), 0.0, "row below never visible");
            }
        }
    }

    #[test]
    fn gate_halves_share_colour_groups() {
        assert_eq!(gate_groups(6, 3), vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
        assert_eq!(groups(512, 2)[255..257], [0, 1]);
    }

    #[test]
    fn row_left_kernel_is_the_left_half_of_the_row() {
        let g = groups(1, 1);
        let s = Shape::RowLeft(5);
        assert_eq!(s.kernel(), [1, 3]);
        assert_eq!(s.padding(), [(0, 0), (2, 0)]);
        assert_eq!(
            mask(MaskKind::A, &g, &g, s.kernel(), s.centre()),
            vec![1.0, 1.0, 0.0]
        );
        assert_eq!(
            mask(MaskKind::B, &g, &g, s.kernel(), s.centre()),
            vec![1.0, 1.0, 1.0]
        );
        let v = Shape::RowsAbove(5);
        assert_eq!(v.kernel(), [3, 5]);
        assert_eq!(v.padding(), [(2, 0), (2, 2)]);
    }
}
