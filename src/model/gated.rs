//! The gated PixelCNN without blind spot (van den Oord et al. 2016, "Conditional Image Generation
//! with PixelCNN Decoders", figure 2), optionally conditioned on a class label or on feature maps.
//!
//! The vertical stack sees the current row and the k/2 rows above it, k columns wide; its features
//! reach the horizontal stack only after a shift down by one row, so the horizontal stack gets the
//! full rows above (no triangular blind spot, unlike a vertical stack that drops the centre row and
//! is never shifted). The horizontal stack sees the current row to the left, with the R -> G -> B
//! masks at the current pixel; every 1x1 on it keeps the colour groups.

use super::cache::{self, RowInputs, RowsAbove};
use super::masked_conv::{Frozen, MaskKind, MaskedConv2d, Shape, gate_groups, groups, uniform};
use super::native;
use burn::module::{Module, Param};
use burn::tensor::activation::{relu, sigmoid, tanh};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GatedConfig {
    pub colours: usize,
    pub layers: usize,
    pub kernel: usize,
    pub channels: usize,
    /// Number of classes for class conditioning (a learned per-layer bias inside the gates).
    pub classes: Option<usize>,
    /// Channels of feature maps that condition every gate through 1x1 convolutions (0 = none).
    pub spatial_channels: usize,
    /// The maps enter the first layer's kernels instead, as if concatenated with the image.
    pub concat: bool,
    /// Ablations (the seed README's): the residual connection on the horizontal stack, the
    /// tanh * sigmoid gates (else a ReLU), and the link from the vertical to the horizontal stack.
    pub residual: bool,
    pub gates: bool,
    pub link: bool,
    /// The head's outputs: 256 logits per colour, or (grey) a logistic mixture's parameters.
    pub likelihood: super::Likelihood,
}

/// What a gated model is conditioned on, per batch.
pub struct Conditioning<'a> {
    /// `[batch]`
    pub labels: &'a Tensor<1, Int>,
    /// `[batch, spatial_channels, h, w]`
    pub maps: Option<&'a Tensor<4>>,
}

#[derive(Module, Debug)]
pub struct GatedLayer {
    /// (k/2 + 1) x k, unmasked: the vertical stack.
    vertical: MaskedConv2d,
    /// 1 x (k/2 + 1), type A in the first layer and type B after: the horizontal stack.
    horizontal: MaskedConv2d,
    /// 1x1 from the shifted vertical features into the horizontal gate (absent in the ablation).
    link: Option<MaskedConv2d>,
    /// 1x1, type B: the horizontal stack's output (added to its input after the first layer).
    out: MaskedConv2d,
    /// 1x1, type B: this layer's contribution to the output head.
    skip: MaskedConv2d,
    /// `[classes, 2 * channels]`: class biases of the vertical and horizontal gates.
    class_v: Option<Param<Tensor<2>>>,
    class_h: Option<Param<Tensor<2>>>,
    /// 1x1 from the conditioning maps into the vertical and horizontal gates.
    spatial_v: Option<MaskedConv2d>,
    spatial_h: Option<MaskedConv2d>,
    /// First layer in concat mode: the stacks' kernels over the maps (unmasked: the maps are
    /// given, not generated).
    concat_v: Option<MaskedConv2d>,
    concat_h: Option<MaskedConv2d>,
    residual: bool,
    gates: bool,
}

fn class_bias(classes: usize, n: usize, rng: &mut StdRng, device: &Device) -> Param<Tensor<2>> {
    let values = uniform(rng, classes * n, 1.0 / (n as f32).sqrt());
    Param::from_tensor(Tensor::from_data(
        TensorData::new(values, [classes, n]),
        device,
    ))
}

