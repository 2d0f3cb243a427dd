//! The `[train]`, `[sample]` and `[runtime]` tables: the optimiser's and the sampler's settings,
//! and the backend and device a run asks for.

use super::{Checker, MAX_GRID};
use crate::device::{self, Target};
use crate::error::Result;
use crate::experiment::{BackendKind, Experiment};

/// `[train]`.
pub(super) fn check_train(ctx: &Checker, e: &Experiment) -> Result<()> {
    let t = &e.train;
    ctx.require(t.epochs >= 1, "train.epochs", t.epochs, "at least 1 epoch")?;
    ctx.require(
        t.batch_size >= 1,
        "train.batch_size",
        t.batch_size,
        "at least 1 image",
    )?;
    ctx.require(
        t.eval_batch_size >= 1,
        "train.eval_batch_size",
        t.eval_batch_size,
        "at least 1 image",
    )?;
    ctx.require(
        t.keep_checkpoints >= 1,
        "train.keep_checkpoints",
        t.keep_checkpoints,
        "at least 1 (resuming needs the newest checkpoint)",
    )?;
    ctx.require(
        t.learning_rate.is_finite() && t.learning_rate > 0.0,
        "train.learning_rate",
        t.learning_rate,
        "a positive number such as 0.001",
    )?;
    ctx.require(
        t.lr_decay > 0.0 && t.lr_decay <= 1.0,
        "train.lr_decay",
        t.lr_decay,
        "a factor in (0, 1] per step, such as 0.999995 (1 keeps the learning rate)",
    )?;
    for (i, beta) in t.adam_betas.iter().enumerate() {
        ctx.require(
            (0.0..1.0).contains(beta),
            &format!("train.adam_betas[{i}]"),
            beta,
            "a number in [0, 1), such as 0.9 and 0.999",
        )?;
    }
    ctx.require(
        t.clip_grad_norm.is_finite() && t.clip_grad_norm >= 0.0,
        "train.clip_grad_norm",
        t.clip_grad_norm,
        "a norm of 0 (no clipping) or more",
    )?;
    ctx.require(
        (0.0..1.0).contains(&t.ema),
        "train.ema",
        t.ema,
        "a decay in [0, 1) per step, such as 0.9995 (0 turns averaging off)",
    )
}

/// `[sample]`.
pub(super) fn check_sample(ctx: &Checker, e: &Experiment) -> Result<()> {
    let s = &e.sample;
    ctx.require(
        s.temperature.is_finite() && s.temperature > 0.0,
        "sample.temperature",
        s.temperature,
        "a positive number (1.0 samples the model's own distribution)",
    )?;
    ctx.require(
        s.grid >= 2 && s.grid.is_multiple_of(2) && s.grid <= MAX_GRID,
        "sample.grid",
        s.grid,
        &format!("an even number of images per side, from 2 to {MAX_GRID}"),
    )
}

/// `[runtime]`: the device asked for, on a backend compiled into this binary that can reach it.
pub(super) fn target(ctx: &Checker, e: &Experiment) -> Result<Target> {
    let r = &e.runtime;
    let Some(target) = Target::parse(&r.device) else {
        return Err(ctx.invalid(
            "runtime.device",
            format!("{:?}", r.device),
            "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
        ));
    };
    let backend_name = format!("\"{}\"", r.backend.name());
    if !device::compiled_in(r.backend) {
        return Err(ctx.invalid(
            "runtime.backend",
            backend_name.clone(),
            &format!(
                "a backend compiled into this binary; for {backend_name} use {}",
                device::rebuild_hint(r.backend)
            ),
        ));
    }
    let flex_only = r.backend == BackendKind::Flex
        || (r.backend == BackendKind::Auto && !device::compiled_in(BackendKind::Libtorch));
    ctx.require(
        !(matches!(target, Target::Cuda(_)) && flex_only),
        "runtime.device",
        format!("{:?}", r.device),
        &format!(
            "\"cpu\" or \"auto\" with the flex backend (CUDA needs libtorch: {})",
            device::rebuild_hint(BackendKind::Libtorch)
        ),
    )?;
    if r.cuda_graph {
        ctx.require(
            !flex_only && target != Target::Cpu,
            "runtime.cuda_graph",
            true,
            "false where the run cannot be on CUDA (a CUDA graph is libtorch's on CUDA only)",
        )?;
        ctx.require(
            crate::model::native::graph::available(),
            "runtime.cuda_graph",
            true,
            "false in this build: it has no CUDA graphs (built without the CUDA runtime's \
             headers: see bench/gpu-build.sh)",
        )?;
    }
    if r.cudnn_benchmark {
        ctx.require(
            !flex_only && target != Target::Cpu,
            "runtime.cudnn_benchmark",
            true,
            "false where the run cannot be on CUDA (cuDNN is libtorch's on CUDA only)",
        )?;
        ctx.require(
            !r.deterministic,
            "runtime.cudnn_benchmark",
            true,
            "false with runtime.deterministic = true (algorithms picked by timing do not repeat)",
        )?;
    }
    Ok(target)
}
