//! The browser labeller (`rlhf serve`): axum on a small tokio runtime,
//! one plain HTML/JS page (no build step), keyboard-first like the terminal.
//!
//! - Binds to localhost by default. Each annotator named with
//!   `--annotators` gets a random 128-bit token in their URL, kept in
//!   `DIR/tokens.json` ([`load_tokens`]) so that the links survive a
//!   restart; beyond localhost every request must carry it (and annotators
//!   must be named).
//! - Items go out until each has `--min-submitted` answers; a share of each
//!   annotator's items comes back later with the sides swapped
//!   ([`crate::plan`]). An annotator may answer only the pair handed out to
//!   them (by `/api/next`, or after a restart the schedule's next one), so
//!   a client cannot pick items or call a repeat before it is due.
//! - Every answer goes through [`AnswerLog::append`] (one line, fsynced)
//!   before the request is acknowledged, so a killed server loses nothing
//!   it acknowledged, and concurrent answers never tear a line.
//! - Every error is JSON `{"error": reason}` (the page shows the reason):
//!   an unknown item (404), an id with path tricks or a malformed body
//!   (400), a bad or missing token (403), an oversized body (413), a body
//!   missing a field (422), a second answer to the same item or an answer
//!   to a pair not handed out (409). Values echoed back are cut short.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{FeedbackError, Result};
use crate::pairs::{id_rule, valid_id};
use crate::plan::{queue, Next, Plan};
use crate::store::{
    decode_key, now_rfc3339, write_atomic, Answer, AnswerLog, LabelDir, Record, Undo, KEYS,
};

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The default largest request body (an answer is ~60 bytes).
pub const DEFAULT_MAX_BODY: usize = 4096;

/// The tokens file in a labelling folder: `{"annotator": "token", ...}`.
pub const TOKENS: &str = "tokens.json";

/// The most characters of a request value (an id, a name, a key) an error
/// message echoes: enough to recognise it, not a way to bounce 4 KiB back.
const ECHO_MAX: usize = 64;

/// The most characters of axum's own rejection text an error carries.
const REASON_MAX: usize = 300;

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

/// Whether `t` looks like a [`random_token`] (32 hex digits).
fn valid_token(t: &str) -> bool {
    t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The tokens of `annotators`, kept in `dir/`[`TOKENS`] so that the URLs
/// sent out keep working across restarts: tokens already in the file are
/// reused, annotators new to it get a fresh [`random_token`], and the file
/// is rewritten atomically (owner-only) when one was added. Annotators in
/// the file but not in `annotators` keep their entry (naming them again
/// restores their link) but get no access.
pub fn load_tokens(
    dir: &std::path::Path,
    annotators: &[String],
) -> Result<BTreeMap<String, String>> {
    let path = dir.join(TOKENS);
    let mut all: BTreeMap<String, String> = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            FeedbackError::Invalid(format!(
                "{}: not a tokens file ({e}): expected {{\"annotator\": \"token\", ...}}; \
                 delete it to issue new tokens (the links sent out then stop working)",
                path.display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(FeedbackError::io(&path, e)),
    };
    if let Some((who, _)) = all.iter().find(|(_, t)| !valid_token(t)) {
        return Err(FeedbackError::Invalid(format!(
            "{}: the token of {who:?} is not 32 hex digits; delete the file to issue new tokens",
            path.display()
        )));
    }
    let mut added = false;
    for a in annotators {
        if !all.contains_key(a) {
            all.insert(a.clone(), random_token()?);
            added = true;
        }
    }
    if added {
        let json = serde_json::to_string_pretty(&all)
            .map_err(|e| FeedbackError::Invalid(format!("encoding the tokens: {e}")))?;
        write_atomic(&path, format!("{json}\n").as_bytes(), true)?;
    }
    Ok(annotators
        .iter()
        .filter_map(|a| Some((a.clone(), all.get(a)?.clone())))
        .collect())
}

struct App {
    log: AnswerLog,
    state: Mutex<Shared>,
    tokens: BTreeMap<String, String>,
    require_tokens: bool,
    plan: Plan,
}

/// What the handlers share, under one lock.
struct Shared {
    dir: LabelDir,
    /// The pair `/api/next` last handed to each annotator: the only one
    /// they may answer. Empty after a restart (the schedule's next pair is
    /// then the one), and cleared by the annotator's answer or undo.
    handed: HashMap<String, Next>,
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

/// `s` quoted for an error message, cut to [`ECHO_MAX`] characters.
fn echo(s: &str) -> String {
    if s.chars().count() <= ECHO_MAX {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(ECHO_MAX).collect();
    format!("{head:?}... ({} bytes in all)", s.len())
}

/// An axum rejection (its own status and reason) as a JSON error, so the
/// page's `{"error": ...}` handling covers it too.
fn rejected(status: StatusCode, text: String) -> ApiError {
    let text = if text.chars().count() > REASON_MAX {
        text.chars().take(REASON_MAX).collect::<String>() + "..."
    } else {
        text
    };
    bad(status, text)
}

/// axum's `Json` body with its rejections (malformed JSON, a missing
/// field, a body over the limit, no JSON content type) as [`ApiError`]s.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> std::result::Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(rejected(r.status(), r.body_text())),
        }
    }
}

/// axum's `Query` with its rejections as [`ApiError`]s.
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(r) => Err(rejected(r.status(), r.body_text())),
        }
    }
}

