//! The optimiser: Adam as PyTorch configures it (the seed's code uses `torch.optim.Adam`), or
//! plain SGD, over every parameter at once. Gradients arrive in one flat buffer, the moments are
//! kept flat, and a step is about fifteen tensor operations whatever the number of parameter
//! tensors, where Burn's `ModuleOptimizer` takes about thirteen per tensor (thousands for
//! PixelCNN++, each a kernel launch on a GPU). The arithmetic is `burn::optim::Adam`'s, operation
//! for operation, so the weights are bit for bit those Burn's optimizer gives on the same backend
//! (a test holds it to that), and the state is saved in Burn's optimizer file format: checkpoints
//! written by either load in the other. On libtorch, the model's parameters are views of one
//! flat buffer of weights that the optimizer keeps, and a step after the first writes the
//! moments and that buffer in place (`native::adam_in_place`, the same operations; on the CPU in
//! pieces), where Burn's operations would allocate about eight buffers the size of all weights.

use crate::model::Model;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use std::collections::HashMap;
use std::path::Path;

/// Which float parameters of a model a flat buffer holds, and how many values each: a subset of
/// the model's parameters in their visiting order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layout {
    pub ids: Vec<ParamId>,
    pub sizes: Vec<usize>,
}

impl Layout {
    /// Every float parameter of `model`.
    pub fn of(model: &Model) -> Layout {
        struct Visit(Layout);
        impl ModuleVisitor for Visit {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.ids.push(param.id);
                self.0.sizes.push(param.val().shape().num_elements());
            }
        }
        let mut visit = Visit(Layout::default());
        model.visit(&mut visit);
        visit.0
    }

    pub fn values(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// The parameters of `a` and of `b` (both layouts of `model`), in `model`'s visiting order.
    pub fn union(model: &Model, a: &Layout, b: &Layout) -> Layout {
        let all = Layout::of(model);
        let mut union = Layout::default();
        for (&id, &n) in all.ids.iter().zip(&all.sizes) {
            if a.ids.contains(&id) || b.ids.contains(&id) {
                union.ids.push(id);
                union.sizes.push(n);
            }
        }
        union
    }
}

/// Values of the parameters in `layout`, end to end in one f32 tensor without autodiff.
#[derive(Clone)]
pub struct Flat {
    pub values: Tensor<1>,
    pub layout: Layout,
}

impl Flat {
    /// The gradients of `model`'s parameters that have one, flat in visiting order.
    pub fn gradients(model: &Model, grads: GradientsParams) -> Flat {
        Flat::gradients_into(model, grads, None)
    }

    /// [`Flat::gradients`], written into `buffer` where [`runs_fused`](crate::model::native::runs_fused)
    /// and it has their size and nothing else holds it (the same values; else a new buffer).
    fn gradients_into(
        model: &Model,
        mut grads: GradientsParams,
        buffer: Option<Tensor<1>>,
    ) -> Flat {
        struct Visit<'a> {
            grads: &'a mut GradientsParams,
            parts: Vec<Tensor<1>>,
            layout: Layout,
        }
        impl ModuleVisitor for Visit<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.grads.remove::<D>(param.id) {
                    let n = g.shape().num_elements();
                    self.parts.push(f32_flat(g.reshape([n])));
                    self.layout.ids.push(param.id);
                    self.layout.sizes.push(n);
                }
            }
        }
        let mut visit = Visit {
            grads: &mut grads,
            parts: Vec::new(),
            layout: Layout::default(),
        };
        model.visit(&mut visit);
        let n = visit.layout.values();
        let values = match buffer {
            Some(b)
                if b.dims()[0] == n
                    && crate::model::native::other_holders(&b) == Some(0)
                    && visit
                        .parts
                        .first()
                        .is_some_and(|p| p.device() == b.device()) =>
            {
                crate::model::native::cat_into(b, visit.parts)
            }
            _ => Tensor::cat(visit.parts, 0),
        };
        Flat {
            values,
            layout: visit.layout,
        }
    }
}

/// The weights of the parameters of `layout` (which must follow `model`'s visiting order), flat.
pub fn flatten(model: &Model, layout: &Layout) -> Tensor<1> {
    concat(parameter_values(model, layout))
}

