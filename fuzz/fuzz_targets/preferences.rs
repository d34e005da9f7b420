//! Preference JSONL: `parse_preferences` and `read_preferences`; pairs that
//! parse are written back and read again unchanged.
#![no_main]
use std::path::Path;

use kiln_data::text::{parse_preferences, read_preferences, write_preferences};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_preferences(data, Path::new("fuzz.jsonl"));
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "prefs.jsonl", data);
    if let Ok(pairs) = read_preferences(&p) {
        let q = dir.path().join("again.jsonl");
        if write_preferences(&q, &pairs).is_ok() {
            let again = read_preferences(&q).expect("written pairs read back");
            assert_eq!(again, pairs);
        }
    }
});
