//! Operations whose backward pass is written for speed rather than derived by Burn's autodiff.
//!
//! Burn 0.22's autodiff differentiates these operations through generic decompositions: a
//! convolution's weight gradient as a convolution of the input and the output gradient with batch
//! and channels swapped (libtorch runs it about twice as slowly as its native
//! `convolution_backward` for the k x k masked convolutions of these models), tanh and sigmoid by
//! computing them again, padding by filling a tensor on the host, and log-softmax as max,
//! subtract, exp, sum, log and subtract, each with its own backward pass over the
//! `[batch, 256, ...]` logits, the largest tensor of a training step.
//!
//! This backend extension replaces them. On libtorch, it records each operation's forward pass in
//! libtorch's own autograd graph and, in Burn's backward pass, asks libtorch for the gradients of
//! its inputs, so that libtorch runs its fused kernels. On flex, the gate keeps its tanh and
//! sigmoid for the backward pass and the cross-entropy its softmax (`g (softmax - onehot)`);
//! convolutions and padding are Burn's. The tests compare values and gradients with Burn's own
//! operations on every compiled backend.
//!
//! Each libtorch node costs one product of its output with its output gradient in Burn's backward
//! pass (tch 0.22 has no backward from a given gradient, only from a scalar), so a chain of
//! operations that always go together is one node: PixelCNN++'s gated resnet (`gated_resnet`),
//! whose two convolutions, 1x1 convolution, three concat_elus, dropout and gate are one libtorch
//! graph between Burn's.

// burn-tch is deprecated upstream but is the fast path on CPU and CUDA here.
#![allow(deprecated)]

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, ExtensionType, Flex, TensorMetadata, backend_extension};
use burn::tensor::Slice;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, PadMode};
use burn::tensor::{Bool, IndexingUpdateOp, Int, Scalar, Shape, Tensor};

#[backend_extension(Flex, LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait NativeBackward: Backend {
    /// Stride 1, no padding, no dilation, one group.
    ///
    /// # Shapes
    /// - x: `[batch, in, h, w]`, weight: `[out, in, kh, kw]`, bias: `[out]`
    /// - returns: `[batch, out, h - kh + 1, w - kw + 1]`
    fn valid_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, Some(bias), options())
    }

    /// Stride `stride` in both dimensions, no padding, no dilation, one group.
    ///
    /// # Shapes
    /// - x: `[batch, in, h, w]`, weight: `[out, in, kh, kw]`, bias: `[out]`
    /// - returns: `[batch, out, (h - kh) / stride + 1, (w - kw) / stride + 1]`
    fn strided_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
    ) -> FloatTensor<Self> {
        let options = ConvOptions::new([stride, stride], [0, 0], [1, 1], 1);
        Self::conv2d(x, weight, Some(bias), options)
    }

    /// A transposed convolution of stride 2, no padding, no dilation, one group.
    ///
    /// # Shapes
    /// - x: `[batch, in, h, w]`, weight: `[in, out, kh, kw]`, bias: `[out]`
    /// - returns: `[batch, out, 2 (h - 1) + kh, 2 (w - 1) + kw]`
    fn transposed_conv2d_stride2(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let options = ConvTransposeOptions::new([2, 2], [0, 0], [0, 0], [1, 1], 1);
        Self::conv_transpose2d(x, weight, Some(bias), options)
    }

    /// The gated linear unit `a * sigmoid(b)` of the two halves `a`, `b` of dimension 1.
    ///
    /// # Shapes
    /// - x: `[batch, 2n, h, w]`
    /// - returns: `[batch, n, h, w]`
    fn glu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [a, b] = channel_halves::<Self>(x);
        Self::float_mul(a, Self::sigmoid(b))
    }

    /// Zero padding of the last two dimensions by `[top, bottom, left, right]`.
    fn pad_zeros(x: FloatTensor<Self>, padding: [usize; 4]) -> FloatTensor<Self> {
        let [top, bottom, left, right] = padding;
        Self::float_pad(
            x,
            &[(0, 0), (0, 0), (top, bottom), (left, right)],
            PadMode::Constant(0.0),
        )
    }

    /// The gated activation `tanh(a) * sigmoid(b)` of the two halves `a`, `b` of dimension 1.
    ///
    /// # Shapes
    /// - x: `[batch, 2n, h, w]`
    /// - returns: `[batch, n, h, w]`
    fn gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [a, b] = channel_halves::<Self>(x);
        Self::float_mul(Self::float_tanh(a), Self::sigmoid(b))
    }

    /// PixelCNN++'s concat_elu: elu of `[x, -x]` concatenated on dimension 1.
    ///
    /// # Shapes
    /// - x: `[batch, n, h, w]`
    /// - returns: `[batch, 2n, h, w]`
    fn concat_elu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // elu(z) = max(z, 0) + exp(min(z, 0)) - 1
        let both = Self::float_cat(vec![x.clone(), Self::float_neg(x)], 1);
        let positive = Self::float_clamp_min(both.clone(), 0.0.into());
        let negative = Self::float_exp(Self::float_clamp_max(both, 0.0.into()));
        Self::float_add(positive, Self::float_sub_scalar(negative, 1.0.into()))
    }

    /// PixelCNN++'s gated resnet in one operation: `x + glu(c2)` with
    /// `c2 = conv2(pad(drop(concat_elu(c1)))) [+ shift]` and
    /// `c1 = conv1(pad(concat_elu(x))) [+ nin(concat_elu(aux))]`, every `pad` by
    /// `shape.padding`, `drop` zeroing where `dropped` is true and scaling the rest by
    /// `shape.keep`, `nin` a 1x1 convolution. On libtorch the whole block is one node of
    /// libtorch's autograd graph; elsewhere it is the operations above one by one.
    ///
    /// # Shapes
    /// - x: `[batch, f, h, w]`
    /// - w1: `[f, 2f, kh, kw]`, b1: `[f]`, w2: `[2f, 2f, kh, kw]`, b2: `[2f]`
    /// - aux: input `[batch, a, h, w]`, weight `[f, 2a]`, bias `[f]`
    /// - shift: `[batch, 2f, 1, 1]`; dropped: `[batch, 2f, h, w]`
    /// - returns: `[batch, f, h, w]`
    #[allow(clippy::too_many_arguments)]
    fn gated_resnet(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        #[extension_type] aux: Maybe<Self>,
        #[extension_type] shift: Maybe<Self>,
        #[extension_type] dropped: MaybeBool<Self>,
        shape: ResnetShape,
    ) -> FloatTensor<Self> {
        let padded = Self::pad_zeros(Self::concat_elu(x.clone()), shape.padding);
        let mut c1 = Self::valid_conv2d(padded, w1, b1);
        if let Maybe::Aux {
            input,
            weight,
            bias,
        } = aux
        {
            c1 = Self::float_add(c1, nin::<Self>(Self::concat_elu(input), weight, bias));
        }
        let mut c1 = Self::concat_elu(c1);
        if let MaybeBool::Some(dropped) = dropped {
            let dtype = c1.dtype();
            let zeroed = Self::float_mask_fill(c1, dropped, Scalar::new(0.0, &dtype));
            c1 = Self::float_mul_scalar(zeroed, Scalar::new(shape.keep, &dtype));
        }
        let mut c2 = Self::valid_conv2d(Self::pad_zeros(c1, shape.padding), w2, b2);
        if let Maybe::Some(shift) = shift {
            c2 = Self::float_add(c2, shift);
        }
        Self::float_add(x, Self::glu(c2))
    }

    /// The summed negative log-likelihood of `targets` under a softmax over dimension 2.
    ///
    /// # Shapes
    /// - logits: `[batch, colours, 256, h, w]`
    /// - targets: `[batch, colours, h, w]`
    /// - returns: `[1]`
    fn categorical_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let logp = Self::log_softmax(logits, 2);
        let [b, c, h, w] = targets.shape().dims();
        let index = Self::int_reshape(targets, Shape::new([b, c, 1, h, w]));
        let picked = Self::float_gather(2, logp, index);
        let sum = Self::float_sum(picked);
        Self::float_reshape(Self::float_neg(sum), Shape::new([1]))
    }
}

