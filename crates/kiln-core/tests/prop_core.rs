//! Property tests for kiln-core's file readers (issue 21, fuzzing):
//! checkpoints/safetensors, a run folder's `config.toml` and `metrics.jsonl`.
//! Arbitrary bytes and mutations of valid files never panic; valid files
//! round-trip. cargo-fuzz targets for the same readers live in `fuzz/`.
#![allow(clippy::unwrap_used, missing_docs)]

use kiln_core::checkpoint::{read_tensors, serialize_tensors};
use kiln_core::run::{read_metrics, MetricsLog, RunDir};
use kiln_core::{Device, Tensor};
use proptest::prelude::*;

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
    fn checkpoint_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = read_tensors(&p, &Device::Cpu) {
            prop_assert!(e.to_string().contains("c.safetensors"), "{e}");
        }
    }

    #[test]
    fn checkpoints_round_trip_and_mutations_never_panic(
        shapes in proptest::collection::vec(proptest::collection::vec(1usize..4, 0..3), 1..4),
        edits in proptest::collection::vec(edit(), 0..4),
    ) {
        let tensors: Vec<(String, Tensor)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n).map(|k| (k * 7 + i) as f32 * 0.5).collect();
                (format!("t{i}"), Tensor::from_vec(v, s.clone(), &Device::Cpu).unwrap())
            })
            .collect();
        let valid = serialize_tensors(&tensors, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        std::fs::write(&p, apply(valid, &edits)).unwrap();
        match read_tensors(&p, &Device::Cpu) {
            Ok((got, _)) if edits.is_empty() => {
                for (name, t) in &tensors {
                    let (_, g) = got.iter().find(|(n, _)| n.as_str() == name.as_str()).unwrap();
                    prop_assert_eq!(g.dims(), t.dims());
                    prop_assert_eq!(
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    );
                }
            }
            Ok(_) => {}
            Err(e) => prop_assert!(!edits.is_empty(), "valid checkpoint refused: {e}"),
        }
    }

    #[test]
    fn config_toml_never_panics(text in "(kind = \"[a-z]{0,4}\"\n)?([a-z_.]{1,6} = (\"\\PC{0,6}\"|[0-9.e+-]{1,6}|true|\\[[0-9, ]{0,6}\\])\n|\\[[a-z.]{0,6}\\]\n|\\PC{0,8}\n){0,6}") {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), &text).unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        if let Err(e) = run.read_config::<toml::Value>() {
            prop_assert!(e.to_string().contains("config.toml"), "{e}");
        }
    }

    #[test]
    fn metrics_jsonl_never_panics(lines in proptest::collection::vec(
        prop_oneof![
            "\\{\"step\": ?-?[0-9]{1,3}, \"epoch\": [0-9]{1,2}, \"split\": \"[a-z]{0,5}\"(, \"[a-z]{1,4}\": ?(-?[0-9.e]{1,6}|null|\"x\"))?\\}",
            "\\PC{0,20}",
        ],
        0..5,
    )) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        if let Err(e) = read_metrics(&p) {
            prop_assert!(e.to_string().contains("metrics.jsonl"), "{e}");
        }
        let _ = MetricsLog::truncate_after(&p, 2);
        let _ = read_metrics(&p);
    }

    #[test]
    fn metrics_round_trip(rows in proptest::collection::vec((0u64..1000, 0u64..10, "[a-z]{1,5}", -1e9f64..1e9), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p).unwrap();
        for (step, epoch, split, v) in &rows {
            log.log(*step, *epoch, split, &[("loss", *v)]).unwrap();
        }
        drop(log);
        let got = read_metrics(&p).unwrap();
        prop_assert_eq!(got.len(), rows.len());
        for (r, (step, epoch, split, v)) in got.iter().zip(&rows) {
            prop_assert_eq!((r.step, r.epoch, &r.split), (*step, *epoch, split));
            // Bit-exact: the workspace turns on serde_json's `float_roundtrip`
            // (this property found values 1-2 ulp off without it).
            prop_assert_eq!(r.values.len(), 1);
            prop_assert_eq!(r.values[0].0.as_str(), "loss");
            prop_assert_eq!(r.values[0].1.to_bits(), v.to_bits(), "{} vs {}", r.values[0].1, v);
        }
    }
}
