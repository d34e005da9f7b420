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
pub mod data;
pub mod feedback;
pub mod gan;
pub mod kernels;
pub mod lm;
pub mod prompt;
pub mod rlhf;
pub mod ssl;
pub mod vae;

/// The largest `--batch-size` a command accepts.
pub const MAX_BATCH: usize = 65536;

/// The largest `--epochs` (or `--iterations`, `--lm-epochs`) a command accepts.
pub const MAX_EPOCHS: u64 = 1_000_000;

/// The largest `--image-size` a command accepts.
pub const MAX_IMAGE_SIZE: usize = 1024;

/// A command handler: receives the arguments after its name.
pub type Handler = fn(&[String]) -> Result<()>;

/// What each demo part receives.
pub struct DemoCtx {
    /// The folder under which each part writes its run folder.
    pub out: PathBuf,
    /// Base seed.
    pub seed: u64,
    /// The device to run on.
    pub device: kiln_core::Device,
    /// Suppress progress bars.
    pub quiet: bool,
}

/// What each benchmark receives.
#[derive(Clone)]
pub struct BenchCtx {
    /// CPU threads in use.
    pub threads: usize,
    /// Timed steps (torch_reference.py uses 200 for the small models).
    pub steps: usize,
    /// Warm-up steps (torch_reference.py uses 20).
    pub warm: usize,
    /// Where the benchmark runs (`bench --device`).
    pub device: kiln_core::Device,
    /// The batch to run instead of the benchmark's own (`bench --batch`, and
    /// the larger-batch variants on a GPU); images, sequences or rows.
    pub batch: Option<usize>,
    /// GPU memory in use before the benchmark built anything: peaks are
    /// reported above it, so they include the model and optimizer state.
    pub gpu_base: Option<usize>,
}

impl BenchCtx {
    /// Times a train step the way torch_reference.py's `bench_train` does and
    /// returns its JSON line.
    pub fn train_line(
        &self,
        name: &str,
        batch: usize,
        mut step: impl FnMut() -> Result<()> + Send,
    ) -> Result<serde_json::Value> {
        // On the kernels' pool, as the trainers' loop runs its steps.
        let mut step = || kiln_core::ops::on_pool(&mut step);
        for _ in 0..self.warm {
            step()?;
        }
        // A GPU runs ahead of the host: time from an idle device to an idle
        // device, as torch_gpu.py does with torch.cuda.synchronize().
        self.device.synchronize()?;
        let watch = GpuMemoryWatch::start(&self.device, self.gpu_base);
        let t = std::time::Instant::now();
        for _ in 0..self.steps {
            step()?;
        }
        self.device.synchronize()?;
        let dt = t.elapsed().as_secs_f64();
        let round1 = |x: f64| (x * 10.0).round() / 10.0;
        let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let mut line = serde_json::json!({
            "bench": name,
            "threads": self.threads,
            "batch": batch,
            "steps": self.steps,
            "images_per_s": round1(batch as f64 * self.steps as f64 / dt),
            "ms_per_step": round3(1000.0 * dt / self.steps as f64),
        });
        self.annotate(&mut line, watch);
        Ok(line)
    }

    /// The benchmark's batch: `--batch` when given, else its own.
    pub fn batch_or(&self, own: usize) -> usize {
        self.batch.unwrap_or(own)
    }

    /// The same context with other step counts (benchmarks whose reference
    /// times fewer, longer steps).
    pub fn with_steps(&self, steps: usize, warm: usize) -> Self {
        Self {
            steps,
            warm,
            ..self.clone()
        }
    }

    /// Adds the device, and on a GPU the peak memory the watch saw, to a line.
    pub fn annotate(&self, line: &mut serde_json::Value, watch: Option<GpuMemoryWatch>) {
        line["device"] = kiln_core::device::device_name(&self.device).into();
        if let Some(w) = watch {
            let (peak, total) = w.stop();
            line["peak_gpu_mem_mb"] = ((peak as f64 / 1048576.0).round()).into();
            line["gpu_mem_total_mb"] = ((total as f64 / 1048576.0).round()).into();
        }
    }
}

/// Samples a GPU's memory in use every millisecond on a thread of its own
/// during a benchmark's timed steps: the peak above the memory in use before
/// the benchmark began is its peak (sampled, so a spike shorter than a
/// millisecond can be missed; device-wide, as `nvidia-smi` counts it).
pub struct GpuMemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<usize>,
    base: usize,
    total: usize,
}

