//! Property tests for kiln-lm's file readers (issue 21, fuzzing):
//! `config.json`, `tokenizer.json` and `model.safetensors`. Mutations of the
//! tiny fixture's files never panic; valid configs round-trip.
//! cargo-fuzz targets for the same readers live in `fuzz/`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

use kiln_core::Device;
use kiln_lm::{Gpt2, Gpt2Config, Gpt2Tokenizer};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-gpt2")
        .join(name)
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match *e {
            Edit::Set(i, b) if !bytes.is_empty() => bytes[i % n] = b,
            Edit::Truncate(i) => bytes.truncate(i % n),
            Edit::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
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
    fn config_json_mutations_never_panic(edits in proptest::collection::vec(edit(), 1..4)) {
        let bytes = apply(std::fs::read(fixture("config.json")).unwrap(), &edits);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, bytes).unwrap();
        match Gpt2Config::from_file(&p) {
            Ok(cfg) => {
                if cfg.validate().is_ok() {
                    let _ = cfg.num_params();
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("config.json"), "{e}"),
        }
    }

    #[test]
    fn configs_round_trip_through_hf_json(
        vocab in 1usize..300, pos in 1usize..128, heads in 1usize..5, head_dim in 1usize..9, layers in 1usize..4,
    ) {
        let mut cfg = Gpt2Config::tiny(vocab, pos);
        cfg.n_head = heads;
        cfg.n_embd = heads * head_dim;
        cfg.n_layer = layers;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, cfg.to_hf_json().to_string()).unwrap();
        prop_assert_eq!(Gpt2Config::from_file(&p).unwrap(), cfg);
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn tokenizer_json_mutations_never_panic(edits in proptest::collection::vec(edit(), 1..4)) {
        let bytes = apply(std::fs::read(fixture("tokenizer.json")).unwrap(), &edits);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, bytes).unwrap();
        match Gpt2Tokenizer::from_file(&p) {
            Ok(tok) => {
                if let Ok(ids) = tok.encode("hello world") {
                    let _ = tok.decode(&ids);
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("tokenizer.json"), "{e}"),
        }
    }

    #[test]
    fn weight_mutations_never_panic(edits in proptest::collection::vec(edit(), 1..3)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("config.json"), dir.path().join("config.json")).unwrap();
        // Most edits go to the JSON header (the first KiB), where the structure is.
        let edits: Vec<Edit> = edits
            .into_iter()
            .map(|e| match e {
                Edit::Set(i, b) => Edit::Set(i % 1024, b),
                Edit::Insert(i, b) => Edit::Insert(i % 1024, b),
                t => t,
            })
            .collect();
        let bytes = apply(std::fs::read(fixture("model.safetensors")).unwrap(), &edits);
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let _ = Gpt2::load(dir.path(), &Device::Cpu);
    }
}