/// The `{id}` path segment, with axum's rejections (e.g. bad UTF-8) as [`ApiError`]s.
struct ItemId(String);

impl<S: Send + Sync> FromRequestParts<S> for ItemId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> std::result::Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ItemId(v)),
            Err(r) => Err(rejected(r.status(), r.body_text())),
        }
    }
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
                    format!(
                        "annotator {} is not a valid name: {}",
                        echo(name),
                        id_rule()
                    ),
                ));
            }
            return Ok(name.to_string());
        }
        let Some(want) = self.tokens.get(name) else {
            return Err(bad(
                StatusCode::FORBIDDEN,
                format!("unknown annotator {}", echo(name)),
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

    fn lock(&self) -> std::result::Result<std::sync::MutexGuard<'_, Shared>, ApiError> {
        self.state
            .lock()
            .map_err(|_| bad(StatusCode::INTERNAL_SERVER_ERROR, "state lock poisoned"))
    }

    /// Hands the annotator's next pair out (recorded in [`Shared::handed`]).
    fn next_json(&self, who: &str) -> std::result::Result<serde_json::Value, ApiError> {
        let mut s = self.lock()?;
        let q = queue(&self.plan, &s.dir.items, &s.dir.ledger, who);
        match &q.next {
            Some(n) => s.handed.insert(who.to_string(), n.clone()),
            None => s.handed.remove(who),
        };
        let d = &s.dir;
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
    Params(w): Params<Who>,
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

/// How an error names a pair: the item, or its swapped repeat.
fn pair_name(id: &str, repeat: bool) -> String {
    if repeat {
        format!("the swapped repeat of item {id:?}")
    } else {
        format!("item {id:?}")
    }
}

async fn answer(
    State(app): State<Arc<App>>,
    ItemId(id): ItemId,
    Params(w): Params<Who>,
    Body(body): Body<AnswerBody>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let who = app.auth(&w)?;
    if !valid_id(&id) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("item id {} is not a valid id: {}", echo(&id), id_rule()),
        ));
    }
    if !KEYS.contains(&body.key.as_str()) {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("key {} is not one of {}", echo(&body.key), KEYS.join(" ")),
        ));
    }
    if !body.seconds.is_finite() || body.seconds < 0.0 {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!("seconds must be a number >= 0, found {}", body.seconds),
        ));
    }
    blocking(move || {
        let mut guard = app.lock()?;
        let s = &mut *guard;
        if s.dir.item(&id).is_none() {
            return Err(bad(StatusCode::NOT_FOUND, format!("unknown item {id:?}")));
        }
        let mine = s.dir.ledger.answers_of(&who);
        let original = mine.iter().any(|a| a.item == id && !a.repeat);
        if body.repeat && !original {
            return Err(bad(
                StatusCode::CONFLICT,
                format!("item {id:?} has no first answer by {who} to repeat"),
            ));
        }
        if body.repeat && mine.iter().any(|a| a.item == id && a.repeat) {
            return Err(bad(
                StatusCode::CONFLICT,
                format!("item {id:?} was already repeated"),
            ));
        }
        if !body.repeat && original {
            return Err(bad(
                StatusCode::CONFLICT,
                format!("item {id:?} is already answered by {who}; undo it first"),
            ));
        }
        // Only the pair handed out may be answered: what `/api/next` gave,
        // or, when it gave nothing since the last answer (a restart, a
        // client that does not ask), the schedule's next pair.
        let current = match s.handed.get(&who) {
            Some(n) => Some(n.clone()),
            None => queue(&app.plan, &s.dir.items, &s.dir.ledger, &who).next,
        };
        let order = match current {
            Some(n) if n.id == id && n.repeat == body.repeat => n.order,
            Some(n) => {
                return Err(bad(
                    StatusCode::CONFLICT,
                    format!(
                        "{} is not the pair handed out to {who}, which is {}: answer that one \
                         (GET /api/next shows it)",
                        pair_name(&id, body.repeat),
                        pair_name(&n.id, n.repeat)
                    ),
                ))
            }
            None => {
                return Err(bad(
                    StatusCode::CONFLICT,
                    format!(
                        "{} is not handed out to {who}: {who} has nothing left to label",
                        pair_name(&id, body.repeat)
                    ),
                ))
            }
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
        s.dir.ledger.apply(&rec);
        s.handed.remove(&who);
        Ok(Json(
            serde_json::json!({ "ok": true, "item": id, "label": label.name() }),
        ))
    })
    .await
}

