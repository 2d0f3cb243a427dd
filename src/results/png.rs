//! Sample grids as PNG files, from bytes only.

pub use crate::data::png::write_rgb_or_grey;

/// Padding between grid cells, in pixels, and its grey level.
pub const PAD: usize = 2;
const PAD_LEVEL: u8 = 128;

/// Tiles `rows x cols` images (`[n, colours, h, w]` bytes, row-major order of cells) into one
/// image `[colours, rows*(h+PAD)+PAD, cols*(w+PAD)+PAD]`. Returns the planes and their size.
pub fn tile(
    images: &[u8],
    colours: usize,
    h: usize,
    w: usize,
    rows: usize,
    cols: usize,
) -> (Vec<u8>, usize, usize) {
    let (gh, gw) = (rows * (h + PAD) + PAD, cols * (w + PAD) + PAD);
    let mut out = vec![PAD_LEVEL; colours * gh * gw];
    for cell in 0..rows * cols {
        let (r, q) = (cell / cols, cell % cols);
        let img = &images[cell * colours * h * w..(cell + 1) * colours * h * w];
        for c in 0..colours {
            for y in 0..h {
                let dst = (c * gh + PAD + r * (h + PAD) + y) * gw + PAD + q * (w + PAD);
                out[dst..dst + w].copy_from_slice(&img[(c * h + y) * w..(c * h + y + 1) * w]);
            }
        }
    }
    (out, gh, gw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_places_cells_and_png_round_trips() {
        let (h, w) = (2, 3);
        let images: Vec<u8> = (0..4).flat_map(|i| vec![i as u8 * 10 + 1; h * w]).collect();
        let (planes, gh, gw) = tile(&images, 1, h, w, 2, 2);
        assert_eq!((gh, gw), (2 * 4 + 2, 2 * 5 + 2));
        assert_eq!(planes[0], PAD_LEVEL);
        assert_eq!(planes[PAD * gw + PAD], 1); // cell 0
        assert_eq!(planes[PAD * gw + PAD + w + PAD], 11); // cell 1
        assert_eq!(planes[(PAD + h + PAD) * gw + PAD], 21); // cell 2

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        write_rgb_or_grey(&p, &planes, 1, gh, gw).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), (gw, gh));
        assert_eq!(&buf[..info.buffer_size()], &planes[..]);
    }
}
