//! The controller's pass against the in-memory API server: what it writes, and that it writes
//! nothing when nothing changed.

use serde_json::json;
use wgpin_crds::{
    EnforcementState, PinnedInterface, PinnedNodeState, PinnedPeer,
    k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{
        Api, Client,
        api::{Patch, PatchParams},
    },
};
use wgpin_operator::{
    controller::{Controller, ControllerSettings, PassReport, Snapshot, reconcile_all},
    metrics::{ErrorReason, Metrics},
};
use wgpin_test_apiserver::{Failure, FakeApiServer};

mod support;
use support::{agent_reports, create, eventually, now, peer_condition, repin, setup, wait_for_pin};

fn controller(client: &Client) -> Controller {
    Controller::new(
        client.clone(),
        ControllerSettings::default(),
        std::sync::Arc::new(Metrics::new()),
    )
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
    assert_eq!(first.interface_statuses_written, ["gateway"]);
    let gateway = Api::<PinnedInterface>::all(client.clone())
        .get("gateway")
        .await
        .expect("interface")
        .status
        .expect("its status");
    assert_eq!(
        (gateway.selected_nodes, gateway.peers),
        (Some(2), Some(2)),
        "two gateways, two peers; `kubectl get pif` shows them"
    );
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
    let ready = peer_condition(&client, "alice", "Ready")
        .await
        .expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Enforced")
    );
    let alice = Api::<PinnedPeer>::all(client.clone())
        .get("alice")
        .await
        .expect("peer")
        .status
        .expect("status");
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
    let stalled = peer_condition(&client, "copycat", "Stalled")
        .await
        .expect("Stalled");
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "DuplicatePublicKey")
    );
    // ... and one Warning Event on it, not one per pass.
    assert_eq!(pass.events_written, 1, "{pass:?}");
    let events: Api<wgpin_crds::k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let written = events
        .list(&Default::default())
        .await
        .expect("events")
        .items;
    assert_eq!(written.len(), 1);
    let event = &written[0];
    assert_eq!(event.reason.as_deref(), Some("DuplicatePublicKey"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("copycat")
    );
    // Neither a running controller nor a restarted one announces it again: the status says it
    // was announced.
    let mut running = controller(&client);
    for _ in 0..2 {
        let pass = running
            .pass(&Snapshot::list(&client).await.expect("list"), now())
            .await
            .expect("pass");
        assert_eq!(pass.events_written, 0, "announced once: {pass:?}");
    }

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
        controller(&client),
        settings,
        Default::default(),
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
    repin(&client, "bob", &["192.0.2.0/24"]).await;
    wait_for_pin(&client, "gw-a", "bob", &["192.0.2.0/24"]).await;

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

#[tokio::test]
async fn a_deleted_peer_leaves_every_node_before_it_disappears() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    let first = reconcile_all(&client, now()).await.expect("first pass");
    assert_eq!(first.finalizers_added, ["alice", "bob"]);
    for node in ["gw-a", "gw-b"] {
        agent_reports(&client, node, 1, &["alice", "bob"]).await;
    }
    let peers: Api<PinnedPeer> = Api::all(client.clone());
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    let mut controller = controller(&client);
    controller
        .pass(&Snapshot::list(&client).await.expect("list"), now())
        .await
        .expect("pass");

    // kubectl delete: the finalizer holds the object while the nodes still run the key.
    peers
        .delete("alice", &Default::default())
        .await
        .expect("delete");
    let pass = controller
        .pass(&Snapshot::list(&client).await.expect("list"), now())
        .await
        .expect("pass");
    assert_eq!(
        pass.node_states_applied,
        ["gw-a", "gw-b"],
        "alice leaves both specs"
    );
    assert!(
        pass.finalizers_removed.is_empty(),
        "the agents still run alice: {pass:?}"
    );
    for node in ["gw-a", "gw-b"] {
        let state = states.get(node).await.expect("state");
        assert!(
            state.spec.interfaces[0]
                .peers
                .iter()
                .all(|p| p.name != "alice")
        );
    }
    assert!(peers.get("alice").await.is_ok(), "still held");

    // One agent confirms: still held by the other.
    agent_reports(&client, "gw-a", 2, &["bob"]).await;
    let pass = controller
        .pass(&Snapshot::list(&client).await.expect("list"), now())
        .await
        .expect("pass");
    assert!(
        pass.finalizers_removed.is_empty(),
        "gw-b has not confirmed: {pass:?}"
    );

    // The other confirms: the finalizer goes, and with it the object.
    agent_reports(&client, "gw-b", 2, &["bob"]).await;
    let pass = controller
        .pass(&Snapshot::list(&client).await.expect("list"), now())
        .await
        .expect("pass");
    assert_eq!(pass.finalizers_removed, [("alice".to_string(), vec![])]);
    assert!(peers.get("alice").await.is_err(), "gone once released");
    let bob = peers.get("bob").await.expect("bob");
    assert!(
        bob.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.len() == 1)
    );
}