/// `parts` end to end in f32.
fn concat(parts: Vec<Tensor<1>>) -> Tensor<1> {
    Tensor::cat(parts.into_iter().map(f32_flat).collect(), 0)
}

/// The values of the parameters of `layout` (which must follow `model`'s visiting order), each
/// viewed as `[n]` in its own dtype, without autodiff.
fn parameter_values(model: &Model, layout: &Layout) -> Vec<Tensor<1>> {
    struct Visit<'a> {
        ids: std::iter::Peekable<std::slice::Iter<'a, ParamId>>,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Visit<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.ids.peek() == Some(&&param.id) {
                self.ids.next();
                let value = param.val().inner();
                let n = value.shape().num_elements();
                self.parts.push(value.reshape([n]));
            }
        }
    }
    let mut visit = Visit {
        ids: layout.ids.iter().peekable(),
        parts: Vec::with_capacity(layout.ids.len()),
    };
    model.visit(&mut visit);
    assert!(
        visit.ids.next().is_none(),
        "a layout follows its model's visiting order"
    );
    visit.parts
}

/// The sum of the squares of `values` in f64, `[1]`: Burn's `cast(F64).square().sum()`, on
/// libtorch squared in place in the f64 copy (`native::square_sum_f64`, the same bits).
pub fn square_sum(values: Tensor<1>) -> Tensor<1> {
    if crate::model::native::runs_fused(&values.device()) {
        crate::model::native::square_sum_f64(values)
    } else {
        values.cast(FloatDType::F64).square().sum()
    }
}

/// `t` in f32 (a no-op when it is).
pub fn f32_flat(t: Tensor<1>) -> Tensor<1> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

/// `model` with the parameters of `flat.layout` replaced by their values in `flat`: views of it,
/// shaped as the parameters, in their dtype, and with autodiff and `require_grad` as they had.
pub fn unflatten(model: Model, flat: &Flat) -> Model {
    struct Map<'a> {
        values: &'a Tensor<1>,
        ids: std::iter::Peekable<std::slice::Iter<'a, ParamId>>,
        offset: usize,
    }
    impl ModuleMapper for Map<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if self.ids.peek() != Some(&&param.id) {
                return param;
            }
            self.ids.next();
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let n = shape.num_elements();
            let mut value: Tensor<D> = self.values.clone().narrow(0, self.offset, n).reshape(shape);
            self.offset += n;
            if value.dtype() != tensor.dtype() {
                value = value.cast(tensor.dtype());
            }
            if tensor.is_autodiff() {
                value = Tensor::from_inner(value);
                if let Some(strategy) = tensor.gradient_checkpointing_strategy() {
                    value = value.with_gradient_checkpointing_strategy(strategy);
                }
                if tensor.is_require_grad() {
                    value = value.require_grad();
                }
            }
            Param::from_mapped_value(id, value, mapper)
        }
    }
    let mut map = Map {
        values: &flat.values,
        ids: flat.layout.ids.iter().peekable(),
        offset: 0,
    };
    let model = model.map(&mut map);
    assert!(
        map.ids.next().is_none(),
        "a layout follows its model's visiting order"
    );
    model
}

/// How a step turns gradients into a change of the weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// Kingma & Ba's Adam, without weight decay.
    Adam {
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
    },
    /// `w - lr g`.
    Sgd,
}

/// Adam's moments of some parameters that have taken the same number of steps.
#[derive(Clone)]
struct Moments {
    layout: Layout,
    time: usize,
    first: Tensor<1>,
    second: Tensor<1>,
}

/// An optimizer and its state.
#[derive(Clone)]
pub struct Optimizer {
    rule: Rule,
    /// Adam's moments. One group in practice: every parameter has a gradient at every step. A
    /// parameter that misses one falls behind the others' step count (as in Burn, which counts
    /// per parameter) and gets a group of its own.
    groups: Vec<Moments>,
    /// On libtorch, the last step's flat weights, whose views the model's parameters are: the
    /// next step reads them there instead of copying the parameters together, and writes them
    /// in place where nothing but the model's parameters holds them (step after step at the same
    /// address, as a CUDA graph needs). Not part of the saved state: the model's weights are.
    weights: Option<Tensor<1>>,
    /// On libtorch, the in-place step's scalars on the device (written each step).
    scalars: crate::model::native::DeviceBuffer,
    /// On libtorch, the flat gradients that the last step spent (where nothing else held them):
    /// [`Optimizer::flat_gradients`] writes the next step's there.
    gradients: Option<Tensor<1>>,
    /// The last step was Adam's in place with the decision to take it left to the device
    /// ([`Optimizer::step_unless`]): it counted itself taken, which [`Optimizer::settle`]
    /// undoes where it was not.
    unsettled: bool,
}

