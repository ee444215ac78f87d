//! Kubernetes Events (events.k8s.io/v1) on `PinnedPeer`s: source violations and the problems
//! render finds, aggregated and rate-limited.
//!
//! Two halves. [`EventPlanner`] is pure and deterministic (the clock comes in as `now`): fed each
//! pass with the agents' reports and render's problems, it says which Events to write.
//! [`EventWriter`] writes them, and never fails the pass: a refused write is logged and counted.
//!
//! Rate: at most one Event per (peer, offending source address) per window (a minute); the
//! violations that arrive inside the window are carried to the next Event for that key, whose
//! note gives their number, so nothing is lost, only delayed. A problem gets one Warning when it
//! appears or its message changes, and one Normal `Resolved` when it goes.
//!
//! Why not kube-runtime's `Recorder`: it deduplicates on (type, reason, action, regarding,
//! related) and ignores the note, so a second offending source, or a new count for the same one,
//! would be PATCHed into the first Event's `series` still carrying the first note: the source and
//! the count would be lost. It also puts the Events of cluster-scoped objects in "default" with no
//! way to choose, short of giving `regarding` a namespace, which `kubectl describe` would then
//! not find. The planner already aggregates what the Recorder's series cache would, so each
//! planned Event is one create, with a generated name.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
};

use tracing::Instrument as _;
use wgpin_crds::{
    PinnedNodeStateStatus, PinnedPeer,
    conditions::SOURCE_VIOLATION,
    k8s_openapi::{
        api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
        jiff::{SignedDuration, Timestamp},
    },
    kube::{Api, Client, Resource as _, ResourceExt as _, api::PostParams},
};

pub use wgpin_crds::kube::runtime::events::EventType;

use crate::render::{Problem, ProblemReason};

/// `reportingController` of every Event the operator writes.
pub const REPORTING_CONTROLLER: &str = "wgpin.io/operator";
/// Where Events go: `PinnedPeer` is cluster-scoped, and kubectl files the Events of
/// cluster-scoped objects in "default".
pub const DEFAULT_EVENT_NAMESPACE: &str = "default";
/// At most one Event per (peer, source) per this long.
pub const DEFAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Offending source addresses tracked per peer. A new one beyond this evicts the one seen
/// longest ago; its unreported count moves to the peer's "other sources" entry (reported like
/// any source), so memory stays bounded and no count is lost.
pub const MAX_SOURCES_PER_PEER: usize = 64;
/// Node names kept per source between two Events; the note says "and others" beyond.
const MAX_NODES_PER_SOURCE: usize = 8;
/// The API server refuses notes longer than this (bytes).
const MAX_NOTE_BYTES: usize = 1024;
/// The API server refuses a `reportingInstance` longer than this.
const MAX_REPORTING_INSTANCE: usize = 128;
/// The source label of the violations folded in from evicted sources.
const OTHER_SOURCES: &str = "other sources";

/// What the planner needs from one controller pass. The peers may be owned or shared (`Arc`,
/// as the operator's watch caches hold them).
pub struct PassInput<'a, P: Borrow<PinnedPeer> = PinnedPeer> {
    /// Every `PinnedPeer` that exists; memory about any other is dropped.
    pub peers: &'a [P],
    /// Each node's `PinnedNodeState.status`, by node name (nodes without one left out).
    pub reports: &'a BTreeMap<String, PinnedNodeStateStatus>,
    /// Render's problems, all of them: those of `PinnedPeer`s are used.
    pub problems: &'a [Problem],
    pub now: &'a Time,
}

/// Why an Event is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Violations from one source address since the last Event for it.
    Violations {
        /// The offending address, or "other sources" for the ones folded in by the cap.
        source: String,
        /// The latest offending `address:port`, as the agent reported it.
        latest: String,
        /// Violations since the last Event for this (peer, source).
        count: u64,
        /// Nodes that saw them, sorted (at most a few; see `more_nodes`).
        nodes: Vec<String>,
        more_nodes: bool,
    },
    /// A problem appeared, or its message changed.
    Problem {
        reason: ProblemReason,
        message: String,
    },
    /// A problem announced earlier is gone.
    Resolved {
        reason: ProblemReason,
        message: String,
    },
    /// A node's agent acted to fail closed, or recovered (written by the agent).
    FailClosed {
        node: String,
        action: FailClosedAction,
        message: String,
    },
}

/// What an agent did to keep a peer from going live without its pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailClosedAction {
    /// The fast path was lost: the peer was taken out of WireGuard.
    Withdrawn,
    /// The fast path is verified again: the peer is back.
    Restored,
    /// The peer cannot be enforced on this node (it stays out of WireGuard).
    NotEnforced,
}

impl FailClosedAction {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Withdrawn => "PeerWithdrawn",
            Self::Restored => "PeerRestored",
            Self::NotEnforced => "PeerNotEnforced",
        }
    }
}

/// One Event to write, about one `PinnedPeer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub peer: String,
    /// The peer's `metadata.uid`, for `regarding`.
    pub uid: Option<String>,
    pub cause: Cause,
}

impl PlannedEvent {
    pub fn type_(&self) -> EventType {
        match self.cause {
            Cause::Violations { .. } | Cause::Problem { .. } => EventType::Warning,
            Cause::Resolved { .. } => EventType::Normal,
            Cause::FailClosed { action, .. } => match action {
                FailClosedAction::Restored => EventType::Normal,
                FailClosedAction::Withdrawn | FailClosedAction::NotEnforced => EventType::Warning,
            },
        }
    }

