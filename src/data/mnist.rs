//! MNIST in the IDX format (LeCun et al.), gzipped or not.

use super::{DataError, Images, Splits};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Grey images of 28 x 28 pixels.
pub const COLOURS: usize = 1;
pub const SIDE: usize = 28;

/// The four official file names, without `.gz`.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Finds `name` or `name.gz` in `dir`.
pub fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// Reads a whole file, un-gzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(DataError::io(path))?;
    decode_maybe_gz(path, raw)
}

/// The most an IDX file may unpack to (a gzip bomb is refused, not unpacked into memory).
const MAX_IDX_BYTES: u64 = 4 << 30;

/// Un-gzips `raw` when it starts with the gzip magic bytes; `path` names it in errors.
pub fn decode_maybe_gz(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, DataError> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("not a valid gzip file: {e}")))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(DataError::format(
                path,
                format!(
                    "unpacks to more than {} MiB: not an MNIST-like file (60000 images of 28x28 \
                     are 45 MiB); refused before unpacking the rest",
                    MAX_IDX_BYTES >> 20
                ),
            ));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes with `rank` dimensions. Returns the dimensions and data.
pub fn parse_idx(path: &Path, bytes: &[u8], rank: u8) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let expected_magic = [0, 0, 0x08, rank];
    if bytes.len() < 4 || bytes[..4] != expected_magic {
        let found = &bytes[..bytes.len().min(4)];
        return Err(DataError::format(
            path,
            format!(
                "wrong magic number {found:02x?}: expected {expected_magic:02x?} \
                 (an IDX file of unsigned bytes with {rank} dimensions)"
            ),
        ));
    }
    let header = 4 + 4 * rank as usize;
    if bytes.len() < header {
        return Err(DataError::format(
            path,
            format!(
                "truncated: {} bytes, the header alone needs {header}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let body = &bytes[header..];
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if count != Some(body.len()) {
        let count = count.map_or("more than memory holds".to_string(), |c| c.to_string());
        return Err(DataError::format(
            path,
            format!(
                "truncated or padded: the header promises {dims:?} = {count} bytes of data, \
                 the file has {}",
                body.len()
            ),
        ));
    }
    Ok((dims, body.to_vec()))
}

/// Reads an images file and its labels file into [`Images`].
pub fn read_pair(images: &Path, labels: &Path) -> Result<Images, DataError> {
    let (dims, pixels) = parse_idx(images, &read_maybe_gz(images)?, 3)?;
    let (ldims, labels_data) = parse_idx(labels, &read_maybe_gz(labels)?, 1)?;
    if ldims[0] != dims[0] {
        return Err(DataError::format(
            labels,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                images.display()
            ),
        ));
    }
    if dims[1] < 2 || dims[2] < 2 {
        return Err(DataError::format(
            images,
            format!(
                "images of {}x{} pixels: expected at least 2x2",
                dims[1], dims[2]
            ),
        ));
    }
    if let Some(bad) = labels_data.iter().find(|&&l| l > 9) {
        return Err(DataError::format(
            labels,
            format!("label {bad} out of range 0..=9"),
        ));
    }
    Ok(Images {
        pixels,
        labels: labels_data,
        colours: COLOURS,
        height: dims[1],
        width: dims[2],
    })
}

/// Loads the train and test splits from a folder holding the four files.
pub fn load(dir: &Path) -> Result<Splits, DataError> {
    let path = |name: &str| find(dir, name).unwrap_or_else(|| dir.join(name));
    Ok(Splits {
        train: read_pair(&path(FILES[0]), &path(FILES[1]))?,
        test: read_pair(&path(FILES[2]), &path(FILES[3]))?,
        validation: None,
    })
}

/// Writes images and labels as IDX files (tests and fixtures).
pub fn write_idx(images: &Images, images_path: &Path, labels_path: &Path) -> std::io::Result<()> {
    let n = images.len() as u32;
    let mut img = vec![0, 0, 8, 3];
    for d in [n, images.height as u32, images.width as u32] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend_from_slice(&images.pixels);
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&n.to_be_bytes());
    lab.extend_from_slice(&images.labels);
    std::fs::write(images_path, img)?;
    std::fs::write(labels_path, lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Images {
        Images {
            pixels: (0..3 * 2 * 3).map(|v| (v * 14) as u8).collect(),
            labels: vec![0, 9, 4],
            colours: COLOURS,
            height: 2,
            width: 3,
        }
    }

    #[test]
    fn round_trip_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let (i, l) = (dir.path().join("i"), dir.path().join("l"));
        write_idx(&sample(), &i, &l).unwrap();
        assert_eq!(read_pair(&i, &l).unwrap(), sample());

        let gz = dir.path().join("i.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &std::fs::read(&i).unwrap()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_pair(&gz, &l).unwrap(), sample());
    }

    #[test]
    fn wrong_magic_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (i, l) = (dir.path().join("i"), dir.path().join("l"));
        write_idx(&sample(), &i, &l).unwrap();
        // A labels file where an images file is expected.
        let err = read_pair(&l, &l).unwrap_err().to_string();
        assert!(err.contains("wrong magic number"), "{err}");
        assert!(err.contains(&l.display().to_string()), "{err}");
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (i, l) = (dir.path().join("i"), dir.path().join("l"));
        write_idx(&sample(), &i, &l).unwrap();
        let bytes = std::fs::read(&i).unwrap();
        std::fs::write(&i, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_pair(&i, &l).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&i, &bytes[..10]).unwrap();
        let err = read_pair(&i, &l).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn huge_header_is_an_error_not_an_overflow() {
        let mut bytes = vec![0, 0, 8, 3];
        bytes.extend([0xff; 12]);
        let err = parse_idx(Path::new("x"), &bytes, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn label_count_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (i, l) = (dir.path().join("i"), dir.path().join("l"));
        let mut s = sample();
        write_idx(&s, &i, &dir.path().join("unused")).unwrap();
        s.labels.pop();
        s.pixels.truncate(2 * 6);
        write_idx(&s, &dir.path().join("unused2"), &l).unwrap();
        let err = read_pair(&i, &l).unwrap_err().to_string();
        assert!(err.contains("2 labels for 3 images"), "{err}");
    }
}
