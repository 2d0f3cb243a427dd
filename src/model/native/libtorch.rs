//! The libtorch side: each operation recorded in libtorch's autograd graph, its gradients asked
//! of libtorch in Burn's backward pass.

use super::torch_ops::{
    LAYER_INPUTS, adam_in_place, concat_elu, conv, dropout_masks, ema_in_place, gate, head,
    head_inputs, layer, layer_inputs, logistic_nll, nll, pad, resnet, square_sum_f64, strided,
    transposed, write_scalars,
};
use super::{Autodiff, Backward, CheckpointStrategy, Checkpointer, Gradients, Ops, OpsKind};
use super::{
    HeadConvs, LayerConvs, LayerShape, Link, Maybe, MaybeBool, NativeBackward, ResnetShape,
};
use burn::backend::LibTorch;
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};

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

    fn gated_layer(
        state: TchTensor,
        convs: LayerConvs<Self>,
        link: Link<Self>,
        v_pre: Maybe<Self>,
        v_post: Maybe<Self>,
        h_terms: Maybe<Self>,
        shape: LayerShape,
    ) -> TchTensor {
        let (inputs, masks, present) = layer_inputs(state, convs, link, v_pre, v_post, h_terms);
        let masks: Vec<tch::Tensor> = masks.into_iter().map(|m| m.tensor).collect();
        let refs: Vec<&tch::Tensor> = inputs.iter().map(|t| &t.tensor).collect();
        let _guard = tch::no_grad_guard();
        TchTensor::new(layer(&refs, &masks, present, shape))
    }

    fn gated_head(skips: TchTensor, convs: HeadConvs<Self>) -> TchTensor {
        let (inputs, masks) = head_inputs(skips, convs);
        let masks: Vec<tch::Tensor> = masks.into_iter().map(|m| m.tensor).collect();
        let refs: Vec<&tch::Tensor> = inputs.iter().map(|t| &t.tensor).collect();
        let _guard = tch::no_grad_guard();
        TchTensor::new(head(&refs, &masks))
    }

    fn logistic_nll(
        params: TchTensor,
        targets: TchTensor,
        components: usize,
        min_log_scale: f64,
    ) -> TchTensor {
        let _guard = tch::no_grad_guard();
        let nll = logistic_nll(&params.tensor, &targets.tensor, components, min_log_scale);
        TchTensor::new(nll)
    }

    fn square_sum_f64(x: TchTensor) -> TchTensor {
        TchTensor::new(square_sum_f64(&x.tensor))
    }

    fn adam_in_place(
        weights: TchTensor,
        grads: TchTensor,
        first: TchTensor,
        second: TchTensor,
        scalars: TchTensor,
        keep: MaybeBool<Self>,
        overwrite: bool,
    ) -> (TchTensor, TchTensor, TchTensor, TchTensor) {
        let keep = kept(keep);
        let scalars = &scalars.tensor;
        adam_in_place(
            weights,
            grads,
            first,
            second,
            scalars,
            keep.as_ref(),
            overwrite,
        )
    }

    fn ema_in_place(
        average: TchTensor,
        current: TchTensor,
        scalars: TchTensor,
        keep: MaybeBool<Self>,
    ) -> TchTensor {
        ema_in_place(average, &current, &scalars.tensor, kept(keep).as_ref())
    }

    fn write_scalars(buffer: TchTensor, values: Vec<f32>) -> TchTensor {
        write_scalars(&buffer.tensor, &values);
        buffer
    }

    fn dropout_masks(
        images: TchTensor,
        keys: TchTensor,
        elements: usize,
        bits: u32,
        threshold: i64,
    ) -> TchTensor {
        TchTensor::new(dropout_masks(
            &images.tensor,
            &keys.tensor,
            elements,
            bits,
            threshold,
        ))
    }

    fn gated_resnet(
        x: TchTensor,
        w1: TchTensor,
        b1: TchTensor,
        w2: TchTensor,
        b2: TchTensor,
        aux: Maybe<Self>,
        shift: Maybe<Self>,
        kept: MaybeBool<Self>,
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
        let kept = self::kept(kept);
        let refs: Vec<&tch::Tensor> = inputs.iter().map(|t| &t.tensor).collect();
        let _guard = tch::no_grad_guard();
        TchTensor::new(resnet(&refs, has_aux, has_shift, kept.as_ref(), shape))
    }
}