impl GpuMemoryWatch {
    /// Starts watching, peaks counted above `base` (the memory in use now when
    /// `None`); `None` on the CPU.
    pub fn start(dev: &kiln_core::Device, base: Option<usize>) -> Option<Self> {
        let (now, total) = kiln_core::device::gpu_memory(dev)?;
        let base = base.unwrap_or(now).min(now);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dev, flag) = (dev.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut peak = now;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((used, _)) = kiln_core::device::gpu_memory(&dev) {
                    peak = peak.max(used);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak
        });
        Some(Self {
            stop,
            handle,
            base,
            total,
        })
    }

    /// Stops watching: the peak in use above the start, and the device's total, in bytes.
    pub fn stop(self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = self.handle.join().unwrap_or(self.base);
        (peak.saturating_sub(self.base), self.total)
    }
}

/// A demo part: runs the component's main job on embedded data.
pub struct DemoPart {
    /// Name used by `demo --only`.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Runs the part; receives the demo's output folder and whether to be quiet.
    pub run: fn(&DemoCtx) -> Result<()>,
}

/// A throughput benchmark printed as one JSON line.
pub struct Bench {
    /// The name shared with `torch_reference.py` (e.g. `vae_mlp_train_step`).
    pub name: &'static str,
    /// Runs the benchmark and returns its JSON line.
    pub run: fn(&BenchCtx) -> Result<serde_json::Value>,
    /// The batches it runs on a GPU (`bench --device cuda`), as torch_gpu.py's
    /// (the reference batch, then a larger one); empty for a CPU-only benchmark.
    pub gpu_batches: &'static [usize],
    /// Whether a CPU-only benchmark takes `bench --batch` (one with GPU
    /// batches always does).
    pub cpu_batch: bool,
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
        gan::component(),
        ssl::component(),
        prompt::component(),
        lm::component(),
        rlhf::component(),
        kernels::component(),
    ]
}

/// Parses a handler's arguments with clap, `name` standing in for argv[0].
pub fn parse<P: Parser>(name: &str, args: &[String]) -> Result<P> {
    let m = command::<P>()
        .try_get_matches_from(std::iter::once(name.to_string()).chain(args.iter().cloned()))?;
    Ok(P::from_arg_matches(&m)?)
}

