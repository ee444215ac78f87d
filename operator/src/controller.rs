//! The controller: one pass over a snapshot of every input, and the loop that keeps it current.
//!
//! A pass is the pipeline dereference → render → apply → status:
//! - dereference: a [`Snapshot`] of `PinnedInterface`s, `PinnedPeer`s, `Node`s and
//!   `PinnedNodeState`s, from the loop's watch caches (or a fresh list, [`reconcile_all`]);
//! - render: pure ([`crate::render`]), so the same inputs always give the same node states and
//!   dedicated ports;
//! - apply: server-side apply of each changed `PinnedNodeState` under [`FIELD_MANAGER`], delete
//!   the states of nodes that run nothing, and the cleanup finalizer on `PinnedPeer`s;
//! - status: the agents' reports rolled up into each `PinnedPeer` ([`crate::roll_up`]).
//!
//! A pass writes only what differs, so one changed peer costs a write per node it runs on plus
//! its own status. The loop's caches may lag behind its own writes; a memo of what was written
//! since the cache's version keeps the next pass from writing the same thing twice.
//!
//! Deleting a `PinnedPeer` is the one thing that needs a finalizer ([`CLEANUP_FINALIZER`]): the
//! peer leaves every node's spec first, and the finalizer goes only when no agent reports it any
//! longer (or its node is gone), so `kubectl delete` returns once the key is off every node. An
//! agent that never answers holds a deletion for at most [`ControllerSettings::cleanup_grace`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use tracing::Instrument as _;
use wgpin_crds::{
    PinnedInterface, PinnedInterfaceStatus, PinnedNodeState, PinnedNodeStateSpec,
    PinnedNodeStateStatus, PinnedPeer, PinnedPeerStatus,
    conditions::{READY, STALLED},
    k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time},
    kube::{
        Api, Client, Resource, ResourceExt,
        api::{DeleteParams, ListParams, Patch, PatchParams},
        core::PartialObjectMeta,
        runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
    },
};

use crate::{
    NodeInfo, PortAssignments, RollUpInput,
    events::{EventPlanner, EventSettings, EventWriter, PassInput},
    interface_status::interface_status,
    metrics::{ErrorReason, Metrics, PassResult, WriteKind},
    render, roll_up,
};

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "wgpin-operator";
/// Label on the `PinnedNodeState`s the operator owns.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "wgpin-operator");
/// Held on every `PinnedPeer` until its key is off every node.
pub const CLEANUP_FINALIZER: &str = "wgpin.io/node-cleanup";

/// What a pass wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub node_states_applied: Vec<String>,
    pub node_states_deleted: Vec<String>,
    pub peer_statuses_written: Vec<String>,
    pub interface_statuses_written: Vec<String>,
    pub finalizers_added: Vec<String>,
    /// Deleted peers let go, each with the nodes that had not confirmed the removal (empty when
    /// all had; non-empty only after the cleanup grace ran out).
    pub finalizers_removed: Vec<(String, Vec<String>)>,
    /// Events written (violations, invalid specs), rate-limited by [`EventPlanner`].
    pub events_written: usize,
}

impl PassReport {
    pub fn writes(&self) -> usize {
        self.node_states_applied.len()
            + self.node_states_deleted.len()
            + self.peer_statuses_written.len()
            + self.interface_statuses_written.len()
            + self.finalizers_added.len()
            + self.finalizers_removed.len()
            + self.events_written
    }
}

/// Why a pass failed; the message says which call, and the reason is a bounded metric label.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ControllerError {
    pub what: String,
    pub reason: ErrorReason,
    #[source]
    pub source: wgpin_crds::kube::Error,
}

fn api_err(
    reason: ErrorReason,
    what: impl Into<String>,
) -> impl FnOnce(wgpin_crds::kube::Error) -> ControllerError {
    let what = what.into();
    move |source| ControllerError {
        what,
        reason,
        source,
    }
}

