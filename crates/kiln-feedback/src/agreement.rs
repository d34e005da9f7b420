//! Inter-annotator agreement on the answers in force: Cohen's κ for each
//! pair of annotators, Krippendorff's α (nominal, missing answers allowed)
//! for all of them, self-consistency on the swapped repeats, and the
//! majority label per item.
//!
//! Labels are the four judgements `a`, `b`, `tie`, `both_bad` in the pair's
//! own terms (sides undone); skips are missing values, margins are ignored
//! (a "much better" and a "better" for the same completion agree). Each
//! annotator's (not repeated) answer in force to an item is their label.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::store::{Label, LabelDir};

/// Cohen's κ of two raters' paired labels; `None` for no pairs or when
/// chance agreement is 1 (both gave one and the same label throughout), where
/// κ is 0/0 (scikit-learn returns nan there).
pub fn cohen_kappa<T: Ord + Copy>(x: &[T], y: &[T]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "cohen_kappa needs paired labels");
    let n = x.len() as f64;
    if x.is_empty() {
        return None;
    }
    let observed = x.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / n;
    let mut cx: BTreeMap<T, f64> = BTreeMap::new();
    let mut cy: BTreeMap<T, f64> = BTreeMap::new();
    for (a, b) in x.iter().zip(y) {
        *cx.entry(*a).or_default() += 1.0;
        *cy.entry(*b).or_default() += 1.0;
    }
    let expected: f64 = cx
        .iter()
        .map(|(c, nx)| nx * cy.get(c).copied().unwrap_or(0.0))
        .sum::<f64>()
        / (n * n);
    if (1.0 - expected).abs() < 1e-15 {
        return None;
    }
    Some((observed - expected) / (1.0 - expected))
}

/// Krippendorff's α for nominal labels. `table[r][u]` is rater `r`'s label
/// for unit `u`, `None` where missing; units with fewer than two labels do
/// not count. `None` when fewer than two labels are pairable or all pairable
/// labels are one value (expected disagreement 0).
pub fn krippendorff_alpha_nominal<T: Ord + Copy>(table: &[Vec<Option<T>>]) -> Option<f64> {
    let units = table.iter().map(Vec::len).max().unwrap_or(0);
    // Coincidence matrix o[c][k]: each ordered pair of labels within a unit,
    // weighted 1/(m_u - 1).
    let mut o: BTreeMap<(T, T), f64> = BTreeMap::new();
    for u in 0..units {
        let vals: Vec<T> = table
            .iter()
            .filter_map(|r| r.get(u).copied().flatten())
            .collect();
        let m = vals.len();
        if m < 2 {
            continue;
        }
        for (i, a) in vals.iter().enumerate() {
            for (j, b) in vals.iter().enumerate() {
                if i != j {
                    *o.entry((*a, *b)).or_default() += 1.0 / (m - 1) as f64;
                }
            }
        }
    }
    let mut nc: BTreeMap<T, f64> = BTreeMap::new();
    for ((c, _), v) in &o {
        *nc.entry(*c).or_default() += v;
    }
    let n: f64 = nc.values().sum();
    if n < 2.0 {
        return None;
    }
    let disagree_observed: f64 = o.iter().filter(|((c, k), _)| c != k).map(|(_, v)| v).sum();
    let sum_sq: f64 = nc.values().map(|v| v * v).sum();
    let disagree_expected = n * n - sum_sq; // sum over c != k of n_c n_k
    if disagree_expected <= 0.0 {
        return None;
    }
    Some(1.0 - (n - 1.0) * disagree_observed / disagree_expected)
}

/// κ between two annotators.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairKappa {
    /// First annotator.
    pub a: String,
    /// Second annotator.
    pub b: String,
    /// Items both labelled.
    pub items: usize,
    /// Cohen's κ (`None` when undefined).
    pub kappa: Option<f64>,
}

/// Self-consistency on swapped repeats.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Consistency {
    /// Repeats whose label matched the original's.
    pub agreed: usize,
    /// Repeats with a label on both showings.
    pub total: usize,
    /// Per annotator: (agreed, total).
    pub by_annotator: BTreeMap<String, (usize, usize)>,
}

impl Consistency {
    /// `agreed / total`, `None` without repeats.
    pub fn rate(&self) -> Option<f64> {
        (self.total > 0).then(|| self.agreed as f64 / self.total as f64)
    }
}

/// The majority label of one item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Majority {
    /// The item's id.
    pub item: String,
    /// The label with the most votes; `None` without votes (unlabelled:
    /// `votes` is empty) or on a tie for first (no majority).
    pub label: Option<Label>,
    /// Votes per label.
    pub votes: BTreeMap<Label, usize>,
    /// Mean margin of the votes for the majority preference (`a` or `b`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

