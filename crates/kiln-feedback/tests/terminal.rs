//! The terminal labeller driven through a pseudo-terminal, as a person
//! would use it: keys typed one at a time, the screen read back through a
//! VT100 emulator. Covers choose, much better, tie, both bad, skip, undo,
//! help, a kill -9 and the resume after it, and that the export undoes the
//! random sides (chosen is the completion that was on the side picked).
//! And `label` refused on a folder that `serve` is serving.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const ROWS: u16 = 30;
const COLS: u16 = 100;

/// A child process on a pseudo-terminal, with the screen it has drawn.
struct Pty {
    child: Child,
    master: File,
    rx: Receiver<Vec<u8>>,
    screen: vt100::Parser,
}

impl Pty {
    fn spawn(args: &[&str]) -> Pty {
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two descriptors we then own.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptors from openpty.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-feedback"));
        cmd.args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec: a new
        // session whose controlling terminal is the pty (crossterm reads /dev/tty).
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn kiln-feedback");
        drop(cmd); // closes our copies of the slave side
        let mut reader = master.try_clone().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Pty {
            child,
            master,
            rx,
            screen: vt100::Parser::new(ROWS, COLS, 0),
        }
    }

    fn contents(&mut self) -> String {
        while let Ok(b) = self.rx.try_recv() {
            self.screen.process(&b);
        }
        self.screen.screen().contents()
    }

    /// Waits until the screen shows `needle`; returns the screen.
    fn wait_for(&mut self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            let s = self.contents();
            if s.contains(needle) {
                return s;
            }
            if t.elapsed() > Duration::from_secs(20) {
                panic!("timed out waiting for {needle:?}; screen:\n{s}");
            }
            if let Ok(b) = self.rx.recv_timeout(Duration::from_millis(50)) {
                self.screen.process(&b);
            }
        }
    }

    fn key(&mut self, k: &[u8]) {
        self.master.write_all(k).unwrap();
        self.master.flush().unwrap();
    }
}

