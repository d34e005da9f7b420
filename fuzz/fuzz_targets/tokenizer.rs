//! Tokenizer loading: the input is `tokenizer.json`, read by
//! `Gpt2Tokenizer::from_file` and used to encode and decode a little text.
#![no_main]
use kiln_lm::Gpt2Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "tokenizer.json", data);
    if let Ok(tok) = Gpt2Tokenizer::from_file(&p) {
        let _ = tok.vocab_size();
        let _ = tok.eos_id();
        if let Ok(ids) = tok.encode("Hello, world! <|endoftext|> héllo") {
            let _ = tok.decode(&ids);
            let mut s = tok.stream();
            for id in ids {
                let _ = s.push(id);
            }
            let _ = s.flush();
        }
    }
});
