//! Writing `[colours, h, w]` byte planes as PNG: what the folder reader reads, and what sample
//! grids are saved as.

use std::path::Path;

/// Writes `[colours, h, w]` planes (1 = grey, 3 = RGB) as an 8-bit PNG.
pub fn write_rgb_or_grey(
    path: &Path,
    planes: &[u8],
    colours: usize,
    height: usize,
    width: usize,
) -> std::io::Result<()> {
    assert!(colours == 1 || colours == 3, "1 or 3 colours");
    assert_eq!(planes.len(), colours * height * width);
    let mut interleaved = Vec::with_capacity(planes.len());
    for p in 0..height * width {
        for c in 0..colours {
            interleaved.push(planes[c * height * width + p]);
        }
    }
    crate::atomic::write(path, &encode(&interleaved, colours, height, width)?)
}

/// A PNG file's bytes for 8-bit pixels stored interleaved (`[height, width, colours]`).
pub fn encode(
    interleaved: &[u8],
    colours: usize,
    height: usize,
    width: usize,
) -> std::io::Result<Vec<u8>> {
    assert!(colours == 1 || colours == 3, "1 or 3 colours");
    assert_eq!(interleaved.len(), colours * height * width);
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width as u32, height as u32);
    encoder.set_color(if colours == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(interleaved)
        .map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)?;
    Ok(bytes)
}
