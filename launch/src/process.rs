//! Starting kt daemons as real processes and stopping them by their own pid.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A free loopback address, chosen up front so that a dev process keeps its address when it
/// is restarted with its own command line (port 0 would bind a new one each time).
///
/// Chosen below the kernel's ephemeral range: while a process is down, an outgoing connection
/// of any other process may be given a port of that range, and the restart could not bind it.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // One sequence per process, started at a place of its own, so that concurrent callers (in
    // this process or another) rarely try the same port.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = outside_ephemeral_range();
    let span = high - low;
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..span.min(2000) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(seed);
        let port = u16::try_from(low + n % span).unwrap_or(u16::MAX);
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr();
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Ports to choose daemons' addresses from: the 10,000 below the ephemeral range.
fn outside_ephemeral_range() -> (u32, u32) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.clamp(12_000, 65_535);
    (high - 10_000, high)
}

/// A kt binary: next to the running executable if there, else looked up on `PATH`.
pub fn find_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `name` found in one of the `PATH` directories.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether `pid` is alive and still runs `binary` (a recycled pid does not count).
pub fn is_running(pid: u32, binary: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name; Z and X are dead.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) else {
        return false;
    };
    let expected = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
    // A binary rebuilt since the process started shows as "<path> (deleted)": still ours.
    let exe = exe.to_string_lossy();
    exe.strip_suffix(" (deleted)").unwrap_or(&exe) == expected.to_string_lossy()
}

/// Stops a process by pid: SIGTERM, then SIGKILL after `grace`. Returns whether it was running.
pub fn stop(pid: u32, binary: &Path, grace: Duration) -> bool {
    if !is_running(pid, binary) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let target = Pid::from_raw(raw);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_running(pid, binary) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(target, Signal::SIGKILL);
    true
}

/// Starts a daemon detached from the terminal (own process group, no stdin), logging to `log`.
pub fn spawn(
    binary: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (build the workspace first: cargo build)",
                binary.display()
            )
        })
}

/// Waits until `child` writes its bound address to `ready_file`, or fails with its log tail.
pub fn wait_ready(
    child: &mut Child,
    ready_file: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(addr) = std::fs::read_to_string(ready_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "process exited ({status}) before it was ready:\n{}",
                log_tail(log)
            );
        }
        if Instant::now() >= deadline {
            bail!("process not ready within {timeout:?}:\n{}", log_tail(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    let mut tail = format!("--- last lines of {} ---\n", log.display());
    for line in &lines[start..] {
        let _ = writeln!(tail, "{line}");
    }
    tail
}

/// Waits until `addr` accepts TCP connections (for daemons that write no ready file), or fails
/// with the log's tail if the process exits or the deadline passes.
pub fn wait_listening(
    what: &str,
    child: &mut std::process::Child,
    addr: std::net::SocketAddr,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{what} exited ({status}) before it listened:\n{}",
                log_tail(log)
            );
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{what} not listening on {addr} within {timeout:?}:\n{}",
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_check_matches_the_binary_not_just_the_pid() {
        let me = std::process::id();
        let exe = std::env::current_exe().expect("exe");
        assert!(is_running(me, &exe));
        assert!(!is_running(me, Path::new("/bin/sh")));
        assert!(!is_running(u32::MAX - 1, &exe));
    }

    #[test]
    fn a_process_whose_binary_was_rebuilt_is_still_recognised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("sleeper");
        std::fs::copy("/bin/sleep", &copy).expect("copy");
        let mut child =
            spawn(&copy, &["30".into()], &[], &dir.path().join("s.log")).expect("spawn");
        let canonical = std::fs::canonicalize(&copy).expect("canonical");
        std::fs::remove_file(&copy).expect("remove");
        assert!(
            is_running(child.id(), &canonical),
            "a deleted binary still names the process"
        );
        assert!(stop(child.id(), &canonical, Duration::from_secs(5)));
        let _ = child.wait();
    }

    #[test]
    fn stop_terminates_a_child_by_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sleep = PathBuf::from("/bin/sleep");
        let mut child =
            spawn(&sleep, &["30".into()], &[], &dir.path().join("sleep.log")).expect("spawn");
        let pid = child.id();
        let binary = std::fs::canonicalize(&sleep).expect("canonical");
        assert!(is_running(pid, &binary));
        assert!(stop(pid, &binary, Duration::from_secs(5)));
        let status = child.wait().expect("wait");
        assert!(!status.success());
        assert!(!is_running(pid, &binary));
    }
}
