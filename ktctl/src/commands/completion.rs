//! `ktctl completion bash|zsh|fish` and `ktctl man --dir DIR`: shell completions and man pages,
//! generated from the command tree itself so they never drift from it.

use std::path::PathBuf;

use clap::CommandFactory;

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// e.g. `ktctl completion bash > /etc/bash_completion.d/ktctl`
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn completion(args: CompletionArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut command = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "ktctl", &mut script);
    match std::io::stdout().write_all(&script) {
        // The reader went away (`| head`): nothing left to do.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Where to write `ktctl.1` and one page per subcommand (`ktctl-config-push.1`, ...).
    #[arg(long)]
    pub dir: PathBuf,
}

pub fn man(args: ManArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let command = crate::Cli::command();
    clap_mangen::generate_to(command, &args.dir)
        .with_context(|| format!("cannot write man pages to {}", args.dir.display()))?;
    let count = std::fs::read_dir(&args.dir)?.count();
    println!("{count} man pages in {}", args.dir.display());
    Ok(())
}
