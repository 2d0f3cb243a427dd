//! The libtorch-only and libtorch-side operations' bodies on libtorch tensors (what
//! `libtorch.rs` records in libtorch's autograd graph or runs without it), and the order in which
//! the fused operations take their inputs.

use super::{CPU_PIECE, HeadConvs, LayerConvs, LayerShape, Link, Maybe, ResnetShape};
use burn::backend::Backend;
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::FloatTensor;

/// The gated resnet on libtorch tensors: `t` holds x, conv1's weight and bias, conv2's, then
/// (`aux`) the auxiliary input and its 1x1 convolution's weight and bias, then (`shift`)
/// the shift of conv2's output.
pub(super) fn resnet(
    t: &[&tch::Tensor],
    aux: bool,
    shift: bool,
    kept: Option<&tch::Tensor>,
    shape: ResnetShape,
) -> tch::Tensor {
    let (x, w1, b1, w2, b2) = (t[0], t[1], t[2], t[3], t[4]);
    // concat_elu after the padding (it keeps zeros zero), as Burn's definition: one saved tensor.
    let mut c1 = conv(&[&concat_elu(&pad(x, shape.padding)), w1, b1]);
    let mut rest = &t[5..];
    if aux {
        let (a, w, b) = (rest[0], rest[1], rest[2]);
        let [n_out, n_in] = [0, 1].map(|d| w.size()[d]);
        c1 += conv(&[&concat_elu(a), &w.reshape([n_out, n_in, 1, 1]), b]);
        rest = &rest[3..];
    }
    let mut c1 = concat_elu(&c1);
    if let Some(kept) = kept {
        // A product with the kept elements' mask and 1 / (1 - p) (the graph saves that mask
        // alone, in bytes), which libtorch's CPU kernels run 3x faster than masked_fill: ATen's
        // dropout backward, `(x * kept) * scale` (one rounding, as two products), one kernel on
        // CUDA where the products and the mask's conversion were three.
        c1 = tch::Tensor::native_dropout_backward(&c1, kept, shape.keep);
    }
    let mut c2 = conv(&[&pad(&c1, shape.padding), w2, b2]);
    if shift {
        c2 += rest[0];
    }
    x + c2.glu(1)
}

/// Which optional inputs of a gated layer are there (the others hold a placeholder).
#[derive(Clone, Copy, Debug)]
pub(super) struct Present {
    pub(super) link: bool,
    pub(super) v_pre: bool,
    pub(super) v_post: bool,
    pub(super) h_terms: bool,
}

impl Present {
    /// Whether each of the `LAYER_INPUTS` is a real input, not a placeholder.
    pub(super) fn used(self, shape: LayerShape) -> [bool; LAYER_INPUTS] {
        let mut used = [true; LAYER_INPUTS];
        // The last layer has no horizontal output; without the link, no vertical stack.
        used[OUT] = !shape.last;
        used[OUT + 1] = !shape.last;
        for at in [VERTICAL, VERTICAL + 1, LINK, LINK + 1] {
            used[at] = self.link;
        }
        used[V_PRE] = self.v_pre;
        used[V_POST] = self.v_post;
        used[H_TERMS] = self.h_terms;
        used
    }
}

/// Where a gated layer's inputs sit in `layer_inputs`' order: the state; the weight of each
/// masked convolution, its bias right after it (the masks in the same order, one each); the
/// optional terms.
const VERTICAL: usize = 1;
const HORIZONTAL: usize = 3;
const OUT: usize = 5;
const SKIP: usize = 7;
const LINK: usize = 9;
const V_PRE: usize = 11;
const V_POST: usize = 12;
const H_TERMS: usize = 13;
pub(super) const LAYER_INPUTS: usize = 14;