/// Every input of a pass.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub interfaces: Vec<Arc<PinnedInterface>>,
    pub peers: Vec<Arc<PinnedPeer>>,
    pub nodes: Vec<NodeInfo>,
    pub states: BTreeMap<String, Arc<PinnedNodeState>>,
}

/// A node's name and labels, from a `Node` or its metadata only.
fn node_info(node: &impl ResourceExt) -> NodeInfo {
    NodeInfo {
        name: node.name_any(),
        labels: node.labels().clone(),
    }
}

impl Snapshot {
    /// Lists everything from the API.
    pub async fn list(client: &Client) -> Result<Self, ControllerError> {
        let all = ListParams::default();
        let read = |what: &str| api_err(ErrorReason::Read, format!("listing {what}"));
        Ok(Self {
            interfaces: Api::<PinnedInterface>::all(client.clone())
                .list(&all)
                .await
                .map_err(read("PinnedInterfaces"))?
                .items
                .into_iter()
                .map(Arc::new)
                .collect(),
            peers: Api::<PinnedPeer>::all(client.clone())
                .list(&all)
                .await
                .map_err(read("PinnedPeers"))?
                .items
                .into_iter()
                .map(Arc::new)
                .collect(),
            nodes: Api::<Node>::all(client.clone())
                .list(&all)
                .await
                .map_err(read("Nodes"))?
                .items
                .iter()
                .map(node_info)
                .collect(),
            states: Api::<PinnedNodeState>::all(client.clone())
                .list(&all)
                .await
                .map_err(read("PinnedNodeStates"))?
                .items
                .into_iter()
                .map(|state| (state.name_any(), Arc::new(state)))
                .collect(),
        })
    }
}

/// What this controller wrote recently, by object name. The watch caches lag behind our own
/// writes, and an object written twice in a row (a finalizer, then a status) shows the first
/// write before the second. Until the cache shows what we wrote, or [`MEMO_TTL`] has passed,
/// the memo is the truth; after that the cache is, so a change made by someone else is repaired.
struct WriteMemo<T> {
    entries: HashMap<String, (Instant, T)>,
}

/// How long the memo outranks the cache: far longer than a watch takes to deliver our own
/// write, short enough that an outside edit of an object we wrote is repaired soon.
const MEMO_TTL: Duration = Duration::from_secs(10);

impl<T> Default for WriteMemo<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<T> WriteMemo<T> {
    /// What we wrote, unless the cache has caught up (`cache_shows` says so) or it is old.
    fn pending(&mut self, name: &str, cache_shows: impl FnOnce(&T) -> bool) -> Option<&T> {
        let stale = self
            .entries
            .get(name)
            .is_some_and(|(at, written)| at.elapsed() >= MEMO_TTL || cache_shows(written));
        if stale {
            self.entries.remove(name);
        }
        self.entries.get(name).map(|(_, written)| written)
    }

    fn record(&mut self, name: &str, written: T) {
        self.entries
            .insert(name.to_string(), (Instant::now(), written));
    }
}

/// How a pass behaves.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// The longest a deleted `PinnedPeer` waits for agents to confirm its removal. An agent that
    /// is down would otherwise hold the deletion forever; its node gets the new spec anyway.
    pub cleanup_grace: Duration,
    /// Where Events go and who reports them.
    pub events: EventSettings,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            cleanup_grace: Duration::from_secs(300),
            events: EventSettings::new(FIELD_MANAGER),
        }
    }
}

/// The controller's memory between passes, and what it writes with.
pub struct Controller {
    client: Client,
    settings: ControllerSettings,
    metrics: Arc<Metrics>,
    applied: WriteMemo<PinnedNodeStateSpec>,
    deleted: WriteMemo<()>,
    statuses: WriteMemo<PinnedPeerStatus>,
    interface_statuses: WriteMemo<PinnedInterfaceStatus>,
    finalizers_added: WriteMemo<()>,
    released: WriteMemo<()>,
    planner: EventPlanner,
    events: EventWriter,
}

fn has_finalizer(peer: &PinnedPeer) -> bool {
    peer.finalizers().iter().any(|f| f == CLEANUP_FINALIZER)
}

