//! Downloads against a loopback HTTP server: resume, checksum mismatch,
//! redirect, install + extraction of a Flowers102-shaped fixture, `--from`,
//! and hostile archives.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use kiln_data::download::*;
use kiln_data::{DataError, Dataset, Flowers102, Split};

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn interrupted_download_resumes_with_range() {
    let data = payload(300_000);
    let md5 = md5_hex(&data);
    let srv = serve(HashMap::from([(
        "/f.bin".to_string(),
        Route::DropFirst(data.clone(), 100_000),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    let urls = vec![format!("{}/f.bin", srv.base)];
    let e = fetch_file(&urls, &dest, &md5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("resume"), "{e}");
    assert!(!dest.exists());
    let part = dir.path().join("f.bin.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 100_000);
    fetch_file(&urls, &dest, &md5, false).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(!part.exists());
    let log = srv.log.lock().unwrap().clone();
    assert_eq!(log, vec!["/f.bin -", "/f.bin 100000"]);
}

#[test]
fn checksum_mismatch_removes_the_file() {
    let srv = serve(HashMap::from([(
        "/f.bin".to_string(),
        Route::File(payload(1000)),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    let e = fetch_file(
        &[format!("{}/f.bin", srv.base)],
        &dest,
        "00000000000000000000000000000000",
        false,
    )
    .unwrap_err();
    assert!(matches!(e, DataError::Checksum { .. }), "{e}");
    assert!(
        e.to_string().contains("f.bin") && e.to_string().contains("expected 0000"),
        "{e}"
    );
    assert!(!dest.exists() && !dir.path().join("f.bin.part").exists());
}

#[test]
fn redirects_are_followed_and_mirrors_tried_in_order() {
    let data = payload(5000);
    let srv = serve(HashMap::from([
        ("/new/f.bin".to_string(), Route::File(data.clone())),
        (
            "/old/f.bin".to_string(),
            Route::Redirect("/new/f.bin".into()),
        ),
    ]));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.bin");
    let urls = vec![
        format!("{}/missing", srv.base),
        format!("{}/old/f.bin", srv.base),
    ];
    fetch_file(&urls, &dest, &md5_hex(&data), false).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let log = srv.log.lock().unwrap().clone();
    assert_eq!(log, vec!["/missing -", "/old/f.bin -", "/new/f.bin -"]);
}

fn flowers_manifest(base: &str, tgz: &[u8], labels: &[u8], setid: &[u8]) -> Manifest {
    let f = |name: &str, data: &[u8], extract| RemoteFile {
        name: name.into(),
        urls: vec![format!("{base}/{name}")],
        md5: md5_hex(data),
        extract,
    };
    Manifest {
        name: "flowers102".into(),
        folder: "flowers-102".into(),
        files: vec![
            f("102flowers.tgz", tgz, true),
            f("imagelabels.mat", labels, false),
            f("setid.mat", setid, false),
        ],
        extracted: vec!["jpg/image_00001.jpg".into(), "jpg/image_00012.jpg".into()],
    }
}

#[test]
fn install_flowers_fixture_then_noop_then_from_folder() {
    let (labels, files) = flowers_fixture(12);
    let jpgs: Vec<(String, Vec<u8>)> = files
        .iter()
        .filter(|(p, _)| p.starts_with("jpg/"))
        .cloned()
        .collect();
    let get = |n: &str| files.iter().find(|(p, _)| p == n).unwrap().1.clone();
    let (lab, set) = (get("imagelabels.mat"), get("setid.mat"));
    let tgz = tar_gz(&jpgs);
    let srv = serve(HashMap::from([
        ("/102flowers.tgz".to_string(), Route::File(tgz.clone())),
        ("/imagelabels.mat".to_string(), Route::File(lab.clone())),
        ("/setid.mat".to_string(), Route::File(set.clone())),
    ]));
    let m = flowers_manifest(&srv.base, &tgz, &lab, &set);
    let dir = tempfile::tempdir().unwrap();
    let opts = DownloadOptions::default();
    let r = install(&m, dir.path(), &opts).unwrap();
    assert_eq!(r.fetched.len(), 3);
    assert_eq!(r.extracted, vec!["102flowers.tgz"]);
    let ds = Flowers102::new(dir.path(), Split::Test).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!(ds.get(0).unwrap().label, labels[8] as usize - 1);
    // no temporary folders or part files left behind
    let names: Vec<String> = std::fs::read_dir(dir.path().join("flowers-102"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with('.') && !n.ends_with(".part")),
        "{names:?}"
    );

    // second run: nothing fetched, nothing extracted, no request made
    let before = srv.log.lock().unwrap().len();
    let r = install(&m, dir.path(), &opts).unwrap();
    assert!(r.was_complete(), "{r:?}");
    assert_eq!(srv.log.lock().unwrap().len(), before);

    // --from: a folder with the original files
    let from = tempfile::tempdir().unwrap();
    std::fs::write(from.path().join("102flowers.tgz"), &tgz).unwrap();
    std::fs::write(from.path().join("imagelabels.mat"), &lab).unwrap();
    std::fs::write(from.path().join("setid.mat"), b"tampered").unwrap();
    let other = tempfile::tempdir().unwrap();
    let opts = DownloadOptions {
        from: Some(from.path().to_path_buf()),
        progress: false,
    };
    let e = install(&m, other.path(), &opts).unwrap_err();
    assert!(matches!(e, DataError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("setid.mat"), "{e}");
    assert!(!other.path().join("flowers-102/setid.mat").exists());
    std::fs::write(from.path().join("setid.mat"), &set).unwrap();
    let r = install(&m, other.path(), &opts).unwrap();
    assert_eq!(r.fetched, vec!["setid.mat"]); // the rest was installed by the failed run
    assert_eq!(
        Flowers102::new(other.path(), Split::Train).unwrap().len(),
        4
    );
    std::fs::remove_file(from.path().join("setid.mat")).unwrap();
    std::fs::remove_file(other.path().join("flowers-102/setid.mat")).unwrap();
    let e = install(&m, other.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("setid.mat") && e.contains("--from"), "{e}");
}

#[test]
fn hostile_archives_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            hostile_tar_gz("../evil.txt", tar::EntryType::Regular, None),
            "../evil.txt",
        ),
        (
            hostile_tar_gz("/tmp/kiln-evil.txt", tar::EntryType::Regular, None),
            "/tmp/kiln-evil.txt",
        ),
        (
            hostile_tar_gz("jpg/link", tar::EntryType::Symlink, Some("../../outside")),
            "jpg/link",
        ),
        (
            hostile_tar_gz("jpg/abs", tar::EntryType::Symlink, Some("/etc/passwd")),
            "jpg/abs",
        ),
        (
            hostile_tar_gz("jpg/hard", tar::EntryType::Link, Some("../x")),
            "jpg/hard",
        ),
    ];
    for (bytes, entry) in cases {
        let a = dir.path().join("a.tgz");
        std::fs::write(&a, bytes).unwrap();
        let e = extract_tar_gz(&a, &target).unwrap_err();
        assert!(matches!(e, DataError::UnsafeArchive { .. }), "{e}");
        assert!(e.to_string().contains(entry), "{e}");
    }
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    assert!(!dir.path().join("evil.txt").exists());
    // a link inside the folder is fine
    let ok = hostile_tar_gz(
        "jpg/inside",
        tar::EntryType::Symlink,
        Some("image_00001.jpg"),
    );
    let a: PathBuf = dir.path().join("ok.tgz");
    std::fs::write(&a, ok).unwrap();
    assert_eq!(extract_tar_gz(&a, &target).unwrap(), 1);
}
