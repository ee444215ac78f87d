//! Events on PinnedPeers against the in-memory API server: what is written, where, and that
//! repeats within the minute and refused writes do not disturb the pass.

use std::collections::BTreeMap;

use serde_json::json;
use wgpin_crds::{
    EnforcementState, InterfaceStatus, PeerEnforcementStatus, PinnedNodeStateStatus, PinnedPeer,
    ViolationSummary,
    k8s_openapi::{
        api::events::v1::Event,
        apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
        jiff::Timestamp,
    },
    kube::{
        Api, Client,
        api::{ListParams, PostParams},
    },
};
use wgpin_operator::{
    Problem, ProblemReason,
    events::{EventPlanner, EventSettings, EventWriter, PassInput, PublishReport},
};
use wgpin_test_apiserver::{Failure, FakeApiServer, Write, resource_of};

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000 + seconds).expect("timestamp"))
}

async fn create_peer(client: &Client, name: &str) -> PinnedPeer {
    let peer: PinnedPeer = serde_json::from_value(json!({
        "apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "metadata": {"name": name},
        "spec": {"interface": "gateway", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
                 "allowedIPs": ["198.51.100.2/32"], "sources": ["203.0.113.0/24"]},
    }))
    .expect("fixture");
    Api::<PinnedPeer>::all(client.clone())
        .create(&PostParams::default(), &peer)
        .await
        .expect("create")
}

/// Node gw-a's report: `alice` with `count` violations, the latest from `source`.
fn reports(count: u64, source: &str) -> BTreeMap<String, PinnedNodeStateStatus> {
    let status = PinnedNodeStateStatus {
        observed_generation: Some(1),
        conditions: Vec::new(),
        interfaces: vec![InterfaceStatus {
            name: "gateway".into(),
            mode_fallback: None,
            mode: None,
            backend: None,
            fast_path: None,
            public_key: None,
            peers: vec![PeerEnforcementStatus {
                name: "alice".into(),
                state: EnforcementState::Enforced,
                observed_generation: Some(1),
                listen_port: None,
                endpoint: None,
                last_handshake_time: None,
                rx_bytes: None,
                tx_bytes: None,
                violations: Some(ViolationSummary {
                    count,
                    last_source: Some(source.into()),
                    last_node: None,
                    last_time: None,
                }),
                message: None,
            }],
        }],
    };
    [("gw-a".to_string(), status)].into()
}

fn event_writes(server: &FakeApiServer) -> Vec<Write> {
    server
        .writes()
        .into_iter()
        .filter(|w| w.resource == resource_of::<Event>())
        .collect()
}

/// One controller pass, as far as Events go: plan, then publish.
async fn pass(
    planner: &mut EventPlanner,
    writer: &EventWriter,
    peers: &[PinnedPeer],
    reports: &BTreeMap<String, PinnedNodeStateStatus>,
    problems: &[Problem],
    now: Time,
) -> PublishReport {
    let planned = planner.plan(&PassInput {
        peers,
        reports,
        problems,
        now: &now,
    });
    writer.publish(&planned, &now).await
}

