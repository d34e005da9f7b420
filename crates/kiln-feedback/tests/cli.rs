//! The commands on awkward input: a torn log is warned about, failures
//! before labelling leave no folder behind (a bad pairs file is named with
//! its line), annotator lists are checked, a second server on a folder is
//! refused, agreement counts unlabelled items as export does, and an export
//! never overwrites the folder's own files.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_feedback::cli::{self, AgreementArgs, ExportArgs, ServeArgs};
use kiln_feedback::export::{export, Format};
use kiln_feedback::plan::Plan;
use kiln_feedback::server::{start, ServeOptions, DEFAULT_MAX_BODY};
use kiln_feedback::store::{decode_key, now_rfc3339, Answer, AnswerLog, LabelDir, Order, Record};

mod common;
use common::write_pairs;

/// A folder with `n` answers by ann (all `a`, so every item goes to the export).
fn labelled(root: &Path, n: usize) -> std::path::PathBuf {
    let pairs = root.join("pairs.jsonl");
    write_pairs(&pairs, n);
    let out = root.join("lab");
    LabelDir::create(&out, &pairs).unwrap();
    let log = AnswerLog::open(&out).unwrap();
    for i in 1..=n {
        let (label, margin) = decode_key("1", Order::Ab).unwrap();
        log.append(&Record::Answer(Answer {
            item: i.to_string(),
            annotator: "ann".into(),
            time: now_rfc3339(),
            seconds: 1.0,
            shown: Order::Ab,
            key: "1".into(),
            label,
            margin,
            repeat: false,
        }))
        .unwrap();
    }
    out
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln-feedback"))
}

fn serve_args(pairs: &Path, out: &Path, addr: &str, annotators: &[&str]) -> ServeArgs {
    ServeArgs {
        pairs: pairs.to_path_buf(),
        out: out.to_path_buf(),
        addr: addr.parse().unwrap(),
        annotators: annotators.iter().map(|s| s.to_string()).collect(),
        min_submitted: 1,
        repeat_share: 0.0,
        require_tokens: false,
    }
}

/// Eleven answers, the last line cut off by a crash: `agreement` and
/// `export` count ten and say, on stderr, which line was left out.
#[test]
fn a_torn_last_line_is_shown_as_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = labelled(tmp.path(), 11);
    let log = out.join("answers.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, &text[..text.len() - 30]).unwrap();
    for cmd in [&["agreement"][..], &["export", "--format", "raw"]] {
        let o = bin().args(cmd).arg(&out).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(o.status.success(), "{cmd:?}: {stderr}");
        assert!(
            stdout.contains("10 answers"),
            "{cmd:?} counts the ten whole lines: {stdout}"
        );
        assert!(
            stderr.contains("warning: ")
                && stderr.contains("answers.jsonl:11: the last line is cut off"),
            "{cmd:?} must warn: {stderr}"
        );
    }
}

/// `label` without a terminal fails before creating --out.
#[test]
fn label_without_a_terminal_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let out = tmp.path().join("lab");
    let mut cmd = bin();
    cmd.args(["label", "--annotator", "ann", "--pairs"])
        .arg(&pairs)
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // A session of its own has no controlling terminal (no /dev/tty to fall back on).
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("needs an interactive terminal"), "{stderr}");
    assert!(
        !out.exists(),
        "label created {} before failing",
        out.display()
    );
}

/// `serve` on a busy port fails before creating --out.
#[test]
fn serve_on_a_busy_port_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let out = tmp.path().join("lab");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let e = cli::serve(&serve_args(&pairs, &out, &addr, &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("binding {addr}")), "{e}");
    assert!(
        !out.exists(),
        "serve created {} before failing",
        out.display()
    );
}

/// An annotator named twice is refused (by the library, then by `serve`
/// before it creates --out); before, the first URL's token was dead.
#[test]
fn annotators_named_twice_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let lib = tmp.path().join("lib");
    let opts = ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        annotators: vec!["alice".into(), "bob".into(), "alice".into()],
        require_tokens: true,
        plan: Plan::everything(),
        max_body: DEFAULT_MAX_BODY,
    };
    let e = start(LabelDir::create(&lib, &pairs).unwrap(), &opts)
        .err()
        .expect("a list with alice twice must be refused")
        .to_string();
    assert!(e.contains("--annotators: \"alice\" is listed twice"), "{e}");
    // Only reached when refused: a server that started would serve forever.
    let out = tmp.path().join("lab");
    let e = cli::serve(&serve_args(
        &pairs,
        &out,
        "127.0.0.1:0",
        &["alice", "alice"],
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"alice\" is listed twice"), "{e}");
    assert!(!out.exists());
}

