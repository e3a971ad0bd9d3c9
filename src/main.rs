//! The `payload-guard` binary: parse the command line, set up logging, run the subcommand.

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: hyper and the pipeline allocate and free many small
/// buffers per request, and glibc's `malloc`/`free`/`malloc_consolidate` took about 9% of the
/// proxy's CPU on 2 KiB POSTs (see benches/load/RESULTS.md). Called through
/// [`payload_guard::alloc::Mimalloc`], which skips mimalloc's aligned path where it can.
#[global_allocator]
static GLOBAL: payload_guard::alloc::Mimalloc = payload_guard::alloc::Mimalloc;

fn main() -> ExitCode {
    let cli = match payload_guard::cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return ExitCode::from(code),
    };
    payload_guard::cli::init_tracing(cli.log_format);
    let code = payload_guard::cli::run(cli);
    payload_guard::logging::flush();
    ExitCode::from(code)
}
