//! One module per component. Each registers its demo part, benchmarks, pipeline
//! tasks (`train`/`eval`/`sample <task>`) and top-level commands in its
//! [`Component`]; adding a component is one module plus one line in [`all`].

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use kiln_data::{open_with, Dataset, DatasetSpec, OpenOptions, Split};

pub mod core;
pub mod cuda;
pub mod data;
pub mod kernels;
pub mod lm;
pub mod prompt;
pub mod ssl;
pub mod vae;

/// A command handler: receives the arguments after its name.
pub type Handler = fn(&[String]) -> Result<()>;

/// A demo part: runs the component's main job on embedded data.
pub struct DemoPart {
    /// Name used by `demo --only`.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Runs the part; receives the demo's output folder and whether to be quiet.
    pub run: fn(&crate::demo::DemoCtx) -> Result<()>,
}

/// A throughput benchmark printed as one JSON line.
pub struct Bench {
    /// The name shared with `torch_reference.py` (e.g. `vae_mlp_train_step`).
    pub name: &'static str,
    /// Runs the benchmark and returns its JSON line.
    pub run: fn(&crate::bench::BenchCtx) -> Result<serde_json::Value>,
}

/// What one component adds to xtask.
#[derive(Default)]
pub struct Component {
    /// Demo parts, in the order they run.
    pub demos: Vec<DemoPart>,
    /// Throughput benchmarks.
    pub benches: Vec<Bench>,
    /// `train <task>` handlers.
    pub train: Vec<(&'static str, Handler)>,
    /// `eval <task>` handlers.
    pub eval: Vec<(&'static str, Handler)>,
    /// `sample <task>` handlers.
    pub sample: Vec<(&'static str, Handler)>,
    /// Top-level commands (`download`, `prompt`, `generate`, ...), with a one-line help.
    pub commands: Vec<(&'static str, &'static str, Handler)>,
}

/// Every component, in demo order.
pub fn all() -> Vec<Component> {
    vec![
        core::component(),
        data::component(),
        vae::component(),
        ssl::component(),
        prompt::component(),
        lm::component(),
        kernels::component(),
        cuda::component(),
    ]
}

/// Parses a handler's arguments with clap, `name` standing in for argv[0].
pub fn parse<P: Parser>(name: &str, args: &[String]) -> Result<P> {
    Ok(P::try_parse_from(
        std::iter::once(name.to_string()).chain(args.iter().cloned()),
    )?)
}

/// Opens a split of a dataset for a model of `image_size` (channels as the data has them).
pub fn open_split(
    dataset: &str,
    data_root: &Path,
    split: Split,
    image_size: usize,
) -> Result<Arc<dyn Dataset>> {
    let spec: DatasetSpec = dataset.parse().context("--dataset")?;
    let opts = OpenOptions {
        split,
        image_size: Some(image_size),
        ..Default::default()
    };
    let ds = open_with(&spec, data_root, &opts).with_context(|| match spec.download_name() {
        Some(n) => format!(
            "opening {spec} under {} (run `cargo xtask download {n} --data-root {}` first)",
            data_root.display(),
            data_root.display()
        ),
        None => format!("opening {spec}"),
    })?;
    Ok(Arc::from(ds))
}

/// Reads a run folder's config for `--resume`, refusing a run of another kind
/// (`what` names the expected kind in the error).
pub fn resume_config<C: serde::de::DeserializeOwned>(
    run: &kiln_core::run::RunDir,
    kind: &str,
    what: &str,
) -> Result<C> {
    // Check the kind before the fields, so a run of another model says so.
    let (found, raw): (String, serde_json::Value) = run.read_config()?;
    if found != kind {
        anyhow::bail!("{} is a {found:?} run, not {what}", run.path().display());
    }
    serde_json::from_value(raw).with_context(|| format!("{}: config.toml", run.path().display()))
}
