//! Datasets as exact 0..255 bytes: reading (IDX, CIFAR-10 binary, image folders), locating,
//! downloading, and seeded batching. Nothing here prints or knows about models; imports only `rng`.

pub mod cifar10;
pub mod download;
pub mod folder;
pub mod mnist;
pub mod png;
pub mod synthetic;

use crate::rng::{self, Purpose};
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Dataset kinds.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// MNIST, 28x28 grey, IDX files (gzipped or not).
    Mnist,
    /// CIFAR-10, 32x32 RGB, the official binary batches.
    Cifar10,
    /// An image folder in the imagenet64 layout: `DIR/train/<any>/*.png`, `DIR/valid/<any>/*.png`.
    Folder,
    /// Small generated images for tests (no files needed).
    Synthetic,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Folder => "folder",
            DatasetKind::Synthetic => "synthetic",
        }
    }
}

/// Errors about dataset files. Each names the file and what was expected of it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("dataset `{dataset}` not found; looked in:\n{tried}\n{hint}")]
    Missing {
        dataset: String,
        tried: String,
        hint: String,
    },
    #[error("download of {url} failed: {message}\n{hint}")]
    Download {
        url: String,
        message: String,
        hint: String,
    },
}

impl DataError {
    pub(crate) fn format(path: &Path, message: impl Into<String>) -> DataError {
        DataError::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
        move |error| DataError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Images as bytes, `[n, colours, height, width]` in row-major order, with a label each.
#[derive(Clone, Debug, PartialEq)]
pub struct Images {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub colours: usize,
    pub height: usize,
    pub width: usize,
}

impl Images {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Sub-pixels per image.
    pub fn dims(&self) -> usize {
        self.colours * self.height * self.width
    }

    /// The bytes of image `i`, `[colours, height, width]`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * self.dims()..(i + 1) * self.dims()]
    }

    /// Keeps the first `n` images (0 keeps all).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len() {
            self.pixels.truncate(n * self.dims());
            self.labels.truncate(n);
        }
    }

    /// Centre-crops every image to `size` x `size` (0 leaves them as they are); a side shorter
    /// than `size` is kept whole (`load` refuses such a crop before it gets here).
    pub fn centre_crop(&mut self, size: usize) {
        if size == 0 || (size >= self.height && size >= self.width) {
            return;
        }
        let (h, w) = (size.min(self.height), size.min(self.width));
        let (top, left) = ((self.height - h) / 2, (self.width - w) / 2);
        let mut out = Vec::with_capacity(self.len() * self.colours * h * w);
        for i in 0..self.len() {
            let img = self.image(i);
            for c in 0..self.colours {
                for y in top..top + h {
                    let row = (c * self.height + y) * self.width;
                    out.extend_from_slice(&img[row + left..row + left + w]);
                }
            }
        }
        self.pixels = out;
        self.height = h;
        self.width = w;
    }

    /// `colours x height x width`, for messages.
    pub fn shape_text(&self) -> String {
        format!("{}x{}x{}", self.colours, self.height, self.width)
    }

    /// Gathers images by index into one contiguous buffer `[indices.len(), c, h, w]`.
    pub fn gather(&self, indices: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let mut pixels = Vec::with_capacity(indices.len() * self.dims());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        (pixels, labels)
    }
}

/// A train and a test split of the same shape, and the validation images held out of train.
#[derive(Clone, Debug)]
pub struct Splits {
    pub train: Images,
    pub test: Images,
    /// `data.validation` training images, chosen by the seed (None when none are held out).
    pub validation: Option<Images>,
}

/// How a dataset is loaded (decided by the plan, before any file is read).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataSpec {
    pub kind: DatasetKind,
    /// Where the files are; `None` for synthetic data.
    pub dir: Option<PathBuf>,
    /// Whether missing MNIST or CIFAR-10 files are fetched into `dir`.
    pub download: bool,
    pub train_limit: usize,
    pub test_limit: usize,
    /// Training images held out for validation (after `train_limit`): a count, or below 1 a
    /// fraction of them; 0 for none.
    pub validation: f64,
    pub crop: usize,
    pub synthetic: synthetic::Spec,
    pub seed: u64,
}

