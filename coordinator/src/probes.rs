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
    /// Registers a probe to `gateway`. The probe is forgotten when the returned handle is
    /// dropped: answered, timed out, or its caller gone.
    pub fn register(&self, gateway: GatewayId) -> Waiter {
        let id = format!("probe-{:016x}", rand::random::<u64>());
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id.clone(), (gateway, tx));
        Waiter {
            probes: self.clone(),
            id,
            answer: rx,
        }
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

/// A registered probe: its id, and where its answer arrives.
#[derive(Debug)]
pub struct Waiter {
    probes: Probes,
    pub id: String,
    pub answer: oneshot::Receiver<ProbeResult>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.probes.lock().remove(&self.id);
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
        let mut waiter = probes.register(a.clone());
        let id = waiter.id.clone();
        let result = ProbeResult {
            probe_id: id.clone(),
            ..Default::default()
        };
        assert!(
            !probes.answer(&b, result.clone()),
            "another gateway's agent"
        );
        assert!(waiter.answer.try_recv().is_err());
        assert!(probes.answer(&a, result));
        assert_eq!(waiter.answer.try_recv().expect("answered").probe_id, id);
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

    #[test]
    fn a_probe_nobody_waits_for_is_forgotten() {
        let probes = Probes::default();
        let a = GatewayId::new("gw-a").expect("id");
        let id = probes.register(a.clone()).id.clone();
        let late = ProbeResult {
            probe_id: id,
            ..Default::default()
        };
        assert!(!probes.answer(&a, late), "dropped waiter: nothing kept");
        assert!(probes.lock().is_empty());
    }
}
