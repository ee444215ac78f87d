//! The controller's pass against the in-memory API server: what it writes, and that it writes
//! nothing when nothing changed.

use serde_json::json;
use wgpin_crds::{
    EnforcementState, PinnedInterface, PinnedNodeState, PinnedPeer,
    k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{
        Api, Client,
        api::{Patch, PatchParams, PostParams},
    },
};
use wgpin_operator::controller::{PassReport, reconcile_all};
use wgpin_test_apiserver::FakeApiServer;

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).expect("timestamp"))
}

async fn create<K>(client: &Client, value: serde_json::Value)
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

async fn setup(client: &Client) {
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

#[tokio::test]
async fn a_pass_renders_node_states_and_a_second_writes_nothing() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;

    let first = reconcile_all(&client, now()).await.expect("first pass");
    assert_eq!(
        first.node_states_applied,
        ["gw-a", "gw-b"],
        "the worker runs nothing"
    );
    assert_eq!(first.peer_statuses_written, ["alice", "bob"]);
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    let gw_a = states.get("gw-a").await.expect("rendered");
    let peers: Vec<(String, Option<u16>)> = gw_a.spec.interfaces[0]
        .peers
        .iter()
        .map(|p| (p.name.clone(), p.dedicated_port))
        .collect();
    assert_eq!(
        peers,
        [
            ("alice".to_string(), Some(51820)),
            ("bob".to_string(), Some(51821))
        ]
    );
    let alice = Api::<PinnedPeer>::all(client.clone())
        .get("alice")
        .await
        .expect("peer");
    let status = alice.status.expect("status written");
    assert_eq!(status.listen_port, Some(51820));
    assert_eq!(
        status.node_counts.map(|c| (c.selected, c.pending)),
        Some((2, 2)),
        "no agent has reported yet"
    );

    server.clear_writes();
    let second = reconcile_all(&client, now()).await.expect("second pass");
    assert_eq!(
        second,
        PassReport::default(),
        "nothing changed, nothing written"
    );
    assert!(server.writes().is_empty(), "{:?}", server.writes());
}

#[tokio::test]
async fn agent_reports_roll_up_and_conflicts_and_departures_are_handled() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    reconcile_all(&client, now()).await.expect("first pass");

    // Both agents report alice enforced.
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    for node in ["gw-a", "gw-b"] {
        let report = json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedNodeState", "status": {
        "interfaces": [{"name": "gateway", "mode": "Dedicated", "publicKey": format!("key-of-{node}"), "peers": [
            {"name": "alice", "state": "Enforced", "observedGeneration": 1, "listenPort": 51820,
             "violations": {"count": 3, "lastSource": "192.0.2.66:4000", "lastTime": "2023-11-14T22:13:30Z"}}
        ]}]}});
        states
            .patch_status(
                node,
                &PatchParams::apply("wgpin-agent"),
                &Patch::Apply(&report),
            )
            .await
            .expect("agent report");
    }
    let pass = reconcile_all(&client, now()).await.expect("roll-up pass");
    assert_eq!(
        pass.peer_statuses_written,
        ["alice"],
        "only the peer whose reports changed"
    );
    let alice = Api::<PinnedPeer>::all(client.clone())
        .get("alice")
        .await
        .expect("peer")
        .status
        .expect("status");
    let ready = alice
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Enforced")
    );
    assert_eq!(alice.violations.map(|v| v.count), Some(6));
    assert!(
        alice
            .nodes
            .iter()
            .all(|n| n.state == EnforcementState::Enforced && n.public_key.is_some())
    );

    // A younger peer with alice's key is refused with a condition that says why.
    create::<PinnedPeer>(
        &client,
        json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "metadata": {"name": "copycat"},
               "spec": {"interface": "gateway", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
                        "allowedIPs": ["198.51.100.99/32"], "sources": ["192.0.2.0/24"]}}),
    )
    .await;
    let pass = reconcile_all(&client, now()).await.expect("pass");
    assert!(
        pass.node_states_applied.is_empty(),
        "the copy changes no node: {pass:?}"
    );
    let copycat = Api::<PinnedPeer>::all(client.clone())
        .get("copycat")
        .await
        .expect("peer")
        .status
        .expect("status");
    let stalled = copycat
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "DuplicatePublicKey")
    );

    // A gateway loses its label: its state goes, only it.
    Api::<Node>::all(client.clone())
        .patch(
            "gw-b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"wgpin.io/gateway": null}}})),
        )
        .await
        .expect("relabel");
    server.clear_writes();
    let pass = reconcile_all(&client, now()).await.expect("pass");
    assert_eq!(pass.node_states_deleted, ["gw-b"]);
    assert!(pass.node_states_applied.is_empty());
    assert!(states.get("gw-b").await.is_err());
}

/// Polls `check` until it holds, for at most 5 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
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

#[tokio::test]
async fn the_loop_follows_changes_settles_and_stops_on_shutdown() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = wgpin_operator::controller::LoopSettings {
        debounce: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let running = tokio::spawn(wgpin_operator::controller::run(
        client.clone(),
        settings,
        now,
        async {
            let _ = stopped.await;
        },
    ));
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    eventually("the node states", || {
        let states = states.clone();
        async move { states.get("gw-a").await.is_ok() && states.get("gw-b").await.is_ok() }
    })
    .await;

    // A change to a peer reaches its nodes' states.
    Api::<PinnedPeer>::all(client.clone())
        .patch(
            "bob",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sources": ["192.0.2.0/24"]}})),
        )
        .await
        .expect("change bob");
    eventually("bob's new pin on gw-a", || {
        let states = states.clone();
        async move {
            states.get("gw-a").await.is_ok_and(|s| {
                s.spec.interfaces[0]
                    .peers
                    .iter()
                    .any(|p| p.name == "bob" && p.sources == ["192.0.2.0/24"])
            })
        }
    })
    .await;

    // Then it settles: its own writes cause one more pass that writes nothing.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.clear_writes();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        server.writes().is_empty(),
        "the loop keeps writing: {:?}",
        server.writes()
    );

    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), running)
        .await
        .expect("stops")
        .expect("no panic");
}