fn write_pairs(path: &Path, n: usize) {
    let mut s = String::new();
    for i in 1..=n {
        s += &serde_json::json!({
            "prompt": format!("Review {i}: the film was"),
            "completion_a": format!("apple{i} great fun"),
            "completion_b": format!("banana{i} a bore"),
        })
        .to_string();
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// Which completion ("apple" or "banana") the screen shows on the left for pair `i`.
fn left_of(screen: &str, i: usize) -> &'static str {
    let (a, b) = (format!("apple{i} "), format!("banana{i} "));
    let row = screen
        .lines()
        .find(|l| l.contains(&a) && l.contains(&b))
        .unwrap_or_else(|| panic!("pair {i} not on screen:\n{screen}"));
    if row.find(&a) < row.find(&b) {
        "apple"
    } else {
        "banana"
    }
}

fn other(s: &str) -> &'static str {
    if s == "apple" {
        "banana"
    } else {
        "apple"
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect()
}

#[test]
fn label_undo_kill_resume_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 6);
    let out = tmp.path().join("labels");
    let args = [
        "label",
        "--pairs",
        pairs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--annotator",
        "ann",
    ];
    let mut p = Pty::spawn(&args);
    // The winner expected per pair: (pair, completion word, margin).
    let mut want: Vec<(usize, &str, f64)> = Vec::new();
    let s = p.wait_for("Pair 1.");
    assert!(s.contains("0 done, 6 left"), "{s}");
    let l1 = left_of(&s, 1);
    std::thread::sleep(Duration::from_millis(30)); // a person takes a moment
    p.key(b"1"); // left is better
    want.push((1, l1, 1.0));
    let s = p.wait_for("Pair 2.");
    assert!(
        s.contains("Saved pair 1") && s.contains("1 done, 5 left"),
        "{s}"
    );
    p.key(b"="); // tie
    p.wait_for("Pair 3.");
    p.key(b"b"); // both bad
    p.wait_for("Pair 4.");
    p.key(b"\x7f"); // Backspace: skip
    let s = p.wait_for("Pair 5.");
    assert!(s.contains("Skipped pair 4"), "{s}");
    let l5 = left_of(&s, 5);
    p.key(b"@"); // right much better ...
    p.wait_for("Pair 6.");
    p.key(b"u"); // ... undone
    let s = p.wait_for("Undid pair 5");
    assert!(s.contains("Pair 5.") && s.contains("4 done, 2 left"), "{s}");
    assert_eq!(left_of(&s, 5), l5, "sides are kept for a pair");
    p.key(b"2"); // right better
    want.push((5, other(l5), 1.0));
    let s = p.wait_for("Pair 6.");
    let l6 = left_of(&s, 6);
    // kill -9 with pair 6 on screen: nothing saved is lost, no line is torn.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let log = lines(&out.join("answers.jsonl"));
    assert_eq!(log.len(), 7, "{log:?}"); // 6 answers + 1 undo
    assert_eq!(log[5]["kind"], "undo");
    // The shown order recorded is the one the screen had.
    let shown1 = if l1 == "apple" { "ab" } else { "ba" };
    assert_eq!(log[0]["shown"], shown1);
    assert_eq!(log[0]["annotator"], "ann");
    assert!(log[0]["seconds"].as_f64().unwrap() >= 0.03, "{}", log[0]);

    let mut p = Pty::spawn(&args);
    let s = p.wait_for("Pair 6.");
    assert!(s.contains("Resumed: 5 earlier answers"), "{s}");
    assert_eq!(left_of(&s, 6), l6);
    p.key(b"!"); // left much better
    want.push((6, l6, 2.0));
    let s = p.wait_for("All done");
    assert!(s.contains("6 done, 0 left"), "{s}");
    p.key(b"?");
    p.wait_for("Keys (no Enter needed)");
    p.key(b"q");
    let st = p.child.wait().unwrap();
    assert!(st.success(), "{st:?}");

    let o = Command::new(env!("CARGO_BIN_EXE_kiln-feedback"))
        .args(["export", out.to_str().unwrap(), "--format", "trl"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        said.contains(
            "3 preference pairs; dropped 1 ties, 1 both-bad, 0 without a majority, 1 unlabelled"
        ),
        "{said}"
    );
    let rows = lines(&out.join("export-trl.jsonl"));
    assert_eq!(rows.len(), want.len());
    for (row, (i, winner, margin)) in rows.iter().zip(&want) {
        assert_eq!(row["prompt"], format!("Review {i}: the film was"));
        let text = |w: &str| {
            if w == "apple" {
                format!("apple{i} great fun")
            } else {
                format!("banana{i} a bore")
            }
        };
        assert_eq!(row["chosen"], text(winner), "pair {i}");
        assert_eq!(row["rejected"], text(other(winner)), "pair {i}");
        assert_eq!(row["margin"].as_f64(), Some(*margin), "pair {i}");
    }
    let _ = p.master.as_raw_fd();
}

/// `label` on a folder that a running `serve` holds is refused with a
/// message naming the folder (both write the same answers file).
#[test]
fn label_is_refused_while_serve_holds_the_folder() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let out = tmp.path().join("labels");
    let mut server = Command::new(env!("CARGO_BIN_EXE_kiln-feedback"))
        .args(["serve", "--addr", "127.0.0.1:0", "--pairs"])
        .arg(&pairs)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("listening on "), "{first}");
    let mut p = Pty::spawn(&[
        "label",
        "--pairs",
        pairs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--annotator",
        "ann",
    ]);
    // The whole message (its end may arrive after its start; a long path wraps).
    let t = Instant::now();
    let flat = loop {
        let flat = p.contents().replace('\n', "");
        if flat.contains("use another --out folder") {
            break flat;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "screen:\n{flat}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let st = p.child.wait().unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(
        !st.success()
            && flat.contains(&format!("{} is in use", out.display()))
            && flat.contains("another process is serving it (rlhf serve, pid"),
        "{st:?}\n{flat}"
    );
}
