//! ktctl's config file: named contexts, each a coordinator and the operator's certificate,
//! like a kubeconfig.
//!
//! Found, in order: `--config`, `$KTCTL_CONFIG`, `$XDG_CONFIG_HOME/ktctl/config.yaml`
//! (`~/.config/ktctl/config.yaml`), and last the default local dev fleet's `ktctl.yaml`, so
//! that `ktctl gateway health` works right after `ktctl dev up`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kt_daemon::yaml::{ConfigFileError, read_yaml_file};
use kt_proto::tls::TlsFiles;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KtctlConfig {
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Context {
    pub name: String,
    /// `https://host:port` of the coordinator.
    pub coordinator: String,
    /// The name the coordinator's certificate must carry; defaults to the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Context {
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            let rest = self
                .coordinator
                .split_once("://")
                .map_or(self.coordinator.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or_default();
            match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or_default().to_owned(),
                None => authority
                    .rsplit_once(':')
                    .map_or(authority, |(h, _)| h)
                    .to_owned(),
            }
        })
    }
}

/// Where ktctl looks for its config when `--config` is not given.
pub fn default_paths(env_config: Option<PathBuf>) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(path) = env_config {
        paths.push(path);
        return paths;
    }
    if let Some(config_home) = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))
    {
        paths.push(config_home.join("ktctl").join("config.yaml"));
    }
    // The dev fleet `dev up` started last (maybe with --dir), then the default one.
    if let Some(current) = crate::dev::current_dir() {
        paths.push(current.join(crate::dev::KTCTL_CONFIG_FILE));
    }
    paths.push(crate::dev::default_dir().join(crate::dev::KTCTL_CONFIG_FILE));
    paths
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

impl KtctlConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let mut config: KtctlConfig = read_yaml_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for context in &mut config.contexts {
            for p in [&mut context.ca, &mut context.cert, &mut context.key] {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// The context named `name`, or the current one.
    pub fn context(&self, name: Option<&str>, path: &Path) -> anyhow::Result<&Context> {
        let name = name.or(self.current_context.as_deref()).with_context(|| {
            format!(
                "{}: no current-context set and no --context given",
                path.display()
            )
        })?;
        self.contexts
            .iter()
            .find(|c| c.name == name)
            .with_context(|| {
                let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "{}: no context named {name:?} (known: {})",
                    path.display(),
                    known.join(", ")
                )
            })
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_yaml::to_string(self)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_relative_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ktctl.yaml");
        let config = KtctlConfig {
            current_context: Some("dev".into()),
            contexts: vec![Context {
                name: "dev".into(),
                coordinator: "https://127.0.0.1:41001".into(),
                server_name: None,
                ca: "pki/ca.crt".into(),
                cert: "pki/operator-dev.crt".into(),
                key: "pki/operator-dev.key".into(),
            }],
        };
        config.save(&path).expect("save");
        let loaded = KtctlConfig::load(&path).expect("load");
        let context = loaded.context(None, &path).expect("current");
        assert_eq!(context.ca, dir.path().join("pki/ca.crt"));
        assert_eq!(context.server_name(), "127.0.0.1");
        assert!(loaded.context(Some("prod"), &path).is_err());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ktctl.yaml");
        std::fs::write(&path, "current-context: x\ncontexts: []\nclusters: []\n").expect("write");
        let msg = KtctlConfig::load(&path).expect_err("unknown").to_string();
        assert!(msg.contains("clusters") && msg.contains("line 3"), "{msg}");
    }
}
