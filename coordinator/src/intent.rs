//! Intent: the config each gateway should run, beside what it reports running.
//!
//! Each gateway's desired config is its pin if it has one, else what a rollout or a rollback
//! last settled for it, else its group's desired config. The rollout engine is the only writer
//! (rollout batches that passed their gates, rollbacks, undos, pins, config sources); the fleet
//! task shows it next to the running config and classifies each gateway (see [`classify`]).

use std::collections::BTreeMap;

use kt_proto::v1::SyncState;
use serde::{Deserialize, Serialize};

use crate::rollout::model::ConfigId;

/// One gateway's desired config, and what put it there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub config: ConfigId,
    /// "r-3 batch 2 passed its gates", "r-3 rolled back", "pinned by ...", "adopted", ...
    pub cause: String,
    pub at: u64,
}

/// A change of one gateway's desired config (`None`: forget it).
pub type DesiredChange = (String, Option<Desired>);

/// What the coordinator knows and wants for one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupIntent {
    /// What the group's members should run, unless pinned or settled otherwise one by one.
    pub desired: Option<ConfigId>,
    /// The content hash of the config source when it was last used (a rollout started, or
    /// found nothing to do). A source starts a rollout only when its content differs from this.
    #[serde(default)]
    pub source_hash: String,
    /// A version the group rejected (rolled back, undone), and why: shown, and never applied
    /// again by the source until the source's content changes.
    #[serde(default)]
    pub held: Option<(String, String)>,
}

/// Everything stored about intent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub gateways: BTreeMap<String, Desired>,
    pub pins: BTreeMap<String, Desired>,
    pub groups: BTreeMap<String, GroupIntent>,
}

impl Intent {
    /// What `gateway` should run, and whether a pin says so. `groups` are the gateway's groups
    /// in name order: the first with a desired config speaks for a gateway nothing else covers.
    pub fn desired_of<'a>(
        &'a self,
        gateway: &str,
        groups: impl IntoIterator<Item = &'a str>,
    ) -> Option<(&'a ConfigId, bool)> {
        if let Some(pin) = self.pins.get(gateway) {
            return Some((&pin.config, true));
        }
        if let Some(d) = self.gateways.get(gateway) {
            return Some((&d.config, false));
        }
        groups
            .into_iter()
            .find_map(|g| self.groups.get(g).and_then(|i| i.desired.as_ref()))
            .map(|c| (c, false))
    }

    pub fn apply(&mut self, changes: &[DesiredChange]) {
        for (gateway, desired) in changes {
            match desired {
                Some(d) => self.gateways.insert(gateway.clone(), d.clone()),
                None => self.gateways.remove(gateway),
            };
        }
    }
}

/// Running against desired. `held` when a rollout (or a re-offer) holds the gateway, and
/// `in_flight` when an offer to it is unanswered.
pub fn classify(
    desired: Option<&str>,
    running: Option<&str>,
    held: bool,
    in_flight: bool,
) -> SyncState {
    let (Some(desired), Some(running)) = (desired, running) else {
        return if held {
            SyncState::Converging
        } else {
            SyncState::Unspecified
        };
    };
    if held && (in_flight || desired != running) {
        SyncState::Converging
    } else if desired == running {
        SyncState::InSync
    } else {
        SyncState::Drifted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hash: &str) -> ConfigId {
        ConfigId {
            version: "1".into(),
            hash: hash.into(),
        }
    }

    fn desired(hash: &str) -> Desired {
        Desired {
            config: config(hash),
            cause: String::new(),
            at: 0,
        }
    }

    #[test]
    fn a_pin_wins_then_the_gateway_then_its_first_group_with_intent() {
        let mut intent = Intent::default();
        intent.groups.insert("a".into(), GroupIntent::default());
        intent.groups.insert(
            "b".into(),
            GroupIntent {
                desired: Some(config("group")),
                ..Default::default()
            },
        );
        let of = |i: &Intent| {
            i.desired_of("gw", ["a", "b"])
                .map(|(c, p)| (c.hash.clone(), p))
        };
        assert_eq!(of(&intent), Some(("group".into(), false)));
        intent.apply(&[("gw".into(), Some(desired("own")))]);
        assert_eq!(of(&intent), Some(("own".into(), false)));
        intent.pins.insert("gw".into(), desired("pin"));
        assert_eq!(of(&intent), Some(("pin".into(), true)));
        assert_eq!(intent.desired_of("other", ["a"]), None);
    }

    #[test]
    fn classification() {
        use SyncState::*;
        assert_eq!(classify(Some("x"), Some("x"), false, false), InSync);
        assert_eq!(classify(Some("x"), Some("y"), false, false), Drifted);
        assert_eq!(classify(Some("x"), Some("y"), true, false), Converging);
        assert_eq!(classify(Some("x"), Some("x"), true, true), Converging);
        assert_eq!(classify(Some("x"), Some("x"), true, false), InSync);
        assert_eq!(classify(None, Some("x"), false, false), Unspecified);
        assert_eq!(classify(Some("x"), None, false, false), Unspecified);
    }
}
