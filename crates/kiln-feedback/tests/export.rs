//! Agreement and export on a folder of three annotators' answers, and the
//! TRL export trained on by kiln-rlhf's reward model and DPO trainers.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kiln_core::run::RunOptions;
use kiln_core::Device;
use kiln_feedback::agreement::report;
use kiln_feedback::export::{export, Format};
use kiln_feedback::plan::order_for;
use kiln_feedback::store::{decode_key, now_rfc3339, Answer, AnswerLog, Label, LabelDir, Record};
use kiln_rlhf::dpo::{train_dpo_with, Control, DpoConfig};
use kiln_rlhf::reward_train::{train_reward_with, RewardConfig};
use kiln_rlhf::train::TrainingArgs;

fn tiny_lm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-rlhf/tests/fixtures/tiny-lm")
}

/// Labels per item for (ann, bob, cyd): a, b, = (tie), x (both bad), - (skip).
const TABLE: [[&str; 3]; 8] = [
    ["a!", "a", "a"], // 1: a, margins 2, 1, 1
    ["b", "b", "a"],  // 2: b
    ["a", "a", "b"],  // 3: a
    ["=", "=", "a"],  // 4: tie (dropped)
    ["x", "x", "b"],  // 5: both bad (dropped)
    ["a", "b", "="],  // 6: no majority (dropped)
    ["-", "-", "-"],  // 7: only skips (dropped)
    ["b", "b", "b"],  // 8: b
];

/// The key that gives `want` (a/b in the pair's terms) for an item shown in `order`.
fn key_for(want: &str, order: kiln_feedback::Order) -> String {
    let (side, much) = (&want[..1], want.ends_with('!'));
    let left = matches!(
        (side, order),
        ("a", kiln_feedback::Order::Ab) | ("b", kiln_feedback::Order::Ba)
    );
    match (side, left, much) {
        ("=", ..) => "=".into(),
        ("x", ..) => "b".into(),
        ("-", ..) => "skip".into(),
        (_, true, false) => "1".into(),
        (_, false, false) => "2".into(),
        (_, true, true) => "!".into(),
        (_, false, true) => "@".into(),
    }
}

fn answer(item: &str, who: &str, key: &str, order: kiln_feedback::Order, repeat: bool) -> Record {
    let (label, margin) = decode_key(key, order).unwrap();
    Record::Answer(Answer {
        item: item.into(),
        annotator: who.into(),
        time: now_rfc3339(),
        seconds: 2.0,
        shown: order,
        key: key.into(),
        label,
        margin,
        repeat,
    })
}

