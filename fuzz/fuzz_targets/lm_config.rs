//! GPT-2 `config.json`: `Gpt2Config::from_file` and `validate`; a valid one
//! is also sized (`num_params`) and written back.
#![no_main]
use kiln_lm::Gpt2Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "config.json", data);
    if let Ok(cfg) = Gpt2Config::from_file(&p) {
        if cfg.validate().is_ok() {
            let _ = cfg.num_params();
            let _ = cfg.head_dim();
            let _ = cfg.to_hf_json();
        }
    }
});
