//! The command line: `payload-guard [run] --config proxy.toml`, `payload-guard check`, ... One
//! file per subcommand; `anyhow` lives only here.

mod check;
mod demo;
mod diagnose;
mod limits;
mod replay;
mod run;
mod sign;
mod spool;
mod trim;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

// Exit codes: one scheme for every subcommand, after sysexits(3); README.md's "Exit codes"
// table lists them and tests/it/cli.rs checks each.

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command ran and found problems (`trim`: cannot fit; `replay`: a payload was
/// not delivered; `demo`: a step misbehaved).
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code (EX_USAGE): bad command line (unknown option, missing argument, bad value).
pub const EXIT_USAGE: u8 = 64;
/// Exit code (EX_DATAERR): invalid input: a configuration with mistakes, a payload or record id
/// that cannot be used.
pub const EXIT_DATAERR: u8 = 65;
/// Exit code (EX_NOINPUT): a file or record that does not exist or cannot be read.
pub const EXIT_NOINPUT: u8 = 66;
/// Exit code (EX_UNAVAILABLE): something needed is unavailable: an address already in use, a
/// spool locked or not writable, a receiver that cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code (EX_SOFTWARE): an internal error (a bug: please report it).
pub const EXIT_SOFTWARE: u8 = 70;

/// Prints why the configuration could not be loaded (every mistake, with its line and caret)
/// and returns the exit code: 66 when the file cannot be read, 65 when it has mistakes.
pub(crate) fn config_failed(err: &crate::config::LoadError) -> u8 {
    eprint!("{}", err.render());
    if err.is_unreadable() {
        EXIT_NOINPUT
    } else {
        EXIT_DATAERR
    }
}

/// Parses the command line; help and `--version` exit 0, every other mistake exits 64
/// (clap's own default is 2).
pub fn parse_args() -> Result<Cli, u8> {
    use clap::error::ErrorKind;
    Cli::try_parse().map_err(|err| {
        let _ = err.print();
        match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => EXIT_OK,
            _ => EXIT_USAGE,
        }
    })
}

