//! In-cluster mode: the agent enforces its node's `PinnedNodeState` and reports back.
//!
//! - **Input**: a watch on this node's `PinnedNodeState` only (a field selector on its name).
//!   Every new spec is persisted under the state directory before it is enforced, so an agent
//!   restarted while the API server is unreachable enforces the last state it had.
//! - **Enforcement**: the same [`Enforcer`] as standalone mode, ticking every guard interval
//!   whatever the API does.
//! - **Preshared keys**: the Secrets this node's state names, and only those, each read by a
//!   `get` (never a list or a watch) in a task of their own, kept through outages and restarts
//!   ([`crate::secrets`]). A state that names a Secret not read yet waits up to
//!   [`FIRST_READ_WAIT`] for it before its reconcile.
//! - **Output**: `PinnedNodeState.status` by server-side apply (field manager `wgpin-agent`),
//!   coalesced: a change that matters (a peer's state, endpoint or violation count, a condition)
//!   is written at most every [`StatusSettings::min_interval`]; counters and handshake times
//!   ride along at most every [`StatusSettings::refresh_interval`]. Events on the `PinnedPeer`
//!   for fail-closed actions (withdrawn, restored, not enforced), at most one per peer and
//!   action per minute. Violation Events are the operator's: it sees every node's counts.
//! - Status and Events are written by their own tasks, so an API server that hangs never
//!   delays enforcement.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use wgpin_crds::{
    EnforcementState, InterfaceStatus, PinnedNodeState, PinnedNodeStateSpec, PinnedNodeStateStatus,
    conditions::{READY, condition, set_condition},
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{
        Api, Client, ResourceExt,
        api::{Patch, PatchParams},
        runtime::{WatchStreamExt as _, watcher},
    },
};
use wgpin_operator::events::{Cause, EventSettings, EventWriter, FailClosedAction, PlannedEvent};

use crate::{
    dataplane::DataPlaneConfig,
    enforcer::{Enforcer, EnforcerSettings, Tick},
    metrics::{self, Metrics},
    secrets::{self, FIRST_READ_WAIT, PRESHARED_KEYS_FILE, SecretCache, references},
};

/// The field manager of the agent's status writes.
pub const FIELD_MANAGER: &str = "wgpin-agent";
/// Who reports the agent's Events.
pub const REPORTING_CONTROLLER: &str = "wgpin.io/agent";
/// Condition: the fast path is attached and its maps are the pinned ones.
pub const FAST_PATH_VERIFIED: &str = "FastPathVerified";
/// Condition: something on this node needs attention (a peer not enforced, a failed apply, the
/// fast path lost).
pub const DEGRADED: &str = "Degraded";
/// The file under the state directory that holds the last state received from the API.
const LAST_STATE_FILE: &str = "node-state.json";

/// How status writes are paced.
#[derive(Clone, Copy, Debug)]
pub struct StatusSettings {
    /// The shortest time between two status writes for new violation counts (an attack must
    /// not turn into a write per packet). A change of what is enforced is written at the next
    /// tick.
    pub min_interval: Duration,
    /// How often counters and handshake times are refreshed when nothing else changed.
    pub refresh_interval: Duration,
}

impl Default for StatusSettings {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_millis(500),
            refresh_interval: Duration::from_secs(30),
        }
    }
}

/// How in-cluster mode runs.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name (from the downward API).
    pub node: String,
    pub dataplane: DataPlaneConfig,
    pub enforcer: EnforcerSettings,
    pub status: StatusSettings,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often the fast path is verified and endpoints are checked.
    pub guard_interval: Duration,
    /// Where the agent's Events go.
    pub event_namespace: String,
    /// How often the preshared-key Secrets are read again ([`secrets::DEFAULT_REFRESH`]).
    pub secret_refresh: Duration,
}

