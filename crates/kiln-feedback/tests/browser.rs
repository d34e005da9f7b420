//! The browser labeller in a real headless Chromium, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`): two annotators label by
//! keyboard at once, one reloads mid-way and one undoes, then the files on
//! disk are checked against what the pages showed. A screenshot of the page
//! is kept in `target/tmp/kiln-feedback-browser/`.
//!
//! Ignored by default (it needs the browser); `.ci/run` installs it and runs
//! `cargo test -p kiln-feedback --test browser -- --ignored`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_feedback::plan::Plan;
use kiln_feedback::server::{start, ServeOptions, DEFAULT_MAX_BODY};
use kiln_feedback::store::{Label, LabelDir, Record};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const BACKSPACE: &str = "\u{E003}";

fn which(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: apt-get install -y chromium chromium-driver (or set {env})");
}

struct Driver {
    child: Child,
    base: String,
    http: ureq::Agent,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(which("chromedriver", "KILN_CHROMEDRIVER"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        };
        let t = Instant::now();
        while d.http.get(&format!("{}/status", d.base)).call().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn send(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let req = self.http.request(method, &format!("{}{path}", self.base));
        let r = if body.is_null() {
            req.call()
        } else {
            req.set("content-type", "application/json")
                .send_string(&body.to_string())
        };
        let text = match r {
            Ok(r) => r.into_string().unwrap(),
            Err(ureq::Error::Status(c, r)) => {
                panic!(
                    "{method} {path}: {c} {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["value"].clone()
    }

    fn session(&self, profile: &Path) -> Browser<'_> {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--disable-quic",
            "--window-size=1200,800",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": which("chromium", "KILN_CHROMIUM").display().to_string(),
                "args": args,
            }
        }}});
        let v = self.send("POST", "/session", caps);
        Browser {
            d: self,
            id: v["sessionId"].as_str().unwrap().to_string(),
        }
    }
}

struct Browser<'a> {
    d: &'a Driver,
    id: String,
}

/// What the page shows.
#[derive(Debug, Clone, PartialEq)]
struct View {
    state: String,
    item: String,
    left: String,
    done: u64,
}

