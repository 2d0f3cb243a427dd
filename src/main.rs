use clap::Parser;
use pixel_models::cli::{Cli, dispatch};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

fn main() {
    keep_freed_memory();
    // The ranks of a data-parallel run after the first say only what goes wrong.
    let rank = pixel_models::cluster::launch().map_or(0, |l| l.rank);
    let default = if rank == 0 { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    // The first Ctrl-C (or SIGTERM) stops training after the current step and writes a
    // checkpoint; a second one quits at once.
    let signals = std::sync::atomic::AtomicUsize::new(0);
    let handler = ctrlc::set_handler(move || {
        if signals.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            eprintln!("stopping after the current step; press Ctrl-C again to quit now");
            pixel_models::run::request_stop();
        } else {
            std::process::exit(130);
        }
    });
    if let Err(e) = handler {
        tracing::warn!("Ctrl-C will not write a checkpoint: {e}");
    }
    if let Err(e) = dispatch(cli) {
        pixel_models::error::report(&e, "");
        std::process::exit(e.exit_code());
    }
}

/// Keeps freed blocks of up to 32 MiB in the heap instead of returning them to the system.
///
/// A training step allocates and frees hundreds of tensors of a few MiB. With glibc's defaults
/// each of them is a fresh `mmap`, and every page of it faults in again on first touch: on
/// libtorch CPU that is about a tenth of a step (see docs/performance.md). Users who set
/// glibc's own `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `MALLOC_TOP_PAD_` keep them.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = [
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
            "MALLOC_TOP_PAD_",
        ];
        if tuned.iter().all(|v| std::env::var_os(v).is_none()) {
            // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        }
    }
}