/// The state the agent enforces, as persisted between runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastState {
    /// `metadata.generation` of the `PinnedNodeState` it came from; none when the node has no
    /// state (nothing to enforce).
    pub generation: Option<i64>,
    pub spec: PinnedNodeStateSpec,
}

impl LastState {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(LAST_STATE_FILE)
    }

    /// The last persisted state, if there is a readable one.
    pub fn load(state_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(Self::path(state_dir)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", Self::path(state_dir).display());
                None
            }
        }
    }

    /// Writes the state atomically (a crash leaves the old file or the new one, never half).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(state_dir);
        let temporary = path.with_extension("json.tmp");
        std::fs::write(
            &temporary,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&temporary, &path)
    }
}

/// What the status says about the agent beyond its interfaces.
pub struct StatusInput<'a> {
    pub interfaces: Vec<InterfaceStatus>,
    /// Generation of the state last applied successfully.
    pub applied_generation: Option<i64>,
    /// Generation of the state the agent was given (may be newer than the applied one).
    pub desired_generation: Option<i64>,
    pub fast_path_verified: bool,
    /// The last reconcile failed, with why.
    pub failure: Option<&'a str>,
    pub previous: Option<&'a PinnedNodeStateStatus>,
    pub now: Time,
}

/// The node's status: interfaces as enforced, and `Ready`, `FastPathVerified`, `Degraded`.
/// Pure; transition times carry over from `previous` when a condition keeps its status.
pub fn node_status(input: StatusInput<'_>) -> PinnedNodeStateStatus {
    let mut status = input.previous.cloned().unwrap_or_default();
    status.observed_generation = input.applied_generation;
    status.interfaces = input.interfaces;
    let peers = || status.interfaces.iter().flat_map(|i| &i.peers);
    let count = |state: EnforcementState| peers().filter(|p| p.state == state).count();
    let (enforced, failed, pending) = (
        count(EnforcementState::Enforced),
        count(EnforcementState::Failed),
        count(EnforcementState::Pending) + count(EnforcementState::Withdrawn),
    );
    let generation = input.desired_generation;
    let now = input.now;
    let current = input.applied_generation == input.desired_generation;

    let (ready, reason, message) = if !input.fast_path_verified {
        (
            false,
            "FastPathLost",
            "the fast path is not verified: every peer is withdrawn until it is".to_string(),
        )
    } else if let Some(failure) = input.failure {
        (false, "ApplyFailed", failure.to_string())
    } else if !current {
        (
            false,
            "Applying",
            format!(
                "applying generation {} of this state",
                generation.map_or_else(|| "-".to_string(), |g| g.to_string())
            ),
        )
    } else if failed > 0 {
        (
            false,
            "PeerNotEnforced",
            format!("{failed} peer(s) cannot be enforced on this node; see their messages"),
        )
    } else if pending > 0 {
        (false, "Pending", format!("{pending} peer(s) not live yet"))
    } else {
        (true, "Enforced", format!("{enforced} peer(s) enforced"))
    };
    let mut conditions = std::mem::take(&mut status.conditions);
    set_condition(
        &mut conditions,
        condition(
            READY,
            if ready { "True" } else { "False" },
            reason,
            message,
            generation,
            now.clone(),
        ),
    );
    set_condition(
        &mut conditions,
        condition(
            FAST_PATH_VERIFIED,
            if input.fast_path_verified {
                "True"
            } else {
                "False"
            },
            if input.fast_path_verified {
                "Verified"
            } else {
                "FastPathLost"
            },
            if input.fast_path_verified {
                "attached to every underlay interface, maps pinned"
            } else {
                "detached or replaced: peers are withdrawn"
            },
            generation,
            now.clone(),
        ),
    );
    let fallbacks: Vec<String> = status
        .interfaces
        .iter()
        .filter_map(|i| Some(format!("{}: {}", i.name, i.mode_fallback.as_ref()?)))
        .collect();
    let (degraded, degraded_reason, degraded_message) =
        if !input.fast_path_verified || input.failure.is_some() || failed > 0 {
            (true, reason, String::new())
        } else if !fallbacks.is_empty() {
            // Enforced, but weaker than asked: say so without holding Ready back.
            (true, "ModeFallback", fallbacks.join("; "))
        } else {
            (false, "AsExpected", String::new())
        };
    set_condition(
        &mut conditions,
        condition(
            DEGRADED,
            if degraded { "True" } else { "False" },
            degraded_reason,
            degraded_message,
            generation,
            now,
        ),
    );
    status.conditions = conditions;
    status
}

