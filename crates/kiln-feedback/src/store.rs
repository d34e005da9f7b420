//! The answer store: `DIR/answers.jsonl`, one JSON line per answer or undo,
//! shared by every annotator and both labellers.
//!
//! Each line is written with one `write` under an exclusive `flock` (plus a
//! mutex for threads of one process) and fsynced before the call returns,
//! so the next item is shown, or an HTTP answer acknowledged, only once the
//! answer is on disk. Lines of concurrent writers never interleave. A writer
//! killed mid-line can leave a torn last line: readers ignore it, and the
//! next writer cuts it off before appending, so a kill -9 loses at most the
//! answer being written. The log is append-only: an undo is a line of its
//! own, and [`Ledger`] replays the file into the answers in force.

use std::collections::HashMap;
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

/// Reads `answers.jsonl`: its records, and whether a torn last line (no
/// newline, from a writer killed mid-line) was left out. A missing file
/// has no records.
pub fn read_log(path: &Path) -> Result<(Vec<Record>, bool)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(FeedbackError::io(path, e)),
    };
    let torn = !text.is_empty() && !text.ends_with('\n');
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in whole.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(line)
            .map_err(|e| FeedbackError::line(path, i + 1, format!("not an answer line: {e}")))?;
        out.push(r);
    }
    Ok((out, torn))
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

    /// Applies one record. An undo withdraws the annotator's latest answer
    /// in force for that item (and repeat flag); an undo with nothing to
    /// withdraw changes nothing.
    pub fn apply(&mut self, r: &Record) {
        match r {
            Record::Answer(a) => self
                .by_annotator
                .entry(a.annotator.clone())
                .or_default()
                .push(a.clone()),
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

/// A labelling folder: the pairs (copied in), the log, and the answers in force.
#[derive(Debug)]
pub struct LabelDir {
    /// The folder.
    pub dir: PathBuf,
    /// The pairs, in file order.
    pub items: Vec<Item>,
    /// The log's replay.
    pub ledger: Ledger,
    /// Whether a torn last line was found (and will be cut on the next write).
    pub torn: bool,
}

impl LabelDir {
    /// Creates or reopens `dir` for labelling `pairs`: the pairs file is
    /// copied in on first use; reopening with a different pairs file is
    /// refused (the answers would point at the wrong items).
    pub fn create(dir: &Path, pairs: &Path) -> Result<Self> {
        let src = std::fs::read(pairs).map_err(|e| FeedbackError::io(pairs, e))?;
        // Parse before touching the folder, so a bad file leaves nothing behind.
        crate::pairs::parse_items(&String::from_utf8_lossy(&src), pairs)?;
        std::fs::create_dir_all(dir).map_err(|e| FeedbackError::io(dir, e))?;
        let copy = dir.join(PAIRS);
        match std::fs::read(&copy) {
            Ok(old) if old == src => {}
            Ok(_) => {
                return Err(FeedbackError::Invalid(format!(
                    "{} already holds answers for another pairs file ({} differs from {}); \
                     use a new --out folder",
                    dir.display(),
                    copy.display(),
                    pairs.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = dir.join(format!("{PAIRS}.tmp"));
                std::fs::write(&tmp, &src).map_err(|e| FeedbackError::io(&tmp, e))?;
                std::fs::rename(&tmp, &copy).map_err(|e| FeedbackError::io(&copy, e))?;
            }
            Err(e) => return Err(FeedbackError::io(&copy, e)),
        }
        Self::open(dir)
    }

    /// Opens an existing labelling folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let copy = dir.join(PAIRS);
        if !copy.is_file() {
            return Err(FeedbackError::Invalid(format!(
                "{} is not a labelling folder: it has no {PAIRS} (made by `rlhf label` or `rlhf serve`)",
                dir.display()
            )));
        }
        let items = read_items(&copy)?;
        let (records, torn) = read_log(&dir.join(ANSWERS))?;
        let ids: std::collections::HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        for r in &records {
            let item = match r {
                Record::Answer(a) => &a.item,
                Record::Undo(u) => &u.item,
            };
            if !ids.contains(item.as_str()) {
                return Err(FeedbackError::Invalid(format!(
                    "{}: an answer names item {item:?}, which {} does not have",
                    dir.join(ANSWERS).display(),
                    copy.display()
                )));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            items,
            ledger: Ledger::from_records(&records),
            torn,
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
}
