//! Hostile and damaged inputs (issue 21): every reader gives an error that
//! names the file, never a panic, a wrapped size or a silently wrong result.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use kiln_data::cifar::CIFAR_BATCH_RECORDS;
use kiln_data::download::{install, DownloadOptions, Manifest, RemoteFile};
use kiln_data::image::check_jpeg_complete;
use kiln_data::text::{parse_preferences, TextSource};
use kiln_data::*;

fn mnist_dir(images: &[u8], labels: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("MNIST").join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::write(raw.join("train-images-idx3-ubyte"), images).unwrap();
    std::fs::write(raw.join("train-labels-idx1-ubyte"), labels).unwrap();
    dir
}

#[test]
fn mnist_header_whose_dimensions_overflow_is_an_error_not_a_panic() {
    // (2051, 4, 2^31, 2^31): the product wrapped to 0 and passed the length check
    let images = idx(2051, &[4, 1 << 31, 1 << 31], &[]);
    let labels = idx(2049, &[4], &[1, 2, 3, 4]);
    for imgs in [images.clone(), gz(&images)] {
        let dir = mnist_dir(&imgs, &labels);
        let e = Mnist::new(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train-images-idx3-ubyte")
                && e.contains("4 x 2147483648 x 2147483648")
                && e.contains("overflows"),
            "{e}"
        );
    }
    // a product that fits but announces far more than the file holds: no
    // allocation of the announced size, an error with both sizes
    let images = idx(2051, &[65536, 65536, 65536], &[0; 100]);
    for (imgs, want) in [
        (images.clone(), "expected 281474976710672 bytes, found 116"),
        (
            gz(&images),
            "281474976710672 bytes as the IDX header announces",
        ),
    ] {
        let dir = mnist_dir(&imgs, &labels);
        let e = Mnist::new(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn mnist_with_no_images_or_empty_images_names_the_file() {
    let dir = mnist_dir(&idx(2051, &[0, 28, 28], &[]), &idx(2049, &[0], &[]));
    let e = Mnist::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("0 images"),
        "{e}"
    );
    let dir = mnist_dir(&idx(2051, &[2, 0, 0], &[]), &idx(2049, &[2], &[1, 2]));
    let e = Mnist::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("0x0") && e.contains("28x28"),
        "{e}"
    );
    // a header cut inside the dimensions, raw and gzipped
    let cut = idx(2051, &[2, 28, 28], &[])[..10].to_vec();
    for imgs in [cut.clone(), gz(&cut)] {
        let dir = mnist_dir(&imgs, &idx(2049, &[2], &[1, 2]));
        let e = Mnist::new(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("16"),
            "{e}"
        );
    }
    // no validation split
    let e = Mnist::new(dir.path(), Split::Val).err().unwrap();
    assert!(e.is_missing_split(), "{e}");
}

#[test]
fn truncated_jpeg_is_refused_naming_the_file() {
    let whole = jpeg(3, 40, 40);
    assert!(check_jpeg_complete(&whole).is_ok());
    let cut = &whole[..whole.len() * 2 / 3];
    // The image crate alone decodes this without an error (grey fill):
    // that is the silent wrong result being guarded against.
    assert!(::image::load_from_memory(cut).is_ok());
    let e = Image::decode(cut, ColorMode::Rgb, Path::new("train/a/cut.jpg")).unwrap_err();
    assert!(e.is_corrupt_image(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("train/a/cut.jpg") && msg.contains("truncated JPEG"),
        "{msg}"
    );
    // the message suggests nothing the command line cannot do
    assert!(!msg.contains("skip_corrupt"), "{msg}");
    // every cut point, including inside the headers and just before the end marker
    for n in (2..whole.len() - 1)
        .step_by(7)
        .chain([whole.len() - 2, whole.len() - 1])
    {
        assert!(check_jpeg_complete(&whole[..n]).is_err(), "cut at {n}");
    }
    // trailing bytes after the end marker are fine (some cameras add them)
    let mut tail = whole.clone();
    tail.extend_from_slice(b"trailer");
    assert!(Image::decode(&tail, ColorMode::Rgb, Path::new("t.jpg")).is_ok());

    // through a folder dataset
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join("good.jpg"), &whole).unwrap();
    std::fs::write(a.join("cut.jpg"), cut).unwrap();
    let f = ImageFolder::new(dir.path()).unwrap();
    let e = f.get(0).unwrap_err().to_string();
    assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
    assert!(f.get(1).is_ok());

    // truncated PNGs are already refused by the decoder
    let png = Image::zeros(3, 20, 20).to_png().unwrap();
    assert!(Image::decode(&png[..png.len() - 20], ColorMode::Rgb, Path::new("p.png")).is_err());
}

#[test]
fn empty_cifar_test_batch_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("test_batch.bin"), b"").unwrap();
    let e = Cifar10::new(dir.path(), Split::Test).err().unwrap();
    assert!(
        !e.is_missing_split(),
        "a broken split is not a missing one: {e}"
    );
    let e = e.to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("found 0") && e.contains("download"),
        "{e}"
    );
    assert!(Cifar10::new(dir.path(), Split::Val)
        .err()
        .unwrap()
        .is_missing_split());
}

