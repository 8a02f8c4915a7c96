//! The agent's own certificate files when it manages them (enrollment and renewal). A new
//! certificate is first written beside the current one as a *candidate* (`<file>.candidate`),
//! tried, and only then renamed over it: the current files are whole at every moment, and a
//! crash in the middle leaves something [`recover`] can finish or undo.

use std::path::{Path, PathBuf};

use kt_proto::identity::Role;
use kt_proto::tls::{PeerTls, TlsFiles};
use kt_proto::v1::IssuedCertificate;

fn candidate(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".candidate");
    PathBuf::from(name)
}

/// The candidate files of `files`.
pub fn candidate_files(files: &TlsFiles) -> TlsFiles {
    TlsFiles {
        ca: candidate(&files.ca),
        cert: candidate(&files.cert),
        key: candidate(&files.key),
    }
}

/// Writes a new key, certificate chain and CA bundle as the candidate, and loads them back.
pub fn stage(
    files: &TlsFiles,
    key_pem: &[u8],
    issued: &IssuedCertificate,
) -> Result<PeerTls, String> {
    let staged = candidate_files(files);
    let write = |path: &Path, bytes: &[u8], private: bool| {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let written = if private {
            kt_daemon::fs::write_private(path, bytes)
        } else {
            kt_daemon::fs::write_atomic(path, bytes)
        };
        written.map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&staged.key, key_pem, true)?;
    write(&staged.ca, &issued.ca_pem, false)?;
    // The certificate last: recovery reads a candidate certificate as "all of it is written".
    write(&staged.cert, &issued.cert_chain_pem, false)?;
    staged
        .load_ignoring_clock(Role::Agent)
        .map_err(|e| e.to_string())
}

/// Makes the candidate current: the CA bundle, the key, then the certificate (whose rename
/// ends the promotion, see [`recover`]).
pub fn promote(files: &TlsFiles) -> std::io::Result<()> {
    let staged = candidate_files(files);
    for (from, to) in [
        (&staged.ca, &files.ca),
        (&staged.key, &files.key),
        (&staged.cert, &files.cert),
    ] {
        if from.exists() {
            std::fs::rename(from, to)?;
        }
    }
    if let Some(dir) = files.cert.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Forgets the candidate: the current files stay as they are.
pub fn discard(files: &TlsFiles) {
    let staged = candidate_files(files);
    for path in [&staged.cert, &staged.key, &staged.ca] {
        let _ = std::fs::remove_file(path);
    }
}

/// Writes a certificate obtained by enrollment as the current one (through a candidate).
pub fn install(files: &TlsFiles, key_pem: &[u8], issued: &IssuedCertificate) -> Result<(), String> {
    stage(files, key_pem, issued)?;
    promote(files).map_err(|e| format!("{}: {e}", files.cert.display()))
}

/// At start: a promotion cut short (its key renamed, its certificate not) is finished; a
/// candidate never promoted is dropped, since no session ever proved it.
pub fn recover(files: &TlsFiles) -> std::io::Result<()> {
    let staged = candidate_files(files);
    match (staged.cert.exists(), staged.key.exists()) {
        (true, false) => {
            tracing::warn!(cert = %files.cert.display(), "finishing a certificate promotion cut short");
            promote(files)
        }
        (true, true) | (false, true) => {
            discard(files);
            Ok(())
        }
        (false, false) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join("agent.crt"),
            key: dir.join("agent.key"),
        }
    }

    #[test]
    fn recovery_finishes_a_cut_promotion_and_drops_an_unproven_candidate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        let staged = candidate_files(&files);
        for (path, text) in [
            (&files.cert, "old cert"),
            (&files.key, "old key"),
            (&staged.cert, "new cert"),
            (&staged.key, "new key"),
        ] {
            std::fs::write(path, text).expect("write");
        }
        recover(&files).expect("recover");
        assert_eq!(
            std::fs::read_to_string(&files.cert).expect("cert"),
            "old cert"
        );
        assert!(!staged.cert.exists() && !staged.key.exists());

        // Cut after the key's rename: the new key is current, its certificate is not yet.
        std::fs::write(&files.key, "new key").expect("write");
        std::fs::write(&staged.cert, "new cert").expect("write");
        recover(&files).expect("recover");
        assert_eq!(
            std::fs::read_to_string(&files.cert).expect("cert"),
            "new cert"
        );
        assert_eq!(std::fs::read_to_string(&files.key).expect("key"), "new key");
        assert!(!staged.cert.exists());
    }
}
