//! Inputs the fuzz targets of `fuzz/` crashed on (issue 21). Each must give
//! a result or an error naming the file, never a panic out of kiln.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use kiln_data::{ColorMode, Image};

/// `fuzz/` target `image`: a 351-byte corrupt JPEG whose DC prediction grows
/// until `dc_prediction * qt_table[0]` overflows inside zune-jpeg 0.5.15
/// (bitstream.rs:400; zune-image issue 382, fixed upstream in 0.5.16 with a
/// wrapping multiply). With overflow checks on, as in this debug test, the
/// decoder panics; `Image::decode` turns that into an error naming the file.
#[test]
fn jpeg_whose_dc_prediction_overflows_is_an_error_not_a_panic() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg-dc-overflow.jpg");
    let bytes = std::fs::read(&path).unwrap();
    for mode in [ColorMode::Native, ColorMode::Rgb, ColorMode::Gray] {
        match Image::decode(&bytes, mode, &path) {
            // Without overflow checks zune-jpeg wraps, as libjpeg-turbo does.
            Ok(img) => assert_eq!(img.plane(0).len(), img.shape()[1] * img.shape()[2]),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("jpeg-dc-overflow.jpg"), "{e}");
                if cfg!(debug_assertions) {
                    assert!(e.contains("decoder failed on corrupt data"), "{e}");
                    assert!(e.contains("overflow"), "{e}");
                }
            }
        }
    }
}

/// `fuzz/` target `image`: 374 bytes of JPEG whose header declares 288.7
/// million pixels (Pillow: "DecompressionBombError: Image size (288695296
/// pixels) exceeds limit of 178956970 pixels"). Decoding and converting it
/// took over 30 s; now the header's size is refused before any decoding.
#[test]
fn jpeg_declaring_hundreds_of_megapixels_is_refused_before_decoding() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg-288-megapixels.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let t = std::time::Instant::now();
    let e = Image::decode(&bytes, ColorMode::Rgb, &path)
        .unwrap_err()
        .to_string();
    assert!(t.elapsed().as_secs_f64() < 1.0, "took {:?}", t.elapsed());
    assert!(e.contains("jpeg-288-megapixels.jpg"), "{e}");
    assert!(e.contains("288695296 pixels"), "{e}");
    assert!(e.contains("89478485"), "{e}");
    assert!(e.contains("decompression bomb"), "{e}");
    assert_eq!(kiln_data::image::MAX_PIXELS, 89_478_485);
}