/// An optional float input of an operation (the backend extension's arguments are tensors or
/// types like this one).
#[derive(ExtensionType, Debug)]
pub enum Maybe<B: Backend> {
    None,
    Some(FloatTensor<B>),
    /// A gated resnet's auxiliary input and its 1x1 convolution.
    Aux {
        input: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: FloatTensor<B>,
    },
}

/// An optional boolean input of an operation.
#[derive(ExtensionType, Debug)]
pub enum MaybeBool<B: Backend> {
    None,
    Some(BoolTensor<B>),
}

/// The layout of a gated resnet that is not a tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResnetShape {
    /// Zero padding of both convolutions' inputs, `[top, bottom, left, right]`.
    pub padding: [usize; 4],
    /// The factor of the elements that dropout keeps, `1 / (1 - p)`.
    pub keep: f64,
}

/// A 1x1 convolution as a matrix product over the channels (as PixelCNN++'s `nin` layers).
///
/// # Shapes
/// - x: `[batch, in, h, w]`, weight: `[out, in]`, bias: `[out]`
/// - returns: `[batch, out, h, w]`
fn nin<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
) -> FloatTensor<B> {
    let [b, n_in, h, w] = x.shape().dims();
    let [n_out, _] = weight.shape().dims();
    let product = B::float_matmul(
        B::float_reshape(weight, Shape::new([1, n_out, n_in])),
        B::float_reshape(x, Shape::new([b, n_in, h * w])),
    );
    let out = B::float_add(product, B::float_reshape(bias, Shape::new([1, n_out, 1])));
    B::float_reshape(out, Shape::new([b, n_out, h, w]))
}

fn options() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [0, 0], [1, 1], 1)
}

/// The first and second halves of dimension 1 of a `[batch, 2n, h, w]` tensor.
fn channel_halves<B: Backend>(x: FloatTensor<B>) -> [FloatTensor<B>; 2] {
    let half = x.shape()[1] / 2;
    [0, half].map(|start| {
        let channels = Slice::from(start..start + half);
        B::float_slice(
            x.clone(),
            &[Slice::full(), channels, Slice::full(), Slice::full()],
        )
    })
}

impl NativeBackward for Flex {}

impl<C: CheckpointStrategy> NativeBackward for Autodiff<Flex, C> {
    fn gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gate_saving_activations::<Flex, C>(x)
    }

    fn categorical_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        nll_saving_softmax::<Flex, C>(logits, targets)
    }
}

