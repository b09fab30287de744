//! `bastide-agent`: thin entry point; everything lives in the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = bastide_agent::cli::Cli::parse();
    bastide_agent::cli::init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
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
