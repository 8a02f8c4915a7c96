//! deploy/kubernetes, checked without a cluster: every manifest parses, the objects refer to
//! each other consistently (selectors, services, volumes, config maps), the probes and ports are
//! the gateway contract's, and the configs inside the ConfigMaps load with the binaries' own
//! loaders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every object of every manifest, by `(kind, name)`.
fn objects() -> BTreeMap<(String, String), Value> {
    objects_in(&dir())
}

/// Every object of every manifest in `dir`, by `(kind, name)`.
fn objects_in(dir: &Path) -> BTreeMap<(String, String), Value> {
    let mut all = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("deploy/kubernetes")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let kind = value["kind"].as_str().expect("kind").to_owned();
            let name = value["metadata"]["name"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    file.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into()
                });
            assert!(value["apiVersion"].is_string(), "{kind} {name}: apiVersion");
            assert!(
                all.insert((kind.clone(), name.clone()), value).is_none(),
                "{kind} {name} defined twice"
            );
        }
    }
    all
}

fn get<'a>(objects: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    objects
        .get(&(kind.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

/// Checks a pod template: labels match the selector, every mount names a volume, every config
/// map volume names a ConfigMap of the manifests. Returns the containers by name.
fn check_pod<'a>(
    objects: &BTreeMap<(String, String), Value>,
    owner: &str,
    spec: &'a Value,
) -> BTreeMap<String, &'a Value> {
    let labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in spec["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels")
    {
        assert_eq!(
            &labels[k.as_str().expect("key")],
            v,
            "{owner}: selector matches the pods"
        );
    }
    let pod = &spec["template"]["spec"];
    let volumes: Vec<&str> = seq(&pod["volumes"])
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let claims: Vec<&str> = seq(&spec["volumeClaimTemplates"])
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    for v in seq(&pod["volumes"]) {
        if let Some(map) = v["configMap"]["name"].as_str() {
            get(objects, "ConfigMap", map);
        }
    }
    let mut containers = BTreeMap::new();
    for c in seq(&pod["initContainers"])
        .iter()
        .chain(seq(&pod["containers"]))
    {
        let name = c["name"].as_str().expect("container name");
        for m in seq(&c["volumeMounts"]) {
            let volume = m["name"].as_str().expect("mount name");
            assert!(
                volumes.contains(&volume) || claims.contains(&volume),
                "{owner}/{name}: mount {volume} has no volume"
            );
        }
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"],
            Value::Bool(false),
            "{owner}/{name}: no privilege escalation"
        );
        containers.insert(name.to_owned(), c);
    }
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"],
        Value::Bool(true),
        "{owner}"
    );
    containers
}

fn http_probe(container: &Value, probe: &str) -> (String, u64) {
    let get = &container[probe]["httpGet"];
    (
        get["path"].as_str().unwrap_or_default().to_owned(),
        get["port"].as_u64().unwrap_or_default(),
    )
}

