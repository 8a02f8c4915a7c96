//! Agent-side fencing of coordinator leaders. Every offer from a replicated control plane carries
//! the epoch of the leader that made it (its etcd campaign revision) and the control plane's
//! cluster id. The agent remembers the highest epoch it has seen per cluster, in its state
//! directory so a restart does not forget it, and refuses an offer from a lower epoch: a deposed
//! leader whose offers are still in flight cannot change the gateway.
//!
//! A single coordinator sends epoch 0 and is never fenced. An offer from another cluster (etcd
//! rebuilt, its revisions starting over) starts a new memory instead of being refused forever.

use std::path::{Path, PathBuf};

use kt_daemon::fs::write_atomic;

const FILE: &str = "leader-epoch";

/// The highest leader epoch seen, and of which cluster.
#[derive(Debug)]
pub struct EpochFence {
    path: PathBuf,
    cluster: String,
    highest: u64,
}

/// Why an offer is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct StaleEpoch {
    pub offered: u64,
    pub highest: u64,
}

impl std::fmt::Display for StaleEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offer from coordinator leader epoch {}, but epoch {} has already been seen: a deposed leader made it",
            self.offered, self.highest
        )
    }
}

impl EpochFence {
    /// Reads what `state_dir` remembers; an unreadable or malformed file remembers nothing (and
    /// says so), since refusing every offer forever would be worse.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(FILE);
        let (cluster, highest) = match std::fs::read_to_string(&path) {
            Ok(text) => match parse(&text) {
                Some(remembered) => remembered,
                None => {
                    tracing::warn!(file = %path.display(), "leader epoch file is malformed: starting from none");
                    (String::new(), 0)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the leader epoch file: starting from none");
                (String::new(), 0)
            }
        };
        EpochFence {
            path,
            cluster,
            highest,
        }
    }

    /// Admits an offer of `epoch` from `cluster`, remembering it when it is the newest; refuses
    /// one older than the newest seen from the same cluster.
    pub fn admit(&mut self, cluster: &str, epoch: u64) -> Result<(), StaleEpoch> {
        if epoch == 0 && cluster.is_empty() {
            return Ok(()); // a single coordinator: nothing to fence
        }
        if cluster == self.cluster {
            if epoch < self.highest {
                return Err(StaleEpoch {
                    offered: epoch,
                    highest: self.highest,
                });
            }
            if epoch == self.highest {
                return Ok(());
            }
        } else if !self.cluster.is_empty() {
            tracing::warn!(from = %self.cluster, to = %cluster, "offers now come from another control plane cluster: its epochs start anew");
        }
        self.cluster = cluster.to_owned();
        self.highest = epoch;
        let text = format!("{cluster} {epoch}\n");
        if let Err(e) = write_atomic(&self.path, text.as_bytes()) {
            // Still fenced in memory; only a restart before the next write could forget it.
            tracing::warn!(file = %self.path.display(), error = %e, "cannot remember the leader epoch on disk");
        }
        Ok(())
    }
}

fn parse(text: &str) -> Option<(String, u64)> {
    let mut words = text.split_whitespace();
    let cluster = words.next()?.to_owned();
    let epoch = words.next()?.parse().ok()?;
    words.next().is_none().then_some((cluster, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_epoch_of_the_same_cluster_is_refused_even_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fence = EpochFence::load(dir.path());
        assert_eq!(fence.admit("c1", 7), Ok(()));
        assert_eq!(fence.admit("c1", 7), Ok(()));
        assert_eq!(
            fence.admit("c1", 5),
            Err(StaleEpoch {
                offered: 5,
                highest: 7
            })
        );
        let mut restarted = EpochFence::load(dir.path());
        assert!(restarted.admit("c1", 6).is_err());
        assert_eq!(restarted.admit("c1", 9), Ok(()));
        // A single coordinator is never fenced; another cluster starts anew.
        assert_eq!(restarted.admit("", 0), Ok(()));
        assert_eq!(restarted.admit("c2", 1), Ok(()));
        assert!(restarted.admit("c2", 0).is_err());
    }

    #[test]
    fn a_malformed_file_remembers_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), "c1 not-a-number\n").expect("write");
        let mut fence = EpochFence::load(dir.path());
        assert_eq!(fence.admit("c1", 1), Ok(()));
    }
}
