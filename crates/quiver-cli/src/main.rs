//! The `quiver` binary: parses flags, runs the command, prints the error
//! chain. All the work happens in `quiver-core`.

mod args;
mod commands;
mod flags;
mod progress;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

// glibc malloc was measured as a large share of a CPU training step (many
// short-lived tensors); mimalloc recovers most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    quiver_core::threads::fix_thread_count();
    quiver_core::alloc::keep_freed_memory();
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return flag_error(e),
    };
    progress::init_logging(&cli.global);
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            let mut msg = format!("error: {err}");
            for cause in err.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(&format!(": {c}"));
                }
            }
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}

/// A bad flag as one sentence (`error: invalid value 'tpu' for '--device
/// <DEVICE>': ...`), without clap's usage block; `--help` and `--version`
/// print as clap writes them.
fn flag_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let line = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("{line}");
    ExitCode::from(2)
}