#[test]
fn manifests_are_consistent_and_follow_the_gateway_contract() {
    let objects = objects();

    let kustomization = get(&objects, "Kustomization", "kustomization.yaml");
    let listed: Vec<&str> = seq(&kustomization["resources"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for file in ["namespace.yaml", "coordinator.yaml", "gateway.yaml"] {
        assert!(listed.contains(&file), "kustomization lists {file}");
        assert!(dir().join(file).is_file(), "{file} exists");
    }
    for ((kind, name), value) in &objects {
        if !matches!(kind.as_str(), "Namespace" | "Kustomization") {
            assert_eq!(value["metadata"]["namespace"], "kt-fleet", "{kind} {name}");
        }
    }

    // Gateways: three replicas, each a gateway and its agent sidecar.
    let deployment = &get(&objects, "Deployment", "kt-gateway")["spec"];
    assert_eq!(deployment["replicas"], 3);
    let containers = check_pod(&objects, "kt-gateway", deployment);
    let gateway = containers["gateway"];
    assert!(
        seq(&gateway["ports"])
            .iter()
            .any(|p| p["containerPort"] == 41002),
        "the gateway listens on 41002"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            http_probe(gateway, probe),
            ("/health".to_owned(), 41002),
            "{probe}"
        );
    }
    assert!(
        containers.contains_key("agent"),
        "the agent runs as a sidecar"
    );
    // Each pod has its own agent identity, named after the pod.
    let identity = seq(&deployment["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == "identity")
        .expect("identity volume");
    let uri = identity["csi"]["volumeAttributes"]["csi.cert-manager.io/uri-sans"]
        .as_str()
        .expect("uri-sans");
    assert_eq!(uri, "spiffe://kt-fleet.local/agent/${POD_NAME}");
    get(&objects, "Issuer", "kt-fleet-ca");

    // The coordinator: a StatefulSet with a volume, behind a Service.
    let statefulset = &get(&objects, "StatefulSet", "kt-coordinator")["spec"];
    let service_name = statefulset["serviceName"].as_str().expect("serviceName");
    let service = &get(&objects, "Service", service_name)["spec"];
    let containers = check_pod(&objects, "kt-coordinator", statefulset);
    let coordinator = containers["coordinator"];
    assert!(
        seq(&coordinator["volumeMounts"])
            .iter()
            .any(|m| m["name"] == "data"),
        "the coordinator keeps its state on the claimed volume"
    );
    let pod_labels = &statefulset["template"]["metadata"]["labels"];
    for (k, v) in service["selector"].as_mapping().expect("selector") {
        assert_eq!(
            &pod_labels[k.as_str().expect("key")],
            v,
            "the Service selects the pod"
        );
    }
    let port_names: Vec<&str> = seq(&coordinator["ports"])
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in seq(&service["ports"]) {
        let target = p["targetPort"].as_str().expect("named targetPort");
        assert!(port_names.contains(&target), "Service port {target}");
    }
    assert!(seq(&service["ports"]).iter().any(|p| p["port"] == 41001));
}

/// Writes the files of a ConfigMap into `dir`.
fn unpack(objects: &BTreeMap<(String, String), Value>, name: &str, dir: &Path) {
    let data = get(objects, "ConfigMap", name)["data"]
        .as_mapping()
        .expect("data");
    for (file, text) in data {
        std::fs::write(
            dir.join(file.as_str().expect("file name")),
            text.as_str().expect("text"),
        )
        .expect("write");
    }
}

#[test]
fn configs_in_the_config_maps_load_with_the_binaries_loaders() {
    let objects = objects();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    unpack(&objects, "kt-coordinator-config", dir);
    unpack(&objects, "kt-agent-config", dir);
    unpack(&objects, "kt-gateway-policy", dir);

    let coordinator =
        kt_coordinator::config::CoordinatorConfig::load(&dir.join("coordinator.yaml"))
            .expect("coordinator.yaml");
    kt_coordinator::config::load_groups(coordinator.groups_file.as_ref().expect("groups_file"))
        .expect("groups.yaml");
    let agent = kt_agent::config::AgentConfig::load(&dir.join("agent.yaml")).expect("agent.yaml");
    assert_eq!(
        agent.coordinator.endpoints,
        ["https://kt-coordinator.kt-fleet.svc:41001"]
    );
    kt_e2e::assert_valid_policy(&dir.join("policy-config.yaml"));
}

#[test]
fn the_ha_overlay_runs_three_coordinators_on_a_three_member_etcd() {
    let ha = dir().join("ha");
    let objects = objects_in(&ha);
    let kustomization = get(&objects, "Kustomization", "kustomization.yaml");
    for file in seq(&kustomization["resources"])
        .iter()
        .filter_map(Value::as_str)
    {
        assert!(ha.join(file).is_file(), "{file} exists");
    }
    // etcd: three members behind a headless Service, TLS from its own Secret.
    let etcd = &get(&objects, "StatefulSet", "etcd")["spec"];
    assert_eq!(etcd["replicas"], 3);
    assert_eq!(etcd["serviceName"], "etcd");
    assert_eq!(
        get(&objects, "Service", "etcd")["spec"]["clusterIP"],
        "None"
    );
    let args: Vec<&str> = seq(&etcd["template"]["spec"]["containers"][0]["command"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for flag in ["--client-cert-auth=true", "--peer-client-cert-auth=true"] {
        assert!(args.contains(&flag), "etcd runs with {flag}");
    }
    // Coordinators: three replicas whose config loads, on etcd's members, with the etcd client
    // certificate mounted where the config says.
    let statefulset = &get(&objects, "StatefulSet", "kt-coordinator")["spec"];
    assert_eq!(statefulset["replicas"], 3);
    let tmp = tempfile::tempdir().expect("tempdir");
    unpack(&objects, "kt-coordinator-config", tmp.path());
    let config =
        kt_coordinator::config::CoordinatorConfig::load(&tmp.path().join("coordinator.yaml"))
            .expect("coordinator.yaml");
    let kt_coordinator::config::Storage::Etcd(storage) = &config.storage else {
        panic!("the HA coordinator stores its state in etcd");
    };
    assert_eq!(
        storage.endpoints,
        (0..3)
            .map(|i| format!("https://etcd-{i}.etcd.kt-fleet.svc:2379"))
            .collect::<Vec<_>>()
    );
    let mounts = seq(&statefulset["template"]["spec"]["containers"][0]["volumeMounts"]);
    let etcd_tls = mounts
        .iter()
        .find(|m| m["name"] == "etcd-tls")
        .and_then(|m| m["mountPath"].as_str())
        .expect("etcd-tls mounted");
    assert_eq!(storage.tls.ca, Path::new(etcd_tls).join("ca.crt"));
    let secret = seq(&statefulset["template"]["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == "etcd-tls")
        .map(|v| v["secret"]["secretName"].clone())
        .expect("etcd-tls volume");
    assert_eq!(secret, "kt-etcd-tls");
}

#[test]
fn the_enroll_overlay_has_agents_enroll_as_their_pod_with_a_token_from_a_secret() {
    let overlay = dir().join("enroll");
    let objects = objects_in(&overlay);
    let kustomization = get(&objects, "Kustomization", "kustomization.yaml");
    for file in seq(&kustomization["resources"])
        .iter()
        .chain(seq(&kustomization["patches"]).iter().map(|p| &p["path"]))
        .filter_map(Value::as_str)
    {
        assert!(overlay.join(file).is_file(), "{file} exists");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    unpack(&objects, "kt-agent-config", tmp.path());
    unpack(&objects, "kt-coordinator-config", tmp.path());
    let agent =
        kt_agent::config::AgentConfig::load(&tmp.path().join("agent.yaml")).expect("agent.yaml");
    let enrollment = agent.enrollment.as_ref().expect("the agent enrolls");
    let coordinator =
        kt_coordinator::config::CoordinatorConfig::load(&tmp.path().join("coordinator.yaml"))
            .expect("coordinator.yaml");
    let issuing = coordinator
        .enrollment
        .as_ref()
        .expect("the coordinator enrolls");

    // The agent: the pod's name as its gateway id, the token from its Secret, its certificate
    // written to the pod's writable state volume (the root filesystem is read-only).
    let deployment = &get(&objects, "Deployment", "kt-gateway")["spec"];
    let pod = &deployment["template"]["spec"];
    let containers = seq(&pod["containers"]);
    let container = containers
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("agent container");
    let env = seq(&container["env"]);
    let enroll_as = env
        .iter()
        .find(|e| e["name"] == "KT_AGENT_GATEWAY_ID")
        .expect("KT_AGENT_GATEWAY_ID");
    assert_eq!(
        enroll_as["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let mount_of = |container: &Value, volume: &str| -> PathBuf {
        seq(&container["volumeMounts"])
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{volume} mounted"))
    };
    assert!(
        enrollment
            .token_file
            .starts_with(mount_of(container, "join-token"))
    );
    assert!(agent.tls.cert.starts_with(mount_of(container, "state")));
    let volumes = seq(&pod["volumes"]);
    let token = volumes
        .iter()
        .find(|v| v["name"] == "join-token")
        .expect("join-token volume");
    assert_eq!(token["secret"]["secretName"], "kt-join-token");
    assert!(
        volumes.iter().all(|v| v["csi"].is_null()),
        "no cert-manager"
    );

    // The coordinator: the issuing CA mounted where its config says, from its own Secret.
    let statefulset = &get(&objects, "StatefulSet", "kt-coordinator")["spec"]["template"]["spec"];
    let coordinator_container = &seq(&statefulset["containers"])[0];
    assert!(
        issuing
            .issuing_ca
            .key
            .starts_with(mount_of(coordinator_container, "issuing-ca"))
    );
    let secret = seq(&statefulset["volumes"])
        .iter()
        .find(|v| v["name"] == "issuing-ca")
        .map(|v| v["secret"]["secretName"].clone())
        .expect("issuing-ca volume");
    assert_eq!(secret, "kt-fleet-issuing-ca");
}
