//! Readers against fixtures written in the real on-disk formats.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use kiln_core::Device;
use kiln_data::cifar::{CIFAR_BATCH_RECORDS, CIFAR_RECORD};
use kiln_data::*;

#[test]
fn flowers102_reads_real_mat_files_and_jpegs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (labels, files) = flowers_fixture(12);
    write_files(&root.join("flowers-102"), &files);

    let train = Flowers102::new(root, Split::Train).unwrap();
    let val = Flowers102::new(root, Split::Val).unwrap();
    let test = Flowers102::new(root, Split::Test).unwrap();
    assert_eq!((train.len(), val.len(), test.len()), (4, 4, 4));
    assert_eq!(train.num_classes(), 102);
    let want: Vec<usize> = (0..4).map(|i| labels[i] as usize - 1).collect();
    assert_eq!(train.labels().unwrap(), want);
    let s = test.get(1).unwrap();
    assert_eq!(s.label, labels[9] as usize - 1);
    // image_00010.jpg is 50x50 before any resize
    assert_eq!(s.image.shape(), [3, 50, 50]);

    // through the spec parser, resized to the chapter's 32x32
    let ds = open(&"flowers102".parse().unwrap(), root, Split::Train, 32).unwrap();
    assert_eq!(ds.image_size(), Some((32, 32)));
    let loader = DataLoader::new(ds.into(), LoaderConfig::batch(3), &Device::Cpu).unwrap();
    let batches: Vec<Batch> = loader.epoch(0).collect::<Result<_>>().unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].images.dims(), &[3, 3, 32, 32]);
    let mx: f32 = batches[0].images.max_all().unwrap().to_scalar().unwrap();
    assert!(mx <= 1.0 && mx > 0.1);

    // the folder itself also works as root
    assert_eq!(
        Flowers102::new(root.join("flowers-102"), Split::Val)
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn flowers102_bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("flowers-102");
    let (_, files) = flowers_fixture(12);
    write_files(&f, &files);

    // corrupt JPEG
    std::fs::write(f.join("jpg/image_00002.jpg"), b"\xff\xd8not a jpeg").unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap()
        .get(1)
        .unwrap_err();
    assert!(e.is_corrupt_image());
    assert!(e.to_string().contains("image_00002.jpg"), "{e}");

    // label out of range
    let bad: Vec<u16> = vec![103; 12];
    std::fs::write(f.join("imagelabels.mat"), mat_v5(&[("labels", &bad)])).unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("imagelabels.mat") && e.contains("out of range") && e.contains("0..102"),
        "{e}"
    );

    // wrong variable, garbage file, missing file
    std::fs::write(f.join("imagelabels.mat"), mat_v5(&[("lbl", &[1u16, 2])])).unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("variable `labels`") && e.contains("lbl"), "{e}");
    std::fs::write(f.join("imagelabels.mat"), b"hello").unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("imagelabels.mat") && e.contains("MATLAB"), "{e}");
    std::fs::remove_file(f.join("setid.mat")).unwrap();
    std::fs::write(
        f.join("imagelabels.mat"),
        mat_v5(&[("labels", &[1u16; 12])]),
    )
    .unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("setid.mat") && e.contains("not found"), "{e}");

    // ids beyond the labels
    std::fs::write(
        f.join("setid.mat"),
        mat_v5(&[("trnid", &[1u16, 300]), ("valid", &[1]), ("tstid", &[1])]),
    )
    .unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("trnid") && e.contains("300"), "{e}");
}

/// `n` CIFAR-10 records: record `i` has label `label_of(i)` and plane `c`
/// filled with `c * 100 + i` (mod 256).
fn cifar_records(n: usize, label_of: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * CIFAR_RECORD);
    for i in 0..n {
        out.push(label_of(i));
        for c in 0..3u8 {
            out.extend(std::iter::repeat_n((c * 100).wrapping_add(i as u8), 1024));
        }
    }
    out
}

#[test]
fn cifar10_binary_records() {
    // A full-size test batch (30.7 MB): the loader accepts only the published
    // 10000 records per file. Small fixtures of the record layout (the train
    // split's five files) are unit tests in src/cifar.rs.
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&b).unwrap();
    let full = cifar_records(CIFAR_BATCH_RECORDS, |k| (k % 10) as u8);
    assert_eq!(full.len(), 30_730_000);
    std::fs::write(b.join("test_batch.bin"), &full).unwrap();
    let test = Cifar10::new(dir.path(), Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.name(), "cifar10/test");
    let s = test.get(9_999).unwrap();
    assert_eq!(s.label, 9);
    assert_eq!(s.image.shape(), [3, 32, 32]);
    // record 9999: plane c holds (c * 100 + 9999) mod 256 = c * 100 + 15;
    // byte / 255 is elementwise, so 4 u on any CPU.
    let px = 2.0 * f32::EPSILON;
    assert!((s.image.at(0, 5, 5) - 15.0 / 255.0).abs() <= px);
    assert!((s.image.at(2, 31, 31) - 215.0 / 255.0).abs() <= px);
    assert!(test.get(10_000).is_err());
    assert!(Cifar10::new(dir.path(), Split::Val).is_err());

    let mut t = full;
    t[9_999 * CIFAR_RECORD] = 10;
    std::fs::write(b.join("test_batch.bin"), &t).unwrap();
    let e = Cifar10::new(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("label 10 of item 9999") && e.contains("0..10"),
        "{e}"
    );
}

