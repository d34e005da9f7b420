//! The answer store: `DIR/answers.jsonl`, one JSON line per answer or undo,
//! shared by every annotator and both labellers.
//!
//! Each line is written with one `write` under an exclusive `flock` (plus a
//! mutex for threads of one process) and fsynced before the call returns,
//! so the next item is shown, or an HTTP answer acknowledged, only once the
//! answer is on disk. Lines of concurrent writers never interleave. A writer
//! killed mid-line can leave a torn last line: readers leave it out and
//! report it ([`TornLine`]), and the next writer cuts it off before
//! appending, so a kill -9 loses at most the answer being written. The log
//! is append-only: an undo is a line of its own, a later answer by the same
//! annotator to the same item replaces the earlier one, and [`Ledger`]
//! replays the file into the answers in force.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{FeedbackError, Result};
pub use crate::pairs::Side;
use crate::pairs::{read_items, Item};

/// The answers file in a labelling folder.
pub const ANSWERS: &str = "answers.jsonl";
/// The copy of the pairs file in a labelling folder.
pub const PAIRS: &str = "pairs.jsonl";
/// The lock file of a labelling folder ([`FolderLock`]).
pub const LOCK: &str = ".lock";

/// Which completion was shown on the left: `ab` (a left, b right) or `ba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// `completion_a` left, `completion_b` right.
    Ab,
    /// `completion_b` left, `completion_a` right.
    Ba,
}

impl Order {
    /// The completion shown on the left.
    pub fn left(self) -> Side {
        match self {
            Order::Ab => Side::A,
            Order::Ba => Side::B,
        }
    }

    /// The completion shown on the right.
    pub fn right(self) -> Side {
        match self {
            Order::Ab => Side::B,
            Order::Ba => Side::A,
        }
    }

    /// The other order (a swapped repeat).
    pub fn swapped(self) -> Order {
        match self {
            Order::Ab => Order::Ba,
            Order::Ba => Order::Ab,
        }
    }
}

/// An answer in the pair's own terms (sides already undone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// `completion_a` is better.
    A,
    /// `completion_b` is better.
    B,
    /// Equally good.
    Tie,
    /// Both are bad.
    BothBad,
    /// Skipped: no judgement.
    Skip,
}

impl Label {
    /// The label's name as written in the files.
    pub fn name(self) -> &'static str {
        match self {
            Label::A => "a",
            Label::B => "b",
            Label::Tie => "tie",
            Label::BothBad => "both_bad",
            Label::Skip => "skip",
        }
    }
}

/// The keys of both labellers, as recorded in `key`.
pub const KEYS: &[&str] = &["1", "2", "!", "@", "=", "b", "skip"];

/// What a key means for an item shown in `order`: the label and, for a
/// preference, its margin (1 better, 2 much better).
pub fn decode_key(key: &str, order: Order) -> Option<(Label, Option<u8>)> {
    let side = |s: Side| match s {
        Side::A => Label::A,
        Side::B => Label::B,
    };
    Some(match key {
        "1" => (side(order.left()), Some(1)),
        "2" => (side(order.right()), Some(1)),
        "!" => (side(order.left()), Some(2)),
        "@" => (side(order.right()), Some(2)),
        "=" => (Label::Tie, None),
        "b" => (Label::BothBad, None),
        "skip" => (Label::Skip, None),
        _ => return None,
    })
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The item's id.
    pub item: String,
    /// Who answered.
    pub annotator: String,
    /// When, as RFC 3339 UTC.
    pub time: String,
    /// Seconds from showing the item to the key press.
    pub seconds: f64,
    /// Which completion was on the left.
    pub shown: Order,
    /// The key pressed (`1`, `2`, `!`, `@`, `=`, `b`, `skip`).
    pub key: String,
    /// The answer in the pair's terms.
    pub label: Label,
    /// 1 (better) or 2 (much better) for a preference; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<u8>,
    /// Whether this was a swapped repeat of an item the annotator had answered.
    #[serde(default)]
    pub repeat: bool,
}

