//! One module per component. Each registers its demo part, benchmarks, pipeline
//! tasks (`train`/`eval`/`sample <task>`) and top-level commands in its
//! [`Component`]; adding a component is one module plus one line in [`all`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::Parser;
use kiln_core::run::RunOptions;
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

/// The run flags every training command shares, declared once and flattened
/// into each command's arguments.
///
/// On `--resume` a run keeps its own `config.toml`, seed included. These
/// flags may differ from the first run: `--epochs` (to extend it; LM
/// training stretches its schedule), `--eval-every`, `--device`, `--threads`,
/// `--quiet` and `--data-root`. Any other flag that is given and differs from
/// the run's config is refused, with the list of what differs.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Folder of a new run (default: runs/<task>-<timestamp>). A folder that
    /// already holds a run is refused: continue it with --resume, or pass --overwrite.
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, with its own
    /// config (only --epochs, --eval-every, --device, --threads, --quiet and
    /// --data-root may change).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// With --out: delete the run already in that folder and start again.
    #[arg(long, requires = "out")]
    pub overwrite: bool,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar and no periodic lines.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// kiln-core's run options; a new run without --out gets
    /// `runs/<task>-<timestamp>` here, so the command can print it.
    pub fn options(&self, task: &str) -> RunOptions {
        let out = match (&self.out, &self.resume) {
            (None, None) => Some(kiln_core::run::new_run_folder(task)),
            _ => self.out.clone(),
        };
        RunOptions {
            out,
            resume: self.resume.clone(),
            overwrite: self.overwrite,
            device: self.device.clone(),
            threads: self.threads,
            quiet: self.quiet,
        }
    }
}

/// Which flags were typed on the command line (as opposed to defaults), so a
/// resumed run takes only those from the command line and the rest from its
/// own config.
pub struct Given(Option<BTreeSet<String>>);

impl Given {
    /// Every flag counts (a new run: defaults included).
    pub fn all() -> Self {
        Self(None)
    }

    /// Whether flag `id` (the field name, e.g. `batch_size`) was given.
    pub fn has(&self, id: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.contains(id))
    }
}

/// Parses like [`parse`], also returning the flags typed on the command line.
pub fn parse_given<P: Parser>(name: &str, args: &[String]) -> Result<(P, Given)> {
    let m = P::command()
        .try_get_matches_from(std::iter::once(name.to_string()).chain(args.iter().cloned()))?;
    let given = m
        .ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect();
    Ok((P::from_arg_matches(&m)?, Given(Some(given))))
}

/// What a training command does with its library's result: a resumed run
/// that had already finished is reported, not an error; an interrupted run
/// exits with 130 (the Ctrl-C convention) after its checkpoint is written.
pub fn finished_notice(e: &kiln_core::session::SessionError) -> Option<String> {
    matches!(e, kiln_core::session::SessionError::Finished { .. }).then(|| e.to_string())
}

/// Sets the thread count (if given) and opens the device.
pub fn device(device: &str, threads: Option<usize>) -> Result<kiln_core::Device> {
    if let Some(t) = threads {
        kiln_core::device::set_threads(t)?;
    }
    Ok(kiln_core::device::device(device)?)
}

/// Ends the process with 130 after a Ctrl-C that stopped training.
pub fn exit_if_interrupted(interrupted: bool) {
    if interrupted {
        std::process::exit(130);
    }
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