/// Adam with beta = (0.9, 0.999) and PyTorch's epsilon of 1e-8 (Burn's default is 1e-5).
pub fn adam() -> Optimizer {
    adam_with_betas(0.9, 0.999)
}

/// Adam with these betas and PyTorch's epsilon of 1e-8.
pub fn adam_with_betas(beta_1: f64, beta_2: f64) -> Optimizer {
    Optimizer::new(Rule::Adam {
        beta_1: beta_1 as f32,
        beta_2: beta_2 as f32,
        epsilon: 1e-8,
    })
}

impl Optimizer {
    pub fn new(rule: Rule) -> Optimizer {
        Optimizer {
            rule,
            groups: Vec::new(),
            weights: None,
            scalars: Default::default(),
            gradients: None,
            unsettled: false,
        }
    }

    /// [`Flat::gradients`] in the buffer of the gradients the last step spent, where there is
    /// one (libtorch): one address step after step, and no fresh buffer of all weights.
    pub fn flat_gradients(&mut self, model: &Model, grads: GradientsParams) -> Flat {
        Flat::gradients_into(model, grads, self.gradients.take())
    }

    /// Lets go of the buffer the last step's gradients leave, where the next step's are not
    /// made by [`Optimizer::flat_gradients`].
    pub fn release_gradients(&mut self) {
        self.gradients = None;
    }

    /// Writes the scalars of the next step of learning rate `lr` into their buffer on `device`
    /// now, where that step will be taken in place (Adam after its first step, on libtorch),
    /// so that the step itself takes nothing from the host.
    pub fn stage(&mut self, lr: f64, device: &Device) {
        if let (
            Rule::Adam {
                beta_1,
                beta_2,
                epsilon,
            },
            [moments],
        ) = (self.rule, &self.groups[..])
            && crate::model::native::runs_fused(device)
        {
            let scalars = adam_scalars(moments.time + 1, lr, beta_1, beta_2, epsilon);
            self.scalars.write(&scalars, device);
        }
    }

    /// Whether the optimizer holds the buffer of the last step's gradients.
    #[cfg(test)]
    pub(crate) fn holds_gradients(&self) -> bool {
        self.gradients.is_some()
    }

    /// Moves the parameters of `grads.layout` by one step of learning rate `lr`; returns the
    /// model and their new values.
    pub fn step(&mut self, lr: f64, model: Model, grads: Flat) -> (Model, Flat) {
        self.step_unless(lr, model, grads, None)
    }

    /// [`Optimizer::step`], taken only where `keep` (`[1]`, on the device) is true: an f16 step
    /// whose gradients overflowed is not. In place (Adam after its first step, on libtorch) the
    /// device decides, and the step counts itself taken until [`Optimizer::settle`] says whether
    /// it was; otherwise `keep` is read here (one wait for the device, where a parameter missed
    /// a step or on other backends).
    pub fn step_unless(
        &mut self,
        lr: f64,
        model: Model,
        grads: Flat,
        keep: Option<Tensor<1, burn::tensor::Bool>>,
    ) -> (Model, Flat) {
        self.unsettled = false;
        let in_place = self.steps_in_place(&grads);
        if let Some(keep) = &keep
            && !in_place
            && !keep.clone().into_scalar::<bool>()
        {
            let (weights, _) = self.weights_of(&model, &grads.layout);
            if crate::model::native::runs_fused(&weights.device()) {
                self.weights = Some(weights.clone());
            }
            let layout = grads.layout;
            return (
                model,
                Flat {
                    values: weights,
                    layout,
                },
            );
        }
        let (weights, overwrite) = self.weights_of(&model, &grads.layout);
        let new = if in_place {
            self.unsettled = keep.is_some();
            self.adam_in_place(lr, weights, overwrite, grads, keep)
        } else {
            self.step_by_burn(lr, weights, grads)
        };
        if crate::model::native::runs_fused(&new.values.device()) {
            self.weights = Some(new.values.clone());
        }
        (unflatten(model, &new), new)
    }

