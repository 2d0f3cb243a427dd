//! The `[data]` table: each dataset's image shape, the crop and validation split, where its files
//! are, and the reader's specification.

use super::Checker;
use crate::data::{self, DataError, DataSpec, synthetic};
use crate::error::Result;
use crate::experiment::{DatasetKind, Experiment};
use std::path::{Path, PathBuf};

/// The images' colours and side (`None` where only the files know it: an image folder). Checks
/// the synthetic generator's keys.
pub(super) fn image_shape(ctx: &Checker, e: &Experiment) -> Result<(usize, Option<usize>)> {
    let d = &e.data;
    Ok(match d.dataset {
        DatasetKind::Mnist => (data::mnist::COLOURS, Some(data::mnist::SIDE)),
        DatasetKind::Cifar10 => (data::cifar10::COLOURS, Some(data::cifar10::SIDE)),
        DatasetKind::Folder => (data::folder::COLOURS, None),
        DatasetKind::Synthetic => {
            ctx.require(
                matches!(d.synthetic_colours, 1 | 3),
                "data.synthetic_colours",
                d.synthetic_colours,
                "1 (grey) or 3 (RGB)",
            )?;
            ctx.require(
                (2..=256).contains(&d.synthetic_size),
                "data.synthetic_size",
                d.synthetic_size,
                "an image side between 2 and 256 pixels",
            )?;
            ctx.require(
                d.synthetic_images >= 1,
                "data.synthetic_images",
                d.synthetic_images,
                "at least 1 image",
            )?;
            (d.synthetic_colours, Some(d.synthetic_size))
        }
    })
}

/// The crop (within the dataset's side) and the validation split.
pub(super) fn check_split(ctx: &Checker, e: &Experiment, side: Option<usize>) -> Result<()> {
    let d = &e.data;
    if let Some(side) = side {
        ctx.require(
            d.crop == 0 || (2..=side).contains(&d.crop),
            "data.crop",
            d.crop,
            &format!("0 (no crop) or a side between 2 and {side} pixels"),
        )?;
    } else {
        ctx.require(
            d.crop != 1,
            "data.crop",
            d.crop,
            "0 (no crop) or at least 2 pixels",
        )?;
    }
    let v = d.validation;
    ctx.require(
        v.is_finite() && v >= 0.0 && (v < 1.0 || v.fract() == 0.0),
        "data.validation",
        v,
        "0 (none), a count of training images such as 5000, or a fraction below 1 such as 0.1",
    )
}

/// The side of the images the model sees: the crop, else the dataset's.
pub(super) fn trained_side(e: &Experiment, side: Option<usize>) -> Option<usize> {
    match (e.data.crop, side) {
        (0, side) => side,
        (crop, _) => Some(crop),
    }
}

/// What the reader is asked for, with the dataset's folder found (or where it will be downloaded).
pub(super) fn spec(
    ctx: &Checker,
    e: &Experiment,
    source: &Path,
    pixel_data: Option<&Path>,
) -> Result<DataSpec> {
    let d = &e.data;
    let dir = match d.dataset {
        DatasetKind::Synthetic => None,
        kind => Some(locate(ctx, e, kind, source, pixel_data)?),
    };
    Ok(DataSpec {
        kind: d.dataset,
        dir,
        download: d.download,
        train_limit: d.train_limit,
        test_limit: d.test_limit,
        validation: d.validation,
        crop: d.crop,
        synthetic: synthetic::Spec {
            size: d.synthetic_size,
            colours: d.synthetic_colours,
            train_images: d.synthetic_images,
        },
        seed: e.train.seed,
    })
}

/// Finds the dataset's folder, or where it will be downloaded to.
fn locate(
    ctx: &Checker,
    e: &Experiment,
    kind: DatasetKind,
    source: &Path,
    pixel_data: Option<&Path>,
) -> Result<PathBuf> {
    // Relative paths in an experiment are relative to the experiment file.
    let explicit = e.data.path.as_ref().map(|p| {
        if p.is_absolute() {
            p.clone()
        } else {
            source.parent().unwrap_or(Path::new(".")).join(p)
        }
    });
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    match data::locate(kind, explicit.as_deref(), pixel_data) {
        Ok(dir) => Ok(absolute(dir)),
        Err(tried) => {
            let downloadable = matches!(kind, DatasetKind::Mnist | DatasetKind::Cifar10);
            if downloadable && e.data.download {
                let target = explicit.unwrap_or_else(|| Path::new("data").join(kind.name()));
                return Ok(absolute(target));
            }
            let tried = tried
                .iter()
                .map(|p| format!("  {}", p.display()))
                .collect::<Vec<_>>()
                .join("\n");
            let mut hint = data::expected_files(kind);
            if downloadable {
                hint.push_str(&format!(
                    "; or set data.download = true in {} to fetch it",
                    ctx.source
                ));
            } else {
                hint.push_str(&format!("; set data.path in {}", ctx.source));
            }
            Err(DataError::Missing {
                dataset: kind.name().into(),
                tried,
                hint,
            }
            .into())
        }
    }
}
