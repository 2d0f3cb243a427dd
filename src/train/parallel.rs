//! Passes over the ranks of a [`World`] outside the training step (which agrees with the other
//! ranks itself, in `step.rs`): evaluation sharded over the ranks, and a checksum of the weights
//! that says whether every rank holds the same.

use super::{PassStats, evaluate, evaluate_range};
use crate::cluster::World;
use crate::data::Images;
use crate::model::Model;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use sha2::{Digest, Sha256};

/// Evaluates `images` sharded over the ranks (each its contiguous share, with every image's
/// noise from its own index) and sums the totals: the same numbers on every rank, and up to
/// float summation the same as one process.
pub fn evaluate_sharded(
    label: &str,
    model: &Model,
    images: &Images,
    batch_size: usize,
    seed: u64,
    device: &Device,
    world: &World,
) -> PassStats {
    if world.size() == 1 {
        return evaluate(label, model, images, batch_size, seed, device);
    }
    let share = world.share(images.len());
    let local = evaluate_range(label, model, images, share, batch_size, seed, device);
    let mut sums = [
        local.nats,
        local.subpixels as f64,
        local.images as f64,
        local.kl_nats.unwrap_or(0.0),
        f64::from(u8::from(local.kl_nats.is_some())),
    ];
    world.sum_f64(&mut sums);
    let seconds = world.gather_u64(local.seconds.to_bits());
    PassStats {
        nats: sums[0],
        subpixels: sums[1] as u64,
        images: sums[2] as usize,
        seconds: seconds.into_iter().map(f64::from_bits).fold(0.0, f64::max),
        kl_nats: (sums[4] > 0.0).then_some(sums[3]),
        kl_weight: None,
        ..PassStats::default()
    }
}

/// A checksum of every float parameter's value (their f32 bits, in visiting order): equal on
/// every rank when the ranks hold the same weights.
pub fn weights_checksum(model: &Model) -> u64 {
    struct Hash(Sha256);
    impl ModuleVisitor for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values: Vec<f32> = param
                .val()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32 weights");
            for v in values {
                self.0.update(v.to_bits().to_le_bytes());
            }
        }
    }
    let mut hash = Hash(Sha256::new());
    model.visit(&mut hash);
    let digest = hash.0.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}