/// `P`'s clap command as [`parse`] runs it: every option that takes a value
/// accepts one that is a negative number (`--epochs -1`), so it reaches the
/// flag's range check ([`int_in`], [`float_in`]) instead of reading as an
/// unknown flag.
pub fn command<P: clap::CommandFactory>() -> clap::Command {
    fn negatives(c: clap::Command) -> clap::Command {
        c.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    negatives(P::command())
}

/// A clap value parser for an integer flag in `lo..=hi`: anything else
/// (`-1`, `abc`, too large) is refused with the range in the message.
pub fn int_in<T>(
    lo: T,
    hi: T,
) -> impl Fn(&str) -> std::result::Result<T, String> + Clone + Send + Sync + 'static
where
    T: Copy + TryInto<i128> + TryFrom<i128> + std::fmt::Display + Send + Sync + 'static,
{
    move |s: &str| {
        // every integer type up to 64 bits fits in an i128
        let l: i128 = lo.try_into().unwrap_or(i128::MIN);
        let h: i128 = hi.try_into().unwrap_or(i128::MAX);
        let range = if h >= i128::from(u32::MAX) {
            format!("an integer >= {lo}")
        } else {
            format!("an integer in {lo}..={hi}")
        };
        let v: i128 = s
            .trim()
            .parse()
            .map_err(|_| format!("expected {range}, found {s:?}"))?;
        if !(l..=h).contains(&v) {
            return Err(format!("{v} is out of range: expected {range}"));
        }
        T::try_from(v).map_err(|_| format!("{v} is out of range: expected {range}"))
    }
}

/// A clap value parser for a number flag (f32 or f64) that `ok` accepts;
/// `range` says which values those are (`"in (0, 1]"`, `"> 0"`).
pub fn float_in<T>(
    range: &'static str,
    ok: fn(f64) -> bool,
) -> impl Fn(&str) -> std::result::Result<T, String> + Clone + Send + Sync + 'static
where
    T: Copy + std::str::FromStr + Into<f64> + Send + Sync + 'static,
{
    move |s: &str| {
        let v: T = s
            .trim()
            .parse()
            .map_err(|_| format!("expected a number {range}, found {s:?}"))?;
        let x: f64 = v.into();
        if !x.is_finite() || !ok(x) {
            return Err(format!("{s} is out of range: expected a number {range}"));
        }
        // Training runs in f32: a larger value becomes inf there, and the
        // run dies at its first step with advice that does not fit.
        if (x as f32).is_infinite() {
            return Err(format!(
                "{s} is out of range: larger than f32 holds (about 3.4e38), the precision \
                 kiln computes in; expected a number {range}"
            ));
        }
        Ok(v)
    }
}

/// Checks that every numeric option of `P` (and of its subcommands) has a
/// range check: `-1` and `abc` must both be refused with a message that
/// says what is expected. `required` are arguments the command needs to
/// parse at all (`["--run", "x"]`), `sub` the subcommand to test, if any.
#[cfg(test)]
pub fn assert_numeric_flags_checked<P: Parser>(name: &str, sub: Option<&str>, required: &[&str]) {
    use clap::builder::ValueParser;
    let numeric = [
        ValueParser::from(clap::value_parser!(u64)).type_id(),
        ValueParser::from(clap::value_parser!(u32)).type_id(),
        ValueParser::from(clap::value_parser!(usize)).type_id(),
        ValueParser::from(clap::value_parser!(i64)).type_id(),
        ValueParser::from(clap::value_parser!(f64)).type_id(),
        ValueParser::from(clap::value_parser!(f32)).type_id(),
    ];
    let cmd = command::<P>();
    let cmd = match sub {
        Some(s) => cmd
            .find_subcommand(s)
            .cloned()
            .unwrap_or_else(|| panic!("no {s}")),
        None => cmd,
    };
    let mut checked = 0;
    for a in cmd.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        if !numeric.contains(&a.get_value_parser().type_id()) {
            continue;
        }
        for bad in ["-1", "abc"] {
            let args: Vec<String> = sub
                .into_iter()
                .chain(required.iter().copied())
                .chain([format!("--{long}").as_str(), bad])
                .map(str::to_string)
                .collect();
            let e = match parse::<P>(name, &args) {
                Ok(_) => panic!("{name} --{long} {bad} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(&format!("--{long}")) && e.contains("expected"),
                "{name} --{long} {bad}: {e}"
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "{name}: no numeric flag found");
}

/// The run flags every training command shares, declared once and flattened
/// into each command's arguments.
///
/// On `--resume` a run keeps its own `config.toml`, seed included. These
/// flags may differ from the first run: `--epochs` (to extend it; LM
/// training stretches its schedule), `--eval-every` where the command has
/// it, `--device`, `--threads`, `--quiet` and `--data-root`. Any other flag that is given and differs from
/// the run's config is refused, with the list of what differs.
///
/// Its flags are listed under their own heading. This comment is not the
/// commands' help text: without `about = None` clap would put it in place of
/// each command's own description.
#[derive(Debug, Clone, clap::Args)]
#[command(about = None, long_about = None, next_help_heading = "Run folder and device")]
pub struct RunArgs {
    /// Folder of a new run (default: runs/<task>-<timestamp>). A folder that
    /// already holds a run is refused: continue it with --resume, or pass
    /// --overwrite (a run whose start was refused, which never trained, is replaced).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, with its own
    /// config (only --epochs, --device, --threads, --quiet, --data-root and,
    /// where the command has it, --eval-every may change).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// With --out: delete the run already in that folder (only the files kiln
    /// runs write) and start again; a folder that also holds other files is
    /// refused, with nothing deleted.
    #[arg(long, requires = "out")]
    pub overwrite: bool,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = threads_flag())]
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
            silent: false,
        }
    }
}

/// Checks an output file before the work that fills it: refuses an `out`
/// that is one of the command's `inputs` (flag, path) — writing it would
/// destroy the input — or a path whose folder cannot be made, so a long
/// sampling run does not end in a write error.
pub fn check_output_file(out: &Path, inputs: &[(&str, &Path)]) -> anyhow::Result<()> {
    if out.is_dir() {
        anyhow::bail!("--out {} is a folder; give a file path", out.display());
    }
    if let Ok(o) = out.canonicalize() {
        for (flag, p) in inputs {
            if p.canonicalize().is_ok_and(|p| p == o) {
                anyhow::bail!(
                    "--out {} is the {flag} file: writing it would overwrite your input; \
                     choose another path",
                    out.display()
                );
            }
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("--out {}: cannot make its folder: {e}", out.display()))?;
    }
    Ok(())
}

