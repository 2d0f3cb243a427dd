//! The libtorch side: each operation recorded in libtorch's autograd graph, its gradients asked
//! of libtorch in Burn's backward pass.

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

    fn categorical_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
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