/// Everything `rlhf agreement` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Annotators with answers.
    pub annotators: Vec<String>,
    /// Items in the pairs file.
    pub items: usize,
    /// Answers in force (repeats and skips included).
    pub answers: usize,
    /// Cohen's κ for each pair of annotators.
    pub pairwise_kappa: Vec<PairKappa>,
    /// Cohen's κ when there are exactly two annotators.
    pub cohen_kappa: Option<f64>,
    /// Krippendorff's α (nominal) over all annotators.
    pub krippendorff_alpha: Option<f64>,
    /// Self-consistency on swapped repeats.
    pub self_consistency: Consistency,
    /// Majority label per item, in file order.
    pub majority: Vec<Majority>,
}

/// Each annotator's label and margin per item (first answers, skips left out).
pub fn first_labels(dir: &LabelDir) -> BTreeMap<String, HashMap<String, (Label, Option<u8>)>> {
    let mut out: BTreeMap<String, HashMap<String, (Label, Option<u8>)>> = BTreeMap::new();
    for who in dir.ledger.annotators() {
        let m = out.entry(who.clone()).or_default();
        for a in dir.ledger.answers_of(&who) {
            if !a.repeat && a.label != Label::Skip {
                m.entry(a.item.clone()).or_insert((a.label, a.margin));
            }
        }
    }
    out
}

/// The majority label of every item, in file order.
pub fn majorities(dir: &LabelDir) -> Vec<Majority> {
    let labels = first_labels(dir);
    dir.items
        .iter()
        .map(|it| {
            let mut votes: BTreeMap<Label, usize> = BTreeMap::new();
            let mut margins: BTreeMap<Label, Vec<f64>> = BTreeMap::new();
            for m in labels.values() {
                if let Some((l, margin)) = m.get(&it.id) {
                    *votes.entry(*l).or_default() += 1;
                    if let Some(x) = margin {
                        margins.entry(*l).or_default().push(f64::from(*x));
                    }
                }
            }
            let top = votes.values().copied().max().unwrap_or(0);
            let winners: Vec<Label> = votes
                .iter()
                .filter(|(_, v)| **v == top)
                .map(|(l, _)| *l)
                .collect();
            let label = (top > 0 && winners.len() == 1).then(|| winners[0]);
            let margin = label
                .and_then(|l| margins.get(&l))
                .map(|v| v.iter().sum::<f64>() / v.len() as f64);
            Majority {
                item: it.id.clone(),
                label,
                votes,
                margin,
            }
        })
        .collect()
}

/// Computes the report for a labelling folder.
pub fn report(dir: &LabelDir) -> Report {
    let labels = first_labels(dir);
    let annotators: Vec<String> = labels.keys().cloned().collect();
    let mut pairwise = Vec::new();
    for (i, a) in annotators.iter().enumerate() {
        for b in &annotators[i + 1..] {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for it in &dir.items {
                if let (Some(la), Some(lb)) = (labels[a].get(&it.id), labels[b].get(&it.id)) {
                    x.push(la.0);
                    y.push(lb.0);
                }
            }
            pairwise.push(PairKappa {
                a: a.clone(),
                b: b.clone(),
                items: x.len(),
                kappa: cohen_kappa(&x, &y),
            });
        }
    }
    let table: Vec<Vec<Option<Label>>> = annotators
        .iter()
        .map(|a| {
            dir.items
                .iter()
                .map(|it| labels[a].get(&it.id).map(|l| l.0))
                .collect()
        })
        .collect();
    let mut sc = Consistency::default();
    for who in &annotators {
        let mine = dir.ledger.answers_of(who);
        for r in mine.iter().filter(|a| a.repeat && a.label != Label::Skip) {
            if let Some((orig, _)) = labels[who].get(&r.item) {
                let e = sc.by_annotator.entry(who.clone()).or_default();
                e.1 += 1;
                sc.total += 1;
                if *orig == r.label {
                    e.0 += 1;
                    sc.agreed += 1;
                }
            }
        }
    }
    let cohen = if pairwise.len() == 1 {
        pairwise[0].kappa
    } else {
        None
    };
    Report {
        answers: dir.ledger.all().len(),
        items: dir.items.len(),
        cohen_kappa: cohen,
        krippendorff_alpha: krippendorff_alpha_nominal(&table),
        pairwise_kappa: pairwise,
        self_consistency: sc,
        majority: majorities(dir),
        annotators,
    }
}

