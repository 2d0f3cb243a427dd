//! CIFAR-10 in the official binary layout: each record is one label byte then 3072 pixel bytes
//! (1024 red, 1024 green, 1024 blue, each 32x32 in row-major order).

use super::{DataError, Images, Splits};
use std::path::{Path, PathBuf};

/// RGB images of 32 x 32 pixels.
pub const COLOURS: usize = 3;
pub const SIDE: usize = 32;
const RECORD: usize = 1 + COLOURS * SIDE * SIDE;

/// The five training batches and the test batch.
pub const FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

/// The folder that holds the batches: `dir` itself or `dir/cifar-10-batches-bin` (the archive's
/// own layout).
pub fn find_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| FILES.iter().all(|f| d.join(f).is_file()))
}

/// Reads one binary batch file.
pub fn read_batch(path: &Path) -> Result<Images, DataError> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    parse_batch(path, &bytes)
}

pub fn parse_batch(path: &Path, bytes: &[u8]) -> Result<Images, DataError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte records \
                 (1 label byte + 3x32x32 pixels); the file is truncated or not a CIFAR-10 binary batch",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / RECORD;
    let mut pixels = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        if record[0] > 9 {
            return Err(DataError::format(
                path,
                format!(
                    "record {i} has label {}: expected 0..=9 (is this the CIFAR-100 layout?)",
                    record[0]
                ),
            ));
        }
        labels.push(record[0]);
        pixels.extend_from_slice(&record[1..]);
    }
    Ok(Images {
        pixels,
        labels,
        colours: COLOURS,
        height: SIDE,
        width: SIDE,
    })
}

/// Loads the 50000 training and 10000 test images.
pub fn load(dir: &Path) -> Result<Splits, DataError> {
    let dir = find_dir(dir).unwrap_or_else(|| dir.to_path_buf());
    let mut train: Option<Images> = None;
    for f in &FILES[..5] {
        let batch = read_batch(&dir.join(f))?;
        match &mut train {
            None => train = Some(batch),
            Some(t) => {
                t.pixels.extend(batch.pixels);
                t.labels.extend(batch.labels);
            }
        }
    }
    Ok(Splits {
        train: train.expect("five batches"),
        test: read_batch(&dir.join(FILES[5]))?,
        validation: None,
    })
}

/// Serialises images in the binary batch layout (tests).
pub fn to_batch_bytes(images: &Images) -> Vec<u8> {
    assert_eq!(
        (images.colours, images.height, images.width),
        (3, SIDE, SIDE)
    );
    let mut out = Vec::with_capacity(images.len() * RECORD);
    for i in 0..images.len() {
        out.push(images.labels[i]);
        out.extend_from_slice(images.image(i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_images() -> Images {
        let mut pixels = vec![0u8; 2 * 3 * SIDE * SIDE];
        // Image 1: red plane all 200, pixel (row 0, col 1) of blue = 17.
        let base = 3 * SIDE * SIDE;
        pixels[base..base + SIDE * SIDE].fill(200);
        pixels[base + 2 * SIDE * SIDE + 1] = 17;
        Images {
            pixels,
            labels: vec![6, 9],
            colours: COLOURS,
            height: SIDE,
            width: SIDE,
        }
    }

    #[test]
    fn decodes_labels_and_planes() {
        let bytes = to_batch_bytes(&two_images());
        // The official layout: label byte, then the red plane.
        assert_eq!(bytes[RECORD], 9);
        assert_eq!(bytes[RECORD + 1], 200);
        let im = parse_batch(Path::new("b.bin"), &bytes).unwrap();
        assert_eq!(im, two_images());
        assert_eq!(im.image(1)[2 * SIDE * SIDE + 1], 17);
    }

    #[test]
    fn truncated_batch_is_named() {
        let bytes = to_batch_bytes(&two_images());
        let err = parse_batch(Path::new("data_batch_1.bin"), &bytes[..RECORD + 5])
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_batch_1.bin"), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn bad_label_is_named() {
        let mut bytes = to_batch_bytes(&two_images());
        bytes[0] = 42;
        let err = parse_batch(Path::new("x.bin"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 42"), "{err}");
    }
}