    /// `SourceViolation`, the problem's reason, or `Resolved`.
    pub fn reason(&self) -> &'static str {
        match &self.cause {
            Cause::Violations { .. } => SOURCE_VIOLATION,
            Cause::Problem { reason, .. } => reason.as_str(),
            Cause::Resolved { .. } => "Resolved",
            Cause::FailClosed { action, .. } => action.reason(),
        }
    }

    /// What was done: the agents enforce the pin; the operator renders (or leaves out) the peer.
    pub fn action(&self) -> &'static str {
        match self.cause {
            Cause::Violations { .. } | Cause::FailClosed { .. } => "EnforcePin",
            Cause::Problem { .. } | Cause::Resolved { .. } => "Render",
        }
    }

    /// The human-readable note, at most 1024 bytes.
    pub fn note(&self) -> String {
        let note = match &self.cause {
            Cause::Violations {
                source,
                latest,
                count,
                nodes,
                more_nodes,
            } => {
                let plural = if *count == 1 { "" } else { "s" };
                let latest = if latest != source && !latest.is_empty() {
                    format!(" (latest {latest})")
                } else {
                    String::new()
                };
                let mut on = nodes.join(", ");
                if *more_nodes {
                    on.push_str(" and others");
                }
                let node_word = if nodes.len() == 1 && !more_nodes {
                    "node"
                } else {
                    "nodes"
                };
                format!(
                    "{count} violation{plural} from {source}{latest} since the last event for this source, on {node_word} {on}: the peer's key was used from outside spec.sources and refused; if that was not the peer, its key may be stolen"
                )
            }
            Cause::Problem { message, .. } => message.clone(),
            Cause::Resolved { reason, message } => {
                format!("no longer {}; it was: {message}", reason.as_str())
            }
            Cause::FailClosed { node, message, .. } => format!("on node {node}: {message}"),
        };
        wgpin_crds::conditions::truncate(note, MAX_NOTE_BYTES)
    }

    /// The `PinnedPeer` this is about (cluster-scoped: no namespace).
    pub fn regarding(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(PinnedPeer::api_version(&()).into_owned()),
            kind: Some(PinnedPeer::kind(&()).into_owned()),
            name: Some(self.peer.clone()),
            uid: self.uid.clone(),
            ..ObjectReference::default()
        }
    }
}

/// The problem a peer's status already reports (`Stalled` True with a problem's reason): what
/// an earlier operator announced.
fn announced_in_status(peer: &PinnedPeer) -> BTreeMap<ProblemReason, String> {
    peer.status
        .iter()
        .flat_map(|status| &status.conditions)
        .filter(|c| c.type_ == wgpin_crds::conditions::STALLED && c.status == "True")
        .filter_map(|c| {
            Some((
                ProblemReason::from_condition_reason(&c.reason)?,
                c.message.clone(),
            ))
        })
        .collect()
}

/// An offending source as the planner keys it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SourceKey {
    /// The address without the port: one host trying many source ports is one source.
    Address(String),
    /// Violations of sources evicted by the cap.
    Other,
}

impl SourceKey {
    /// The key and the `address:port` as reported. The agent reports only the latest source of
    /// each (node, peer), so an increment is put down to it.
    fn of(last_source: Option<&str>) -> (Self, String) {
        let Some(source) = last_source.filter(|s| !s.is_empty()) else {
            return (Self::Address("an unknown source".into()), String::new());
        };
        let address = source
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().to_canonical().to_string())
            .or_else(|_| source.parse::<std::net::IpAddr>().map(|a| a.to_string()))
            .unwrap_or_else(|_| source.to_string());
        (Self::Address(address), source.to_string())
    }

    fn label(&self) -> String {
        match self {
            Self::Address(address) => address.clone(),
            Self::Other => OTHER_SOURCES.into(),
        }
    }
}

/// Violations from one source of one peer not yet reported, and when it was last reported.
#[derive(Clone, Debug)]
struct SourceMemory {
    pending: u64,
    latest: String,
    nodes: BTreeSet<String>,
    more_nodes: bool,
    /// The last pass that brought violations from it: the eviction order.
    last_seen: Timestamp,
    last_emitted: Option<Timestamp>,
}

impl SourceMemory {
    fn new(now: Timestamp) -> Self {
        Self {
            pending: 0,
            latest: String::new(),
            nodes: BTreeSet::new(),
            more_nodes: false,
            last_seen: now,
            last_emitted: None,
        }
    }

    fn add_node(&mut self, node: &str) {
        if self.nodes.contains(node) {
            return;
        }
        if self.nodes.len() < MAX_NODES_PER_SOURCE {
            self.nodes.insert(node.to_string());
        } else {
            self.more_nodes = true;
        }
    }

    /// Takes over an evicted source's unreported violations.
    fn absorb(&mut self, other: Self) {
        self.pending = self.pending.saturating_add(other.pending);
        self.more_nodes |= other.more_nodes;
        for node in &other.nodes {
            self.add_node(node);
        }
        if other.last_seen >= self.last_seen {
            self.last_seen = other.last_seen;
            self.latest = other.latest;
        }
    }
}

/// What the planner remembers about one peer.
#[derive(Clone, Debug, Default)]
struct PeerMemory {
    uid: Option<String>,
    /// The problems announced, with the message announced.
    problems: BTreeMap<ProblemReason, String>,
    sources: BTreeMap<SourceKey, SourceMemory>,
}

impl PeerMemory {
    fn record(&mut self, source: Option<&str>, node: &str, increment: u64, now: Timestamp) {
        let (key, latest) = SourceKey::of(source);
        if !self.sources.contains_key(&key) {
            self.make_room();
        }
        let memory = self
            .sources
            .entry(key)
            .or_insert_with(|| SourceMemory::new(now));
        memory.pending = memory.pending.saturating_add(increment);
        memory.latest = latest;
        memory.last_seen = now;
        memory.add_node(node);
    }

