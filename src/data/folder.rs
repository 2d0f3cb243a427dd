//! An image folder in the seed's imagenet64 layout: `DIR/train/<any name>/*.png` and
//! `DIR/valid/<any name>/*.png`. Every image must have the same size; they are read as RGB.
//! The label of an image is the index of its subfolder in sorted order.

use super::{DataError, Images, Splits};
use crate::progress::Progress;
use std::path::{Path, PathBuf};

/// Every image is read as RGB; the size is the files' (all alike).
pub const COLOURS: usize = 3;

pub fn load(dir: &Path) -> Result<Splits, DataError> {
    let train = read_split(&dir.join("train"), None)?;
    let shape = (train.height, train.width);
    Ok(Splits {
        test: read_split(&dir.join("valid"), Some(shape))?,
        train,
        validation: None,
    })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(DataError::io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(DataError::io(dir))?;
    entries.sort();
    Ok(entries)
}

fn read_split(dir: &Path, shape: Option<(usize, usize)>) -> Result<Images, DataError> {
    let mut images = Images {
        pixels: Vec::new(),
        labels: Vec::new(),
        colours: COLOURS,
        height: shape.map_or(0, |s| s.0),
        width: shape.map_or(0, |s| s.1),
    };
    let subdirs: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    let mut listed = Vec::with_capacity(subdirs.len());
    for sub in &subdirs {
        let files = sorted_entries(sub)?.into_iter();
        listed.push(files.filter(|f| f.extension().and_then(|e| e.to_str()) == Some("png")));
    }
    let listed: Vec<Vec<PathBuf>> = listed.into_iter().map(Iterator::collect).collect();
    let total = listed.iter().map(Vec::len).sum::<usize>() as u64;
    let progress = Progress::new(&format!("reading {}", dir.display()), total, "images");
    for (label, files) in listed.into_iter().enumerate() {
        for file in files {
            progress.advance(1);
            let (w, h, rgb) = read_png_rgb(&file)?;
            if images.labels.is_empty() && images.height == 0 {
                images.height = h;
                images.width = w;
            }
            if (h, w) != (images.height, images.width) {
                return Err(DataError::format(
                    &file,
                    format!(
                        "image is {w}x{h}, expected {}x{} like the others",
                        images.width, images.height
                    ),
                ));
            }
            images.pixels.extend(rgb);
            images.labels.push((label % 256) as u8);
        }
    }
    progress.finish();
    if images.is_empty() {
        return Err(DataError::format(
            dir,
            "no .png images found: expected <this folder>/<any name>/*.png",
        ));
    }
    Ok(images)
}

/// The largest decoded image the folder reader accepts (4096 x 4096 RGBA).
const MAX_DECODED_BYTES: usize = 64 << 20;

/// Decodes a PNG into `(width, height, [3, h, w] bytes)`.
pub fn read_png_rgb(path: &Path) -> Result<(usize, usize, Vec<u8>), DataError> {
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let bad = |e: png::DecodingError| DataError::format(path, format!("unreadable PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(bad)?;
    // The header's size is checked before anything of that size is allocated.
    let (w, h) = (reader.info().width, reader.info().height);
    let size = reader
        .output_buffer_size()
        .filter(|&n| n <= MAX_DECODED_BYTES)
        .ok_or_else(|| {
            DataError::format(
                path,
                format!(
                    "its header claims {w}x{h} pixels, more than {} MiB decoded: refused before \
                     allocating it (a folder dataset is for small images)",
                    MAX_DECODED_BYTES >> 20
                ),
            )
        })?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let mut planes = vec![0u8; 3 * h * w];
    for p in 0..h * w {
        let px = &buf[p * channels..(p + 1) * channels];
        let rgb = match channels {
            1 | 2 => [px[0]; 3],
            _ => [px[0], px[1], px[2]],
        };
        for c in 0..3 {
            planes[c * h * w + p] = rgb[c];
        }
    }
    Ok((w, h, planes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::png::write_rgb_or_grey;

    #[test]
    fn reads_the_imagenet64_layout() {
        let dir = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 3), ("valid", 2)] {
            let sub = dir.path().join(split).join("box");
            std::fs::create_dir_all(&sub).unwrap();
            for i in 0..n {
                let px: Vec<u8> = (0..3 * 4 * 4).map(|v| (v * 5 + i) as u8).collect();
                write_rgb_or_grey(&sub.join(format!("{i}.png")), &px, 3, 4, 4).unwrap();
            }
        }
        let s = load(dir.path()).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (3, 2));
        assert_eq!(s.train.image(1)[5], 26);
    }

    #[test]
    fn wrong_size_and_unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("train").join("x");
        std::fs::create_dir_all(&sub).unwrap();
        write_rgb_or_grey(&sub.join("a.png"), &[0; 3 * 16], 3, 4, 4).unwrap();
        write_rgb_or_grey(&sub.join("b.png"), &[0; 3 * 20], 3, 4, 5).unwrap();
        let err = read_split(&dir.path().join("train"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.png") && err.contains("expected 4x4"),
            "{err}"
        );

        // A header that claims 100000 x 100000 RGB pixels (30 GB), with nothing behind it.
        let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut crc = flate2::Crc::new();
        crc.update(&ihdr);
        huge.extend(13u32.to_be_bytes());
        huge.extend(&ihdr);
        huge.extend(crc.sum().to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(b"IDAT");
        huge.extend(0u32.to_be_bytes());
        huge.extend(b"IDAT");
        huge.extend(crc.sum().to_be_bytes());
        std::fs::write(sub.join("b.png"), &huge).unwrap();
        let err = read_split(&dir.path().join("train"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.png") && err.contains("refused before allocating"),
            "{err}"
        );

        std::fs::write(sub.join("b.png"), b"not a png").unwrap();
        let err = read_split(&dir.path().join("train"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.png") && err.contains("unreadable PNG"),
            "{err}"
        );
    }
}
