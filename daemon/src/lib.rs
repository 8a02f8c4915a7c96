//! What every kt-fleet daemon and tool shares that is not the wire: logging (with repeats
//! summed up), ready files, `sd_notify`, signals and exit codes ([`daemon`]); strict YAML
//! config files with located errors ([`yaml`], [`size`]); the `/metrics` listener
//! ([`metrics_http`]); connection admission ([`conn`]); atomic file writes ([`fs`]); time
//! ([`clock`]).

pub mod clock;
pub mod conn;
pub mod daemon;
pub mod fs;
pub mod metrics_http;
pub mod repeats;
pub mod size;
pub mod yaml;

/// Returns the current time as milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An error and its causes on one line, each cause once: transport errors often repeat their
/// source's text ("tcp connect error: tcp connect error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.last().is_some_and(|last| last.ends_with(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// Installs ring as the process-wide rustls crypto provider.
///
/// Every binary and test calls this first: with two providers linked, rustls cannot pick
/// one by itself and `Server::tls_config` panics. Calling it twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
