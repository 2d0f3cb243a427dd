//! The operations that exist on libtorch only ([`runs_fused`]), each one node of libtorch's
//! autograd graph: a layer of the gated model, its head, the logistic mixture's likelihood; and
//! PixelCNN++'s dropout masks in 32-bit integers. Their arguments, and their `Tensor` entry points
//! (see `NativeBackward` for what each computes).

use super::{Maybe, MaybeBool, NativeBackward};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, ExtensionType};
use burn::tensor::{Bool, DType, Device, Int, Tensor};

/// The four masked convolutions that every gated layer has: weight, bias and mask of each.
#[derive(ExtensionType, Debug)]
pub struct LayerConvs<B: Backend> {
    pub vertical: FloatTensor<B>,
    pub vertical_bias: FloatTensor<B>,
    pub vertical_mask: FloatTensor<B>,
    pub horizontal: FloatTensor<B>,
    pub horizontal_bias: FloatTensor<B>,
    pub horizontal_mask: FloatTensor<B>,
    pub out: FloatTensor<B>,
    pub out_bias: FloatTensor<B>,
    pub out_mask: FloatTensor<B>,
    pub skip: FloatTensor<B>,
    pub skip_bias: FloatTensor<B>,
    pub skip_mask: FloatTensor<B>,
}

/// The gated PixelCNN head's two 1x1 convolutions: weight, bias and mask of each.
#[derive(ExtensionType, Debug)]
pub struct HeadConvs<B: Backend> {
    pub hidden: FloatTensor<B>,
    pub hidden_bias: FloatTensor<B>,
    pub hidden_mask: FloatTensor<B>,
    pub out: FloatTensor<B>,
    pub out_bias: FloatTensor<B>,
    pub out_mask: FloatTensor<B>,
}

/// A gated layer's 1x1 convolution from the vertical into the horizontal stack, when it has one.
#[derive(ExtensionType, Debug)]
pub enum Link<B: Backend> {
    None,
    Some {
        weight: FloatTensor<B>,
        bias: FloatTensor<B>,
        mask: FloatTensor<B>,
    },
}

/// The layout of a gated layer that is not a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// Zero padding of the vertical and horizontal stacks' inputs, `[top, bottom, left, right]`.
    pub vertical_padding: [usize; 4],
    pub horizontal_padding: [usize; 4],
    /// The first layer: the state is the image.
    pub first: bool,
    /// The last layer: it returns only the summed skips (what the stacks would carry on, nothing
    /// reads; `out` gets no gradient, as in Burn's layer).
    pub last: bool,
    /// The horizontal stack's input added to its output.
    pub residual: bool,
    /// tanh * sigmoid gates, else a ReLU.
    pub gates: bool,
}

/// A masked convolution's weight, bias and mask.
pub type Masked = (Tensor<4>, Tensor<1>, Tensor<4>);

/// What a gated layer computes with, besides its state (see [`NativeBackward::gated_layer`]).
pub struct GatedLayerInputs {
    pub vertical: Masked,
    pub horizontal: Masked,
    pub out: Masked,
    pub skip: Masked,
    pub link: Option<Masked>,
    pub v_pre: Option<Tensor<4>>,
    pub v_post: Option<Tensor<4>>,
    pub h_terms: Option<Tensor<4>>,
    pub shape: LayerShape,
}

/// Whether `device` has the operations that exist on libtorch only, each one node of libtorch's
/// autograd graph ([`gated_layer`], [`gated_head`], [`logistic_nll`]): whether it is libtorch.
pub fn runs_fused(device: &Device) -> bool {
    #[cfg(feature = "tch")]
    {
        let device = device.clone().without_autodiff();
        matches!(
            device.as_dispatch(),
            burn::backend::DispatchDevice::LibTorch(_)
        )
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = device;
        false
    }
}

/// The index of `device` where it is libtorch's CUDA device; None elsewhere.
pub fn cuda_index(device: &Device) -> Option<usize> {
    #[cfg(feature = "tch")]
    {
        let device = device.clone().without_autodiff();
        match device.as_dispatch() {
            burn::backend::DispatchDevice::LibTorch(
                burn::backend::libtorch::LibTorchDevice::Cuda(i),
            ) => Some(*i),
            _ => None,
        }
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = device;
        None
    }
}