#[test]
fn cifar_batches_of_another_size_are_refused_naming_file_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&b).unwrap();
    let record = [vec![1u8], vec![100u8; 3072]].concat();
    // a fake data_batch_1.bin of 20 whole records: not CIFAR-10
    for i in 1..=5 {
        std::fs::write(b.join(format!("data_batch_{i}.bin")), record.repeat(20)).unwrap();
    }
    std::fs::write(b.join("test_batch.bin"), record.repeat(20)).unwrap();
    let e = Cifar10::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data_batch_1.bin") && e.contains("expected 30730000 bytes, found 61460"),
        "{e}"
    );
    // a cut file states the real expected size, not the next whole record
    std::fs::write(b.join("test_batch.bin"), &record.repeat(2)[..5000]).unwrap();
    let e = Cifar10::new(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test_batch.bin")
            && e.contains("expected 30730000 bytes, found 5000")
            && !e.contains("6146"),
        "{e}"
    );
    // one record too many
    std::fs::write(
        b.join("test_batch.bin"),
        record.repeat(CIFAR_BATCH_RECORDS + 1),
    )
    .unwrap();
    let e = Cifar10::new(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test_batch.bin")
            && e.contains("30730000 bytes (10000 records of 3073 bytes)")
            && e.contains("found 30733073 bytes"),
        "{e}"
    );
}

fn folder(root: &Path, classes: &[(&str, &str, usize)]) {
    for (split, class, n) in classes {
        let d = root.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..*n {
            std::fs::write(d.join(format!("{i}.jpg")), jpeg(i, 12, 12)).unwrap();
        }
    }
}

#[test]
fn folder_classes_come_from_folder_names_and_splits_agree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    folder(
        root,
        &[
            ("train", "a", 2),
            ("train", "b", 2),
            ("train", "c", 2),
            ("test", "a", 1),
            ("test", "b", 0),
            ("test", "c", 1),
        ],
    );
    let spec: DatasetSpec = format!("folder:{}", root.display()).parse().unwrap();
    // an empty class folder in test/ used to shift c's label from 2 to 1
    let e = open(&spec, root, Split::Test, 8).err().unwrap();
    assert!(!e.is_missing_split());
    let e = e.to_string();
    assert!(
        e.contains(&format!("test{}b", std::path::MAIN_SEPARATOR))
            && e.contains("add images")
            && e.contains("--allow-empty-classes"),
        "{e}"
    );
    // told to allow it, the class keeps its label
    let opts = OpenOptions {
        split: Split::Test,
        allow_empty_classes: true,
        ..Default::default()
    };
    let test = open_with(&spec, root, &opts).unwrap();
    assert_eq!(test.num_classes(), 3);
    assert_eq!(test.labels().unwrap(), vec![0, 2]);
    let train = open(&spec, root, Split::Train, 8).unwrap();
    assert_eq!(train.labels().unwrap(), vec![0, 0, 1, 1, 2, 2]);

    // splits whose class folders differ are refused, naming the differences
    std::fs::remove_dir_all(root.join("test").join("b")).unwrap();
    folder(root, &[("test", "d", 1)]);
    for split in [Split::Train, Split::Test] {
        let e = open(&spec, root, split, 8).err().unwrap().to_string();
        assert!(
            e.contains("class folders") && e.contains(": b;") && e.contains(": d;"),
            "{e}"
        );
    }

    // no split folders: all pictures are the train split, and there is no test split
    let flat = tempfile::tempdir().unwrap();
    folder(flat.path(), &[("", "x", 2), ("", "y", 1)]);
    let spec: DatasetSpec = format!("folder:{}", flat.path().display()).parse().unwrap();
    assert_eq!(open(&spec, flat.path(), Split::Train, 8).unwrap().len(), 3);
    let e = open(&spec, flat.path(), Split::Test, 8).err().unwrap();
    assert!(e.is_missing_split(), "{e}");
    assert!(e.to_string().contains("train/"), "{e}");

    // a test/ folder without train/: the train split is missing, not the root
    let only = tempfile::tempdir().unwrap();
    folder(only.path(), &[("test", "x", 1)]);
    let spec: DatasetSpec = format!("folder:{}", only.path().display()).parse().unwrap();
    let e = open(&spec, only.path(), Split::Train, 8)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no train/"), "{e}");
    assert!(open(&spec, only.path(), Split::Val, 8)
        .err()
        .unwrap()
        .is_missing_split());
}

