//! The browser labeller (`rlhf serve`): axum on a small tokio runtime,
//! one plain HTML/JS page (no build step), keyboard-first like the terminal.
//!
//! - Binds to localhost by default. Each annotator named with
//!   `--annotators` gets a random 128-bit token in their URL; beyond
//!   localhost every request must carry it (and annotators must be named).
//! - Items go out until each has `--min-submitted` answers; a share of each
//!   annotator's items comes back later with the sides swapped
//!   ([`crate::plan`]).
//! - Every answer goes through [`AnswerLog::append`] (one line, fsynced)
//!   before the request is acknowledged, so a killed server loses nothing
//!   it acknowledged, and concurrent answers never tear a line.
//! - Bad requests get a 4xx with a JSON `{"error": reason}`: an unknown
//!   item (404), an id with path tricks (400), a bad or missing token (403),
//!   an oversized body (413), a second answer to the same item (409).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::error::{FeedbackError, Result};
use crate::pairs::{id_rule, valid_id};
use crate::plan::{order_for, queue, Plan};
use crate::store::{decode_key, now_rfc3339, Answer, AnswerLog, LabelDir, Record, Undo, KEYS};

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The default largest request body (an answer is ~60 bytes).
pub const DEFAULT_MAX_BODY: usize = 4096;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen (port 0 picks a free one).
    pub addr: SocketAddr,
    /// Named annotators (each gets a token); empty lets anyone name themselves
    /// (only allowed on localhost).
    pub annotators: Vec<String>,
    /// Whether every request must carry its annotator's token (always when
    /// bound beyond localhost).
    pub require_tokens: bool,
    /// Assignment rules.
    pub plan: Plan,
    /// Largest request body in bytes.
    pub max_body: usize,
}

/// 128 random bits from the OS, as hex.
pub fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    let p = std::path::Path::new("/dev/urandom");
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| FeedbackError::io(p, e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

struct App {
    log: AnswerLog,
    dir: Mutex<LabelDir>,
    tokens: HashMap<String, String>,
    require_tokens: bool,
    plan: Plan,
}

/// A 4xx/5xx with a reason.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(code, msg.into())
}

/// The `?a=NAME&t=TOKEN` every API request carries.
#[derive(Debug, Deserialize)]
struct Who {
    a: Option<String>,
    t: Option<String>,
}

/// Token comparison whose time does not depend on where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl App {
    fn auth(&self, w: &Who) -> std::result::Result<String, ApiError> {
        let Some(name) = w.a.as_deref().filter(|s| !s.is_empty()) else {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "missing annotator: add ?a=NAME to the URL",
            ));
        };
        if self.tokens.is_empty() {
            if !valid_id(name) {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    format!("annotator {name:?} is not a valid name: {}", id_rule()),
                ));
            }
            return Ok(name.to_string());
        }
        let Some(want) = self.tokens.get(name) else {
            return Err(bad(
                StatusCode::FORBIDDEN,
                format!("unknown annotator {name:?}"),
            ));
        };
        match w.t.as_deref() {
            Some(t) if same(t, want) => Ok(name.to_string()),
            Some(_) => Err(bad(
                StatusCode::FORBIDDEN,
                format!("bad token for annotator {name:?}"),
            )),
            None if self.require_tokens => Err(bad(
                StatusCode::FORBIDDEN,
                format!("missing token for annotator {name:?}: use the URL the server printed"),
            )),
            None => Ok(name.to_string()),
        }
    }

    fn lock(&self) -> std::result::Result<std::sync::MutexGuard<'_, LabelDir>, ApiError> {
        self.dir
            .lock()
            .map_err(|_| bad(StatusCode::INTERNAL_SERVER_ERROR, "state lock poisoned"))
    }

    fn next_json(&self, who: &str) -> std::result::Result<serde_json::Value, ApiError> {
        let d = self.lock()?;
        let q = queue(&self.plan, &d.items, &d.ledger, who);
        let item = q.next.map(|n| {
            let it = &d.items[n.index];
            serde_json::json!({
                "id": n.id, "repeat": n.repeat, "prompt": it.prompt_text(),
                "left": it.completion(n.order.left()), "right": it.completion(n.order.right()),
            })
        });
        Ok(serde_json::json!({ "item": item, "progress": { "done": q.done, "left": q.left } }))
    }
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn next(
    State(app): State<Arc<App>>,
    Query(w): Query<Who>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let who = app.auth(&w)?;
    Ok(Json(app.next_json(&who)?))
}

/// An answer's body.
#[derive(Debug, Deserialize, Serialize)]
struct AnswerBody {
    key: String,
    seconds: f64,
    #[serde(default)]
    repeat: bool,
}

/// Runs the blocking write (lock, append, fsync) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, ApiError> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("writer task: {e}"),
        )
    })?
}