    /// Evicts the source seen longest ago when the cap is reached. A source in its quiet
    /// minute may lose its rate limit this way; that takes more than 64 sources in a minute.
    fn make_room(&mut self) {
        let tracked = self
            .sources
            .keys()
            .filter(|k| **k != SourceKey::Other)
            .count();
        if tracked < MAX_SOURCES_PER_PEER {
            return;
        }
        let oldest = self
            .sources
            .iter()
            .filter(|(key, _)| **key != SourceKey::Other)
            .min_by(|a, b| a.1.last_seen.cmp(&b.1.last_seen).then(a.0.cmp(b.0)))
            .map(|(key, _)| key.clone());
        if let Some(key) = oldest
            && let Some(evicted) = self.sources.remove(&key)
            && evicted.pending > 0
        {
            let now = evicted.last_seen;
            self.sources
                .entry(SourceKey::Other)
                .or_insert_with(|| SourceMemory::new(now))
                .absorb(evicted);
        }
    }
}

/// Decides which Events to write, pass after pass. Pure: no clock, no I/O.
///
/// Violation counters in the reports are cumulative per (node, peer); the planner turns them
/// into increments:
/// - the first pass only takes the counters in (a baseline): what they hold happened before
///   this planner started and may have been reported by an earlier operator, so it is not
///   replayed as a burst. A counter that first shows up in a later pass (a new node, a peer's
///   first violation, an agent that reports late) is counted in full: it cannot have been
///   reported before;
/// - a counter that goes down means the agent's state was recreated: the new value is the
///   increment;
/// - a counter that leaves the reports is forgotten (the agent's state for it is gone); if it
///   comes back, it is counted in full.
///
/// Problems: a planner that starts (an operator restart, a new leader) takes what the peer's
/// status already says as announced — the `Stalled` condition is written in the pass that
/// announces the problem — so a restart does not announce every broken peer again. A problem
/// whose status does not show it yet (it appeared during the restart) is announced.
#[derive(Clone, Debug)]
pub struct EventPlanner {
    window: SignedDuration,
    primed: bool,
    peers: BTreeMap<String, PeerMemory>,
    /// The last cumulative violation count per (node, peer).
    counters: BTreeMap<(String, String), u64>,
}

impl Default for EventPlanner {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW)
    }
}

impl EventPlanner {
    /// A planner that writes at most one Event per (peer, source) per `window`.
    pub fn new(window: std::time::Duration) -> Self {
        Self {
            window: SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX),
            primed: false,
            peers: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }

    /// The Events this pass calls for, in peer-name order (problems, then violations by
    /// source). Call it once per pass with everything; it remembers what it announced.
    pub fn plan<P: Borrow<PinnedPeer>>(&mut self, input: &PassInput<'_, P>) -> Vec<PlannedEvent> {
        let now = input.now.0;
        let existing: BTreeMap<String, &PinnedPeer> = input
            .peers
            .iter()
            .map(|peer| (peer.borrow().name_any(), peer.borrow()))
            .collect();
        self.forget_departed(&existing);
        self.count_violations(input.reports, &existing, now);

        let mut problems: BTreeMap<&str, BTreeMap<ProblemReason, String>> = BTreeMap::new();
        for problem in input.problems.iter().filter(|p| p.kind == "PinnedPeer") {
            problems
                .entry(problem.name.as_str())
                .or_default()
                .entry(problem.reason)
                .and_modify(|message| {
                    message.push_str("; ");
                    message.push_str(&problem.message);
                })
                .or_insert_with(|| problem.message.clone());
        }

        let mut planned = Vec::new();
        let window = self.window;
        for (name, memory) in &mut self.peers {
            let uid = memory.uid.clone();
            let event = |cause| PlannedEvent {
                peer: name.clone(),
                uid: uid.clone(),
                cause,
            };
            let current = problems.remove(name.as_str()).unwrap_or_default();
            for (reason, message) in &current {
                if memory.problems.get(reason) != Some(message) {
                    planned.push(event(Cause::Problem {
                        reason: *reason,
                        message: message.clone(),
                    }));
                }
            }
            for (reason, message) in &memory.problems {
                if !current.contains_key(reason) {
                    planned.push(event(Cause::Resolved {
                        reason: *reason,
                        message: message.clone(),
                    }));
                }
            }
            memory.problems = current;

            let mut due = Vec::new();
            for (key, source) in &mut memory.sources {
                if source.pending == 0 || !quiet(source.last_emitted, now, window) {
                    continue;
                }
                due.push(Cause::Violations {
                    source: key.label(),
                    latest: source.latest.clone(),
                    count: source.pending,
                    nodes: source.nodes.iter().cloned().collect(),
                    more_nodes: source.more_nodes,
                });
                source.pending = 0;
                source.nodes.clear();
                source.more_nodes = false;
                source.last_emitted = Some(now);
            }
            planned.extend(due.into_iter().map(&event));
            // A source with nothing pending and its window over is the same as one never seen.
            memory
                .sources
                .retain(|_, s| s.pending > 0 || !quiet(s.last_emitted, now, window));
        }
        self.primed = true;
        planned
    }

    /// When the earliest carried violation may be reported: a pass then writes its Event
    /// (without one, it waits for the next pass). `None` when nothing is carried.
    pub fn next_due(&self) -> Option<Time> {
        self.peers
            .values()
            .flat_map(|peer| peer.sources.values())
            .filter(|source| source.pending > 0)
            .filter_map(|source| match source.last_emitted {
                Some(at) => at.checked_add(self.window).ok(),
                None => Some(source.last_seen),
            })
            .min()
            .map(Time)
    }

    /// Drops everything about peers that no longer exist, and about an older object under a
    /// reused name (a new uid).
    fn forget_departed(&mut self, existing: &BTreeMap<String, &PinnedPeer>) {
        self.peers.retain(|name, _| existing.contains_key(name));
        self.counters
            .retain(|(_, peer), _| existing.contains_key(peer));
        let starting = !self.primed;
        for (name, peer) in existing {
            let uid = peer.metadata.uid.clone();
            let memory = self.peers.entry(name.clone()).or_default();
            if memory.uid != uid {
                *memory = PeerMemory {
                    uid,
                    ..PeerMemory::default()
                };
            }
            if starting {
                memory.problems = announced_in_status(peer);
            }
        }
    }

