//! `kiln-feedback label|serve|agreement|export`: the same commands as
//! `cargo xtask rlhf ...`, as a small binary of their own (the end-to-end
//! tests run it in a pseudo-terminal and kill it mid-load).

use clap::Parser;
use kiln_feedback::cli;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sub = args.get(1).map(String::as_str).unwrap_or("");
    let rest = || std::iter::once(format!("kiln-feedback {sub}")).chain(args[2..].iter().cloned());
    let r = match sub {
        "label" => cli::LabelArgs::try_parse_from(rest()).map(|a| cli::label(&a)),
        "serve" => cli::ServeArgs::try_parse_from(rest()).map(|a| cli::serve(&a)),
        "agreement" => {
            cli::AgreementArgs::try_parse_from(rest()).map(|a| cli::agreement(&a).map(|_| ()))
        }
        "export" => cli::ExportArgs::try_parse_from(rest()).map(|a| cli::export(&a).map(|_| ())),
        _ => {
            eprintln!(
                "usage: kiln-feedback <label|serve|agreement|export> [args] (each takes --help)"
            );
            std::process::exit(2);
        }
    };
    match r {
        Err(e) => e.exit(),
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        Ok(Ok(())) => {}
    }
}
