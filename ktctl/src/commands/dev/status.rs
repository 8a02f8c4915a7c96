//! `ktctl dev status [--dir DIR] [-o table|json]`: each process `dev up` started.

use serde::Serialize;

use super::DirArg;
use crate::dev::{self, DevState};
use crate::view::{Output, print_structured, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub dir: DirArg,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Serialize)]
struct Row {
    role: dev::Role,
    id: Option<String>,
    pid: u32,
    address: Option<String>,
    running: bool,
    log: String,
}

/// Returns whether every recorded process is running.
pub fn run(args: Args, session: &crate::Session) -> anyhow::Result<bool> {
    let dir = args.dir.resolve_existing(session);
    let Some(state) = DevState::load(&dir)? else {
        if args.output == Output::Table {
            println!(
                "no dev fleet in {} (start one with `ktctl dev up`)",
                dir.display()
            );
        } else {
            print_structured(&Vec::<()>::new(), args.output)?;
        }
        return Ok(false);
    };
    let rows: Vec<Row> = state
        .processes
        .iter()
        .map(|p| Row {
            role: p.role,
            id: p.id.clone(),
            pid: p.pid,
            address: p.address.clone(),
            running: dev::is_running(p.pid, &p.binary),
            log: p.log.display().to_string(),
        })
        .collect();
    let all_running = rows.iter().all(|r| r.running);
    if args.output != Output::Table {
        print_structured(&rows, args.output)?;
        return Ok(all_running);
    }
    let mut t = table(&["ROLE", "ID", "PID", "ADDRESS", "STATE", "LOG"]);
    for r in &rows {
        t.add_row(vec![
            r.role.as_str().to_owned(),
            r.id.clone().unwrap_or_else(|| "-".into()),
            r.pid.to_string(),
            r.address.clone().unwrap_or_else(|| "-".into()),
            if r.running {
                "running".into()
            } else {
                "stopped".into()
            },
            r.log.clone(),
        ]);
    }
    println!("{t}");
    Ok(all_running)
}
