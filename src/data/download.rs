//! Fetching MNIST and CIFAR-10 from their usual public mirrors, with SHA-256 checks.
//! Files are written to a temporary name and renamed only once their checksum matches.

use super::DatasetKind;
use super::{DataError, cifar10, mnist};
use sha2::{Digest, Sha256};
use std::path::Path;

/// MNIST mirrors, tried in order (the first is the one torchvision uses).
const MNIST_MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// SHA-256 of the four official gzipped MNIST files.
const MNIST_SHA256: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
];

const CIFAR_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
const CIFAR_SHA256: &str = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn offline_hint(kind: DatasetKind, dir: &Path) -> String {
    let what = match kind {
        DatasetKind::Mnist => MNIST_SHA256
            .iter()
            .map(|(f, _)| *f)
            .collect::<Vec<_>>()
            .join(", "),
        _ => format!(
            "the contents of {CIFAR_URL} ({})",
            cifar10::FILES.join(", ")
        ),
    };
    format!(
        "Without a network, put {what} into {} (or set `data.path` or $PIXEL_DATA).",
        dir.display()
    )
}

/// Downloads the dataset's missing files into `dir`.
pub fn fetch(kind: DatasetKind, dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
    match kind {
        DatasetKind::Mnist => {
            for (file, sha) in MNIST_SHA256 {
                let stem = file.trim_end_matches(".gz");
                if mnist::find(dir, stem).is_some() {
                    continue;
                }
                let mut last = None;
                for mirror in MNIST_MIRRORS {
                    let url = format!("{mirror}{file}");
                    match get_checked(&url, sha, &dir.join(file)) {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) => last = Some((url, e)),
                    }
                }
                if let Some((url, message)) = last {
                    return Err(DataError::Download {
                        url,
                        message,
                        hint: offline_hint(kind, dir),
                    });
                }
            }
            Ok(())
        }
        DatasetKind::Cifar10 => {
            let archive = dir.join("cifar-10-binary.tar.gz");
            get_checked(CIFAR_URL, CIFAR_SHA256, &archive).map_err(|message| {
                DataError::Download {
                    url: CIFAR_URL.into(),
                    message,
                    hint: offline_hint(kind, dir),
                }
            })?;
            let file = std::fs::File::open(&archive).map_err(DataError::io(&archive))?;
            tar::Archive::new(flate2::read::GzDecoder::new(file))
                .unpack(dir)
                .map_err(|e| DataError::format(&archive, format!("cannot unpack: {e}")))?;
            std::fs::remove_file(&archive).map_err(DataError::io(&archive))?;
            Ok(())
        }
        DatasetKind::Folder | DatasetKind::Synthetic => Ok(()),
    }
}

/// Fetches `url` to `dest` if its SHA-256 is `sha`; nothing is left at `dest` otherwise.
fn get_checked(url: &str, sha: &str, dest: &Path) -> Result<(), String> {
    tracing::info!(url, dest = %dest.display(), "downloading");
    let bytes = get(url)?;
    let got = sha256_hex(&bytes);
    if got != sha {
        return Err(format!("checksum mismatch: SHA-256 {got}, expected {sha}"));
    }
    crate::atomic::write(dest, &bytes).map_err(|e| format!("{}: {e}", dest.display()))
}

#[cfg(feature = "download")]
fn get(url: &str) -> Result<Vec<u8>, String> {
    let mut response = ureq::get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(512 * 1024 * 1024)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "download"))]
fn get(_url: &str) -> Result<Vec<u8>, String> {
    Err("this binary was built without the `download` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
