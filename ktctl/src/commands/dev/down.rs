//! `ktctl dev down [--dir DIR]`: stop exactly the processes `dev up` started, by pid.

use std::time::Duration;

use super::DirArg;
use crate::dev::{self, DevState};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub dir: DirArg,
}

pub fn run(args: Args, session: &crate::Session) -> anyhow::Result<()> {
    let dir = args.dir.resolve_existing(session);
    let Some(state) = DevState::load(&dir)? else {
        // Nothing asked for was stopped: say so with a failure, never a quiet success.
        anyhow::bail!(
            "no dev fleet in {} (give the --dir it was started with, or the KTCTL_CONFIG of its ktctl.yaml)",
            dir.display()
        );
    };
    let mut stopped = 0;
    // Reverse start order: agents say goodbye before their coordinator goes.
    for p in state.processes.iter().rev() {
        if dev::stop(p.pid, &p.binary, Duration::from_secs(5)) {
            stopped += 1;
            println!(
                "stopped {} {} (pid {})",
                p.role.as_str(),
                p.id.as_deref().unwrap_or(""),
                p.pid
            );
        }
    }
    std::fs::remove_file(DevState::path(&dir))?;
    crate::dev::clear_current(&dir);
    if stopped == 0 {
        println!(
            "dev fleet in {} is down (none of its processes was running)",
            dir.display()
        );
    } else {
        println!(
            "dev fleet in {} is down ({stopped} processes stopped)",
            dir.display()
        );
    }
    Ok(())
}
