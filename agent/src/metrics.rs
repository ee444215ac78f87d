//! Prometheus metrics of the agent, and the small HTTP endpoint that serves them with
//! `/healthz` and `/readyz`.
//!
//! Labels are bounded: interface and peer names (objects the user wrote), never addresses; an
//! attacker can send from any number of sources but cannot add a label value.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use wgpin_common::{Counters, IdentityCounters};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterfaceLabels {
    pub interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub interface: String,
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct VerdictLabels {
    pub interface: String,
    pub peer: String,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub interface: String,
    pub mode: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub packets: Family<VerdictLabels, Counter>,
    pub bytes: Family<VerdictLabels, Counter>,
    pub violation_events: Family<PeerLabels, Counter>,
    pub evictions: Family<PeerLabels, Counter>,
    pub peer_enforced: Family<PeerLabels, Gauge>,
    pub mode: Family<ModeLabels, Gauge>,
    pub fast_path_verified: Gauge,
    pub withdrawals: Counter,
    pub events_rate_limited: Counter,
    pub events_lost: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_seconds: Histogram,
    /// In-cluster mode: status writes, Events written, failed API calls.
    pub status_writes: Counter,
    pub event_writes: Counter,
    pub api_errors: Counter,
    /// 1 when identity mode's hook is attached on this node.
    pub identity_available: Gauge,
    /// Identity mode's kernel counters, in the order of [`IDENTITY_COUNTERS`].
    identity: Vec<Counter>,
    /// Last kernel readings, to turn absolute counters into increments.
    seen: Mutex<BTreeMap<(VerdictLabels, bool), u64>>,
    seen_global: Mutex<(u64, u64)>,
    seen_identity: Mutex<IdentityCounters>,
}

/// An identity-mode counter: its name, its help, and its field in the kernel's reading.
type IdentityCounter = (&'static str, &'static str, fn(&IdentityCounters) -> u64);

