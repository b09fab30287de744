//! Man pages and shell completions generated from a clap definition, so that the packaged
//! documentation of `bastide` and `bastide-agent` cannot drift from their real options.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Writes `NAME.1` and one page per subcommand (`NAME-SUB.1`, ...) into `dir`.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

/// Prints the completion script of `shell` for `cmd` on standard output. Generated in memory
/// first: clap_complete panics on a write error, and `| head` closes the pipe early.
pub fn print_completions(mut cmd: clap::Command, shell: Shell) -> Result<()> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the completion script")
        }
        _ => Ok(()),
    }
}
