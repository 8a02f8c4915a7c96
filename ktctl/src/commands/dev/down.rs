//! `ktctl dev down [--dir DIR]`: stop exactly the processes `dev up` started, by pid.

use std::time::Duration;

use super::DirArg;
use crate::dev::{self, DevState};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub dir: DirArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.dir.resolve();
    let Some(state) = DevState::load(&dir)? else {
        println!("no dev fleet in {}", dir.display());
        return Ok(());
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
    println!(
        "dev fleet in {} is down ({stopped} processes stopped)",
        dir.display()
    );
    Ok(())
}
