//! The IDX reader (gzipped or not): any bytes give images or an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pixel_models::data::mnist::{decode_maybe_gz, parse_idx};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-idx");
    if let Ok(bytes) = decode_maybe_gz(path, data.to_vec()) {
        for rank in [1, 3] {
            if let Ok((dims, body)) = parse_idx(path, &bytes, rank) {
                assert_eq!(dims.iter().product::<usize>(), body.len());
            }
        }
    }
});
