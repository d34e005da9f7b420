//! Property tests for kiln-data's file parsers (issue 21, fuzzing): arbitrary
//! bytes and structured mutations of valid files never panic, and valid files
//! read back what was written. The same parsers have cargo-fuzz targets in
//! `fuzz/` (`RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET` there).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;

use kiln_data::download::extract_tar_gz;
use kiln_data::mnist::read_idx;
use kiln_data::text::PreferencePair;
use kiln_data::text::{parse_preferences, read_preferences, read_text, write_preferences, Turns};
use kiln_data::{ColorMode, Dataset, Flowers102, Image, Split};
use proptest::prelude::*;

/// One structured edit of a valid file.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => (any::<usize>(), 1usize..16).prop_map(|(i, n)| Edit::Remove(i, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match *e {
            Edit::Set(i, b) if !bytes.is_empty() => bytes[i % n] = b,
            Edit::Truncate(i) => bytes.truncate(i % n),
            Edit::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Edit::Remove(i, k) if !bytes.is_empty() => {
                let at = i % n;
                bytes.drain(at..(at + k).min(bytes.len()));
            }
            _ => {}
        }
    }
    bytes
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // Seeded like the rest of the suite: a run on CI explores the same
        // cases as here (open-ended exploration is `cargo xtask fuzz`'s job).
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6b69_6c6e),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn idx_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.idx");
        std::fs::write(&p, &bytes).unwrap();
        for magic in [0x801, 0x803] {
            if let Ok((dims, data)) = read_idx(&p, magic) {
                prop_assert_eq!(dims.iter().product::<usize>(), data.len());
            }
        }
    }

    #[test]
    fn idx_mutations_never_panic_and_valid_files_round_trip(
        dims in proptest::collection::vec(1u32..5, 3),
        edits in proptest::collection::vec(edit(), 0..4),
        gz in any::<bool>(),
    ) {
        let n: u32 = dims.iter().product();
        let data: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
        let valid = common::idx(0x803, &dims, &data);
        let bytes = apply(valid.clone(), &edits);
        let bytes = if gz { common::gz(&bytes) } else { bytes };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.idx");
        std::fs::write(&p, &bytes).unwrap();
        match read_idx(&p, 0x803) {
            Ok((d, got)) => {
                prop_assert_eq!(d.iter().product::<usize>(), got.len());
                if edits.is_empty() {
                    prop_assert_eq!(d, dims.iter().map(|&x| x as usize).collect::<Vec<_>>());
                    prop_assert_eq!(got, data);
                }
            }
            Err(e) => {
                prop_assert!(!edits.is_empty(), "valid file refused: {e}");
                prop_assert!(e.to_string().contains("x.idx"), "{e}");
            }
        }
    }

    #[test]
    fn preferences_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_preferences(&bytes[..], Path::new("p.jsonl"));
    }

    #[test]
    fn preference_pairs_round_trip(
        rows in proptest::collection::vec(("\\PC{0,12}", "\\PC{0,12}", "\\PC{0,12}", proptest::option::of(-1e6f64..1e6)), 1..4),
        edits in proptest::collection::vec(edit(), 0..3),
    ) {
        let pairs: Vec<PreferencePair> = rows
            .into_iter()
            .map(|(p, c, r, m)| PreferencePair {
                prompt: Some(Turns::Text(p)),
                // a pair whose completions are the same is refused on reading
                rejected: Turns::Text(if r == c { format!("{r}!") } else { r }),
                chosen: Turns::Text(c),
                margin: m,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prefs.jsonl");
        write_preferences(&p, &pairs).unwrap();
        // Margins come back bit-exact: the workspace turns on serde_json's
        // `float_roundtrip` (this property found them 1 ulp off without it).
        let back = read_preferences(&p).unwrap();
        prop_assert_eq!(back.len(), pairs.len());
        for (b, a) in back.iter().zip(&pairs) {
            prop_assert_eq!((&b.prompt, &b.chosen, &b.rejected), (&a.prompt, &a.chosen, &a.rejected));
            match (b.margin, a.margin) {
                (Some(x), Some(y)) => prop_assert_eq!(x.to_bits(), y.to_bits(), "{} vs {}", x, y),
                (x, y) => prop_assert_eq!(x, y),
            }
        }
        let mutated = apply(std::fs::read(&p).unwrap(), &edits);
        let _ = parse_preferences(&mutated[..], &p);
    }

    #[test]
    fn text_files_read_or_name_the_file(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("corpus.txt");
        std::fs::write(&p, &bytes).unwrap();
        match read_text(&p) {
            // a leading byte-order mark is dropped, nothing else
            Ok(t) => prop_assert_eq!(
                t.as_bytes(),
                bytes.strip_prefix(b"\xef\xbb\xbf".as_slice()).unwrap_or(&bytes[..])
            ),
            Err(e) => prop_assert!(e.to_string().contains("corpus.txt"), "{e}"),
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    // CIFAR-10 batch mutations: a unit test in src/cifar.rs
    // (`mutations_never_panic_and_valid_batches_round_trip`), on small
    // batches the public loader refuses (it wants 10000 records per file).

    #[test]
    fn mat_mutations_never_panic_and_valid_files_round_trip(
        labels in proptest::collection::vec(1u16..=102, 4..8),
        edits in proptest::collection::vec(edit(), 0..4),
        which in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut l = common::mat_v5(&[("labels", &labels)]);
        let mut s = common::mat_v5(&[("trnid", &[1, 2]), ("valid", &[3]), ("tstid", &[4])]);
        if which { l = apply(l, &edits) } else { s = apply(s, &edits) }
        std::fs::write(dir.path().join("imagelabels.mat"), &l).unwrap();
        std::fs::write(dir.path().join("setid.mat"), &s).unwrap();
        match Flowers102::new(dir.path(), Split::Train) {
            Ok(ds) => {
                if edits.is_empty() {
                    prop_assert_eq!(ds.len(), 2);
                }
            }
            Err(e) => {
                prop_assert!(!edits.is_empty(), "valid files refused: {e}");
                prop_assert!(e.to_string().contains(".mat"), "{e}");
            }
        }
    }

    #[test]
    fn image_mutations_never_panic_and_png_round_trips(
        w in 1usize..9, h in 1usize..9, gray in any::<bool>(),
        edits in proptest::collection::vec(edit(), 0..4),
        jpeg in any::<bool>(),
    ) {
        let c = if gray { 1 } else { 3 };
        let data: Vec<f32> = (0..c * h * w).map(|i| ((i * 53) % 256) as f32 / 255.0).collect();
        let img = Image::new(c, h, w, data).unwrap();
        let valid = if jpeg { img.to_jpeg().unwrap() } else { img.to_png().unwrap() };
        let bytes = apply(valid, &edits);
        let origin = Path::new("pic.png");
        for mode in [ColorMode::Native, ColorMode::Rgb, ColorMode::Gray] {
            match Image::decode(&bytes, mode, origin) {
                Ok(back) => {
                    if edits.is_empty() && !jpeg && mode == ColorMode::Native {
                        prop_assert_eq!(&back, &img);
                    }
                }
                Err(e) => {
                    prop_assert!(!edits.is_empty(), "valid image refused: {e}");
                    prop_assert!(e.to_string().contains("pic.png"), "{e}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn tar_mutations_never_write_outside_the_destination(
        names in proptest::collection::vec("[a-z]{1,6}(/[a-z]{1,6})?", 1..4),
        edits in proptest::collection::vec(edit(), 0..4),
    ) {
        let files: Vec<(String, Vec<u8>)> =
            names.iter().enumerate().map(|(i, n)| (format!("top/{i}/{n}"), n.as_bytes().to_vec())).collect();
        // Mutate the tar stream itself, then gzip it as a download would be.
        let tar = {
            let gz = common::tar_gz(&files);
            let mut d = flate2::read::GzDecoder::new(&gz[..]);
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut d, &mut v).unwrap();
            v
        };
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar.gz");
        std::fs::write(&archive, common::gz(&apply(tar, &edits))).unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir_all(&dest).unwrap();
        let res = extract_tar_gz(&archive, &dest);
        let mut entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        entries.sort();
        prop_assert_eq!(entries, vec![std::ffi::OsString::from("a.tar.gz"), "out".into()]);
        if edits.is_empty() {
            prop_assert!(res.is_ok(), "{:?}", res);
            for (n, data) in &files {
                let on_disk = std::fs::read(dest.join(n));
                // A later name may be a folder an earlier file needs; then both can't exist.
                if let Ok(b) = on_disk {
                    prop_assert_eq!(&b, data);
                }
            }
        }
    }
}
