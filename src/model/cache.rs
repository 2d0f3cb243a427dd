//! What the cached samplers of the simple and the gated PixelCNN have in common (Ramachandran et
//! al. 2017): each layer keeps its inputs at the finished pixels of the current row, and its
//! input rows above, zero-padded on both sides, that its kernel still reaches. Per-pixel values are
//! `[batch, channels]` matrices; rows are `[batch, channels, 1, width + 2 * half]`.

use burn::tensor::{DType, Device, Tensor};
use std::collections::VecDeque;

/// One layer's inputs along the current row: one `[batch, in]` per finished pixel, and the input
/// at the pixel being generated, kept once the pixel is committed.
pub(super) struct RowInputs {
    cols: Vec<Tensor<2>>,
    zero: Tensor<2>,
    current: Option<Tensor<2>>,
}

impl RowInputs {
    pub(super) fn new(
        batch: usize,
        inputs: usize,
        width: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        RowInputs {
            cols: Vec::with_capacity(width),
            zero: Tensor::<2>::zeros([batch, inputs], device).cast(dtype),
            current: None,
        }
    }

    /// `[batch, in]` zeros: the input outside the image.
    pub(super) fn zero(&self) -> &Tensor<2> {
        &self.zero
    }

    /// The inputs at the `half` columns left of `x`, zeros left of the image.
    pub(super) fn left_of(&self, x: usize, half: usize) -> Vec<Tensor<2>> {
        (x as isize - half as isize..x as isize)
            .map(|col| match usize::try_from(col) {
                Ok(c) => self.cols[c].clone(),
                Err(_) => self.zero.clone(),
            })
            .collect()
    }

    /// The input at the pixel being generated.
    pub(super) fn hold(&mut self, input: Tensor<2>) {
        self.current = Some(input);
    }

    /// The finished row's inputs, in column order; the row starts over empty.
    pub(super) fn take_row(&mut self) -> Vec<Tensor<2>> {
        std::mem::take(&mut self.cols)
    }
}

/// The pixel last stepped through is final, with these values (`[batch, colours]`, scaled): each
/// layer keeps its input at it. The first layer's input is the pixel itself, which the step saw
/// before its last sub-pixel was drawn; deeper layers never see that sub-pixel.
pub(super) fn commit<'a>(layers: impl IntoIterator<Item = &'a mut RowInputs>, pixel: Tensor<2>) {
    let mut first = Some(pixel);
    for layer in layers {
        if let Some(pixel) = first.take() {
            layer.current = Some(pixel);
        }
        let current = layer.current.take().expect("commit after step");
        layer.cols.push(current);
    }
}

/// The last `keep` finished input rows of a layer, each zero-padded by `half` columns on both
/// sides, and their concatenation (zero rows above the image), `[batch, in, keep, width + 2 half]`.
pub(super) struct RowsAbove {
    rows: VecDeque<Tensor<4>>,
    keep: usize,
    half: usize,
    zero_col: Tensor<4>,
    zero_row: Tensor<4>,
    stacked: Tensor<4>,
}

impl RowsAbove {
    pub(super) fn new(
        batch: usize,
        inputs: usize,
        width: usize,
        (keep, half): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Self {
        let zeros = |h: usize, w: usize| Tensor::<4>::zeros([batch, inputs, h, w], device);
        RowsAbove {
            rows: VecDeque::with_capacity(keep + 1),
            keep,
            half,
            zero_col: zeros(1, 1).cast(dtype),
            zero_row: zeros(1, width + 2 * half).cast(dtype),
            stacked: zeros(keep, width + 2 * half).cast(dtype),
        }
    }

    /// `[batch, in, keep, width + 2 half]`: the rows kept, oldest first.
    pub(super) fn stacked(&self) -> &Tensor<4> {
        &self.stacked
    }

    /// Row `row` (`[batch, in, 1, width]`) is final: it becomes the newest row kept.
    pub(super) fn push(&mut self, row: Tensor<4>) {
        if self.keep == 0 {
            return;
        }
        self.rows
            .push_back(pad_columns(row, self.half, &self.zero_col));
        if self.rows.len() > self.keep {
            self.rows.pop_front();
        }
        let missing = self.keep - self.rows.len();
        let rows: Vec<Tensor<4>> = std::iter::repeat_n(self.zero_row.clone(), missing)
            .chain(self.rows.iter().cloned())
            .collect();
        self.stacked = Tensor::cat(rows, 2);
    }
}

/// `[batch, in]` per column -> one row `[batch, in, 1, columns]`.
pub(super) fn row_of(cols: Vec<Tensor<2>>) -> Tensor<4> {
    let [batch, n] = cols[0].dims();
    let width = cols.len();
    Tensor::stack::<3>(cols, 2).reshape([batch, n, 1, width])
}

/// `[b, c, 1, w]` -> `[b, c, 1, w + 2 * half]` with zero columns on both sides.
fn pad_columns(row: Tensor<4>, half: usize, zero_col: &Tensor<4>) -> Tensor<4> {
    if half == 0 {
        return row;
    }
    let side = |n| std::iter::repeat_n(zero_col.clone(), n);
    Tensor::cat(side(half).chain([row]).chain(side(half)).collect(), 3)
}
