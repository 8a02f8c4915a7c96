//! Synthetic probes in flight: an operator asks (`ProbeGateway`), the gateway's agent runs the
//! probe and answers on its session. Only the agent the probe was sent to can answer it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kt_proto::identity::GatewayId;
use kt_proto::v1::ProbeResult;
use tokio::sync::oneshot;

/// Probes by id: the gateway each was sent to, and who waits for the answer.
type Waiting = HashMap<String, (GatewayId, oneshot::Sender<ProbeResult>)>;

#[derive(Clone, Debug, Default)]
pub struct Probes {
    waiting: Arc<Mutex<Waiting>>,
}

impl Probes {
    /// Registers a probe to `gateway`; returns its id and where the answer arrives.
    pub fn register(&self, gateway: GatewayId) -> (String, oneshot::Receiver<ProbeResult>) {
        let id = format!("probe-{:016x}", rand::random::<u64>());
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id.clone(), (gateway, tx));
        (id, rx)
    }

    /// Forgets a probe nobody waits for any more (timed out, or never delivered).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Hands an agent's answer to whoever waits; false when no probe of this id was sent to
    /// `from` (an answer for another gateway's probe is dropped).
    pub fn answer(&self, from: &GatewayId, result: ProbeResult) -> bool {
        let mut waiting = self.lock();
        match waiting.get(&result.probe_id) {
            Some((gateway, _)) if gateway == from => {}
            _ => return false,
        }
        match waiting.remove(&result.probe_id) {
            Some((_, tx)) => tx.send(result).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_probed_gateway_can_answer() {
        let probes = Probes::default();
        let a = GatewayId::new("gw-a").expect("id");
        let b = GatewayId::new("gw-b").expect("id");
        let (id, mut rx) = probes.register(a.clone());
        let result = ProbeResult {
            probe_id: id.clone(),
            ..Default::default()
        };
        assert!(
            !probes.answer(&b, result.clone()),
            "another gateway's agent"
        );
        assert!(rx.try_recv().is_err());
        assert!(probes.answer(&a, result));
        assert_eq!(rx.try_recv().expect("answered").probe_id, id);
        assert!(
            !probes.answer(
                &a,
                ProbeResult {
                    probe_id: id,
                    ..Default::default()
                }
            ),
            "answered once"
        );
    }
}