/// The status without what changes on its own all the time (traffic counters, handshake
/// times): when this differs, a write is due soon; otherwise only at the refresh interval.
pub fn significant(status: &PinnedNodeStateStatus) -> PinnedNodeStateStatus {
    let mut status = status.clone();
    for peer in status.interfaces.iter_mut().flat_map(|i| &mut i.peers) {
        peer.rx_bytes = None;
        peer.tx_bytes = None;
        peer.last_handshake_time = None;
    }
    status
}

/// What is enforced: the significant status without violation counts. A change here (a peer
/// added, enforced, withdrawn, a condition) is written at once; new counts wait for
/// [`StatusSettings::min_interval`].
pub fn enforcement(status: &PinnedNodeStateStatus) -> PinnedNodeStateStatus {
    let mut status = significant(status);
    for peer in status.interfaces.iter_mut().flat_map(|i| &mut i.peers) {
        peer.violations = None;
    }
    status
}

/// Whether `status` should be written now, given the last one written and when.
pub fn write_due(
    last: Option<&PinnedNodeStateStatus>,
    status: &PinnedNodeStateStatus,
    since_last_write: Duration,
    settings: &StatusSettings,
) -> bool {
    match last {
        None => true,
        Some(last) if enforcement(last) != enforcement(status) => true,
        Some(last) if significant(last) != significant(status) => {
            since_last_write >= settings.min_interval
        }
        Some(last) => *last != *status && since_last_write >= settings.refresh_interval,
    }
}

/// Fail-closed Events to write after a tick: one per peer and action per minute at most.
#[derive(Default)]
pub struct ActionEvents {
    last: BTreeMap<(String, FailClosedAction), Instant>,
    /// Peers reported not enforced, so a peer that stays failed is announced once.
    failed: BTreeMap<String, String>,
}

/// At most one Event per peer and action in this long: the same window as the operator's Events.
const ACTION_EVENT_WINDOW: Duration = wgpin_operator::events::DEFAULT_WINDOW;

impl ActionEvents {
    /// The Events `tick` and the current `interfaces` call for.
    pub fn plan(
        &mut self,
        node: &str,
        tick: &Tick,
        interfaces: &[InterfaceStatus],
        now: Instant,
    ) -> Vec<PlannedEvent> {
        let mut planned = Vec::new();
        let peers: Vec<&str> = interfaces
            .iter()
            .flat_map(|i| i.peers.iter().map(|p| p.name.as_str()))
            .collect();
        let mut push = |peer: &str, action: FailClosedAction, message: String| {
            let key = (peer.to_string(), action);
            if self
                .last
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < ACTION_EVENT_WINDOW)
            {
                return;
            }
            self.last.insert(key, now);
            planned.push(PlannedEvent {
                peer: peer.to_string(),
                uid: None,
                cause: Cause::FailClosed {
                    node: node.to_string(),
                    action,
                    message,
                },
            });
        };
        if let Some(problems) = &tick.withdrawn {
            for peer in &peers {
                push(
                    peer,
                    FailClosedAction::Withdrawn,
                    format!(
                        "the fast path was lost ({}): the peer was removed from WireGuard until it is verified again",
                        problems.join("; ")
                    ),
                );
            }
        }
        if tick.recovered {
            for peer in &peers {
                push(
                    peer,
                    FailClosedAction::Restored,
                    "the fast path is verified again: the peer is back in WireGuard behind its pin"
                        .to_string(),
                );
            }
        }
        let mut failed_now = BTreeMap::new();
        for peer in interfaces.iter().flat_map(|i| &i.peers) {
            if peer.state == EnforcementState::Failed {
                let message = peer.message.clone().unwrap_or_default();
                if self.failed.get(&peer.name) != Some(&message) {
                    push(
                        &peer.name,
                        FailClosedAction::NotEnforced,
                        format!("not enforced, so not in WireGuard: {message}"),
                    );
                }
                failed_now.insert(peer.name.clone(), message);
            }
        }
        self.failed = failed_now;
        self.last
            .retain(|_, at| now.duration_since(*at) < ACTION_EVENT_WINDOW);
        planned
    }
}

