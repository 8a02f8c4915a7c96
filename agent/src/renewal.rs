//! When an agent that manages its own certificate renews it, and what happens to the new one.
//!
//! A renewal is asked at a random point between 70% and 90% of the certificate's lifetime, over
//! the live session's connection, with a fresh key. The answer becomes a *candidate*: the next
//! connection uses it, and only once a session opened with it is it promoted (the files
//! replaced); if that session fails, the agent falls back to the current certificate and asks
//! again soon (OpAMP's candidate and valid certificates).
//!
//! Times are measured on this process's monotonic clock from when a certificate arrived, not
//! read from the certificate against the wall clock, so an agent whose clock is off by a minute
//! renews on time all the same. Only at start, before any certificate arrived in this process,
//! is the wall clock used.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kt_proto::tls::{PeerTls, TlsFiles};
use kt_proto::v1::IssuedCertificate;
use tokio::time::Instant;

use crate::certs;

/// The share of a lifetime after which a renewal is asked, drawn anew for each certificate.
const RENEW_FROM: f64 = 0.7;
const RENEW_UNTIL: f64 = 0.9;
/// After a failed renewal, the next try comes after this share of the lifetime, within bounds.
const RETRY_SHARE: f64 = 0.05;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Renewal {
    files: TlsFiles,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    lifetime: Duration,
    /// When the current certificate expires, on this process's clock.
    expires: Instant,
    renew_at: Instant,
    candidate: Option<Candidate>,
}

#[derive(Debug)]
struct Candidate {
    tls: PeerTls,
    lifetime: Duration,
    arrived: Instant,
}

impl Renewal {
    /// For the certificate in `files` (loaded as `tls`) at start: its remaining life read
    /// against the wall clock.
    pub fn from_current(files: TlsFiles, tls: &PeerTls) -> Self {
        let (lifetime, remaining) = life_of(tls).unwrap_or((Duration::ZERO, Duration::ZERO));
        let now = Instant::now();
        let elapsed = lifetime.saturating_sub(remaining);
        let renew_in = lifetime.mul_f64(renew_share()).saturating_sub(elapsed);
        Renewal {
            files,
            state: Mutex::new(State {
                lifetime,
                expires: now + remaining,
                renew_at: now + renew_in,
                candidate: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn renew_at(&self) -> Instant {
        self.lock().renew_at
    }

    /// Whether the current certificate has expired (by this process's clock).
    pub fn expired(&self) -> bool {
        Instant::now() >= self.lock().expires
    }

    /// The candidate to connect with, if a renewal left one.
    pub fn candidate(&self) -> Option<PeerTls> {
        self.lock().candidate.as_ref().map(|c| c.tls.clone())
    }

    /// Keeps a renewed certificate (and its fresh key) as the candidate.
    pub fn stage(&self, key_pem: &[u8], issued: &IssuedCertificate) -> Result<(), String> {
        let tls = certs::stage(&self.files, key_pem, issued)?;
        self.lock().candidate = Some(Candidate {
            tls,
            lifetime: Duration::from_millis(issued.lifetime_ms),
            arrived: Instant::now(),
        });
        Ok(())
    }

    /// A session opened with the candidate: it becomes the certificate, the old one is gone.
    pub fn promote(&self) -> Result<(), String> {
        let mut state = self.lock();
        let Some(candidate) = state.candidate.take() else {
            return Ok(());
        };
        certs::promote(&self.files).map_err(|e| format!("{}: {e}", self.files.cert.display()))?;
        state.lifetime = candidate.lifetime;
        state.expires = candidate.arrived + candidate.lifetime;
        state.renew_at = candidate.arrived + candidate.lifetime.mul_f64(renew_share());
        Ok(())
    }

    /// The candidate's session failed: back to the current certificate, and a new renewal soon.
    pub fn fall_back(&self) {
        let mut state = self.lock();
        if state.candidate.take().is_some() {
            certs::discard(&self.files);
        }
        state.renew_at = Instant::now() + retry_after(state.lifetime);
    }

    /// Asking for a renewal failed: ask again soon.
    pub fn failed(&self) {
        let mut state = self.lock();
        state.renew_at = Instant::now() + retry_after(state.lifetime);
    }

    /// A certificate obtained by enrolling again is in place (already promoted).
    pub fn enrolled(&self, lifetime: Duration) {
        let now = Instant::now();
        let mut state = self.lock();
        state.candidate = None;
        state.lifetime = lifetime;
        state.expires = now + lifetime;
        state.renew_at = now + lifetime.mul_f64(renew_share());
    }
}

fn renew_share() -> f64 {
    RENEW_FROM + rand::random::<f64>() * (RENEW_UNTIL - RENEW_FROM)
}

fn retry_after(lifetime: Duration) -> Duration {
    lifetime.mul_f64(RETRY_SHARE).clamp(RETRY_MIN, RETRY_MAX)
}

/// A certificate's lifetime (from its issue, which is [`kt_proto::leaf::BACKDATE`] after its
/// start of validity) and what remains of it now, by the wall clock.
fn life_of(tls: &PeerTls) -> Option<(Duration, Duration)> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(&tls.cert_pem).next()?.ok()?;
    let (not_before, not_after) = kt_proto::identity::validity_unix_ms(&leaf)?;
    let backdate = u64::try_from(kt_proto::leaf::BACKDATE.as_millis()).ok()?;
    let issued = not_before.saturating_add(backdate).min(not_after);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis();
    let now = u64::try_from(now).ok()?;
    Some((
        Duration::from_millis(not_after - issued),
        Duration::from_millis(not_after.saturating_sub(now)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_come_after_a_share_of_the_lifetime_within_bounds() {
        assert_eq!(
            retry_after(Duration::from_secs(30)),
            Duration::from_millis(1_500)
        );
        assert_eq!(retry_after(Duration::from_secs(5)), RETRY_MIN);
        assert_eq!(retry_after(Duration::from_secs(24 * 3600)), RETRY_MAX);
        for _ in 0..1000 {
            let share = renew_share();
            assert!((RENEW_FROM..=RENEW_UNTIL).contains(&share), "{share}");
        }
    }
}
