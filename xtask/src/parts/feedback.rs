//! kiln-feedback's commands under `cargo xtask rlhf`: `label` (terminal
//! labeller), `serve` (browser labeller), `agreement` and `export`. The
//! bodies live in `kiln_feedback::cli`, shared with the crate's own binary.

use anyhow::Result;
use kiln_feedback::cli;

use super::parse;

/// The `rlhf` subcommands this module handles.
pub const SUBCOMMANDS: &[&str] = &["label", "serve", "agreement", "export"];

/// Their lines in `cargo xtask rlhf`'s usage.
pub const USAGE: &str = "
  label --pairs FILE --out DIR --annotator NAME   label pairs in a full-screen terminal
  serve --pairs FILE --out DIR [--addr A] [--annotators a,b] [--min-submitted N]   label in a browser
  agreement DIR                          Cohen's kappa, Krippendorff's alpha, self-consistency, majorities
  export DIR --format trl|raw            labelled pairs as TRL preference data (or raw answers)";

/// Runs `cargo xtask rlhf SUB ARGS` for one of [`SUBCOMMANDS`].
pub fn run(sub: &str, args: &[String]) -> Result<()> {
    let name = format!("cargo xtask rlhf {sub}");
    match sub {
        "label" => cli::label(&parse::<cli::LabelArgs>(&name, args)?)?,
        "serve" => cli::serve(&parse::<cli::ServeArgs>(&name, args)?)?,
        "agreement" => {
            cli::agreement(&parse::<cli::AgreementArgs>(&name, args)?)?;
        }
        "export" => {
            cli::export(&parse::<cli::ExportArgs>(&name, args)?)?;
        }
        other => anyhow::bail!("not a feedback command: {other:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad flags and folders are refused with messages that name them.
    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let e = run(
            "serve",
            &s(&["--pairs", "p", "--out", "o", "--min-submitted", "0"]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--min-submitted") && e.contains(">= 1"), "{e}");
        let e = run(
            "label",
            &s(&[
                "--pairs",
                "p",
                "--out",
                "o",
                "--annotator",
                "x",
                "--repeat-share",
                "2",
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--repeat-share") && e.contains("[0, 1]"), "{e}");
        let dir = std::env::temp_dir().join("kiln-feedback-xtask-missing");
        let e = run("agreement", &[dir.display().to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a labelling folder"), "{e}");
        let e = run("export", &s(&["d", "--format", "csv"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--format") && e.contains("trl"), "{e}");
    }
}
