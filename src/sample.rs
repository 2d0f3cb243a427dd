//! Autoregressive sampling in raster order, R -> G -> B within a pixel, and completion of images
//! whose first rows are given. Random draws come from the run's seeded generator on the host, so the
//! same seed gives the same samples on every backend (up to float differences in the logits).

use crate::data::Images;
use crate::model::{Context, Model};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand::rngs::StdRng;

/// Draws one value from `softmax(logits / temperature)` by inverting the CDF at a uniform draw.
pub fn draw(logits: &[f32], temperature: f64, rng: &mut StdRng) -> u8 {
    let t = temperature.max(1e-6);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(max)) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (v, w) in weights.iter().enumerate() {
        if u < *w {
            return v as u8;
        }
        u -= w;
    }
    // Rounding left u just above the total: the last value with nonzero weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u8
}

/// Fills rows `from_row..` of every image in `canvas`, one sub-pixel at a time.
///
/// Each step runs the model only on the rows the next sub-pixel can depend on (`context_rows`
/// above it and its own row), which gives exactly the logits of a full forward pass: the model is
/// causal, so rows below cannot matter and rows further up are out of its receptive field.
pub fn fill(
    model: &Model,
    canvas: &mut Images,
    from_row: usize,
    context_rows: usize,
    temperature: f64,
    rng: &mut StdRng,
    device: &Device,
) {
    let (n, c, h, w) = (canvas.len(), canvas.colours, canvas.height, canvas.width);
    if n == 0 {
        return;
    }
    let context = Context::from_labels(&canvas.labels, device);
    for y in from_row..h {
        let top = y.saturating_sub(context_rows);
        let rows = y + 1 - top;
        for x in 0..w {
            for colour in 0..c {
                let window = window(canvas, top, rows);
                let input =
                    Tensor::<4>::from_data(TensorData::new(window, [n, c, rows, w]), device);
                let logits = model
                    .forward(input, &context) // [n, c, 256, rows, w]
                    .slice([0..n, colour..colour + 1, 0..256, rows - 1..rows, x..x + 1])
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32 logits"); // [n * 256]
                for (i, l) in logits.chunks(256).enumerate() {
                    let v = draw(l, temperature, rng);
                    canvas.pixels[((i * c + colour) * h + y) * w + x] = v;
                }
            }
        }
    }
}

/// Rows `top..top + rows` of every image, as floats `[n, c, rows, w]`.
fn window(canvas: &Images, top: usize, rows: usize) -> Vec<f32> {
    let (c, h, w) = (canvas.colours, canvas.height, canvas.width);
    let mut out = Vec::with_capacity(canvas.len() * c * rows * w);
    for i in 0..canvas.len() {
        for colour in 0..c {
            let start = ((i * c + colour) * h + top) * w;
            out.extend(
                canvas.pixels[start..start + rows * w]
                    .iter()
                    .map(|&p| f32::from(p)),
            );
        }
    }
    out
}

/// The seed's sample grid, `grid x grid` cells in row-major order: the top half is generated from
/// scratch, with label `q mod 10` in column `q` (what a class-conditional model is asked to draw;
/// other models ignore it); in the bottom half column `q` holds `grid / 2` completions of test image `q`, each
/// given the image's top half. Returns `[grid * grid, colours, h, w]` bytes.
#[allow(clippy::too_many_arguments)]
pub fn grid(
    model: &Model,
    test: &Images,
    grid: usize,
    context_rows: usize,
    temperature: f64,
    rng: &mut StdRng,
    device: &Device,
) -> Vec<u8> {
    let (c, h, w) = (test.colours, test.height, test.width);
    let half = grid / 2;
    let dims = c * h * w;
    let mut scratch = Images {
        pixels: vec![0; half * grid * dims],
        labels: (0..half * grid).map(|i| ((i % grid) % 10) as u8).collect(),
        colours: c,
        height: h,
        width: w,
    };
    fill(
        model,
        &mut scratch,
        0,
        context_rows,
        temperature,
        rng,
        device,
    );

    // Completions, ordered as the grid's cells: row r of the bottom half, column q.
    let indices: Vec<usize> = (0..half * grid)
        .map(|cell| (cell % grid) % test.len())
        .collect();
    let (pixels, labels) = test.gather(&indices);
    let mut completions = Images {
        pixels,
        labels,
        colours: c,
        height: h,
        width: w,
    };
    fill(
        model,
        &mut completions,
        h / 2,
        context_rows,
        temperature,
        rng,
        device,
    );

    let mut cells = scratch.pixels;
    cells.extend(completions.pixels);
    cells
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn draw_follows_the_distribution_and_temperature() {
        let mut rng = StdRng::seed_from_u64(0);
        let mut logits = vec![f32::NEG_INFINITY; 256];
        logits[3] = 0.0;
        logits[200] = (3.0f32).ln(); // p = 0.75
        let n = 4000;
        let hits = (0..n)
            .filter(|_| draw(&logits, 1.0, &mut rng) == 200)
            .count();
        let p = hits as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.03, "{p}");
        // Very low temperature: always the mode.
        assert!((0..100).all(|_| draw(&logits, 1e-3, &mut rng) == 200));
    }
}
