//! `bastide-agent`: thin entry point; everything lives in the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = bastide_agent::cli::Cli::parse();
    bastide_agent::cli::init_logging(cli.log_format);
    // One thread runs every task: the agent's async work (one TLS connection, timers, a few
    // child processes) is light; disk I/O and collection run on the blocking pool, whose idle
    // threads exit after a few seconds. Fewer threads also mean fewer glibc malloc arenas,
    // each of which keeps memory after a burst. (mimalloc was tried: it kept 60 MiB after a
    // 1M-line burst, lines being allocated on the file thread and freed on others.)
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bastide-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(bastide_agent::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bastide-agent: {e:#}");
            if e.downcast_ref::<bastide_agent::session::Fatal>().is_some() {
                // Distinct code: systemd's RestartPreventExitStatus can stop retrying.
                return std::process::ExitCode::from(3);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