/// An optional boolean input's libtorch tensor.
fn kept(b: MaybeBool<LibTorch>) -> Option<tch::Tensor> {
    match b {
        MaybeBool::Some(d) => Some(d.tensor),
        MaybeBool::None => None,
    }
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
        // The vector-Jacobian product that Burn asks for: libtorch's engine runs the
        // operation's own backward from the output's gradient.
        let inputs: Vec<&tch::Tensor> = wanted.iter().map(|&i| &leaves[i].tensor).collect();
        let results = vjp(&output.tensor, &grad.tensor, &inputs);
        for (&i, g) in wanted.iter().zip(results) {
            // An input that the output does not depend on has no gradient.
            let Some(g) = g else {
                continue;
            };
            if let Some(node) = &ops.parents[i] {
                grads.register::<LibTorch>(node.id, TchTensor::new(g));
            }
        }
    }
}

unsafe extern "C" {
    /// src/native/torch_extras.cpp (compiled by build.rs): tensors are `at::Tensor*`, what tch's
    /// `as_ptr` gives and `from_ptr` takes.
    fn pixel_vjp(
        output: *const std::ffi::c_void,
        grad: *const std::ffi::c_void,
        inputs: *const *const std::ffi::c_void,
        n: i32,
        results: *mut *mut std::ffi::c_void,
        error: *mut std::ffi::c_char,
        error_len: usize,
    ) -> i32;
}