/// `--min-submitted` above the number of annotators who can answer (each
/// answers an item once) was accepted and every item went to everyone while
/// the overlap asked for never came; it is refused at start, by `serve`
/// before it creates --out and by the library, naming the flag, the value
/// and the limit. Answers already in the folder count towards the limit;
/// without named annotators anyone may join, so there is none.
#[test]
fn an_unreachable_min_submitted_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 3);
    let opts = |annotators: &[&str], min_submitted| ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        annotators: annotators.iter().map(|s| s.to_string()).collect(),
        require_tokens: true,
        plan: Plan {
            min_submitted,
            ..Plan::everything()
        },
        max_body: DEFAULT_MAX_BODY,
    };
    // The library first (a `serve` that started would serve forever).
    let lib = LabelDir::create(&tmp.path().join("lib"), &pairs).unwrap();
    let e = start(lib, &opts(&["alice", "bob"], 3))
        .err()
        .expect("3 answers per item from 2 annotators must be refused")
        .to_string();
    assert!(
        e.contains("--min-submitted 3") && e.contains("1..=2") && e.contains("the 2 named"),
        "{e}"
    );
    // ann's 3 answers are in this folder: alice, bob and ann can answer.
    let lab = labelled(tmp.path(), 3);
    let e = start(LabelDir::open(&lab).unwrap(), &opts(&["alice", "bob"], 4))
        .err()
        .expect("4 answers per item from 3 annotators must be refused")
        .to_string();
    assert!(
        e.contains("--min-submitted 4") && e.contains("1..=3") && e.contains("1 more"),
        "{e}"
    );
    // Reachable: started, then stopped by the drop.
    for (who, min) in [
        (&["alice", "bob"][..], 3),
        (&["ann"][..], 1),
        (&[][..], 100),
    ] {
        drop(start(LabelDir::open(&lab).unwrap(), &opts(who, min)).unwrap());
    }
    // `serve` refuses before creating --out, and counts the folder's answers.
    let out = tmp.path().join("new");
    let mut a = serve_args(&pairs, &out, "127.0.0.1:0", &["alice", "bob"]);
    a.min_submitted = 3;
    let e = cli::serve(&a).unwrap_err().to_string();
    assert!(
        e.contains("--min-submitted 3") && e.contains("1..=2"),
        "{e}"
    );
    assert!(!out.exists(), "serve created {}", out.display());
    let mut a = serve_args(&pairs, &lab, "127.0.0.1:0", &["alice", "bob"]);
    a.min_submitted = 4;
    let e = cli::serve(&a).unwrap_err().to_string();
    assert!(
        e.contains("--min-submitted 4") && e.contains("1..=3"),
        "{e}"
    );
}

/// An export onto the folder's answers, pairs or report is refused however
/// the path is spelled, and the log survives; elsewhere in the folder is fine.
#[test]
fn export_refuses_to_overwrite_the_folders_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = labelled(tmp.path(), 3);
    let log = out.join("answers.jsonl");
    let before = std::fs::read(&log).unwrap();
    let dir = LabelDir::open(&out).unwrap();
    for p in [
        log.clone(),
        out.join("pairs.jsonl"),
        out.join("agreement.json"),
        out.join(".").join("answers.jsonl"),
        out.join("../lab/answers.jsonl"),
    ] {
        let e = export(&dir, Format::Trl, &p).unwrap_err().to_string();
        assert!(
            e.contains("is the labelling folder's own") && e.contains("overwrite"),
            "{}: {e}",
            p.display()
        );
    }
    let e = cli::export(&ExportArgs {
        dir: out.clone(),
        format: Format::Raw,
        out: Some(log.clone()),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("answers.jsonl"), "{e}");
    assert_eq!(std::fs::read(&log).unwrap(), before);
    assert_eq!(LabelDir::open(&out).unwrap().ledger.all().len(), 3);
    let s = export(&dir, Format::Trl, &out.join("export-trl.jsonl")).unwrap();
    assert_eq!(s.rows, 3);
}