/// An undo line: withdraws the annotator's latest answer in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undo {
    /// The item whose answer is withdrawn.
    pub item: String,
    /// Whose.
    pub annotator: String,
    /// When, as RFC 3339 UTC.
    pub time: String,
    /// Whether the withdrawn answer was a repeat.
    #[serde(default)]
    pub repeat: bool,
}

/// A line of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// An answer.
    Answer(Answer),
    /// An undo.
    Undo(Undo),
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_millis()
    )
}

/// The append side of `answers.jsonl`.
#[derive(Debug)]
pub struct AnswerLog {
    path: PathBuf,
    file: Mutex<File>,
}

/// An exclusive `flock` on the log, released on drop; it keeps the raw
/// descriptor (the File stays borrowed mutably by the writer meanwhile).
struct Flock(i32);

impl Flock {
    fn new(f: &File, path: &Path) -> Result<Self> {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            let fd = f.as_raw_fd();
            // SAFETY: flock on a descriptor the File keeps open.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(FeedbackError::io(path, std::io::Error::last_os_error()));
            }
            Ok(Self(fd))
        }
        #[cfg(not(unix))]
        {
            let _ = (f, path);
            Ok(Self(-1))
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: the descriptor is still open (the File outlives the lock).
        unsafe {
            libc::flock(self.0, libc::LOCK_UN);
        }
    }
}

impl AnswerLog {
    /// Opens (creating) `dir/answers.jsonl` for appending.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(ANSWERS);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| FeedbackError::io(&path, e))?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as one line and fsyncs it; returns once it is on disk.
    pub fn append(&self, rec: &Record) -> Result<()> {
        let mut line = serde_json::to_string(rec)
            .map_err(|e| FeedbackError::Invalid(format!("encoding an answer: {e}")))?;
        line.push('\n');
        let io = |e| FeedbackError::io(&self.path, e);
        let mut f = self
            .file
            .lock()
            .map_err(|_| FeedbackError::Invalid("answer log lock poisoned".into()))?;
        let _lock = Flock::new(&f, &self.path)?;
        cut_torn_tail(&mut f).map_err(io)?;
        // One write call: with O_APPEND and the lock, the line lands whole.
        f.write_all(line.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)?;
        Ok(())
    }
}

/// Cuts a last line without its newline (a writer killed mid-line), so the
/// next line does not glue onto it.
fn cut_torn_tail(f: &mut File) -> std::io::Result<()> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the last newline, reading back in blocks.
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    f.set_len(keep)?;
    f.sync_data()
}

/// The allowed values of an answer's `margin`, for error messages.
pub const MARGIN_RULE: &str =
    "1 (better) or 2 (much better), or absent (for tie, both bad and skip)";

/// A last line of `answers.jsonl` without its newline: a writer killed
/// mid-line (or a file cut short). The newline is what commits a line, so
/// such a line is left out, and the next writer cuts it off; callers should
/// show [`TornLine`]'s message (it is a warning, not an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornLine {
    /// The log.
    pub path: PathBuf,
    /// Its 1-based line number.
    pub line: usize,
    /// How many bytes it has.
    pub bytes: usize,
}

impl std::fmt::Display for TornLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "warning: {}:{}: the last line is cut off ({} bytes, no newline; a writer killed \
             mid-line?): it is left out, and the next answer written removes it",
            self.path.display(),
            self.line,
            self.bytes
        )
    }
}

/// One record of the log and the line it is on.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// 1-based line number in the file.
    pub line: usize,
    /// The record.
    pub record: Record,
}

/// `answers.jsonl` as read: its whole lines, and the torn last line left out, if any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadedLog {
    /// The records in file order.
    pub lines: Vec<LogLine>,
    /// A last line without a newline, left out (show it as a warning).
    pub torn: Option<TornLine>,
}

