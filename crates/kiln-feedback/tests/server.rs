//! The labelling server over real HTTP on loopback: bad requests get a 4xx
//! with a JSON reason; only the pair handed out can be answered, across a
//! restart too; tokens survive a restart; 1,000 concurrent answers from 20
//! clients land as 1,000 whole lines; a server killed mid-load has kept
//! every answer it acknowledged.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_feedback::plan::Plan;
use kiln_feedback::server::{start, ServeOptions, DEFAULT_MAX_BODY};
use kiln_feedback::store::{read_log, LabelDir, Record};

mod common;
use common::write_pairs;

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build()
}

/// (status, body) of a request; 4xx/5xx are answers too.
fn call(a: &ureq::Agent, method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let req = a
        .request(method, url)
        .set("content-type", "application/json");
    let r = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// The `error` of a JSON error body (panics on anything else: every error must be JSON).
fn error_of(status: u16, text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{status}: not a JSON body ({e}): {text}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}: no \"error\" string: {text}"))
        .to_string()
}

fn opts(annotators: &[String], min_submitted: usize) -> ServeOptions {
    ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        annotators: annotators.to_vec(),
        require_tokens: true,
        plan: Plan {
            min_submitted,
            repeat_share: 0.0,
            repeat_gap: 5,
        },
        max_body: DEFAULT_MAX_BODY,
    }
}

fn token(url: &str) -> String {
    url.split("&t=").nth(1).unwrap().to_string()
}

