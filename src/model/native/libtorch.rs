//! The libtorch side: each operation recorded in libtorch's autograd graph, its gradients asked
//! of libtorch in Burn's backward pass.

use super::{Autodiff, Backward, CheckpointStrategy, Checkpointer, Gradients, Ops, OpsKind};
use super::{
    HeadConvs, LayerConvs, LayerShape, Link, Maybe, MaybeBool, NativeBackward, ResnetShape,
};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, LibTorch};

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

/// Which optional inputs of a gated layer are there (the others hold a placeholder).
#[derive(Clone, Copy, Debug)]
struct Present {
    link: bool,
    v_pre: bool,
    v_post: bool,
    h_terms: bool,
}

impl Present {
    /// Whether each of the `LAYER_INPUTS` is a real input, not a placeholder.
    fn used(self, shape: LayerShape) -> [bool; LAYER_INPUTS] {
        let mut used = [true; LAYER_INPUTS];
        // The last layer has no horizontal output; without the link, no vertical stack.
        used[5] = !shape.last;
        used[6] = !shape.last;
        used[1] = self.link;
        used[2] = self.link;
        used[9] = self.link;
        used[10] = self.link;
        used[11] = self.v_pre;
        used[12] = self.v_post;
        used[13] = self.h_terms;
        used
    }
}

/// The state; weight and bias of the vertical stack, the horizontal, out, skip and link;
/// v_pre, v_post and h_terms.
const LAYER_INPUTS: usize = 14;

/// A gated layer's inputs in `layer`'s order (the state stands in for any that is absent), its
/// masks (vertical, horizontal, out, skip, link) and which inputs are there.
fn layer_inputs<B: Backend>(
    state: FloatTensor<B>,
    convs: LayerConvs<B>,
    link: Link<B>,
    v_pre: Maybe<B>,
    v_post: Maybe<B>,
    h_terms: Maybe<B>,
) -> ([FloatTensor<B>; LAYER_INPUTS], Vec<FloatTensor<B>>, Present) {
    let c = convs;
    let some = |m: Maybe<B>| match m {
        Maybe::Some(t) => Some(t),
        Maybe::None => None,
        Maybe::Aux { .. } => unreachable!("a gated layer's terms are Some or None"),
    };
    let (v_pre, v_post, h_terms) = (some(v_pre), some(v_post), some(h_terms));
    let present = Present {
        link: matches!(link, Link::Some { .. }),
        v_pre: v_pre.is_some(),
        v_post: v_post.is_some(),
        h_terms: h_terms.is_some(),
    };
    let mut masks = vec![c.vertical_mask, c.horizontal_mask, c.out_mask, c.skip_mask];
    let (lw, lb) = match link {
        Link::Some { weight, bias, mask } => {
            masks.push(mask);
            (weight, bias)
        }
        Link::None => (state.clone(), state.clone()),
    };
    let or_state = |t: Option<FloatTensor<B>>| t.unwrap_or_else(|| state.clone());
    let inputs = [
        state.clone(),
        c.vertical,
        c.vertical_bias,
        c.horizontal,
        c.horizontal_bias,
        c.out,
        c.out_bias,
        c.skip,
        c.skip_bias,
        lw,
        lb,
        or_state(v_pre),
        or_state(v_post),
        or_state(h_terms),
    ];
    (inputs, masks, present)
}

/// The gated head's inputs (skips, then weight and bias of hidden and out) and its two masks.
fn head_inputs<B: Backend>(
    skips: FloatTensor<B>,
    c: HeadConvs<B>,
) -> ([FloatTensor<B>; 5], Vec<FloatTensor<B>>) {
    let inputs = [skips, c.hidden, c.hidden_bias, c.out, c.out_bias];
    (inputs, vec![c.hidden_mask, c.out_mask])
}

/// The gated head on libtorch tensors `t` (in `head_inputs`' order) with its `masks`.
fn head(t: &[&tch::Tensor], masks: &[tch::Tensor]) -> tch::Tensor {
    let kind = t[0].kind();
    let hidden = masked_conv(&t[0].relu(), t[1], t[2], &masks[0], kind);
    masked_conv(&hidden.relu(), t[3], t[4], &masks[1], kind)
}

/// A convolution without padding by `weight * mask` plus `bias`, both cast to `kind` (weights are
/// f32; the model computes in its input's float type).
fn masked_conv(
    x: &tch::Tensor,
    weight: &tch::Tensor,
    bias: &tch::Tensor,
    mask: &tch::Tensor,
    kind: tch::Kind,
) -> tch::Tensor {
    let weight = (weight * mask).to_kind(kind);
    let bias = bias.to_kind(kind);
    tch::Tensor::conv2d(x, &weight, Some(&bias), [1, 1], [0, 0], [1, 1], 1)
}