/// Parses one whole line: a record whose fields are in range.
fn parse_line(line: &str, path: &Path, n: usize) -> Result<Record> {
    let err = |m: String| FeedbackError::line(path, n, m);
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| err(format!("not an answer line: {e}")))?;
    if v.get("kind").and_then(serde_json::Value::as_str) == Some("answer") {
        match v.get("margin") {
            None | Some(serde_json::Value::Null) => {}
            Some(m) if matches!(m.as_u64(), Some(1 | 2)) => {}
            Some(m) => {
                return Err(err(format!(
                    "field `margin` is {m}, out of range: expected {MARGIN_RULE}"
                )))
            }
        }
    }
    serde_json::from_value(v).map_err(|e| err(format!("not an answer line: {e}")))
}

/// Reads `answers.jsonl` with line numbers. A missing file has no records;
/// a malformed whole line is an error naming it (a `margin` other than 1
/// or 2 included); a last line without its newline is left out and
/// reported in [`LoadedLog::torn`].
pub fn load_log(path: &Path) -> Result<LoadedLog> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LoadedLog::default()),
        Err(e) => return Err(FeedbackError::io(path, e)),
    };
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = LoadedLog::default();
    for (i, line) in whole.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.lines.push(LogLine {
            line: i + 1,
            record: parse_line(line, path, i + 1)?,
        });
    }
    if whole.len() < text.len() {
        out.torn = Some(TornLine {
            path: path.to_path_buf(),
            line: whole.bytes().filter(|&b| b == b'\n').count() + 1,
            bytes: text.len() - whole.len(),
        });
    }
    Ok(out)
}

/// Reads `answers.jsonl`: its records, and whether a torn last line (no
/// newline, from a writer killed mid-line) was left out ([`load_log`] says
/// which line). A missing file has no records.
pub fn read_log(path: &Path) -> Result<(Vec<Record>, bool)> {
    let log = load_log(path)?;
    let torn = log.torn.is_some();
    Ok((log.lines.into_iter().map(|l| l.record).collect(), torn))
}

/// The answers in force, replayed from the log (undos applied).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Each annotator's answers in force, oldest first.
    by_annotator: HashMap<String, Vec<Answer>>,
}

impl Ledger {
    /// Replays records in file order.
    pub fn from_records(records: &[Record]) -> Self {
        let mut l = Self::default();
        for r in records {
            l.apply(r);
        }
        l
    }

    /// Applies one record. An annotator has at most one answer in force per
    /// item and repeat flag: a later answer replaces the earlier one (so a
    /// line appended twice counts once) and becomes the latest. An undo
    /// withdraws the annotator's answer in force for that item (and repeat
    /// flag); an undo with nothing to withdraw changes nothing.
    pub fn apply(&mut self, r: &Record) {
        match r {
            Record::Answer(a) => {
                let v = self.by_annotator.entry(a.annotator.clone()).or_default();
                v.retain(|old| !(old.item == a.item && old.repeat == a.repeat));
                v.push(a.clone());
            }
            Record::Undo(u) => {
                if let Some(v) = self.by_annotator.get_mut(&u.annotator) {
                    if let Some(i) = v
                        .iter()
                        .rposition(|a| a.item == u.item && a.repeat == u.repeat)
                    {
                        v.remove(i);
                    }
                }
            }
        }
    }