/// A gated layer's inputs in `layer`'s order (the state stands in for any that is absent), its
/// masks (vertical, horizontal, out, skip, link) and which inputs are there.
pub(super) fn layer_inputs<B: Backend>(
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
pub(super) fn head_inputs<B: Backend>(
    skips: FloatTensor<B>,
    c: HeadConvs<B>,
) -> ([FloatTensor<B>; 5], Vec<FloatTensor<B>>) {
    let inputs = [skips, c.hidden, c.hidden_bias, c.out, c.out_bias];
    (inputs, vec![c.hidden_mask, c.out_mask])
}

/// The gated head on libtorch tensors `t` (in `head_inputs`' order) with its `masks`.
pub(super) fn head(t: &[&tch::Tensor], masks: &[tch::Tensor]) -> tch::Tensor {
    let kind = t[0].kind();
    let hidden = masked_conv(&t[0].relu(), t[1], t[2], &masks[0], kind);
    masked_conv(&hidden.relu(), t[3], t[4], &masks[1], kind)
}

/// A convolution without padding by `weight * mask` plus `bias`, both cast to `kind` (weights are
/// f32; the model computes in its input's float type).
pub(super) fn masked_conv(
    x: &tch::Tensor,
    weight: &tch::Tensor,
    bias: &tch::Tensor,
    mask: &tch::Tensor,
    kind: tch::Kind,
) -> tch::Tensor {
    let weight = as_kind(weight * mask, kind);
    let bias = as_kind(bias.shallow_clone(), kind);
    tch::Tensor::conv2d(x, &weight, Some(&bias), [1, 1], [0, 0], [1, 1], 1)
}

/// `t` as `kind`: itself where it has that type (tch's `to_kind` would dispatch a `to` that
/// returns it, which is also how a read by the host looks in an operator trace: see
/// `replay::host_reads`), else a copy.
fn as_kind(t: tch::Tensor, kind: tch::Kind) -> tch::Tensor {
    if t.kind() == kind { t } else { t.to_kind(kind) }
}

/// The gated layer on libtorch tensors `t` (in `layer_inputs`' order) with its `masks`.
pub(super) fn layer(
    t: &[&tch::Tensor],
    masks: &[tch::Tensor],
    present: Present,
    shape: LayerShape,
) -> tch::Tensor {
    let state = t[0];
    let kind = state.kind();
    let masked = |at: usize, x: &tch::Tensor| {
        masked_conv(x, t[at], t[at + 1], &masks[(at - VERTICAL) / 2], kind)
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
    let mut hc = masked(HORIZONTAL, &pad(&h, shape.horizontal_padding));
    let vc = v.map(|v| {
        let mut vc = masked(VERTICAL, &pad(&v, shape.vertical_padding));
        if present.v_pre {
            vc += t[V_PRE];
        }
        // The vertical stack shifted down one row (zeros on top): row i sees only rows above i.
        let rows = vc.size()[2];
        let shifted = vc.constant_pad_nd([0, 0, 1, 0]).narrow(2, 0, rows);
        hc = &hc + masked(LINK, &shifted);
        if present.v_post {
            vc += t[V_POST];
        }
        vc
    });
    if present.h_terms {
        hc += t[H_TERMS];
    }
    let activate = |x: tch::Tensor| if shape.gates { gate(&x) } else { x.relu() };
    let gated = activate(hc);
    let skip = masked(SKIP, &gated);
    let skips = match skips {
        Some(s) => s + skip,
        None => skip,
    };
    if shape.last {
        return skips;
    }
    let mut h_out = masked(OUT, &gated);
    if shape.residual {
        h_out += h;
    }
    let mut next: Vec<tch::Tensor> = vc.map(activate).into_iter().collect();
    next.extend([h_out, skips]);
    tch::Tensor::cat(&next, 1)
}

/// `loss::logistic::log_prob` (which defines it), summed and negated, `[1]`, on libtorch tensors.
pub(super) fn logistic_nll(
    params: &tch::Tensor,
    targets: &tch::Tensor,
    components: usize,
    min_log_scale: f64,
) -> tch::Tensor {
    let k = components as i64;
    let colours = targets.size()[1];
    let kind = params.kind();
    let x = (targets.to_kind(kind) - 127.5) / 127.5; // [b, colours, h, w]
    let per_colour = if colours == 1 { 2 } else { 3 };
    // One split, whose backward pass is one concatenation (a narrow per block would each fill a
    // tensor of the parameters' size with zeros in the backward pass, and add them up).
    let blocks = params.split(k, 1);
    let block = |c: i64, j: i64| &blocks[(1 + c * per_colour + j) as usize];
    let colour = |c: i64| x.narrow(1, c, 1);
    let mut total = blocks[0].log_softmax(1, kind);
    for c in 0..colours {
        let mut mean = block(c, 0).shallow_clone();
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
pub(super) fn logistic_colour(
    x: &tch::Tensor,
    mean: &tch::Tensor,
    log_s: &tch::Tensor,
) -> tch::Tensor {
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

pub(super) fn concat_elu(x: &tch::Tensor) -> tch::Tensor {
    tch::Tensor::cat(&[x, &x.neg()], 1).elu()
}

pub(super) fn pad(x: &tch::Tensor, padding: [usize; 4]) -> tch::Tensor {
    let [top, bottom, left, right] = padding.map(|p| p as i64);
    x.constant_pad_nd([left, right, top, bottom])
}

pub(super) fn gate(x: &tch::Tensor) -> tch::Tensor {
    let halves = x.chunk(2, 1);
    halves[0].tanh() * halves[1].sigmoid()
}

pub(super) fn nll(logits: &tch::Tensor, targets: &tch::Tensor) -> tch::Tensor {
    // [b, c, 256, h, w] -> [b, 256, c, h, w]: the classes in dimension 1. Per sub-pixel, then
    // summed: libtorch's CUDA kernel for the summed loss adds with atomics, which
    // `runtime.deterministic` refuses (`nll_loss2d_forward_out_cuda_template`), where `sum` is a
    // reduction in a fixed order.
    let each = logits.transpose(1, 2).cross_entropy_loss::<tch::Tensor>(
        targets,
        None,
        tch::Reduction::None,
        -100,
        0.0,
    );
    each.sum(each.kind()).reshape([1])
}

pub(super) fn conv(t: &[&tch::Tensor]) -> tch::Tensor {
    tch::Tensor::conv2d(t[0], t[1], Some(t[2]), [1, 1], [0, 0], [1, 1], 1)
}

pub(super) fn strided(t: &[&tch::Tensor], stride: usize) -> tch::Tensor {
    let s = stride as i64;
    tch::Tensor::conv2d(t[0], t[1], Some(t[2]), [s, s], [0, 0], [1, 1], 1)
}

pub(super) fn transposed(t: &[&tch::Tensor]) -> tch::Tensor {
    t[0].conv_transpose2d(t[1], Some(t[2]), [2, 2], [0, 0], [0, 0], 1, [1, 1])
}

/// [`NativeBackward::dropout_masks`](super::NativeBackward::dropout_masks) in 32-bit integers:
/// products and sums wrap modulo 2^32 (what the 64-bit definition masks them to), right shifts
/// are masked to be logical, and an unsigned comparison of 16 or 32 bits is a signed one with the
/// sign bit flipped on both sides. In place where it can, and the hashes' bytes (8 bits per
/// element) or halves (16) are compared where they lie, viewed as `uint8` or `int16`: bits
/// `8s..8s + 8` of an i32 are its byte `s` on a little-endian machine (every GPU, and the CPUs
/// this builds for: big-endian builds are refused). The keys are f32 on the device whose bits
/// are read as i32 where they lie.
pub(super) fn dropout_masks(
    images: &tch::Tensor,
    keys: &tch::Tensor,
    elements: usize,
    bits: u32,
    threshold: i64,
) -> tch::Tensor {
    use tch::Kind;
    assert!(
        elements < 1 << 31,
        "{elements} elements per image: at most 2^31 - 1"
    );
    let (batch, masks) = (images.size()[0], keys.size()[0]);
    let per_hash = i64::from(32 / bits);
    let hashes = elements.div_ceil(per_hash as usize) as i64;
    // The keys' bits as i32, read in place.
    let keys = keys.contiguous().view_dtype(Kind::Int).reshape([masks, 1]);
    let images = as_kind(images.shallow_clone(), Kind::Int).reshape([1, batch]);
    let keys = hash32(images.bitwise_xor_tensor(&keys)).reshape([masks, batch, 1]);
    let counters = tch::Tensor::arange(hashes, (Kind::Int, keys.device()))
        .g_mul_scalar_(0x61C8_8647)
        .reshape([1, 1, hashes]);
    let mut hashed = hash32(counters + keys);
    match bits {
        8 => hashed
            .view_dtype(Kind::Uint8)
            .narrow(2, 0, elements as i64)
            .ge(threshold),
        16 => {
            let mut halves = hashed.view_dtype(Kind::Int16);
            let _ = halves.bitwise_xor_(i64::from(i16::MIN));
            halves
                .narrow(2, 0, elements as i64)
                .ge(threshold + i64::from(i16::MIN))
        }
        _ => {
            let _ = hashed.bitwise_xor_(i64::from(i32::MIN));
            hashed.ge(threshold + i64::from(i32::MIN))
        }
    }
}

#[cfg(target_endian = "big")]
compile_error!("libtorch's dropout masks read bytes of i32 hashes as little-endian");

/// `hash32` of `model::pixelcnnpp` on i32 bit patterns, in place (with one buffer for the
/// shifted values).
fn hash32(mut x: tch::Tensor) -> tch::Tensor {
    let high = x.empty_like();
    for (shift, multiplier) in [(16, Some(0x7FEB_352D)), (15, Some(0x5BD1_E995)), (16, None)] {
        let mut high = x.bitwise_right_shift_tensor_scalar_out(&high, shift);
        let _ = high.bitwise_and_((1i64 << (32 - shift)) - 1);
        let _ = x.bitwise_xor_tensor_(&high);
        if let Some(m) = multiplier {
            let _ = x.g_mul_scalar_(m);
        }
    }
    x
}

/// The `(start, length)` pieces of a pass over `t`'s `[n]` values (see [`CPU_PIECE`]).
fn pieces(t: &tch::Tensor) -> Vec<(i64, i64)> {
    let n = t.numel() as i64;
    let piece = if t.device() == tch::Device::Cpu {
        CPU_PIECE as i64
    } else {
        n.max(1)
    };
    (0..n)
        .step_by(piece as usize)
        .map(|start| (start, piece.min(n - start)))
        .collect()
}

/// `t` where nothing else holds its buffer, else a copy.
fn own(t: TchTensor) -> TchTensor {
    if t.can_mut() {
        t
    } else {
        TchTensor::new(t.tensor.copy())
    }
}

/// `NativeBackward::adam_in_place`: the optimiser's Adam (`optim/`) after its first step, each
/// operation the libtorch kernel Burn's would run (Burn's square is a product with itself), piece
/// by piece (each value's arithmetic is the same), written into buffers nothing else holds: the
/// weights (with `overwrite`, their own buffer, which the model's parameters view), the moments
/// (copied first where shared), a scratch buffer of a piece's size, and the gradients' own once
/// they are spent (a second scratch where they are shared).
pub(super) fn adam_in_place(
    weights: TchTensor,
    grads: TchTensor,
    first: TchTensor,
    second: TchTensor,
    scalars: &tch::Tensor,
    keep: Option<&tch::Tensor>,
    overwrite: bool,
) -> (TchTensor, TchTensor, TchTensor, TchTensor) {
    let w = if overwrite { weights } else { own(weights) };
    let (m, v) = (own(first), own(second));
    let spent = grads.can_mut();
    let scalars = kept_scalars(scalars, keep, 7);
    let scalars: [tch::Tensor; 7] = std::array::from_fn(|i| scalars.get(i as i64));
    for (start, len) in pieces(&w.tensor) {
        let [mut w, mut m, mut v, mut g] =
            [&w, &m, &v, &grads].map(|t| t.tensor.narrow(0, start, len));
        if keep.is_some() {
            // A skipped step's gradients may be infinite: times 0 they would be NaN.
            let _ = g.f_nan_to_num_(0.0, 0.0, 0.0).unwrap();
        }
        adam_piece([&mut w, &mut m, &mut v, &mut g], spent, &scalars);
    }
    (w, m, v, grads)
}

/// The first `n` of `scalars`, or where `keep` is given (`[1]`, bool), those or the next `n` as
/// it says: chosen on the device.
fn kept_scalars(scalars: &tch::Tensor, keep: Option<&tch::Tensor>, n: i64) -> tch::Tensor {
    match keep {
        None => scalars.narrow(0, 0, n),
        Some(keep) => scalars
            .narrow(0, 0, n)
            .f_where_self(keep, &scalars.narrow(0, n, n))
            .unwrap(),
    }
}

/// One piece of [`adam_in_place`]; `spent`: the gradients' buffer may take the second moment's
/// root. The scalars are 0-dim f32 tensors on the device.
fn adam_piece(
    [w, m, v, g]: [&mut tch::Tensor; 4],
    spent: bool,
    [b1, c1, b2, c2, factor, epsilon, lr]: &[tch::Tensor; 7],
) {
    // first * beta_1 + g * (1 - beta_1)
    let mut scratch = g.f_mul(c1).unwrap();
    let _ = m.f_mul_(b1).unwrap();
    let _ = m.f_add_(&scratch).unwrap();
    // second * beta_2 + (g g) (1 - beta_2)
    let _ = g.f_mul_out(&scratch, g).unwrap();
    let _ = scratch.f_mul_(c2).unwrap();
    let _ = v.f_mul_(b2).unwrap();
    let _ = v.f_add_(&scratch).unwrap();
    // (first * factor) / (sqrt(second) + epsilon') * lr, taken from the weights
    scratch.copy_(m);
    let _ = scratch.f_mul_(factor).unwrap();
    let mut root = if spent {
        let _ = v.f_sqrt_out(g).unwrap();
        g.shallow_clone()
    } else {
        v.sqrt()
    };
    let _ = root.f_add_(epsilon).unwrap();
    let _ = scratch.f_div_(&root).unwrap();
    let _ = scratch.f_mul_(lr).unwrap();
    let _ = w.f_sub_(&scratch).unwrap();
}

/// `NativeBackward::ema_in_place`: `average * decay + current * (1 - decay)` as Burn's operations
/// compute it (a product each, then their sum), piece by piece into the average's buffer (a copy
/// where it is shared), with a temporary of a piece's size.
pub(super) fn ema_in_place(
    average: TchTensor,
    current: &TchTensor,
    scalars: &tch::Tensor,
    keep: Option<&tch::Tensor>,
) -> TchTensor {
    let average = own(average);
    let scalars = kept_scalars(scalars, keep, 2);
    let [decay, rest] = [0, 1].map(|i| scalars.get(i));
    for (start, len) in pieces(&average.tensor) {
        let mut a = average.tensor.narrow(0, start, len);
        let term = current.tensor.narrow(0, start, len).f_mul(&rest).unwrap();
        let _ = a.f_mul_(&decay).unwrap();
        let _ = a.f_add_(&term).unwrap();
    }
    average
}

/// `NativeBackward::write_scalars`: staged on the device without waiting for it (a copy from
/// pageable memory that CUDA buffers as it returns), then copied into `buffer` in stream order.
pub(super) fn write_scalars(buffer: &tch::Tensor, values: &[f32]) {
    let staged =
        tch::Tensor::from_slice(values).to_device_(buffer.device(), tch::Kind::Float, true, false);
    let mut buffer = buffer.shallow_clone();
    buffer.copy_(&staged);
}

/// `NativeBackward::square_sum_f64`: Burn's cast (`to_kind`), product with itself and sum
/// (`sum(kind)` viewed as `[1]`), the product written over the f64 copy; on the CPU piece by
/// piece (see [`CPU_PIECE`]), the pieces' sums then summed in f64.
pub(super) fn square_sum_f64(x: &tch::Tensor) -> tch::Tensor {
    let sums: Vec<tch::Tensor> = pieces(x)
        .into_iter()
        .map(|(start, len)| {
            let piece = x.narrow(0, start, len);
            let mut wide = if x.kind() == tch::Kind::Double {
                piece.copy()
            } else {
                piece.to_kind(tch::Kind::Double)
            };
            let same = wide.shallow_clone();
            let _ = wide.f_mul_(&same).unwrap();
            wide.sum(tch::Kind::Double).view(1)
        })
        .collect();
    match sums.len() {
        0 => tch::Tensor::zeros([1], (tch::Kind::Double, x.device())),
        1 => sums.into_iter().next().expect("one"),
        _ => tch::Tensor::cat(&sums, 0).sum(tch::Kind::Double).view(1),
    }
}
