//! One module per component. Each registers its demo part, benchmarks, pipeline
//! tasks (`train`/`eval`/`sample <task>`) and top-level commands in its
//! [`Component`]; adding a component is one module plus one line in [`all`].

use anyhow::Result;

pub mod core;
pub mod data;
pub mod kernels;
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
        kernels::component(),
    ]
}
