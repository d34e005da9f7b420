//! JPEG/PNG decoding as the loaders do it: `Image::decode` in every colour
//! mode, and the JPEG completeness check.
#![no_main]
use std::path::Path;

use kiln_data::image::check_jpeg_complete;
use kiln_data::{ColorMode, Image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln_fuzz::allow_caught_decoder_panics();
    let origin = Path::new("fuzz/input.jpg");
    let _ = check_jpeg_complete(data);
    for mode in [ColorMode::Native, ColorMode::Rgb, ColorMode::Gray] {
        if let Ok(img) = Image::decode(data, mode, origin) {
            let [c, h, w] = img.shape();
            assert_eq!(img.plane(0).len(), h * w);
            assert!(c >= 1);
        }
    }
});