/// Whole seconds from `earlier` to `later` (zero if `later` is not later).
fn seconds_between(earlier: &Time, later: &Time) -> u64 {
    u64::try_from(later.0.as_second() - earlier.0.as_second()).unwrap_or(0)
}

impl Controller {
    pub fn new(client: Client, settings: ControllerSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            events: EventWriter::new(client.clone(), settings.events.clone()),
            planner: EventPlanner::default(),
            client,
            settings,
            metrics,
            applied: WriteMemo::default(),
            deleted: WriteMemo::default(),
            statuses: WriteMemo::default(),
            interface_statuses: WriteMemo::default(),
            finalizers_added: WriteMemo::default(),
            released: WriteMemo::default(),
        }
    }

    /// When Events held back by the rate limit are due, if any are: the loop runs a pass then.
    pub fn next_due(&self) -> Option<Time> {
        self.planner.next_due()
    }

    /// One pass over `snapshot`. Stops at the first failed write; the next pass resumes where
    /// it stopped, since every step compares before it writes.
    pub async fn pass(
        &mut self,
        snapshot: &Snapshot,
        now: Time,
    ) -> Result<PassReport, ControllerError> {
        let started = Instant::now();
        let result = self.pass_inner(snapshot, now).await;
        self.metrics
            .pass_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(report) => {
                self.metrics
                    .wrote(WriteKind::NodeStateApply, report.node_states_applied.len());
                self.metrics
                    .wrote(WriteKind::NodeStateDelete, report.node_states_deleted.len());
                self.metrics
                    .wrote(WriteKind::PeerStatus, report.peer_statuses_written.len());
                self.metrics.wrote(
                    WriteKind::InterfaceStatus,
                    report.interface_statuses_written.len(),
                );
                self.metrics
                    .wrote(WriteKind::FinalizerAdd, report.finalizers_added.len());
                self.metrics
                    .wrote(WriteKind::FinalizerRemove, report.finalizers_removed.len());
                self.metrics.wrote(WriteKind::Event, report.events_written);
                PassResult::Ok
            }
            Err(error) => {
                self.metrics.error(error.reason);
                PassResult::Error
            }
        };
        self.metrics
            .passes
            .get_or_create(&crate::metrics::PassLabels { result: outcome })
            .inc();
        result
    }

    async fn pass_inner(
        &mut self,
        snapshot: &Snapshot,
        now: Time,
    ) -> Result<PassReport, ControllerError> {
        let peers_api: Api<PinnedPeer> = Api::all(self.client.clone());
        let states_api: Api<PinnedNodeState> = Api::all(self.client.clone());
        // Named, so managedFields show who owns the finalizer.
        let finalizer_params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let mut report = PassReport::default();

        // The status each peer has, counting our own writes the cache has not shown yet.
        let mut current_status: BTreeMap<String, Option<PinnedPeerStatus>> = BTreeMap::new();
        for peer in &snapshot.peers {
            let name = peer.name_any();
            let status = match self
                .statuses
                .pending(&name, |written| peer.status.as_ref() == Some(written))
            {
                Some(written) => Some(written.clone()),
                None => peer.status.clone(),
            };
            current_status.insert(name, status);
        }

        // Finalizers first: no peer reaches a node before its removal can be tracked.
        for peer in &snapshot.peers {
            let name = peer.name_any();
            let version = peer.resource_version();
            if peer.meta().deletion_timestamp.is_some()
                || has_finalizer(peer)
                || self.finalizers_added.pending(&name, |_| false).is_some()
            {
                continue;
            }
            let mut finalizers = peer.finalizers().to_vec();
            finalizers.push(CLEANUP_FINALIZER.to_string());
            // The resourceVersion makes a concurrent change to the list a conflict, not a loss.
            let patch = serde_json::json!({
                "metadata": {"finalizers": finalizers, "resourceVersion": version}
            });
            peers_api
                .patch(&name, &finalizer_params, &Patch::Merge(&patch))
                .await
                .map_err(api_err(
                    ErrorReason::Finalizer,
                    format!("adding the finalizer to PinnedPeer {name}"),
                ))?;
            self.finalizers_added.record(&name, ());
            report.finalizers_added.push(name);
        }

        // Render what is live: a peer being deleted leaves every node now.
        let live: Vec<Arc<PinnedPeer>> = snapshot
            .peers
            .iter()
            .filter(|peer| peer.meta().deletion_timestamp.is_none())
            .cloned()
            .collect();
        // Dedicated ports handed out before, so that none moves.
        let previous: PortAssignments = live
            .iter()
            .filter_map(|peer| {
                let name = peer.name_any();
                let port = current_status.get(&name)?.as_ref()?.listen_port?;
                Some(((peer.spec.interface.clone(), name), port))
            })
            .collect();
        let rendered = render(&snapshot.interfaces, &live, &snapshot.nodes, &previous);

        // Apply: each changed node state, then the states of nodes that run nothing.
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        for (node, spec) in &rendered.nodes {
            let existing = snapshot.states.get(node);
            let cached = existing.map(|state| &state.spec);
            let unchanged = cached == Some(spec)
                || self
                    .applied
                    .pending(node, |written| cached == Some(written))
                    == Some(spec);
            if unchanged {
                continue;
            }
            let mut state = PinnedNodeState::new(node, spec.clone());
            state.metadata.labels =
                Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into());
            states_api
                .patch(node, &apply, &Patch::Apply(&state))
                .instrument(tracing::info_span!("apply", node = %node))
                .await
                .map_err(api_err(
                    ErrorReason::NodeState,
                    format!("applying PinnedNodeState {node}"),
                ))?;
            self.applied.record(node, spec.clone());
            report.node_states_applied.push(node.clone());
        }
        for (name, state) in &snapshot.states {
            let ours = state
                .labels()
                .get(MANAGED_BY.0)
                .is_some_and(|v| v == MANAGED_BY.1);
            if !ours
                || rendered.nodes.contains_key(name)
                || self.deleted.pending(name, |_| false).is_some()
            {
                continue;
            }
            match states_api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                // Someone else deleted it first: that is what we wanted.
                Err(wgpin_crds::kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => {
                    return Err(api_err(
                        ErrorReason::NodeState,
                        format!("deleting PinnedNodeState {name}"),
                    )(e));
                }
            }
            self.deleted.record(name, ());
            report.node_states_deleted.push(name.clone());
        }

        // Each interface's status: nodes, peers, whether it could be rendered.
        for interface in &snapshot.interfaces {
            let name = interface.name_any();
            let current = match self
                .interface_statuses
                .pending(&name, |written| interface.status.as_ref() == Some(written))
            {
                Some(written) => Some(written.clone()),
                None => interface.status.clone(),
            };
            let reported = snapshot.states.iter().flat_map(|(node, state)| {
                state
                    .status
                    .iter()
                    .flat_map(move |s| s.interfaces.iter().map(move |i| (node.as_str(), i)))
            });
            let status = interface_status(
                interface,
                &rendered,
                reported,
                current.as_ref(),
                now.clone(),
            );
            if current.as_ref() == Some(&status) {
                continue;
            }
            let patch = serde_json::json!({
                "apiVersion": "wgpin.io/v1alpha1",
                "kind": "PinnedInterface",
                "status": status,
            });
            Api::<PinnedInterface>::all(self.client.clone())
                .patch_status(&name, &apply, &Patch::Apply(&patch))
                .await
                .map_err(api_err(
                    ErrorReason::InterfaceStatus,
                    format!("writing the status of PinnedInterface {name}"),
                ))?;
            self.interface_statuses.record(&name, status);
            report.interface_statuses_written.push(name);
        }

        // Release deleted peers once no agent runs them any more.
        let existing_nodes: BTreeSet<&str> =
            snapshot.nodes.iter().map(|n| n.name.as_str()).collect();
        for peer in &snapshot.peers {
            let Some(deleted_at) = &peer.meta().deletion_timestamp else {
                continue;
            };
            if !has_finalizer(peer) {
                continue;
            }
            let name = peer.name_any();
            let version = peer.resource_version();
            if self.released.pending(&name, |_| false).is_some() {
                continue;
            }
            let holders = nodes_still_running(snapshot, &rendered.nodes, &existing_nodes, &name);
            let waited = seconds_between(deleted_at, &now);
            if !holders.is_empty() && waited < self.settings.cleanup_grace.as_secs() {
                tracing::debug!(peer = %name, ?holders, "waiting for the agents to remove the peer");
                continue;
            }
            if !holders.is_empty() {
                tracing::warn!(
                    peer = %name,
                    ?holders,
                    "releasing the deleted peer after {waited} s without confirmation from these nodes' agents; they remove it when they next apply their state"
                );
            }
            let finalizers: Vec<&String> = peer
                .finalizers()
                .iter()
                .filter(|f| *f != CLEANUP_FINALIZER)
                .collect();
            let patch = serde_json::json!({
                "metadata": {"finalizers": finalizers, "resourceVersion": version}
            });
            match peers_api
                .patch(&name, &finalizer_params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(wgpin_crds::kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => {
                    return Err(api_err(
                        ErrorReason::Finalizer,
                        format!("removing the finalizer from PinnedPeer {name}"),
                    )(e));
                }
            }
            self.released.record(&name, ());
            report.finalizers_removed.push((name, holders));
        }

        // Status: the nodes each live peer is rendered on, and the agents' reports.
        let mut rendered_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (node, spec) in &rendered.nodes {
            for peer in spec.interfaces.iter().flat_map(|i| &i.peers) {
                rendered_on
                    .entry(peer.name.clone())
                    .or_default()
                    .push(node.clone());
            }
        }
        let reports: BTreeMap<String, PinnedNodeStateStatus> = snapshot
            .states
            .iter()
            .filter_map(|(name, state)| Some((name.clone(), state.status.clone()?)))
            .collect();
        let mut problems_by_peer: BTreeMap<&str, Vec<crate::Problem>> = BTreeMap::new();
        for problem in &rendered.problems {
            if problem.kind == "PinnedPeer"
                && problem.reason != crate::ProblemReason::NoNodeSelected
            {
                problems_by_peer
                    .entry(problem.name.as_str())
                    .or_default()
                    .push(problem.clone());
            }
        }
        let status_params = PatchParams::apply(FIELD_MANAGER).force();
        for peer in &live {
            let name = peer.name_any();
            let previous = current_status.get(&name).cloned().flatten();
            let status = roll_up(&RollUpInput {
                peer: peer.as_ref(),
                nodes: rendered_on
                    .get(&name)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                reports: &reports,
                problems: problems_by_peer
                    .get(name.as_str())
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                dedicated_port: rendered
                    .ports
                    .get(&(peer.spec.interface.clone(), name.clone()))
                    .copied(),
                previous: previous.as_ref(),
                now: now.clone(),
            });
            if previous.as_ref() == Some(&status) {
                continue;
            }
            let patch = serde_json::json!({
                "apiVersion": "wgpin.io/v1alpha1",
                "kind": "PinnedPeer",
                "status": status,
            });
            peers_api
                .patch_status(&name, &status_params, &Patch::Apply(&patch))
                .await
                .map_err(api_err(
                    ErrorReason::PeerStatus,
                    format!("writing the status of PinnedPeer {name}"),
                ))?;
            self.statuses.record(&name, status.clone());
            current_status.insert(name.clone(), Some(status));
            report.peer_statuses_written.push(name);
        }

        // Events last: a failed one is counted and dropped, never fails the pass.
        let planned = self.planner.plan(&PassInput {
            peers: &snapshot.peers,
            reports: &reports,
            problems: &rendered.problems,
            now: &now,
        });
        let published = self.events.publish(&planned, &now).await;
        report.events_written = published.written;
        for _ in 0..published.failed {
            self.metrics.error(ErrorReason::Event);
        }

        self.count_objects(snapshot, &current_status);
        Ok(report)
    }

    fn count_objects(
        &self,
        snapshot: &Snapshot,
        statuses: &BTreeMap<String, Option<PinnedPeerStatus>>,
    ) {
        let (mut ready, mut stalled, mut reconciling, mut deleting) = (0, 0, 0, 0);
        for peer in &snapshot.peers {
            let status = statuses.get(&peer.name_any()).cloned().flatten();
            let is_true = |type_: &str| {
                status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == type_ && c.status == "True")
                })
            };
            if peer.meta().deletion_timestamp.is_some() {
                deleting += 1;
            } else if is_true(READY) {
                ready += 1;
            } else if is_true(STALLED) {
                stalled += 1;
            } else {
                reconciling += 1;
            }
        }
        self.metrics.set_objects(
            "PinnedPeer",
            &[
                ("Ready", ready),
                ("Stalled", stalled),
                ("Reconciling", reconciling),
                ("Deleting", deleting),
            ],
        );
        let applied = snapshot
            .states
            .values()
            .filter(|s| {
                s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
            })
            .count();
        self.metrics.set_objects(
            "PinnedNodeState",
            &[
                ("Applied", applied),
                ("Pending", snapshot.states.len() - applied),
            ],
        );
        self.metrics
            .set_objects("PinnedInterface", &[("Total", snapshot.interfaces.len())]);
    }
}