#[test]
fn bad_requests_get_4xx_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 3);
    let dir = LabelDir::create(&tmp.path().join("out"), &pairs).unwrap();
    let s = start(dir, &opts(&["ann".into(), "bob".into()], 2)).unwrap();
    let base = format!("http://{}", s.addr);
    let t = token(&s.urls[0].1);
    assert_eq!(t.len(), 32);
    assert_ne!(t, token(&s.urls[1].1));
    let a = agent();
    let ok = format!("?a=ann&t={t}");
    let body = r#"{"key":"1","seconds":1.5}"#;
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            format!("/api/answer/99{ok}"),
            Some(body.into()),
            404,
            "unknown item \"99\"",
        ),
        (
            "POST",
            format!("/api/answer/..%2F..%2Fetc%2Fpasswd{ok}"),
            Some(body.into()),
            400,
            "not a valid id",
        ),
        (
            "POST",
            format!("/api/answer/%2e%2e%2fx{ok}"),
            Some(body.into()),
            400,
            "not a valid id",
        ),
        (
            "POST",
            format!("/api/answer/a%00b{ok}"),
            Some(body.into()),
            400,
            "not a valid id",
        ),
        (
            "POST",
            "/api/answer/1?a=ann&t=0000".into(),
            Some(body.into()),
            403,
            "bad token",
        ),
        (
            "POST",
            "/api/answer/1?a=ann".into(),
            Some(body.into()),
            403,
            "missing token",
        ),
        (
            "GET",
            "/api/next?a=eve&t=x".into(),
            None,
            403,
            "unknown annotator",
        ),
        ("GET", "/api/next".into(), None, 400, "missing annotator"),
        (
            "POST",
            format!("/api/answer/1{ok}"),
            Some(format!(
                r#"{{"key":"1","seconds":1,"pad":"{}"}}"#,
                "x".repeat(8000)
            )),
            413,
            "length limit",
        ),
        (
            "POST",
            format!("/api/answer/1{ok}"),
            Some(r#"{"key":"9","seconds":1}"#.into()),
            400,
            "key \"9\" is not one of",
        ),
        (
            "POST",
            format!("/api/answer/1{ok}"),
            Some(r#"{"key":"1","seconds":-3}"#.into()),
            400,
            "seconds must be",
        ),
        (
            "POST",
            format!("/api/answer/1{ok}"),
            Some("{oops".into()),
            400,
            "JSON",
        ),
        (
            "POST",
            format!("/api/answer/1{ok}"),
            Some(r#"{"key":"1"}"#.into()),
            422,
            "missing field `seconds`",
        ),
        (
            "POST",
            format!("/api/answer/{}{ok}", "x".repeat(5000)),
            Some(body.into()),
            400,
            "not a valid id",
        ),
        (
            "POST",
            format!("/api/answer/%FF{ok}"),
            Some(body.into()),
            400,
            "UTF-8",
        ),
        (
            "GET",
            format!("/api/answer/1{ok}"),
            None,
            405,
            "method not allowed",
        ),
        (
            "POST",
            format!("/api/undo{ok}"),
            None,
            409,
            "nothing to undo",
        ),
        ("GET", "/etc/passwd".into(), None, 404, "no such page"),
    ];
    for (m, path, b, code, why) in &cases {
        let (c, text) = call(&a, m, &format!("{base}{path}"), b.as_deref());
        let shown = &path[..path.len().min(80)];
        // Every error is JSON with a reason, and a long value is not echoed whole.
        let err = error_of(c, &text);
        assert!(
            text.len() < 1000,
            "{m} {shown}: {} bytes: {text}",
            text.len()
        );
        assert_eq!(
            (c, err.contains(why)),
            (*code, true),
            "{m} {shown}: {c} {text}"
        );
    }
    // The good path, then a second answer to the same item.
    let (c, next) = call(&a, "GET", &format!("{base}/api/next{ok}"), None);
    assert_eq!(c, 200, "{next}");
    let next: serde_json::Value = serde_json::from_str(&next).unwrap();
    assert_eq!(next["item"]["id"], "1");
    assert_eq!(next["progress"]["left"], 3);
    let (c, text) = call(&a, "POST", &format!("{base}/api/answer/1{ok}"), Some(body));
    assert_eq!(c, 200, "{text}");
    let (c, text) = call(&a, "POST", &format!("{base}/api/answer/1{ok}"), Some(body));
    assert!(c == 409 && text.contains("already answered"), "{c} {text}");
    // A swapped repeat needs a first answer, and (repeat share 0) is never due.
    let rep = r#"{"key":"1","seconds":1,"repeat":true}"#;
    let (c, text) = call(&a, "POST", &format!("{base}/api/answer/2{ok}"), Some(rep));
    assert!(c == 409 && text.contains("no first answer"), "{c} {text}");
    let (c, text) = call(&a, "POST", &format!("{base}/api/answer/1{ok}"), Some(rep));
    assert!(
        c == 409 && text.contains("not the pair handed out"),
        "{c} {text}"
    );
    let (c, page) = call(&a, "GET", &format!("{base}/"), None);
    assert!(c == 200 && page.contains("/api/answer/"), "{c}");
    // Nothing but the good answer reached the log.
    let (recs, torn) = read_log(&tmp.path().join("out/answers.jsonl")).unwrap();
    assert_eq!((recs.len(), torn), (1, false));
}

/// Answer `id` (`repeat`) as `who`; (status, body).
fn post(
    a: &ureq::Agent,
    base: &str,
    who: &(String, String),
    id: &str,
    repeat: bool,
) -> (u16, String) {
    let b = format!(r#"{{"key":"1","seconds":1,"repeat":{repeat}}}"#);
    let url = format!("{base}/api/answer/{id}?a={}&t={}", who.0, token(&who.1));
    call(a, "POST", &url, Some(&b))
}

/// The `(id, repeat)` that `/api/next` hands `who`.
fn next_of(a: &ureq::Agent, base: &str, who: &(String, String)) -> (String, bool) {
    let url = format!("{base}/api/next?a={}&t={}", who.0, token(&who.1));
    let (c, text) = call(a, "GET", &url, None);
    assert_eq!(c, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    (
        v["item"]["id"].as_str().unwrap().to_string(),
        v["item"]["repeat"].as_bool().unwrap(),
    )
}

/// An annotator answers only the pair handed out to them: not another item,
/// not a repeat before it is due, and after a restart the pair the schedule
/// gives next (recomputed from the log). A pair handed out stays answerable
/// when others fill it meanwhile.
#[test]
fn only_the_pair_handed_out_can_be_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 4);
    let out = tmp.path().join("out");
    let mut o = opts(&["alice".into(), "bob".into()], 1);
    // Every first answer gets a repeat, due one answer later.
    o.plan.repeat_share = 1.0;
    o.plan.repeat_gap = 1;
    let s = start(LabelDir::create(&out, &pairs).unwrap(), &o).unwrap();
    let base = format!("http://{}", s.addr);
    let (alice, bob) = (s.urls[0].clone(), s.urls[1].clone());
    let a = agent();
    assert_eq!(next_of(&a, &base, &alice), ("1".into(), false));
    assert_eq!(next_of(&a, &base, &bob), ("1".into(), false));
    let (c, text) = post(&a, &base, &alice, "2", false);
    assert!(
        c == 409
            && error_of(c, &text)
                .contains("item \"2\" is not the pair handed out to alice, which is item \"1\""),
        "{c} {text}"
    );
    assert_eq!(post(&a, &base, &alice, "1", false).0, 200);
    // Bob was handed item 1 before alice filled it (min 1): his answer counts.
    assert_eq!(post(&a, &base, &bob, "1", false).0, 200);
    // The repeat of 1 is not due yet: item 2 is.
    let (c, text) = post(&a, &base, &alice, "1", true);
    assert!(
        c == 409
            && error_of(c, &text)
                .contains("the swapped repeat of item \"1\" is not the pair handed out"),
        "{c} {text}"
    );
    assert_eq!(next_of(&a, &base, &alice), ("2".into(), false));
    assert_eq!(post(&a, &base, &alice, "2", false).0, 200);
    assert_eq!(next_of(&a, &base, &alice), ("1".into(), true));
    assert_eq!(post(&a, &base, &alice, "1", true).0, 200);
    let (c, text) = post(&a, &base, &alice, "1", true);
    assert!(c == 409 && text.contains("already repeated"), "{c} {text}");
    drop(s);
    // After a restart nothing is handed out yet: the schedule's next pair
    // (the repeat of 2, due now) is the one, without asking /api/next.
    let s = start(LabelDir::open(&out).unwrap(), &o).unwrap();
    let base = format!("http://{}", s.addr);
    let alice = s.urls[0].clone();
    let (c, text) = post(&a, &base, &alice, "3", false);
    assert!(
        c == 409 && error_of(c, &text).contains("which is the swapped repeat of item \"2\""),
        "{c} {text}"
    );
    assert_eq!(post(&a, &base, &alice, "2", true).0, 200);
    let (recs, torn) = read_log(&out.join("answers.jsonl")).unwrap();
    let got: Vec<(String, String, bool)> = recs
        .iter()
        .map(|r| match r {
            Record::Answer(x) => (x.annotator.clone(), x.item.clone(), x.repeat),
            Record::Undo(u) => panic!("{u:?}"),
        })
        .collect();
    let want = [
        ("alice", "1", false),
        ("bob", "1", false),
        ("alice", "2", false),
    ];
    let want: Vec<(String, String, bool)> = want
        .iter()
        .chain(&[("alice", "1", true), ("alice", "2", true)])
        .map(|(w, i, r)| (w.to_string(), i.to_string(), *r))
        .collect();
    assert_eq!((got, torn), (want, false));
}

/// The tokens are kept in the folder: a restart hands out the same links,
/// and an annotator added later gets a token of their own.
#[test]
fn tokens_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 2);
    let out = tmp.path().join("out");
    let s = start(
        LabelDir::create(&out, &pairs).unwrap(),
        &opts(&["alice".into(), "bob".into()], 1),
    )
    .unwrap();
    let first = s
        .urls
        .iter()
        .map(|(w, u)| (w.clone(), token(u)))
        .collect::<Vec<_>>();
    drop(s);
    let file = out.join(kiln_feedback::server::TOKENS);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "{} is readable by others: {mode:o}",
            file.display()
        );
    }
    let names = ["alice".to_string(), "bob".into(), "cyd".into()];
    let s = start(LabelDir::open(&out).unwrap(), &opts(&names, 1)).unwrap();
    let again = s
        .urls
        .iter()
        .map(|(w, u)| (w.clone(), token(u)))
        .collect::<Vec<_>>();
    assert_eq!(&again[..2], &first[..]);
    assert_eq!(again[2].0, "cyd");
    assert!(again[2].1.len() == 32 && again[2].1 != again[0].1 && again[2].1 != again[1].1);
    let a = agent();
    for (who, t) in &again {
        let url = format!("http://{}/api/next?a={who}&t={t}", s.addr);
        let (c, text) = call(&a, "GET", &url, None);
        assert_eq!(c, 200, "{who}: {text}");
    }
    let saved: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(saved.into_iter().collect::<Vec<_>>(), again);
}

