//! `bastide`: thin entry point; everything lives in the library.
use clap::Parser;

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
