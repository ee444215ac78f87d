//! The operator's Prometheus metrics. Labels are bounded: error reasons and object states are
//! fixed sets, never object names, so 10,000 peers cost no more series than ten.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Which step of a pass failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ErrorReason {
    /// Reading objects (list, or a watch that failed).
    Read,
    /// Applying or deleting a `PinnedNodeState`.
    NodeState,
    /// Writing a `PinnedPeer` status.
    PeerStatus,
    /// Writing a `PinnedInterface` status.
    InterfaceStatus,
    /// Adding or removing the cleanup finalizer.
    Finalizer,
    /// Writing an Event (never fails a pass).
    Event,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub reason: ErrorReason,
}

/// What a write did.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum WriteKind {
    NodeStateApply,
    NodeStateDelete,
    PeerStatus,
    InterfaceStatus,
    FinalizerAdd,
    FinalizerRemove,
    Event,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: WriteKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    pub result: PassResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PassResult {
    Ok,
    Error,
}

/// Objects counted by kind and state, for example `PinnedPeer`/`Ready`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub kind: &'static str,
    pub state: &'static str,
}

/// Every metric the operator exports (prefix `wgpin_operator_`).
pub struct Metrics {
    registry: Registry,
    pub passes: Family<PassLabels, Counter>,
    pub pass_seconds: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
    pub writes: Family<WriteLabels, Counter>,
    pub objects: Family<ObjectLabels, Gauge>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wgpin_operator");
        let passes = Family::<PassLabels, Counter>::default();
        let pass_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]);
        let errors = Family::<ErrorLabels, Counter>::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let objects = Family::<ObjectLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconcile passes (each renders every object and writes what differs), by result",
            passes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            pass_seconds.clone(),
        );
        registry.register(
            "errors",
            "Failed API calls, by the step that failed",
            errors.clone(),
        );
        registry.register("writes", "API writes, by what they changed", writes.clone());
        registry.register(
            "objects",
            "Objects by kind and state (PinnedPeer: Ready, Reconciling, Stalled, Deleting; PinnedNodeState: Applied, Pending)",
            objects.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease and writes",
            leader.clone(),
        );
        Self {
            registry,
            passes,
            pass_seconds,
            errors,
            writes,
            objects,
            leader,
        }
    }

    pub fn error(&self, reason: ErrorReason) {
        self.errors.get_or_create(&ErrorLabels { reason }).inc();
    }

    pub fn wrote(&self, kind: WriteKind, count: usize) {
        self.writes
            .get_or_create(&WriteLabels { kind })
            .inc_by(count as u64);
    }

    /// Replaces the object counts of one kind.
    pub fn set_objects(&self, kind: &'static str, states: &[(&'static str, usize)]) {
        for (state, count) in states {
            self.objects
                .get_or_create(&ObjectLabels { kind, state })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        encode_text(&self.registry)
    }
}

/// A registry in the Prometheus text format (empty if it cannot be encoded), for `/metrics`
/// of both binaries.
pub fn encode_text(registry: &Registry) -> String {
    let mut out = String::new();
    if encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_names() {
        let metrics = Metrics::new();
        metrics.error(ErrorReason::NodeState);
        metrics.wrote(WriteKind::NodeStateApply, 3);
        metrics.set_objects("PinnedPeer", &[("Ready", 2), ("Stalled", 1)]);
        let text = metrics.encode();
        assert!(
            text.contains(r#"wgpin_operator_errors_total{reason="NodeState"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wgpin_operator_writes_total{kind="NodeStateApply"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wgpin_operator_objects{kind="PinnedPeer",state="Stalled"} 1"#),
            "{text}"
        );
    }
}