impl GatedLayer {
    fn new(cfg: &GatedConfig, first: bool, rng: &mut StdRng, device: &Device) -> Self {
        let (c, ch, k) = (cfg.colours, cfg.channels, cfg.kernel);
        let in_groups = groups(if first { c } else { ch }, c);
        let hidden = groups(ch, c);
        // Gates split 2 * channels into two halves; without gates the stacks have `channels`.
        let gates = if cfg.gates {
            gate_groups(ch, c)
        } else {
            groups(ch, c)
        };
        let kind = if first { MaskKind::A } else { MaskKind::B };
        let maps = groups(cfg.spatial_channels, 1);
        let spatial = |rng: &mut StdRng| {
            (cfg.spatial_channels > 0 && !cfg.concat).then(|| {
                MaskedConv2d::new(MaskKind::Full, Shape::Point, &maps, &gates, rng, device)
            })
        };
        let concat = |shape, rng: &mut StdRng| {
            (cfg.spatial_channels > 0 && cfg.concat && first)
                .then(|| MaskedConv2d::new(MaskKind::Full, shape, &maps, &gates, rng, device))
        };
        GatedLayer {
            vertical: MaskedConv2d::new(
                MaskKind::Full,
                Shape::RowsAbove(k),
                &in_groups,
                &gates,
                rng,
                device,
            ),
            horizontal: MaskedConv2d::new(kind, Shape::RowLeft(k), &in_groups, &gates, rng, device),
            link: cfg.link.then(|| {
                MaskedConv2d::new(MaskKind::Full, Shape::Point, &gates, &gates, rng, device)
            }),
            out: MaskedConv2d::new(MaskKind::B, Shape::Point, &hidden, &hidden, rng, device),
            skip: MaskedConv2d::new(MaskKind::B, Shape::Point, &hidden, &hidden, rng, device),
            class_v: cfg.classes.map(|n| class_bias(n, gates.len(), rng, device)),
            class_h: cfg.classes.map(|n| class_bias(n, gates.len(), rng, device)),
            spatial_v: spatial(rng),
            spatial_h: spatial(rng),
            concat_v: concat(Shape::RowsAbove(k), rng),
            concat_h: concat(Shape::RowLeft(k), rng),
            // No residual in the first layer: its input is the image itself, current pixel included.
            residual: cfg.residual && !first,
            gates: cfg.gates,
        }
    }

    /// # Shapes
    /// - v, h: `[batch, in, height, width]` (the image for the first layer, else `channels`)
    /// - returns (v, h, skip), each `[batch, channels, height, width]`
    fn forward(
        &self,
        v: Tensor<4>,
        h: Tensor<4>,
        cond: &Conditioning,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let mut vc = self.vertical.forward(v); // [b, 2ch, hgt, w], rows <= i
        let mut hc = self.horizontal.forward(h.clone()); // [b, 2ch, hgt, w]
        if let (Some(cv), Some(ch), Some(maps)) = (&self.concat_v, &self.concat_h, cond.maps) {
            let maps = maps.clone().cast(vc.dtype());
            vc = vc + cv.forward(maps.clone());
            hc = hc + ch.forward(maps);
        }
        if let Some(link) = &self.link {
            hc = hc + link.forward(shift_down(vc.clone()));
        }
        if let (Some(cv), Some(chh)) = (&self.class_v, &self.class_h) {
            vc = vc.clone() + per_class(cv, cond.labels).cast(vc.dtype());
            hc = hc.clone() + per_class(chh, cond.labels).cast(hc.dtype());
        }
        if let (Some(sv), Some(sh), Some(maps)) = (&self.spatial_v, &self.spatial_h, cond.maps) {
            let maps = maps.clone().cast(vc.dtype());
            vc = vc + sv.forward(maps.clone());
            hc = hc + sh.forward(maps);
        }
        // On libtorch the training gate's backward pass is libtorch's own (see `native`).
        let activate = |x| if self.gates { native::gate(x) } else { relu(x) };
        let v_out = activate(vc); // [b, ch, hgt, w]
        let gated = activate(hc); // [b, ch, hgt, w]
        let skip = self.skip.forward(gated.clone());
        let mut h_out = self.out.forward(gated);
        if self.residual {
            h_out = h_out + h;
        }
        (v_out, h_out, skip)
    }
}

