//! A simulated human labeller for offline experiments: it prefers positive
//! sentiment, judged by a word lexicon. The chapter names collecting and
//! curating human feedback as RLHF's main practical cost; a scripted
//! labeller lets the whole loop (sample pairs, label, fit a reward model,
//! optimise the policy) run in seconds with a known ground truth.

use kiln_core::rng::SeededRng;

/// Words that make a text more positive.
pub const POSITIVE: &[&str] = &[
    "love",
    "loved",
    "great",
    "excellent",
    "perfectly",
    "perfect",
    "happy",
    "superb",
    "wonderful",
    "beautifully",
    "recommended",
    "reliable",
    "solid",
    "worth",
    "quiet",
    "easy",
    "hooked",
    "sharp",
    "real",
    "right",
    "early",
    "again",
    "five",
    "best",
    "good",
    "nice",
    "enjoyed",
    "fantastic",
    "amazing",
    "brilliant",
    "delightful",
    "lasts",
];

/// Words that make a text more negative.
pub const NEGATIVE: &[&str] = &[
    "regret",
    "disappointing",
    "unhappy",
    "terrible",
    "broke",
    "poor",
    "cheap",
    "nightmare",
    "failing",
    "loud",
    "heavy",
    "hard",
    "waste",
    "dies",
    "late",
    "damaged",
    "wooden",
    "predictable",
    "bored",
    "boring",
    "grating",
    "flat",
    "clumsy",
    "phone",
    "drags",
    "avoid",
    "not",
    "money",
    "skip",
    "bad",
    "worst",
    "awful",
    "badly",
];

/// Scores texts by a lexicon: `#positive words - #negative words` (words are
/// lower-cased, punctuation stripped).
#[derive(Debug, Clone)]
pub struct LexiconLabeller {
    positive: Vec<String>,
    negative: Vec<String>,
}

impl Default for LexiconLabeller {
    fn default() -> Self {
        Self::new(POSITIVE, NEGATIVE)
    }
}

/// A labeller's verdict on a pair of texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first text is preferred.
    First,
    /// The second text is preferred.
    Second,
    /// No preference (equal scores).
    Tie,
}

impl LexiconLabeller {
    /// A labeller with the given word lists.
    pub fn new(positive: &[&str], negative: &[&str]) -> Self {
        Self {
            positive: positive.iter().map(|w| w.to_lowercase()).collect(),
            negative: negative.iter().map(|w| w.to_lowercase()).collect(),
        }
    }

    /// `#positive - #negative` words of `text`.
    pub fn score(&self, text: &str) -> i64 {
        let mut s = 0i64;
        for w in text.split(|c: char| !c.is_alphanumeric() && c != '\'') {
            if w.is_empty() {
                continue;
            }
            let w = w.to_lowercase();
            if self.positive.contains(&w) {
                s += 1;
            }
            if self.negative.contains(&w) {
                s -= 1;
            }
        }
        s
    }

    /// Whether `text` reads as positive (score > 0).
    pub fn is_positive(&self, text: &str) -> bool {
        self.score(text) > 0
    }

    /// The labeller's preference between two texts.
    pub fn prefer(&self, a: &str, b: &str) -> Verdict {
        match self.score(a).cmp(&self.score(b)) {
            std::cmp::Ordering::Greater => Verdict::First,
            std::cmp::Ordering::Less => Verdict::Second,
            std::cmp::Ordering::Equal => Verdict::Tie,
        }
    }

    /// Like [`LexiconLabeller::prefer`], but a noisy human: with probability
    /// `flip` the verdict is reversed (ties stay ties).
    pub fn prefer_noisy(&self, a: &str, b: &str, flip: f64, rng: &mut SeededRng) -> Verdict {
        match (self.prefer(a, b), rng.bernoulli(flip)) {
            (Verdict::First, true) => Verdict::Second,
            (Verdict::Second, true) => Verdict::First,
            (v, _) => v,
        }
    }

    /// Share of `texts` that read as positive.
    pub fn positive_rate<S: AsRef<str>>(&self, texts: &[S]) -> f64 {
        if texts.is_empty() {
            return 0.0;
        }
        texts
            .iter()
            .filter(|t| self.is_positive(t.as_ref()))
            .count() as f64
            / texts.len() as f64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The labeller agrees with the known sentiment of kiln-data's synthetic
    /// reviews (which it never saw as training data: it is a word list).
    #[test]
    fn lexicon_agrees_with_synthetic_review_labels() {
        let l = LexiconLabeller::default();
        let reviews = kiln_data::text::synthetic_reviews(400, 7);
        let right = reviews
            .iter()
            .filter(|r| l.is_positive(&r.text) == r.positive)
            .count();
        assert!(right as f64 / 400.0 > 0.97, "{right}/400");
        assert_eq!(l.score("I LOVED it, great!"), 2);
        assert_eq!(l.score("Avoid it. A waste of money."), -3);
        assert_eq!(l.prefer("great", "terrible"), Verdict::First);
        assert_eq!(l.prefer("ok", "fine"), Verdict::Tie);
        let mut rng = SeededRng::new(0);
        assert_eq!(
            l.prefer_noisy("great", "bad", 1.0, &mut rng),
            Verdict::Second
        );
        assert_eq!(l.positive_rate(&["great", "bad", "fine", "love"]), 0.5);
    }
}
