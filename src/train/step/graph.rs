//! A training step replayed as one CUDA graph (`runtime.cuda_graph`, one process on libtorch
//! CUDA): the step's work on the device, from its forward pass to the update and the
//! average, is captured once and then launched with one call per step, so that the host no
//! longer builds Burn's graph, asks libtorch for each operator and launches each kernel.
//!
//! What makes this correct is what `model::native::replay`'s tests hold the step to on the CPU:
//! from its third step on, a step calls the same operators with the same numbers on the same
//! buffers, and whatever it takes from the host is written into buffers that live across steps
//! before its work begins. Here, each step's [`Signature`] says what a capture depends on that
//! could change: the numbers its kernels take as arguments (the batch's size, the KL weight)
//! and the address of every buffer from outside it reads or writes, with how many other tensors
//! hold it (the optimizer writes in place only where nothing else does). A step is captured once
//! two steps in a row had the same signature (the buffers have settled), and replayed while the
//! signature stays the capture's. Any other step runs eagerly: a last partial batch (the graph
//! is kept for the next epoch), a buffer that moved (the graph is dropped, and captured again
//! once they settle), a step before the buffers exist, an f16 step that reads the host before
//! its update. The host does after a replay what the captured step did besides its work on the
//! device: Adam's step count (less a step the device skipped, in f16), the average's model. The
//! counts are reported ([`GraphCounts`]).

use crate::model::native::graph::CudaGraph;
use burn::tensor::Tensor;

/// What a captured step depends on that could change from one step to the next.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    /// The numbers the captured kernels take as arguments: the step's images (the loss is
    /// divided by their sub-pixels), the KL weight's and clipping's and free bits' bits.
    pub numbers: Vec<u64>,
    /// Every buffer from outside the step that it reads or writes: its address and how many
    /// other tensors hold it (None where there is none: a model without an average).
    pub buffers: Vec<Option<(usize, usize)>>,
}

/// How many steps were captured, replayed and taken eagerly with `runtime.cuda_graph`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GraphCounts {
    /// Steps captured (each then run by one replay); more than one when buffers moved.
    pub captured: usize,
    /// Steps replayed from a capture, besides the capture's own.
    pub replayed: usize,
    /// Steps run without a graph: the first (the buffers are made), partial batches, steps
    /// whose buffers moved.
    pub eager: usize,
}

/// What to do with this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Eagerly, on the device's current stream.
    Eager,
    /// Eagerly on the graph's stream, before a capture (as `torch.cuda.graph`'s warm-up).
    Warm,
    Capture,
    Replay,
}

/// The captured step and the tensors its replay writes the loss's totals and the gradients'
/// square sum into.
struct Captured {
    graph: CudaGraph,
    signature: Signature,
    square_sum: Tensor<1>,
    totals: Tensor<1>,
}

/// A run's CUDA graph of its step, kept across steps with the step's input buffers. A clone has
/// none of its own yet (a graph writes into its capture's buffers only): it captures afresh.
#[derive(Default)]
pub struct StepGraph {
    captured: Option<Captured>,
    /// The last eager step's signature.
    last: Option<Signature>,
    /// The graph the steps before its capture run on the stream of.
    warming: Option<CudaGraph>,
    /// A graph begun and not yet ended.
    pending: Option<(CudaGraph, Signature)>,
    counts: GraphCounts,
}

impl Clone for StepGraph {
    fn clone(&self) -> StepGraph {
        StepGraph::default()
    }
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraph")
            .field("captured", &self.captured.is_some())
            .field("counts", &self.counts)
            .finish()
    }
}

impl StepGraph {
    pub fn counts(&self) -> GraphCounts {
        self.counts
    }

    /// Whether step `n` (of the run) with this signature is replayed, captured or run eagerly
    /// (None: a step that cannot be captured, as one that is not yet in place). Counted.
    pub fn plan(&mut self, signature: Option<Signature>, n: usize) -> Plan {
        let Some(signature) = signature else {
            self.last = None;
            self.counts.eager += 1;
            return Plan::Eager;
        };
        if let Some(captured) = &self.captured {
            if captured.signature == signature {
                self.counts.replayed += 1;
                return Plan::Replay;
            }
            if captured.signature.buffers != signature.buffers {
                let moved = captured
                    .signature
                    .buffers
                    .iter()
                    .zip(&signature.buffers)
                    .filter(|(a, b)| a != b)
                    .count();
                tracing::warn!(
                    "step {n}: {moved} of the buffers the step's CUDA graph reads moved or are \
                     held elsewhere; the graph is dropped and the step captured again once they \
                     settle"
                );
                self.captured = None;
            }
        }
        let settled = self.last.as_ref() == Some(&signature);
        self.last = Some(signature);
        match (&self.captured, settled) {
            (None, true) => Plan::Capture,
            (None, false) => {
                self.counts.eager += 1;
                Plan::Warm
            }
            (Some(_), _) => {
                self.counts.eager += 1;
                Plan::Eager
            }
        }
    }