/// Writes the latest status handed to it, retrying with a backoff while the API is away.
async fn status_writer(
    api: Api<PinnedNodeState>,
    node: String,
    mut latest: tokio::sync::watch::Receiver<Option<PinnedNodeStateStatus>>,
    metrics: Arc<Metrics>,
) {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut backoff = Duration::ZERO;
    loop {
        if latest.changed().await.is_err() {
            return;
        }
        loop {
            let Some(status) = latest.borrow_and_update().clone() else {
                break;
            };
            let patch = serde_json::json!({
                "apiVersion": "wgpin.io/v1alpha1",
                "kind": "PinnedNodeState",
                "status": status,
            });
            match api
                .patch_status(&node, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    metrics.status_writes.inc();
                    if !backoff.is_zero() {
                        tracing::info!(node = %node, "status written again: the API server is back");
                    }
                    backoff = Duration::ZERO;
                    break;
                }
                // No state for this node (yet): nothing to report on.
                Err(wgpin_crds::kube::Error::Api(e)) if e.code == 404 => break,
                Err(e) => {
                    metrics.api_errors.inc();
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    tracing::warn!(node = %node, retry_in = ?backoff, "cannot write the status: {e}; enforcement goes on");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

/// Writes Events handed to it; drops them (counted) when the API is slow or away.
async fn event_writer(
    writer: EventWriter,
    mut queue: tokio::sync::mpsc::Receiver<Vec<PlannedEvent>>,
    metrics: Arc<Metrics>,
) {
    while let Some(events) = queue.recv().await {
        let report = writer.publish(&events, &Time(Timestamp::now())).await;
        metrics.event_writes.inc_by(report.written as u64);
        metrics.api_errors.inc_by(report.failed as u64);
    }
}

/// Runs until `shutdown` resolves. Enforcement stays in place when it returns.
pub async fn run(
    client: Client,
    config: ClusterConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    use tracing::Instrument as _;
    let span = tracing::info_span!("agent", node = %config.node);
    enforce(client, config, shutdown).instrument(span).await
}

async fn enforce(
    client: Client,
    config: ClusterConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let node = config.node.clone();
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let state_dir = config.dataplane.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        format!(
            "cannot create the state directory {}: {e}",
            state_dir.display()
        )
    })?;
    let mut enforcer = Enforcer::new(
        config.dataplane.clone(),
        config.enforcer.clone(),
        metrics.clone(),
        ready.clone(),
    )?;
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("metrics on {addr}: {e}"))?;
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "serving /metrics, /healthz and /readyz");
        }
        tokio::spawn(metrics::serve(listener, metrics.clone(), ready.clone()));
    }

    // The last state this node had: enforced at once, API or not.
    let mut desired = LastState::load(&state_dir).unwrap_or_default();
    if desired.generation.is_some() {
        tracing::info!(
            generation = desired.generation,
            "enforcing the last state received before this start, until the API server answers"
        );
    }
    let mut applied_generation: Option<i64> = None;
    let mut last_failure: Option<String> = None;

    // Preshared keys: the Secrets this node's state names, read by a task of their own (an API
    // server that hangs must not delay enforcement), the last ones read kept on disk.
    if config.dataplane.secrets_dir.is_some() {
        tracing::warn!(
            "--secrets-dir is for standalone mode and ignored here: in a cluster the agent reads the Secrets its node's state names"
        );
    }
    let secret_cache = SecretCache::load(state_dir.join("keys").join(PRESHARED_KEYS_FILE));
    enforcer.set_secret_source(Arc::new(secret_cache.clone()));
    let mut named = references(&desired.spec);
    if !secret_cache.covers(&named) {
        enforcer.hold_until(Some(Instant::now() + FIRST_READ_WAIT));
    }
    let (named_tx, named_rx) = tokio::sync::watch::channel(named.clone());
    let (read_tx, mut read_rx) = tokio::sync::watch::channel(0u64);
    let secret_task = tokio::spawn(secrets::fetch_loop(
        client.clone(),
        secret_cache.clone(),
        named_rx,
        read_tx,
        config.secret_refresh,
        metrics.clone(),
    ));

    let api: Api<PinnedNodeState> = Api::all(client.clone());
    let (status_tx, status_rx) = tokio::sync::watch::channel(None);
    let status_task = tokio::spawn(status_writer(
        api.clone(),
        node.clone(),
        status_rx,
        metrics.clone(),
    ));
    let (event_tx, event_rx) = tokio::sync::mpsc::channel(64);
    let event_task = tokio::spawn(event_writer(
        EventWriter::new(
            client.clone(),
            EventSettings {
                namespace: config.event_namespace.clone(),
                reporting_controller: REPORTING_CONTROLLER.to_string(),
                reporting_instance: node.clone(),
            },
        ),
        event_rx,
        metrics.clone(),
    ));
    let mut actions = ActionEvents::default();

    let mut watch = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={node}")),
    )
    .default_backoff()
    .boxed();
    // Whether the current listing has seen this node's state (else it has none).
    let mut listed: Option<LastState> = None;

    let mut last_status: Option<PinnedNodeStateStatus> = None;
    let mut last_write = Instant::now() - config.status.refresh_interval;
    let mut ticker = tokio::time::interval(config.guard_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = watch.next() => {
                let received = match event {
                    None => {
                        tracing::error!("the watch on this node's state ended");
                        break;
                    }
                    Some(Err(e)) => {
                        metrics.api_errors.inc();
                        tracing::warn!("watching this node's PinnedNodeState: {e}; enforcing the last state meanwhile");
                        None
                    }
                    Some(Ok(watcher::Event::Init)) => {
                        listed = Some(LastState::default());
                        None
                    }
                    Some(Ok(watcher::Event::InitApply(state))) => {
                        listed = Some(LastState { generation: state.metadata.generation, spec: state.spec });
                        None
                    }
                    Some(Ok(watcher::Event::InitDone)) => listed.take(),
                    Some(Ok(watcher::Event::Apply(state))) => {
                        Some(LastState { generation: state.metadata.generation, spec: state.spec })
                    }
                    Some(Ok(watcher::Event::Delete(state))) => {
                        tracing::info!(state = %state.name_any(), "this node's state was deleted: nothing to enforce");
                        Some(LastState::default())
                    }
                };
                if let Some(received) = received
                    && received != desired
                {
                    if let Err(e) = received.save(&state_dir) {
                        tracing::error!("cannot persist the node's state under {}: {e}", state_dir.display());
                    }
                    tracing::info!(generation = received.generation, "new state for this node");
                    desired = received;
                    enforcer.changed();
                    let now_named = references(&desired.spec);
                    if now_named != named {
                        named = now_named;
                        named_tx.send_replace(named.clone());
                    }
                    if !secret_cache.covers(&named) {
                        enforcer.hold_until(Some(Instant::now() + FIRST_READ_WAIT));
                    }
                }
                continue;
            }
            // A preshared key or the reason there is none changed: plan again, now.
            Ok(()) = read_rx.changed() => {
                enforcer.changed();
                if secret_cache.covers(&named) {
                    enforcer.hold_until(None);
                }
            }
            _ = ticker.tick() => {}
        }

        let tick = enforcer.tick(&desired.spec).await;
        if tick.applied.is_some() {
            applied_generation = desired.generation;
            last_failure = None;
        }
        if let Some(failure) = &tick.failed {
            last_failure = Some(failure.clone());
        }

        let interfaces = enforcer.status(&desired.spec);
        let planned = actions.plan(&node, &tick, &interfaces, Instant::now());
        if !planned.is_empty() && event_tx.try_send(planned).is_err() {
            metrics.api_errors.inc();
            tracing::warn!("Events dropped: the API server is not keeping up");
        }

        let status = node_status(StatusInput {
            interfaces,
            applied_generation,
            desired_generation: desired.generation,
            fast_path_verified: !enforcer.dataplane().is_withdrawn(),
            failure: last_failure.as_deref(),
            previous: last_status.as_ref(),
            now: Time(Timestamp::now()),
        });
        let due = write_due(
            last_status.as_ref(),
            &status,
            last_write.elapsed(),
            &config.status,
        );
        // Nothing to report on a node without a state: the object does not exist.
        if due && desired.generation.is_some() {
            last_write = Instant::now();
            last_status = Some(status.clone());
            status_tx.send_replace(Some(status));
        }
    }
    tracing::info!("stopping; enforcement stays in place for the next agent to adopt");
    drop(named_tx);
    secret_task.abort();
    drop(status_tx);
    drop(event_tx);
    // Let the last status and Events out, briefly.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = status_task.await;
        let _ = event_task.await;
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{PeerEnforcementStatus, ResolvedMode, ViolationSummary};

    use super::*;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + second).expect("time"))
    }

    fn peer(name: &str, state: EnforcementState) -> PeerEnforcementStatus {
        PeerEnforcementStatus {
            name: name.into(),
            state,
            observed_generation: Some(1),
            listen_port: Some(51820),
            endpoint: None,
            last_handshake_time: None,
            rx_bytes: Some(10),
            tx_bytes: Some(20),
            violations: None,
            message: (state == EnforcementState::Failed).then(|| "no port".to_string()),
        }
    }

    fn interfaces(peers: Vec<PeerEnforcementStatus>) -> Vec<InterfaceStatus> {
        vec![InterfaceStatus {
            name: "gateway".into(),
            mode: None,
            mode_fallback: None,
            backend: None,
            fast_path: None,
            public_key: None,
            peers,
        }]
    }

    fn condition_of<'a>(status: &'a PinnedNodeStateStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    /// (fast path verified, failure, applied, desired, peers) → (Ready, reason), Degraded
    type Case<'a> = (
        bool,
        Option<&'a str>,
        Option<i64>,
        Option<i64>,
        &'a [EnforcementState],
        (&'a str, &'a str),
        &'a str,
    );

    #[test]
    fn conditions_say_what_keeps_the_node_from_ready() {
        use EnforcementState::*;
        let cases: &[Case<'_>] = &[
            (
                true,
                None,
                Some(2),
                Some(2),
                &[Enforced, Enforced],
                ("True", "Enforced"),
                "False",
            ),
            (
                true,
                None,
                Some(1),
                Some(2),
                &[Enforced],
                ("False", "Applying"),
                "False",
            ),
            (
                true,
                None,
                Some(2),
                Some(2),
                &[Enforced, Pending],
                ("False", "Pending"),
                "False",
            ),
            (
                true,
                None,
                Some(2),
                Some(2),
                &[Enforced, Failed],
                ("False", "PeerNotEnforced"),
                "True",
            ),
            (
                true,
                Some("netlink: EPERM"),
                Some(1),
                Some(2),
                &[Enforced],
                ("False", "ApplyFailed"),
                "True",
            ),
            (
                false,
                None,
                Some(2),
                Some(2),
                &[Withdrawn],
                ("False", "FastPathLost"),
                "True",
            ),
        ];
        for (verified, failure, applied, desired, states, ready, degraded) in cases {
            let status = node_status(StatusInput {
                interfaces: interfaces(
                    states
                        .iter()
                        .enumerate()
                        .map(|(i, s)| peer(&format!("p{i}"), *s))
                        .collect(),
                ),
                applied_generation: *applied,
                desired_generation: *desired,
                fast_path_verified: *verified,
                failure: *failure,
                previous: None,
                now: at(0),
            });
            assert_eq!(
                condition_of(&status, READY),
                *ready,
                "{states:?} {failure:?}"
            );
            assert_eq!(condition_of(&status, DEGRADED).0, *degraded, "{states:?}");
            assert_eq!(
                condition_of(&status, FAST_PATH_VERIFIED).0,
                if *verified { "True" } else { "False" }
            );
            assert_eq!(status.observed_generation, *applied);
        }
    }

    #[test]
    fn an_identity_fallback_is_degraded_but_ready() {
        let mut interfaces = interfaces(vec![peer("p0", EnforcementState::Enforced)]);
        interfaces[0].mode = Some(ResolvedMode::Shared);
        interfaces[0].mode_fallback = Some("Identity cannot run on this node (no BTF)".into());
        let status = node_status(StatusInput {
            interfaces,
            applied_generation: Some(1),
            desired_generation: Some(1),
            fast_path_verified: true,
            failure: None,
            previous: None,
            now: at(0),
        });
        assert_eq!(condition_of(&status, READY), ("True", "Enforced"));
        assert_eq!(condition_of(&status, DEGRADED), ("True", "ModeFallback"));
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == DEGRADED)
            .expect("Degraded");
        assert!(
            degraded.message.contains("gateway: Identity cannot run"),
            "{degraded:?}"
        );
    }

    #[test]
    fn transition_times_carry_over_while_a_condition_keeps_its_status() {
        let input = |now, previous| StatusInput {
            interfaces: interfaces(vec![peer("a", EnforcementState::Enforced)]),
            applied_generation: Some(1),
            desired_generation: Some(1),
            fast_path_verified: true,
            failure: None,
            previous,
            now,
        };
        let first = node_status(input(at(0), None));
        let second = node_status(input(at(60), Some(&first)));
        assert_eq!(first, second, "nothing changed, nothing to write");
    }

    #[test]
    fn counters_and_handshakes_are_not_significant_but_violations_are() {
        let base = node_status(StatusInput {
            interfaces: interfaces(vec![peer("a", EnforcementState::Enforced)]),
            applied_generation: Some(1),
            desired_generation: Some(1),
            fast_path_verified: true,
            failure: None,
            previous: None,
            now: at(0),
        });
        let mut traffic = base.clone();
        traffic.interfaces[0].peers[0].rx_bytes = Some(99_999);
        traffic.interfaces[0].peers[0].last_handshake_time = Some(at(5));
        assert_eq!(significant(&base), significant(&traffic));
        assert_ne!(base, traffic);
        let mut violated = base.clone();
        violated.interfaces[0].peers[0].violations = Some(ViolationSummary {
            count: 1,
            last_source: Some("192.0.2.66:4000".into()),
            last_node: None,
            last_time: Some(at(3)),
        });
        assert_ne!(significant(&base), significant(&violated));
    }

    #[test]
    fn enforcement_changes_go_at_once_counts_are_paced_and_traffic_waits_for_the_refresh() {
        let settings = StatusSettings::default();
        let status = |state, count: u64, rx: u64| {
            let mut p = peer("a", state);
            p.rx_bytes = Some(rx);
            p.violations = (count > 0).then(|| ViolationSummary {
                count,
                ..ViolationSummary::default()
            });
            node_status(StatusInput {
                interfaces: interfaces(vec![p]),
                applied_generation: Some(1),
                desired_generation: Some(1),
                fast_path_verified: true,
                failure: None,
                previous: None,
                now: at(0),
            })
        };
        let ms = Duration::from_millis;
        let written = status(EnforcementState::Pending, 0, 0);
        assert!(write_due(None, &written, ms(0), &settings), "the first one");
        let enforced = status(EnforcementState::Enforced, 0, 0);
        assert!(write_due(Some(&written), &enforced, ms(10), &settings));
        let attacked = status(EnforcementState::Pending, 3, 0);
        assert!(!write_due(Some(&written), &attacked, ms(100), &settings));
        assert!(write_due(Some(&written), &attacked, ms(500), &settings));
        let traffic = status(EnforcementState::Pending, 0, 1000);
        assert!(!write_due(Some(&written), &traffic, ms(5_000), &settings));
        assert!(write_due(Some(&written), &traffic, ms(30_000), &settings));
        assert!(
            !write_due(Some(&written), &written, ms(60_000), &settings),
            "no change"
        );
    }

    #[test]
    fn fail_closed_events_once_per_peer_and_action_per_minute() {
        let mut events = ActionEvents::default();
        let start = Instant::now();
        let current = interfaces(vec![
            peer("a", EnforcementState::Withdrawn),
            peer("b", EnforcementState::Withdrawn),
        ]);
        let lost = Tick {
            withdrawn: Some(vec!["link detached".into()]),
            ..Tick::default()
        };
        let planned = events.plan("gw-a", &lost, &current, start);
        let reasons: Vec<(String, &str)> = planned
            .iter()
            .map(|e| (e.peer.clone(), e.reason()))
            .collect();
        assert_eq!(
            reasons,
            [("a".into(), "PeerWithdrawn"), ("b".into(), "PeerWithdrawn")]
        );
        assert!(
            planned[0].note().contains("on node gw-a"),
            "{}",
            planned[0].note()
        );
        assert!(planned[0].note().contains("link detached"));
        // Lost again within the minute: nothing new.
        assert!(
            events
                .plan("gw-a", &lost, &current, start + Duration::from_secs(30))
                .is_empty()
        );
        // Recovery is its own action.
        let back = Tick {
            recovered: true,
            ..Tick::default()
        };
        assert_eq!(
            events
                .plan("gw-a", &back, &current, start + Duration::from_secs(31))
                .len(),
            2
        );
        // After the minute, a new loss is announced again.
        assert_eq!(
            events
                .plan("gw-a", &lost, &current, start + Duration::from_secs(61))
                .len(),
            2
        );
    }

    #[test]
    fn a_peer_that_cannot_be_enforced_is_announced_once_per_reason() {
        let mut events = ActionEvents::default();
        let start = Instant::now();
        let failed = interfaces(vec![peer("a", EnforcementState::Failed)]);
        let quiet = Tick::default();
        assert_eq!(events.plan("n", &quiet, &failed, start).len(), 1);
        assert!(
            events
                .plan("n", &quiet, &failed, start + Duration::from_secs(90))
                .is_empty(),
            "still failed for the same reason"
        );
        let mut other = failed.clone();
        other[0].peers[0].message = Some("another reason".into());
        assert_eq!(
            events
                .plan("n", &quiet, &other, start + Duration::from_secs(120))
                .len(),
            1
        );
    }

    #[test]
    fn the_last_state_survives_a_restart_and_a_torn_file_is_ignored() {
        let dir = std::env::temp_dir().join(format!("wgpin-last-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(LastState::load(&dir), None);
        let state = LastState {
            generation: Some(7),
            spec: PinnedNodeStateSpec {
                node_name: "gw-a".into(),
                interfaces: Vec::new(),
            },
        };
        state.save(&dir).expect("save");
        assert_eq!(LastState::load(&dir), Some(state));
        std::fs::write(dir.join(LAST_STATE_FILE), b"{\"generation\": 7, \"sp").expect("torn");
        assert_eq!(LastState::load(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
