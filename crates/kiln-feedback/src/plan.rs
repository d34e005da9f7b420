//! Who sees what, in which order: sides drawn per (annotator, item),
//! overlap by a minimum number of submitted answers per item (Argilla's
//! `min_submitted`), and a share of each annotator's items shown again later
//! with the sides swapped, to measure self-consistency.
//!
//! Everything is a pure function of the pairs and the log, so a restarted
//! labeller or server carries on exactly where it stopped.

use std::collections::{HashMap, HashSet};

use crate::pairs::Item;
use crate::store::{Label, Ledger, Order};

/// A 64-bit hash of the parts (FNV-1a, then splitmix64's finaliser so that
/// nearby inputs give unrelated bits).
pub fn mix(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A uniform number in [0, 1) drawn from the parts.
pub fn unit(parts: &[&str]) -> f64 {
    (mix(parts) >> 11) as f64 / (1u64 << 53) as f64
}

/// The sides an annotator first sees an item in: a fair coin per
/// (annotator, item), so neither completion sits on the left by habit.
pub fn order_for(annotator: &str, item: &str) -> Order {
    if mix(&["sides", annotator, item]) & 1 == 0 {
        Order::Ab
    } else {
        Order::Ba
    }
}

/// The assignment rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// An item is handed out until it has this many submitted (not skipped)
    /// answers; `usize::MAX` hands every item to every annotator.
    pub min_submitted: usize,
    /// Share of an annotator's answered items shown again with sides swapped.
    pub repeat_share: f64,
    /// Answers given after an original before its repeat is due (so the
    /// annotator does not simply remember the last key).
    pub repeat_gap: usize,
}

impl Plan {
    /// Every item to every annotator, no repeats (the terminal labeller's default).
    pub fn everything() -> Self {
        Self {
            min_submitted: usize::MAX,
            repeat_share: 0.0,
            repeat_gap: 5,
        }
    }

    /// Whether the annotator's answer to `item` gets a swapped repeat.
    pub fn repeats(&self, annotator: &str, item: &str) -> bool {
        unit(&["repeat", annotator, item]) < self.repeat_share
    }
}

/// The next thing to show an annotator.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    /// Index into the items.
    pub index: usize,
    /// The item's id.
    pub id: String,
    /// Which completion goes left.
    pub order: Order,
    /// Whether this is a swapped repeat.
    pub repeat: bool,
}

/// An annotator's queue: what is due now and how much is left.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// What to show next, if anything.
    pub next: Option<Next>,
    /// Answers the annotator has in force (repeats included).
    pub done: usize,
    /// Items and repeats still to do (the next one included).
    pub left: usize,
}

/// Works out an annotator's queue from the pairs and the answers in force.
pub fn queue(plan: &Plan, items: &[Item], ledger: &Ledger, annotator: &str) -> Queue {
    let mine = ledger.answers_of(annotator);
    let index: HashMap<&str, usize> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.id.as_str(), i))
        .collect();
    let answered: HashSet<&str> = mine
        .iter()
        .filter(|a| !a.repeat)
        .map(|a| a.item.as_str())
        .collect();
    let repeated: HashSet<&str> = mine
        .iter()
        .filter(|a| a.repeat)
        .map(|a| a.item.as_str())
        .collect();
    let mut submitted: HashMap<&str, usize> = HashMap::new();
    for a in ledger.all() {
        if !a.repeat && a.label != Label::Skip {
            *submitted.entry(a.item.as_str()).or_default() += 1;
        }
    }
    // Repeats owed: originals with a judgement, drawn for a repeat, not yet repeated.
    let owed: Vec<(usize, Next)> = mine
        .iter()
        .enumerate()
        .filter(|(_, a)| {
            !a.repeat
                && a.label != Label::Skip
                && !repeated.contains(a.item.as_str())
                && plan.repeats(annotator, &a.item)
        })
        .filter_map(|(pos, a)| {
            Some((
                pos,
                Next {
                    index: *index.get(a.item.as_str())?,
                    id: a.item.clone(),
                    order: a.shown.swapped(),
                    repeat: true,
                },
            ))
        })
        .collect();
    let fresh: Vec<Next> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| {
            !answered.contains(it.id.as_str())
                && submitted.get(it.id.as_str()).copied().unwrap_or(0) < plan.min_submitted
        })
        .map(|(i, it)| Next {
            index: i,
            id: it.id.clone(),
            order: order_for(annotator, &it.id),
            repeat: false,
        })
        .collect();
    let due = owed
        .iter()
        .find(|(pos, _)| mine.len() - 1 - pos >= plan.repeat_gap)
        .map(|(_, n)| n.clone());
    let next = due
        .or_else(|| fresh.first().cloned())
        .or_else(|| owed.first().map(|(_, n)| n.clone()));
    Queue {
        next,
        done: mine.len(),
        left: owed.len() + fresh.len(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{decode_key, now_rfc3339, Answer, Record};

    fn items(n: usize) -> Vec<Item> {
        (1..=n)
            .map(|i| Item {
                id: i.to_string(),
                prompt: serde_json::json!("p"),
                completion_a: format!("a{i}"),
                completion_b: format!("b{i}"),
            })
            .collect()
    }

    fn answer(l: &mut Ledger, who: &str, n: &Next, key: &str) {
        let (label, margin) = decode_key(key, n.order).unwrap();
        l.apply(&Record::Answer(Answer {
            item: n.id.clone(),
            annotator: who.into(),
            time: now_rfc3339(),
            seconds: 1.0,
            shown: n.order,
            key: key.into(),
            label,
            margin,
            repeat: n.repeat,
        }));
    }

    /// Sides are a fair coin; overlap stops handing out an item once it has
    /// enough submitted answers; repeats come with swapped sides after the gap.
    #[test]
    fn sides_overlap_and_repeats() {
        let its = items(40);
        let left_a = its
            .iter()
            .filter(|i| order_for("ann", &i.id) == Order::Ab)
            .count();
        assert!((12..=28).contains(&left_a), "{left_a}");
        let plan = Plan {
            min_submitted: 2,
            repeat_share: 0.25,
            repeat_gap: 3,
        };
        let mut l = Ledger::default();
        let mut seen_repeat = 0;
        for who in ["ann", "bob"] {
            loop {
                let q = queue(&plan, &its, &l, who);
                let Some(n) = q.next else { break };
                if n.repeat {
                    let orig = l
                        .answers_of(who)
                        .iter()
                        .find(|a| a.item == n.id && !a.repeat)
                        .unwrap();
                    assert_eq!(n.order, orig.shown.swapped());
                    seen_repeat += 1;
                }
                answer(&mut l, who, &n, "1");
            }
        }
        assert!(seen_repeat >= 10, "{seen_repeat}");
        // Two annotators, min 2: both did every item; a third gets none.
        assert_eq!(l.answers_of("ann").iter().filter(|a| !a.repeat).count(), 40);
        let q = queue(&plan, &its, &l, "cyd");
        assert_eq!((q.next, q.done, q.left), (None, 0, 0));
        // A skip does not count as submitted: the item goes out again.
        let mut l = Ledger::default();
        let n = queue(&plan, &its[..1], &l, "ann").next.unwrap();
        answer(&mut l, "ann", &n, "skip");
        answer(&mut l, "bob", &n, "1");
        assert!(queue(&plan, &its[..1], &l, "cyd").next.is_some());
    }
}
