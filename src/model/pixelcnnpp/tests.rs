//! PixelCNN++: shapes, exact per-pixel causality, dropout masks (seeded, hashed, split-independent),
//! the parameter count, class conditioning.

use super::*;
use rand::SeedableRng;

fn config(colours: usize, resnets: usize) -> PixelCnnPpConfig {
    PixelCnnPpConfig {
        colours,
        filters: 6,
        resnets,
        likelihood: Likelihood::LogisticMixture { components: 2 },
        classes: None,
        dropout: 0.0,
    }
}

/// Output shapes for even and odd sizes, grey and RGB (28 halves to 14 and 7; 7 to 4 and 2).
#[test]
fn any_image_size_gives_one_set_of_parameters_per_pixel() {
    let device = Device::flex();
    for (colours, h, w) in [(1, 28, 28), (3, 8, 8), (1, 7, 5), (3, 3, 4)] {
        let cfg = config(colours, 1);
        let net = cfg.init(&mut StdRng::seed_from_u64(1), &device);
        let x = Tensor::<4>::zeros([2, colours, h, w], &device);
        let out = net.forward(x, None, None);
        assert_eq!(out.dims(), [2, cfg.output_channels(), h, w]);
    }
    assert_eq!(config(1, 1).output_channels(), 2 * 3);
    assert_eq!(config(3, 1).output_channels(), 2 * 10);
}

/// For every output pixel, the input pixels (any colour) whose gradient is nonzero at one of
/// a few random images.
fn pixel_dependencies(
    net: &PixelCnnPp,
    colours: usize,
    h: usize,
    w: usize,
    device: &Device,
) -> Vec<Vec<usize>> {
    let mut deps = vec![Vec::new(); h * w];
    for seed in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..colours * h * w)
            .map(|_| f32::from(rng.random::<u8>()))
            .collect();
        for (p, found) in deps.iter_mut().enumerate() {
            let x =
                Tensor::<4>::from_data(TensorData::new(values.clone(), [1, colours, h, w]), device)
                    .require_grad();
            let out = net.forward(x.clone(), None, None);
            let (y, xx) = (p / w, p % w);
            let grads = out.narrow(2, y, 1).narrow(3, xx, 1).sum().backward();
            let g: Vec<f32> = x
                .grad(&grads)
                .map(|g| g.into_data().convert::<f32>().try_into_vec().unwrap())
                .unwrap_or_else(|| vec![0.0; values.len()]);
            crate::model::causality::assert_finite_gradient(&g, p);
            for c in 0..colours {
                for q in 0..h * w {
                    if g[c * h * w + q] != 0.0 {
                        found.push(q);
                    }
                }
            }
        }
    }
    for d in &mut deps {
        d.sort_unstable();
        d.dedup();
    }
    deps
}

/// Exact causality per pixel: the parameters at a pixel depend on no sub-pixel of it or after
/// it, and (the network being deep enough for the image) on every pixel before it. Grey and
/// RGB, on every backend compiled in.
#[test]
fn each_pixel_depends_on_exactly_the_pixels_before_it() {
    for device in crate::device::test_devices() {
        let device = device.autodiff();
        for (colours, h, w) in [(1, 6, 6), (3, 5, 4)] {
            let cfg = config(colours, 2);
            let net = cfg.init(&mut StdRng::seed_from_u64(3), &device);
            let deps = pixel_dependencies(&net, colours, h, w, &device);
            for (p, d) in deps.iter().enumerate() {
                let before: Vec<usize> = (0..p).collect();
                assert_eq!(d, &before, "pixel {p} of {h}x{w}, {colours} colours");
            }
        }
    }
}