impl Browser<'_> {
    fn cmd(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.d
            .send(method, &format!("/session/{}{path}", self.id), body)
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "/url", serde_json::json!({ "url": url }));
    }

    fn view(&self) -> View {
        let v = self.cmd(
            "POST",
            "/execute/sync",
            serde_json::json!({"args": [], "script":
                "const g = (id) => document.getElementById(id);
                 return [document.body.dataset.state, g('item').dataset.id, g('left').textContent,
                         Number(g('progress').dataset.done)];"}),
        );
        View {
            state: v[0].as_str().unwrap_or("").into(),
            item: v[1].as_str().unwrap_or("").into(),
            left: v[2].as_str().unwrap_or("").into(),
            done: v[3].as_u64().unwrap_or(0),
        }
    }

    /// Waits until the page is ready (or done) with `done` answers counted.
    fn wait(&self, done: u64) -> View {
        let t = Instant::now();
        loop {
            let v = self.view();
            if (v.state == "ready" || v.state == "done") && v.done == done {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "waiting for {done} done: {v:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn key(&self, k: &str) {
        let body = self.cmd(
            "POST",
            "/element",
            serde_json::json!({"using": "css selector", "value": "body"}),
        );
        let el = body[ELEMENT].as_str().unwrap().to_string();
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            serde_json::json!({ "text": k }),
        );
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", serde_json::Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(path, png).unwrap();
    }

    fn close(self) {
        self.d.send(
            "DELETE",
            &format!("/session/{}", self.id),
            serde_json::Value::Null,
        );
    }
}

#[test]
#[ignore = "needs Debian's chromium and chromium-driver; .ci/run installs them and runs this test"]
fn two_annotators_label_by_keyboard_in_headless_chromium() {
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-feedback-browser");
    std::fs::create_dir_all(&shots).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    let mut s = String::new();
    for i in 1..=6 {
        s += &serde_json::json!({"prompt": format!("Write a review of film {i}."),
            "completion_a": format!("apple {i}: a warm, funny film."),
            "completion_b": format!("banana {i}: two hours I will not get back.")})
        .to_string();
        s.push('\n');
    }
    std::fs::write(&pairs, s).unwrap();
    let out = tmp.path().join("labels");
    let dir = LabelDir::create(&out, &pairs).unwrap();
    let opts = ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        annotators: vec!["ann".into(), "bob".into()],
        require_tokens: true,
        plan: Plan {
            min_submitted: 2,
            repeat_share: 0.0,
            repeat_gap: 5,
        },
        max_body: DEFAULT_MAX_BODY,
    };
    let server = start(dir, &opts).unwrap();
    let driver = Driver::start();
    let ann = driver.session(&tmp.path().join("profile-ann"));
    let bob = driver.session(&tmp.path().join("profile-bob"));
    ann.open(&server.urls[0].1);
    bob.open(&server.urls[1].1);
    // Per annotator: the keys typed, item by item ("u" undoes the last one).
    let plans: [(&Browser<'_>, &str, Vec<&str>); 2] = [
        (&ann, "ann", vec!["1", "2", "=", "b", "!", "@"]),
        (
            &bob,
            "bob",
            vec!["2", BACKSPACE, "1", "u", "2", "@", "=", "1"],
        ),
    ];
    // Expected (annotator, item) -> label, from what each page showed.
    let mut want: Vec<(String, String, Label)> = Vec::new();
    let mut done = [0u64, 0];
    let steps = plans.iter().map(|p| p.2.len()).max().unwrap();
    for step in 0..steps {
        for (k, (b, who, keys)) in plans.iter().enumerate() {
            let Some(key) = keys.get(step) else { continue };
            if *who == "ann" && step == 3 {
                // A reload mid-way: the page comes back at the next unanswered pair.
                b.cmd("POST", "/refresh", serde_json::json!({}));
                let v = b.wait(3);
                assert_eq!(v.item, "4", "{v:?}");
            }
            let v = b.wait(done[k]);
            if *key == "u" {
                b.key("u");
                want.retain(|(w, i, _)| !(w == who && i == &(done[k]).to_string()));
                done[k] -= 1;
                let back = b.wait(done[k]);
                assert_eq!(back.item, done[k].saturating_add(1).to_string(), "{back:?}");
                continue;
            }
            if step == 2 && *who == "ann" {
                ann.screenshot(&shots.join("labeller.png"));
            }
            let left_is_a = v.left.starts_with("apple");
            let label = match *key {
                "1" | "!" => {
                    if left_is_a {
                        Label::A
                    } else {
                        Label::B
                    }
                }
                "2" | "@" => {
                    if left_is_a {
                        Label::B
                    } else {
                        Label::A
                    }
                }
                "=" => Label::Tie,
                "b" => Label::BothBad,
                _ => Label::Skip,
            };
            want.push((who.to_string(), v.item.clone(), label));
            b.key(key);
            done[k] += 1;
        }
    }
    assert_eq!(ann.wait(6).state, "done");
    assert_eq!(bob.wait(6).state, "done");
    ann.screenshot(&shots.join("done.png"));
    ann.close();
    bob.close();
    // The files on disk: every answer as shown, the undo recorded.
    let d = LabelDir::open(&out).unwrap();
    let mut got: Vec<(String, String, Label)> = d
        .ledger
        .all()
        .iter()
        .map(|a| (a.annotator.clone(), a.item.clone(), a.label))
        .collect();
    got.sort_by(|x, y| (&x.0, x.1.parse::<u32>().unwrap()).cmp(&(&y.0, y.1.parse().unwrap())));
    want.sort_by(|x, y| (&x.0, x.1.parse::<u32>().unwrap()).cmp(&(&y.0, y.1.parse().unwrap())));
    assert_eq!(got, want);
    let (recs, torn) = kiln_feedback::store::read_log(&out.join("answers.jsonl")).unwrap();
    assert!(!torn);
    assert_eq!(
        recs.iter().filter(|r| matches!(r, Record::Undo(_))).count(),
        1
    );
    assert!(d
        .ledger
        .all()
        .iter()
        .all(|a| a.seconds >= 0.0 && a.time.ends_with('Z')));
    eprintln!("screenshots in {}", shots.display());
}