/// A gated layer as one operation, where [`runs_fused`] (see
/// [`NativeBackward::gated_layer`]).
pub fn gated_layer(state: Tensor<4>, inputs: GatedLayerInputs) -> Tensor<4> {
    let GatedLayerInputs {
        vertical,
        horizontal,
        out,
        skip,
        link,
        v_pre,
        v_post,
        h_terms,
        shape,
    } = inputs;
    let convs = LayerConvs {
        vertical: vertical.0.into_dispatch(),
        vertical_bias: vertical.1.into_dispatch(),
        vertical_mask: vertical.2.into_dispatch(),
        horizontal: horizontal.0.into_dispatch(),
        horizontal_bias: horizontal.1.into_dispatch(),
        horizontal_mask: horizontal.2.into_dispatch(),
        out: out.0.into_dispatch(),
        out_bias: out.1.into_dispatch(),
        out_mask: out.2.into_dispatch(),
        skip: skip.0.into_dispatch(),
        skip_bias: skip.1.into_dispatch(),
        skip_mask: skip.2.into_dispatch(),
    };
    let link = link.map_or(Link::None, |(weight, bias, mask)| Link::Some {
        weight: weight.into_dispatch(),
        bias: bias.into_dispatch(),
        mask: mask.into_dispatch(),
    });
    let maybe = |t: Option<Tensor<4>>| t.map_or(Maybe::None, |t| Maybe::Some(t.into_dispatch()));
    Tensor::from_dispatch(<Dispatch as NativeBackward>::gated_layer(
        state.into_dispatch(),
        convs,
        link,
        maybe(v_pre),
        maybe(v_post),
        maybe(h_terms),
        shape,
    ))
}

/// The gated PixelCNN's head as one operation, where [`runs_fused`] (see
/// [`NativeBackward::gated_head`]).
pub fn gated_head(skips: Tensor<4>, hidden: Masked, out: Masked) -> Tensor<4> {
    let convs = HeadConvs {
        hidden: hidden.0.into_dispatch(),
        hidden_bias: hidden.1.into_dispatch(),
        hidden_mask: hidden.2.into_dispatch(),
        out: out.0.into_dispatch(),
        out_bias: out.1.into_dispatch(),
        out_mask: out.2.into_dispatch(),
    };
    Tensor::from_dispatch(<Dispatch as NativeBackward>::gated_head(
        skips.into_dispatch(),
        convs,
    ))
}

/// The logistic mixture's summed negative log-likelihood in nats as one operation, where
/// [`runs_fused`] (see [`NativeBackward::logistic_nll`]).
pub fn logistic_nll(
    params: Tensor<4>,
    targets: Tensor<4, Int>,
    components: usize,
    min_log_scale: f64,
) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::logistic_nll(
        params.into_dispatch(),
        targets.into_dispatch(),
        components,
        min_log_scale,
    ))
}

/// PixelCNN++'s dropout masks of `images` (their places in the global batch), one per key, where
/// [`runs_fused`] (see [`NativeBackward::dropout_masks`]).
pub fn dropout_masks(
    images: Tensor<1, Int>,
    keys: Tensor<1>,
    elements: usize,
    bits: u32,
    threshold: i64,
) -> Tensor<3, Bool> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::dropout_masks(
        images.into_dispatch(),
        keys.into_dispatch(),
        elements,
        bits,
        threshold,
    ))
}

/// A step of Adam in place, where [`runs_fused`] (see [`NativeBackward::adam_in_place`]).
pub fn adam_in_place(
    weights: Tensor<1>,
    grads: Tensor<1>,
    first: Tensor<1>,
    second: Tensor<1>,
    scalars: Tensor<1>,
    keep: Option<Tensor<1, Bool>>,
    overwrite: bool,
) -> (Tensor<1>, Tensor<1>, Tensor<1>, Tensor<1>) {
    let (w, m, v, g) = <Dispatch as NativeBackward>::adam_in_place(
        weights.into_dispatch(),
        grads.into_dispatch(),
        first.into_dispatch(),
        second.into_dispatch(),
        scalars.into_dispatch(),
        keep.map_or(MaybeBool::None, |k| MaybeBool::Some(k.into_dispatch())),
        overwrite,
    );
    (
        Tensor::from_dispatch(w),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
        Tensor::from_dispatch(g),
    )
}

/// The weights' average brought forward in place, where [`runs_fused`] (see
/// [`NativeBackward::ema_in_place`]).
pub fn ema_in_place(
    average: Tensor<1>,
    current: Tensor<1>,
    scalars: Tensor<1>,
    keep: Option<Tensor<1, Bool>>,
) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::ema_in_place(
        average.into_dispatch(),
        current.into_dispatch(),
        scalars.into_dispatch(),
        keep.map_or(MaybeBool::None, |k| MaybeBool::Some(k.into_dispatch())),
    ))
}

/// Values from the host on the device, where [`runs_fused`]: one buffer, written in place each
/// step ([`NativeBackward::write_scalars`]), whose address does not change while its device does
/// not and no more values come than it holds (fewer, as a last partial batch, are written at its
/// start): a step's scalars (learning rate, Adam's corrections, the average's decay), its batch.
/// Clones share the buffer.
#[derive(Clone, Debug, Default)]
pub struct DeviceBuffer(Option<(Tensor<1>, Vec<f32>)>);

