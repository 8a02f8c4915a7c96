//! `ktctl dev`: a whole fleet on this machine, for newcomers and tests.

pub mod down;
pub mod status;
pub mod up;

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct DirArg {
    /// The dev fleet's directory [default: $XDG_STATE_HOME/kt-fleet/dev or ~/.local/state/kt-fleet/dev].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl DirArg {
    pub fn resolve(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(crate::dev::default_dir)
    }
}