/// 20 clients (one per annotator) each answer the same 50 items at once.
#[test]
fn a_thousand_concurrent_answers_land_as_whole_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 50);
    let out = tmp.path().join("out");
    let dir = LabelDir::create(&out, &pairs).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("a{i:02}")).collect();
    let s = start(dir, &opts(&names, 20)).unwrap();
    let base = format!("http://{}", s.addr);
    let t0 = Instant::now();
    let threads: Vec<_> = s
        .urls
        .iter()
        .enumerate()
        .map(|(k, (who, url))| {
            let (who, t, base) = (who.clone(), token(url), base.clone());
            std::thread::spawn(move || {
                let a = agent();
                let keys = ["1", "2", "!", "@", "=", "b", "skip"];
                for i in 1..=50 {
                    let b = format!(r#"{{"key":"{}","seconds":0.5}}"#, keys[(i + k) % 7]);
                    let (c, text) = call(
                        &a,
                        "POST",
                        &format!("{base}/api/answer/{i}?a={who}&t={t}"),
                        Some(&b),
                    );
                    assert_eq!(c, 200, "{who} {i}: {text}");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    eprintln!(
        "1000 answers from 20 clients in {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(out.join("answers.jsonl")).unwrap();
    assert!(text.ends_with('\n'));
    let mut seen = HashSet::new();
    for line in text.lines() {
        let r: Record = serde_json::from_str(line).expect("a whole answer line");
        let Record::Answer(a) = r else {
            panic!("{line}")
        };
        assert!(seen.insert((a.annotator, a.item)));
    }
    assert_eq!(seen.len(), 1000);
}

/// The real binary under load, killed with SIGKILL: every acknowledged
/// answer is in the file, every line whole, and the folder reopens.
#[test]
fn killing_the_server_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_pairs(&pairs, 100);
    let out = tmp.path().join("out");
    let names: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-feedback"))
        .args([
            "serve",
            "--pairs",
            pairs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--addr",
            "127.0.0.1:0",
            "--min-submitted",
            "10",
            // The clients answer items in file order, which is the schedule
            // only without repeats.
            "--repeat-share",
            "0",
            "--annotators",
            &names.join(","),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let base = first.strip_prefix("listening on ").unwrap().to_string();
    let urls: Vec<(String, String)> = (0..10)
        .map(|_| {
            let l = lines.next().unwrap().unwrap();
            let (who, url) = l.split_once(": ").unwrap();
            (who.to_string(), token(url))
        })
        .collect();
    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let threads: Vec<_> = urls
        .into_iter()
        .map(|(who, t)| {
            let (acked, base) = (acked.clone(), base.clone());
            std::thread::spawn(move || {
                let a = agent();
                for i in 1..=100 {
                    let (c, _) = call(
                        &a,
                        "POST",
                        &format!("{base}/api/answer/{i}?a={who}&t={t}"),
                        Some(r#"{"key":"2","seconds":0.1}"#),
                    );
                    if c != 200 {
                        return; // the server is gone
                    }
                    acked.lock().unwrap().push((who.clone(), i.to_string()));
                }
            })
        })
        .collect();
    let t = Instant::now();
    while acked.lock().unwrap().len() < 150 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, mid-load
    child.wait().unwrap();
    for th in threads {
        th.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 150 && acked.len() < 1000,
        "{} acknowledged",
        acked.len()
    );
    let (recs, _torn) = read_log(&out.join("answers.jsonl")).unwrap();
    let on_disk: HashSet<(String, String)> = recs
        .iter()
        .map(|r| match r {
            Record::Answer(a) => (a.annotator.clone(), a.item.clone()),
            Record::Undo(u) => panic!("{u:?}"),
        })
        .collect();
    for a in &acked {
        assert!(on_disk.contains(a), "acknowledged {a:?} is not on disk");
    }
    let d = LabelDir::open(&out).unwrap();
    assert_eq!(d.ledger.all().len(), recs.len());
}