/// Starts `kiln-feedback serve` on `out`; returns it and its first stdout
/// line, or what it printed when it exited instead (within 20 s).
fn spawn_serve(pairs: &Path, out: &Path) -> (Child, Result<String, String>) {
    let mut child = bin()
        .arg("serve")
        .arg("--pairs")
        .arg(pairs)
        .arg("--out")
        .arg(out)
        .args(["--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send(line);
    });
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (child, Err(format!("{st}: {err}")));
        }
        if let Ok(line) = rx.try_recv() {
            if line.starts_with("listening on ") {
                return (child, Ok(line));
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "serve neither listened nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A second `serve` on a folder another one is serving is refused, naming
/// the folder and the holder; the lock goes with the first server, even
/// when it is killed with SIGKILL.
#[test]
fn a_second_server_on_one_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let out = tmp.path().join("lab");
    let (mut first, said) = spawn_serve(&pairs, &out);
    said.unwrap();
    let (mut second, said) = spawn_serve(&pairs, &out);
    let _ = second.kill();
    let _ = second.wait();
    let e = said.expect_err("a second server started on the same folder");
    assert!(
        e.contains(&format!("{} is in use", out.display()))
            && e.contains(&format!(
                "another process is serving it (rlhf serve, pid {})",
                first.id()
            )),
        "{e}"
    );
    // In-process too: `label` takes the same lock through the same call.
    let e = LabelDir::create_locked(&out, &pairs, "label")
        .unwrap_err()
        .to_string();
    assert!(e.contains("another process is serving it"), "{e}");
    first.kill().unwrap(); // SIGKILL: the OS drops the lock with the process
    first.wait().unwrap();
    let (mut third, said) = spawn_serve(&pairs, &out);
    let _ = third.kill();
    let _ = third.wait();
    said.unwrap();
    assert!(LabelDir::create_locked(&out, &pairs, "label").is_ok());
}

/// A pairs file with a bad UTF-8 byte is named with its line and leaves no
/// folder; a folder whose pairs copy has no answers yet takes a corrected
/// file; a file starting with a byte order mark (and CRLF) is read.
#[test]
fn a_bad_pairs_file_is_named_and_does_not_block_the_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let good = "{\"prompt\":\"Q\",\"completion_a\":\"x\",\"completion_b\":\"y\"}\n";
    let pinv = tmp.path().join("pinv.jsonl");
    let mut bytes = format!("{good}{}", good.replace('Q', "R")).into_bytes();
    let at = good.len() + 11; // the second prompt's `R`
    bytes[at] = 0xff;
    std::fs::write(&pinv, &bytes).unwrap();
    let s5 = tmp.path().join("S5");
    let e = cli::serve(&serve_args(&pinv, &s5, "127.0.0.1:0", &[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{}:2: invalid UTF-8", pinv.display())),
        "{e}"
    );
    assert!(!s5.exists(), "a failed start created {}", s5.display());
    // A pairs copy without answers (a start with no answer given) does not
    // hold the folder to that file.
    let p1 = tmp.path().join("p1.jsonl");
    write_pairs(&p1, 2);
    LabelDir::create(&s5, &p1).unwrap();
    let pbom = tmp.path().join("pbom.jsonl");
    std::fs::write(&pbom, format!("\u{feff}{}", good.replace('\n', "\r\n"))).unwrap();
    let d = LabelDir::create(&s5, &pbom).unwrap();
    assert_eq!((d.items.len(), d.items[0].prompt_text().as_str()), (1, "Q"));
    // Once it has an answer, it does.
    let log = AnswerLog::open(&s5).unwrap();
    let (label, margin) = decode_key("1", Order::Ab).unwrap();
    log.append(&Record::Answer(Answer {
        item: "1".into(),
        annotator: "ann".into(),
        time: now_rfc3339(),
        seconds: 1.0,
        shown: Order::Ab,
        key: "1".into(),
        label,
        margin,
        repeat: false,
    }))
    .unwrap();
    let e = LabelDir::create(&s5, &p1).unwrap_err().to_string();
    assert!(
        e.contains("already holds answers for another pairs file"),
        "{e}"
    );
    assert_eq!(LabelDir::create(&s5, &pbom).unwrap().ledger.all().len(), 1);
}

/// With no answers, agreement calls both items unlabelled, as export does;
/// an even split is "no majority".
#[test]
fn agreement_counts_unlabelled_items_as_export_does() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let out = tmp.path().join("lab");
    LabelDir::create(&out, &pairs).unwrap();
    let r = cli::agreement(&AgreementArgs { dir: out.clone() }).unwrap();
    let s = r.summary();
    assert!(s.ends_with("majority labels: unlabelled 2"), "{s}");
    let e = cli::export(&ExportArgs {
        dir: out.clone(),
        format: Format::Trl,
        out: None,
    })
    .unwrap();
    assert_eq!((e.unlabelled, e.no_majority), (2, 0));
    // ann says a, bob says b on item 1: an even split.
    let log = AnswerLog::open(&out).unwrap();
    for (who, key) in [("ann", "1"), ("bob", "2")] {
        let (label, margin) = decode_key(key, Order::Ab).unwrap();
        log.append(&Record::Answer(Answer {
            item: "1".into(),
            annotator: who.into(),
            time: now_rfc3339(),
            seconds: 1.0,
            shown: Order::Ab,
            key: key.into(),
            label,
            margin,
            repeat: false,
        }))
        .unwrap();
    }
    let s = cli::agreement(&AgreementArgs { dir: out })
        .unwrap()
        .summary();
    assert!(
        s.ends_with("majority labels: no majority 1, unlabelled 1"),
        "{s}"
    );
}

/// `--addr` takes a host name as well as an IP address.
#[test]
fn addr_accepts_a_host_name() {
    let a = ServeArgs::try_parse_from([
        "serve",
        "--pairs",
        "p",
        "--out",
        "o",
        "--addr",
        "localhost:8457",
    ])
    .unwrap();
    assert!(
        a.addr.ip().is_loopback() && a.addr.port() == 8457,
        "{}",
        a.addr
    );
    let e = ServeArgs::try_parse_from(["serve", "--pairs", "p", "--out", "o", "--addr", "nohost"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--addr") && e.contains("HOST:PORT"), "{e}");
}