const IDENTITY_COUNTERS: [IdentityCounter; 6] = [
    (
        "identity_sessions_learned",
        "Session indices the identity hook tied to a managed peer",
        |c| c.sessions_learned,
    ),
    (
        "identity_sessions_ignored",
        "Session indices of devices or peers identity mode does not manage",
        |c| c.sessions_ignored,
    ),
    (
        "identity_read_errors",
        "Identity hook runs that could not read WireGuard's structs (the layout does not fit)",
        |c| c.read_errors,
    ),
    (
        "identity_unknown_sessions",
        "Packets on identity ports with a session index the hook never saw (judged by the port's pins)",
        |c| c.unknown_sessions,
    ),
    (
        "identity_ingress_dropped",
        "Packets of a peer's session from outside that peer's pin, dropped",
        |c| c.ingress_dropped,
    ),
    (
        "identity_egress_dropped",
        "Handshakes WireGuard sent for a peer to an address outside its pin, dropped",
        |c| c.egress_dropped,
    ),
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wgpin");
        let packets = Family::<VerdictLabels, Counter>::default();
        let bytes = Family::<VerdictLabels, Counter>::default();
        let violation_events = Family::<PeerLabels, Counter>::default();
        let evictions = Family::<PeerLabels, Counter>::default();
        let peer_enforced = Family::<PeerLabels, Gauge>::default();
        let mode = Family::<ModeLabels, Gauge>::default();
        let fast_path_verified = Gauge::default();
        let withdrawals = Counter::default();
        let events_rate_limited = Counter::default();
        let events_lost = Counter::default();
        let reconcile_errors = Counter::default();
        let reconcile_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let status_writes = Counter::default();
        let event_writes = Counter::default();
        let api_errors = Counter::default();
        let identity_available = Gauge::default();
        registry.register(
            "identity_available",
            "1 when identity mode's hook on the WireGuard module is attached on this node",
            identity_available.clone(),
        );
        let identity: Vec<Counter> = IDENTITY_COUNTERS
            .iter()
            .map(|(name, help, _)| {
                let counter = Counter::default();
                registry.register(*name, *help, counter.clone());
                counter
            })
            .collect();
        registry.register(
            "status_writes",
            "PinnedNodeState status writes (coalesced: not one per poll)",
            status_writes.clone(),
        );
        registry.register(
            "event_writes",
            "Events written on PinnedPeers for fail-closed actions",
            event_writes.clone(),
        );
        registry.register(
            "api_errors",
            "Failed or dropped calls to the Kubernetes API (enforcement goes on)",
            api_errors.clone(),
        );
        registry.register(
            "fastpath_packets",
            "Packets to managed ports, by peer (empty for a shared port's unattributed packets) and verdict",
            packets.clone(),
        );
        registry.register(
            "fastpath_bytes",
            "Bytes to managed ports, by peer and verdict",
            bytes.clone(),
        );
        registry.register(
            "violation_events",
            "Violation events from the fast path (at most one per source per interval)",
            violation_events.clone(),
        );
        registry.register(
            "evictions",
            "Sessions evicted because the endpoint left the peer's pin",
            evictions.clone(),
        );
        registry.register(
            "peer_enforced",
            "1 when the peer is live behind its verified pin",
            peer_enforced.clone(),
        );
        registry.register(
            "interface_mode",
            "The pin mode an interface runs in (value 1)",
            mode.clone(),
        );
        registry.register(
            "fastpath_verified",
            "1 when the fast path is attached and its maps are the pinned ones",
            fast_path_verified.clone(),
        );
        registry.register(
            "withdrawals",
            "Times every peer was withdrawn because the fast path was lost",
            withdrawals.clone(),
        );
        registry.register(
            "fastpath_events_rate_limited",
            "Violations folded into later events by the per-source rate limit",
            events_rate_limited.clone(),
        );
        registry.register(
            "fastpath_events_lost",
            "Violation events lost to a full ring buffer",
            events_lost.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to apply the desired state",
            reconcile_seconds.clone(),
        );
        Self {
            registry,
            packets,
            bytes,
            violation_events,
            evictions,
            peer_enforced,
            mode,
            fast_path_verified,
            withdrawals,
            events_rate_limited,
            events_lost,
            reconcile_errors,
            reconcile_seconds,
            status_writes,
            event_writes,
            api_errors,
            identity_available,
            identity,
            seen: Mutex::new(BTreeMap::new()),
            seen_global: Mutex::new((0, 0)),
            seen_identity: Mutex::new(IdentityCounters::default()),
        }
    }

    /// Records a reading of identity mode's kernel counters.
    pub fn observe_identity(&self, reading: &IdentityCounters) {
        let Ok(mut seen) = self.seen_identity.lock() else {
            return;
        };
        for ((_, _, field), counter) in IDENTITY_COUNTERS.iter().zip(&self.identity) {
            let (now, last) = (field(reading), field(&seen));
            // A smaller reading means the map was recreated: count from zero again.
            counter.inc_by(if now >= last { now - last } else { now });
        }
        *seen = *reading;
    }

    /// Records a kernel counter reading for one peer (or one interface, with `peer` empty).
    pub fn observe_counters(&self, interface: &str, peer: &str, counters: &Counters) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        for (verdict, packets, bytes) in [
            ("allowed", counters.allowed_packets, counters.allowed_bytes),
            ("dropped", counters.dropped_packets, counters.dropped_bytes),
        ] {
            let labels = VerdictLabels {
                interface: interface.to_string(),
                peer: peer.to_string(),
                verdict,
            };
            for (is_bytes, value, family) in
                [(false, packets, &self.packets), (true, bytes, &self.bytes)]
            {
                let last = seen.entry((labels.clone(), is_bytes)).or_insert(0);
                // A smaller reading means the map was recreated: count from zero again.
                let delta = if value >= *last { value - *last } else { value };
                family.get_or_create(&labels).inc_by(delta);
                *last = value;
            }
        }
    }

    /// Records the programs' own event counters.
    pub fn observe_events(&self, rate_limited: u64, lost: u64) {
        let Ok(mut seen) = self.seen_global.lock() else {
            return;
        };
        self.events_rate_limited
            .inc_by(rate_limited.saturating_sub(seen.0));
        self.events_lost.inc_by(lost.saturating_sub(seen.1));
        *seen = (rate_limited.max(seen.0), lost.max(seen.1));
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        wgpin_operator::metrics::encode_text(&self.registry)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (ready only while `ready` is true) on `listener`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let probes = wgpin_operator::http::Probes {
        metrics: Arc::new(move || metrics.encode()),
        readiness: Arc::new(move || {
            if ready.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the fast path is not verified".to_string())
            }
        }),
    };
    wgpin_operator::http::serve(listener, probes).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_readings_become_increments_and_survive_a_reset() {
        let metrics = Metrics::new();
        let reading = |allowed| Counters {
            allowed_packets: allowed,
            allowed_bytes: allowed * 100,
            dropped_packets: 1,
            dropped_bytes: 60,
        };
        metrics.observe_counters("gateway", "laptop", &reading(5));
        metrics.observe_counters("gateway", "laptop", &reading(8));
        metrics.observe_counters("gateway", "laptop", &reading(2));
        let text = metrics.encode();
        assert!(text.contains(r#"wgpin_fastpath_packets_total{interface="gateway",peer="laptop",verdict="allowed"} 10"#), "{text}");
        assert!(text.contains(r#"wgpin_fastpath_packets_total{interface="gateway",peer="laptop",verdict="dropped"} 1"#), "{text}");
        assert!(text.contains(r#"wgpin_fastpath_bytes_total{interface="gateway",peer="laptop",verdict="allowed"} 1000"#), "{text}");
    }
}
