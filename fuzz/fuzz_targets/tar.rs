//! Tar extraction (`download::extract_tar_gz`): the input is a tar stream
//! (gzipped here unless it already is one). Nothing may land outside the
//! destination folder, and no link may lead out of it.
#![no_main]
use kiln_data::download::extract_tar_gz;
use libfuzzer_sys::fuzz_target;

/// Every path under `dir`, recursively (links are not followed).
fn tree(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                tree(&e.path(), out);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    let gz = if data.starts_with(&[0x1f, 0x8b]) {
        data.to_vec()
    } else {
        kiln_fuzz::gzip(data)
    };
    let archive = kiln_fuzz::put(dir.path(), "a.tar.gz", &gz);
    let dest = dir.path().join("out");
    std::fs::create_dir_all(&dest).expect("create dest");
    let _ = extract_tar_gz(&archive, &dest);
    let mut all = Vec::new();
    tree(dir.path(), &mut all);
    for p in all {
        assert!(
            p == archive || p == dest || p.starts_with(&dest),
            "extraction wrote outside its folder: {}",
            p.display()
        );
        // A link must resolve inside the destination (a dangling one is harmless).
        if let (true, Ok(target)) = (p.starts_with(&dest), std::fs::canonicalize(&p)) {
            let root = std::fs::canonicalize(&dest).expect("canonical dest");
            assert!(
                target.starts_with(&root),
                "a link leads outside: {}",
                p.display()
            );
        }
    }
});