    fn count_violations(
        &mut self,
        reports: &BTreeMap<String, PinnedNodeStateStatus>,
        existing: &BTreeMap<String, &PinnedPeer>,
        now: Timestamp,
    ) {
        let mut counters = BTreeMap::new();
        for (node, report) in reports {
            for interface in &report.interfaces {
                for entry in &interface.peers {
                    // Only the peer's current interface counts, as in the roll-up.
                    let Some(peer) = existing.get(&entry.name) else {
                        continue;
                    };
                    if interface.name != peer.spec.interface {
                        continue;
                    }
                    let key = (node.clone(), entry.name.clone());
                    if counters.contains_key(&key) {
                        continue;
                    }
                    let count = entry.violations.as_ref().map_or(0, |v| v.count);
                    let increment = match self.counters.get(&key) {
                        _ if !self.primed => 0,
                        None => count,
                        Some(&last) if count >= last => count - last,
                        Some(&last) => {
                            tracing::debug!(
                                peer = %entry.name,
                                node = %node,
                                last,
                                count,
                                "the violation counter went down: the agent's state was recreated"
                            );
                            count
                        }
                    };
                    if increment > 0
                        && let Some(memory) = self.peers.get_mut(&entry.name)
                    {
                        let source = entry
                            .violations
                            .as_ref()
                            .and_then(|v| v.last_source.as_deref());
                        memory.record(source, node, increment, now);
                    }
                    counters.insert(key, count);
                }
            }
        }
        self.counters = counters;
    }
}

/// Whether the window since the last Event is over. A clock that went back counts as over, so
/// that nothing waits on it.
fn quiet(last_emitted: Option<Timestamp>, now: Timestamp, window: SignedDuration) -> bool {
    last_emitted.is_none_or(|at| {
        let since = now.duration_since(at);
        since.is_negative() || since >= window
    })
}

/// Where and as whom Events are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSettings {
    /// Namespace of the Events (`PinnedPeer` itself has none).
    pub namespace: String,
    pub reporting_controller: String,
    /// Which replica wrote it: the pod name.
    pub reporting_instance: String,
}

impl EventSettings {
    /// Events in "default", from `wgpin.io/operator`, written by `reporting_instance`.
    pub fn new(reporting_instance: impl Into<String>) -> Self {
        Self {
            namespace: DEFAULT_EVENT_NAMESPACE.into(),
            reporting_controller: REPORTING_CONTROLLER.into(),
            reporting_instance: reporting_instance.into(),
        }
    }

    /// The Event object for `planned`, observed at `now`. Named by the API server
    /// (`generateName`), so two Events of one peer in one instant cannot collide.
    pub fn event(&self, planned: &PlannedEvent, now: &Time) -> K8sEvent {
        let type_ = match planned.type_() {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        K8sEvent {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", planned.peer)),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now.0)),
            type_: Some(type_.into()),
            reason: Some(planned.reason().into()),
            action: Some(planned.action().into()),
            note: Some(planned.note()),
            regarding: Some(planned.regarding()),
            reporting_controller: Some(self.reporting_controller.clone()),
            reporting_instance: Some(
                self.reporting_instance
                    .chars()
                    .take(MAX_REPORTING_INSTANCE)
                    .collect(),
            ),
            ..K8sEvent::default()
        }
    }
}

/// What [`EventWriter::publish`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub written: usize,
    /// Refused writes, logged and dropped (Events are best-effort): export it as a metric.
    pub failed: usize,
}

/// Writes planned Events through the API.
#[derive(Clone)]
pub struct EventWriter {
    api: Api<K8sEvent>,
    settings: EventSettings,
}