/// Dropout changes the output in training, the same way for the same generator; without a
/// generator (evaluation) there is none.
#[test]
fn dropout_only_in_training_and_seeded() {
    let device = Device::flex();
    let cfg = PixelCnnPpConfig {
        dropout: 0.5,
        ..config(1, 1)
    };
    let net = cfg.init(&mut StdRng::seed_from_u64(1), &device);
    let x = Tensor::<4>::from_data(
        TensorData::new((0..64).map(|i| (i * 4) as f32).collect(), [1, 1, 8, 8]),
        &device,
    );
    let values =
        |t: Tensor<4>| -> Vec<f32> { t.into_data().convert::<f32>().try_into_vec().unwrap() };
    let draws = |step, first| {
        Some(DropoutDraws {
            seed: 1,
            step,
            first,
            staged: None,
        })
    };
    let eval = values(net.forward(x.clone(), None, None));
    assert_eq!(eval, values(net.forward(x.clone(), None, None)));
    let a = values(net.forward(x.clone(), None, draws(5, 0)));
    let b = values(net.forward(x.clone(), None, draws(5, 0)));
    let c = values(net.forward(x.clone(), None, draws(6, 0)));
    let d = values(net.forward(x, None, draws(5, 1)));
    assert_eq!(a, b);
    assert_ne!(a, eval);
    assert_ne!(a, c, "another step, other masks");
    assert_ne!(a, d, "another image, other masks");
}

/// The device's masks are the hash written with plain u32 wrapping arithmetic, bit for bit,
/// on every backend (libtorch's in 32-bit integers, flex's in 64-bit), at friendly and extreme
/// values: keys and image numbers with the top bit set, near 2^32, probabilities near 0 and 1,
/// each number of bits per element (8: multiples of 1/256; 16: of 2^-16; 32), element counts
/// that do not fill the last hash, masks longer than any vector width; about p of the elements
/// are dropped (the masks say which are kept), independently of each other.
#[test]
fn dropout_masks_are_the_hash_on_every_backend() {
    fn hash(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7FEB_352D);
        x ^= x >> 15;
        x = x.wrapping_mul(0x5BD1_E995);
        x ^ (x >> 16)
    }
    let cases = [
        ([3, 4, 5, 6], 7u64, 0xDEAD_BEEFu32, 0.3, 32),
        ([2, 3, 7, 9], (1 << 32) - 3, u32::MAX, 0.999_999, 32),
        ([4, 1, 1, 13], 0, 0x8000_0000, 1e-9, 32),
        ([1, 8, 33, 35], 1 << 31, 12_345, 0.5, 8),
        ([2, 1, 3, 7], 5, 0xFFFF_FFFE, 0.25, 8),
        ([2, 3, 1, 3], 1, 77, 255.0 / 256.0, 8),
        ([3, 1, 5, 5], 9, 0x7FFF_FFFF, 1.0 / 256.0, 8),
        ([2, 1, 3, 5], 2, 4_242, 12_345.0 / 65_536.0, 16),
        ([2, 1, 1, 7], 3, 0x8000_0001, 65_535.0 / 65_536.0, 16),
    ];
    for (dims, first, key, p, bits) in cases {
        assert_eq!(dropout::bits_per_element(p), bits, "{p}");
        let n = (dims[1] * dims[2] * dims[3]) as u32;
        let per_hash = 32 / bits;
        let threshold = (p * 2f64.powi(bits as i32)) as u64;
        // Several masks at once, each its key's.
        let keys = [key, key ^ 0x5555_5555, 0];
        let expected: Vec<bool> = keys
            .iter()
            .flat_map(|&key| {
                (0..dims[0] as u32).flat_map(move |i| {
                    let image = hash((first as u32).wrapping_add(i) ^ key);
                    (0..n).map(move |e| {
                        let h = hash((e / per_hash).wrapping_mul(0x61C8_8647).wrapping_add(image));
                        let part = u64::from(h) >> (bits * (e % per_hash)) & ((1u64 << bits) - 1);
                        part >= threshold
                    })
                })
            })
            .collect();
        for device in crate::device::test_devices() {
            let masks = dropout::dropout_masks(dims, first, &keys, None, p, &device);
            assert_eq!(masks.dims()[..2], [3, dims[0]]);
            let masks: Vec<bool> = masks.into_data().convert::<bool>().try_into_vec().unwrap();
            assert_eq!(masks, expected, "{device:?} {dims:?} {first} {key} {p}");
        }
    }
    // The fraction, and the independence of neighbours (within a hash and across hashes) and of
    // images, over large masks of each number of bits per element.
    let device = Device::flex();
    for p in [0.5, 0.25, 19_661.0 / 65_536.0, 0.3] {
        let big: Vec<bool> = dropout::dropout_masks([4, 16, 32, 32], 0, &[1], None, p, &device)
            .into_data()
            .convert::<bool>()
            .try_into_vec()
            .unwrap();
        let fraction = big.iter().filter(|&&kept| !kept).count() as f64 / big.len() as f64;
        assert!((fraction - p).abs() < 0.01, "{p}: {fraction}");
        for lag in 1..=4 {
            let both = big.windows(lag + 1).filter(|w| !w[0] && !w[lag]).count() as f64;
            let both = both / big.len() as f64;
            assert!(
                (both - p * p).abs() < 0.01,
                "{p}: neighbours {lag} apart dropped together: {both}"
            );
        }
        let per_image = big.len() / 4;
        let same = (0..per_image)
            .filter(|&e| big[e] == big[per_image + e])
            .count() as f64;
        let expected = p * p + (1.0 - p) * (1.0 - p);
        assert!(
            (same / per_image as f64 - expected).abs() < 0.02,
            "{p}: images agree: {same}"
        );
    }
}

