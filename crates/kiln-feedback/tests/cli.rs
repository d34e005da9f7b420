//! The commands on awkward input: a torn log is warned about, failures
//! before labelling leave no folder behind, annotator lists are checked, and
//! an export never overwrites the folder's own files.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use kiln_feedback::cli::{self, ExportArgs, ServeArgs};
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