impl EventWriter {
    pub fn new(client: Client, settings: EventSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    pub fn settings(&self) -> &EventSettings {
        &self.settings
    }

    /// Writes each Event, one after the other. A refused write is logged and counted, never
    /// returned: Events are best-effort and must not fail the pass. Not retried either: the
    /// counts it carried are still in the peer's status.
    pub async fn publish(&self, planned: &[PlannedEvent], now: &Time) -> PublishReport {
        let mut report = PublishReport::default();
        for event in planned {
            let nodes = match &event.cause {
                Cause::Violations { nodes, .. } => nodes.join(","),
                Cause::FailClosed { node, .. } => node.clone(),
                Cause::Problem { .. } | Cause::Resolved { .. } => String::new(),
            };
            let span = tracing::info_span!(
                "event",
                peer = %event.peer,
                reason = event.reason(),
                node = %nodes,
            );
            let object = self.settings.event(event, now);
            match self
                .api
                .create(&PostParams::default(), &object)
                .instrument(span.clone())
                .await
            {
                Ok(_) => {
                    report.written += 1;
                    span.in_scope(|| tracing::debug!("wrote an Event"));
                }
                Err(error) => {
                    report.failed += 1;
                    span.in_scope(|| {
                        tracing::warn!(%error, "could not write an Event; dropped, the pass goes on");
                    });
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{
        EnforcementState, InterfaceStatus, PeerEnforcementStatus, PinnedPeerSpec, ViolationSummary,
    };

    use super::*;

    const T0: i64 = 1_700_000_000;
    /// An offending source.
    const X: &str = "198.51.100.7:40000";

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(T0 + seconds).expect("timestamp"))
    }

    fn peer(name: &str, uid: &str) -> PinnedPeer {
        let mut peer = PinnedPeer::new(
            name,
            PinnedPeerSpec {
                interface: "gateway".into(),
                node_selector: None,
                public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                allowed_ips: vec!["198.51.100.2/32".into()],
                sources: vec!["203.0.113.0/24".into()],
                allow_any_source: false,
                endpoint: None,
                persistent_keepalive_seconds: None,
                preshared_key_secret_ref: None,
            },
        );
        peer.metadata.uid = Some(uid.into());
        peer
    }

    fn peers() -> Vec<PinnedPeer> {
        vec![peer("alice", "uid-alice"), peer("bob", "uid-bob")]
    }

    /// (node, peer, cumulative count, latest source); count `None` means no violations field.
    type Row<'a> = (&'a str, &'a str, Option<u64>, &'a str);

    fn reports(rows: &[Row<'_>]) -> BTreeMap<String, PinnedNodeStateStatus> {
        let mut out: BTreeMap<String, PinnedNodeStateStatus> = BTreeMap::new();
        for (node, name, count, source) in rows {
            let status = out.entry(node.to_string()).or_default();
            if status.interfaces.is_empty() {
                status.interfaces.push(InterfaceStatus {
                    name: "gateway".into(),
                    mode_fallback: None,
                    mode: None,
                    backend: None,
                    fast_path: None,
                    public_key: None,
                    peers: Vec::new(),
                });
            }
            status.interfaces[0].peers.push(PeerEnforcementStatus {
                name: name.to_string(),
                state: EnforcementState::Enforced,
                observed_generation: None,
                listen_port: None,
                endpoint: None,
                last_handshake_time: None,
                rx_bytes: None,
                tx_bytes: None,
                violations: count.map(|count| ViolationSummary {
                    count,
                    last_source: (!source.is_empty()).then(|| source.to_string()),
                    last_node: None,
                    last_time: None,
                }),
                message: None,
            });
        }
        out
    }

    fn problem(name: &str, reason: ProblemReason, message: &str) -> Problem {
        Problem {
            kind: "PinnedPeer",
            name: name.into(),
            reason,
            message: message.into(),
        }
    }

    /// A compact line per Event, for tables.
    fn line(event: &PlannedEvent) -> String {
        match &event.cause {
            Cause::Violations {
                source,
                count,
                nodes,
                more_nodes,
                ..
            } => format!(
                "{} Warning SourceViolation {source} x{count} on {}{}",
                event.peer,
                nodes.join(","),
                if *more_nodes { "+" } else { "" }
            ),
            Cause::Problem { reason, message } => {
                format!("{} Warning {} {message}", event.peer, reason.as_str())
            }
            Cause::Resolved { reason, .. } => {
                format!("{} Normal Resolved {}", event.peer, reason.as_str())
            }
            Cause::FailClosed { node, action, .. } => {
                format!("{} {} on {node}", event.peer, action.reason())
            }
        }
    }

    /// One pass of a table: when, what the agents report, what render found, what is expected.
    struct Step<'a> {
        at: i64,
        rows: &'a [Row<'a>],
        problems: &'a [(&'a str, ProblemReason, &'a str)],
        expect: &'a [&'a str],
    }