#[tokio::test]
async fn a_silent_agent_holds_a_deletion_only_for_the_grace_period_and_a_gone_node_not_at_all() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    reconcile_all(&client, now()).await.expect("first pass");
    for node in ["gw-a", "gw-b"] {
        agent_reports(&client, node, 1, &["alice", "bob"]).await;
    }
    let peers: Api<PinnedPeer> = Api::all(client.clone());
    let mut controller = Controller::new(
        client.clone(),
        ControllerSettings {
            cleanup_grace: std::time::Duration::from_secs(60),
            ..Default::default()
        },
        std::sync::Arc::new(Metrics::new()),
    );
    // The fake server stamps deletions with the wall clock; passes run at "deleted + n s".
    peers
        .delete("alice", &Default::default())
        .await
        .expect("delete");
    let deleted_at = peers
        .get("alice")
        .await
        .expect("held")
        .metadata
        .deletion_timestamp
        .expect("deleting");
    let at = |seconds: i64| {
        Time(Timestamp::from_second(deleted_at.0.as_second() + seconds).expect("timestamp"))
    };
    // gw-b's node is removed from the cluster; gw-a's agent never answers.
    Api::<Node>::all(client.clone())
        .delete("gw-b", &Default::default())
        .await
        .expect("delete node");
    let pass = controller
        .pass(&Snapshot::list(&client).await.expect("list"), at(1))
        .await
        .expect("pass");
    assert_eq!(pass.node_states_deleted, ["gw-b"]);
    assert!(
        pass.finalizers_removed.is_empty(),
        "gw-a still runs alice: {pass:?}"
    );
    let pass = controller
        .pass(&Snapshot::list(&client).await.expect("list"), at(59))
        .await
        .expect("pass");
    assert!(
        pass.finalizers_removed.is_empty(),
        "within the grace: {pass:?}"
    );
    let pass = controller
        .pass(&Snapshot::list(&client).await.expect("list"), at(60))
        .await
        .expect("pass");
    assert_eq!(
        pass.finalizers_removed,
        [("alice".to_string(), vec!["gw-a".to_string()])],
        "released after the grace, naming the node that never confirmed"
    );
    assert!(peers.get("alice").await.is_err());
}

#[tokio::test]
async fn a_failed_write_stops_the_pass_and_a_restarted_operator_finishes_the_work_once() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    server.fail_next(Failure {
        method: Some(http::Method::PATCH),
        path_contains: "pinnednodestates/gw-b".to_string(),
        status: 500,
    });
    let error = reconcile_all(&client, now())
        .await
        .expect_err("the injected failure");
    assert_eq!(error.reason, ErrorReason::NodeState);
    assert!(
        error.to_string().contains("applying PinnedNodeState gw-b"),
        "{error}"
    );
    let writes: Vec<_> = server.writes().into_iter().map(|w| w.name).collect();
    assert!(writes.contains(&"gw-a".to_string()), "{writes:?}");

    // A new operator (a restart, nothing remembered) picks up where the first stopped.
    server.clear_writes();
    let pass = controller(&client)
        .pass(&Snapshot::list(&client).await.expect("list"), now())
        .await
        .expect("pass");
    assert_eq!(pass.node_states_applied, ["gw-b"], "gw-a was done already");
    assert_eq!(pass.peer_statuses_written, ["alice", "bob"]);
    assert!(pass.finalizers_added.is_empty(), "added before the failure");
    let again = reconcile_all(&client, now()).await.expect("pass");
    assert_eq!(again, PassReport::default());
}

#[tokio::test]
async fn nodes_and_interfaces_come_and_go() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    reconcile_all(&client, now()).await.expect("first pass");
    let states: Api<PinnedNodeState> = Api::all(client.clone());

    // A new gateway node gets a state; nothing else is rewritten.
    create::<Node>(
        &client,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gw-c", "labels": {"wgpin.io/gateway": "true"}}}),
    )
    .await;
    let pass = reconcile_all(&client, now()).await.expect("pass");
    assert_eq!(pass.node_states_applied, ["gw-c"]);
    assert_eq!(
        pass.peer_statuses_written,
        ["alice", "bob"],
        "three nodes selected now"
    );
    let gw_c = states.get("gw-c").await.expect("state");
    assert_eq!(
        gw_c.spec.interfaces[0]
            .peers
            .iter()
            .map(|p| p.dedicated_port)
            .collect::<Vec<_>>(),
        [Some(51820), Some(51821)],
        "the same ports on every node"
    );

    // The interface goes: every state goes, and the peers say why.
    Api::<PinnedInterface>::all(client.clone())
        .delete("gateway", &Default::default())
        .await
        .expect("delete interface");
    let pass = reconcile_all(&client, now()).await.expect("pass");
    assert_eq!(pass.node_states_deleted, ["gw-a", "gw-b", "gw-c"]);
    let stalled = peer_condition(&client, "alice", "Stalled")
        .await
        .expect("Stalled");
    assert_eq!(stalled.reason, "InterfaceNotFound");
}

#[tokio::test]
async fn the_loop_survives_expired_watches_and_api_errors() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let settings = wgpin_operator::controller::LoopSettings {
        debounce: std::time::Duration::from_millis(20),
        max_backoff: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let running = tokio::spawn(wgpin_operator::controller::run(
        controller(&client),
        settings,
        ready.clone(),
        now,
        async {
            let _ = stopped.await;
        },
    ));
    eventually("the first pass", || {
        let ready = ready.clone();
        async move { ready.load(std::sync::atomic::Ordering::Relaxed) }
    })
    .await;

    // The history the watches resume from is gone: they get 410, list again, and go on.
    server.compact();
    // And the next write to gw-a's state fails once: the pass is retried after a backoff.
    server.fail_next(Failure {
        method: Some(http::Method::PATCH),
        path_contains: "pinnednodestates/gw-a".to_string(),
        status: 503,
    });
    repin(&client, "alice", &["192.0.2.7/32"]).await;
    for node in ["gw-a", "gw-b"] {
        wait_for_pin(&client, node, "alice", &["192.0.2.7/32"]).await;
    }
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), running)
        .await
        .expect("stops")
        .expect("no panic");
}
