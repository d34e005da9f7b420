//! GPT-2 weights: the input is `model.safetensors` beside a tiny valid
//! `config.json`, loaded with `Gpt2::load`.
#![no_main]
use kiln_core::Device;
use kiln_lm::Gpt2;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    kiln_fuzz::put(
        dir.path(),
        "config.json",
        kiln_fuzz::TINY_GPT2_CONFIG.as_bytes(),
    );
    kiln_fuzz::put(dir.path(), "model.safetensors", data);
    let _ = Gpt2::load(dir.path(), &Device::Cpu);
});