/// The categorical NLL with the backward pass `g (softmax - onehot)` from the softmax saved in the
/// forward pass, instead of differentiating log-softmax's six operations one by one.
fn nll_saving_softmax<B: Backend, C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<B, C>>,
    targets: IntTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct NllBackward;

    impl<B: Backend> Backward<B, 1> for NllBackward {
        /// The softmax over dimension 2 and the targets as `[batch, colours, 1, h, w]` indices.
        type State = (FloatTensor<B>, IntTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node); // [1]
            let [Some(parent)] = &ops.parents else {
                return;
            };
            let (softmax, index) = ops.state;
            let g = B::float_reshape(grad, Shape::new([1, 1, 1, 1, 1]));
            let scaled = B::float_mul(softmax, g.clone());
            let minus_g = B::float_expand(B::float_neg(g), index.shape());
            let onehot = B::float_scatter(2, scaled, index, minus_g, IndexingUpdateOp::Add);
            grads.register::<B>(parent.id, onehot);
        }
    }

    let prep = NllBackward.prepare::<C>([logits.node()]).compute_bound();
    let x = logits.into_primitive();
    let [b, c, h, w] = targets.shape().dims();
    let index = B::int_reshape(targets, Shape::new([b, c, 1, h, w]));
    let max = B::float_max_dim(x.clone(), 2);
    let shifted = B::float_sub(x, max);
    let exp = B::float_exp(shifted.clone());
    let sum = B::float_sum_dim(exp.clone(), 2);
    let picked = B::float_gather(2, shifted, index.clone());
    // -log p(target) = log(sum) - shifted[target], summed.
    let nll = B::float_sub(B::float_log(sum.clone()), picked);
    let out = B::float_reshape(B::float_sum(nll), Shape::new([1]));
    match prep.stateful() {
        OpsKind::Tracked(prep) => prep.finish((B::float_div(exp, sum), index), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The gate with a backward pass from its saved tanh and sigmoid: Burn's own tanh and sigmoid
/// recompute themselves in the backward pass, and on flex those are scalar `libm` calls.
fn gate_saving_activations<B: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct GateBackward;

    impl<B: Backend> Backward<B, 1> for GateBackward {
        /// tanh(a) and sigmoid(b).
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let [Some(parent)] = &ops.parents else {
                return;
            };
            let (t, s) = ops.state;
            let one_minus = |v: FloatTensor<B>| B::float_add_scalar(B::float_neg(v), 1.0.into());
            // d/da = g s (1 - t^2), d/db = g t s (1 - s).
            let gs = B::float_mul(grad, s.clone());
            let da = B::float_mul(gs.clone(), one_minus(B::float_mul(t.clone(), t.clone())));
            let db = B::float_mul(B::float_mul(gs, t), one_minus(s));
            grads.register::<B>(parent.id, B::float_cat(vec![da, db], 1));
        }
    }

    let prep = GateBackward.prepare::<C>([x.node()]).compute_bound();
    let [a, b] = channel_halves::<B>(x.into_primitive());
    let (t, s) = (B::float_tanh(a), B::sigmoid(b));
    let out = B::float_mul(t.clone(), s.clone());
    match prep.stateful() {
        OpsKind::Tracked(prep) => prep.finish((t, s), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// A stride-1 convolution without padding of `x` by `weight` plus `bias`, on any backend.
///
/// # Shapes
/// - x: `[batch, in, h, w]`, weight: `[out, in, kh, kw]`, bias: `[out]`
/// - returns: `[batch, out, h - kh + 1, w - kw + 1]`
pub fn valid_conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::valid_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// A convolution of stride `stride`, without padding (on libtorch its backward pass is
/// libtorch's).
///
/// # Shapes
/// - x: `[batch, in, h, w]`, weight: `[out, in, kh, kw]`, bias: `[out]`
/// - returns: `[batch, out, (h - kh) / stride + 1, (w - kw) / stride + 1]`
pub fn strided_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::strided_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        stride,
    ))
}

/// A transposed convolution of stride 2 without padding (on libtorch its backward pass is
/// libtorch's).
///
/// # Shapes
/// - x: `[batch, in, h, w]`, weight: `[in, out, kh, kw]`, bias: `[out]`
/// - returns: `[batch, out, 2 (h - 1) + kh, 2 (w - 1) + kw]`
pub fn transposed_conv2d_stride2(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::transposed_conv2d_stride2(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// `a * sigmoid(b)` of the two halves `a`, `b` of the channels (dimension 1).
///
/// # Shapes
/// - x: `[batch, 2n, h, w]`
/// - returns: `[batch, n, h, w]`
pub fn glu(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::glu(x.into_dispatch()))
}

/// Zero padding of the last two dimensions of `x` by `[top, bottom, left, right]`.
pub fn pad_zeros(x: Tensor<4>, padding: [usize; 4]) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::pad_zeros(
        x.into_dispatch(),
        padding,
    ))
}

/// `tanh(a) * sigmoid(b)` of the two halves `a`, `b` of the channels (dimension 1).
///
/// # Shapes
/// - x: `[batch, 2n, h, w]`
/// - returns: `[batch, n, h, w]`
pub fn gate(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::gate(x.into_dispatch()))
}

/// PixelCNN++'s concat_elu: elu of `[x, -x]` concatenated on the channels (on libtorch its
/// backward pass is libtorch's fused `elu_backward`).
///
/// # Shapes
/// - x: `[batch, n, h, w]`
/// - returns: `[batch, 2n, h, w]`
pub fn concat_elu(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::concat_elu(x.into_dispatch()))
}

/// The two convolutions of a gated resnet: `[weight, bias]` each.
pub type ResnetConvs = [(Tensor<4>, Tensor<1>); 2];

/// The auxiliary input of a gated resnet and its 1x1 convolution's weight and bias.
pub type ResnetAux = (Tensor<4>, Tensor<2>, Tensor<1>);

/// PixelCNN++'s gated resnet (see [`NativeBackward::gated_resnet`]).
pub fn gated_resnet(
    x: Tensor<4>,
    [(w1, b1), (w2, b2)]: ResnetConvs,
    aux: Option<ResnetAux>,
    shift: Option<Tensor<4>>,
    dropped: Option<Tensor<4, Bool>>,
    shape: ResnetShape,
) -> Tensor<4> {
    let aux = match aux {
        Some((input, weight, bias)) => Maybe::Aux {
            input: input.into_dispatch(),
            weight: weight.into_dispatch(),
            bias: bias.into_dispatch(),
        },
        None => Maybe::None,
    };
    let shift = shift.map_or(Maybe::None, |s| Maybe::Some(s.into_dispatch()));
    let dropped = dropped.map_or(MaybeBool::None, |d| MaybeBool::Some(d.into_dispatch()));
    Tensor::from_dispatch(<Dispatch as NativeBackward>::gated_resnet(
        x.into_dispatch(),
        w1.into_dispatch(),
        b1.into_dispatch(),
        w2.into_dispatch(),
        b2.into_dispatch(),
        aux,
        shift,
        dropped,
        shape,
    ))
}