    /// Whether the next step of Adam would write `model`'s weights in place: what a step reads
    /// to decide, without taking it.
    pub(crate) fn writes_in_place(&self, model: &Model) -> bool {
        let (Some(weights), [group]) = (&self.weights, &self.groups[..]) else {
            return false;
        };
        let parts = parameter_values(model, &group.layout);
        let views = crate::model::native::views_of(weights, &parts);
        drop(parts);
        views && crate::model::native::other_holders(weights) == Some(group.layout.ids.len())
    }

    /// What a step captured as a CUDA graph reads and writes of the optimizer's, where the next
    /// step is Adam's in place into the gradients' buffer the last one spent: the weights, the
    /// moments, that buffer and the scalars, each buffer's address and other holders (see
    /// `train::step::graph`). None otherwise (the step makes new buffers).
    pub(crate) fn graph_buffers(&self, model: &Model) -> Option<Vec<Option<(usize, usize)>>> {
        let (Some(weights), [moments], Some(gradients)) =
            (&self.weights, &self.groups[..], &self.gradients)
        else {
            return None;
        };
        if !matches!(self.rule, Rule::Adam { .. }) || !self.writes_in_place(model) {
            return None;
        }
        let key = |t: &Tensor<1>| {
            crate::model::native::address(t).zip(crate::model::native::other_holders(t))
        };
        let scalars = self.scalars.address().map(|a| (a, 0));
        Some(vec![
            key(weights),
            key(&moments.first),
            key(&moments.second),
            key(gradients),
            scalars,
        ])
    }

    /// After a replay of a captured step: what that step did on the host (Adam's step count,
    /// and whether the device decided to take it: `masked`).
    pub(crate) fn replayed(&mut self, masked: bool) {
        for group in &mut self.groups {
            group.time += 1;
        }
        self.unsettled = masked;
    }

    /// After a step whose decision was the device's ([`Optimizer::step_unless`]): `taken` says
    /// whether it was taken, as read from the device; a step not taken does not count.
    pub(crate) fn settle(&mut self, taken: bool) {
        if std::mem::take(&mut self.unsettled) && !taken {
            for group in &mut self.groups {
                group.time -= 1;
            }
        }
    }

    /// Whether the next step could leave the decision to take it to the device
    /// ([`Optimizer::step_unless`] without a read): Adam with one group of moments on libtorch.
    pub(crate) fn decides_on_device(&self, device: &Device) -> bool {
        matches!(self.rule, Rule::Adam { .. })
            && self.groups.len() == 1
            && crate::model::native::runs_fused(device)
    }

    /// On libtorch, the weights the last step left, flat (as [`Optimizer::step`] returns them).
    pub(crate) fn last_weights(&self) -> Option<Flat> {
        match (&self.weights, &self.groups[..]) {
            (Some(values), [moments]) => Some(Flat {
                values: values.clone(),
                layout: moments.layout.clone(),
            }),
            _ => None,
        }
    }

    /// The flat weights of `layout`, and whether a step may write them in place: the last step's
    /// where the model's parameters are still views of them end to end (in place where they are
    /// all that holds them besides), else a copy of the parameters.
    fn weights_of(&mut self, model: &Model, layout: &Layout) -> (Tensor<1>, bool) {
        let parts = parameter_values(model, layout);
        if let Some(whole) = self.weights.take()
            && crate::model::native::views_of(&whole, &parts)
        {
            drop(parts);
            let holders = crate::model::native::other_holders(&whole);
            return (whole, holders == Some(layout.ids.len()));
        }
        (concat(parts), false)
    }

    /// A step with Burn's tensor operations: SGD, Adam's first step, and Adam where a parameter
    /// missed a step or off libtorch.
    fn step_by_burn(&mut self, lr: f64, weights: Tensor<1>, grads: Flat) -> Flat {
        let delta = match self.rule {
            Rule::Sgd => grads.values.mul_scalar(lr),
            Rule::Adam {
                beta_1,
                beta_2,
                epsilon,
            } => self
                .adam_update(&grads, [beta_1, beta_2, epsilon])
                .mul_scalar(lr),
        };
        Flat {
            values: weights - delta,
            layout: grads.layout,
        }
    }

