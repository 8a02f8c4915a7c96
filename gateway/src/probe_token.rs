//! The secret that marks a request as the agent's synthetic probe.
//!
//! Synthetic requests are left out of `/health` verdict counts and of the decision counters the
//! rollout gates read, so a client that could mark its own requests could hide them from the
//! gates. Only a request carrying this gateway's per-start token in `x-kt-synthetic` is
//! synthetic: the gateway writes a fresh random token to a file only its own user can read
//! (`--probe-token-file`), and its agent reads it from there for each probe.

use std::path::Path;

/// A per-start secret.
#[derive(Clone)]
pub struct ProbeToken(String);

impl std::fmt::Debug for ProbeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeToken(..)")
    }
}

impl ProbeToken {
    /// Makes a fresh token and writes it to `path` (mode 0600, replaced by rename, so a reader
    /// sees the old token or the new one, never half of one).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let token = hex::encode(rand::random::<[u8; 32]>());
        kt_daemon::fs::write_private(path, token.as_bytes())?;
        Ok(ProbeToken(token))
    }

    /// Whether `presented` is this token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        presented.len() == expected.len()
            && presented
                .iter()
                .zip(expected)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_new_per_start_private_and_matches_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("probe-token");
        let first = ProbeToken::create(&path).expect("create");
        let written = std::fs::read(&path).expect("read");
        assert!(first.matches(&written));
        assert!(!first.matches(b"doctor"));
        assert!(!first.matches(&written[..written.len() - 1]));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = ProbeToken::create(&path).expect("again");
        assert!(!second.matches(&written), "a restart makes a new token");
    }
}