/// Where a dataset's files are searched for, in order: the experiment's `path`, then
/// `$PIXEL_DATA/<dataset>`, then `data/<dataset>`. Returns the first folder that holds a complete
/// copy, or `None` with the list of folders tried.
pub fn locate(
    kind: DatasetKind,
    explicit: Option<&Path>,
    pixel_data: Option<&Path>,
) -> Result<PathBuf, Vec<PathBuf>> {
    let mut tried = Vec::new();
    if let Some(p) = explicit {
        tried.push(p.to_path_buf());
    } else {
        if let Some(root) = pixel_data {
            tried.push(root.join(kind.name()));
        }
        tried.push(Path::new("data").join(kind.name()));
    }
    for dir in &tried {
        if complete(kind, dir) {
            return Ok(dir.clone());
        }
    }
    Err(tried)
}

/// Whether `dir` holds every file a dataset needs.
pub fn complete(kind: DatasetKind, dir: &Path) -> bool {
    match kind {
        DatasetKind::Mnist => mnist::FILES.iter().all(|f| mnist::find(dir, f).is_some()),
        DatasetKind::Cifar10 => cifar10::find_dir(dir).is_some(),
        DatasetKind::Folder => dir.join("train").is_dir() && dir.join("valid").is_dir(),
        DatasetKind::Synthetic => true,
    }
}

/// What a user must put where, for the "not found" error.
pub fn expected_files(kind: DatasetKind) -> String {
    match kind {
        DatasetKind::Mnist => format!(
            "MNIST needs {} (gzipped or not) in one folder",
            mnist::FILES.join(", ")
        ),
        DatasetKind::Cifar10 => format!(
            "CIFAR-10 needs the binary batches {} in one folder (or in its cifar-10-batches-bin/)",
            cifar10::FILES.join(", ")
        ),
        DatasetKind::Folder => {
            "an image folder needs DIR/train/<any name>/*.png and DIR/valid/<any name>/*.png, \
             all images of one size"
                .into()
        }
        DatasetKind::Synthetic => String::new(),
    }
}

/// Reads the train and test splits, applying limits and the crop.
pub fn load(spec: &DataSpec) -> Result<Splits, DataError> {
    let mut splits = match spec.kind {
        DatasetKind::Synthetic => synthetic::generate(&spec.synthetic, spec.seed),
        kind => {
            let dir = spec
                .dir
                .as_deref()
                .expect("the plan sets a folder for file datasets");
            if spec.download && !complete(kind, dir) {
                download::fetch(kind, dir)?;
            }
            match kind {
                DatasetKind::Mnist => mnist::load(dir)?,
                DatasetKind::Cifar10 => cifar10::load(dir)?,
                DatasetKind::Folder => folder::load(dir)?,
                DatasetKind::Synthetic => unreachable!(),
            }
        }
    };
    let dir = spec
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("synthetic"));
    let (train, test) = (&splits.train, &splits.test);
    if (train.colours, train.height, train.width) != (test.colours, test.height, test.width) {
        return Err(DataError::format(
            &dir,
            format!(
                "the train images are {} and the test images {} (colours x height x width): \
                 both splits must have one shape",
                train.shape_text(),
                test.shape_text()
            ),
        ));
    }
    if spec.crop > train.height.min(train.width) {
        return Err(DataError::format(
            &dir,
            format!(
                "`data.crop` = {} does not fit images of {}x{} pixels: expected at most {}",
                spec.crop,
                train.height,
                train.width,
                train.height.min(train.width)
            ),
        ));
    }
    splits.train.truncate(spec.train_limit);
    splits.test.truncate(spec.test_limit);
    if spec.validation > 0.0 {
        let n = splits.train.len();
        let held = if spec.validation < 1.0 {
            (spec.validation * n as f64).round() as usize
        } else {
            spec.validation as usize
        };
        if held == 0 || held >= n {
            return Err(DataError::format(
                &dir,
                format!(
                    "`data.validation` = {} holds out {held} of the {n} training images: expected \
                     at least one and fewer than all",
                    spec.validation
                ),
            ));
        }
        let (train, validation) = hold_out(&splits.train, held, spec.seed);
        splits.train = train;
        splits.validation = Some(validation);
    }
    for images in [&mut splits.train, &mut splits.test]
        .into_iter()
        .chain(splits.validation.as_mut())
    {
        images.centre_crop(spec.crop);
    }
    Ok(splits)
}

