//! Process plumbing every kt daemon shares: logging, readiness files and exit codes.

use std::net::SocketAddr;
use std::path::Path;

/// Exit code for a bad config file or bad flags (sysexits `EX_USAGE`), nothing started.
pub const EXIT_CONFIG: i32 = 64;
/// Exit code for a runtime failure after start.
pub const EXIT_FAILURE: i32 = 1;

/// Log output format, chosen with `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Starts `tracing` with `RUST_LOG`-style filtering (default `info`) on standard error.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, filter::dynamic_filter_fn};
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let repeats = crate::repeats::Repeats::default();
    let allow = {
        let repeats = repeats.clone();
        // Dynamic: judged per event, never cached per call site.
        dynamic_filter_fn(move |metadata, _| repeats.allow(metadata))
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(env);
    let installed = match format {
        LogFormat::Text => registry.with(layer.with_filter(allow)).try_init(),
        LogFormat::Json => registry.with(layer.json().with_filter(allow)).try_init(),
    };
    if installed.is_ok() {
        repeats.report_forever();
    }
}

/// Writes the address a daemon actually bound to `path`, atomically (temp file, then rename),
/// so a supervisor that started it on port 0 can find it once the file exists.
pub fn write_ready_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    crate::fs::write_atomic(path, format!("{addr}\n").as_bytes())
}

/// Tells the service manager about the daemon's state (`READY=1`, `STOPPING=1`, ...), the
/// `sd_notify` protocol of systemd's `Type=notify`: one datagram to `$NOTIFY_SOCKET`. Nothing
/// happens when the variable is not set (not started by systemd); a failure is only logged.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = send_notify(&path, state) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

fn send_notify(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let bytes = path.as_bytes();
    // A leading '@' names a socket in the abstract namespace.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name)?,
        None => UnixAddr::from_pathname(Path::new(path))?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Cancels `cancel` on SIGTERM or SIGINT: the start of a graceful shutdown.
pub async fn cancel_on_terminate(cancel: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
    notify("STOPPING=1");
    cancel.cancel();
}

/// Binds `addr` (port 0 picks a free port) and, when asked, writes the bound address to
/// `ready_file` so whoever started the daemon can find it.
pub async fn listen(
    addr: SocketAddr,
    ready_file: Option<&Path>,
) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    if let Some(path) = ready_file {
        let bound = listener.local_addr()?;
        write_ready_file(path, bound)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_one_datagram_to_a_path_or_abstract_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        send_notify(path.as_os_str(), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("kt-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let abstract_listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
        send_notify(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let n = abstract_listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
