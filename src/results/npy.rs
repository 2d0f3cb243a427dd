//! NumPy's `.npy` format (version 1.0) for uint8 and little-endian f32 arrays: what FID and
//! other downstream tools read samples from (`numpy.load`), and the test images and
//! log-probabilities `pixel export` writes for the PyTorch twins.

/// The bytes of a `.npy` file holding `data` as a C-ordered uint8 array of `shape`.
pub fn u8_array(shape: &[usize], data: &[u8]) -> Vec<u8> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape and data agree"
    );
    let mut out = header(shape);
    out.extend_from_slice(data);
    out
}

/// The start of a `.npy` file of a C-ordered uint8 array of `shape`, which its values follow:
/// for writing one in pieces.
pub fn header(shape: &[usize]) -> Vec<u8> {
    header_of("|u1", shape)
}

/// The bytes of a `.npy` file holding `data` as a C-ordered little-endian f32 array of `shape`.
pub fn f32_array(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape and data agree"
    );
    let mut out = header_of("<f4", shape);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// The header of an array of NumPy type `descr` and `shape`.
fn header_of(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_describes_the_array() {
        let bytes = u8_array(
            &[2, 1, 2, 3],
            &[0, 1, 2, 3, 4, 5, 250, 251, 252, 253, 254, 255],
        );
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(
            header.starts_with("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 1, 2, 3), }")
        );
        assert!(header.ends_with('\n'));
        assert_eq!(
            &bytes[10 + len..],
            &[0, 1, 2, 3, 4, 5, 250, 251, 252, 253, 254, 255]
        );
        let one = u8_array(&[3], &[1, 2, 3]);
        assert!(
            std::str::from_utf8(&one[10..])
                .unwrap()
                .contains("'shape': (3,)")
        );
        let floats = f32_array(&[2], &[1.5, -0.25]);
        let len = u16::from_le_bytes([floats[8], floats[9]]) as usize;
        assert!(
            std::str::from_utf8(&floats[10..10 + len])
                .unwrap()
                .starts_with("{'descr': '<f4'")
        );
        assert_eq!(&floats[10 + len..], &[0, 0, 192, 63, 0, 0, 128, 190]);
    }
}
