//! Text corpora: `read_text` and the `lines:` / `files:` corpus sources on
//! the input as a file.
#![no_main]
use kiln_data::text::{read_text, TextSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "corpus/a.txt", data);
    let _ = read_text(&p);
    let _ = TextSource::Lines(p.clone()).load(0);
    let _ = TextSource::Files(p).load(0);
    let _ = TextSource::Files(dir.path().join("corpus")).load(0);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<TextSource>();
    }
});