impl GatedLayer {
    /// `forward` as one operation where the backend has it (libtorch: one node of its autograd
    /// graph, see `native::gated_layer`). The stacks travel as one state: the image for the
    /// first layer, else `[v, h, skips so far]` on the channels (`[h, skips]` without the
    /// link); returns the next state, or for the last layer the summed skips.
    fn forward_fused(
        &self,
        state: Tensor<4>,
        [first, last]: [bool; 2],
        cond: &Conditioning,
    ) -> Tensor<4> {
        let dtype = state.dtype();
        let maps = cond.maps.map(|m| m.clone().cast(dtype));
        let conv = |c: &Option<MaskedConv2d>| Some(c.as_ref()?.forward(maps.clone()?));
        let class = |b: &Option<Param<Tensor<2>>>| {
            b.as_ref().map(|b| per_class(b, cond.labels).cast(dtype))
        };
        let sum = |terms: Vec<Option<Tensor<4>>>| terms.into_iter().flatten().reduce(|a, b| a + b);
        // Without the link the vertical stack reaches nothing: no terms for it.
        let vertical = self.link.is_some();
        let inputs = native::GatedLayerInputs {
            vertical: self.vertical.masked(),
            horizontal: self.horizontal.masked(),
            out: self.out.masked(),
            skip: self.skip.masked(),
            link: self.link.as_ref().map(MaskedConv2d::masked),
            v_pre: vertical.then(|| conv(&self.concat_v)).flatten(),
            // After the link, the vertical gate feeds only the next layer.
            v_post: (vertical && !last)
                .then(|| sum(vec![class(&self.class_v), conv(&self.spatial_v)]))
                .flatten(),
            h_terms: sum(vec![
                conv(&self.concat_h),
                class(&self.class_h),
                conv(&self.spatial_h),
            ]),
            shape: native::LayerShape {
                vertical_padding: self.vertical.padding(),
                horizontal_padding: self.horizontal.padding(),
                first,
                last,
                residual: self.residual,
                gates: self.gates,
            },
        };
        native::gated_layer(state, inputs)
    }
}

/// `[classes, n]` biases picked by label, as `[batch, n, 1, 1]` to broadcast over the image.
fn per_class(bias: &Param<Tensor<2>>, labels: &Tensor<1, Int>) -> Tensor<4> {
    let [batch] = labels.dims();
    let n = bias.dims()[1];
    bias.val()
        .select(0, labels.clone())
        .reshape([batch, n, 1, 1])
}

/// tanh(a) * sigmoid(b) for the two halves of the channels (dimension 1).
fn gate<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let half = x.dims()[1] / 2;
    tanh(x.clone().narrow(1, 0, half)) * sigmoid(x.narrow(1, half, half))
}

/// Moves every row down by one, filling the top row with zeros: row i then holds what the vertical
/// stack computed for row i - 1, which saw only rows above i.
fn shift_down(x: Tensor<4>) -> Tensor<4> {
    let h = x.dims()[2];
    native::pad_zeros(x, [1, 0, 0, 0]).narrow(2, 0, h)
}

#[derive(Module, Debug)]
pub struct GatedPixelCnn {
    layers: Vec<GatedLayer>,
    /// ReLU, 1x1, ReLU, 1x1 over the summed skips: 256 logits per colour, grouped by colour.
    head_hidden: MaskedConv2d,
    head_out: MaskedConv2d,
}

impl GatedConfig {
    /// Trained parameters, counted from the layout (in u128; a test compares the count with the
    /// built model's).
    pub fn parameters(&self) -> u128 {
        use super::estimate::conv;
        let (col, ch, k) = (
            self.colours as u128,
            self.channels as u128,
            self.kernel as u128,
        );
        let g = if self.gates { 2 * ch } else { ch };
        let half = k / 2 + 1;
        let s = self.spatial_channels as u128;
        let layer = |input: u128, first: bool| {
            let mut n = conv(input, g, half, k) + conv(input, g, 1, half);
            n += 2 * conv(ch, ch, 1, 1); // out, skip
            if self.link {
                n += conv(g, g, 1, 1);
            }
            if let Some(classes) = self.classes {
                n += 2 * classes as u128 * g;
            }
            if s > 0 && !self.concat {
                n += 2 * conv(s, g, 1, 1);
            }
            if s > 0 && self.concat && first {
                n += conv(s, g, half, k) + conv(s, g, 1, half);
            }
            n
        };
        let rest = (self.layers as u128).saturating_sub(1) * layer(ch, false);
        let head =
            conv(ch, ch, 1, 1) + conv(ch, self.likelihood.outputs(self.colours) as u128, 1, 1);
        layer(col, true) + rest + head
    }

