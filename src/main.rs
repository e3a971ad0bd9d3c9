//! The `payload-guard` binary: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = payload_guard::cli::Cli::parse();
    payload_guard::cli::init_tracing(cli.log_format);
    ExitCode::from(payload_guard::cli::run(cli))
}
