//! Fetching MNIST and CIFAR-10 from their usual public mirrors, with SHA-256 checks, timeouts and
//! retries. Files are streamed to a temporary name and renamed only once their checksum matches.

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

/// Attempts per file before a mirror is given up on.
const ATTEMPTS: u32 = 3;

/// Fetches `url` to `dest` if its SHA-256 is `sha`; nothing is left at `dest` otherwise. A
/// failed attempt (no connection, a stall, a cut or a wrong checksum) is logged and retried
/// after 2 and then 4 seconds.
fn get_checked(url: &str, sha: &str, dest: &Path) -> Result<(), String> {
    if !cfg!(feature = "download") {
        return attempt(url, sha, dest);
    }
    let mut last = String::new();
    for n in 1..=ATTEMPTS {
        tracing::info!(url, dest = %dest.display(), attempt = n, "downloading");
        match attempt(url, sha, dest) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(url, attempt = n, error = %e, "download failed");
                last = e;
            }
        }
        if n < ATTEMPTS {
            std::thread::sleep(std::time::Duration::from_secs(1 << n));
        }
    }
    Err(format!("{last} (after {ATTEMPTS} attempts)"))
}

/// The largest file fetched (CIFAR-10's archive is 163 MiB).
#[cfg(feature = "download")]
const LIMIT: u64 = 512 * 1024 * 1024;

/// One attempt: the body is streamed to a temporary file beside `dest` and hashed as it comes,
/// with a progress bar on a terminal; a connection that cannot be made in 30 s, or that sends
/// nothing for 60 s, fails the attempt instead of hanging every rank that waits on it.
#[cfg(feature = "download")]
fn attempt(url: &str, sha: &str, dest: &Path) -> Result<(), String> {
    use std::io::Read;
    use std::time::Duration;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let body = response.body_mut();
    let length = body.content_length();
    if let Some(n) = length.filter(|&n| n > LIMIT) {
        return Err(format!(
            "the server offers {n} bytes, more than the {LIMIT} expected"
        ));
    }
    let bar = indicatif::ProgressBar::new(length.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "downloading [{bar:30}] {bytes}/{total_bytes}, {bytes_per_sec}, {eta} left",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut reader = body.with_config().limit(LIMIT).reader();
    let io = |e: std::io::Error| format!("{}: {e}", dest.display());
    let mut file = crate::atomic::Pending::create(dest).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buffer).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(io)?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != sha {
        // Dropped unfinished: the temporary file goes with it.
        return Err(format!("checksum mismatch: SHA-256 {got}, expected {sha}"));
    }
    file.finish().map_err(io)
}

#[cfg(not(feature = "download"))]
fn attempt(_url: &str, _sha: &str, _dest: &Path) -> Result<(), String> {
    Err("this binary was built without the `download` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mirror that cuts the first answer short and sends the wrong bytes the second time: the
    /// third attempt lands the file, and no partial file is ever left at the destination.
    #[cfg(feature = "download")]
    #[test]
    fn a_failed_download_is_retried_and_leaves_nothing_half_written() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/file", listener.local_addr().unwrap());
        let good = b"the right bytes".to_vec();
        let sha = sha256_hex(&good);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("file");
        let server = std::thread::spawn(move || {
            for answer in 0..3 {
                let (mut s, _) = listener.accept().unwrap();
                let mut request = [0u8; 1024];
                let _ = s.read(&mut request).unwrap();
                let body: &[u8] = match answer {
                    0 => b"the rig",
                    1 => b"the wrong bytes",
                    _ => b"the right bytes",
                };
                let head = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n";
                s.write_all(head).unwrap();
                s.write_all(body).unwrap();
            }
        });
        get_checked(&url, &sha, &dest).unwrap();
        server.join().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), good);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file"
        );
    }

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