/// payload-guard: a reverse proxy that keeps webhook payloads under receivers' size limits.
#[derive(Debug, Parser)]
#[command(name = "payload-guard", version, about, long_about = None)]
pub struct Cli {
    /// The configuration file [default: proxy.toml].
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// Trim a payload by a route's rules: the bytes the proxy would forward go to stdout, a
    /// report to stderr (exit 0: fits, 1: cannot fit, smallest result written, 65: not JSON,
    /// 66: no such file).
    Trim {
        /// The route whose rules and limit apply.
        #[arg(long)]
        route: String,
        /// The payload (default: stdin).
        file: Option<PathBuf>,
    },
    /// Explain the recorded 413 incidents per route, with concrete fixes.
    Diagnose {
        /// Only incidents newer than this (e.g. 24h, 7d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<std::time::Duration>,
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Show what each route has learned about its receiver's limit, with the evidence
    /// (`--reset ROUTE`: forget it; a running proxy is told through its admin listener).
    Limits {
        /// Forget what was learned for this route.
        #[arg(long, value_name = "ROUTE")]
        reset: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Look at and tidy the spool (works while the proxy runs).
    Spool {
        /// What to do.
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Send spooled payloads now (exit 1 if any failed).
    Replay {
        /// Only this route's records.
        #[arg(long)]
        route: Option<String>,
        /// Which records: ready (waiting for redelivery) or dead (refused for good).
        #[arg(long, default_value = "ready", value_parser = parse_state)]
        state: crate::spool::State,
        /// Only this record.
        #[arg(long)]
        id: Option<String>,
        /// List what would be sent, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Send to this URL instead of the route's upstream.
        #[arg(long)]
        to: Option<String>,
    },
    /// Show what payload-guard does, on loopback, with no configuration needed.
    ///
    /// Starts a sample receiver that refuses bodies over 100 KiB with 413 (as `express.json()`
    /// does), payload-guard in front of it with a trim route, and sends a small and a large
    /// Synthflow-shaped payload straight and through the proxy (exit 0: every step behaved as
    /// expected, 1: one did not, 69: the demo could not be set up). Takes no `--config`.
    Demo {
        /// Show another sender's payloads and signatures: synthflow, retell, elevenlabs, vapi,
        /// stripe, github or standard-webhooks (the route uses `sender = NAME`, verifies the
        /// sender's signature and re-signs the trimmed payload with `resign = "same"`).
        #[arg(long, value_name = "NAME")]
        sender: Option<String>,
    },
    /// Print the headers a route's sender would send with a payload (to test a receiver).
    Sign {
        /// The route whose `[routes.verify]` applies.
        #[arg(long)]
        route: String,
        /// Sign as of this time (unix seconds; default: now).
        #[arg(long)]
        timestamp: Option<u64>,
        /// The message id, for schemes that sign one (default: a new one).
        #[arg(long)]
        id: Option<String>,
        /// The URL the sender calls, for schemes that sign it (default: the route's public_url).
        #[arg(long)]
        url: Option<String>,
        /// The payload.
        file: PathBuf,
    },
    /// Check a payload's signature headers as the proxy would (exit 0: valid, 1: refused).
    Verify {
        /// The route whose `[routes.verify]` applies.
        #[arg(long)]
        route: String,
        /// A header the sender sent, as "Name: value" (repeat for several).
        #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// The URL the sender called, for schemes that sign it (default: the route's public_url).
        #[arg(long)]
        url: Option<String>,
        /// The payload.
        file: PathBuf,
    },
}

/// `payload-guard spool ...`
#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// An aligned table: id, route, call_id, size, attempts, age, last error.
    List {
        /// Only this route's records.
        #[arg(long)]
        route: Option<String>,
        /// ready, dead or archive.
        #[arg(long, default_value = "ready", value_parser = parse_state)]
        state: crate::spool::State,
    },
    /// A record's metadata (`--body`: its exact body bytes on stdout).
    Show {
        /// The record id (from `spool list` or a 202's `spool_id`).
        id: String,
        /// Write the body to stdout instead.
        #[arg(long)]
        body: bool,
    },
    /// Remove records received longer ago than `--older-than`.
    Purge {
        /// ready, dead or archive.
        #[arg(long, value_parser = parse_state)]
        state: crate::spool::State,
        /// Age, like 30d or 12h.
        #[arg(long, value_parser = parse_duration)]
        older_than: std::time::Duration,
        /// List what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_state(text: &str) -> Result<crate::spool::State, String> {
    text.parse()
}

/// Report format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// An aligned table for a terminal.
    Text,
    /// Stable JSON for scripts.
    Json,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e}: write it like 24h, 30m or 7d"))
}

/// Writes `text` to stdout; a closed pipe (`payload-guard diagnose | head`) is not an error.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(err) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && err.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("payload-guard: cannot write to stdout: {err}");
    }
}

/// Sets up the tracing subscriber (see [`crate::logging`]).
pub fn init_tracing(format: LogFormat) {
    crate::logging::init(format == LogFormat::Json);
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    let config = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("proxy.toml"));
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run::run(&config),
        Command::Check => check::check(&config),
        Command::Trim { route, file } => trim::trim(&config, &route, file.as_deref()),
        Command::Diagnose {
            since,
            route,
            format,
        } => diagnose::diagnose(&config, since, route.as_deref(), format),
        Command::Demo { .. } if cli.config.is_some() => {
            eprintln!(
                "payload-guard demo: --config does not apply: the demo builds its own receiver, route and proxy on loopback (see your file with `payload-guard check --config FILE`)"
            );
            EXIT_USAGE
        }
        Command::Demo { sender } => demo::demo(sender.as_deref()),
        Command::Limits { reset, format } => limits::limits(&config, reset.as_deref(), format),
        Command::Sign {
            route,
            timestamp,
            id,
            url,
            file,
        } => sign::sign(
            &config,
            &sign::Input {
                route: &route,
                file: &file,
                url: url.as_deref(),
            },
            timestamp,
            id,
        ),
        Command::Verify {
            route,
            headers,
            url,
            file,
        } => sign::verify(
            &config,
            &sign::Input {
                route: &route,
                file: &file,
                url: url.as_deref(),
            },
            &headers,
        ),
        Command::Spool { command } => match command {
            SpoolCommand::List { route, state } => spool::list(&config, route.as_deref(), state),
            SpoolCommand::Show { id, body } => spool::show(&config, &id, body),
            SpoolCommand::Purge {
                state,
                older_than,
                dry_run,
            } => spool::purge(&config, state, older_than, dry_run),
        },
        Command::Replay {
            route,
            state,
            id,
            dry_run,
            to,
        } => replay::replay(
            &config,
            replay::Selection {
                route: route.as_deref(),
                state,
                id: id.as_deref(),
                dry_run,
                to: to.as_deref(),
            },
        ),
    }
}