/// [`check_output_file`] for a JSONL result that took a model run to make
/// (`rlhf sample`, `best-of-n`): an existing file is kept unless `overwrite`,
/// and a labelling folder's `pairs.jsonl` is never replaced once it holds
/// answers, which would then be read as judgements of the new texts.
pub fn check_results_file(
    out: &Path,
    inputs: &[(&str, &Path)],
    overwrite: bool,
) -> anyhow::Result<()> {
    check_output_file(out, inputs)?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let answers = dir.join(kiln_feedback::store::ANSWERS);
    if out
        .file_name()
        .is_some_and(|n| n == kiln_feedback::store::PAIRS)
        && answers.exists()
    {
        anyhow::bail!(
            "--out {} is the pairs file of a labelling folder with answers ({}): replacing it \
             would attach those answers to other texts; write the new pairs elsewhere and label \
             them in a new folder (rlhf serve|label --pairs FILE --out NEW)",
            out.display(),
            answers.display()
        );
    }
    if out.exists() && !overwrite {
        anyhow::bail!(
            "--out {} already exists; pass --overwrite to replace it, or choose another path",
            out.display()
        );
    }
    Ok(())
}

/// The class labels of `n` samples from a model with `num_classes` (`None`:
/// not conditional): `--class` for all, or cycling through the classes.
/// `--class` on a model that has none is refused rather than ignored.
pub fn sample_labels(
    n: usize,
    class: Option<u32>,
    num_classes: Option<usize>,
    device: &kiln_core::Device,
) -> anyhow::Result<Option<kiln_core::Tensor>> {
    let Some(k) = num_classes else {
        if let Some(c) = class {
            anyhow::bail!(
                "--class {c}: this model is not class-conditional (trained without \
                 --conditional), so it cannot be asked for a class"
            );
        }
        return Ok(None);
    };
    let ids: Vec<u32> = (0..n as u32)
        .map(|i| class.unwrap_or(i % k as u32))
        .collect();
    if let Some(&c) = ids.iter().find(|&&c| c as usize >= k) {
        anyhow::bail!(
            "--class {c}: the model has classes 0 to {} ({k} classes)",
            k - 1
        );
    }
    Ok(Some(kiln_core::Tensor::new(ids, device)?))
}

/// Checks a PNG output path before the work: kiln writes PNG whatever the
/// name says, so `--out grid.jpg` is refused instead of holding PNG bytes.
pub fn check_png_out(out: &Path) -> anyhow::Result<()> {
    let png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        anyhow::bail!(
            "--out {}: the grid is written as PNG; give a path ending in .png",
            out.display()
        );
    }
    check_output_file(out, &[])
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
    let m = command::<P>()
        .try_get_matches_from(std::iter::once(name.to_string()).chain(args.iter().cloned()))?;
    let given = m
        .ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect();
    Ok((P::from_arg_matches(&m)?, Given(Some(given))))
}

/// The value parser of every `--threads` flag: `1..=`the machine's limit
/// (`kiln_core::device::max_threads`, 4 per logical core).
pub fn threads_flag(
) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync + 'static {
    let check = int_in(1usize, kiln_core::device::max_threads());
    move |s: &str| {
        check(s).map_err(|e| {
            format!(
                "{e} (at most {} threads per logical core of this machine)",
                kiln_core::device::MAX_THREADS_PER_CORE
            )
        })
    }
}

/// Sets the thread count (if given) and opens the device.
pub fn device(device: &str, threads: Option<usize>) -> Result<kiln_core::Device> {
    if let Some(t) = threads {
        kiln_core::device::set_threads(t)?;
    }
    Ok(kiln_core::device::device(device)?)
}

/// Ends `demo` with 130 after a Ctrl-C stopped `part`'s training, before
/// the part reports figures it never made or the next part starts (each
/// would stop at its first step). `demo` has no --resume: say what is left.
pub fn stop_demo_if_interrupted(ctx: &DemoCtx, part: &str) {
    if kiln_core::observer::interrupted() {
        eprintln!(
            "demo stopped by Ctrl-C during {part}; what it wrote is in {} (the demo has no \
             --resume: run it again with a new --out, or resume that run with its own command)",
            ctx.out.join(part).display()
        );
        std::process::exit(130);
    }
}

/// Ends the process with 130 after a Ctrl-C that stopped training (or came
/// during the final evaluation, after the training loop).
pub fn exit_if_interrupted(interrupted: bool) {
    if interrupted || kiln_core::observer::interrupted() {
        std::process::exit(130);
    }
}