    /// f32 values a training step keeps per image pixel for the backward pass, the likelihood's
    /// aside: about 14 per channel of each layer (two stacks, gates and skips).
    pub fn activations_per_pixel(&self) -> u128 {
        self.layers as u128 * 14 * self.channels as u128
    }

    /// The gated model as the paper draws it: unconditioned, every ablation off (residual, gates
    /// and link on), 256 logits per sub-pixel. Tests and tools start here and change what they
    /// need with `..GatedConfig::plain(...)`.
    pub fn plain(colours: usize, layers: usize, kernel: usize, channels: usize) -> GatedConfig {
        GatedConfig {
            colours,
            layers,
            kernel,
            channels,
            classes: None,
            spatial_channels: 0,
            concat: false,
            residual: true,
            gates: true,
            link: true,
            likelihood: super::Likelihood::Categorical,
        }
    }

    pub fn init(&self, rng: &mut StdRng, device: &Device) -> GatedPixelCnn {
        let layers = (0..self.layers)
            .map(|l| GatedLayer::new(self, l == 0, rng, device))
            .collect();
        let (c, ch) = (self.colours, self.channels);
        GatedPixelCnn {
            layers,
            head_hidden: MaskedConv2d::square(MaskKind::B, ch, ch, c, 1, rng, device),
            head_out: MaskedConv2d::square(
                MaskKind::B,
                ch,
                self.likelihood.outputs(c),
                c,
                1,
                rng,
                device,
            ),
        }
    }
}

impl GatedPixelCnn {
    /// # Shapes
    /// - x: `[batch, colours, h, w]`, scaled inputs
    /// - returns: `[batch, outputs, h, w]`, logits grouped by colour or a mixture's parameters
    pub fn forward(&self, x: Tensor<4>, cond: &Conditioning) -> Tensor<4> {
        if native::runs_fused(&x.device()) {
            let skips = self.skips_fused(x, cond);
            let (hidden, out) = (self.head_hidden.masked(), self.head_out.masked());
            return native::gated_head(skips, hidden, out);
        }
        self.head(self.skips(x, cond))
    }

    /// ReLU, 1x1, ReLU, 1x1 over the summed skips (`[batch, channels, h, w]`).
    pub(crate) fn head(&self, skips: Tensor<4>) -> Tensor<4> {
        self.head_out
            .forward(relu(self.head_hidden.forward(relu(skips))))
    }

    /// The layers' summed skips, `[batch, channels, h, w]`, layer by layer with Burn's
    /// operations: what defines the model.
    pub(crate) fn skips(&self, x: Tensor<4>, cond: &Conditioning) -> Tensor<4> {
        let (mut v, mut h) = (x.clone(), x);
        let mut skips: Option<Tensor<4>> = None;
        for layer in &self.layers {
            let (v2, h2, s) = layer.forward(v, h, cond);
            (v, h) = (v2, h2);
            skips = Some(match skips {
                None => s,
                Some(acc) => acc + s,
            });
        }
        skips.expect("at least one layer")
    }

    /// `skips` with each layer one operation (`GatedLayer::forward_fused`), where
    /// `native::runs_fused`.
    pub(crate) fn skips_fused(&self, x: Tensor<4>, cond: &Conditioning) -> Tensor<4> {
        let mut state = x;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            state = layer.forward_fused(state, [i == 0, i == last], cond);
        }
        state
    }
}

