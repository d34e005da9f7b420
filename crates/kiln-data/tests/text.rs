//! Token blocks from a real `tokenizers` Tokenizer (a word-level one built
//! from JSON, so no download), over texts, files and lines.
#![allow(clippy::unwrap_used)]

use std::str::FromStr;

use kiln_core::Device;
use kiln_data::text::*;
use tokenizers::Tokenizer;

fn tokenizer() -> Tokenizer {
    let words = [
        "[UNK]", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog",
    ];
    let vocab: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("\"{w}\": {i}"))
        .collect();
    let json = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": null, "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "[UNK]"}}}}"#,
        vocab.join(", ")
    );
    Tokenizer::from_str(&json).unwrap()
}

#[test]
fn texts_files_and_lines_pack_the_same_tokens() {
    let tok = tokenizer();
    let texts = ["the cat sat on the mat", "a dog sat"];
    let tb = TokenBlocks::from_texts(&tok, &texts, 4, Some(1)).unwrap();
    // 2 3 4 5 2 6 1 7 8 4 1  -> 11 tokens, windows of 5 with stride 4: 2 blocks
    assert_eq!(tb.tokens(), &[2, 3, 4, 5, 2, 6, 1, 7, 8, 4, 1]);
    assert_eq!(tb.len(), 2);
    let (x, y) = tb.batch(&[1], &Device::Cpu).unwrap();
    assert_eq!(x.to_vec2::<u32>().unwrap(), vec![vec![2, 6, 1, 7]]);
    assert_eq!(y.to_vec2::<u32>().unwrap(), vec![vec![6, 1, 7, 8]]);

    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, texts[0]).unwrap();
    std::fs::write(&b, texts[1]).unwrap();
    let tf = TokenBlocks::from_files(&tok, &[a, b], 4, Some(1)).unwrap();
    assert_eq!(tf, tb);
    let lines = dir.path().join("lines.txt");
    std::fs::write(&lines, format!("{}\n\n{}\n", texts[0], texts[1])).unwrap();
    assert_eq!(
        TokenBlocks::from_lines(&tok, &lines, 4, Some(1)).unwrap(),
        tb
    );
    let e = TokenBlocks::from_lines(&tok, &dir.path().join("nope.txt"), 4, None).unwrap_err();
    assert!(e.to_string().contains("nope.txt"), "{e}");
}

#[test]
fn synthetic_reviews_tokenize_into_blocks() {
    let tok = tokenizer();
    let reviews = synthetic_reviews(20, 0);
    let texts: Vec<&str> = reviews.iter().map(|r| r.text.as_str()).collect();
    let tb = TokenBlocks::from_texts(&tok, &texts, 8, Some(1)).unwrap();
    assert!(tb.len() > 5);
    let total: usize = tb
        .batches(4, 1, 0, &Device::Cpu)
        .map(|b| b.unwrap().0.dims()[0])
        .sum();
    assert_eq!(total, tb.len());
}