async fn answer(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(w): Query<Who>,
    Json(body): Json<AnswerBody>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let who = app.auth(&w)?;
    if !valid_id(&id) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("item id {id:?} is not a valid id: {}", id_rule()),
        ));
    }
    if !KEYS.contains(&body.key.as_str()) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("key {:?} is not one of {}", body.key, KEYS.join(" ")),
        ));
    }
    if !body.seconds.is_finite() || body.seconds < 0.0 {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("seconds must be a number >= 0, found {}", body.seconds),
        ));
    }
    blocking(move || {
        let mut d = app.lock()?;
        if d.item(&id).is_none() {
            return Err(bad(StatusCode::NOT_FOUND, format!("unknown item {id:?}")));
        }
        let mine = d.ledger.answers_of(&who);
        let original = mine.iter().find(|a| a.item == id && !a.repeat);
        let order = if body.repeat {
            let Some(o) = original else {
                return Err(bad(
                    StatusCode::CONFLICT,
                    format!("item {id:?} has no first answer by {who} to repeat"),
                ));
            };
            if mine.iter().any(|a| a.item == id && a.repeat) {
                return Err(bad(
                    StatusCode::CONFLICT,
                    format!("item {id:?} was already repeated"),
                ));
            }
            o.shown.swapped()
        } else {
            if original.is_some() {
                return Err(bad(
                    StatusCode::CONFLICT,
                    format!("item {id:?} is already answered by {who}; undo it first"),
                ));
            }
            order_for(&who, &id)
        };
        let (label, margin) =
            decode_key(&body.key, order).ok_or_else(|| bad(StatusCode::BAD_REQUEST, "bad key"))?;
        let rec = Record::Answer(Answer {
            item: id.clone(),
            annotator: who.clone(),
            time: now_rfc3339(),
            seconds: body.seconds.min(86_400.0),
            shown: order,
            key: body.key.clone(),
            label,
            margin,
            repeat: body.repeat,
        });
        app.log
            .append(&rec)
            .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        d.ledger.apply(&rec);
        Ok(Json(
            serde_json::json!({ "ok": true, "item": id, "label": label.name() }),
        ))
    })
    .await
}

async fn undo(
    State(app): State<Arc<App>>,
    Query(w): Query<Who>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let who = app.auth(&w)?;
    blocking(move || {
        let mut d = app.lock()?;
        let Some(a) = d.ledger.last_of(&who).cloned() else {
            return Err(bad(
                StatusCode::CONFLICT,
                format!("{who} has nothing to undo"),
            ));
        };
        let rec = Record::Undo(Undo {
            item: a.item.clone(),
            annotator: who,
            time: now_rfc3339(),
            repeat: a.repeat,
        });
        app.log
            .append(&rec)
            .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        d.ledger.apply(&rec);
        Ok(Json(serde_json::json!({ "ok": true, "item": a.item })))
    })
    .await
}

async fn not_found() -> ApiError {
    bad(StatusCode::NOT_FOUND, "no such page")
}

/// A running server.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// `(annotator, URL)` for each named annotator.
    pub urls: Vec<(String, String)>,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
    rt: tokio::runtime::Runtime,
}

impl Server {
    /// Serves until the process is stopped (or the listener fails).
    pub fn wait(self) -> Result<()> {
        let r = self.rt.block_on(self.handle);
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(FeedbackError::Invalid(format!("server: {e}"))),
            Err(e) => Err(FeedbackError::Invalid(format!("server task: {e}"))),
        }
    }
}

/// Checks an annotator list: valid names, none twice.
pub fn check_annotators(annotators: &[String]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for a in annotators {
        if !valid_id(a) {
            return Err(FeedbackError::Invalid(format!(
                "--annotators: {a:?} is not a valid name: {}",
                id_rule()
            )));
        }
        if !seen.insert(a.as_str()) {
            return Err(FeedbackError::Invalid(format!(
                "--annotators: {a:?} is listed twice; name each annotator once (each gets one \
                 URL with its own token)"
            )));
        }
    }
    Ok(())
}

/// A checked configuration with its listening socket bound, not serving
/// yet: [`bind`] it before creating the labelling folder, so that bad
/// options or a busy port leave nothing behind, then [`Bound::serve`].
pub struct Bound {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    opts: ServeOptions,
}

/// Checks the options (annotators, tokens beyond localhost) and binds the
/// address; touches no folder.
pub fn bind(opts: &ServeOptions) -> Result<Bound> {
    if !opts.addr.ip().is_loopback() && opts.annotators.is_empty() {
        return Err(FeedbackError::Invalid(format!(
            "--addr {} is beyond localhost: name the annotators with --annotators a,b,c so each \
             gets a token",
            opts.addr
        )));
    }
    check_annotators(&opts.annotators)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| FeedbackError::Invalid(format!("starting the server runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(opts.addr))
        .map_err(|e| FeedbackError::Invalid(format!("binding {}: {e}", opts.addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| FeedbackError::Invalid(format!("binding {}: {e}", opts.addr)))?;
    Ok(Bound {
        listener,
        addr,
        rt,
        opts: opts.clone(),
    })
}

impl Bound {
    /// The address bound (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving `dir` in the background; drop the [`Server`] to stop.
    pub fn serve(self, dir: LabelDir) -> Result<Server> {
        let Bound {
            listener,
            addr,
            rt,
            opts,
        } = self;
        let mut tokens = HashMap::new();
        for a in &opts.annotators {
            tokens.insert(a.clone(), random_token()?);
        }
        let log = AnswerLog::open(&dir.dir)?;
        let app = Arc::new(App {
            log,
            dir: Mutex::new(dir),
            tokens,
            require_tokens: opts.require_tokens || !opts.addr.ip().is_loopback(),
            plan: opts.plan,
        });
        let router = Router::new()
            .route("/", get(index))
            .route("/api/next", get(next))
            .route("/api/answer/{id}", post(answer))
            .route("/api/undo", post(undo))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(opts.max_body))
            .with_state(app.clone());
        let mut urls: Vec<(String, String)> = app
            .tokens
            .iter()
            .map(|(a, t)| (a.clone(), format!("http://{addr}/?a={a}&t={t}")))
            .collect();
        urls.sort();
        let handle = rt.spawn(async move { axum::serve(listener, router).await });
        Ok(Server {
            addr,
            urls,
            handle,
            rt,
        })
    }
}

/// Binds and starts serving `dir` in the background ([`bind`] then
/// [`Bound::serve`]); drop the [`Server`] to stop.
pub fn start(dir: LabelDir, opts: &ServeOptions) -> Result<Server> {
    bind(opts)?.serve(dir)
}
