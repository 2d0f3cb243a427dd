//! A regression run of every model variant and likelihood on near-binary images: sub-pixels only 0
//! or 255, grey (R = G = B for RGB), strongly predictable, at PixelCNN++'s learning rate. Such data
//! once froze PixelCNN++ at its output ELU (NaN gradients, skipped in silence): each run here must
//! stay finite (a gradient that is not would stop it with an error), learn, and still be moving at
//! its last steps.

use burn::tensor::Device;
use pixel_models::cluster::World;
use pixel_models::data::Images;
use pixel_models::experiment::{Plan, parse};
use pixel_models::train::{Epoch, PassStats, TrainState, train_epoch};
use std::path::Path;

/// `n` images of `colours` x 8 x 8: a white rectangle (255) on black (0), every colour alike.
fn binary_images(n: usize, colours: usize) -> Images {
    let s = 8;
    let mut pixels = vec![0u8; n * colours * s * s];
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        // A deterministic spread of rectangles: corners from the image's index.
        let (y0, x0) = ((i * 3) % 5, (i * 7) % 5);
        let (y1, x1) = (y0 + 2 + i % 3, x0 + 2 + (i / 3) % 3);
        for c in 0..colours {
            for y in y0..y1.min(s) {
                for x in x0..x1.min(s) {
                    pixels[((i * colours + c) * s + y) * s + x] = 255;
                }
            }
        }
        labels.push((i % 10) as u8);
    }
    Images {
        pixels,
        labels,
        colours,
        height: s,
        width: s,
    }
}

/// Trains the experiment `model` (a TOML `[model]` body) for `epochs` of 4 steps on 64 binary
/// images, on flex; returns each step's bits/dim and gradient norm.
fn train(model: &str, colours: usize, epochs: usize) -> Vec<(f64, f64)> {
    let text = format!(
        "[model]\n{model}\n[data]\ndataset = \"synthetic\"\nsynthetic_size = 8\n\
         synthetic_colours = {colours}\n[train]\nbatch_size = 16\nlearning_rate = 0.002\n\
         adam_betas = [0.95, 0.9995]\n[runtime]\nbackend = \"flex\"\n"
    );
    let path = Path::new("regression.toml");
    let (experiment, sets) = parse(&text, path, &[]).expect("a valid experiment");
    let plan = Plan::new(experiment, sets, path, None).expect("a valid plan");
    let device = Device::flex().autodiff();
    let images = binary_images(64, colours);
    let order: Vec<usize> = (0..images.len()).collect();
    let world = World::single();
    let mut state = TrainState {
        model: plan.init_model(&device),
        optimizer: plan.optimizer(),
        loss_scale: None,
        ema: None,
        inputs: Default::default(),
    };
    let mut steps = Vec::new();
    for epoch in 1..=epochs {
        let work = Epoch {
            images: &images,
            order: &order,
            step: plan.step(epoch),
            device: &device,
            start_step: 0,
            so_far: PassStats::default(),
            stop: &|| false,
            world: &world,
        };
        let (next, _, _) = train_epoch(state, work, |r| {
            steps.push((r.bits_per_dim, r.gradient_norm))
        })
        .unwrap_or_else(|e| panic!("{model}: epoch {epoch}, {e}"));
        state = next;
    }
    steps
}

fn mean(v: &[(f64, f64)]) -> f64 {
    v.iter().map(|s| s.0).sum::<f64>() / v.len() as f64
}

/// Every variant and likelihood: finite, learning, and not frozen at the end.
#[test]
fn every_variant_keeps_learning_on_binary_images() {
    let gated = "layers = 3\nkernel = 3\nchannels = 12";
    let pp =
        "variant = \"pixelcnnpp\"\nchannels = 8\n[model.pixelcnnpp]\nresnets = 1\ndropout = 0.0";
    let cases: Vec<(String, usize)> = vec![
        (format!("variant = \"simple\"\n{gated}"), 1),
        (format!("variant = \"gated\"\n{gated}"), 3),
        (
            format!("variant = \"gated\"\nconditional = \"class\"\n{gated}"),
            1,
        ),
        (
            format!(
                "variant = \"gated\"\n{gated}\nlikelihood = \"logistic_mixture\"\nmixtures = 2"
            ),
            1,
        ),
        (
            format!(
                "variant = \"vae\"\n{gated}\n[model.vae]\nlatent_channels = 2\ndownsample = 1\n\
                 hidden = 8\nmaps = 4"
            ),
            1,
        ),
        (format!("likelihood = \"categorical\"\n{pp}"), 3),
        (
            format!("likelihood = \"logistic_mixture\"\nmixtures = 2\n{pp}"),
            1,
        ),
        (
            format!("likelihood = \"logistic_mixture\"\nmixtures = 2\n{pp}"),
            3,
        ),
    ];
    for (model, colours) in cases {
        let steps = train(&model, colours, 50);
        let (first, last) = (mean(&steps[..8]), mean(&steps[steps.len() - 8..]));
        let what = format!("{model} ({colours} colours)");
        eprintln!(
            "{}: {first:.3} -> {last:.3} bits/dim",
            what.replace('\n', " ")
        );
        assert!(
            last < 0.5 * first,
            "{what} does not learn: {first} -> {last}"
        );
        let tail = &steps[steps.len() - 20..];
        assert!(
            tail.iter().all(|s| s.1 > 1e-6) && tail.windows(2).any(|w| w[0].0 != w[1].0),
            "{what} froze: {tail:?}"
        );
    }
}
