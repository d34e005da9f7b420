//! kiln-data's commands: `download <flowers102|cifar10|mnist> [--data-root DIR] [--from FOLDER]`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kiln_data::download::{install, DownloadOptions, KnownDataset};

use super::Component;

/// Registers the `download` command.
pub fn component() -> Component {
    Component {
        commands: vec![(
            "download",
            "<flowers102|cifar10|mnist> [--data-root DIR] [--from FOLDER]  fetch, verify, unpack",
            download,
        )],
        ..Default::default()
    }
}

/// `cargo xtask download`: fetches a dataset with a progress bar, verifies its
/// md5, resumes partial downloads and extracts archives safely.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask download")]
struct DownloadArgs {
    /// flowers102, cifar10 or mnist.
    dataset: String,
    /// Folder holding the datasets (torchvision's layout).
    #[arg(long, default_value = "data")]
    data_root: PathBuf,
    /// Install from files already downloaded into this folder (no network).
    #[arg(long)]
    from: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn download(args: &[String]) -> Result<()> {
    let a = match DownloadArgs::try_parse_from(
        std::iter::once("cargo xtask download".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(a) => a,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            print!("{e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let ds: KnownDataset = a.dataset.parse()?;
    let manifest = ds.manifest();
    let opts = DownloadOptions {
        from: a.from.clone(),
        progress: !a.quiet,
    };
    let report = install(&manifest, &a.data_root, &opts).with_context(|| {
        format!(
            "installing {} under {}",
            manifest.name,
            a.data_root.display()
        )
    })?;
    if report.was_complete() {
        println!(
            "{}: already complete and verified in {}",
            manifest.name,
            report.dir.display()
        );
    } else {
        println!(
            "{}: fetched {}, extracted {}, verified {} in {}",
            manifest.name,
            report.fetched.len(),
            report.extracted.len(),
            report.verified.len(),
            report.dir.display()
        );
    }
    Ok(())
}
