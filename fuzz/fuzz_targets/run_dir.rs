//! A run folder read on resume: the input is `config.toml` and
//! `metrics.jsonl` (separated by `\n\x01\n`), read by `RunDir::read_config`,
//! `read_metrics`, `MetricsLog::truncate_after` and `RunOptions::open`.
#![no_main]
use kiln_core::run::{read_metrics, MetricsLog, RunDir, RunOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts = kiln_fuzz::parts(data, b"\n\x01\n");
    let dir = kiln_fuzz::scratch();
    kiln_fuzz::put(dir.path(), "config.toml", parts[0]);
    let metrics = kiln_fuzz::put(
        dir.path(),
        "metrics.jsonl",
        parts.get(1).copied().unwrap_or(b""),
    );
    let _ = read_metrics(&metrics);
    if let Ok(run) = RunDir::open(dir.path()) {
        let _ = run.read_config::<toml::Value>();
        let _ = run.read_config::<toml::Table>();
    }
    if let Ok((kind, config)) =
        RunDir::open(dir.path()).and_then(|r| r.read_config::<toml::Value>())
    {
        let _ = RunOptions::resume(dir.path()).quiet(true).open(
            "fuzz",
            &kind,
            &config,
            &["train.epochs"],
        );
    }
    let _ = MetricsLog::truncate_after(&metrics, 3);
    let _ = read_metrics(&metrics);
});
