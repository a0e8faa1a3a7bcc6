//! Logging and progress-bar setup shared by the commands.

use indicatif::{ProgressBar, ProgressStyle};

use crate::flags::GlobalArgs;

pub fn init_logging(g: &GlobalArgs) {
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Whether progress bars should be drawn.
pub fn enabled(g: &GlobalArgs) -> bool {
    !(g.quiet || g.no_progress)
}

/// A bar over `total` units, hidden when progress is off.
pub fn bar(g: &GlobalArgs, total: u64, msg: &str) -> ProgressBar {
    if !enabled(g) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// A spinner, hidden when progress is off.
pub fn spinner(g: &GlobalArgs, msg: &str) -> ProgressBar {
    if !enabled(g) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}