#[test]
fn hidden_files_and_folders_in_an_image_folder_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    folder(
        root,
        &[
            ("train", "a", 2),
            ("train", "b", 1),
            ("test", "a", 1),
            ("test", "b", 1),
        ],
    );
    // what macOS leaves behind: AppleDouble resource forks with the image's
    // extension, .DS_Store files, and a hidden folder (not a class)
    let fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ";
    for d in ["train/a", "train/b", "test/a"] {
        std::fs::write(root.join(d).join("._0.jpg"), fork).unwrap();
        std::fs::write(root.join(d).join(".DS_Store"), b"Bud1\0\0\0").unwrap();
    }
    std::fs::write(root.join("train").join(".DS_Store"), b"Bud1").unwrap();
    std::fs::create_dir_all(root.join("train/.thumbs")).unwrap();
    std::fs::write(root.join("train/.thumbs/._x.png"), fork).unwrap();
    std::fs::write(root.join("train/.thumbs/x.png"), fork).unwrap();
    // a class folder holding only hidden files is still an empty class
    std::fs::create_dir_all(root.join("train/c")).unwrap();
    std::fs::write(root.join("train/c/._0.jpg"), fork).unwrap();
    let e = ImageFolder::new(root.join("train"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("class folder") && e.contains("\"c\""), "{e}");
    std::fs::remove_dir_all(root.join("train/c")).unwrap();

    let spec: DatasetSpec = format!("folder:{}", root.display()).parse().unwrap();
    let train = open(&spec, root, Split::Train, 8).unwrap();
    assert_eq!(train.len(), 3);
    assert_eq!(train.num_classes(), 2);
    assert_eq!(train.labels().unwrap(), [0, 0, 1]);
    for i in 0..train.len() {
        train.get(i).unwrap();
    }
    let test = open(&spec, root, Split::Test, 8).unwrap();
    assert_eq!(test.len(), 2);
    for i in 0..test.len() {
        test.get(i).unwrap();
    }
    let f = ImageFolder::new(root.join("train")).unwrap();
    assert!(f.items().iter().all(|(p, _)| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with('.')));
}

#[test]
fn truncated_mat_file_says_truncated_not_absent() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("flowers-102");
    let (_, files) = flowers_fixture(12);
    write_files(&f, &files);
    let whole = std::fs::read(f.join("imagelabels.mat")).unwrap();
    for cut in [whole.len() - 1, whole.len() - 10, 140, 129, 100] {
        std::fs::write(f.join("imagelabels.mat"), &whole[..cut]).unwrap();
        let e = Flowers102::new(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("imagelabels.mat"), "cut {cut}: {e}");
        assert!(
            e.contains("truncated") || e.contains("incomplete"),
            "cut {cut}: {e}"
        );
        assert!(!e.contains("absent"), "cut {cut}: {e}");
    }
    // damaged compressed data
    let mut bad = whole.clone();
    for b in &mut bad[140..150] {
        *b ^= 0x5a;
    }
    std::fs::write(f.join("imagelabels.mat"), &bad).unwrap();
    let e = Flowers102::new(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("imagelabels.mat") && e.contains("damaged"),
        "{e}"
    );
}

#[test]
fn checksum_failure_of_a_from_file_says_it_was_left_untouched() {
    let from = tempfile::tempdir().unwrap();
    let src = from.path().join("a.bin");
    std::fs::write(&src, b"not the published bytes").unwrap();
    let m = Manifest {
        name: "t".into(),
        folder: "t".into(),
        files: vec![RemoteFile {
            name: "a.bin".into(),
            urls: vec![],
            md5: "00000000000000000000000000000000".into(),
            extract: false,
        }],
        extracted: vec![],
    };
    let root = tempfile::tempdir().unwrap();
    let opts = DownloadOptions {
        from: Some(from.path().to_path_buf()),
        progress: false,
    };
    let e = install(&m, root.path(), &opts).unwrap_err().to_string();
    assert!(src.exists(), "the user's file must stay");
    assert!(
        e.contains("a.bin") && e.contains("left untouched") && !e.contains("deleted"),
        "{e}"
    );
}

#[test]
fn text_that_is_not_utf8_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.txt");
    std::fs::write(&p, b"fine\nalso fine\nbad \xff byte\n").unwrap();
    let src: TextSource = format!("lines:{}", p.display()).parse().unwrap();
    let e = src.load(0).unwrap_err().to_string();
    assert!(
        e.contains("c.txt") && e.contains("line 3") && e.contains("UTF-8"),
        "{e}"
    );
    let e = parse_preferences(
        &b"{\"chosen\": \"a\", \"rejected\": \"b\"}\n\xff\n"[..],
        Path::new("p.jsonl"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("p.jsonl:2: ") && e.contains("UTF-8"), "{e}");
    for bad in ["synthetic-reviews:0", "synthetic-reviews:100000000000"] {
        let e = bad.parse::<TextSource>().unwrap_err().to_string();
        assert!(e.contains("1..=1000000"), "{e}");
    }
}