/// The gated layer on libtorch tensors `t` (in `layer_inputs`' order) with its `masks`.
fn layer(
    t: &[&tch::Tensor],
    masks: &[tch::Tensor],
    present: Present,
    shape: LayerShape,
) -> tch::Tensor {
    let state = t[0];
    let kind = state.kind();
    let masked = |at: usize, mask: usize, x: &tch::Tensor| {
        masked_conv(x, t[at], t[at + 1], &masks[mask], kind)
    };
    // Without the link the vertical stack reaches nothing, and the state does not carry it.
    let stacks = if present.link { 3 } else { 2 };
    let (v, h, skips) = if shape.first {
        let v = present.link.then(|| state.shallow_clone());
        (v, state.shallow_clone(), None)
    } else {
        let mut parts = state.chunk(stacks, 1);
        let skips = parts.pop();
        let h = parts.pop().expect("a gated layer's state holds its stacks");
        (parts.pop(), h, skips)
    };
    let mut hc = masked(3, 1, &pad(&h, shape.horizontal_padding));
    let vc = v.map(|v| {
        let mut vc = masked(1, 0, &pad(&v, shape.vertical_padding));
        if present.v_pre {
            vc += t[11];
        }
        // The vertical stack shifted down one row (zeros on top): row i sees only rows above i.
        let rows = vc.size()[2];
        let shifted = vc.constant_pad_nd([0, 0, 1, 0]).narrow(2, 0, rows);
        hc = &hc + masked(9, 4, &shifted);
        if present.v_post {
            vc += t[12];
        }
        vc
    });
    if present.h_terms {
        hc += t[13];
    }
    let activate = |x: tch::Tensor| if shape.gates { gate(&x) } else { x.relu() };
    let gated = activate(hc);
    let skip = masked(7, 3, &gated);
    let skips = match skips {
        Some(s) => s + skip,
        None => skip,
    };
    if shape.last {
        return skips;
    }
    let mut h_out = masked(5, 2, &gated);
    if shape.residual {
        h_out += h;
    }
    let mut next: Vec<tch::Tensor> = vc.map(activate).into_iter().collect();
    next.extend([h_out, skips]);
    tch::Tensor::cat(&next, 1)
}

/// `loss::logistic::log_prob` (which defines it), summed and negated, `[1]`, on libtorch tensors.
fn logistic_nll(
    params: &tch::Tensor,
    targets: &tch::Tensor,
    components: usize,
    min_log_scale: f64,
) -> tch::Tensor {
    let k = components as i64;
    let colours = targets.size()[1];
    let kind = params.kind();
    let x = (targets.to_kind(kind) - 127.5) / 127.5; // [b, colours, h, w]
    let per_colour = if colours == 1 { 2 * k } else { 3 * k };
    let block = |c: i64, j: i64| params.narrow(1, k + c * per_colour + j * k, k);
    let colour = |c: i64| x.narrow(1, c, 1);
    let mut total = params.narrow(1, 0, k).log_softmax(1, kind);
    for c in 0..colours {
        let mut mean = block(c, 0);
        let log_s = block(c, 1).clamp_min(min_log_scale);
        if colours == 3 && c > 0 {
            let coef = |i: i64| block(i, 2).tanh();
            mean = match c {
                1 => mean + coef(0) * colour(0),
                _ => mean + coef(1) * colour(0) + coef(2) * colour(1),
            };
        }
        // Not in place: log_softmax's backward reads its output.
        total = &total + logistic_colour(&colour(c), &mean, &log_s);
    }
    total.logsumexp([1], false).sum(kind).neg().reshape([1])
}

/// `loss::logistic::log_prob_colour` on libtorch tensors: log P(value | component), `[b, k, h, w]`.
fn logistic_colour(x: &tch::Tensor, mean: &tch::Tensor, log_s: &tch::Tensor) -> tch::Tensor {
    let d = x - mean;
    let inv_s = log_s.neg().exp();
    let plus = &inv_s * (&d + 1.0 / 255.0);
    let minus = &inv_s * (&d - 1.0 / 255.0);
    let log_cdf_plus = &plus - plus.softplus();
    let log_one_minus_cdf_minus = minus.softplus().neg();
    let mid = &inv_s * &d;
    let left = plus.sigmoid() - minus.sigmoid();
    let right = minus.neg().sigmoid() - plus.neg().sigmoid();
    let cdf_delta = right.where_self(&mid.gt(0.0), &left);
    let log_pdf_mid = &mid - log_s - mid.softplus() * 2.0;
    let interior = (log_pdf_mid - 127.5f64.ln())
        .where_self(&cdf_delta.lt(1e-5), &cdf_delta.clamp_min(1e-12).log());
    let x = x.expand_as(&interior);
    let interior = log_one_minus_cdf_minus.where_self(&x.gt(0.999), &interior);
    log_cdf_plus.where_self(&x.lt(-0.999), &interior)
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
    let mut i = 0;
    let tracked = inputs.each_ref().map(|t| {
        i += 1;
        used[i - 1]
            && matches!(
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
