//! The controller's one pass: read the objects, render, write only what differs.
//!
//! dereference (list `PinnedInterface`, `PinnedPeer`, `Node`, `PinnedNodeState`) → render
//! (pure, [`crate::render`]) → apply (server-side apply of each changed `PinnedNodeState`,
//! delete the states of nodes that run nothing) → status (roll the agents' reports up into
//! each `PinnedPeer`, [`crate::roll_up`], written only when it changed).
//!
//! A pass over unchanged inputs writes nothing. The watch loop, finalizers, Events, leader
//! election and metrics build on this pass.

use std::collections::BTreeMap;

use wgpin_crds::{
    PinnedInterface, PinnedNodeState, PinnedNodeStateStatus, PinnedPeer,
    k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time},
    kube::{
        Api, Client, ResourceExt,
        api::{DeleteParams, ListParams, Patch, PatchParams},
    },
};

use crate::{NodeInfo, PortAssignments, RollUpInput, render, roll_up};

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "wgpin-operator";
/// Label on the `PinnedNodeState`s the operator owns.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "wgpin-operator");

/// What a pass wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub node_states_applied: Vec<String>,
    pub node_states_deleted: Vec<String>,
    pub peer_statuses_written: Vec<String>,
}

impl PassReport {
    pub fn writes(&self) -> usize {
        self.node_states_applied.len()
            + self.node_states_deleted.len()
            + self.peer_statuses_written.len()
    }
}

/// Why a pass failed; the API error says which call.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: wgpin_crds::kube::Error,
    },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(wgpin_crds::kube::Error) -> ControllerError {
    let what = what.into();
    move |source| ControllerError::Api { what, source }
}

/// One pass over everything.
pub async fn reconcile_all(client: &Client, now: Time) -> Result<PassReport, ControllerError> {
    let interfaces_api: Api<PinnedInterface> = Api::all(client.clone());
    let peers_api: Api<PinnedPeer> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let states_api: Api<PinnedNodeState> = Api::all(client.clone());
    let all = ListParams::default();

    // Dereference.
    let interfaces = interfaces_api
        .list(&all)
        .await
        .map_err(api_err("listing PinnedInterfaces"))?
        .items;
    let peers = peers_api
        .list(&all)
        .await
        .map_err(api_err("listing PinnedPeers"))?
        .items;
    let nodes: Vec<NodeInfo> = nodes_api
        .list(&all)
        .await
        .map_err(api_err("listing Nodes"))?
        .items
        .into_iter()
        .map(|node| NodeInfo {
            name: node.name_any(),
            labels: node.labels().clone(),
        })
        .collect();
    let states: BTreeMap<String, PinnedNodeState> = states_api
        .list(&all)
        .await
        .map_err(api_err("listing PinnedNodeStates"))?
        .items
        .into_iter()
        .map(|state| (state.name_any(), state))
        .collect();
    // Dedicated ports handed out before, so that none moves.
    let previous: PortAssignments = peers
        .iter()
        .filter_map(|peer| {
            let port = peer.status.as_ref()?.listen_port?;
            Some(((peer.spec.interface.clone(), peer.name_any()), port))
        })
        .collect();

    // Render.
    let rendered = render(&interfaces, &peers, &nodes, &previous);
    let mut report = PassReport::default();

    // Apply: each changed node state, then the states of nodes that run nothing.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for (node, spec) in &rendered.nodes {
        if states
            .get(node)
            .is_some_and(|existing| existing.spec == *spec)
        {
            continue;
        }
        let mut state = PinnedNodeState::new(node, spec.clone());
        state.metadata.labels = Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into());
        states_api
            .patch(node, &params, &Patch::Apply(&state))
            .await
            .map_err(api_err(format!("applying PinnedNodeState {node}")))?;
        report.node_states_applied.push(node.clone());
    }
    for (name, state) in &states {
        let ours = state
            .labels()
            .get(MANAGED_BY.0)
            .is_some_and(|v| v == MANAGED_BY.1);
        if ours && !rendered.nodes.contains_key(name) {
            states_api
                .delete(name, &DeleteParams::default())
                .await
                .map_err(api_err(format!("deleting PinnedNodeState {name}")))?;
            report.node_states_deleted.push(name.clone());
        }
    }

    // Status: the nodes each peer is rendered on, and the agents' reports.
    let mut rendered_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, spec) in &rendered.nodes {
        for peer in spec.interfaces.iter().flat_map(|i| &i.peers) {
            rendered_on
                .entry(peer.name.clone())
                .or_default()
                .push(node.clone());
        }
    }
    let reports: BTreeMap<String, PinnedNodeStateStatus> = states
        .iter()
        .filter_map(|(name, state)| Some((name.clone(), state.status.clone()?)))
        .collect();
    for peer in &peers {
        let name = peer.name_any();
        let problems: Vec<_> = rendered
            .problems
            .iter()
            .filter(|p| p.kind == "PinnedPeer" && p.name == name)
            .filter(|p| p.reason != crate::ProblemReason::NoNodeSelected)
            .cloned()
            .collect();
        let status = roll_up(&RollUpInput {
            peer,
            nodes: rendered_on
                .get(&name)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            reports: &reports,
            problems: &problems,
            dedicated_port: rendered
                .ports
                .get(&(peer.spec.interface.clone(), name.clone()))
                .copied(),
            previous: peer.status.as_ref(),
            now: now.clone(),
        });
        if peer.status.as_ref() == Some(&status) {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "wgpin.io/v1alpha1",
            "kind": "PinnedPeer",
            "status": status,
        });
        peers_api
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
            .map_err(api_err(format!("writing the status of PinnedPeer {name}")))?;
        report.peer_statuses_written.push(name);
    }
    Ok(report)
}