/// The gradients of `inputs` (leaves that require one) given the gradient `grad` of `output`,
/// through libtorch's graph, which is freed; None where the output does not depend on an input.
/// (tch's `run_backward` starts from a scalar: `(output * grad).sum()`, a product and a sum the
/// size of the output, and a `ones_like`, per node.)
fn vjp(
    output: &tch::Tensor,
    grad: &tch::Tensor,
    inputs: &[&tch::Tensor],
) -> Vec<Option<tch::Tensor>> {
    let pointers: Vec<*const std::ffi::c_void> = inputs.iter().map(|t| t.as_ptr().cast()).collect();
    let mut results = vec![std::ptr::null_mut(); inputs.len()];
    let mut error = [0 as std::ffi::c_char; 1024];
    let n = i32::try_from(inputs.len()).expect("a node has few inputs");
    // SAFETY: every pointer is a live tensor of tch for the call; the function writes `n` new
    // tensors to `results` on success, catches every C++ exception and terminates `error`.
    let status = unsafe {
        pixel_vjp(
            output.as_ptr().cast(),
            grad.as_ptr().cast(),
            pointers.as_ptr(),
            n,
            results.as_mut_ptr(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status != 0 {
        // SAFETY: terminated by the function.
        let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        panic!(
            "libtorch's backward pass failed: {}",
            message.to_string_lossy()
        );
    }
    results
        .into_iter()
        .map(|p| {
            // SAFETY: a tensor allocated by the function for us; tch frees it on drop.
            let t = unsafe { tch::Tensor::from_ptr(p.cast()) };
            t.defined().then_some(t)
        })
        .collect()
}

/// Runs `forward` on libtorch leaves of `inputs` (requiring a gradient where Burn tracks the
/// input) and registers its libtorch graph as the backward step of its output in Burn's graph.
fn record<C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
    forward: impl FnOnce(&[&tch::Tensor]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    record_used::<C, N>(inputs, [true; N], forward)
}

/// `record` of an operation that ignores the inputs not `used` (placeholders: no gradient).
fn record_used<C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
    used: [bool; N],
    forward: impl FnOnce(&[&tch::Tensor]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let tracked: [bool; N] = std::array::from_fn(|i| {
        used[i]
            && matches!(
                Probe
                    .prepare::<C>([inputs[i].node()])
                    .compute_bound()
                    .stateful(),
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

    fn categorical_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let targets = targets.tensor;
        record::<C, 1>([logits], move |t| nll(t[0], &targets))
    }

    fn gated_layer(
        state: FloatTensor<Self>,
        convs: LayerConvs<Self>,
        link: Link<Self>,
        v_pre: Maybe<Self>,
        v_post: Maybe<Self>,
        h_terms: Maybe<Self>,
        shape: LayerShape,
    ) -> FloatTensor<Self> {
        let (inputs, masks, present) = layer_inputs(state, convs, link, v_pre, v_post, h_terms);
        // The masks are constants: libtorch tensors in the closure, not inputs of the node.
        let masks: Vec<tch::Tensor> = masks
            .into_iter()
            .map(|m| m.into_primitive().tensor)
            .collect();
        record_used::<C, LAYER_INPUTS>(inputs, present.used(shape), move |t| {
            layer(t, &masks, present, shape)
        })
    }

    fn gated_head(skips: FloatTensor<Self>, convs: HeadConvs<Self>) -> FloatTensor<Self> {
        let (inputs, masks) = head_inputs(skips, convs);
        let masks: Vec<tch::Tensor> = masks
            .into_iter()
            .map(|m| m.into_primitive().tensor)
            .collect();
        record::<C, 5>(inputs, move |t| head(t, &masks))
    }

    fn logistic_nll(
        params: FloatTensor<Self>,
        targets: IntTensor<Self>,
        components: usize,
        min_log_scale: f64,
    ) -> FloatTensor<Self> {
        let targets = targets.tensor;
        record::<C, 1>([params], move |t| {
            logistic_nll(t[0], &targets, components, min_log_scale)
        })
    }

    fn dropout_masks(
        images: IntTensor<Self>,
        keys: FloatTensor<Self>,
        elements: usize,
        bits: u32,
        threshold: i64,
    ) -> BoolTensor<Self> {
        TchTensor::new(dropout_masks(
            &images.tensor,
            &keys.into_primitive().tensor,
            elements,
            bits,
            threshold,
        ))
    }

    fn gated_resnet(
        x: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
        aux: Maybe<Self>,
        shift: Maybe<Self>,
        kept: MaybeBool<Self>,
        shape: ResnetShape,
    ) -> FloatTensor<Self> {
        let has_aux = matches!(aux, Maybe::Aux { .. });
        let has_shift = matches!(shift, Maybe::Some(_));
        let kept = match kept {
            MaybeBool::Some(d) => Some(d.tensor),
            MaybeBool::None => None,
        };
        let forward = move |t: &[&tch::Tensor]| resnet(t, has_aux, has_shift, kept.as_ref(), shape);
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

/// Whether `parts` are, in order, contiguous f32 views of `whole` (itself contiguous f32) that
/// cover it end to end, each counted among the holders of `whole`'s buffer.
pub(super) fn views_of(whole: &TchTensor, parts: &[&TchTensor]) -> bool {
    let float = |t: &tch::Tensor| t.kind() == tch::Kind::Float && t.is_contiguous();
    if !float(&whole.tensor) {
        return false;
    }
    let start = whole.tensor.data_ptr() as usize;
    let mut at = start;
    for part in parts {
        let shared = std::sync::Arc::ptr_eq(part.storage.buffer_ref(), whole.storage.buffer_ref());
        if !shared || !float(&part.tensor) || part.tensor.data_ptr() as usize != at {
            return false;
        }
        at += part.tensor.numel() * std::mem::size_of::<f32>();
    }
    at == start + whole.tensor.numel() * std::mem::size_of::<f32>()
}

/// How many Burn tensors hold `t`'s whole buffer besides `t`: Burn's own count, by which it
/// writes in place only into a buffer that one tensor holds.
pub(super) fn other_holders(t: &TchTensor) -> usize {
    std::sync::Arc::strong_count(t.storage.buffer_ref()) - 1
}
