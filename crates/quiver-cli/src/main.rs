//! The `quiver` binary: parses flags, runs the command, prints the error
//! chain. All the work happens in `quiver-core`.

mod args;
mod commands;
mod progress;

use std::process::ExitCode;

use clap::Parser;

// glibc malloc was measured as a large share of a CPU training step (many
// short-lived tensors); mimalloc recovers most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    quiver_core::threads::fix_thread_count();
    quiver_core::alloc::keep_freed_memory();
    let cli = args::Cli::parse();
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
