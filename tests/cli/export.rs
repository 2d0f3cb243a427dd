//! `pixel export`: a trained run's weights as safetensors, and its test images with pixel's
//! log-likelihood of each factor. (bench/check-twins.sh checks the numbers against the PyTorch
//! twins in CI.)

use super::*;
use safetensors::SafeTensors;

/// The header text and the data of a `.npy` file.
fn npy(path: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len])
        .unwrap()
        .to_string();
    (header, bytes[10 + len..].to_vec())
}

fn metadata(path: &Path, key: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().as_ref().unwrap()[key].clone()
}

/// The trained weights and the average in two files, with the model and the experiment as
/// metadata; the test images, labels and log-probabilities whose sum is `pixel eval`'s number.
#[test]
fn export_writes_the_weights_the_average_and_the_test_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("tiny.toml"),
        TINY.replace("[train]\n", "[train]\nema = 0.9\n"),
    )
    .unwrap();
    let out = pixel(d, &["run", "tiny.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["eval", "results/tiny"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["export", "results/tiny", "--test-images", "all"]);
    assert!(out.status.success(), "{}", text(&out));
    let run = d.join("results/tiny");
    let (trained, average) = (
        run.join("model.safetensors"),
        run.join("model-ema.safetensors"),
    );
    assert_eq!(metadata(&trained, "pixel.weights"), "trained");
    assert_eq!(metadata(&average, "pixel.weights"), "average");
    let model: serde_json::Value =
        serde_json::from_str(&metadata(&trained, "pixel.model")).unwrap();
    assert_eq!(model["variant"], "simple");
    assert_eq!(model["channels"], 4);
    assert_eq!(
        metadata(&trained, "pixel.experiment"),
        std::fs::read_to_string(run.join("experiment.toml")).unwrap()
    );
    let bytes = std::fs::read(&trained).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let conv = file.tensor("convs.0.weight").unwrap();
    assert_eq!(conv.shape(), [4, 1, 3, 3]);
    assert_eq!(conv.dtype(), safetensors::Dtype::F32);
    assert_ne!(
        std::fs::read(&average).unwrap(),
        bytes,
        "the average is not the weights"
    );

    let (header, images) = npy(&run.join("test-images.npy"));
    assert!(header.contains("'descr': '|u1'"), "{header}");
    let n = images.len() / 36;
    assert!(
        header.contains(&format!("'shape': ({n}, 1, 6, 6)")),
        "{header}"
    );
    let (header, labels) = npy(&run.join("test-labels.npy"));
    assert!(header.contains(&format!("'shape': ({n},)")) && labels.len() == n);
    let (header, log_probs) = npy(&run.join("test-log-probs.npy"));
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(
        header.contains(&format!("'shape': ({n}, 1, 6, 6)")),
        "{header}"
    );
    let nats: f64 = log_probs
        .chunks(4)
        .map(|b| -f64::from(f32::from_le_bytes(b.try_into().unwrap())))
        .sum();
    let bits = nats / ((n * 36) as f64 * std::f64::consts::LN_2);
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval.json")).unwrap()).unwrap();
    let expected = eval["test_bits_per_dim"].as_f64().unwrap();
    assert!(
        (bits - expected).abs() < 1e-5,
        "{bits} vs pixel eval's {expected}"
    );

    // --out names the weights; the average goes beside them.
    let out = pixel(d, &["export", "results/tiny", "--out", "w/x.safetensors"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(d.join("w/x.safetensors").is_file() && d.join("w/x-ema.safetensors").is_file());
    assert!(!d.join("w/test-images.npy").exists());
}

/// Bad flags are refused (exit code 2, naming the flag) before anything is written.
#[test]
fn export_refuses_bad_flags_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = pixel(d, &["run", "tiny.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let cases: [(&[&str], &str); 4] = [
        (&["--out", "model.bin"], "--out model.bin"),
        (&["--test-images", "0"], "--test-images"),
        (&["--test-images", "some"], "--test-images"),
        (&["--test-images", "100000"], "has 10 images"),
    ];
    for (flags, said) in cases {
        let out = pixel(d, &[&["export", "results/tiny"][..], flags].concat());
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", text(&out));
        assert!(text(&out).contains(said), "{flags:?}: {}", text(&out));
        assert!(
            !d.join("results/tiny/model.safetensors").exists(),
            "{flags:?}"
        );
        assert!(!d.join("model.bin").exists());
    }
    let out = pixel(d, &["export", "results/none"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    std::fs::write(d.join("vae.toml"), TINY_VAE).unwrap();
    let out = pixel(d, &["run", "vae.toml", "--set", "train.epochs=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixel(d, &["export", "results/vae", "--test-images", "4"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("PixelVAE"), "{}", text(&out));
    assert!(!d.join("results/vae/model.safetensors").exists());
    // Its weights alone are written, under their module paths.
    let out = pixel(d, &["export", "results/vae"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(d.join("results/vae/model.safetensors").is_file());
}