#[test]
fn mnist_idx_raw_and_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("MNIST").join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let imgs: Vec<u8> = (0..3 * 28 * 28).map(|i| (i % 256) as u8).collect();
    std::fs::write(
        raw.join("train-images-idx3-ubyte.gz"),
        gz(&idx(2051, &[3, 28, 28], &imgs)),
    )
    .unwrap();
    std::fs::write(
        raw.join("train-labels-idx1-ubyte"),
        idx(2049, &[3], &[7, 0, 9]),
    )
    .unwrap();
    let m = Mnist::new(dir.path(), Split::Train).unwrap();
    assert_eq!((m.len(), m.channels()), (3, 1));
    let s = m.get(2).unwrap();
    assert_eq!((s.label, s.image.shape()), (9, [1, 28, 28]));
    // byte / 255, elementwise: 4 u (see the CIFAR test).
    assert!((s.image.data[0] - ((2 * 784) % 256) as f32 / 255.0).abs() <= 2.0 * f32::EPSILON);

    // 1 channel by default, RGB on request, resized by open
    let spec = DatasetSpec::Mnist;
    let ds = open(&spec, dir.path(), Split::Train, 32).unwrap();
    assert_eq!(
        (ds.channels(), ds.get(0).unwrap().image.shape()),
        (1, [1, 32, 32])
    );
    let opts = OpenOptions {
        rgb: true,
        image_size: None,
        ..Default::default()
    };
    let ds = open_with(&spec, dir.path(), &opts).unwrap();
    assert_eq!(ds.get(0).unwrap().image.shape(), [3, 28, 28]);

    // wrong magic, truncated, count mismatch, missing test split
    std::fs::write(
        raw.join("train-labels-idx1-ubyte"),
        idx(2051, &[3], &[7, 0, 9]),
    )
    .unwrap();
    let e = Mnist::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("expected 2049, found 2051"),
        "{e}"
    );
    std::fs::write(
        raw.join("train-labels-idx1-ubyte"),
        idx(2049, &[4], &[7, 0, 9]),
    )
    .unwrap();
    let e = Mnist::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("truncated") && e.contains("expected 12 bytes, found 11"),
        "{e}"
    );
    std::fs::write(
        raw.join("train-labels-idx1-ubyte"),
        idx(2049, &[2], &[7, 0]),
    )
    .unwrap();
    let e = Mnist::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label count"), "{e}");
    let e = Mnist::new(dir.path(), Split::Test).unwrap_err().to_string();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("download mnist"),
        "{e}"
    );
}

#[test]
fn image_folder_with_skip_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    for (c, n) in [("daisy", 3), ("rose", 2)] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        for i in 0..n {
            std::fs::write(root.join(c).join(format!("{i}.jpg")), jpeg(i, 24, 20)).unwrap();
        }
    }
    // a PNG, a non-image file, and a corrupt JPEG
    let png = Image::zeros(3, 10, 12).to_png().unwrap();
    std::fs::write(root.join("rose").join("z.PNG"), png).unwrap();
    std::fs::write(root.join("rose").join("notes.txt"), b"x").unwrap();
    std::fs::write(root.join("rose").join("bad.jpg"), b"garbage").unwrap();
    let f = ImageFolder::new(&root).unwrap();
    assert_eq!(f.classes(), ["daisy", "rose"]);
    assert_eq!(f.len(), 7);
    assert_eq!(f.labels().unwrap(), vec![0, 0, 0, 1, 1, 1, 1]);

    let spec: DatasetSpec = format!("folder:{}", root.display()).parse().unwrap();
    let ds: Arc<dyn Dataset> = open(&spec, "unused".as_ref(), Split::Train, 16)
        .unwrap()
        .into();
    let strict = DataLoader::new(ds.clone(), LoaderConfig::batch(4), &Device::Cpu).unwrap();
    let e = strict.epoch(0).collect::<Result<Vec<_>>>().unwrap_err();
    assert!(e.to_string().contains("bad.jpg"), "{e}");
    let cfg = LoaderConfig {
        batch_size: 4,
        skip_corrupt: true,
        threads: 2,
        ..Default::default()
    };
    let lenient = DataLoader::new(ds, cfg, &Device::Cpu).unwrap();
    let n: usize = lenient.epoch(0).map(|b| b.unwrap().len()).sum();
    assert_eq!((n, lenient.skipped()), (6, 1));

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("a")).unwrap();
    let e = ImageFolder::new(&empty).unwrap_err().to_string();
    assert!(
        e.contains("empty") && e.contains("one sub-folder per class"),
        "{e}"
    );
}

#[test]
fn synthetic_flowers_grid_png() {
    // writes a grid of the first 64 training pictures for a human to look at
    let ds = SyntheticFlowers::new(Default::default(), Split::Train).unwrap();
    let imgs: Vec<Image> = (0..64).map(|i| ds.get(i).unwrap().image).collect();
    let g = image::grid(&imgs, 8, 2).unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("synthetic-flowers-grid.png");
    g.save_png(&out).unwrap();
    let back = Image::open(&out, ColorMode::Rgb).unwrap();
    assert_eq!(back.shape(), [3, 8 * 32 + 9 * 2, 8 * 32 + 9 * 2]);
    // larger pictures for the eye
    let cfg = SyntheticFlowersConfig {
        size: 96,
        ..Default::default()
    };
    let big = SyntheticFlowers::new(cfg, Split::Train).unwrap();
    let imgs: Vec<Image> = (0..16).map(|i| big.get(i).unwrap().image).collect();
    image::grid(&imgs, 8, 2)
        .unwrap()
        .save_png(
            &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("synthetic-flowers-96.png"),
        )
        .unwrap();
}
