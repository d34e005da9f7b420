//! Fixture writers in the real on-disk formats, and a loopback HTTP server.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;

/// MATLAB v5 data types.
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MX_DOUBLE_CLASS: u32 = 6;

fn element(out: &mut Vec<u8>, ty: u32, data: &[u8]) {
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
}

/// A MATLAB v5 file whose variables are 1xN class-double row vectors stored
/// as miUINT8 (when all values fit) or miUINT16, each inside a zlib
/// `miCOMPRESSED` element — the way Flowers102's `imagelabels.mat` and
/// `setid.mat` are written.
pub fn mat_v5(vars: &[(&str, &[u16])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut text =
        b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Feb 19 15:43:33 2009".to_vec();
    text.resize(116, b' ');
    out.extend_from_slice(&text);
    out.extend_from_slice(&[0u8; 8]); // subsystem data offset
    out.extend_from_slice(&0x0100u16.to_le_bytes()); // version
    out.extend_from_slice(b"IM"); // little-endian indicator
    for (name, values) in vars {
        let mut body = Vec::new();
        let mut flags = Vec::new();
        flags.extend_from_slice(&MX_DOUBLE_CLASS.to_le_bytes());
        flags.extend_from_slice(&0u32.to_le_bytes());
        element(&mut body, MI_UINT32, &flags);
        let mut dims = Vec::new();
        dims.extend_from_slice(&1i32.to_le_bytes());
        dims.extend_from_slice(&(values.len() as i32).to_le_bytes());
        element(&mut body, MI_INT32, &dims);
        element(&mut body, MI_INT8, name.as_bytes());
        if values.iter().all(|&v| v <= 255) {
            let d: Vec<u8> = values.iter().map(|&v| v as u8).collect();
            element(&mut body, MI_UINT8, &d);
        } else {
            let d: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            element(&mut body, MI_UINT16, &d);
        }
        let mut matrix = Vec::new();
        matrix.extend_from_slice(&MI_MATRIX.to_le_bytes());
        matrix.extend_from_slice(&(body.len() as u32).to_le_bytes());
        matrix.extend_from_slice(&body);
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&matrix).unwrap();
        let comp = z.finish().unwrap();
        out.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
        out.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        out.extend_from_slice(&comp);
    }
    out
}

/// A small JPEG (a synthetic flower of class `k` at `w x h`).
pub fn jpeg(k: usize, w: usize, h: usize) -> Vec<u8> {
    use kiln_data::Dataset;
    let cfg = kiln_data::SyntheticFlowersConfig {
        size: w.max(h),
        train: 64,
        ..Default::default()
    };
    let ds = kiln_data::SyntheticFlowers::new(cfg, kiln_data::Split::Train).unwrap();
    let img = ds.get(k % 64).unwrap().image;
    let img = kiln_data::transforms::crop(&img, 0, 0, h, w).unwrap();
    img.to_jpeg().unwrap()
}

/// Flowers102 fixture: `n` JPEGs, labels `1 + (i * 7) % 102`, and splits
/// trnid = 1..=4, valid = 5..=8, tstid = 9..=n. Returns (labels, files) where
/// files are (relative path, bytes) for `jpg/..`, and the two .mat files.
pub fn flowers_fixture(n: usize) -> (Vec<u16>, Vec<(String, Vec<u8>)>) {
    let labels: Vec<u16> = (0..n).map(|i| 1 + ((i * 7) % 102) as u16).collect();
    let mut files = Vec::new();
    for i in 1..=n {
        files.push((format!("jpg/image_{i:05}.jpg"), jpeg(i, 40 + i, 30 + 2 * i)));
    }
    let trn: Vec<u16> = (1..=4).collect();
    let val: Vec<u16> = (5..=8).collect();
    let tst: Vec<u16> = (9..=n as u16).collect();
    files.push(("imagelabels.mat".into(), mat_v5(&[("labels", &labels)])));
    files.push((
        "setid.mat".into(),
        mat_v5(&[("trnid", &trn), ("valid", &val), ("tstid", &tst)]),
    ));
    (labels, files)
}

/// Writes `(relative path, bytes)` files under `dir`.
pub fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (p, b) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b).unwrap();
    }
}

/// A .tar.gz of `(path, bytes)` regular files.
pub fn tar_gz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, p, &data[..]).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A .tar.gz with one raw entry whose name (and link target) bypass the tar
/// crate's path checks, to build hostile archives.
pub fn hostile_tar_gz(name: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"pwned"
    } else {
        b""
    };
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, data).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

/// Gzip of bytes.
pub fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An IDX file of u8 data.
pub fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// md5 hex of bytes.
pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    format!("{:x}", md5::Md5::digest(data))
}

/// What the loopback server answers on a path.
#[derive(Clone)]
pub enum Route {
    /// The bytes, honouring `Range: bytes=N-` with 206.
    File(Vec<u8>),
    /// 302 to another path.
    Redirect(String),
    /// The first request gets only the first `n` bytes (then the connection
    /// drops); later ones behave like `File`.
    DropFirst(Vec<u8>, usize),
}

/// A loopback HTTP/1.1 server on 127.0.0.1; logs "PATH RANGE" per request.
pub struct Server {
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn serve(routes: HashMap<String, Route>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    let hits = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range: Option<u64> = None;
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
                let lower = l.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range: bytes=") {
                    range = v.trim().trim_end_matches('-').parse().ok();
                }
            }
            log2.lock().unwrap().push(format!(
                "{path} {}",
                range.map_or("-".to_string(), |r| r.to_string())
            ));
            match routes.get(&path) {
                None => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                Some(Route::Redirect(to)) => {
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                }
                Some(route) => {
                    let (data, cut) = match route {
                        Route::File(d) => (d, None),
                        Route::DropFirst(d, n) => {
                            let first = hits.fetch_add(1, Ordering::SeqCst) == 0;
                            (d, first.then_some(*n))
                        }
                        Route::Redirect(_) => unreachable!(),
                    };
                    let start = range.unwrap_or(0).min(data.len() as u64) as usize;
                    let body = &data[start..];
                    let head = if range.is_some() {
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
                            body.len(),
                            start,
                            data.len().saturating_sub(1),
                            data.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                    };
                    let _ = stream.write_all(head.as_bytes());
                    let n = cut.unwrap_or(body.len()).min(body.len());
                    let _ = stream.write_all(&body[..n]);
                }
            }
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    });
    Server { base, log }
}
