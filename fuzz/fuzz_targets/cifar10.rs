//! The CIFAR-10 binary batch reader: any bytes give images or an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pixel_models::data::cifar10::parse_batch;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(images) = parse_batch(Path::new("fuzz.bin"), data) {
        assert_eq!(images.pixels.len(), images.len() * 3 * 32 * 32);
    }
});