    /// An annotator's answers in force, oldest first.
    pub fn answers_of(&self, annotator: &str) -> &[Answer] {
        self.by_annotator
            .get(annotator)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The annotator's latest answer in force (what `u` withdraws).
    pub fn last_of(&self, annotator: &str) -> Option<&Answer> {
        self.answers_of(annotator).last()
    }

    /// Annotators with answers in force, sorted.
    pub fn annotators(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_annotator
            .iter()
            .filter(|(_, a)| !a.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Every answer in force, by annotator then time.
    pub fn all(&self) -> Vec<&Answer> {
        self.annotators()
            .iter()
            .flat_map(|a| self.answers_of(a))
            .collect()
    }
}

/// An exclusive OS lock on a labelling folder's [`LOCK`] file, held until
/// dropped or the process ends, however it ends (kill -9 included): `serve`
/// and `label` take it, so two of them never write one folder's answers
/// from separate in-memory states (each would acknowledge answers the
/// other contradicts).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

impl FolderLock {
    /// Takes the lock of the labelling folder `dir` (which must exist)
    /// without waiting; `command` (`serve`, `label`) is recorded with the
    /// process id for the message a second process prints.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self> {
        let path = dir.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| FeedbackError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let said = std::fs::read_to_string(&path).unwrap_or_default();
                let mut words = said.split_whitespace();
                let (pid, cmd) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let holder = match cmd {
                    "serve" => format!("serving it (rlhf serve, pid {pid})"),
                    "label" => format!("labelling in it (rlhf label, pid {pid})"),
                    _ => "serving or labelling in it".to_string(),
                };
                return Err(FeedbackError::Busy {
                    path: dir.to_path_buf(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(FeedbackError::io(&path, e)),
        }
        // Only for the message above; the lock itself is what excludes.
        let _ = file.set_len(0);
        let _ = writeln!(file, "{} {command}", std::process::id());
        Ok(Self { _file: file })
    }
}

/// Writes `bytes` to `path` through a fsynced temporary file and a rename,
/// so a reader (or a crash) sees the old file or the new one, never half.
/// `private` makes the file readable by its owner only (tokens).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let io = |e| FeedbackError::io(&tmp, e);
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| FeedbackError::io(path, e))?;
    // The rename is durable only once the folder's entry is on disk (as in
    // kiln-core's write, which this light crate does not depend on).
    if let Some(d) = path.parent().and_then(|d| {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        File::open(d).ok()
    }) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether the folder's log has anything in it (a missing or empty log
/// has no answers, so its pairs copy may still be replaced).
fn holds_answers(dir: &Path) -> Result<bool> {
    let path = dir.join(ANSWERS);
    match std::fs::metadata(&path) {
        Ok(m) => Ok(m.len() > 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FeedbackError::io(&path, e)),
    }
}

/// A labelling folder: the pairs (copied in), the log, and the answers in force.
#[derive(Debug)]
pub struct LabelDir {
    /// The folder.
    pub dir: PathBuf,
    /// The pairs, in file order.
    pub items: Vec<Item>,
    /// The log's replay.
    pub ledger: Ledger,
    /// A torn last line left out of the replay (it is cut on the next
    /// write): show it to the user as a warning.
    pub torn: Option<TornLine>,
}

impl LabelDir {
    /// Creates or reopens `dir` for labelling `pairs`: the pairs file is
    /// checked whole (UTF-8, JSON, fields; errors name its lines) before
    /// anything is created, then copied in. Reopening with a different
    /// pairs file is refused once the folder has answers (they would point
    /// at the wrong items); before that, the new file replaces the copy.
    pub fn create(dir: &Path, pairs: &Path) -> Result<Self> {
        let src = Self::read_input(pairs)?;
        std::fs::create_dir_all(dir).map_err(|e| FeedbackError::io(dir, e))?;
        Self::adopt(dir, pairs, &src)
    }

    /// [`LabelDir::create`] holding the folder's [`FolderLock`] (taken
    /// before the pairs are copied in) for `command` (`serve`, `label`):
    /// keep the lock for as long as answers are written.
    pub fn create_locked(dir: &Path, pairs: &Path, command: &str) -> Result<(Self, FolderLock)> {
        let src = Self::read_input(pairs)?;
        std::fs::create_dir_all(dir).map_err(|e| FeedbackError::io(dir, e))?;
        let lock = FolderLock::acquire(dir, command)?;
        Ok((Self::adopt(dir, pairs, &src)?, lock))
    }

    /// The user's pairs file, read and parsed, so that a bad file is named
    /// (not the folder's copy) and leaves nothing behind.
    fn read_input(pairs: &Path) -> Result<Vec<u8>> {
        let src = std::fs::read(pairs).map_err(|e| FeedbackError::io(pairs, e))?;
        crate::pairs::parse_bytes(&src, pairs)?;
        Ok(src)
    }

    /// Copies the checked pairs `src` (read from `pairs`) into `dir` unless
    /// the same file is there, then opens the folder.
    fn adopt(dir: &Path, pairs: &Path, src: &[u8]) -> Result<Self> {
        let copy = dir.join(PAIRS);
        match std::fs::read(&copy) {
            Ok(old) if old == src => {}
            Ok(_) if holds_answers(dir)? => {
                return Err(FeedbackError::Invalid(format!(
                    "{} already holds answers for another pairs file ({} differs from {}); \
                     use a new --out folder",
                    dir.display(),
                    copy.display(),
                    pairs.display()
                )))
            }
            Ok(_) => write_atomic(&copy, src, false)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(&copy, src, false)?,
            Err(e) => return Err(FeedbackError::io(&copy, e)),
        }
        Self::open(dir)
    }

    /// Opens an existing labelling folder and replays its log. A line that
    /// names an item the pairs do not have, or an undo with no earlier
    /// answer by that annotator to that item, is an error naming the line;
    /// a torn last line is left out and reported in [`LabelDir::torn`].
    pub fn open(dir: &Path) -> Result<Self> {
        let copy = dir.join(PAIRS);
        if !copy.is_file() {
            return Err(FeedbackError::Invalid(format!(
                "{} is not a labelling folder: it has no {PAIRS} (made by `rlhf label` or `rlhf serve`)",
                dir.display()
            )));
        }
        let items = read_items(&copy)?;
        let path = dir.join(ANSWERS);
        let log = load_log(&path)?;
        let ids: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        // (annotator, item, repeat) answered on an earlier line.
        let mut answered: HashSet<(&str, &str, bool)> = HashSet::new();
        let mut ledger = Ledger::default();
        for LogLine { line, record } in &log.lines {
            let (who, item, repeat) = match record {
                Record::Answer(a) => (&a.annotator, &a.item, a.repeat),
                Record::Undo(u) => (&u.annotator, &u.item, u.repeat),
            };
            if !ids.contains(item.as_str()) {
                return Err(FeedbackError::line(
                    &path,
                    *line,
                    format!(
                        "names item {item:?}, which {} does not have",
                        copy.display()
                    ),
                ));
            }
            let key = (who.as_str(), item.as_str(), repeat);
            match record {
                Record::Answer(_) => {
                    answered.insert(key);
                }
                Record::Undo(_) if !answered.contains(&key) => {
                    return Err(FeedbackError::line(
                        &path,
                        *line,
                        format!(
                            "undo by {who:?} of item {item:?}{}, which {who:?} never answered \
                             before this line (an undo follows the answer it withdraws)",
                            if repeat { " (repeat)" } else { "" }
                        ),
                    ));
                }
                Record::Undo(_) => {}
            }
            ledger.apply(record);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            items,
            ledger,
            torn: log.torn,
        })
    }

    /// The item with this id.
    pub fn item(&self, id: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.id == id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer(item: &str, who: &str, key: &str, repeat: bool) -> Record {
        let (label, margin) = decode_key(key, Order::Ba).unwrap();
        Record::Answer(Answer {
            item: item.into(),
            annotator: who.into(),
            time: now_rfc3339(),
            seconds: 1.5,
            shown: Order::Ba,
            key: key.into(),
            label,
            margin,
            repeat,
        })
    }

    #[test]
    fn keys_undo_the_shown_order() {
        assert_eq!(decode_key("1", Order::Ba), Some((Label::B, Some(1))));
        assert_eq!(decode_key("@", Order::Ba), Some((Label::A, Some(2))));
        assert_eq!(decode_key("!", Order::Ab), Some((Label::A, Some(2))));
        assert_eq!(decode_key("=", Order::Ab), Some((Label::Tie, None)));
        assert_eq!(decode_key("x", Order::Ab), None);
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    /// Writers with their own descriptors (as separate processes have)
    /// rely on the flock alone: 4 x 100 appends land as 400 whole lines.
    #[test]
    fn separate_writers_never_tear_lines() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let d = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let log = AnswerLog::open(&d).unwrap();
                    for i in 0..100 {
                        log.append(&answer(&i.to_string(), &format!("w{w}"), "2", false))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (recs, torn) = read_log(&dir.path().join(ANSWERS)).unwrap();
        assert_eq!((recs.len(), torn), (400, false));
        let l = Ledger::from_records(&recs);
        assert!(l.annotators().iter().all(|a| l.answers_of(a).len() == 100));
    }

    #[test]
    fn undo_withdraws_the_latest_answer_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = AnswerLog::open(dir.path()).unwrap();
        log.append(&answer("1", "ann", "1", false)).unwrap();
        log.append(&answer("2", "ann", "=", false)).unwrap();
        log.append(&answer("1", "bob", "b", false)).unwrap();
        log.append(&Record::Undo(Undo {
            item: "2".into(),
            annotator: "ann".into(),
            time: now_rfc3339(),
            repeat: false,
        }))
        .unwrap();
        // A writer killed mid-line.
        let path = dir.path().join(ANSWERS);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"kind\":\"answer\",\"item\":\"3\",\"annot")
            .unwrap();
        let (recs, torn) = read_log(&path).unwrap();
        assert!(torn);
        assert_eq!(recs.len(), 4);
        let l = Ledger::from_records(&recs);
        assert_eq!(l.annotators(), vec!["ann", "bob"]);
        assert_eq!(l.answers_of("ann").len(), 1);
        assert_eq!(l.answers_of("ann")[0].label, Label::B);
        log.append(&answer("3", "ann", "skip", false)).unwrap();
        let (recs, torn) = read_log(&path).unwrap();
        assert!(!torn);
        assert_eq!(recs.len(), 5);
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"kind\":\"answer\"}\n").unwrap();
        let e = read_log(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:1: not an answer line"), "{e}");
    }

    /// One holder at a time; the next one is told who holds the folder,
    /// and gets it once the holder lets go.
    #[test]
    fn a_folder_lock_has_one_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = FolderLock::acquire(dir.path(), "label").unwrap();
        let e = FolderLock::acquire(dir.path(), "serve").unwrap_err();
        assert!(matches!(e, FeedbackError::Busy { .. }), "{e:?}");
        let want = format!(
            "{} is in use: another process is labelling in it (rlhf label, pid {})",
            dir.path().display(),
            std::process::id()
        );
        assert!(e.to_string().starts_with(&want), "{e}");
        drop(held);
        FolderLock::acquire(dir.path(), "serve").unwrap();
    }

    /// A folder with items 1..=6 and these lines as its log.
    fn folder(lines: &[String]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let pairs: String = (1..=6)
            .map(|i| {
                format!("{{\"prompt\":\"p{i}\",\"completion_a\":\"a\",\"completion_b\":\"b\"}}\n")
            })
            .collect();
        std::fs::write(tmp.path().join(PAIRS), pairs).unwrap();
        std::fs::write(tmp.path().join(ANSWERS), lines.concat()).unwrap();
        tmp
    }

    fn line(r: &Record) -> String {
        serde_json::to_string(r).unwrap() + "\n"
    }

    fn undo(item: &str, who: &str) -> Record {
        Record::Undo(Undo {
            item: item.into(),
            annotator: who.into(),
            time: now_rfc3339(),
            repeat: false,
        })
    }

    /// Eleven lines, the last cut off mid-write: ten answers in force and a
    /// warning naming line 11; a bad line elsewhere is an error naming it.
    #[test]
    fn a_torn_last_line_is_reported_with_its_line_number() {
        let mut lines: Vec<String> = (1..=5)
            .flat_map(|i| ["ann", "bob"].map(|w| line(&answer(&i.to_string(), w, "1", false))))
            .collect();
        let last = line(&answer("6", "ann", "2", false));
        lines.push(last[..last.len() / 2].to_string());
        let tmp = folder(&lines);
        let d = LabelDir::open(tmp.path()).unwrap();
        assert_eq!(d.ledger.all().len(), 10);
        let t = d.torn.clone().unwrap();
        assert_eq!((t.line, t.bytes), (11, last.len() / 2));
        let msg = t.to_string();
        assert!(
            msg.starts_with("warning: ")
                && msg.contains("answers.jsonl:11: the last line is cut off"),
            "{msg}"
        );
        lines[3] = lines[3][..20].to_string() + "\n";
        let tmp = folder(&lines);
        let e = LabelDir::open(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("answers.jsonl:4: not an answer line"), "{e}");
    }

    /// `margin` is 1 or 2 (or absent); anything else names line, field and range.
    #[test]
    fn a_margin_out_of_range_is_an_error_naming_the_line() {
        let good = line(&answer("1", "ann", "!", false));
        assert!(good.contains("\"margin\":2"), "{good}");
        for bad in ["200", "0", "300", "-1", "1.5", "\"2\""] {
            let tmp = folder(&[
                good.clone(),
                good.replace("\"margin\":2", &format!("\"margin\":{bad}")),
            ]);
            let e = LabelDir::open(tmp.path()).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "answers.jsonl:2: field `margin` is {bad}, out of range"
                )) && e.contains("1 (better) or 2 (much better)"),
                "{e}"
            );
        }
    }

    /// An undo needs an earlier answer by the same annotator to the same
    /// item; undoing twice (two writers on one folder) withdraws nothing more.
    #[test]
    fn an_undo_without_an_answer_is_an_error_naming_the_line() {
        let a = line(&answer("1", "ann", "1", false));
        let tmp = folder(&[a.clone(), line(&undo("1", "mallory"))]);
        let e = LabelDir::open(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("answers.jsonl:2: undo by \"mallory\" of item \"1\"")
                && e.contains("never answered"),
            "{e}"
        );
        let tmp = folder(&[a.clone(), line(&undo("2", "ann"))]);
        let e = LabelDir::open(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("answers.jsonl:2: undo by \"ann\" of item \"2\""),
            "{e}"
        );
        let tmp = folder(&[a.clone(), line(&undo("1", "ann")), line(&undo("1", "ann"))]);
        let d = LabelDir::open(tmp.path()).unwrap();
        assert!(d.ledger.all().is_empty());
        let tmp = folder(&[a, line(&answer("7", "ann", "1", false))]);
        let e = LabelDir::open(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("answers.jsonl:2: names item \"7\""), "{e}");
    }

    /// A line appended twice counts once; a later answer by the same
    /// annotator to the same item replaces the earlier one.
    #[test]
    fn a_repeated_answer_line_counts_once_and_a_later_answer_replaces() {
        let mut lines: Vec<String> = (1..=6)
            .flat_map(|i| ["ann", "bob"].map(|w| line(&answer(&i.to_string(), w, "1", false))))
            .take(11)
            .collect();
        lines.push(lines[10].clone());
        let tmp = folder(&lines);
        let d = LabelDir::open(tmp.path()).unwrap();
        assert_eq!(d.ledger.all().len(), 11);
        assert_eq!(crate::agreement::report(&d).answers, 11);
        // ann changes her mind on item 1 (b, shown ba, key 1 -> now a, key 2).
        lines.push(line(&answer("1", "ann", "2", false)));
        let tmp = folder(&lines);
        let d = LabelDir::open(tmp.path()).unwrap();
        let ann = d.ledger.answers_of("ann");
        assert_eq!(ann.len(), 6);
        assert_eq!(
            ann.iter()
                .filter(|a| a.item == "1")
                .map(|a| a.label)
                .collect::<Vec<_>>(),
            vec![Label::A]
        );
        assert_eq!(d.ledger.last_of("ann").map(|a| a.item.as_str()), Some("1"));
        assert_eq!(crate::agreement::majorities(&d)[0].label, None);
    }
}