async fn undo(
    State(app): State<Arc<App>>,
    Params(w): Params<Who>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let who = app.auth(&w)?;
    blocking(move || {
        let mut guard = app.lock()?;
        let s = &mut *guard;
        let Some(a) = s.dir.ledger.last_of(&who).cloned() else {
            return Err(bad(
                StatusCode::CONFLICT,
                format!("{who} has nothing to undo"),
            ));
        };
        let rec = Record::Undo(Undo {
            item: a.item.clone(),
            annotator: who.clone(),
            time: now_rfc3339(),
            repeat: a.repeat,
        });
        app.log
            .append(&rec)
            .map_err(|e| bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        s.dir.ledger.apply(&rec);
        // The withdrawn pair is due again: the schedule picks what comes next.
        s.handed.remove(&who);
        Ok(Json(serde_json::json!({ "ok": true, "item": a.item })))
    })
    .await
}

async fn not_found() -> ApiError {
    bad(StatusCode::NOT_FOUND, "no such page")
}

async fn method_not_allowed() -> ApiError {
    bad(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: /api/next takes GET, /api/answer/ID and /api/undo take POST",
    )
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

/// Checks that `plan.min_submitted` can ever be reached. Each annotator
/// submits at most one answer per item, and with named `annotators` only
/// they can answer, besides those whose answers the folder already holds
/// (`earlier`, e.g. [`Ledger::annotators`](crate::store::Ledger::annotators)):
/// more would hand every item to every annotator while the overlap asked
/// for never comes. Without named annotators anyone may join, so any value
/// can be reached; `usize::MAX` ([`Plan::everything`]) asks for exactly that.
pub fn check_min_submitted(plan: &Plan, annotators: &[String], earlier: &[String]) -> Result<()> {
    let n = plan.min_submitted;
    if n == 0 {
        return Err(FeedbackError::Invalid(
            "--min-submitted 0: expected an integer >= 1".into(),
        ));
    }
    if annotators.is_empty() || n == usize::MAX {
        return Ok(());
    }
    let others = earlier.iter().filter(|e| !annotators.contains(e)).count();
    let limit = annotators.len() + others;
    if n <= limit {
        return Ok(());
    }
    let who = match others {
        0 => format!("the {} named with --annotators", annotators.len()),
        m => format!(
            "the {} named with --annotators and {m} more whose answers the folder holds",
            annotators.len()
        ),
    };
    Err(FeedbackError::Invalid(format!(
        "--min-submitted {n}: no item can ever get that many submitted answers: each annotator \
         answers an item once, and only {who} can answer; expected 1..={limit}, or name more \
         annotators"
    )))
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
    /// The annotators' tokens come from (or are added to) `dir/`[`TOKENS`].
    pub fn serve(self, dir: LabelDir) -> Result<Server> {
        let Bound {
            listener,
            addr,
            rt,
            opts,
        } = self;
        check_min_submitted(&opts.plan, &opts.annotators, &dir.ledger.annotators())?;
        let tokens = load_tokens(&dir.dir, &opts.annotators)?;
        let log = AnswerLog::open(&dir.dir)?;
        let app = Arc::new(App {
            log,
            state: Mutex::new(Shared {
                dir,
                handed: HashMap::new(),
            }),
            tokens,
            require_tokens: opts.require_tokens || !opts.addr.ip().is_loopback(),
            plan: opts.plan,
        });
        let router = Router::new()
            .route("/", get(index))
            .route("/api/next", get(next))
            .route("/api/answer/{id}", post(answer))
            .route("/api/undo", post(undo))
            .method_not_allowed_fallback(method_not_allowed)
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(opts.max_body))
            .with_state(app.clone());
        // Sorted by name (the tokens map is ordered).
        let urls: Vec<(String, String)> = app
            .tokens
            .iter()
            .map(|(a, t)| (a.clone(), format!("http://{addr}/?a={a}&t={t}")))
            .collect();
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