/// The masks made together, a few hashes per size, are each layer's own, on every backend: the
/// output is the one of masks made one at a time, bit for bit, with one hash per size, and with
/// the hashes cut into groups of a few masks; the sizes' layers are the layers the forward pass
/// asks for at each size (odd sizes: 9x7 halves to 5x4 and 3x2).
#[test]
fn masks_made_together_are_each_layers_own() {
    let draws = DropoutDraws {
        seed: 11,
        step: 3,
        first: 5,
        staged: None,
    };
    for device in crate::device::test_devices() {
        for r in [1, 2] {
            let cfg = PixelCnnPpConfig {
                dropout: 0.5,
                ..config(3, r)
            };
            let net = cfg.init(&mut StdRng::seed_from_u64(2), &device);
            let pixels: Vec<f32> = (0..2 * 3 * 63).map(|i| ((i * 37) % 256) as f32).collect();
            let x = Tensor::<4>::from_data(TensorData::new(pixels, [2, 3, 9, 7]), &device);
            let run = |dropout: dropout::Dropout| {
                let mut dropout = Some(dropout);
                let out = net.forward_with(x.clone(), None, &mut dropout);
                let out: Vec<f32> = out.into_data().convert::<f32>().try_into_vec().unwrap();
                (out, dropout.unwrap())
            };
            let (alone, one) = run(dropout::Dropout::one_at_a_time(0.5, draws.clone()));
            let (together, all) = run(dropout::Dropout::new(0.5, draws.clone(), r));
            let mut few = dropout::Dropout::new(0.5, draws.clone(), r);
            few.at_once = 2 * 2 * 12 * 9 * 7 / 4; // two masks of the largest size
            let (grouped, some) = run(few);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&together), bits(&alone), "{device:?} r={r}");
            assert_eq!(bits(&grouped), bits(&alone), "{device:?} r={r}");
            if crate::model::native::runs_fused(&device) {
                // The keys already on the device (as a training step writes them), cut into
                // groups that span the two runs of a size's places: the same masks.
                let keys: Vec<f32> = draws
                    .keys(12 * r + 4)
                    .into_iter()
                    .map(f32::from_bits)
                    .collect();
                let staged = DropoutDraws {
                    staged: Some(Tensor::from_data(
                        TensorData::new(keys, [12 * r + 4]),
                        &device,
                    )),
                    ..draws.clone()
                };
                let mut few = dropout::Dropout::new(0.5, staged.clone(), r);
                few.at_once = 3 * 2 * 12 * 9 * 7 / 4; // three masks: [0, 1, 12] when r = 1
                let (from_device, _) = run(few);
                assert_eq!(bits(&from_device), bits(&alone), "{device:?} r={r}");
                let (from_device, _) = run(dropout::Dropout::new(0.5, staged, r));
                assert_eq!(bits(&from_device), bits(&alone), "{device:?} r={r}");
            }
            assert_eq!(one.hashes, 12 * r + 4);
            assert_eq!(all.hashes, 3, "one hash per size");
            assert!(
                some.hashes > 3 && some.hashes < one.hashes,
                "{}",
                some.hashes
            );
            // Each size's layers ask for one shape, each size its own.
            let sizes = dropout::layers_by_size(r as u64);
            assert_eq!(sizes.iter().map(Vec::len).sum::<usize>(), all.asked.len());
            let shapes: Vec<[usize; 4]> = sizes
                .iter()
                .map(|layers| {
                    let first = all.asked[layers[0] as usize];
                    assert!(layers.iter().all(|&l| all.asked[l as usize] == first));
                    first
                })
                .collect();
            assert_eq!(shapes, [[2, 12, 9, 7], [2, 12, 5, 4], [2, 12, 3, 2]]);
        }
    }
}