impl DeviceBuffer {
    /// The buffer on `device` (made the first time, and again where it is too short) holding
    /// `values` at its start, written now: its first `values.len()` values.
    pub fn write(&mut self, values: &[f32], device: &Device) -> Tensor<1> {
        let n = values.len();
        let whole = match self.0.take() {
            Some((b, _)) if b.dims()[0] >= n && b.device() == *device => b,
            _ => Tensor::zeros([n], (device, DType::F32)),
        };
        let part = Tensor::from_dispatch(<Dispatch as NativeBackward>::write_scalars(
            start(&whole, n).into_dispatch(),
            values.to_vec(),
        ));
        self.0 = Some((whole, values.to_vec()));
        part
    }

    /// [`DeviceBuffer::write`] on `device`'s backend without autodiff, the tensor returned on
    /// `device` (untracked where it has autodiff).
    pub fn write_on(&mut self, values: &[f32], device: &Device) -> Tensor<1> {
        let buffer = self.write(values, &device.clone().without_autodiff());
        // (Devices compare equal with and without autodiff.)
        if device.is_autodiff() {
            Tensor::from_inner(buffer)
        } else {
            buffer
        }
    }

    /// The buffer holding `values`: as it is where the last write (one staged before the step's
    /// work on the device) wrote these very values, else written now. Only for buffers that
    /// nothing writes but [`DeviceBuffer::write`].
    pub fn holding(&mut self, values: &[f32], device: &Device) -> Tensor<1> {
        match &self.0 {
            Some((b, held)) if held == values && b.device() == *device => start(b, values.len()),
            _ => self.write(values, device),
        }
    }

    /// The buffer's address (None before the first write, and off libtorch).
    pub fn address(&self) -> Option<usize> {
        self.0.as_ref().and_then(|(b, _)| address(b))
    }
}

/// The first `n` values of `t` (`t` itself where it has `n`).
fn start(t: &Tensor<1>, n: usize) -> Tensor<1> {
    if t.dims()[0] == n {
        t.clone()
    } else {
        t.clone().narrow(0, 0, n)
    }
}

/// `parts` (f32, `[n_i]`) end to end, written into `buffer` (f32, `[sum n_i]`) where it lies
/// (libtorch's `cat` with `out`) where [`runs_fused`]: a buffer that lives across steps instead
/// of a fresh one each time. Elsewhere a new tensor.
pub fn cat_into(buffer: Tensor<1>, parts: Vec<Tensor<1>>) -> Tensor<1> {
    #[cfg(feature = "tch")]
    if let (Some(out), Some(inputs)) = (
        torch(&buffer),
        parts.iter().map(torch).collect::<Option<Vec<_>>>(),
    ) {
        let inputs: Vec<&tch::Tensor> = inputs.iter().map(|t| &t.tensor).collect();
        let _ = tch::Tensor::cat_out(&out.tensor, &inputs, 0);
        return buffer;
    }
    let _ = buffer;
    Tensor::cat(parts, 0)
}

/// The sum of the squares of `x` in f64, where [`runs_fused`] (see
/// [`NativeBackward::square_sum_f64`]).
pub fn square_sum_f64(x: Tensor<1>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as NativeBackward>::square_sum_f64(
        x.into_dispatch(),
    ))
}

/// Where [`runs_fused`]: whether `parts` are, in order, views of `whole` that cover it end to end
/// (contiguous, f32, each counted among the holders of `whole`'s buffer). False elsewhere.
pub fn views_of(whole: &Tensor<1>, parts: &[Tensor<1>]) -> bool {
    #[cfg(feature = "tch")]
    {
        let Some(whole) = torch(whole) else {
            return false;
        };
        let parts: Option<Vec<_>> = parts.iter().map(torch).collect();
        parts.is_some_and(|parts| {
            super::libtorch::views_of(&whole, &parts.iter().collect::<Vec<_>>())
        })
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = (whole, parts);
        false
    }
}

/// Where [`runs_fused`]: how many Burn tensors hold `t`'s buffer besides `t` (a view of it is
/// one). None elsewhere.
pub fn other_holders(t: &Tensor<1>) -> Option<usize> {
    #[cfg(feature = "tch")]
    {
        // Less the clone that `torch` looks through.
        torch(t).map(|t| super::libtorch::other_holders(&t) - 1)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = t;
        None
    }
}

/// Where [`runs_fused`]: the address of `t`'s first value (how a CUDA graph's step and tests
/// tell buffers apart). None elsewhere.
pub fn address(t: &Tensor<1>) -> Option<usize> {
    #[cfg(feature = "tch")]
    {
        torch(t).map(|t| t.tensor.data_ptr() as usize)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = t;
        None
    }
}

/// The libtorch tensor of a float tensor without autodiff, a clone (one more holder of its
/// buffer while it lives).
#[cfg(feature = "tch")]
fn torch(t: &Tensor<1>) -> Option<burn::backend::libtorch::TchTensor> {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    match t.clone().into_dispatch().kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(t)) => Some(t),
        _ => None,
    }
}
