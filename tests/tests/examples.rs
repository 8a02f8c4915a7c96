//! Every example config under deploy/examples parses with the loader of the binary it is for.

use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn example_configs_parse() {
    kt_e2e::assert_valid_policy(&example("policy-config.yaml"));

    let ktctl = kt_ctl::ktconfig::KtctlConfig::load(&example("ktctl.yaml")).expect("ktctl.yaml");
    assert_eq!(ktctl.current_context.as_deref(), Some("production"));

    let coordinator = kt_coordinator::config::CoordinatorConfig::load(&example("coordinator.yaml"))
        .expect("coordinator.yaml");
    let groups =
        kt_coordinator::config::load_groups(coordinator.groups_file.as_ref().expect("groups_file"))
            .expect("groups.yaml");
    assert_eq!(groups.len(), 3);
    let production = groups
        .iter()
        .find(|g| g.name == "production")
        .expect("production");
    assert_eq!(production.after.as_deref(), Some("staging"));
    assert!(production.config_source.is_some());

    assert!(coordinator.metrics_listen.is_some());
    assert!(
        groups.iter().any(|g| !g.selector.is_empty()),
        "a label selector group"
    );

    let agent = kt_agent::config::AgentConfig::load(&example("agent.yaml")).expect("agent.yaml");
    assert_eq!(agent.labels["region"], "eu");
    assert!(
        agent.apply_settings().is_some(),
        "the example manages its gateway's config"
    );
    assert!(agent.gateway.events_file.is_some() && agent.metrics_listen.is_some());

    // A host that enrolls itself: token from systemd's credentials, certificate files where
    // the hardened unit lets the agent write (its StateDirectory=).
    let enrolling = kt_agent::config::AgentConfig::load(&example("agent-enroll.yaml"))
        .expect("agent-enroll.yaml");
    let enrollment = enrolling.enrollment.as_ref().expect("enrollment:");
    assert!(enrollment.token_file.starts_with("/run/credentials/"));
    for path in [&enrolling.tls.ca, &enrolling.tls.cert, &enrolling.tls.key] {
        assert!(path.starts_with("/var/lib/kt-fleet/"), "{}", path.display());
    }
    let issuing = coordinator
        .enrollment
        .as_ref()
        .expect("the coordinator enrolls");
    assert!(issuing.issuing_ca.key.ends_with("issuing-ca.key"));

    // The unit's environment file: KEY=value lines, and the secret the example policy names.
    let env = std::fs::read_to_string(example("gateway.env")).expect("gateway.env");
    let keys: Vec<&str> = env
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("KEY=value").0)
        .collect();
    assert!(keys.contains(&"MOCK_PROVIDER_KEY"), "{keys:?}");
}