/// The nodes that may still run `peer`: their state's spec (as rendered now) still has it, or
/// their agent's last report lists it. Nodes that are gone, and states being deleted, do not
/// count: there is no agent left to wait for, or it drops everything.
fn nodes_still_running(
    snapshot: &Snapshot,
    rendered: &BTreeMap<String, PinnedNodeStateSpec>,
    existing_nodes: &BTreeSet<&str>,
    peer: &str,
) -> Vec<String> {
    let spec_has = |spec: &PinnedNodeStateSpec| {
        spec.interfaces
            .iter()
            .any(|i| i.peers.iter().any(|p| p.name == peer))
    };
    snapshot
        .states
        .iter()
        .filter(|(node, _)| existing_nodes.contains(node.as_str()))
        .filter_map(|(node, state)| {
            let spec = rendered.get(node)?;
            let reported = state.status.as_ref().is_some_and(|status| {
                status
                    .interfaces
                    .iter()
                    .any(|i| i.peers.iter().any(|p| p.name == peer))
            });
            (spec_has(spec) || reported).then(|| node.clone())
        })
        .collect()
}

/// One pass over a fresh list of everything (tests, one-off runs).
pub async fn reconcile_all(client: &Client, now: Time) -> Result<PassReport, ControllerError> {
    let snapshot = Snapshot::list(client).await?;
    Controller::new(
        client.clone(),
        ControllerSettings::default(),
        Arc::new(Metrics::new()),
    )
    .pass(&snapshot, now)
    .await
}