#[tokio::test]
async fn violations_and_problems_are_written_once_a_minute_with_counts() {
    let server = FakeApiServer::new();
    let client = server.client();
    let alice = create_peer(&client, "alice").await;
    let bob = create_peer(&client, "bob").await;
    let peers = vec![alice.clone(), bob.clone()];
    let settings = EventSettings {
        namespace: "wgpin-system".into(),
        ..EventSettings::new("wgpin-operator-5c7d9-x2k4q")
    };
    let writer = EventWriter::new(client.clone(), settings);
    let mut planner = EventPlanner::default();
    let bob_problem = [Problem {
        kind: "PinnedPeer",
        name: "bob".into(),
        reason: ProblemReason::DuplicatePublicKey,
        message: "PinnedPeer \"alice\" is older and has the same public key".into(),
    }];
    let source = "198.51.100.7:40000";
    server.clear_writes();

    // First pass: the counters are a baseline (no burst of old violations); bob's problem is news.
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &reports(5, source),
        &bob_problem,
        at(0),
    )
    .await;
    assert_eq!(
        report,
        PublishReport {
            written: 1,
            failed: 0
        }
    );
    let writes = event_writes(&server);
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].method, "create");
    assert_eq!(writes[0].namespace.as_deref(), Some("wgpin-system"));
    let problem = server
        .get(
            &resource_of::<Event>(),
            Some("wgpin-system"),
            &writes[0].name,
        )
        .expect("stored");
    assert_eq!(problem["type"], "Warning");
    assert_eq!(problem["reason"], "DuplicatePublicKey");
    assert_eq!(problem["action"], "Render");
    assert_eq!(
        problem["note"],
        "PinnedPeer \"alice\" is older and has the same public key"
    );
    assert_eq!(
        problem["regarding"],
        json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "name": "bob",
               "uid": bob.metadata.uid.clone().expect("uid")})
    );

    // Three new violations: one Event.
    server.clear_writes();
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &reports(8, source),
        &bob_problem,
        at(5),
    )
    .await;
    assert_eq!(report.written, 1);
    let writes = event_writes(&server);
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert!(writes[0].name.starts_with("alice."), "{}", writes[0].name);
    let events: Api<Event> = Api::namespaced(client.clone(), "wgpin-system");
    let event = events.get(&writes[0].name).await.expect("the Event");
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("SourceViolation"));
    assert_eq!(event.action.as_deref(), Some("EnforcePin"));
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("wgpin.io/operator")
    );
    assert_eq!(
        event.reporting_instance.as_deref(),
        Some("wgpin-operator-5c7d9-x2k4q")
    );
    assert_eq!(event.metadata.namespace.as_deref(), Some("wgpin-system"));
    assert_eq!(event.event_time, Some(MicroTime(at(5).0)));
    let regarding = event.regarding.expect("regarding");
    assert_eq!(regarding.api_version.as_deref(), Some("wgpin.io/v1alpha1"));
    assert_eq!(regarding.kind.as_deref(), Some("PinnedPeer"));
    assert_eq!(regarding.name.as_deref(), Some("alice"));
    assert_eq!(regarding.uid, alice.metadata.uid);
    assert_eq!(regarding.namespace, None, "PinnedPeer is cluster-scoped");
    let note = event.note.expect("a note");
    assert!(
        note.starts_with("3 violations from 198.51.100.7 (latest 198.51.100.7:40000)"),
        "{note}"
    );
    assert!(note.contains("on node gw-a"), "{note}");

    // More inside the minute: nothing written, bob's unchanged problem not repeated.
    server.clear_writes();
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &reports(10, source),
        &bob_problem,
        at(30),
    )
    .await;
    assert_eq!(report, PublishReport::default());
    assert!(server.writes().is_empty(), "{:?}", server.writes());
    assert_eq!(planner.next_due(), Some(at(65)));

    // The minute is over: the carried two, in one Event. Bob's problem is gone: one Normal.
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &reports(10, source),
        &[],
        at(65),
    )
    .await;
    assert_eq!(report.written, 2);
    let all = events.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 4);
    let notes: Vec<(String, String, String)> = all
        .items
        .iter()
        .filter(|e| e.event_time == Some(MicroTime(at(65).0)))
        .map(|e| {
            (
                e.regarding
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
                e.type_.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes.iter().any(|(peer, type_, note)| peer == "alice"
            && type_ == "Warning"
            && note.starts_with("2 violations from 198.51.100.7")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|(peer, type_, note)| peer == "bob"
            && type_ == "Normal"
            && note.starts_with("no longer DuplicatePublicKey")),
        "{notes:?}"
    );
}

#[tokio::test]
async fn events_go_to_default_unless_told_otherwise() {
    let server = FakeApiServer::new();
    let client = server.client();
    let peers = vec![create_peer(&client, "alice").await];
    let writer = EventWriter::new(client.clone(), EventSettings::new("operator-0"));
    let mut planner = EventPlanner::default();
    let invalid = [Problem {
        kind: "PinnedPeer",
        name: "alice".into(),
        reason: ProblemReason::InterfaceNotFound,
        message: "spec.interface names PinnedInterface \"gateway\", which does not exist".into(),
    }];
    server.clear_writes();
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &BTreeMap::new(),
        &invalid,
        at(0),
    )
    .await;
    assert_eq!(report.written, 1);
    let writes = event_writes(&server);
    assert_eq!(writes[0].namespace.as_deref(), Some("default"));
    let stored = server
        .get(&resource_of::<Event>(), Some("default"), &writes[0].name)
        .expect("stored");
    assert_eq!(stored["reason"], "InterfaceNotFound");
    assert_eq!(stored["reportingController"], "wgpin.io/operator");
    assert_eq!(stored["reportingInstance"], "operator-0");
}

#[tokio::test]
async fn a_refused_write_is_counted_and_the_rest_are_written() {
    let server = FakeApiServer::new();
    let client = server.client();
    let peers = vec![
        create_peer(&client, "alice").await,
        create_peer(&client, "bob").await,
    ];
    let writer = EventWriter::new(client.clone(), EventSettings::new("operator-0"));
    let mut planner = EventPlanner::default();
    let problems: Vec<Problem> = ["alice", "bob"]
        .iter()
        .map(|name| Problem {
            kind: "PinnedPeer",
            name: name.to_string(),
            reason: ProblemReason::InvalidSpec,
            message: "sources is empty".into(),
        })
        .collect();
    server.clear_writes();
    server.fail_next(Failure {
        // Only Event creates go to this path.
        method: None,
        path_contains: "/apis/events.k8s.io/v1/namespaces/default/events".into(),
        status: 500,
    });
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &BTreeMap::new(),
        &problems,
        at(0),
    )
    .await;
    assert_eq!(
        report,
        PublishReport {
            written: 1,
            failed: 1
        }
    );
    let writes = event_writes(&server);
    assert_eq!(writes.len(), 1);
    assert!(writes[0].name.starts_with("bob."), "alice's was refused");

    // Best-effort: the refused Event is not retried on the next pass.
    server.clear_writes();
    let report = pass(
        &mut planner,
        &writer,
        &peers,
        &BTreeMap::new(),
        &problems,
        at(1),
    )
    .await;
    assert_eq!(report, PublishReport::default());
    assert!(server.writes().is_empty());
}
