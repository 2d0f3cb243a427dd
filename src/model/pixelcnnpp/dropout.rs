//! PixelCNN++'s dropout masks: a counter-based hash computed on the device, the same bits on
//! every backend, whatever the batch split or the number of ranks. The masks of all the gated
//! resnets of one size are made together, in a few hashes over many masks rather than one hash
//! (some thirty tensor operations) per mask.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use std::collections::HashMap;

/// Where a training step's dropout masks come from: the masks of image `i` of the batch are a
/// hash of (`seed`, step `step`, image `first + i` of the global batch, the mask's place in the
/// network, the element), computed on the device. The masks of an image do not depend on how the
/// global batch is cut into batches (or over ranks), nor on the backend, and a resumed run draws
/// them again.
#[derive(Clone, Debug)]
pub struct DropoutDraws {
    pub seed: u64,
    pub step: u64,
    pub first: u64,
    /// On libtorch, the keys of the step's masks ([`DropoutDraws::keys`]) already on the device,
    /// written there before the step's work (f32 whose bits are the keys'); None: uploaded as
    /// the masks are made.
    pub staged: Option<Tensor<1>>,
}

impl DropoutDraws {
    /// The keys of the first `masks` masks, by place in the network: the step's stream
    /// (`rng::derive`) at each place.
    pub fn keys(&self, masks: usize) -> Vec<u32> {
        (0..masks as u64).map(|l| self.key(l)).collect()
    }

    /// The key of the mask at place `layer`.
    fn key(&self, layer: u64) -> u32 {
        crate::rng::derive(self.seed, crate::rng::Purpose::Dropout, self.step, layer) as u32
    }
}

/// At most this many hashes at once (on libtorch two 32-bit buffers of this length, 256 MiB; at
/// 8 bits per element four times as many mask elements): the masks of one size are made in as
/// many groups as that takes.
const HASHES_AT_ONCE: usize = 1 << 25;

/// Dropout in one forward pass: the next mask's place in the network, the batch's images, and
/// the masks made ahead of their layers.
pub(super) struct Dropout {
    p: f64,
    draws: DropoutDraws,
    layer: u64,
    /// Each size's layers (places in the network), in the order the forward pass asks for them.
    sizes: Vec<Vec<u64>>,
    ready: HashMap<u64, Tensor<4, Bool>>,
    /// At most this many hashes at once ([`HASHES_AT_ONCE`]; tests make it small).
    pub at_once: usize,
    /// The dims asked for, layer by layer, and the hashes made (what tests check).
    #[cfg(test)]
    pub asked: Vec<[usize; 4]>,
    #[cfg(test)]
    pub hashes: usize,
}

impl Dropout {
    /// Dropout with probability `p` in a network of `resnets` gated resnets per stage.
    pub fn new(p: f64, draws: DropoutDraws, resnets: usize) -> Dropout {
        Dropout {
            p,
            draws,
            layer: 0,
            sizes: layers_by_size(resnets as u64),
            ready: HashMap::new(),
            at_once: HASHES_AT_ONCE,
            #[cfg(test)]
            asked: Vec::new(),
            #[cfg(test)]
            hashes: 0,
        }
    }

    /// Dropout whose masks are made one at a time (what grouping must equal).
    #[cfg(test)]
    pub fn one_at_a_time(p: f64, draws: DropoutDraws) -> Dropout {
        Dropout {
            sizes: Vec::new(),
            ..Dropout::new(p, draws, 0)
        }
    }

    /// The mask of the elements that dropout keeps (it zeroes each with probability `p`), and
    /// their factor 1 / (1 - p) (no mask for p = 0). Each mask has its own key: the step's
    /// stream (`rng::derive`) at the mask's place in the network. The first mask asked for at a
    /// size brings those of the later layers of that size (if they have the same dims).
    pub fn mask(&mut self, dims: [usize; 4], device: &Device) -> (Option<Tensor<4, Bool>>, f64) {
        if self.p <= 0.0 {
            return (None, 1.0);
        }
        let layer = self.layer;
        self.layer += 1;
        #[cfg(test)]
        self.asked.push(dims);
        let keep = 1.0 / (1.0 - self.p);
        if let Some(mask) = self.ready.remove(&layer).filter(|m| m.dims() == dims) {
            return (Some(mask), keep);
        }
        let later: Vec<u64> = self
            .sizes
            .iter()
            .find(|layers| layers.contains(&layer))
            .map_or_else(Vec::new, |layers| {
                layers.iter().copied().filter(|&l| l >= layer).collect()
            });
        let layers = if later.is_empty() { vec![layer] } else { later };
        let per_mask = dims.iter().product::<usize>().max(1);
        let elements = self.at_once * (32 / bits_per_element(self.p)) as usize;
        for group in layers.chunks((elements / per_mask).max(1)) {
            #[cfg(test)]
            {
                self.hashes += 1;
            }
            let keys: Vec<u32> = group.iter().map(|&l| self.draws.key(l)).collect();
            let staged = self.draws.staged.as_ref().map(|all| places(all, group));
            let masks = dropout_masks(dims, self.draws.first, &keys, staged, self.p, device);
            for (k, &l) in group.iter().enumerate() {
                let mask = masks.clone().narrow(0, k, 1).reshape(dims);
                self.ready.insert(l, mask);
            }
        }
        (self.ready.remove(&layer), keep)
    }
}

/// The values of `all` at `places` (in a few runs of consecutive places: narrowed and joined on
/// the device).
fn places(all: &Tensor<1>, places: &[u64]) -> Tensor<1> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &p in places {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == p as usize => *len += 1,
            _ => runs.push((p as usize, 1)),
        }
    }
    let parts: Vec<Tensor<1>> = runs
        .into_iter()
        .map(|(start, len)| all.clone().narrow(0, start, len))
        .collect();
    if parts.len() == 1 {
        parts.into_iter().next().expect("one run")
    } else {
        Tensor::cat(parts, 0)
    }
}