/// Opens a split of a dataset for a model of `image_size` (channels as the
/// data has them). `allow_empty_classes` (`--allow-empty-classes`) keeps a
/// `folder:PATH` dataset's class folders without pictures instead of
/// refusing them.
pub fn open_split(
    dataset: &str,
    data_root: &Path,
    split: Split,
    image_size: usize,
    allow_empty_classes: bool,
) -> Result<Arc<dyn Dataset>> {
    let spec: DatasetSpec = dataset.parse().context("--dataset")?;
    let opts = OpenOptions {
        split,
        image_size: Some(image_size),
        allow_empty_classes,
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

/// A split of the demos' embedded data: SyntheticFlowers at 32x32 (no download).
pub fn demo_flowers(split: Split) -> Result<Arc<dyn Dataset>> {
    open_split("synthetic-flowers", Path::new("data"), split, 32, false)
}

/// Opens a split a command can do without (the test split a training run
/// evaluates on): `None`, said on stderr, when the dataset has no such split
/// (a `folder:PATH` without `test/`); a split that is there but cannot be
/// read is an error, like any other.
pub fn open_optional_split(
    dataset: &str,
    data_root: &Path,
    split: Split,
    image_size: usize,
    allow_empty_classes: bool,
) -> Result<Option<Arc<dyn Dataset>>> {
    match open_split(dataset, data_root, split, image_size, allow_empty_classes) {
        Ok(ds) => Ok(Some(ds)),
        Err(e) => match e.downcast_ref::<kiln_data::DataError>() {
            Some(d) if d.is_missing_split() => {
                eprintln!("note: running without a {split} split: {d}");
                Ok(None)
            }
            _ => Err(e),
        },
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    /// `--class` on an unconditional model is refused, a class out of range
    /// names the range, and a conditional model cycles through its classes.
    #[test]
    fn sample_labels_are_checked() {
        let dev = kiln_core::Device::Cpu;
        let e = sample_labels(4, Some(3), None, &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not class-conditional"), "{e}");
        assert!(sample_labels(4, None, None, &dev).unwrap().is_none());
        let e = sample_labels(4, Some(5), Some(5), &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("classes 0 to 4 (5 classes)"), "{e}");
        let l = sample_labels(5, None, Some(2), &dev).unwrap().unwrap();
        assert_eq!(l.to_vec1::<u32>().unwrap(), [0, 1, 0, 1, 0]);
        let e = check_png_out(Path::new("grid.jpg"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ending in .png"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        check_png_out(&dir.path().join("a/b.PNG")).unwrap();
    }

    /// Float flags refuse what f32 cannot hold (`--lr 1e39` passed "> 0"
    /// and died as NaN at step 1 after making the run folder).
    #[test]
    fn float_flags_stay_within_f32() {
        let positive = float_in::<f64>("> 0", |x| x > 0.0);
        assert_eq!(positive("3e38").unwrap(), 3e38);
        for bad in ["1e39", "1e300", "inf", "NaN", "-1"] {
            let e = positive(bad).unwrap_err();
            assert!(e.contains("out of range"), "{bad}: {e}");
        }
        assert!(positive("1e39")
            .unwrap_err()
            .contains("larger than f32 holds"));
    }

    /// An output file that is the command's input is refused before any
    /// work (`rlhf sample --prompts p.txt --out p.txt` replaced the prompts).
    #[test]
    fn an_output_over_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.txt");
        std::fs::write(&p, "a prompt\n").unwrap();
        let same = dir.path().join(".").join("p.txt");
        let e = check_output_file(&same, &[("--prompts", &p)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the --prompts file"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a prompt\n");
        let e = check_output_file(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let fresh = dir.path().join("new/out.jsonl");
        check_output_file(&fresh, &[("--prompts", &p)]).unwrap();
        // Results: kept unless --overwrite; a labelling folder's pairs never.
        let e = check_results_file(&p, &[], false).unwrap_err().to_string();
        assert!(e.contains("already exists; pass --overwrite"), "{e}");
        check_results_file(&p, &[], true).unwrap();
        check_results_file(&fresh, &[], false).unwrap();
        let label = dir.path().join("label");
        std::fs::create_dir(&label).unwrap();
        std::fs::write(label.join("pairs.jsonl"), "{}\n").unwrap();
        check_results_file(&label.join("pairs.jsonl"), &[], true).unwrap();
        std::fs::write(label.join("answers.jsonl"), "{}\n").unwrap();
        let e = check_results_file(&label.join("pairs.jsonl"), &[], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("labelling folder with answers"), "{e}");
        assert!(fresh.parent().unwrap().is_dir());
    }

    /// A command's `--help` opens with its own description, not `RunArgs`'s
    /// doc comment (clap takes a flattened struct's doc as the command's long
    /// description unless told not to), and the run flags have their heading.
    #[test]
    fn run_flags_leave_the_commands_description_alone() {
        #[derive(Debug, Parser)]
        #[command(name = "t", about = "Own words")]
        struct A {
            #[command(flatten)]
            run: RunArgs,
        }
        let help = A::command().render_long_help().to_string();
        assert!(help.starts_with("Own words\n"), "{help}");
        assert!(
            help.contains("Run folder and device:\n      --out"),
            "{help}"
        );
    }
}