    /// Before a step planned [`Plan::Warm`] on CUDA device `index`: its graph's stream made
    /// current (the graph made the first time).
    pub fn warm(&mut self, index: usize) -> Result<(), String> {
        if self.warming.is_none() {
            self.warming = Some(CudaGraph::new(index)?);
        }
        self.warming.as_mut().expect("made").enter()
    }

    /// After that step: the stream before it current again.
    pub fn cool(&mut self) -> Result<(), String> {
        self.warming.as_mut().expect("warmed").leave()
    }

    /// Begins capturing the step planned [`Plan::Capture`] on CUDA device `index`, on the stream
    /// the steps before it ran on.
    pub fn begin(&mut self, index: usize) -> Result<(), String> {
        let signature = self.last.clone().expect("planned to capture");
        let mut graph = match self.warming.take() {
            Some(graph) => graph,
            None => CudaGraph::new(index)?,
        };
        graph.begin()?;
        self.pending = Some((graph, signature));
        Ok(())
    }

    /// Ends the capture begun by [`Self::begin`], whose step left its totals and square sum in
    /// these tensors, and replays it once: the step's work is done.
    pub fn end(
        &mut self,
        n: usize,
        square_sum: Tensor<1>,
        totals: Tensor<1>,
    ) -> Result<(), String> {
        let (mut graph, signature) = self.pending.take().expect("a capture begun");
        graph.end()?;
        graph.replay()?;
        self.counts.captured += 1;
        tracing::info!("step {n}: captured as a CUDA graph; the steps that follow replay it");
        self.captured = Some(Captured {
            graph,
            signature,
            square_sum,
            totals,
        });
        Ok(())
    }

    /// Drops a capture that failed midway (ending it).
    pub fn abandon(&mut self) {
        self.pending = None;
    }

    /// Replays the captured step: its square sum and totals, as the capture's step left them.
    pub fn replay(&mut self) -> Result<(Tensor<1>, Tensor<1>), String> {
        let captured = self.captured.as_mut().expect("planned to replay");
        captured.graph.replay()?;
        Ok((captured.square_sum.clone(), captured.totals.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature(images: u64, address: usize) -> Option<Signature> {
        Some(Signature {
            numbers: vec![images],
            buffers: vec![Some((address, 0)), None],
        })
    }

    /// A step is captured once two in a row agree, and replayed while they go on agreeing; a
    /// partial batch runs eagerly beside the graph, a moved buffer drops it, and a step that
    /// cannot be captured resets the wait. (The graph itself needs a GPU: the plans only.)
    #[test]
    fn steps_are_captured_once_settled_and_replayed_while_unchanged() {
        let mut graph = StepGraph::default();
        let plans: Vec<Plan> = [None, signature(4, 1), signature(4, 2), signature(4, 2)]
            .into_iter()
            .enumerate()
            .map(|(n, s)| graph.plan(s, n + 1))
            .collect();
        assert_eq!(plans, [Plan::Eager, Plan::Warm, Plan::Warm, Plan::Capture]);
        assert_eq!(
            graph.counts(),
            GraphCounts {
                captured: 0,
                replayed: 0,
                eager: 3
            }
        );
        // Without a GPU the capture cannot begin, and says so.
        if !crate::model::native::graph::cuda_available() {
            let error = graph.begin(0).expect_err("no GPU");
            assert!(
                error.starts_with("a CUDA graph could not be made"),
                "{error}"
            );
        }
        // As if captured: replays while the signature holds.
        graph.captured = Some(Captured {
            graph: CudaGraph::detached(),
            signature: signature(4, 2).expect("a signature"),
            square_sum: Tensor::zeros([1], &Default::default()),
            totals: Tensor::zeros([1], &Default::default()),
        });
        assert_eq!(graph.plan(signature(4, 2), 5), Plan::Replay);
        // A partial batch: eager, the graph kept.
        assert_eq!(graph.plan(signature(3, 2), 6), Plan::Eager);
        assert_eq!(graph.plan(signature(4, 2), 7), Plan::Replay);
        // A buffer moved (or is held elsewhere): eager and dropped; captured again after two
        // agreeing steps.
        assert_eq!(graph.plan(signature(4, 3), 8), Plan::Warm);
        assert!(graph.captured.is_none());
        assert_eq!(graph.plan(signature(4, 3), 9), Plan::Capture);
        assert_eq!(
            graph.counts(),
            GraphCounts {
                captured: 0,
                replayed: 2,
                eager: 5
            }
        );
        // A step that cannot be captured between two that agree: no capture yet.
        let mut graph = StepGraph::default();
        assert_eq!(graph.plan(signature(4, 2), 1), Plan::Warm);
        assert_eq!(graph.plan(None, 2), Plan::Eager);
        assert_eq!(graph.plan(signature(4, 2), 3), Plan::Warm);
        assert_eq!(graph.plan(signature(4, 2), 4), Plan::Capture);
    }
}
