//! Folder datasets: the input describes a tree (`path\0bytes` entries
//! separated by `\n\x01\n`) written under a scratch root, which
//! `ImageFolder` and its split form then scan and decode.
#![no_main]
use kiln_data::{ColorMode, Dataset, FolderOptions, ImageFolder, Split};
use libfuzzer_sys::fuzz_target;

/// Keeps a relative path of plain names (no `..`, no absolute paths), at most 3 deep.
fn clean(name: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(name);
    let comps: Vec<&str> = s
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .take(3)
        .collect();
    let ok = comps.iter().all(|c| c.len() <= 40 && !c.contains('\\'));
    (ok && !comps.is_empty()).then(|| comps.join("/"))
}

fuzz_target!(|data: &[u8]| {
    kiln_fuzz::allow_caught_decoder_panics();
    let dir = kiln_fuzz::scratch();
    for entry in kiln_fuzz::parts(data, b"\n\x01\n").into_iter().take(16) {
        let (name, bytes) = match entry.iter().position(|&b| b == 0) {
            Some(i) => (&entry[..i], &entry[i + 1..]),
            None => (entry, &[][..]),
        };
        if let Some(rel) = clean(name) {
            let p = dir.path().join(&rel);
            if p.exists() {
                continue;
            }
            if let Some(parent) = p.parent() {
                if parent.is_file() || std::fs::create_dir_all(parent).is_err() {
                    continue;
                }
            }
            let _ = std::fs::write(&p, bytes);
        }
    }
    let check = |ds: &ImageFolder| {
        for i in 0..ds.len().min(4) {
            if let Ok(s) = ds.get(i) {
                assert!(s.label < ds.classes().len());
            }
        }
    };
    for allow_empty in [false, true] {
        let opts = FolderOptions {
            mode: ColorMode::Rgb,
            allow_empty,
        };
        if let Ok(ds) = ImageFolder::with_options(dir.path(), &opts) {
            check(&ds);
        }
    }
    for split in [Split::Train, Split::Val, Split::Test] {
        if let Ok(ds) = ImageFolder::for_split(dir.path(), split, ColorMode::Gray) {
            check(&ds);
        }
    }
});
