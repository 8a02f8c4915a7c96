//! `ktctl`: parse the command line, run one command, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kt_ctl::Cli::parse();
    kt_proto::install_crypto_provider();
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
