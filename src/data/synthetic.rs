//! Small generated images for tests and smoke runs: a bright rectangle on a dark background,
//! with a few grey levels, so that a model has something to learn in a few steps.

use super::{Images, Splits};
use crate::rng::{self, Purpose};
use rand::RngExt;
use rand::rngs::StdRng;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spec {
    pub size: usize,
    pub colours: usize,
    pub train_images: usize,
}

pub fn generate(spec: &Spec, seed: u64) -> Splits {
    let test = (spec.train_images / 4).max(1);
    Splits {
        train: images(
            spec,
            spec.train_images,
            rng::stream(seed, Purpose::Synthetic, 0, 0),
        ),
        test: images(spec, test, rng::stream(seed, Purpose::Synthetic, 0, 1)),
        validation: None,
    }
}

fn images(spec: &Spec, n: usize, mut rng: StdRng) -> Images {
    let s = spec.size;
    let mut pixels = vec![0u8; n * spec.colours * s * s];
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label: u8 = rng.random_range(0..10);
        let (y0, x0) = (rng.random_range(0..s), rng.random_range(0..s));
        let (y1, x1) = (rng.random_range(y0..s) + 1, rng.random_range(x0..s) + 1);
        let img = &mut pixels[i * spec.colours * s * s..(i + 1) * spec.colours * s * s];
        for c in 0..spec.colours {
            let level = [64u8, 128, 192, 255][(label as usize + c) % 4];
            for y in y0..y1 {
                img[(c * s + y) * s + x0..(c * s + y) * s + x1].fill(level);
            }
        }
        labels.push(label);
    }
    Images {
        pixels,
        labels,
        colours: spec.colours,
        height: s,
        width: s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_shapes() {
        let spec = Spec {
            size: 6,
            colours: 3,
            train_images: 20,
        };
        let a = generate(&spec, 3);
        assert_eq!(a.train.pixels, generate(&spec, 3).train.pixels);
        assert_eq!((a.train.len(), a.test.len()), (20, 5));
        assert_eq!(a.train.pixels.len(), 20 * 3 * 36);
        assert!(a.train.pixels.iter().any(|&p| p > 0));
    }
}
