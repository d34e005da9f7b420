//! The full-screen terminal labeller (`rlhf label`): one pair at a time,
//! single keys, no Enter. `1`/`2` pick the left/right completion, `!`/`@`
//! (shift) pick it as much better, `=` tie, `b` both bad, Backspace skip,
//! `u` undo, `?` help, `q` quit. Each answer is fsynced to the log before
//! the next pair is drawn, so quitting, a crash or kill -9 loses at most
//! the pair on screen; rerunning resumes where it stopped.

use std::io::Write;
use std::time::Instant;

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue as q, style, terminal};

use crate::error::{FeedbackError, Result};
use crate::plan::{queue, Plan};
use crate::store::{decode_key, now_rfc3339, Answer, AnswerLog, Label, LabelDir, Record, Undo};

/// What a labelling session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Answers written in this session.
    pub answered: usize,
    /// Undos written in this session.
    pub undone: usize,
    /// The annotator's answers in force at the end.
    pub done: usize,
    /// Items and repeats left at the end.
    pub left: usize,
}

const HELP: &str = "Keys (no Enter needed):
  1   the left completion is better       !  (shift-1) the left one is much better
  2   the right completion is better      @  (shift-2) the right one is much better
  =   tie: equally good                   b  both are bad
  Backspace  skip this pair               u  undo the last answer (shows it again)
  ?   this help                           q / Esc  quit (every answer is already saved)
Left and right are drawn at random per pair; the file records which was which.";

/// Restores the terminal however the labeller ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Self> {
        let io = |e: std::io::Error| {
            FeedbackError::Invalid(format!("the labeller needs an interactive terminal: {e}"))
        };
        terminal::enable_raw_mode().map_err(io)?;
        let s = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .map_err(io)?;
        Ok(s)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// Word-wraps `text` to `width` columns (newlines kept, long words cut).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut out = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split_whitespace() {
            let mut w: Vec<char> = word.chars().collect();
            while w.len() > width {
                if !line.is_empty() {
                    out.push(std::mem::take(&mut line));
                }
                out.push(w.drain(..width).collect());
            }
            let w: String = w.into_iter().collect();
            let need = line.chars().count() + usize::from(!line.is_empty()) + w.chars().count();
            if need > width && !line.is_empty() {
                out.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&w);
        }
        out.push(line);
    }
    out
}

fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n >= width {
        s.chars().take(width).collect()
    } else {
        format!("{s}{}", " ".repeat(width - n))
    }
}

/// What the screen shows besides the pair.
#[derive(Clone, Copy)]
struct View<'a> {
    annotator: &'a str,
    done: usize,
    left: usize,
    help: bool,
    status: &'a str,
}

/// The screen's lines for the current state.
fn render(
    dir: &LabelDir,
    next: Option<&crate::plan::Next>,
    v: &View<'_>,
    (w, h): (usize, usize),
) -> Vec<String> {
    let View {
        annotator,
        done,
        left,
        help,
        status,
    } = *v;
    let mut lines = vec![
        format!("kiln feedback | {annotator} | {done} done, {left} left | ? help"),
        "-".repeat(w),
    ];
    if help {
        lines.extend(HELP.lines().map(str::to_string));
    } else if let Some(n) = next {
        let it = &dir.items[n.index];
        let tag = if n.repeat { " (seen before)" } else { "" };
        lines.push(format!("Pair {}{tag}. Prompt:", it.id));
        let prompt = wrap(&it.prompt_text(), w.saturating_sub(2));
        let budget = h.saturating_sub(8) / 3;
        for l in prompt.iter().take(budget.max(1)) {
            lines.push(format!("  {l}"));
        }
        lines.push(String::new());
        let col = w.saturating_sub(3) / 2;
        let lw = wrap(it.completion(n.order.left()), col);
        let rw = wrap(it.completion(n.order.right()), col);
        lines.push(format!(
            "{} | {}",
            pad("[1] left", col),
            pad("[2] right", col)
        ));
        let rows = lw.len().max(rw.len());
        let room = h.saturating_sub(lines.len() + 3);
        for i in 0..rows.min(room) {
            let l = lw.get(i).map_or("", String::as_str);
            let r = rw.get(i).map_or("", String::as_str);
            lines.push(format!("{} | {}", pad(l, col), pad(r, col)));
        }
        lines.push(String::new());
        lines.push(
            "1/2 better  !/@ much better  = tie  b both bad  Bksp skip  u undo  q quit".into(),
        );
    } else {
        lines.push(format!(
            "All done: {done} answers saved in {}. u undo, q quit.",
            dir.dir.join(crate::store::ANSWERS).display()
        ));
    }
    if !status.is_empty() {
        lines.push(status.to_string());
    }
    lines.truncate(h);
    lines
}

