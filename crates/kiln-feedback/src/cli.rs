//! The four commands' flags and bodies, shared by `cargo xtask rlhf ...`
//! and this crate's `kiln-feedback` binary (which the end-to-end tests run).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::Parser;

use crate::error::{FeedbackError, Result};
use crate::export::Format;
use crate::plan::Plan;
use crate::server::{ServeOptions, DEFAULT_MAX_BODY};
use crate::store::{AnswerLog, LabelDir};

fn share(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number in [0, 1], found {s:?}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} is out of range: expected a number in [0, 1]"));
    }
    Ok(v)
}

/// `--addr`: `IP:PORT` or `HOST:PORT` (`localhost:8457`), resolved here
/// so that the loopback check and the printed URL see the real address;
/// an IPv4 address is preferred where the name has both.
fn socket_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    let all: Vec<SocketAddr> = s
        .trim()
        .to_socket_addrs()
        .map_err(|e| {
            format!("cannot resolve {s:?}: {e} (expected HOST:PORT, e.g. localhost:8457)")
        })?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn count(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!("expected an integer >= 1, found {s:?}")),
    }
}

/// `rlhf label`: the terminal labeller.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf label",
    about = "Label pairs in a full-screen terminal: 1/2 better, !/@ much better, = tie, b both bad, \
             Backspace skip, u undo, ? help, q quit. Answers go to OUT/answers.jsonl, one fsynced \
             line each; rerun to resume."
)]
pub struct LabelArgs {
    /// Pairs to label: JSONL with prompt, completion_a, completion_b (and an optional id),
    /// as `rlhf sample --pairs` writes.
    #[arg(long)]
    pub pairs: PathBuf,
    /// The labelling folder (created; holds a copy of the pairs and the answers).
    #[arg(long)]
    pub out: PathBuf,
    /// Your name, recorded with each answer.
    #[arg(long)]
    pub annotator: String,
    /// Share of pairs shown a second time with the sides swapped (self-consistency).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub repeat_share: f64,
}

/// `rlhf serve`: the browser labeller.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf serve",
    about = "Serve a keyboard-first labelling page for several annotators. Localhost by default; \
             --annotators prints one URL with a random token per annotator (required beyond \
             localhost; kept in OUT/tokens.json, so the URLs survive a restart). Each answer is \
             fsynced to OUT/answers.jsonl before it is acknowledged; one process at a time \
             serves or labels a folder."
)]
pub struct ServeArgs {
    /// Pairs to label (JSONL with prompt, completion_a, completion_b).
    #[arg(long)]
    pub pairs: PathBuf,
    /// The labelling folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Address to listen on: IP:PORT or HOST:PORT (e.g. localhost:8457).
    #[arg(long, default_value = "127.0.0.1:8457", value_parser = socket_addr)]
    pub addr: SocketAddr,
    /// Annotators, comma-separated; each gets a URL with its own token (reused on restart).
    #[arg(long, value_delimiter = ',')]
    pub annotators: Vec<String>,
    /// Hand each item out until it has this many submitted (not skipped) answers:
    /// with --annotators, at most as many as can answer (each answers an item once).
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub min_submitted: usize,
    /// Share of each annotator's items shown again later with the sides swapped.
    #[arg(long, default_value_t = 0.1, value_parser = share)]
    pub repeat_share: f64,
    /// Require the tokens even on localhost.
    #[arg(long)]
    pub require_tokens: bool,
}

/// `rlhf agreement`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf agreement",
    about = "Agreement in a labelling folder: Cohen's kappa per pair of annotators, Krippendorff's \
             alpha (nominal) for all, self-consistency on swapped repeats, majority label per item \
             (written to DIR/agreement.json)."
)]
pub struct AgreementArgs {
    /// The labelling folder.
    pub dir: PathBuf,
}

/// `rlhf export`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask rlhf export",
    about = "Export a labelling folder: --format trl gives TRL's prompt/chosen/rejected/margin per \
             item with a majority preference (ties and both-bad dropped and counted), which \
             `rlhf reward` and `rlhf dpo` read; --format raw gives every answer with its texts."
)]
pub struct ExportArgs {
    /// The labelling folder.
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "trl")]
    pub format: Format,
    /// Output file (default: DIR/export-FORMAT.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the terminal labeller.
