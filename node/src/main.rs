//! `outpost`, the node agent binary: parses arguments, sets up logging and the async runtime,
//! and calls into the library. Nothing here is worth unit-testing on its own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

mod approvals_cli;
mod bundle_cli;
mod cli;
mod inference_cli;
mod models_cli;
mod objects_cli;
mod policy_cli;

/// Outpost node agent: runs signed container jobs from the control plane and reports each
/// result exactly once. It only ever dials out; it never listens on a network port (the optional
/// local inference endpoint and the metrics endpoint bind loopback or a unix socket only).
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about, long_about = None, after_help = cli::ENV_HELP)]
struct Args {
    /// Base config file [default: /etc/outpost/config.toml, which may be absent]; `config.d/*.toml`
    /// next to it is merged in name order.
    #[arg(long, global = true, env = "OUTPOST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: cli::Command,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Generated from the argument definitions: no configuration needed.
    match &args.command {
        cli::Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Args::command(), "outpost", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        cli::Command::Man { dir } => {
            return match std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(Args::command(), dir))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write man pages into {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    match cli::dispatch(args.config.as_deref(), args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