/// The negative log-likelihood in nats of `targets` under a softmax of `logits` over the 256
/// values, summed over every sub-pixel.
///
/// # Shapes
/// - logits: `[batch, colours, 256, h, w]`
/// - targets: `[batch, colours, h, w]`, values 0..255
/// - returns: `[1]`
pub fn categorical_nll(logits: Tensor<5>, targets: Tensor<4, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::categorical_nll(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

#[cfg(feature = "tch")]
mod libtorch {
    use super::{Autodiff, Backward, CheckpointStrategy, Checkpointer, Gradients, Ops, OpsKind};
    use super::{Maybe, MaybeBool, NativeBackward, ResnetShape};
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    use burn::backend::tensor::{FloatTensor, IntTensor};

    /// Without autodiff (evaluation, sampling): libtorch's own kernels, without Burn's
    /// decompositions (its padding fills a tensor on the host and copies it over).
    impl NativeBackward for LibTorch {
        fn pad_zeros(x: TchTensor, padding: [usize; 4]) -> TchTensor {
            TchTensor::new(pad(&x.tensor, padding))
        }

        fn gate(x: TchTensor) -> TchTensor {
            TchTensor::new(gate(&x.tensor))
        }

        fn categorical_nll(logits: TchTensor, targets: TchTensor) -> TchTensor {
            TchTensor::new(nll(&logits.tensor, &targets.tensor))
        }

        fn concat_elu(x: TchTensor) -> TchTensor {
            TchTensor::new(concat_elu(&x.tensor))
        }

        fn glu(x: TchTensor) -> TchTensor {
            TchTensor::new(x.tensor.glu(1))
        }

        fn gated_resnet(
            x: TchTensor,
            w1: TchTensor,
            b1: TchTensor,
            w2: TchTensor,
            b2: TchTensor,
            aux: Maybe<Self>,
            shift: Maybe<Self>,
            dropped: MaybeBool<Self>,
            shape: ResnetShape,
        ) -> TchTensor {
            let mut inputs = vec![x, w1, b1, w2, b2];
            let has_aux = matches!(aux, Maybe::Aux { .. });
            if let Maybe::Aux {
                input,
                weight,
                bias,
            } = aux
            {
                inputs.extend([input, weight, bias]);
            }
            let has_shift = matches!(shift, Maybe::Some(_));
            if let Maybe::Some(s) = shift {
                inputs.push(s);
            }
            let dropped = match dropped {
                MaybeBool::Some(d) => Some(d.tensor),
                MaybeBool::None => None,
            };
            let refs: Vec<&tch::Tensor> = inputs.iter().map(|t| &t.tensor).collect();
            let _guard = tch::no_grad_guard();
            TchTensor::new(resnet(&refs, has_aux, has_shift, dropped.as_ref(), shape))
        }
    }

    /// The gated resnet on libtorch tensors: `t` holds x, conv1's weight and bias, conv2's, then
    /// (`aux`) the auxiliary input and its 1x1 convolution's weight and bias, then (`shift`)
    /// the shift of conv2's output.
    fn resnet(
        t: &[&tch::Tensor],
        aux: bool,
        shift: bool,
        dropped: Option<&tch::Tensor>,
        shape: ResnetShape,
    ) -> tch::Tensor {
        let (x, w1, b1, w2, b2) = (t[0], t[1], t[2], t[3], t[4]);
        let mut c1 = conv(&[&pad(&concat_elu(x), shape.padding), w1, b1]);
        let mut rest = &t[5..];
        if aux {
            let (a, w, b) = (rest[0], rest[1], rest[2]);
            let [n_out, n_in] = [0, 1].map(|d| w.size()[d]);
            c1 += conv(&[&concat_elu(a), &w.reshape([n_out, n_in, 1, 1]), b]);
            rest = &rest[3..];
        }
        let mut c1 = concat_elu(&c1);
        if let Some(d) = dropped {
            c1 = c1.masked_fill(d, 0.0) * shape.keep;
        }
        let mut c2 = conv(&[&pad(&c1, shape.padding), w2, b2]);
        if shift {
            c2 += rest[0];
        }
        x + c2.glu(1)
    }

    fn concat_elu(x: &tch::Tensor) -> tch::Tensor {
        tch::Tensor::cat(&[x, &x.neg()], 1).elu()
    }

    fn pad(x: &tch::Tensor, padding: [usize; 4]) -> tch::Tensor {
        let [top, bottom, left, right] = padding.map(|p| p as i64);
        x.constant_pad_nd([left, right, top, bottom])
    }

    fn gate(x: &tch::Tensor) -> tch::Tensor {
        let halves = x.chunk(2, 1);
        halves[0].tanh() * halves[1].sigmoid()
    }

    fn nll(logits: &tch::Tensor, targets: &tch::Tensor) -> tch::Tensor {
        // [b, c, 256, h, w] -> [b, 256, c, h, w]: the classes in dimension 1.
        logits
            .transpose(1, 2)
            .cross_entropy_loss::<tch::Tensor>(targets, None, tch::Reduction::Sum, -100, 0.0)
            .reshape([1])
    }

    /// The libtorch leaves of a forward pass and its output, still attached to libtorch's
    /// autograd graph.
    #[derive(Clone, Debug)]
    struct Graph {
        leaves: Vec<TchTensor>,
        output: TchTensor,
    }

    /// Whether Burn's graph wants the gradient of one input: a probe that is never finished.
    #[derive(Debug)]
    struct Probe;

    impl Backward<LibTorch, 1> for Probe {
        type State = ();
        fn backward(self, _: Ops<(), 1>, _: &mut Gradients, _: &mut Checkpointer) {}
    }

    /// Burn's backward step of an operation recorded in libtorch's autograd graph.
    #[derive(Debug)]
    struct TorchBackward;

    impl<const N: usize> Backward<LibTorch, N> for TorchBackward {
        type State = Graph;

        fn backward(self, ops: Ops<Graph, N>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<LibTorch>(&ops.node);
            let Graph { leaves, output } = ops.state;
            let wanted: Vec<usize> = (0..N)
                .filter(|&i| ops.parents[i].is_some() && leaves[i].tensor.requires_grad())
                .collect();
            if wanted.is_empty() {
                return;
            }
            // The gradient of <output, grad> with respect to the leaves is the vector-Jacobian
            // product that Burn asks for; libtorch's engine runs the operation's own backward.
            let dot = (&output.tensor * &grad.tensor).sum(output.tensor.kind());
            let inputs: Vec<&tch::Tensor> = wanted.iter().map(|&i| &leaves[i].tensor).collect();
            let results = tch::Tensor::run_backward(&[dot], &inputs, false, false);
            for (&i, g) in wanted.iter().zip(results) {
                if let Some(node) = &ops.parents[i] {
                    grads.register::<LibTorch>(node.id, TchTensor::new(g));
                }
            }
        }
    }

    /// Runs `forward` on libtorch leaves of `inputs` (requiring a gradient where Burn tracks the
    /// input) and registers its libtorch graph as the backward step of its output in Burn's graph.
    fn record<C: CheckpointStrategy, const N: usize>(
        inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
        forward: impl FnOnce(&[&tch::Tensor]) -> tch::Tensor,
    ) -> FloatTensor<Autodiff<LibTorch, C>> {
        let tracked = inputs.each_ref().map(|t| {
            matches!(
                Probe.prepare::<C>([t.node()]).compute_bound().stateful(),
                OpsKind::Tracked(_)
            )
        });
        let prep = <TorchBackward as Backward<LibTorch, N>>::prepare::<C>(
            TorchBackward,
            inputs.each_ref().map(|t| t.node()),
        );
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let leaves: Vec<TchTensor> = inputs
                    .iter()
                    .zip(tracked)
                    .map(|(t, needs)| {
                        TchTensor::new(t.primitive().tensor.detach().set_requires_grad(needs))
                    })
                    .collect();
                let output = {
                    let refs: Vec<&tch::Tensor> = leaves.iter().map(|t| &t.tensor).collect();
                    TchTensor::new(forward(&refs))
                };
                let value = TchTensor::new(output.tensor.detach());
                prep.finish(Graph { leaves, output }, value)
            }
            OpsKind::UnTracked(prep) => {
                let primitives: Vec<TchTensor> =
                    inputs.into_iter().map(|t| t.into_primitive()).collect();
                let refs: Vec<&tch::Tensor> = primitives.iter().map(|t| &t.tensor).collect();
                let _guard = tch::no_grad_guard();
                prep.finish(TchTensor::new(forward(&refs)))
            }
        }
    }

    fn conv(t: &[&tch::Tensor]) -> tch::Tensor {
        tch::Tensor::conv2d(t[0], t[1], Some(t[2]), [1, 1], [0, 0], [1, 1], 1)
    }

    fn strided(t: &[&tch::Tensor], stride: usize) -> tch::Tensor {
        let s = stride as i64;
        tch::Tensor::conv2d(t[0], t[1], Some(t[2]), [s, s], [0, 0], [1, 1], 1)
    }

    fn transposed(t: &[&tch::Tensor]) -> tch::Tensor {
        t[0].conv_transpose2d(t[1], Some(t[2]), [2, 2], [0, 0], [0, 0], 1, [1, 1])
    }

    impl<C: CheckpointStrategy> NativeBackward for Autodiff<LibTorch, C> {
        fn valid_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            record::<C, 3>([x, weight, bias], conv)
        }

        fn pad_zeros(x: FloatTensor<Self>, padding: [usize; 4]) -> FloatTensor<Self> {
            record::<C, 1>([x], |t| pad(t[0], padding))
        }

        fn gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
            record::<C, 1>([x], |t| gate(t[0]))
        }

        fn concat_elu(x: FloatTensor<Self>) -> FloatTensor<Self> {
            record::<C, 1>([x], |t| concat_elu(t[0]))
        }

        fn strided_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
            stride: usize,
        ) -> FloatTensor<Self> {
            record::<C, 3>([x, weight, bias], |t| strided(t, stride))
        }

        fn transposed_conv2d_stride2(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            record::<C, 3>([x, weight, bias], transposed)
        }

        fn glu(x: FloatTensor<Self>) -> FloatTensor<Self> {
            record::<C, 1>([x], |t| t[0].glu(1))
        }

        fn categorical_nll(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
        ) -> FloatTensor<Self> {
            let targets = targets.tensor;
            record::<C, 1>([logits], move |t| nll(t[0], &targets))
        }

        fn gated_resnet(
            x: FloatTensor<Self>,
            w1: FloatTensor<Self>,
            b1: FloatTensor<Self>,
            w2: FloatTensor<Self>,
            b2: FloatTensor<Self>,
            aux: Maybe<Self>,
            shift: Maybe<Self>,
            dropped: MaybeBool<Self>,
            shape: ResnetShape,
        ) -> FloatTensor<Self> {
            let has_aux = matches!(aux, Maybe::Aux { .. });
            let has_shift = matches!(shift, Maybe::Some(_));
            let dropped = match dropped {
                MaybeBool::Some(d) => Some(d.tensor),
                MaybeBool::None => None,
            };
            let forward =
                move |t: &[&tch::Tensor]| resnet(t, has_aux, has_shift, dropped.as_ref(), shape);
            let convs = [x, w1, b1, w2, b2];
            match (aux, shift) {
                (Maybe::None, Maybe::None) => record::<C, 5>(convs, forward),
                (Maybe::None, Maybe::Some(s)) => {
                    let [x, w1, b1, w2, b2] = convs;
                    record::<C, 6>([x, w1, b1, w2, b2, s], forward)
                }
                (
                    Maybe::Aux {
                        input,
                        weight,
                        bias,
                    },
                    Maybe::None,
                ) => {
                    let [x, w1, b1, w2, b2] = convs;
                    record::<C, 8>([x, w1, b1, w2, b2, input, weight, bias], forward)
                }
                (
                    Maybe::Aux {
                        input,
                        weight,
                        bias,
                    },
                    Maybe::Some(s),
                ) => {
                    let [x, w1, b1, w2, b2] = convs;
                    record::<C, 9>([x, w1, b1, w2, b2, input, weight, bias, s], forward)
                }
                _ => panic!("a gated resnet's aux is Maybe::Aux or None, its shift Some or None"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_devices;
    use burn::tensor::module::conv2d;
    use burn::tensor::{DType, Device, Distribution, TensorData, Tolerance};

    fn random<const D: usize>(dims: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(dims, Distribution::Normal(0.0, 1.0), device)
    }

    /// Output and gradients of `valid_conv2d` against Burn's own convolution and its backward.
    fn compare(device: &Device, x_tracked: bool, dtype: DType) {
        let device = device.clone().autodiff();
        device.seed(7);
        let x = random([3, 4, 9, 8], &device);
        let w = random([6, 4, 3, 5], &device);
        let b = random([6], &device);
        let g = random([3, 6, 7, 4], &device).cast(dtype);
        let run = |ours: bool| {
            let x = if x_tracked {
                x.clone().require_grad()
            } else {
                x.clone()
            };
            let (w, b) = (w.clone().require_grad(), b.clone().require_grad());
            // Each input used twice, so that gradients from two paths must add up.
            let (xc, wc, bc) = (
                x.clone().cast(dtype),
                w.clone().cast(dtype),
                b.clone().cast(dtype),
            );
            let out = if ours {
                valid_conv2d(xc.clone(), wc.clone(), bc.clone())
            } else {
                conv2d(xc.clone(), wc.clone(), Some(bc.clone()), options())
            };
            let loss = (out.clone() * g.clone()).sum().cast(DType::F32)
                + (xc.mean() + wc.sum() * 0.5 + bc.sum()).cast(DType::F32);
            let grads = loss.backward();
            let gx = x.grad(&grads).map(|t| t.into_data());
            (
                out.cast(DType::F32).into_data(),
                gx,
                w.grad(&grads).unwrap().into_data(),
                b.grad(&grads).unwrap().into_data(),
            )
        };
        let (ours, theirs) = (run(true), run(false));
        let tol = if dtype == DType::F32 {
            Tolerance::<f32>::rel_abs(1e-4, 1e-4)
        } else {
            Tolerance::<f32>::rel_abs(2e-2, 2e-1)
        };
        ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
        assert_eq!(ours.1.is_some(), x_tracked);
        if let (Some(a), Some(b)) = (ours.1, theirs.1) {
            a.assert_approx_eq::<f32>(&b, tol);
        }
        ours.2.assert_approx_eq::<f32>(&theirs.2, tol);
        ours.3.assert_approx_eq::<f32>(&theirs.3, tol);
    }

    #[test]
    fn gradients_match_burns_convolution() {
        for device in test_devices() {
            compare(&device, true, DType::F32);
            compare(&device, false, DType::F32);
            compare(&device, true, DType::BF16);
        }
    }

    #[test]
    fn without_autodiff_they_are_burns_operations() {
        for device in test_devices() {
            let x = random([2, 3, 6, 6], &device);
            let w = random([4, 3, 2, 3], &device);
            let b = random([4], &device);
            let expected = conv2d(x.clone(), w.clone(), Some(b.clone()), options());
            valid_conv2d(x.clone(), w, b)
                .into_data()
                .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::default());
            let expected = x
                .clone()
                .pad((1, 0, 2, 3), burn::tensor::ops::PadMode::Constant(0.0));
            pad_zeros(x.clone(), [2, 3, 1, 0])
                .into_data()
                .assert_eq(&expected.into_data(), true);
            let x = random([2, 4, 3, 3], &device);
            let expected = burn::tensor::activation::tanh(x.clone().narrow(1, 0, 2))
                * burn::tensor::activation::sigmoid(x.clone().narrow(1, 2, 2));
            gate(x)
                .into_data()
                .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::default());
        }
    }
    #[test]
    fn nll_and_its_gradient_match_log_softmax_and_gather() {
        use burn::tensor::activation::log_softmax;
        use burn::tensor::{Int, TensorData};
        for device in test_devices() {
            let device = device.autodiff();
            device.seed(3);
            let (b, c, h, w) = (2, 3, 4, 5);
            let logits = (random([b, c, 256, h, w], &device) * 3.0).require_grad();
            let targets: Vec<i64> = (0..b * c * h * w).map(|i| (i * 61 % 256) as i64).collect();
            let targets =
                Tensor::<4, Int>::from_data(TensorData::new(targets, [b, c, h, w]), &device);
            let reference = log_softmax(logits.clone(), 2)
                .gather(2, targets.clone().unsqueeze_dim(2))
                .sum()
                .neg();
            let ours = categorical_nll(logits.clone(), targets);
            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-4);
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&reference.clone().into_data(), tol);
            // A second use of the logits, so that gradients from two paths must add up.
            let g_ours = (ours * 0.5 + logits.clone().sum()).backward();
            let g_ref = (reference * 0.5 + logits.clone().sum()).backward();
            logits
                .grad(&g_ours)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&logits.grad(&g_ref).unwrap().into_data(), tol);
        }
    }
    /// Value and input gradient of `ours` and `reference` on the same random input, tracked,
    /// with a second use of the input so that gradients from two paths must add up.
    fn same_value_and_gradient(
        dims: [usize; 4],
        ours: impl Fn(Tensor<4>) -> Tensor<4>,
        reference: impl Fn(Tensor<4>) -> Tensor<4>,
    ) {
        for device in test_devices() {
            let device = device.autodiff();
            device.seed(5);
            let x = random(dims, &device).require_grad();
            let (a, b) = (ours(x.clone()), reference(x.clone()));
            let tol = Tolerance::<f32>::rel_abs(1e-5, 1e-5);
            a.clone()
                .into_data()
                .assert_approx_eq::<f32>(&b.clone().into_data(), tol);
            let weights = random(a.dims(), &device);
            let ga = ((a * weights.clone()).sum() + x.clone().sum()).backward();
            let gb = ((b * weights).sum() + x.clone().sum()).backward();
            x.grad(&ga)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&x.grad(&gb).unwrap().into_data(), tol);
        }
    }

    #[test]
    fn gate_matches_tanh_times_sigmoid() {
        use burn::tensor::activation::{sigmoid, tanh};
        same_value_and_gradient([2, 6, 3, 4], gate, |x| {
            tanh(x.clone().narrow(1, 0, 3)) * sigmoid(x.narrow(1, 3, 3))
        });
    }

    #[test]
    fn glu_matches_a_times_sigmoid_b() {
        use burn::tensor::activation::sigmoid;
        same_value_and_gradient([2, 6, 3, 4], glu, |x| {
            x.clone().narrow(1, 0, 3) * sigmoid(x.narrow(1, 3, 3))
        });
    }

    /// The strided and transposed convolutions against Burn's, values and the gradients of all
    /// three inputs.
    #[test]
    fn strided_and_transposed_convolutions_match_burns() {
        use burn::tensor::module::conv_transpose2d;
        for device in test_devices() {
            let device = device.autodiff();
            device.seed(9);
            let x = random([2, 3, 7, 6], &device).require_grad();
            let w = random([4, 3, 2, 3], &device).require_grad();
            let wt = random([3, 4, 2, 2], &device).require_grad();
            let b = random([4], &device).require_grad();
            let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
            let pairs: [(Tensor<4>, Tensor<4>); 2] = [
                (
                    strided_conv2d(x.clone(), w.clone(), b.clone(), 2),
                    conv2d(
                        x.clone(),
                        w.clone(),
                        Some(b.clone()),
                        ConvOptions::new([2, 2], [0, 0], [1, 1], 1),
                    ),
                ),
                (
                    transposed_conv2d_stride2(x.clone(), wt.clone(), b.clone()),
                    conv_transpose2d(
                        x.clone(),
                        wt.clone(),
                        Some(b.clone()),
                        ConvTransposeOptions::new([2, 2], [0, 0], [0, 0], [1, 1], 1),
                    ),
                ),
            ];
            for (ours, theirs) in pairs {
                ours.clone()
                    .into_data()
                    .assert_approx_eq::<f32>(&theirs.clone().into_data(), tol);
                let weights = random(ours.dims(), &device);
                let ga = (ours * weights.clone()).sum().backward();
                let gb = (theirs * weights).sum().backward();
                for t in [&x, &w, &wt] {
                    if let (Some(a), Some(b)) = (t.grad(&ga), t.grad(&gb)) {
                        a.into_data().assert_approx_eq::<f32>(&b.into_data(), tol);
                    }
                }
                let (a, bb) = (b.grad(&ga).unwrap(), b.grad(&gb).unwrap());
                a.into_data().assert_approx_eq::<f32>(&bb.into_data(), tol);
            }
        }
    }

    /// The fused gated resnet against Burn's own operations one by one (elu, pad, convolution,
    /// matrix product, mask, sigmoid), with and without each optional input, values and the
    /// gradients of every input.
    #[test]
    fn gated_resnet_matches_burns_operations() {
        use burn::tensor::activation::{elu, sigmoid};
        use burn::tensor::ops::PadMode;
        let (b, f, a, h, w) = (2, 3, 4, 5, 6);
        let padding = [1, 0, 1, 1]; // a 2x3 kernel, down-shifted
        let reference = |x: Tensor<4>,
                         [(w1, b1), (w2, b2)]: ResnetConvs,
                         aux: Option<ResnetAux>,
                         shift: Option<Tensor<4>>,
                         dropped: Option<Tensor<4, Bool>>,
                         keep: f64| {
            let ce = |t: Tensor<4>| elu(Tensor::cat(vec![t.clone(), t.neg()], 1), 1.0);
            let pad = |t: Tensor<4>| t.pad((1, 1, 1, 0), PadMode::Constant(0.0));
            let mut c1 = conv2d(pad(ce(x.clone())), w1, Some(b1), options());
            if let Some((input, weight, bias)) = aux {
                let [n_out, n_in] = weight.dims();
                let weight = weight.reshape([n_out, n_in, 1, 1]);
                c1 = c1 + conv2d(ce(input), weight, Some(bias), options());
            }
            let mut c1 = ce(c1);
            if let Some(d) = dropped {
                c1 = c1.mask_fill(d, 0.0) * keep;
            }
            let mut c2 = conv2d(pad(c1), w2, Some(b2), options());
            if let Some(s) = shift {
                c2 = c2 + s;
            }
            x + c2.clone().narrow(1, 0, f) * sigmoid(c2.narrow(1, f, f))
        };
        for device in test_devices() {
            let device = device.autodiff();
            device.seed(11);
            let leaf = |dims: Vec<usize>| {
                Tensor::<1>::random(
                    [dims.iter().product::<usize>()],
                    Distribution::Normal(0.0, 0.5),
                    &device,
                )
                .require_grad()
            };
            let x = leaf(vec![b, f, h, w]);
            let params = [
                leaf(vec![f, 2 * f, 2, 3]),
                leaf(vec![f]),
                leaf(vec![2 * f, 2 * f, 2, 3]),
                leaf(vec![2 * f]),
                leaf(vec![b, a, h, w]),
                leaf(vec![f, 2 * a]),
                leaf(vec![f]),
                leaf(vec![b, 2 * f, 1, 1]),
            ];
            let mask: Vec<bool> = (0..b * 2 * f * h * w).map(|i| i * 7 % 5 < 2).collect();
            let mask = Tensor::<4, Bool>::from_data(
                burn::tensor::TensorData::new(mask, [b, 2 * f, h, w]),
                &device,
            );
            let weights = random([b, f, h, w], &device);
            let tol = Tolerance::<f32>::rel_abs(1e-4, 1e-4);
            for (with_aux, with_shift, with_dropout) in [
                (false, false, false),
                (true, false, true),
                (false, true, true),
                (true, true, false),
            ] {
                let run = |ours: bool| {
                    let x4 = x.clone().reshape([b, f, h, w]);
                    let p = &params;
                    let convs = [
                        (p[0].clone().reshape([f, 2 * f, 2, 3]), p[1].clone()),
                        (p[2].clone().reshape([2 * f, 2 * f, 2, 3]), p[3].clone()),
                    ];
                    let aux = with_aux.then(|| {
                        (
                            p[4].clone().reshape([b, a, h, w]),
                            p[5].clone().reshape([f, 2 * a]),
                            p[6].clone(),
                        )
                    });
                    let shift = with_shift.then(|| p[7].clone().reshape([b, 2 * f, 1, 1]));
                    let dropped = with_dropout.then(|| mask.clone());
                    let out = if ours {
                        let shape = ResnetShape { padding, keep: 2.0 };
                        gated_resnet(x4, convs, aux, shift, dropped, shape)
                    } else {
                        reference(x4, convs, aux, shift, dropped, 2.0)
                    };
                    let grads = (out.clone() * weights.clone()).sum().backward();
                    let mut all = vec![out.into_data(), x.grad(&grads).unwrap().into_data()];
                    for t in &params {
                        if let Some(g) = t.grad(&grads) {
                            all.push(g.into_data());
                        }
                    }
                    all
                };
                let (ours, theirs) = (run(true), run(false));
                assert_eq!(ours.len(), theirs.len());
                assert_eq!(
                    ours.len(),
                    6 + 3 * usize::from(with_aux) + usize::from(with_shift)
                );
                for (a, b) in ours.iter().zip(&theirs) {
                    a.assert_approx_eq::<f32>(b, tol);
                }
            }
        }
    }

    /// Every activation of the models at the extremes, on every backend: finite values and
    /// gradients at +-100 in f32 and bf16 and +-20 in f16 (the largest activations a layer of a
    /// diverging or saturated network hands on), and the values they should have there.
    #[test]
    fn activations_are_finite_at_the_extremes() {
        use burn::tensor::FloatDType;
        type Activation = (&'static str, fn(Tensor<4>) -> Tensor<4>);
        let activations: [Activation; 4] = [
            ("elu", crate::model::pixelcnnpp::elu),
            ("concat_elu", concat_elu),
            ("gate", gate),
            ("glu", glu),
        ];
        for device in test_devices() {
            let device = device.autodiff();
            for (dtype, big) in [
                (FloatDType::F32, 100.0f32),
                (FloatDType::BF16, 100.0),
                (FloatDType::F16, 20.0),
            ] {
                let values = vec![-big, -big / 2.0, -1.0, 0.0, 1.0, 3.0, big / 2.0, big];
                for (name, activation) in activations {
                    let x = Tensor::<4>::from_data(
                        TensorData::new(values.clone(), [1, 8, 1, 1]),
                        &device,
                    )
                    .require_grad();
                    let y = activation(x.clone().cast(dtype)).cast(FloatDType::F32);
                    let grads = y.clone().sum().backward();
                    let y: Vec<f32> = y.into_data().convert::<f32>().try_into_vec().unwrap();
                    let g: Vec<f32> = x
                        .grad(&grads)
                        .unwrap()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec()
                        .unwrap();
                    let at = format!("{name} at +-{big} in {dtype:?} on {device:?}");
                    assert!(y.iter().all(|v| v.is_finite()), "{at}: values {y:?}");
                    assert!(g.iter().all(|v| v.is_finite()), "{at}: gradients {g:?}");
                    if name == "elu" {
                        // elu(x) = x above 0 (gradient 1), -1 far below (gradient exp(x) ~ 0).
                        let tol = if dtype == FloatDType::F32 { 1e-6 } else { 0.1 };
                        assert!(
                            (y[7] - big).abs() <= tol * big && (y[0] + 1.0).abs() < 1e-3,
                            "{at}: {y:?}"
                        );
                        // exp(-100) is a denormal in f32; at 0 both sides' slope is 1.
                        assert!(g[7] == 1.0 && g[0] < 1e-8 && g[3] == 1.0, "{at}: {g:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn concat_elu_matches_burns_elu() {
        use burn::tensor::activation::elu;
        same_value_and_gradient([2, 3, 4, 5], concat_elu, |x| {
            elu(Tensor::cat(vec![x.clone(), x.neg()], 1), 1.0)
        });
    }

    #[test]
    fn pad_zeros_matches_burns_pad() {
        use burn::tensor::ops::PadMode;
        same_value_and_gradient(
            [2, 3, 4, 5],
            |x| pad_zeros(x, [2, 0, 1, 3]),
            |x| x.pad((1, 3, 2, 0), PadMode::Constant(0.0)),
        );
    }
}