    /// Whether a step of Adam after the first while every parameter has a gradient (the common
    /// case) on libtorch, which [`Optimizer::adam_in_place`] takes.
    fn steps_in_place(&self, grads: &Flat) -> bool {
        matches!(self.rule, Rule::Adam { .. })
            && self.groups.len() == 1
            && self.groups[0].layout == grads.layout
            && crate::model::native::runs_fused(&grads.values.device())
    }

    /// Such a step in place (`native::adam_in_place`, the same bits as [`adam_math`]): the new
    /// weights.
    fn adam_in_place(
        &mut self,
        lr: f64,
        weights: Tensor<1>,
        overwrite: bool,
        grads: Flat,
        keep: Option<Tensor<1, burn::tensor::Bool>>,
    ) -> Flat {
        let Rule::Adam {
            beta_1,
            beta_2,
            epsilon,
        } = self.rule
        else {
            unreachable!("steps_in_place is for Adam")
        };
        let moments = self.groups.pop().expect("one group");
        let time = moments.time + 1;
        let scalars = adam_scalars(time, lr, beta_1, beta_2, epsilon);
        let scalars = self.scalars.holding(&scalars, &weights.device());
        let (values, first, second, spent) = crate::model::native::adam_in_place(
            weights,
            grads.values,
            moments.first,
            moments.second,
            scalars,
            keep,
            overwrite,
        );
        // Kept for the next step's gradients where nothing else holds them.
        self.gradients = Some(spent).filter(|g| crate::model::native::other_holders(g) == Some(0));
        self.groups.push(Moments {
            layout: moments.layout,
            time,
            first,
            second,
        });
        Flat {
            values,
            layout: grads.layout,
        }
    }

    /// Adam's update (before the learning rate) for `grads`, with the moments brought forward.
    fn adam_update(&mut self, grads: &Flat, constants: [f32; 3]) -> Tensor<1> {
        // The common cases: the first step, and every step after it while every parameter has a
        // gradient each time.
        let fresh = self.groups.is_empty();
        if fresh || (self.groups.len() == 1 && self.groups[0].layout == grads.layout) {
            let state = self.groups.pop().map(|m| (m.time, m.first, m.second));
            let (update, (time, first, second)) = adam_math(grads.values.clone(), state, constants);
            self.groups.push(Moments {
                layout: grads.layout.clone(),
                time,
                first,
                second,
            });
            return update;
        }
        // Otherwise parameter by parameter, as Burn does, then one group again where the step
        // counts agree.
        let mut each = self.per_parameter();
        let mut updates = Vec::with_capacity(grads.layout.ids.len());
        let mut offset = 0;
        let mut stepped = Vec::new();
        for (&id, &n) in grads.layout.ids.iter().zip(&grads.layout.sizes) {
            let g = grads.values.clone().narrow(0, offset, n);
            offset += n;
            let state = each.remove(&id).map(|m| (m.time, m.first, m.second));
            let (update, (time, first, second)) = adam_math(g, state, constants);
            updates.push(update);
            stepped.push(Moments {
                layout: Layout {
                    ids: vec![id],
                    sizes: vec![n],
                },
                time,
                first,
                second,
            });
        }
        let same_time = stepped.windows(2).all(|w| w[0].time == w[1].time);
        self.groups = if each.is_empty() && same_time && !stepped.is_empty() {
            vec![Moments {
                layout: grads.layout.clone(),
                time: stepped[0].time,
                first: Tensor::cat(stepped.iter().map(|m| m.first.clone()).collect(), 0),
                second: Tensor::cat(stepped.iter().map(|m| m.second.clone()).collect(), 0),
            }]
        } else {
            stepped.extend(each.into_values());
            stepped
        };
        Tensor::cat(updates, 0)
    }

