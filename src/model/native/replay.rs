//! Whether a stretch of libtorch work could be captured once as a CUDA graph and replayed in
//! place of running it again, checked on any device, the CPU included.
//!
//! A CUDA graph replays the kernels it captured with the arguments they had: the same buffers,
//! the same scalars. Replaying step n's capture at step n + 1 does step n + 1's work when step
//! n + 1 would call the same operators, with the same scalar arguments, on the same buffers from
//! outside the stretch (weights, moments, inputs written before it), and on buffers made inside
//! it in the same pattern (the graph's pool gives them the same places again); and when no data
//! comes from the host inside it (tch uploads by `aten::zeros` and a memcpy that no operator
//! sees: its bytes, which a graph would keep, are hashed at their first read). [`trace`] records
//! the operators (`src/native/torch_extras.cpp`), [`canonical`] names the buffers made inside by
//! where they were made, and two steps' canonical traces must be equal. [`host_reads`] finds
//! where the host waits to read the device (a capture fails on it). What this does not see:
//! work outside libtorch's operators.

/// The top-level libtorch operators `f` calls on this thread (and those libtorch's autograd
/// engine runs for it), one line each (see torch_extras.cpp), and what it returns. One trace at a
/// time in the process: a second waits.
pub fn trace<T>(f: impl FnOnce() -> T) -> (Vec<String>, T) {
    let (lines, out) = super::graph::operator_trace(f);
    (lines.unwrap_or_else(|e| panic!("{e}")), out)
}

/// The lines of `lines` after the mark `from` ([`super::trace_mark`]) and before the next mark
/// `to`.
pub fn between(lines: &[String], from: &str, to: &str) -> Vec<String> {
    let (from, to) = (format!("# {from}"), format!("# {to}"));
    let start = lines
        .iter()
        .position(|l| *l == from)
        .unwrap_or_else(|| panic!("no mark {from:?} in the trace"));
    let end = lines[start..]
        .iter()
        .position(|l| *l == to)
        .unwrap_or_else(|| panic!("no mark {to:?} after {from:?} in the trace"));
    lines[start + 1..start + end].to_vec()
}