/// Splits `images` into the rest and `n` of them chosen by the seed's validation stream, each in
/// the order of the file.
pub fn hold_out(images: &Images, n: usize, seed: u64) -> (Images, Images) {
    let mut order: Vec<usize> = (0..images.len()).collect();
    order.shuffle(&mut rng::stream(seed, Purpose::Validation, 0, 0));
    let (rest, held) = order.split_at_mut(images.len() - n);
    rest.sort_unstable();
    held.sort_unstable();
    let pick = |indices: &[usize]| {
        let (pixels, labels) = images.gather(indices);
        Images {
            pixels,
            labels,
            ..*images
        }
    };
    (pick(rest), pick(held))
}

/// The order in which an epoch visits the training images: a seeded shuffle, different each epoch
/// and the same for the same seed and epoch on every backend.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rng::stream(seed, Purpose::Shuffle, epoch as u64, 0);
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Images {
        Images {
            pixels: (0..2 * 2 * 4 * 4).map(|v| v as u8).collect(),
            labels: vec![3, 7],
            colours: 2,
            height: 4,
            width: 4,
        }
    }

    #[test]
    fn centre_crop_keeps_the_middle() {
        let mut im = tiny();
        im.centre_crop(2);
        assert_eq!((im.height, im.width), (2, 2));
        // image 0, colour 0: rows 1..3, cols 1..3 of 0..16
        assert_eq!(&im.image(0)[..4], &[5, 6, 9, 10]);
        // image 1, colour 1: offset 32 + 16
        assert_eq!(&im.image(1)[4..], &[53, 54, 57, 58]);
    }

    #[test]
    fn gather_and_truncate() {
        let mut im = tiny();
        let (px, lb) = im.gather(&[1, 0]);
        assert_eq!(lb, vec![7, 3]);
        assert_eq!(px[0], 32);
        im.truncate(1);
        assert_eq!(im.len(), 1);
        assert_eq!(im.pixels.len(), 32);
    }

    /// The validation images are a seeded subset: together with the rest they are the training
    /// set, each image once, both in file order; another seed holds out others.
    #[test]
    fn hold_out_is_a_seeded_disjoint_subset() {
        let images = Images {
            pixels: (0..50u8).collect(),
            labels: (0..50u8).map(|l| l % 10).collect(),
            colours: 1,
            height: 1,
            width: 1,
        };
        let (rest, held) = hold_out(&images, 10, 3);
        assert_eq!((rest.len(), held.len()), (40, 10));
        let mut all: Vec<u8> = rest.pixels.iter().chain(&held.pixels).copied().collect();
        assert!(rest.pixels.is_sorted() && held.pixels.is_sorted());
        all.sort_unstable();
        assert_eq!(all, (0..50u8).collect::<Vec<_>>());
        assert_eq!(hold_out(&images, 10, 3).1, held);
        assert_ne!(hold_out(&images, 10, 4).1, held);
        assert_ne!(
            held.pixels,
            (40..50u8).collect::<Vec<_>>(),
            "not simply the last ten"
        );
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 7, 1);
        assert_eq!(a, epoch_order(100, 7, 1));
        assert_ne!(a, epoch_order(100, 7, 2));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
