//! `ktctl`: parse the command line, run one command, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = kt_ctl::Cli::parse();
    kt_daemon::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(kt_ctl::exit::FAILED);
        }
    };
    ExitCode::from(runtime.block_on(kt_ctl::run(cli)))
}

/// Rust ignores SIGPIPE, so a write to a closed pipe (`ktctl doctor | head -1`) fails and
/// `println!` panics. A command-line tool should end quietly instead, as Unix tools do: restore
/// the default action. Sockets are unaffected (Rust sends with MSG_NOSIGNAL).
#[allow(unsafe_code)]
fn restore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first in main, before any thread exists; SIG_DFL installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