/// `lines` with each tensor's storage named by when it was made: `a<k>` for the k-th buffer
/// the allocator made inside the trace (from its `+` line to its `-` line), `x<address>` for one
/// from outside, `null` for none. Offsets, dtypes, sizes, strides and hashes stay; the
/// allocator's lines become `alloc <bytes>` and `free a<k>`.
pub fn canonical(lines: &[String]) -> Vec<String> {
    let mut names: std::collections::HashMap<String, String> = Default::default();
    let mut made = 0;
    let name = |names: &std::collections::HashMap<String, String>, address: &str| match names
        .get(address)
    {
        Some(n) => n.clone(),
        None if address == "0" => "null".into(),
        None => format!("x{address}"),
    };
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        if let Some(rest) = line.strip_prefix("+ ") {
            let (address, bytes) = rest.split_once(' ').unwrap_or((rest, "?"));
            names.insert(address.to_string(), format!("a{made}"));
            made += 1;
            out.push(format!("alloc {bytes}"));
        } else if let Some(address) = line.strip_prefix("- ") {
            out.push(format!("free {}", name(&names, address)));
            names.remove(address);
        } else if line.starts_with("# ") {
            out.push(line.clone());
        } else {
            let fields: Vec<String> = line
                .split('\t')
                .map(|field| {
                    field
                        .split_whitespace()
                        .map(|token| match storage(token) {
                            Some((address, rest)) => format!("T{}{rest}", name(&names, address)),
                            None => token.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            out.push(fields.join("\t"));
        }
    }
    out
}

/// A tensor token's storage address and the rest (`@offset:...`).
fn storage(token: &str) -> Option<(&str, &str)> {
    let body = token.strip_prefix('T')?;
    let at = body.find('@')?;
    Some((&body[..at], &body[at..]))
}

/// The lines of a trace that take data from the host (`#up`: an upload), which a CUDA graph's
/// capture cannot hold (it would keep the bytes of its capture, where it takes them at all).
pub fn uploads(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("#up"))
        .cloned()
        .collect()
}

/// The lines of a trace where the host waits for the device to read it, which a CUDA graph's
/// capture cannot hold (it fails on them): a scalar read (`aten::item`,
/// `aten::_local_scalar_dense`), an operator whose output's size depends on the values
/// (`nonzero`, `masked_select`, `unique`, an index by a boolean tensor), an answer given to the
/// host (`equal`, `is_nonzero`), and tch's read of a tensor into the host's memory
/// (`Vec::try_from`, which Burn's `into_data` calls), which on the CPU is a top-level
/// `aten::to` that returns its input itself (Burn's casts skip a `to` to the type a tensor
/// has). Not seen: a read of a tensor whose type tch converts first (its `to` makes a copy).
pub fn host_reads(lines: &[String]) -> Vec<String> {
    const WAITING: [&str; 11] = [
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::nonzero_numpy",
        "aten::argwhere",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::unique_dim",
        "aten::equal",
        "aten::is_nonzero",
    ];
    lines
        .iter()
        .filter(|line| {
            let o = Operator::of(line);
            let (input, output) = (
                o.inputs.split_whitespace().next(),
                o.outputs.split_whitespace().next(),
            );
            WAITING.contains(&o.name)
                || (o.name == "aten::index" && input_has_bool_index(o.inputs))
                || (!o.nested && o.name == "aten::to" && input.is_some() && input == output)
        })
        .cloned()
        .collect()
}

/// The lines of a trace whose CUDA kernels libtorch calls nondeterministic (they add with
/// atomics in no fixed order), which `runtime.deterministic` makes an error on a GPU
/// (`torch.use_deterministic_algorithms(True)`'s list): the summed or averaged
/// `nll_loss2d_forward`, and operators pixel has no use for (padding by reflection or
/// replication, interpolation, adaptive and 3-d pooling, `index_copy`, `put_`, `histc`, ...)
/// whose backward passes or kernels are on that list. On the CPU nothing says so: this is how a
/// test sees it without a GPU.
pub fn cuda_nondeterministic(lines: &[String]) -> Vec<String> {
    const ALWAYS: [&str; 25] = [
        "aten::avg_pool3d_backward",
        "aten::_adaptive_avg_pool2d_backward",
        "aten::_adaptive_avg_pool3d_backward",
        "aten::max_pool3d_with_indices_backward",
        "aten::adaptive_max_pool2d_backward",
        "aten::fractional_max_pool2d_backward",
        "aten::fractional_max_pool3d_backward",
        "aten::max_unpool2d",
        "aten::max_unpool3d",
        "aten::upsample_linear1d_backward",
        "aten::upsample_bilinear2d_backward",
        "aten::upsample_bicubic2d_backward",
        "aten::upsample_trilinear3d_backward",
        "aten::reflection_pad1d_backward",
        "aten::reflection_pad2d_backward",
        "aten::reflection_pad3d_backward",
        "aten::replication_pad1d_backward",
        "aten::replication_pad2d_backward",
        "aten::replication_pad3d_backward",
        "aten::_ctc_loss_backward",
        "aten::put_",
        "aten::histc",
        "aten::kthvalue",
        "aten::grid_sampler_2d_backward",
        "aten::index_copy",
    ];
    lines
        .iter()
        .filter(|line| {
            let o = Operator::of(line);
            // nll_loss2d_forward(self, target, weight, reduction, ignore_index): 0 is none.
            let reduction = o.inputs.split_whitespace().nth(3);
            ALWAYS.contains(&o.name)
                || (o.name == "aten::nll_loss2d_forward" && reduction.is_some_and(|r| r != "0"))
        })
        .cloned()
        .collect()
}

/// An operator line of a trace (`[depth ]name.overload<TAB>inputs<TAB>outputs`), read.
struct Operator<'a> {
    /// Called by another operator (the line starts with its depth).
    nested: bool,
    /// Without its overload: `aten::to`.
    name: &'a str,
    inputs: &'a str,
    outputs: &'a str,
}

impl<'a> Operator<'a> {
    fn of(line: &'a str) -> Operator<'a> {
        let mut fields = line.split('\t');
        let head = fields.next().unwrap_or("");
        let (nested, name) = match head.split_once(' ') {
            Some((depth, name)) if depth.parse::<u32>().is_ok() => (true, name),
            _ => (false, head),
        };
        Operator {
            nested,
            name: name.split('.').next().unwrap_or(name),
            inputs: fields.next().unwrap_or(""),
            outputs: fields.next().unwrap_or(""),
        }
    }
}

/// Whether an `aten::index` operator's indices (its inputs after the first) hold a boolean
/// tensor.
fn input_has_bool_index(inputs: &str) -> bool {
    inputs
        .split_whitespace()
        .skip(1)
        .any(|token| storage(token).is_some_and(|(_, rest)| rest.contains(":Bool:")))
}

/// Where two canonical traces differ: None when a replay of the first would do the second's
/// work, else the first differences, line by line.
pub fn differences(first: &[String], second: &[String]) -> Option<String> {
    let mut out = Vec::new();
    if first.len() != second.len() {
        out.push(format!("{} operators, then {}", first.len(), second.len()));
    }
    for (k, (a, b)) in first.iter().zip(second).enumerate() {
        if a != b {
            out.push(format!("operator {k}:\n  {a}\n  {b}"));
        }
        if out.len() >= 6 {
            break;
        }
    }
    (!out.is_empty()).then(|| out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    fn halves() -> Tensor {
        Tensor::full([64], 0.5, (Kind::Float, Device::Cpu))
    }

    /// Work on buffers that live across the traces, in place, with the same scalars: a replay
    /// would do it. Made inside, a temporary is named by where it was made, wherever the
    /// allocator puts it.
    #[test]
    fn in_place_work_on_the_same_buffers_replays() {
        let w = Tensor::ones([64], (Kind::Float, Device::Cpu));
        let g = halves();
        let step = || {
            let (lines, ()) = trace(|| {
                let t = &g * 2.0; // a temporary
                let mut w = w.shallow_clone();
                let _ = w.f_sub_(&t).unwrap();
            });
            canonical(&lines)
        };
        let (a, b) = (step(), step());
        assert!(a.iter().any(|l| l.starts_with("aten::sub_")), "{a:#?}");
        assert_eq!(differences(&a, &b), None);
    }

    /// What a replay would not do again: data from the host (an upload, its bytes hashed), a
    /// scalar that changes, a buffer from outside that moved.
    #[test]
    fn uploads_scalars_and_moved_buffers_differ() {
        let g = halves();
        let upload = |v: f32| canonical(&trace(|| Tensor::from_slice(&[v; 64]) + &g).0);
        assert_eq!(differences(&upload(1.0), &upload(1.0)), None);
        let d = differences(&upload(1.0), &upload(2.0)).expect("uploads differ");
        assert!(d.contains("#up"), "{d}");
        // The same data each time replays, but it is an upload all the same.
        assert_eq!(uploads(&upload(1.0)).len(), 1);
        assert_eq!(
            uploads(&canonical(&trace(|| &g + 1.0).0)),
            Vec::<String>::new()
        );
        let scaled = |s: f64| canonical(&trace(|| &g * s).0);
        assert_eq!(differences(&scaled(3.0), &scaled(3.0)), None);
        assert!(differences(&scaled(3.0), &scaled(4.0)).is_some());
        let moved = halves();
        let read = |t: &Tensor| canonical(&trace(|| t * 3.0).0);
        assert!(differences(&read(&g), &read(&moved)).is_some());
        assert_eq!(differences(&read(&g), &read(&g)), None);
    }

    /// The host's reads of the device are found: tch's read into a `Vec` (what Burn's
    /// `into_data` does), a scalar, an operator sized by the values, a boolean index; a cast, an
    /// integer index and arithmetic are not reads.
    #[test]
    fn reads_by_the_host_are_found() {
        let g = halves();
        let found = |f: &dyn Fn()| host_reads(&canonical(&trace(f).0));
        assert_eq!(found(&|| drop(Vec::<f32>::try_from(&g).unwrap())).len(), 1);
        assert!(
            !found(&|| {
                let _ = g.double_value(&[3]);
            })
            .is_empty()
        );
        assert!(!found(&|| drop(g.nonzero())).is_empty());
        let mask = g.gt(0.25);
        assert!(!found(&|| drop(g.index(&[Some(&mask)]))).is_empty());
        let at = Tensor::from_slice(&[1i64, 3]);
        assert_eq!(found(&|| drop(g.index(&[Some(&at)]))), Vec::<String>::new());
        assert_eq!(
            found(&|| drop(g.to_kind(Kind::Double))),
            Vec::<String>::new()
        );
        assert_eq!(found(&|| drop(&g * 2.0 + 1.0)), Vec::<String>::new());
    }

    /// The categorical loss summed by libtorch's `nll_loss2d` is found (its CUDA kernel adds
    /// with atomics, an error with `runtime.deterministic`), per element it is not, and neither
    /// is pixel's own loss; a reflection pad's backward pass is found.
    #[test]
    fn kernels_nondeterministic_on_cuda_are_found() {
        let logits = Tensor::randn([2, 256, 1, 3, 3], (Kind::Float, tch::Device::Cpu));
        let targets = Tensor::randint(256, [2, 1, 3, 3], (Kind::Int64, tch::Device::Cpu));
        let found = |f: &dyn Fn()| cuda_nondeterministic(&canonical(&trace(f).0));
        let loss = |reduction| {
            drop(logits.cross_entropy_loss::<Tensor>(&targets, None, reduction, -100, 0.0))
        };
        assert_eq!(found(&|| loss(tch::Reduction::Sum)).len(), 1);
        assert_eq!(found(&|| loss(tch::Reduction::Mean)).len(), 1);
        assert_eq!(found(&|| loss(tch::Reduction::None)), Vec::<String>::new());
        let ours = logits.transpose(1, 2).set_requires_grad(true);
        let nll = || super::super::torch_ops::nll(&ours, &targets);
        assert_eq!(found(&|| drop(nll())), Vec::<String>::new());
        assert_eq!(found(&|| nll().backward()), Vec::<String>::new());
        let x =
            Tensor::randn([1, 1, 4, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let padded = x.reflection_pad2d([1, 1, 1, 1]).sum(Kind::Float);
        assert_eq!(found(&|| padded.backward()).len(), 1);
    }
}