/// How the loop paces itself.
#[derive(Clone, Copy, Debug)]
pub struct LoopSettings {
    /// How long to gather more changes before a pass.
    pub debounce: std::time::Duration,
    /// A pass at least this often, to repair what no watch reported.
    pub resync: std::time::Duration,
    /// The longest wait after failed passes (the wait doubles from 1 s up to this).
    pub max_backoff: std::time::Duration,
}

impl Default for LoopSettings {
    fn default() -> Self {
        Self {
            debounce: std::time::Duration::from_millis(100),
            resync: std::time::Duration::from_secs(300),
            max_backoff: std::time::Duration::from_secs(60),
        }
    }
}

/// Watches every input and runs a pass after each burst of changes, at least every
/// `resync`, and again after a failure with a backoff that grows and resets on success. Returns
/// when `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: LoopSettings,
    now: impl Fn() -> Time,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use futures::StreamExt as _;
    use wgpin_crds::kube::runtime::watcher;

    fn changes<K>(api: Api<K>) -> futures::stream::BoxStream<'static, ()>
    where
        K: wgpin_crds::kube::Resource
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + 'static,
        K::DynamicType: Default,
    {
        // Any event, even an error (the watcher retries by itself), is a reason to look again.
        watcher(api, watcher::Config::default().any_semantic())
            .map(|_| ())
            .boxed()
    }
    let mut events = futures::stream::select_all([
        changes(Api::<PinnedPeer>::all(client.clone())),
        changes(Api::<PinnedInterface>::all(client.clone())),
        changes(Api::<Node>::all(client.clone())),
        changes(Api::<PinnedNodeState>::all(client.clone())),
    ]);
    tokio::pin!(shutdown);
    let mut backoff = std::time::Duration::ZERO;
    let mut pending = true;
    loop {
        let wait = if !backoff.is_zero() {
            backoff
        } else if pending {
            settings.debounce
        } else {
            settings.resync
        };
        tokio::select! {
            () = &mut shutdown => break,
            event = events.next() => {
                if event.is_none() {
                    tracing::error!("the watches ended; stopping");
                    break;
                }
                pending = true;
                continue;
            }
            () = tokio::time::sleep(wait) => {}
        }
        match reconcile_all(&client, now()).await {
            Ok(report) => {
                backoff = std::time::Duration::ZERO;
                pending = false;
                if report.writes() > 0 {
                    tracing::info!(
                        applied = ?report.node_states_applied,
                        deleted = ?report.node_states_deleted,
                        statuses = report.peer_statuses_written.len(),
                        "reconciled"
                    );
                }
            }
            Err(error) => {
                backoff =
                    (backoff * 2).clamp(std::time::Duration::from_secs(1), settings.max_backoff);
                tracing::error!(retry_in = ?backoff, "pass failed: {error}");
            }
        }
    }
}
