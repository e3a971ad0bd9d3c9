//! The command line: `payload-guard [run] --config proxy.toml`, `payload-guard check`, ... One
//! file per subcommand; `anyhow` lives only here.

mod check;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command ran and found problems.
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code: an error stopped the command.
pub const EXIT_ERROR: u8 = 2;
/// Exit code: bad usage or configuration.
pub const EXIT_USAGE: u8 = 64;

/// payload-guard: a reverse proxy that keeps webhook payloads under receivers' size limits.
#[derive(Debug, Parser)]
#[command(name = "payload-guard", version, about, long_about = None)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "proxy.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// Log format (level via RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective routes.
    Check,
}

/// Sets up the tracing subscriber (stderr, `RUST_LOG` or `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run::run(&cli.config),
        Command::Check => check::check(&cli.config),
    }
}
