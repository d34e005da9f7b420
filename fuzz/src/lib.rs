//! Helpers shared by kiln's fuzz targets: scratch folders, splitting one
//! input into several files, and valid files to stand beside a fuzzed one.
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

/// A fresh temporary folder (removed on drop), in RAM (`/dev/shm`) where
/// the machine has one: the loaders read files, and a disk-backed folder made
/// and removed on every run costs more than most parsers themselves.
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary folder")
}

/// Lets a panic raised inside zune-jpeg 0.5.15 unwind instead of aborting
/// (libFuzzer's panic hook aborts on every panic, caught or not). Its
/// overflow on corrupt JPEGs (zune-image issue 382, fixed upstream in 0.5.16)
/// only fires with overflow checks; `kiln_data::Image::decode` catches it and
/// returns an error naming the file (test
/// `crates/kiln-data/tests/fuzz_regressions.rs`). A panic that escapes kiln
/// still fails the run: libfuzzer-sys aborts on any unwind out of the target.
pub fn allow_caught_decoder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_zune = info
                .location()
                .is_some_and(|l| l.file().contains("zune-jpeg-0.5.15"));
            if !in_zune {
                prev(info);
            }
        }));
    });
}

/// Writes `bytes` to `dir/name`, creating parent folders.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("create a folder");
    }
    std::fs::write(&p, bytes).expect("write a file");
    p
}

/// Splits `data` in two: the first byte says where (as a fraction of the rest).
pub fn split2(data: &[u8]) -> (u8, &[u8], &[u8]) {
    match data.split_first() {
        None => (0, &[], &[]),
        Some((&k, rest)) => {
            let cut = rest.len() * usize::from(k) / 256;
            (k, &rest[..cut], &rest[cut..])
        }
    }
}

/// Splits `data` into parts separated by `sep` (a byte string unlikely in
/// valid files, so a fuzzer mutates each part on its own).
pub fn parts<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

fn element(out: &mut Vec<u8>, ty: u32, data: &[u8]) {
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    while out.len() % 8 != 0 {
        out.push(0);
    }
}

/// A MATLAB v5 file of 1xN double row vectors stored as zlib-compressed
/// miUINT8 (values below 256), as Flowers102's files are.
pub fn mat_v5(vars: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"MATLAB 5.0 MAT-file, kiln fuzz fixture".to_vec();
    out.resize(116, b' ');
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&0x0100u16.to_le_bytes());
    out.extend_from_slice(b"IM");
    for (name, values) in vars {
        let mut body = Vec::new();
        element(&mut body, MI_UINT32, &[6, 0, 0, 0, 0, 0, 0, 0]);
        let mut dims = 1i32.to_le_bytes().to_vec();
        dims.extend_from_slice(&(values.len() as i32).to_le_bytes());
        element(&mut body, MI_INT32, &dims);
        element(&mut body, MI_INT8, name.as_bytes());
        element(&mut body, MI_UINT8, values);
        let mut matrix = MI_MATRIX.to_le_bytes().to_vec();
        matrix.extend_from_slice(&(body.len() as u32).to_le_bytes());
        matrix.extend_from_slice(&body);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&matrix).unwrap();
        let comp = z.finish().unwrap();
        out.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
        out.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        out.extend_from_slice(&comp);
    }
    out
}

/// Gzips `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A tiny valid GPT-2 `config.json` (vocab 16, 8 positions, 1 layer, width 4).
pub const TINY_GPT2_CONFIG: &str =
    r#"{"model_type":"gpt2","vocab_size":16,"n_positions":8,"n_embd":4,"n_layer":1,"n_head":1}"#;