pub fn label(a: &LabelArgs) -> Result<()> {
    if !crate::pairs::valid_id(&a.annotator) {
        return Err(FeedbackError::Invalid(format!(
            "--annotator {:?} is not a valid name: {}",
            a.annotator,
            crate::pairs::id_rule()
        )));
    }
    // Before creating the folder, so that no terminal leaves nothing behind.
    crate::tui::check_terminal()?;
    // Held until the labeller ends: a `serve` or another `label` on this
    // folder would write answers this one does not know of.
    let (mut dir, _lock) = LabelDir::create_locked(&a.out, &a.pairs, "label")?;
    if let Some(t) = &dir.torn {
        // Stays on the main screen, under the labeller's alternate one.
        eprintln!("{t}");
    }
    let log = AnswerLog::open(&a.out)?;
    let plan = Plan {
        repeat_share: a.repeat_share,
        ..Plan::everything()
    };
    let s = crate::tui::label(&mut dir, &log, &a.annotator, &plan)?;
    eprintln!(
        "rlhf label: {} answered and {} undone this session; {} has {} answers, {} left; answers in {}",
        s.answered,
        s.undone,
        a.annotator,
        s.done,
        s.left,
        log.path().display()
    );
    Ok(())
}

/// Runs the server until the process is stopped.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let opts = ServeOptions {
        addr: a.addr,
        annotators: a.annotators.clone(),
        require_tokens: a.require_tokens,
        plan: Plan {
            min_submitted: a.min_submitted,
            repeat_share: a.repeat_share,
            repeat_gap: 5,
        },
        max_body: DEFAULT_MAX_BODY,
    };
    // Check the options and bind the port before creating the folder, so
    // that a mistake or a busy port leaves nothing behind. Answers already
    // in the folder count towards --min-submitted; a folder that does not
    // open is left to `create_locked` to report (and `serve` checks again).
    let earlier = if a.out.join(crate::store::PAIRS).is_file() {
        LabelDir::open(&a.out).ok().map(|d| d.ledger.annotators())
    } else {
        Some(Vec::new())
    };
    if let Some(earlier) = earlier {
        crate::server::check_min_submitted(&opts.plan, &opts.annotators, &earlier)?;
    }
    let bound = crate::server::bind(&opts)?;
    // Held while serving: a second server (or `label`) on this folder would
    // hand out and acknowledge answers that contradict this one's.
    let (dir, _lock) = LabelDir::create_locked(&a.out, &a.pairs, "serve")?;
    if let Some(t) = &dir.torn {
        eprintln!("{t}");
    }
    let n = dir.items.len();
    let server = bound.serve(dir)?;
    // stdout: the address first (scripts and tests read it), then the URLs.
    println!("listening on http://{}", server.addr);
    for (who, url) in &server.urls {
        println!("{who}: {url}");
    }
    if server.urls.is_empty() {
        println!("open http://{}/?a=YOUR_NAME", server.addr);
    }
    eprintln!(
        "rlhf serve: {n} pairs, min {} submitted answers each; answers in {}",
        a.min_submitted,
        a.out.join(crate::store::ANSWERS).display()
    );
    server.wait()
}

/// Prints the agreement report and writes `DIR/agreement.json`.
pub fn agreement(a: &AgreementArgs) -> Result<crate::agreement::Report> {
    let dir = LabelDir::open(&a.dir)?;
    if let Some(t) = &dir.torn {
        eprintln!("{t}");
    }
    let r = crate::agreement::report(&dir);
    let path = a.dir.join("agreement.json");
    let json = serde_json::to_string_pretty(&r)
        .map_err(|e| FeedbackError::Invalid(format!("encoding the report: {e}")))?;
    std::fs::write(&path, json).map_err(|e| FeedbackError::io(&path, e))?;
    println!("{}", r.summary());
    println!("per-item majority labels in {}", path.display());
    Ok(r)
}

/// Writes the export and says what was dropped.
pub fn export(a: &ExportArgs) -> Result<crate::export::ExportSummary> {
    let dir = LabelDir::open(&a.dir)?;
    if let Some(t) = &dir.torn {
        eprintln!("{t}");
    }
    let name = match a.format {
        Format::Trl => "export-trl.jsonl",
        Format::Raw => "export-raw.jsonl",
    };
    let out = a.out.clone().unwrap_or_else(|| a.dir.join(name));
    let s = crate::export::export(&dir, a.format, &out)?;
    println!("rlhf export: {} -> {}", s.describe(a.format), out.display());
    Ok(s)
}