/// An image's masks are its own: a batch of two gives each image what it gets alone with its
/// place in the global batch (how ranks will split a batch).
#[test]
fn dropout_masks_do_not_depend_on_the_batch_split() {
    let device = Device::flex();
    let cfg = PixelCnnPpConfig {
        dropout: 0.5,
        ..config(1, 1)
    };
    let net = cfg.init(&mut StdRng::seed_from_u64(1), &device);
    let pixels: Vec<f32> = (0..72).map(|i| ((i * 37) % 256) as f32).collect();
    let both = Tensor::<4>::from_data(TensorData::new(pixels.clone(), [2, 1, 6, 6]), &device);
    let draws = |first| {
        Some(DropoutDraws {
            seed: 3,
            step: 7,
            first,
            staged: None,
        })
    };
    let values =
        |t: Tensor<4>| -> Vec<f32> { t.into_data().convert::<f32>().try_into_vec().unwrap() };
    let together = values(net.forward(both, None, draws(0)));
    let mut apart = Vec::new();
    for i in 0..2 {
        let one = Tensor::<4>::from_data(
            TensorData::new(pixels[i * 36..(i + 1) * 36].to_vec(), [1, 1, 6, 6]),
            &device,
        );
        apart.extend(values(net.forward(one, None, draws(i as u64))));
    }
    for (t, a) in together.iter().zip(&apart) {
        assert!((t - a).abs() < 1e-5, "{t} vs {a}");
    }
}

/// The count from the layout is the built network's, with and without classes.
#[test]
fn parameters_are_counted_exactly() {
    let device = Device::flex();
    for cfg in [
        config(1, 1),
        config(3, 2),
        PixelCnnPpConfig {
            classes: Some(10),
            filters: 5,
            ..config(3, 1)
        },
    ] {
        let net = cfg.init(&mut StdRng::seed_from_u64(1), &device);
        assert_eq!(net.num_params(), cfg.parameters() as usize, "{cfg:?}");
    }
    // openai/pixel-cnn's CIFAR-10 network (160 filters, 5 resnets, 10 mixtures): 53.6 M
    // (the same layout; its weight norm adds one scale per output channel).
    let paper = PixelCnnPpConfig {
        colours: 3,
        filters: 160,
        resnets: 5,
        likelihood: Likelihood::LogisticMixture { components: 10 },
        classes: None,
        dropout: 0.5,
    };
    assert_eq!(paper.parameters(), 53_618_660);
    // The PyTorch twin prints the same counts (CI checks the first):
    // `python3 bench/pytorch_pixelcnnpp.py --params --colours 1 --filters 6 --resnets 1
    // --mixtures 2` prints 20622.
    assert_eq!(config(1, 1).parameters(), 20_622);
}

/// A class-conditional network's output depends on the label.
#[test]
fn the_label_changes_the_output() {
    let device = Device::flex();
    let cfg = PixelCnnPpConfig {
        classes: Some(10),
        ..config(1, 1)
    };
    let net = cfg.init(&mut StdRng::seed_from_u64(2), &device);
    let x = Tensor::<4>::zeros([1, 1, 6, 6], &device);
    let one_hot = |k: usize| {
        let mut v = vec![0.0f32; 10];
        v[k] = 1.0;
        Tensor::<2>::from_data(TensorData::new(v, [1, 10]), &device)
    };
    let a: Vec<f32> = net
        .forward(x.clone(), Some(&one_hot(3)), None)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let b: Vec<f32> = net
        .forward(x, Some(&one_hot(4)), None)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    assert_ne!(a, b);
}