#[test]
fn agreement_export_and_training_on_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    let texts = [
        "The film was",
        "I think",
        "The fox",
        "What color is the sky?",
    ];
    let mut s = String::new();
    for i in 1..=8 {
        s += &serde_json::json!({"prompt": texts[i % 4], "completion_a": format!(" great {i}"),
                                 "completion_b": format!(" terrible plot {i}")})
        .to_string();
        s.push('\n');
    }
    std::fs::write(&pairs, s).unwrap();
    let out = tmp.path().join("labels");
    LabelDir::create(&out, &pairs).unwrap();
    let log = AnswerLog::open(&out).unwrap();
    let who = ["ann", "bob", "cyd"];
    for (i, row) in TABLE.iter().enumerate() {
        for (w, want) in who.iter().zip(row) {
            let id = (i + 1).to_string();
            let order = order_for(w, &id);
            log.append(&answer(&id, w, &key_for(want, order), order, false))
                .unwrap();
        }
    }
    // Swapped repeats: ann keeps her label on item 1, bob flips on item 2.
    let o = order_for("ann", "1").swapped();
    log.append(&answer("1", "ann", &key_for("a", o), o, true))
        .unwrap();
    let o = order_for("bob", "2").swapped();
    log.append(&answer("2", "bob", &key_for("a", o), o, true))
        .unwrap();

    let dir = LabelDir::open(&out).unwrap();
    let r = report(&dir);
    // from sklearn.metrics import cohen_kappa_score; import krippendorff, numpy as np
    // a,b,t,x = 0,1,2,3; n = np.nan
    // ann=[a,b,a,t,x,a,b]; bob=[a,b,a,t,x,b,b]; cyd=[a,a,b,a,b,t,b]  (item 7 skipped by all)
    // print(cohen_kappa_score(ann,bob), cohen_kappa_score(ann,cyd), cohen_kappa_score(bob,cyd))
    // print(krippendorff.alpha(reliability_data=[ann[:6]+[n]+ann[6:], bob[:6]+[n]+bob[6:],
    //       cyd[:6]+[n]+cyd[6:]], level_of_measurement="nominal"))
    // printed: 0.8 -0.060606060606060774 -0.06060606060606055
    //          0.2666666666666667
    let want = [
        ("ann", "bob", 0.8),
        ("ann", "cyd", -0.060606060606060774),
        ("bob", "cyd", -0.06060606060606055),
    ];
    assert_eq!(r.pairwise_kappa.len(), 3);
    for (p, (a, b, k)) in r.pairwise_kappa.iter().zip(want) {
        assert_eq!((p.a.as_str(), p.b.as_str(), p.items), (a, b, 7));
        assert!((p.kappa.unwrap() - k).abs() < 1e-12, "{p:?}");
    }
    assert_eq!(r.cohen_kappa, None, "three annotators: kappa is per pair");
    assert!((r.krippendorff_alpha.unwrap() - 0.2666666666666667).abs() < 1e-12);
    assert_eq!(
        (r.self_consistency.agreed, r.self_consistency.total),
        (1, 2)
    );
    let labels: Vec<Option<Label>> = r.majority.iter().map(|m| m.label).collect();
    use Label::*;
    assert_eq!(
        labels,
        vec![
            Some(A),
            Some(B),
            Some(A),
            Some(Tie),
            Some(BothBad),
            None,
            None,
            Some(B)
        ]
    );
    assert!(r
        .summary()
        .contains("self-consistency on swapped repeats: 0.5000 (1 of 2)"));

    let trl = out.join("export-trl.jsonl");
    let sum = export(&dir, Format::Trl, &trl).unwrap();
    assert_eq!(
        (
            sum.rows,
            sum.ties,
            sum.both_bad,
            sum.no_majority,
            sum.unlabelled
        ),
        (4, 1, 1, 1, 1)
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&trl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["chosen"], " great 1");
    assert_eq!(rows[0]["rejected"], " terrible plot 1");
    assert!((rows[0]["margin"].as_f64().unwrap() - 4.0 / 3.0).abs() < 1e-12);
    assert_eq!(rows[1]["chosen"], " terrible plot 2");
    let keys: Vec<&String> = rows[1].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["prompt", "chosen", "rejected", "margin"]);
    let raw = out.join("export-raw.jsonl");
    assert_eq!(export(&dir, Format::Raw, &raw).unwrap().rows, 26);

    // kiln-rlhf reads the export as it is, margins included, and trains on it.
    let read = kiln_rlhf::prefs::read_pairs(&trl).unwrap();
    assert_eq!(read.len(), 4);
    assert!((read[0].1.margin.unwrap() - 4.0 / 3.0).abs() < 1e-12);
    let train = TrainingArgs {
        batch_size: 2,
        epochs: 1,
        eval_fraction: 0.0,
        seed: 1,
        ..TrainingArgs::with_lr(1e-3)
    };
    let dev = Device::Cpu;
    let run = |name: &str| RunOptions::new_run(Some(&tmp.path().join(name))).quiet(true);
    let rm = RewardConfig {
        prefs: trl.clone(),
        model: tiny_lm(),
        train: train.clone(),
        ..Default::default()
    };
    let rep = train_reward_with(&rm, &dev, &run("rm"), &Control::default()).unwrap();
    assert!(rep.train["loss"].is_finite(), "{:?}", rep.train);
    let dpo = DpoConfig {
        prefs: trl,
        model: tiny_lm(),
        train,
        ..Default::default()
    };
    let rep = train_dpo_with(&dpo, &dev, &run("dpo"), &Control::default()).unwrap();
    assert!(rep.train["loss"].is_finite(), "{:?}", rep.train);
}
