//! Fixtures shared by the operator's tests: a small cluster (three nodes, one interface, two
//! peers), agent reports, and polling.
#![allow(dead_code)]

use serde_json::json;
use wgpin_crds::{
    PinnedInterface, PinnedNodeState, PinnedPeer,
    k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{
        Api, Client,
        api::{Patch, PatchParams, PostParams},
    },
};

pub fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).expect("timestamp"))
}

pub async fn create<K>(client: &Client, value: serde_json::Value)
where
    K: wgpin_crds::kube::Resource<
            DynamicType = (),
            Scope = wgpin_crds::k8s_openapi::ClusterResourceScope,
        > + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let object: K = serde_json::from_value(value).expect("fixture");
    Api::<K>::all(client.clone())
        .create(&PostParams::default(), &object)
        .await
        .expect("create");
}

pub async fn setup(client: &Client) {
    for (name, gateway) in [("gw-a", true), ("gw-b", true), ("worker", false)] {
        let labels = if gateway {
            json!({"wgpin.io/gateway": "true"})
        } else {
            json!({})
        };
        create::<Node>(client, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})).await;
    }
    create::<PinnedInterface>(
        client,
        json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedInterface", "metadata": {"name": "gateway"},
               "spec": {"nodeSelector": {"matchLabels": {"wgpin.io/gateway": "true"}}, "interfaceName": "wgpin0",
                        "listenPort": 51820, "listenPortEnd": 51829, "mode": "Dedicated"}}),
    )
    .await;
    for (name, key) in [
        ("alice", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="),
        ("bob", "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0="),
    ] {
        create::<PinnedPeer>(
            client,
            json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "metadata": {"name": name},
                   "spec": {"interface": "gateway", "publicKey": key,
                            "allowedIPs": [format!("198.51.100.{}/32", name.len())], "sources": ["203.0.113.0/24"]}}),
        )
        .await;
    }
}

/// An agent's report for `node`: the peers it runs, at `generation` of its state.
pub async fn agent_reports(client: &Client, node: &str, generation: i64, peers: &[&str]) {
    let peers: Vec<(&str, i64)> = peers.iter().map(|name| (*name, 1)).collect();
    agent_reports_peers_at(client, node, Some(generation), &peers).await;
}

/// An agent's report for `node`: each peer enforced at its PinnedPeer's generation, and the
/// state's generation when given.
pub async fn agent_reports_peers_at(
    client: &Client,
    node: &str,
    generation: Option<i64>,
    peers: &[(&str, i64)],
) {
    let peers: Vec<_> = peers
        .iter()
        .map(|(name, observed)| json!({"name": name, "state": "Enforced", "observedGeneration": observed}))
        .collect();
    let mut status =
        json!({"interfaces": [{"name": "gateway", "mode": "Dedicated", "peers": peers}]});
    if let Some(generation) = generation {
        status["observedGeneration"] = json!(generation);
    }
    let report =
        json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedNodeState", "status": status});
    Api::<PinnedNodeState>::all(client.clone())
        .patch_status(
            node,
            &PatchParams::apply("wgpin-agent"),
            &Patch::Apply(&report),
        )
        .await
        .expect("agent report");
}

/// Polls `check` until it holds, for at most 5 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A peer's status as stored, and one of its conditions (`None` when it has none of that type).
pub async fn peer_condition(
    client: &Client,
    peer: &str,
    type_: &str,
) -> Option<wgpin_crds::k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let status = Api::<PinnedPeer>::all(client.clone())
        .get(peer)
        .await
        .expect("peer")
        .status
        .expect("status");
    status.conditions.into_iter().find(|c| c.type_ == type_)
}

/// Changes a peer's pin (its `sources`).
pub async fn repin(client: &Client, peer: &str, sources: &[&str]) {
    Api::<PinnedPeer>::all(client.clone())
        .patch(
            peer,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sources": sources}})),
        )
        .await
        .expect("change the pin");
}

/// Waits until `node`'s state carries `peer` with exactly `sources`.
pub async fn wait_for_pin(client: &Client, node: &str, peer: &str, sources: &[&str]) {
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    eventually(&format!("{peer}'s pin {sources:?} on {node}"), || {
        let states = states.clone();
        async move {
            states.get(node).await.is_ok_and(|s| {
                s.spec
                    .interfaces
                    .iter()
                    .flat_map(|i| &i.peers)
                    .any(|p| p.name == peer && p.sources == sources)
            })
        }
    })
    .await;
}