impl Report {
    /// The report as the lines `rlhf agreement` prints.
    pub fn summary(&self) -> String {
        let f = |x: Option<f64>| x.map_or("undefined".into(), |v| format!("{v:.4}"));
        let mut s = format!(
            "{} annotators ({}), {} items, {} answers in force\n",
            self.annotators.len(),
            self.annotators.join(", "),
            self.items,
            self.answers
        );
        for p in &self.pairwise_kappa {
            s += &format!(
                "Cohen's kappa {} vs {}: {} on {} shared items\n",
                p.a,
                p.b,
                f(p.kappa),
                p.items
            );
        }
        s += &format!(
            "Krippendorff's alpha (nominal, {} annotators): {}\n",
            self.annotators.len(),
            f(self.krippendorff_alpha)
        );
        let sc = &self.self_consistency;
        s += &format!(
            "self-consistency on swapped repeats: {} ({} of {})\n",
            f(sc.rate()),
            sc.agreed,
            sc.total
        );
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for m in &self.majority {
            // As `export` counts them: no votes is unlabelled, an even split no majority.
            let name = match m.label {
                Some(l) => l.name(),
                None if m.votes.is_empty() => "unlabelled",
                None => "no majority",
            };
            *counts.entry(name).or_default() += 1;
        }
        let set: BTreeSet<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s += &format!(
            "majority labels: {}",
            set.into_iter().collect::<Vec<_>>().join(", ")
        );
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // Reference values: scikit-learn 1.9.1 and krippendorff 0.9.0 on these tables.
    //
    // from sklearn.metrics import cohen_kappa_score
    // import krippendorff, numpy as np
    // x = [0,1,2,3,0,1,1,0,2,0,1,3,0,0,1]
    // y = [0,1,2,0,0,1,0,0,2,1,1,3,2,0,1]
    // print(repr(cohen_kappa_score(x, y)))
    // t = [[0,1,2,3,0,1,1,0,2,0,np.nan,3],
    //      [0,1,2,0,0,1,0,np.nan,2,1,1,3],
    //      [0,np.nan,2,0,1,1,0,0,np.nan,1,1,np.nan],
    //      [1,1,2,0,0,np.nan,0,0,2,1,np.nan,3]]
    // print(repr(krippendorff.alpha(reliability_data=t, level_of_measurement="nominal")))
    // print(repr(krippendorff.alpha(reliability_data=t[:2], level_of_measurement="nominal")))
    // printed:
    // 0.6153846153846154
    // np.float64(0.6563573883161512)
    // np.float64(0.6068965517241379)
    const SKLEARN_KAPPA: f64 = 0.6153846153846154;
    const KRIPP_ALPHA_4: f64 = 0.6563573883161512;
    const KRIPP_ALPHA_2: f64 = 0.6068965517241379;

    fn opt(v: &[f64]) -> Vec<Option<u8>> {
        v.iter()
            .map(|x| (!x.is_nan()).then_some(*x as u8))
            .collect()
    }

    #[test]
    fn kappa_and_alpha_match_the_reference_packages() {
        let x = [0u8, 1, 2, 3, 0, 1, 1, 0, 2, 0, 1, 3, 0, 0, 1];
        let y = [0u8, 1, 2, 0, 0, 1, 0, 0, 2, 1, 1, 3, 2, 0, 1];
        let k = cohen_kappa(&x, &y).unwrap();
        assert!((k - SKLEARN_KAPPA).abs() < 1e-12, "{k}");
        let n = f64::NAN;
        let t = vec![
            opt(&[0., 1., 2., 3., 0., 1., 1., 0., 2., 0., n, 3.]),
            opt(&[0., 1., 2., 0., 0., 1., 0., n, 2., 1., 1., 3.]),
            opt(&[0., n, 2., 0., 1., 1., 0., 0., n, 1., 1., n]),
            opt(&[1., 1., 2., 0., 0., n, 0., 0., 2., 1., n, 3.]),
        ];
        let a = krippendorff_alpha_nominal(&t).unwrap();
        assert!((a - KRIPP_ALPHA_4).abs() < 1e-12, "{a}");
        let a2 = krippendorff_alpha_nominal(&t[..2]).unwrap();
        assert!((a2 - KRIPP_ALPHA_2).abs() < 1e-12, "{a2}");
        // Undefined cases: one constant label, nothing pairable.
        assert_eq!(cohen_kappa(&[1u8, 1], &[1, 1]), None);
        assert_eq!(
            krippendorff_alpha_nominal(&[opt(&[1., n]), opt(&[n, 1.])]),
            None
        );
        // Perfect agreement.
        assert_eq!(cohen_kappa(&[1u8, 2, 1], &[1, 2, 1]), Some(1.0));
    }
}
