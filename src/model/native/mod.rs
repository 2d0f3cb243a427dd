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
//! Each libtorch node costs Burn's graph a node and libtorch's engine a backward call (from the
//! output's gradient, through `src/native/torch_extras.cpp`: tch 0.22 starts a backward pass from a
//! scalar only, which cost a product and a sum the size of the output per node), so a chain of
//! operations that always go together is one node: PixelCNN++'s gated resnet (`gated_resnet`),
//! whose two convolutions, 1x1 convolution, three concat_elus, dropout and gate are one libtorch
//! graph between Burn's; a layer of the gated model (`gated_layer`) and its head (`gated_head`);
//! the logistic mixture's likelihood (`logistic_nll`). The last three, and PixelCNN++'s dropout
//! masks in 32-bit integers (`dropout_masks`), exist on libtorch only ([`runs_fused`]): elsewhere
//! the Burn operations that define them run.

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
    /// `c1 = conv1(concat_elu(pad(x))) [+ nin(concat_elu(aux))]` (concat_elu keeps padded zeros
    /// zero: the same as padding after it), every `pad` by
    /// `shape.padding`, `drop` zeroing where `kept` is false and scaling the rest by
    /// `shape.keep`, `nin` a 1x1 convolution. On libtorch the whole block is one node of
    /// libtorch's autograd graph; elsewhere it is the operations above one by one.
    ///
    /// # Shapes
    /// - x: `[batch, f, h, w]`
    /// - w1: `[f, 2f, kh, kw]`, b1: `[f]`, w2: `[2f, 2f, kh, kw]`, b2: `[2f]`
    /// - aux: input `[batch, a, h, w]`, weight `[f, 2a]`, bias `[f]`
    /// - shift: `[batch, 2f, 1, 1]`; kept: `[batch, 2f, h, w]`
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
        #[extension_type] kept: MaybeBool<Self>,
        shape: ResnetShape,
    ) -> FloatTensor<Self> {
        // Padded before concat_elu, which keeps zeros zero: the padded tensor is then concat_elu's
        // output too, and a graph keeps one copy of it for both backward passes, not two.
        let padded = Self::concat_elu(Self::pad_zeros(x.clone(), shape.padding));
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
        if let MaybeBool::Some(kept) = kept {
            let dtype = c1.dtype();
            let dropped = Self::bool_not(kept);
            let zeroed = Self::float_mask_fill(c1, dropped, Scalar::new(0.0, &dtype));
            c1 = Self::float_mul_scalar(zeroed, Scalar::new(shape.keep, &dtype));
        }
        let mut c2 = Self::valid_conv2d(Self::pad_zeros(c1, shape.padding), w2, b2);
        if let Maybe::Some(shift) = shift {
            c2 = Self::float_add(c2, shift);
        }
        Self::float_add(x, Self::glu(c2))
    }

    /// A layer of the gated PixelCNN (`GatedLayer`) as one operation. It exists on libtorch only
    /// ([`runs_fused`]), where it is one node of libtorch's autograd graph instead of ~50 of Burn's;
    /// every other backend runs `GatedLayer::forward`, which defines the layer (a test compares the
    /// two, values and gradients, on every layout).
    ///
    /// `state` carries the stacks from layer to layer: the image for the first layer
    /// (`shape.first`: both stacks start from it, no skips yet), else the vertical stack, the
    /// horizontal stack and the sum of the skips so far, concatenated on the channels (without
    /// the link the vertical stack reaches nothing, and neither the state nor the operation
    /// carries it: its weights and terms are not read); the last
    /// layer (`shape.last`) returns the sum of all skips alone, `[batch, ch, h, w]`. Each
    /// masked convolution comes as weight, bias and mask (multiplied here, then cast to the
    /// state's float type). The optional terms come from Burn, summed and cast: `v_pre` joins
    /// the vertical gate before the link reads it (concat conditioning), `v_post` after (class
    /// biases, maps), `h_terms` joins the horizontal gate.
    ///
    /// # Shapes
    /// - state: `[batch, colours, h, w]` (first layer) or `[batch, 3ch, h, w]` (`2ch` without
    ///   the link)
    /// - convs: weights `[g, in, kh, kw]` (stacks), `[ch, ch, 1, 1]` (out, skip), `[g, g, 1, 1]`
    ///   (link), with g = 2ch with gates, else ch
    /// - v_pre, v_post, h_terms: `[batch, g, h, w]` or `[batch, g, 1, 1]`
    /// - returns: the next state, or `[batch, ch, h, w]` (last)
    fn gated_layer(
        state: FloatTensor<Self>,
        #[extension_type] convs: LayerConvs<Self>,
        #[extension_type] link: Link<Self>,
        #[extension_type] v_pre: Maybe<Self>,
        #[extension_type] v_post: Maybe<Self>,
        #[extension_type] h_terms: Maybe<Self>,
        shape: LayerShape,
    ) -> FloatTensor<Self> {
        let _ = (state, convs, link, v_pre, v_post, h_terms, shape);
        unreachable!("gated_layer runs on libtorch only (`runs_fused` says where)")
    }

    /// The gated PixelCNN's head (`GatedPixelCnn::head`, which defines it) as one operation:
    /// `out(relu(hidden(relu(skips))))`, both 1x1 masked convolutions given as weight, bias and
    /// mask. It exists on libtorch only ([`runs_fused`]).
    ///
    /// # Shapes
    /// - skips: `[batch, ch, h, w]`; weights `[ch, ch, 1, 1]` (hidden), `[outputs, ch, 1, 1]`
    /// - returns: `[batch, outputs, h, w]`
    fn gated_head(
        skips: FloatTensor<Self>,
        #[extension_type] convs: HeadConvs<Self>,
    ) -> FloatTensor<Self> {
        let _ = (skips, convs);
        unreachable!("gated_head runs on libtorch only (`runs_fused` says where)")
    }

    /// The logistic mixture's negative log-likelihood in nats, summed over the batch, as one
    /// operation. It exists on libtorch only ([`runs_fused`]), where it is one node of libtorch's
    /// autograd graph instead of ~40 of Burn's per colour; every other backend runs
    /// `loss::logistic::log_prob`, which defines it (a test compares the two, values and gradients).
    ///
    /// Log-scales are floored at `min_log_scale`.
    ///
    /// # Shapes
    /// - params: `[batch, loss::logistic::channels(colours, components), h, w]`
    /// - targets: `[batch, colours, h, w]`, values 0..255
    /// - returns: `[1]`
    fn logistic_nll(
        params: FloatTensor<Self>,
        targets: IntTensor<Self>,
        components: usize,
        min_log_scale: f64,
    ) -> FloatTensor<Self> {
        let _ = (params, targets, components, min_log_scale);
        unreachable!("logistic_nll runs on libtorch only (`runs_fused` says where)")
    }

    /// PixelCNN++'s dropout masks, what `model::pixelcnnpp`'s `dropout_masks` defines in 64-bit
    /// integer operations: for key `k` of `keys` (f32 whose bits are the u32 keys, on the device), image `i` (`images[i]`, the image's place in
    /// the global batch) and element `e` of `elements`, with `w = 32 / bits` elements per hash,
    /// whether bits `bits * (e mod w)` on of `hash32(((e / w) * 0x61C88647 + hash32(image ^ k))
    /// mod 2^32)` (`bits` of them) are at least `threshold`: the elements dropout keeps. It
    /// exists on libtorch only
    /// ([`runs_fused`]), in 32-bit integers whose products and sums wrap, their bytes read in place
    /// (the same bits at a fraction of the memory traffic, a test checks).
    ///
    /// # Shapes
    /// - images: `[batch]`, keys: `[keys]`
    /// - returns: `[keys, batch, elements]`
    fn dropout_masks(
        images: IntTensor<Self>,
        keys: FloatTensor<Self>,
        elements: usize,
        bits: u32,
        threshold: i64,
    ) -> BoolTensor<Self> {
        let _ = (images, keys, elements, bits, threshold);
        unreachable!("dropout_masks runs on libtorch only (`runs_fused` says where)")
    }

    /// The sum of the squares of `x` in f64, as Burn's `cast(F64).square().sum()` (the same
    /// bits), squared in place in its f64 copy instead of into a second one of twice the
    /// weights' size. It exists on libtorch only ([`runs_fused`]).
    ///
    /// # Shapes
    /// - x: `[n]`, f32
    /// - returns: `[1]`, f64
    fn square_sum_f64(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = x;
        unreachable!("square_sum_f64 runs on libtorch only (`runs_fused` says where)")
    }

    /// A step of Adam after the first, the optimiser's arithmetic (`optim/`) operation for
    /// operation (the same bits), in place: the moments brought forward and the weights moved
    /// in their own buffers where nothing else holds them (otherwise in copies), with one or two
    /// scratch buffers where Burn's operations make about eight of the weights' size (each a
    /// fresh allocation on the CPU, whose pages fault in). `scalars`, on the device (see
    /// [`NativeBackward::write_scalars`]): beta_1, 1 - beta_1, beta_2, 1 - beta_2, the combined
    /// bias correction, epsilon times the second correction's root, the learning rate, each the
    /// f32 that ATen would make of Burn's scalar argument (a product or sum with a 0-dim f32
    /// tensor is the one with that scalar). `overwrite`: the weights are written in place
    /// although other tensors hold their buffer (the caller knows them to be the model's
    /// parameters, views of it that the step replaces). It exists on libtorch only
    /// ([`runs_fused`]).
    ///
    ///
    /// `keep`: whether to take the step, decided on the device (an f16 step is skipped where its
    /// gradients overflow, without the host reading them first). Where given, `scalars` holds
    /// seven more, those of a step that changes nothing (1, 0, 1, 0, the correction, epsilon', 0),
    /// which the step takes instead where `keep` is false, after zeroing the gradients that are
    /// not finite: the weights and moments then keep their values (a zero's sign aside: `w - 0`).
    /// Where `keep` is true the step is the unmasked one, to the bit.
    ///
    /// # Shapes
    /// - weights, grads, first, second: `[n]`, f32
    /// - scalars: `[7]`, or `[14]` with `keep`, f32
    /// - keep: `[1]`
    /// - returns: the weights, the first and the second moment, and the gradients' buffer (its
    ///   values spent), `[n]`
    #[allow(clippy::type_complexity)]
    fn adam_in_place(
        weights: FloatTensor<Self>,
        grads: FloatTensor<Self>,
        first: FloatTensor<Self>,
        second: FloatTensor<Self>,
        scalars: FloatTensor<Self>,
        #[extension_type] keep: MaybeBool<Self>,
        overwrite: bool,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let _ = (weights, grads, first, second, scalars, keep, overwrite);
        unreachable!("adam_in_place runs on libtorch only (`runs_fused` says where)")
    }

    /// The weights' exponential moving average brought forward, `average * decay + current * (1 -
    /// decay)` as Burn's operations compute it (the same bits), written into the average's buffer
    /// (a copy where something else holds it) instead of two fresh ones of the weights' size.
    /// `scalars`, on the device: `decay` and `1 - decay` as f32 (see
    /// [`NativeBackward::adam_in_place`]). It exists on libtorch only ([`runs_fused`]).
    ///
    /// `keep` as for [`NativeBackward::adam_in_place`]: where given, `scalars` holds 1 and 0
    /// besides, taken where it is false (the average keeps its values).
    ///
    /// # Shapes
    /// - average, current: `[n]`, f32
    /// - scalars: `[2]`, or `[4]` with `keep`, f32
    /// - keep: `[1]`
    /// - returns: `[n]`
    fn ema_in_place(
        average: FloatTensor<Self>,
        current: FloatTensor<Self>,
        scalars: FloatTensor<Self>,
        #[extension_type] keep: MaybeBool<Self>,
    ) -> FloatTensor<Self> {
        let _ = (average, current, scalars, keep);
        unreachable!("ema_in_place runs on libtorch only (`runs_fused` says where)")
    }

    /// `values` written into `buffer` where it lies, by a copy that does not wait for the device
    /// (on CUDA staged from the host's memory as it returns): the per-step scalars of the update
    /// at one address step after step, which the kernels read (a CUDA graph's replay can change
    /// no kernel argument; it reads what such a buffer holds). It exists on libtorch only
    /// ([`runs_fused`]).
    ///
    /// # Shapes
    /// - buffer: `[values.len()]`, f32
    /// - returns: `buffer`
    fn write_scalars(buffer: FloatTensor<Self>, values: Vec<f32>) -> FloatTensor<Self> {
        let _ = (buffer, values);
        unreachable!("write_scalars runs on libtorch only (`runs_fused` says where)")
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
    kept: Option<Tensor<4, Bool>>,
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
    let kept = kept.map_or(MaybeBool::None, |k| MaybeBool::Some(k.into_dispatch()));
    Tensor::from_dispatch(<Dispatch as NativeBackward>::gated_resnet(
        x.into_dispatch(),
        w1.into_dispatch(),
        b1.into_dispatch(),
        w2.into_dispatch(),
        b2.into_dispatch(),
        aux,
        shift,
        kept,
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

/// Values per piece of the update's passes over all weights on libtorch's CPU (the gradients'
/// square sum, Adam and the average in place): 4 MiB of f32, so that each temporary comes from
/// the heap that `main` keeps (glibc maps anything above 32 MiB afresh, and every page of it
/// faults in again) and a piece's buffers stay in cache between its operations. On a GPU, one
/// piece: each would cost a kernel launch per operation.
pub const CPU_PIECE: usize = 1 << 20;

/// Writes `# name` into the operator trace of [`replay`] where one runs: a place in the code a
/// trace is cut at (where a CUDA graph's capture would begin or end). Nothing otherwise.
pub fn trace_mark(name: &std::ffi::CStr) {
    #[cfg(feature = "tch")]
    {
        unsafe extern "C" {
            fn pixel_trace_mark(name: *const std::ffi::c_char);
        }
        // SAFETY: a C function of src/native/torch_extras.cpp that catches every exception and
        // reads the terminated name during the call.
        unsafe { pixel_trace_mark(name.as_ptr()) };
    }
    #[cfg(not(feature = "tch"))]
    let _ = name;
}

mod fused;
pub mod graph;
#[cfg(feature = "tch")]
mod libtorch;
#[cfg(all(test, feature = "tch"))]
pub mod replay;
#[cfg(feature = "tch")]
mod torch_ops;

pub use fused::{
    DeviceBuffer, GatedLayerInputs, HeadConvs, LayerConvs, LayerShape, Link, Masked, adam_in_place,
    address, cat_into, cuda_index, dropout_masks, ema_in_place, gated_head, gated_layer,
    logistic_nll, other_holders, runs_fused, square_sum_f64, views_of,
};

#[cfg(test)]
mod tests;
