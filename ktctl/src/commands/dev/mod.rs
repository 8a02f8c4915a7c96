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
    /// Where `dev up` starts a fleet: `--dir`, else the default directory.
    pub fn resolve(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(crate::dev::default_dir)
    }

    /// The fleet `dev status` and `dev down` act on: `--dir`; else the dev fleet whose
    /// `ktctl.yaml` `--config` or `$KTCTL_CONFIG` names; else the fleet `dev up` last started;
    /// else the default directory.
    pub fn resolve_existing(&self, session: &crate::Session) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        let named = session
            .named_config()
            .and_then(|config| config.parent().map(std::path::Path::to_owned))
            .filter(|dir| crate::dev::DevState::path(dir).is_file());
        named
            .or_else(crate::dev::current_dir)
            .unwrap_or_else(crate::dev::default_dir)
    }
}