/// One layer's state for cached sampling (Ramachandran et al. 2017): its weights frozen, the rows
/// its vertical stack still needs, what the horizontal gate gets from outside its own row (the
/// link from the vertical stack above, class bias, maps), and its horizontal input so far along
/// the current row. Per-pixel values are `[batch, channels]` matrices and the per-pixel
/// convolutions matrix products: a step is many tiny operations, and these are the cheapest.
struct LayerCache {
    vertical: Frozen,
    horizontal: Frozen,
    link: Option<Frozen>,
    out: Frozen,
    skip: Frozen,
    /// What the maps add to the vertical and horizontal gates (concat: before the link),
    /// `[batch, 2ch, h, w]`, computed once: the maps are given.
    maps_v: Option<Tensor<4>>,
    maps_h: Option<Tensor<4>>,
    concat: bool,
    /// `[batch, 2ch, 1, 1]` class biases picked once.
    class_v: Option<Tensor<4>>,
    class_h: Option<Tensor<4>>,
    residual: bool,
    gates: bool,
    /// The last `k/2 + 1` rows of the vertical input.
    v_rows: RowsAbove,
    /// The horizontal gate's terms from outside the current row for every pixel of it:
    /// link(vertical stack of the row above) + class bias + maps, `[batch, 2ch, 1, width]`.
    row_terms: Tensor<4>,
    /// Horizontal inputs along the current row.
    h_row: RowInputs,
}

/// Cached sampling state of a gated PixelCNN: per sub-pixel it computes every layer at one
/// position (the horizontal stack), and per finished row the vertical stack once.
pub struct GatedCache {
    layers: Vec<LayerCache>,
    head_hidden: Frozen,
    head_out: Frozen,
    half: usize,
    height: usize,
    width: usize,
}

impl GatedPixelCnn {
    /// A cache for sampling `batch` images of `height` x `width`, computing in `dtype`.
    pub fn cache(
        &self,
        cond: &Conditioning,
        height: usize,
        width: usize,
        dtype: DType,
    ) -> GatedCache {
        let [batch] = cond.labels.dims();
        let device = cond.labels.device();
        let zeros = |c: usize, h: usize, w: usize| {
            Tensor::<4>::zeros([batch, c, h, w], &device).cast(dtype)
        };
        let half = self.layers[0].horizontal_half();
        let maps = cond.maps.map(|m| m.clone().cast(dtype));
        let maps_term = |spatial: &Option<MaskedConv2d>, concat: &Option<MaskedConv2d>| {
            let maps = maps.clone()?;
            let conv = spatial.as_ref().or(concat.as_ref())?;
            Some(conv.forward(maps))
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let vertical = l.vertical.frozen(dtype);
                let inputs = vertical.inputs();
                let gate_channels = vertical.outputs();
                let mut layer = LayerCache {
                    class_v: l
                        .class_v
                        .as_ref()
                        .map(|b| per_class(b, cond.labels).cast(dtype)),
                    class_h: l
                        .class_h
                        .as_ref()
                        .map(|b| per_class(b, cond.labels).cast(dtype)),
                    horizontal: l.horizontal.frozen(dtype),
                    link: l.link.as_ref().map(|c| c.frozen(dtype)),
                    out: l.out.frozen(dtype),
                    skip: l.skip.frozen(dtype),
                    maps_v: maps_term(&l.spatial_v, &l.concat_v),
                    maps_h: maps_term(&l.spatial_h, &l.concat_h),
                    concat: l.concat_v.is_some(),
                    residual: l.residual,
                    gates: l.gates,
                    v_rows: RowsAbove::new(batch, inputs, width, (half + 1, half), dtype, &device),
                    row_terms: zeros(gate_channels, 1, width),
                    h_row: RowInputs::new(batch, inputs, width, dtype, &device),
                    vertical,
                };
                // Above row 0 the shifted vertical stack holds zeros.
                layer.set_row_terms(0, zeros(gate_channels, 1, width));
                layer
            })
            .collect();
        GatedCache {
            layers,
            head_hidden: self.head_hidden.frozen(dtype),
            head_out: self.head_out.frozen(dtype),
            half,
            height,
            width,
        }
    }
}

