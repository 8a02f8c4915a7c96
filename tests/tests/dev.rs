//! `ktctl dev up|status|down` as a newcomer runs them.

use std::time::Duration;

use kt_ctl::dev;
use kt_e2e::{bin, wait_for};

/// Stops whatever `dev up` started in `dir`, by pid, even when the test fails.
struct DevFleetGuard(std::path::PathBuf);

impl Drop for DevFleetGuard {
    fn drop(&mut self) {
        if let Ok(Some(state)) = dev::DevState::load(&self.0) {
            for p in &state.processes {
                dev::stop(p.pid, &p.binary, Duration::from_secs(2));
            }
        }
    }
}

fn ktctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("ktctl"))
        .args(args)
        .output()
        .expect("run ktctl")
}

#[tokio::test]
async fn dev_up_status_and_down() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fleet");
    let dir_arg = dir.to_str().expect("utf-8 path");
    let _guard = DevFleetGuard(dir.clone());

    let up = ktctl(&["dev", "up", "--gateways", "2", "--dir", dir_arg]);
    assert!(
        up.status.success(),
        "dev up failed: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(String::from_utf8_lossy(&up.stdout).contains("ktctl gateway health"));

    let config = dir.join("ktctl.yaml");
    let config_arg = config.to_str().expect("utf-8 path");
    let health = ktctl(&["--config", config_arg, "gateway", "health", "-o", "json"]);
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&health.stdout).expect("json");
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["gateway"].as_str()).collect();
    assert_eq!(ids, ["gw-dev-01", "gw-dev-02"]);
    assert_eq!(rows[0]["region"], "us");
    assert_eq!(rows[1]["region"], "eu");
    assert!(
        rows.iter()
            .all(|r| r["groups"] == serde_json::json!(["dev"]))
    );

    // A second `up` is refused while the first fleet runs.
    let again = ktctl(&["dev", "up", "--dir", dir_arg]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let status = ktctl(&["dev", "status", "--dir", dir_arg, "-o", "json"]);
    assert!(status.status.success());
    let procs: Vec<serde_json::Value> = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(procs.len(), 6, "{procs:#?}");
    let roles: Vec<&str> = procs.iter().filter_map(|p| p["role"].as_str()).collect();
    assert_eq!(
        roles,
        [
            "coordinator",
            "provider",
            "gateway",
            "agent",
            "gateway",
            "agent"
        ]
    );
    for p in &procs {
        assert!(p["pid"].as_u64().is_some_and(|pid| pid > 0), "{p}");
        assert!(p.get("address").is_some() && p.get("id").is_some(), "{p}");
        if p["role"] != "agent" {
            assert!(
                p["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{p}"
            );
        }
    }
    let pids: Vec<(u32, std::path::PathBuf)> = dev::DevState::load(&dir)
        .expect("state")
        .expect("a fleet")
        .processes
        .iter()
        .map(|p| (p.pid, p.binary.clone()))
        .collect();

    let down = ktctl(&["dev", "down", "--dir", dir_arg]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let all_gone = wait_for(Duration::from_secs(10), || {
        pids.iter()
            .all(|(pid, binary)| !dev::is_running(*pid, binary))
    })
    .await;
    assert!(all_gone, "processes survived dev down");
    let after = ktctl(&["dev", "status", "--dir", dir_arg]);
    assert!(String::from_utf8_lossy(&after.stdout).contains("no dev fleet"));
}