    /// Each parameter's moments on their own.
    fn per_parameter(&mut self) -> HashMap<ParamId, Moments> {
        let mut each = HashMap::new();
        for group in self.groups.drain(..) {
            let mut offset = 0;
            for (&id, &n) in group.layout.ids.iter().zip(&group.layout.sizes) {
                each.insert(
                    id,
                    Moments {
                        layout: Layout {
                            ids: vec![id],
                            sizes: vec![n],
                        },
                        time: group.time,
                        first: group.first.clone().narrow(0, offset, n),
                        second: group.second.clone().narrow(0, offset, n),
                    },
                );
                offset += n;
            }
        }
        each
    }

    /// Writes the state as Burn's `ModuleOptimizer` with `burn::optim::Adam` writes it: per
    /// parameter (by id) its moments in the parameter's shape and its step count.
    pub fn save(&self, model: &Model, path: &Path) -> Result<(), String> {
        let shapes = shapes(model);
        let mut tensors = Vec::new();
        let mut scalars = Vec::new();
        for group in &self.groups {
            let first = flat_values(&group.first);
            let second = flat_values(&group.second);
            let mut offset = 0;
            for (&id, &n) in group.layout.ids.iter().zip(&group.layout.sizes) {
                let shape = shapes.get(&id).cloned().unwrap_or_else(|| vec![n]);
                let key = id.val();
                for (field, values) in [("moment_1", &first), ("moment_2", &second)] {
                    let bytes: Vec<u8> = values[offset..offset + n]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    tensors.push(burn_pack::Tensor::new(
                        format!("{key}.momentum.{field}"),
                        DType::F32,
                        burn::tensor::Shape::from(shape.clone()),
                        Some(key),
                        burn::tensor::Bytes::from_bytes_vec(bytes),
                    ));
                }
                scalars.push((
                    format!("{key}.momentum.time"),
                    burn_pack::Scalar::from(group.time),
                ));
                scalars.push((
                    format!("{key}.__rank"),
                    burn_pack::Scalar::from(shape.len()),
                ));
                offset += n;
            }
        }
        let mut writer = burn_pack::Writer::new(tensors);
        for (key, value) in &scalars {
            writer = writer.with_scalar(key, *value);
        }
        writer.write_to_file(path).map_err(|e| e.to_string())
    }

    /// Reads a state written by [`Optimizer::save`] (or by Burn's Adam) for `model`'s
    /// parameters, which must be those it was written for.
    pub fn load(mut self, model: &Model, path: &Path) -> Result<Optimizer, String> {
        let reader = burn_pack::Reader::from_file(path).map_err(|e| e.to_string())?;
        let scalars = reader.scalars().clone();
        let mut moments: HashMap<(u64, String), Vec<f32>> = HashMap::new();
        for tensor in reader.into_tensors().map_err(|e| e.to_string())? {
            let (name, dtype, shape, param_id, bytes) =
                tensor.into_parts().map_err(|e| e.to_string())?;
            let Some(id) = param_id else {
                return Err(format!("`{name}` names no parameter"));
            };
            let field = name.rsplit('.').next().unwrap_or_default().to_string();
            let values: Vec<f32> = TensorData::from_bytes(bytes, shape, dtype)
                .convert::<f32>()
                .try_to_vec()
                .map_err(|e| format!("`{name}`: {e:?}"))?;
            moments.insert((id, field), values);
        }
        let layout = Layout::of(model);
        let device = model_device(model);
        let mut each = Vec::new();
        for (&id, &n) in layout.ids.iter().zip(&layout.sizes) {
            let key = id.val();
            let Some(time) = scalars.get(&format!("{key}.momentum.time")) else {
                continue;
            };
            let time = usize::try_from(*time).map_err(|_| format!("{key}: a step count"))?;
            let mut take = |field: &str| {
                moments
                    .remove(&(key, field.to_string()))
                    .filter(|v| v.len() == n)
                    .ok_or_else(|| format!("parameter {key}: no {field} of {n} values"))
            };
            let (first, second) = (take("moment_1")?, take("moment_2")?);
            each.push(Moments {
                layout: Layout {
                    ids: vec![id],
                    sizes: vec![n],
                },
                time,
                first: Tensor::from_data(TensorData::new(first, [n]), &device),
                second: Tensor::from_data(TensorData::new(second, [n]), &device),
            });
        }
        if let Some((key, _)) = moments.keys().next() {
            return Err(format!(
                "moments of parameter {key}, which the model does not have"
            ));
        }
        // One group where every parameter has moments of the same age.
        let whole =
            each.len() == layout.ids.len() && each.windows(2).all(|w| w[0].time == w[1].time);
        self.groups = if whole && !each.is_empty() {
            vec![Moments {
                time: each[0].time,
                first: Tensor::cat(each.iter().map(|m| m.first.clone()).collect(), 0),
                second: Tensor::cat(each.iter().map(|m| m.second.clone()).collect(), 0),
                layout,
            }]
        } else {
            each
        };
        Ok(self)
    }
}