/// Checks that there is a terminal the labeller can take over (raw mode
/// on and off again), so a caller can fail before creating anything.
pub fn check_terminal() -> Result<()> {
    let io = |e: std::io::Error| {
        FeedbackError::Invalid(format!("the labeller needs an interactive terminal: {e}"))
    };
    terminal::enable_raw_mode().map_err(io)?;
    terminal::disable_raw_mode().map_err(io)
}

/// Runs the labeller until `q`: answers are appended to `log` (and applied
/// to `dir.ledger`) one by one.
pub fn label(dir: &mut LabelDir, log: &AnswerLog, annotator: &str, plan: &Plan) -> Result<Session> {
    let mut session = Session {
        answered: 0,
        undone: 0,
        done: 0,
        left: 0,
    };
    let screen = Screen::enter()?;
    let io = |e: std::io::Error| FeedbackError::Invalid(format!("terminal: {e}"));
    let mut out = std::io::stdout();
    let mut help = false;
    let mut status = if dir.ledger.answers_of(annotator).is_empty() {
        String::new()
    } else {
        format!(
            "Resumed: {} earlier answers by {annotator}.",
            dir.ledger.answers_of(annotator).len()
        )
    };
    // The pair on screen and when it was first drawn (seconds spent).
    let mut shown: Option<(String, bool, Instant)> = None;
    loop {
        let qu = queue(plan, &dir.items, &dir.ledger, annotator);
        session.done = qu.done;
        session.left = qu.left;
        let key_of = |n: &crate::plan::Next| (n.id.clone(), n.repeat);
        match (&shown, &qu.next) {
            (Some((id, rep, _)), Some(n)) if (id.clone(), *rep) == key_of(n) => {}
            (_, Some(n)) => shown = Some((n.id.clone(), n.repeat, Instant::now())),
            (_, None) => shown = None,
        }
        let (w, h) = terminal::size().map_err(io)?;
        let view = View {
            annotator,
            done: qu.done,
            left: qu.left,
            help,
            status: &status,
        };
        let lines = render(dir, qu.next.as_ref(), &view, (w as usize, h as usize));
        q!(out, terminal::Clear(terminal::ClearType::All)).map_err(io)?;
        for (i, l) in lines.iter().enumerate() {
            q!(out, cursor::MoveTo(0, i as u16), style::Print(l)).map_err(io)?;
        }
        out.flush().map_err(io)?;
        let ev = event::read().map_err(io)?;
        let Event::Key(k) = ev else { continue };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        let ctrl_c = k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c');
        let key = match k.code {
            _ if ctrl_c => break,
            KeyCode::Char('q') | KeyCode::Esc => break,
            KeyCode::Char('?') => {
                help = !help;
                continue;
            }
            KeyCode::Char('u') => {
                help = false;
                match dir.ledger.last_of(annotator).cloned() {
                    Some(a) => {
                        let rec = Record::Undo(Undo {
                            item: a.item.clone(),
                            annotator: annotator.to_string(),
                            time: now_rfc3339(),
                            repeat: a.repeat,
                        });
                        log.append(&rec)?;
                        dir.ledger.apply(&rec);
                        session.undone += 1;
                        status = format!("Undid pair {} ({}).", a.item, a.label.name());
                    }
                    None => status = "Nothing to undo.".into(),
                }
                continue;
            }
            KeyCode::Char(c @ ('1' | '2' | '!' | '@' | '=' | 'b')) => c.to_string(),
            KeyCode::Backspace => "skip".to_string(),
            _ => {
                status = "Unknown key; ? for help.".into();
                continue;
            }
        };
        help = false;
        let (Some(n), Some((_, _, since))) = (&qu.next, &shown) else {
            status = "Nothing left to label; u undoes, q quits.".into();
            continue;
        };
        let Some((label, margin)) = decode_key(&key, n.order) else {
            continue;
        };
        let rec = Record::Answer(Answer {
            item: n.id.clone(),
            annotator: annotator.to_string(),
            time: now_rfc3339(),
            seconds: (since.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            shown: n.order,
            key,
            label,
            margin,
            repeat: n.repeat,
        });
        log.append(&rec)?;
        dir.ledger.apply(&rec);
        session.answered += 1;
        status = match label {
            Label::Skip => format!("Skipped pair {}.", n.id),
            l => format!("Saved pair {}: {}.", n.id, l.name()),
        };
    }
    drop(screen);
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_and_cuts_long_ones() {
        assert_eq!(
            wrap("the quick brown fox", 9),
            vec!["the quick", "brown fox"]
        );
        assert_eq!(wrap("abcdefghij x", 4), vec!["abcd", "efgh", "ij x"]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
        assert_eq!(pad("ab", 4), "ab  ");
        assert_eq!(pad("abcdef", 4), "abcd");
    }
}
