//! Turning a push into a rollout plan: which gateways, in which batches, from which version.

use std::collections::BTreeMap;

use kt_proto::v1::GatewayState;

use super::model::{ConfigId, GatewayProgress, Spec, Strategy, TargetState};

pub use kt_contract::{MAX_CONFIG_BYTES, content_hash};

/// The version label of a config (`pack.version`); the coordinator reads nothing else of it:
/// validation is the gateway's job, done by each agent before it applies.
pub fn version_label(content: &[u8]) -> Result<String, String> {
    if content.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "config is {} bytes, the limit is {MAX_CONFIG_BYTES}",
            content.len()
        ));
    }
    let text = std::str::from_utf8(content).map_err(|e| format!("config is not UTF-8: {e}"))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("config is not YAML: {e}"))?;
    value
        .get("pack")
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "config has no pack.version".to_owned())
}

/// The per-gateway starting points and the batches of the gateways that must change.
pub fn plan(
    spec: &Spec,
    gateways: &[String],
    fleet: &BTreeMap<String, GatewayState>,
    config: &ConfigId,
) -> (BTreeMap<String, GatewayProgress>, Vec<Vec<String>>) {
    let mut progress = BTreeMap::new();
    let mut to_change = Vec::new();
    for gateway in gateways {
        let baseline = fleet
            .get(gateway)
            .and_then(super::step::running_config)
            .unwrap_or(ConfigId {
                version: String::new(),
                hash: String::new(),
            });
        let state = if baseline.hash == config.hash {
            TargetState::Unchanged
        } else {
            TargetState::Pending
        };
        if state == TargetState::Pending {
            to_change.push(gateway.clone());
        }
        progress.insert(
            gateway.clone(),
            GatewayProgress {
                baseline,
                state,
                error: String::new(),
                offer_id: None,
                offered_at: None,
                offers_sent: 0,
            },
        );
    }
    let batches = if to_change.is_empty() {
        Vec::new()
    } else {
        let size = spec.size.of(to_change.len());
        match spec.strategy {
            Strategy::AllAtOnce => vec![to_change],
            Strategy::Canary { .. } => {
                let rest = to_change.split_off(size.min(to_change.len()));
                if rest.is_empty() {
                    vec![to_change]
                } else {
                    vec![to_change, rest]
                }
            }
            Strategy::Rolling => to_change.chunks(size).map(<[String]>::to_vec).collect(),
        }
    };
    (progress, batches)
}

/// A unified diff of two configs, for `--dry-run` and `config diff`.
pub fn diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(old_name, new_name)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::model::{Size, Target};

    fn spec(strategy: Strategy, size: Size) -> Spec {
        Spec {
            target: Target::Group("g".into()),
            strategy,
            size,
            pause_between_ms: 0,
            min_healthy_time_ms: 0,
            apply_deadline_ms: 1,
            progress_deadline_ms: 1,
            max_block_rate_delta: None,
            max_error_rate: None,
            min_sample: 0,
            continue_on_inconclusive: false,
            rollback_on_error: false,
        }
    }

    #[test]
    fn batches_per_strategy_and_unchanged_gateways_are_left_out() {
        let ids: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut fleet = BTreeMap::new();
        fleet.insert(
            "e".to_owned(),
            GatewayState {
                health: Some(kt_proto::v1::GatewayHealth {
                    config: Some(kt_proto::v1::ConfigInfo {
                        hash: "sha256:new".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let config = ConfigId {
            version: "2".into(),
            hash: "sha256:new".into(),
        };
        let (progress, batches) = plan(
            &spec(Strategy::Rolling, Size::Count(2)),
            &ids,
            &fleet,
            &config,
        );
        assert_eq!(batches, vec![vec!["a", "b"], vec!["c", "d"]]);
        assert_eq!(progress["e"].state, TargetState::Unchanged);
        let (_, batches) = plan(
            &spec(
                Strategy::Canary {
                    auto_promote: false,
                },
                Size::Percent(25),
            ),
            &ids,
            &fleet,
            &config,
        );
        assert_eq!(batches, vec![vec!["a"], vec!["b", "c", "d"]]);
        let (_, batches) = plan(
            &spec(Strategy::AllAtOnce, Size::Count(1)),
            &ids,
            &fleet,
            &config,
        );
        assert_eq!(batches.len(), 1);
    }

    #[test]
    fn version_labels() {
        assert_eq!(
            version_label(b"pack: {name: x, version: 1.2.3}\n").as_deref(),
            Ok("1.2.3")
        );
        assert!(version_label(b"pack: {name: x}").is_err());
        assert!(version_label(b"\xff").is_err());
        assert!(version_label(b"[unclosed").is_err());
    }

    #[test]
    fn diff_shows_changed_lines() {
        let d = diff("a\nb\n", "a\nc\n", "old", "new");
        assert!(d.contains("-b") && d.contains("+c"), "{d}");
    }
}