/// Adam's arithmetic as `burn::optim::Adam` does it (`AdaptiveMomentum::transform`): the update
/// `m^ / (sqrt(v^) + eps)` with bias correction, and the moments and step count after it.
fn adam_math(
    g: Tensor<1>,
    state: Option<(usize, Tensor<1>, Tensor<1>)>,
    [beta_1, beta_2, epsilon]: [f32; 3],
) -> (Tensor<1>, (usize, Tensor<1>, Tensor<1>)) {
    let (time, first, second) = match state {
        Some((time, first, second)) => (
            time + 1,
            first
                .mul_scalar(beta_1)
                .add(g.clone().mul_scalar(1.0 - beta_1)),
            second
                .mul_scalar(beta_2)
                .add(g.square().mul_scalar(1.0 - beta_2)),
        ),
        None => (
            1,
            g.clone().mul_scalar(1.0 - beta_1),
            g.square().mul_scalar(1.0 - beta_2),
        ),
    };
    let [bias_correction2_sqrt, combined_factor] = corrections(time, beta_1, beta_2);
    let update = first.clone().mul_scalar(combined_factor).div(
        second
            .clone()
            .sqrt()
            .add_scalar(epsilon * bias_correction2_sqrt),
    );
    (update, (time, first, second))
}

/// The scalars of Adam's step `time` in place (`native::adam_in_place`), as ATen takes Burn's
/// into f32 kernels: its f32 constants, and the learning rate rounded to f32; then those of a
/// step that changes nothing, which it takes where the device decides not to take it.
fn adam_scalars(time: usize, lr: f64, beta_1: f32, beta_2: f32, epsilon: f32) -> [f32; 14] {
    let [bias_correction2_sqrt, combined_factor] = corrections(time, beta_1, beta_2);
    let epsilon = epsilon * bias_correction2_sqrt;
    [
        beta_1,
        1.0 - beta_1,
        beta_2,
        1.0 - beta_2,
        combined_factor,
        epsilon,
        lr as f32,
        // Not taken: `m * 1 + g * 0`, `v * 1 + g g * 0`, `w - update * 0`.
        1.0,
        0.0,
        1.0,
        0.0,
        combined_factor,
        epsilon,
        0.0,
    ]
}

/// Adam's bias corrections at step `time` (from 1), as Burn computes them: the root of the
/// second's, and the factor of the first moment that combines both.
fn corrections(time: usize, beta_1: f32, beta_2: f32) -> [f32; 2] {
    let t = time as i32;
    let bias_correction2_sqrt = (1.0 - beta_2.powi(t)).sqrt();
    [
        bias_correction2_sqrt,
        bias_correction2_sqrt / (1.0 - beta_1.powi(t)),
    ]
}

/// Each float parameter's shape, by id.
fn shapes(model: &Model) -> HashMap<ParamId, Vec<usize>> {
    struct Visit(HashMap<ParamId, Vec<usize>>);
    impl ModuleVisitor for Visit {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dims = param.val().dims().to_vec();
            self.0.insert(param.id, dims);
        }
    }
    let mut visit = Visit(HashMap::new());
    model.visit(&mut visit);
    visit.0
}

/// The device of `model`'s weights, without autodiff.
fn model_device(model: &Model) -> burn::tensor::Device {
    model.devices()[0].clone().without_autodiff()
}

fn flat_values(t: &Tensor<1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 moments")
}

/// Where two tensors' values first differ in their bits (None: nowhere): a test's comparison of
/// long buffers, which says where instead of printing them whole.
#[cfg(test)]
pub(crate) fn first_difference(a: &Tensor<1>, b: &Tensor<1>) -> Option<usize> {
    let [a, b] = [a, b].map(|t| t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits())
}

#[cfg(test)]
mod tests;