/// The places of the masks at each of the three sizes of a PixelCNN++ with `r` gated resnets
/// per stage, as its forward pass asks for them (two per block, `u`'s then `ul`'s): the up
/// pass's stages at sizes 0, 1, 2 (2r each), then the down pass's at 2 (2r), 1 and 0
/// (2(r + 1) each).
pub(super) fn layers_by_size(r: u64) -> Vec<Vec<u64>> {
    let up = |s: u64| 2 * r * s..2 * r * (s + 1);
    let down = [6 * r..8 * r, 8 * r..10 * r + 2, 10 * r + 2..12 * r + 4];
    (0..3)
        .map(|s| up(s).chain(down[2 - s as usize].clone()).collect())
        .collect()
}

/// The low 32 bits.
const LOW32: i64 = 0xFFFF_FFFF;

/// A 32-bit integer hash (xor-shift-multiply, as in Wang's and MurmurHash's finalisers) of values
/// in 0..2^32 held in i64, in tensor operations: every product stays below 2^63 (multipliers
/// below 2^31), so i64 arithmetic gives the same bits on every backend, CPU or GPU.
fn hash32<const D: usize>(x: Tensor<D, Int>) -> Tensor<D, Int> {
    let x = x.clone().bitwise_xor(x.bitwise_right_shift_scalar(16));
    let x = x.mul_scalar(0x7FEB_352D).bitwise_and_scalar(LOW32);
    let x = x.clone().bitwise_xor(x.bitwise_right_shift_scalar(15));
    let x = x.mul_scalar(0x5BD1_E995).bitwise_and_scalar(LOW32);
    x.clone().bitwise_xor(x.bitwise_right_shift_scalar(16))
}

/// How many bits of a hash decide each element whether it is dropped: 8 where `p` is a multiple
/// of 1/256 (0.5 among them: four elements per hash), 16 where it is one of 2^-16 (two), else 32
/// (one). Fewer bits, fewer hashes: the same probability `p` exactly, for a quarter of the work.
pub(super) fn bits_per_element(p: f64) -> u32 {
    if (p * 256.0).fract() == 0.0 {
        8
    } else if (p * 65536.0).fract() == 0.0 {
        16
    } else {
        32
    }
}

/// The dropout masks of `dims` for the images `first..first + b` of the global batch, one per
/// layer key in `keys`. With `bits` = [`bits_per_element`]`(p)` and `w = 32 / bits` elements per
/// hash, element `e` of image `i` is dropped under key `k` when bits `bits * (e mod w)` on of
/// `hash32(((e / w) * 0x61C88647 + hash32(image ^ k)) mod 2^32)`, as a number below `2^bits`, are
/// below `p * 2^bits`; the masks say which elements are kept (the others), what the product
/// takes. Made on `device` from `arange`s and the keys; on libtorch by the same hash
/// in 32-bit integers whose bytes are read in place (`native::dropout_masks`, the same bits),
/// from `staged` where the keys are on the device already (f32 whose bits are `keys`).
///
/// # Shapes
/// - returns: `[keys, b, c, h, w]`
pub(super) fn dropout_masks(
    dims: [usize; 4],
    first: u64,
    keys: &[u32],
    staged: Option<Tensor<1>>,
    p: f64,
    device: &Device,
) -> Tensor<5, Bool> {
    let [b, c, h, w] = dims;
    let (n, m) = (c * h * w, keys.len());
    debug_assert!(first + (b as u64) < 1 << 32 && (n as u64) < 1 << 31);
    let bits = bits_per_element(p);
    let threshold = (p * 2f64.powi(bits as i32)) as i64;
    let images = Tensor::<1, Int>::arange(
        first as i64..(first + b as u64) as i64,
        (device, DType::I64),
    );
    if crate::model::native::runs_fused(device) {
        let keys = staged.unwrap_or_else(|| {
            let bits: Vec<f32> = keys.iter().map(|&k| f32::from_bits(k)).collect();
            Tensor::from_data(TensorData::new(bits, [m]), device)
        });
        return crate::model::native::dropout_masks(images, keys, n, bits, threshold)
            .reshape([m, b, c, h, w]);
    }
    let per_hash = (32 / bits) as usize;
    let hashes = n.div_ceil(per_hash);
    let keys: Vec<i64> = keys.iter().map(|&k| i64::from(k)).collect();
    let keys = Tensor::<1, Int>::from_data(TensorData::new(keys, [m]), (device, DType::I64));
    let keys = hash32(images.reshape([1, b]).bitwise_xor(keys.reshape([m, 1]))).reshape([m, b, 1]);
    let counters = Tensor::<1, Int>::arange(0..hashes as i64, (device, DType::I64));
    let counters = counters.reshape([1, 1, hashes]).mul_scalar(0x61C8_8647);
    let hashed = hash32((counters + keys).bitwise_and_scalar(LOW32));
    let parts = if per_hash == 1 {
        hashed
    } else {
        let shifts = Tensor::<1, Int>::arange_step(0..32, bits as usize, (device, DType::I64));
        hashed
            .reshape([m, b, hashes, 1])
            .bitwise_right_shift(shifts.reshape([1, 1, 1, per_hash]))
            .bitwise_and_scalar((1i64 << bits) - 1)
            .reshape([m, b, hashes * per_hash])
            .narrow(2, 0, n)
    };
    parts.greater_equal_elem(threshold).reshape([m, b, c, h, w])
}
