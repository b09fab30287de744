//! `bastide`: thin entry point; everything lives in the library.
use clap::Parser;

/// jemalloc rather than glibc's malloc: a bastion holds one long-lived connection per agent,
/// each with buffers that are mostly never written (HTTP/2's 16 KiB write buffer, its read
/// buffer). With glibc they land in recycled, already-dirty memory and all count in RSS;
/// jemalloc gives freed pages back at once (`dirty_decay_ms:0`) so these buffers cost only
/// the pages they touch. Measured with `bastide-load --agents 10000` (bench/README.md):
/// 62.5 KiB of RSS per agent with glibc, 39.6 KiB with these settings. One arena: two cores.
/// The settings are built in (`JEMALLOC_SYS_WITH_MALLOC_CONF` in .cargo/config.toml);
/// `_RJEM_MALLOC_CONF` in the environment still overrides them.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = bastide::cli::Cli::parse();
    bastide::logging::init(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bastide: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(bastide::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bastide: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