/// How the loop paces itself.
#[derive(Clone, Copy, Debug)]
pub struct LoopSettings {
    /// How long to gather more changes before a pass.
    pub debounce: Duration,
    /// A pass at least this often, to repair what no watch reported.
    pub resync: Duration,
    /// The longest wait after failed passes (the wait doubles from 1 s up to this).
    pub max_backoff: Duration,
}

impl Default for LoopSettings {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(300),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// The events of one watch cache: its index, and whether a full listing just completed.
type CacheEvents = futures::stream::BoxStream<'static, (usize, Result<bool, watcher::Error>)>;

/// A watch cache of one kind, and the stream that feeds it, tagged with the cache's index.
fn cached<K>(api: Api<K>, index: usize) -> (Store<K>, CacheEvents)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    // `true` once a listing is complete; errors are retried by the watcher with a backoff.
    // managedFields are dropped before caching: nothing reads them, and at 10,000 objects they
    // are a good part of the memory.
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|object| object.managed_fields_mut().clear()),
    )
    .map(move |event| (index, event.map(|e| matches!(e, watcher::Event::InitDone))))
    .boxed();
    (reader, stream)
}

/// Watches every input into caches and runs a pass after each burst of changes, at least every
/// `resync`, and again after a failure with a backoff that grows and resets on success. `ready`
/// turns true after the first successful pass. Returns when `shutdown` resolves.
pub async fn run(
    mut controller: Controller,
    settings: LoopSettings,
    ready: Arc<AtomicBool>,
    now: impl Fn() -> Time,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let client = controller.client.clone();
    let (interfaces, interface_events) = cached(Api::<PinnedInterface>::all(client.clone()), 0);
    let (peers, peer_events) = cached(Api::<PinnedPeer>::all(client.clone()), 1);
    // The Nodes' metadata only: labels are all a pass reads, and a Node's status (images,
    // conditions) is many times the size of its metadata.
    let (nodes, node_events) = cached(Api::<PartialObjectMeta<Node>>::all(client.clone()), 2);
    let (states, state_events) = cached(Api::<PinnedNodeState>::all(client.clone()), 3);
    let mut events =
        futures::stream::select_all([interface_events, peer_events, node_events, state_events]);
    const KINDS: [&str; 4] = [
        "PinnedInterfaces",
        "PinnedPeers",
        "Nodes",
        "PinnedNodeStates",
    ];
    let mut synced = [false; 4];
    tokio::pin!(shutdown);
    let mut backoff = Duration::ZERO;
    // When the next pass is due. A change makes it due one debounce later unless it already is
    // sooner: changes that follow join that pass instead of pushing it back, so a steady stream
    // of them (agents reporting) cannot hold passes back. A failure makes it due after the
    // backoff, and changes do not bring that forward.
    let mut due_at = tokio::time::Instant::now() + settings.debounce;
    loop {
        // No pass before every cache holds a full listing: a partial view would delete states.
        let all_synced = synced.iter().all(|s| *s);
        tokio::select! {
            () = &mut shutdown => break,
            event = events.next() => {
                match event {
                    None => {
                        tracing::error!("the watches ended; stopping");
                        break;
                    }
                    Some((index, Ok(init_done))) => {
                        if init_done && !synced[index] {
                            tracing::info!("watching {}", KINDS[index]);
                            synced[index] = true;
                        }
                    }
                    Some((index, Err(error))) => {
                        controller.metrics.error(ErrorReason::Read);
                        tracing::warn!("watching {} failed (retrying): {error}", KINDS[index]);
                    }
                }
                if backoff.is_zero() {
                    due_at = due_at.min(tokio::time::Instant::now() + settings.debounce);
                }
                continue;
            }
            () = tokio::time::sleep_until(due_at), if all_synced => {}
        }
        let snapshot = Snapshot {
            interfaces: interfaces.state(),
            peers: peers.state(),
            nodes: nodes
                .state()
                .iter()
                .map(|node| node_info(&**node))
                .collect(),
            states: states
                .state()
                .into_iter()
                .map(|state| (state.name_any(), state))
                .collect(),
        };
        match controller.pass(&snapshot, now()).await {
            Ok(report) => {
                backoff = Duration::ZERO;
                // Held-back Events are due before the resync, perhaps.
                let due = controller.next_due().map(|due| {
                    let now = now();
                    Duration::from_millis(
                        u64::try_from(due.0.as_millisecond() - now.0.as_millisecond()).unwrap_or(0),
                    )
                });
                due_at = tokio::time::Instant::now()
                    + due.map_or(settings.resync, |due| {
                        due.clamp(settings.debounce, settings.resync)
                    });
                ready.store(true, Ordering::Relaxed);
                if report.writes() > 0 {
                    tracing::info!(
                        applied = ?report.node_states_applied,
                        deleted = ?report.node_states_deleted,
                        statuses = report.peer_statuses_written.len(),
                        finalizers_added = report.finalizers_added.len(),
                        released = ?report.finalizers_removed,
                        "reconciled"
                    );
                }
            }
            Err(error) => {
                backoff = (backoff * 2).clamp(Duration::from_secs(1), settings.max_backoff);
                due_at = tokio::time::Instant::now() + backoff;
                tracing::error!(retry_in = ?backoff, "pass failed: {error}");
            }
        }
    }
}