impl GatedLayer {
    /// k/2: how far the horizontal stack looks to the left.
    fn horizontal_half(&self) -> usize {
        self.horizontal.kernel_width() - 1
    }
}

impl LayerCache {
    fn activate<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.gates { gate(x) } else { relu(x) }
    }

    /// The horizontal gate's terms for row `y`, given the vertical convolution of the row above
    /// (`[batch, 2ch, 1, width]`, with the maps already in for concat).
    fn set_row_terms(&mut self, y: usize, v_above: Tensor<4>) {
        let mut terms = match &self.link {
            Some(link) => link.valid(v_above),
            None => v_above.zeros_like(),
        };
        if let Some(bias) = &self.class_h {
            terms = terms + bias.clone();
        }
        if let Some(m) = &self.maps_h {
            terms = terms + m.clone().narrow(2, y, 1);
        }
        self.row_terms = terms;
    }
}

impl GatedCache {
    pub fn height(&self) -> usize {
        self.height
    }

    /// Logits of pixel (`y`, `x`) given every earlier pixel (committed) and the sub-pixels of
    /// this one so far (later ones are masked, whatever they hold).
    ///
    /// # Shapes
    /// - pixel: `[batch, colours]`, scaled inputs in the compute type
    /// - returns: `[batch, colours * 256]`
    pub fn step(&mut self, x: usize, pixel: Tensor<2>) -> Tensor<2> {
        let half = self.half;
        let [batch, _] = pixel.dims();
        let mut h = pixel;
        let mut skips: Option<Tensor<2>> = None;
        for layer in &mut self.layers {
            let mut window = layer.h_row.left_of(x, half);
            window.push(h.clone());
            let window = Tensor::stack::<3>(window, 2); // [b, in, k/2 + 1]
            let n = window.dims()[1] * (half + 1);
            let terms = layer.row_terms.clone().narrow(3, x, 1);
            let gate_channels = terms.dims()[1];
            let hc = layer.horizontal.dense(window.reshape([batch, n]))
                + terms.reshape([batch, gate_channels]); // [b, 2ch]
            let gated = layer.activate(hc);
            let s = layer.skip.dense(gated.clone());
            skips = Some(match skips {
                None => s,
                Some(acc) => acc + s,
            });
            let mut out = layer.out.dense(gated);
            if layer.residual {
                out = out + h.clone();
            }
            layer.h_row.hold(h);
            h = out;
        }
        let skips = skips.expect("at least one layer");
        self.head_out
            .dense(relu(self.head_hidden.dense(relu(skips))))
    }

    /// The pixel last passed to `step` is final, with these values (`[batch, colours]`, scaled).
    pub fn commit(&mut self, pixel: Tensor<2>) {
        cache::commit(self.layers.iter_mut().map(|l| &mut l.h_row), pixel);
    }

    /// Row `y` is final: run the vertical stack over it (what the row below sees).
    ///
    /// # Shapes
    /// - row: `[batch, colours, 1, width]`, scaled inputs in the compute type
    pub fn end_row(&mut self, y: usize, row: Tensor<4>) {
        let at = |m: &Tensor<4>| m.clone().narrow(2, y, 1);
        let mut v = row;
        for layer in &mut self.layers {
            layer.v_rows.push(v);
            let mut vraw = layer.vertical.valid(layer.v_rows.stacked().clone()); // [b, 2ch, 1, width]
            if let (true, Some(m)) = (layer.concat, &layer.maps_v) {
                vraw = vraw + at(m);
            }
            let mut vc = vraw.clone();
            if y + 1 < self.height {
                layer.set_row_terms(y + 1, vraw);
            }
            if let Some(bias) = &layer.class_v {
                vc = vc + bias.clone();
            }
            if let (false, Some(m)) = (layer.concat, &layer.maps_v) {
                vc = vc + at(m);
            }
            v = layer.activate(vc);
            layer.h_row.take_row();
        }
        debug_assert_eq!(v.dims()[3], self.width);
    }
}