    fn step<'a>(at: i64, rows: &'a [Row<'a>], expect: &'a [&'a str]) -> Step<'a> {
        Step {
            at,
            rows,
            problems: &[],
            expect,
        }
    }

    fn run(planner: &mut EventPlanner, peers: &[PinnedPeer], steps: &[Step<'_>]) {
        for (i, step) in steps.iter().enumerate() {
            let reports = reports(step.rows);
            let problems: Vec<Problem> = step
                .problems
                .iter()
                .map(|(name, reason, message)| problem(name, *reason, message))
                .collect();
            let now = at(step.at);
            let planned = planner.plan(&PassInput {
                peers,
                reports: &reports,
                problems: &problems,
                now: &now,
            });
            let lines: Vec<String> = planned.iter().map(line).collect();
            assert_eq!(lines, step.expect, "step {i} at +{}s", step.at);
        }
    }

    #[test]
    fn violations_are_rate_limited_per_peer_and_source_and_carried_over() {
        let cases: &[(&str, &[Step<'_>])] = &[
            (
                "the first pass is a baseline, then one event, repeats carried to the next minute",
                &[
                    step(0, &[("gw-a", "alice", Some(100), X)], &[]),
                    step(
                        5,
                        &[("gw-a", "alice", Some(103), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x3 on gw-a"],
                    ),
                    step(20, &[("gw-a", "alice", Some(110), X)], &[]),
                    step(64, &[("gw-a", "alice", Some(111), X)], &[]),
                    step(
                        65,
                        &[("gw-a", "alice", Some(111), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x8 on gw-a"],
                    ),
                    step(70, &[("gw-a", "alice", Some(111), X)], &[]),
                    step(
                        200,
                        &[("gw-a", "alice", Some(112), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x1 on gw-a"],
                    ),
                ],
            ),
            (
                "two sources, two events; one source from two nodes, one event",
                &[
                    step(0, &[], &[]),
                    step(
                        1,
                        &[
                            ("gw-a", "alice", Some(2), X),
                            ("gw-b", "alice", Some(3), "192.0.2.9:1000"),
                        ],
                        &[
                            "alice Warning SourceViolation 192.0.2.9 x3 on gw-b",
                            "alice Warning SourceViolation 198.51.100.7 x2 on gw-a",
                        ],
                    ),
                    step(
                        61,
                        &[
                            ("gw-a", "alice", Some(4), X),
                            ("gw-b", "alice", Some(8), "198.51.100.7:555"),
                            ("gw-b", "bob", Some(1), X),
                        ],
                        &[
                            "alice Warning SourceViolation 198.51.100.7 x7 on gw-a,gw-b",
                            "bob Warning SourceViolation 198.51.100.7 x1 on gw-b",
                        ],
                    ),
                ],
            ),
            (
                "a counter that goes down was recreated: its new value is the increment",
                &[
                    step(0, &[("gw-a", "alice", Some(10), X)], &[]),
                    step(
                        1,
                        &[("gw-a", "alice", Some(3), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x3 on gw-a"],
                    ),
                    step(
                        100,
                        &[("gw-a", "alice", Some(5), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x2 on gw-a"],
                    ),
                ],
            ),
            (
                "a counter first seen after the first pass, or back after leaving, counts in full",
                &[
                    step(0, &[("gw-a", "alice", None, "")], &[]),
                    step(
                        1,
                        &[
                            ("gw-a", "alice", Some(4), X),
                            ("gw-new", "alice", Some(2), "192.0.2.1:9"),
                        ],
                        &[
                            "alice Warning SourceViolation 192.0.2.1 x2 on gw-new",
                            "alice Warning SourceViolation 198.51.100.7 x4 on gw-a",
                        ],
                    ),
                    step(100, &[("gw-a", "alice", Some(4), X)], &[]),
                    step(
                        200,
                        &[
                            ("gw-a", "alice", Some(4), X),
                            ("gw-new", "alice", Some(2), "192.0.2.1:9"),
                        ],
                        &["alice Warning SourceViolation 192.0.2.1 x2 on gw-new"],
                    ),
                ],
            ),
            (
                "no source reported, and IPv6 sources keyed by address",
                &[
                    step(0, &[], &[]),
                    step(
                        1,
                        &[
                            ("gw-a", "alice", Some(1), ""),
                            ("gw-b", "alice", Some(2), "[2001:db8::1]:51820"),
                        ],
                        &[
                            "alice Warning SourceViolation 2001:db8::1 x2 on gw-b",
                            "alice Warning SourceViolation an unknown source x1 on gw-a",
                        ],
                    ),
                ],
            ),
            (
                "a clock that goes back does not hold violations back",
                &[
                    step(0, &[], &[]),
                    step(
                        100,
                        &[("gw-a", "alice", Some(1), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x1 on gw-a"],
                    ),
                    step(
                        50,
                        &[("gw-a", "alice", Some(2), X)],
                        &["alice Warning SourceViolation 198.51.100.7 x1 on gw-a"],
                    ),
                ],
            ),
        ];
        for (name, steps) in cases {
            eprintln!("case: {name}");
            run(&mut EventPlanner::default(), &peers(), steps);
        }
    }

    #[test]
    fn problems_are_announced_once_per_message_and_resolved_once() {
        let moved = (
            "alice",
            ProblemReason::InterfaceNotFound,
            "spec.interface names PinnedInterface \"gw\", which does not exist",
        );
        let moved_again = (
            "alice",
            ProblemReason::InterfaceNotFound,
            "spec.interface names PinnedInterface \"gw2\", which does not exist",
        );
        let duplicate = (
            "alice",
            ProblemReason::DuplicatePublicKey,
            "PinnedPeer \"bob\" is older",
        );
        let interface = Problem {
            kind: "PinnedInterface",
            name: "alice".into(),
            reason: ProblemReason::InvalidSpec,
            message: "not about the peer".into(),
        };
        let unknown = ("carol", ProblemReason::InvalidSpec, "no such peer");
        let steps = [
            Step {
                at: 0,
                rows: &[],
                problems: &[moved, unknown],
                expect: &[
                    "alice Warning InterfaceNotFound spec.interface names PinnedInterface \"gw\", which does not exist",
                ],
            },
            Step {
                at: 1,
                rows: &[],
                problems: &[moved],
                expect: &[],
            },
            Step {
                at: 2,
                rows: &[],
                problems: &[moved_again],
                expect: &[
                    "alice Warning InterfaceNotFound spec.interface names PinnedInterface \"gw2\", which does not exist",
                ],
            },
            Step {
                at: 3,
                rows: &[],
                problems: &[duplicate],
                expect: &[
                    "alice Warning DuplicatePublicKey PinnedPeer \"bob\" is older",
                    "alice Normal Resolved InterfaceNotFound",
                ],
            },
            Step {
                at: 4,
                rows: &[],
                problems: &[],
                expect: &["alice Normal Resolved DuplicatePublicKey"],
            },
            Step {
                at: 5,
                rows: &[],
                problems: &[],
                expect: &[],
            },
        ];
        let mut planner = EventPlanner::default();
        run(&mut planner, &peers(), &steps);

        // Problems of other kinds are not about a PinnedPeer.
        let now = at(10);
        let planned = planner.plan(&PassInput {
            peers: &peers(),
            reports: &BTreeMap::new(),
            problems: &[interface],
            now: &now,
        });
        assert!(planned.is_empty(), "{planned:?}");
    }

    #[test]
    fn two_problems_of_one_reason_make_one_event() {
        let mut planner = EventPlanner::default();
        let now = at(0);
        let planned = planner.plan(&PassInput {
            peers: &peers(),
            reports: &BTreeMap::new(),
            problems: &[
                problem("bob", ProblemReason::InvalidSpec, "sources is empty"),
                problem("bob", ProblemReason::InvalidSpec, "allowedIPs is empty"),
            ],
            now: &now,
        });
        assert_eq!(planned.len(), 1);
        assert_eq!(
            planned[0].note(),
            "sources is empty; allowedIPs is empty",
            "{planned:?}"
        );
        assert_eq!(planned[0].reason(), "InvalidSpec");
        assert_eq!(planned[0].type_(), EventType::Warning);
        assert_eq!(planned[0].action(), "Render");
    }

    #[test]
    fn removed_peers_are_forgotten_and_a_new_object_starts_afresh() {
        let mut planner = EventPlanner::default();
        let both = peers();
        let broken = [("bob", ProblemReason::InvalidSpec, "sources is empty")];
        run(
            &mut planner,
            &both,
            &[
                Step {
                    at: 0,
                    rows: &[("gw-a", "bob", Some(1), X)],
                    problems: &broken,
                    expect: &["bob Warning InvalidSpec sources is empty"],
                },
                Step {
                    at: 1,
                    rows: &[("gw-a", "bob", Some(2), X)],
                    problems: &broken,
                    expect: &["bob Warning SourceViolation 198.51.100.7 x1 on gw-a"],
                },
                // Carried: inside bob's minute.
                Step {
                    at: 2,
                    rows: &[("gw-a", "bob", Some(5), X)],
                    problems: &broken,
                    expect: &[],
                },
            ],
        );
        assert!(planner.peers.contains_key("bob"));
        assert!(planner.next_due().is_some());

        // Bob goes: no Resolved, no carried violations, nothing kept.
        let only_alice = [peer("alice", "uid-alice")];
        run(
            &mut planner,
            &only_alice,
            &[step(3, &[("gw-a", "bob", Some(6), X)], &[])],
        );
        assert!(!planner.peers.contains_key("bob"));
        assert!(planner.counters.keys().all(|(_, peer)| peer != "bob"));
        assert_eq!(planner.next_due(), None);

        // A new bob (another uid): its problem is news, its counter is counted in full.
        let new_bob = [peer("alice", "uid-alice"), peer("bob", "uid-bob-2")];
        run(
            &mut planner,
            &new_bob,
            &[Step {
                at: 4,
                rows: &[("gw-a", "bob", Some(2), X)],
                problems: &broken,
                expect: &[
                    "bob Warning InvalidSpec sources is empty",
                    "bob Warning SourceViolation 198.51.100.7 x2 on gw-a",
                ],
            }],
        );
        // Same name, new uid, without a pass in between: memory of the old one is dropped too.
        let newer_bob = [peer("alice", "uid-alice"), peer("bob", "uid-bob-3")];
        run(
            &mut planner,
            &newer_bob,
            &[Step {
                at: 5,
                rows: &[("gw-a", "bob", Some(2), X)],
                problems: &broken,
                expect: &["bob Warning InvalidSpec sources is empty"],
            }],
        );
        assert_eq!(
            planner.peers.get("bob").and_then(|p| p.uid.as_deref()),
            Some("uid-bob-3")
        );
    }

    #[test]
    fn reports_of_unknown_peers_and_other_interfaces_are_ignored() {
        let mut planner = EventPlanner::default();
        run(&mut planner, &peers(), &[step(0, &[], &[])]);
        let mut reports = reports(&[("gw-a", "carol", Some(5), "192.0.2.1:1")]);
        reports
            .get_mut("gw-a")
            .expect("gw-a")
            .interfaces
            .push(InterfaceStatus {
                name: "elsewhere".into(),
                mode_fallback: None,
                mode: None,
                backend: None,
                fast_path: None,
                public_key: None,
                peers: reports_row("alice", 9),
            });
        let now = at(1);
        let planned = planner.plan(&PassInput {
            peers: &peers(),
            reports: &reports,
            problems: &[],
            now: &now,
        });
        assert!(planned.is_empty(), "{planned:?}");
        assert!(planner.counters.is_empty(), "{:?}", planner.counters);
    }

    fn reports_row(name: &str, count: u64) -> Vec<PeerEnforcementStatus> {
        reports(&[("n", name, Some(count), "192.0.2.1:1")])
            .remove("n")
            .expect("n")
            .interfaces
            .remove(0)
            .peers
    }

    #[test]
    fn quiet_sources_are_forgotten() {
        let mut planner = EventPlanner::default();
        run(
            &mut planner,
            &peers(),
            &[
                step(0, &[], &[]),
                step(
                    1,
                    &[("gw-a", "alice", Some(1), X)],
                    &["alice Warning SourceViolation 198.51.100.7 x1 on gw-a"],
                ),
            ],
        );
        assert_eq!(
            planner.peers["alice"].sources.len(),
            1,
            "in its quiet minute"
        );
        run(
            &mut planner,
            &peers(),
            &[step(61, &[("gw-a", "alice", Some(1), X)], &[])],
        );
        assert!(planner.peers["alice"].sources.is_empty());
    }

    #[test]
    fn next_due_is_the_end_of_the_window_of_the_earliest_carried_source() {
        let mut planner = EventPlanner::default();
        run(
            &mut planner,
            &peers(),
            &[
                step(0, &[], &[]),
                step(
                    10,
                    &[("gw-a", "alice", Some(1), X)],
                    &["alice Warning SourceViolation 198.51.100.7 x1 on gw-a"],
                ),
            ],
        );
        assert_eq!(planner.next_due(), None, "nothing carried");
        run(
            &mut planner,
            &peers(),
            &[step(30, &[("gw-a", "alice", Some(3), X)], &[])],
        );
        assert_eq!(planner.next_due(), Some(at(70)));
    }

    #[test]
    fn sources_beyond_the_cap_fold_into_other_sources_and_nothing_is_lost() {
        let mut planner = EventPlanner::default();
        let extra = 6;
        let nodes: Vec<String> = (0..MAX_SOURCES_PER_PEER + extra)
            .map(|i| format!("n{i:03}"))
            .collect();
        let sources: Vec<String> = (0..nodes.len())
            .map(|i| format!("10.0.{}.{}:1000", i / 256, i % 256))
            .collect();
        let baseline: Vec<Row<'_>> = nodes
            .iter()
            .map(|n| (n.as_str(), "alice", Some(0), ""))
            .collect();
        let hits: Vec<Row<'_>> = nodes
            .iter()
            .zip(&sources)
            .map(|(n, s)| (n.as_str(), "alice", Some(1), s.as_str()))
            .collect();
        let peers = peers();
        let mut pass = |rows: &[Row<'_>], now: Time| {
            let reports = reports(rows);
            planner.plan(&PassInput {
                peers: &peers,
                reports: &reports,
                problems: &[],
                now: &now,
            })
        };
        assert!(pass(&baseline, at(0)).is_empty());
        let planned = pass(&hits, at(1));
        assert_eq!(
            planned.len(),
            MAX_SOURCES_PER_PEER + 1,
            "64 sources and the rest"
        );
        let total: u64 = planned
            .iter()
            .map(|e| match e.cause {
                Cause::Violations { count, .. } => count,
                _ => 0,
            })
            .sum();
        assert_eq!(total, nodes.len() as u64, "every violation is in an event");
        let other = planned
            .iter()
            .find(
                |e| matches!(&e.cause, Cause::Violations { source, .. } if source == OTHER_SOURCES),
            )
            .expect("an event for the other sources");
        let Cause::Violations {
            count,
            nodes: seen_on,
            more_nodes,
            ..
        } = &other.cause
        else {
            unreachable!()
        };
        assert_eq!(*count, extra as u64);
        assert_eq!(seen_on.len(), extra, "{seen_on:?}");
        assert!(!more_nodes);
        assert!(other.note().starts_with("6 violations from other sources"));
        let tracked = &planner.peers["alice"].sources;
        assert_eq!(tracked.len(), MAX_SOURCES_PER_PEER + 1);
        // The evicted ones were seen first; in one pass, ties go by key (string order).
        assert!(!tracked.contains_key(&SourceKey::Address("10.0.0.0".into())));
        assert!(tracked.contains_key(&SourceKey::Address("10.0.0.69".into())));
    }

    #[test]
    fn the_source_seen_longest_ago_is_evicted_into_other_sources() {
        let mut memory = PeerMemory::default();
        for i in 0..MAX_SOURCES_PER_PEER {
            // 10.0.0.0 is seen last, so it stays; 10.0.0.1 is the oldest.
            let seen = if i == 0 { 1_000 } else { i as i64 };
            let source = format!("10.0.0.{i}:1");
            memory.record(Some(&source), "gw-a", 1, at(seen).0);
        }
        memory.record(Some("192.0.2.1:1"), "gw-b", 5, at(2_000).0);
        assert_eq!(memory.sources.len(), MAX_SOURCES_PER_PEER + 1);
        assert!(
            !memory
                .sources
                .contains_key(&SourceKey::Address("10.0.0.1".into()))
        );
        assert!(
            memory
                .sources
                .contains_key(&SourceKey::Address("10.0.0.0".into()))
        );
        let other = &memory.sources[&SourceKey::Other];
        assert_eq!(other.pending, 1);
        assert_eq!(other.latest, "10.0.0.1:1");
        assert_eq!(other.nodes, BTreeSet::from(["gw-a".to_string()]));
        // "other sources" is never evicted and does not count against the cap.
        memory.record(Some("192.0.2.2:1"), "gw-b", 1, at(2_001).0);
        assert_eq!(memory.sources.len(), MAX_SOURCES_PER_PEER + 1);
        assert_eq!(memory.sources[&SourceKey::Other].pending, 2);
    }

    #[test]
    fn notes_carry_count_source_and_nodes_and_stay_under_the_limit() {
        let event = PlannedEvent {
            peer: "alice".into(),
            uid: Some("uid-alice".into()),
            cause: Cause::Violations {
                source: "198.51.100.7".into(),
                latest: "198.51.100.7:40000".into(),
                count: 12,
                nodes: vec!["gw-a".into(), "gw-b".into()],
                more_nodes: true,
            },
        };
        assert_eq!(
            event.note(),
            "12 violations from 198.51.100.7 (latest 198.51.100.7:40000) since the last event for this source, on nodes gw-a, gw-b and others: the peer's key was used from outside spec.sources and refused; if that was not the peer, its key may be stolen"
        );
        assert_eq!(event.reason(), "SourceViolation");
        assert_eq!(event.action(), "EnforcePin");
        let regarding = event.regarding();
        assert_eq!(regarding.api_version.as_deref(), Some("wgpin.io/v1alpha1"));
        assert_eq!(regarding.kind.as_deref(), Some("PinnedPeer"));
        assert_eq!(regarding.name.as_deref(), Some("alice"));
        assert_eq!(regarding.uid.as_deref(), Some("uid-alice"));
        assert_eq!(regarding.namespace, None);

        let resolved = PlannedEvent {
            cause: Cause::Resolved {
                reason: ProblemReason::OverlappingAllowedIPs,
                message: "é".repeat(2000),
            },
            ..event.clone()
        };
        let note = resolved.note();
        assert!(note.len() <= MAX_NOTE_BYTES, "{}", note.len());
        assert!(note.starts_with("no longer OverlappingAllowedIPs; it was: é"));
        assert!(note.ends_with('…'));
        assert_eq!(resolved.type_(), EventType::Normal);
        assert_eq!(resolved.reason(), "Resolved");
    }

    #[test]
    fn the_event_object_is_complete() {
        let settings = EventSettings {
            namespace: "wgpin-system".into(),
            ..EventSettings::new("operator-7d9f-abcde")
        };
        let planned = PlannedEvent {
            peer: "alice".into(),
            uid: Some("uid-alice".into()),
            cause: Cause::Problem {
                reason: ProblemReason::DuplicatePublicKey,
                message: "PinnedPeer \"bob\" is older".into(),
            },
        };
        let event = settings.event(&planned, &at(0));
        assert_eq!(event.metadata.generate_name.as_deref(), Some("alice."));
        assert_eq!(event.metadata.name, None);
        assert_eq!(event.metadata.namespace.as_deref(), Some("wgpin-system"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("DuplicatePublicKey"));
        assert_eq!(event.action.as_deref(), Some("Render"));
        assert_eq!(event.note.as_deref(), Some("PinnedPeer \"bob\" is older"));
        assert_eq!(
            event.reporting_controller.as_deref(),
            Some("wgpin.io/operator")
        );
        assert_eq!(
            event.reporting_instance.as_deref(),
            Some("operator-7d9f-abcde")
        );
        assert_eq!(event.event_time, Some(MicroTime(at(0).0)));
        assert_eq!(event.regarding, Some(planned.regarding()));
        assert_eq!(event.series, None);
    }
}
