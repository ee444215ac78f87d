//! The operator's loop against an API server that is slow and refuses writes: `409 Conflict`
//! and `500` on the node states and on a peer's status. The loop backs off (one failed pass per
//! refusal, a second apart), resumes where it stopped, finishes, and writes statuses that only
//! move forward: the peer whose enforcement never changed keeps `Ready=True` and gets no write,
//! and the changed peer goes `True → False → True` once.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde_json::json;
use wgpin_crds::{
    PinnedNodeState, PinnedPeer,
    kube::{
        self, Api, Client,
        api::{Patch, PatchParams},
        runtime::watcher,
    },
};
use wgpin_operator::{
    controller::{Controller, ControllerSettings, LoopSettings},
    metrics::{ErrorLabels, ErrorReason, Metrics, PassLabels, PassResult},
};
use wgpin_test_apiserver::{Failure, FakeApiServer};

mod support;
use support::{agent_reports_peers_at, now, repin, setup};

/// A client whose every request first waits `delay` milliseconds: a slow API server.
fn slow_client(server: &FakeApiServer, delay: Arc<AtomicU64>) -> Client {
    let inner = server.client();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        let delay = Duration::from_millis(delay.load(Ordering::Relaxed));
        async move {
            tokio::time::sleep(delay).await;
            inner.send(request).await
        }
    });
    Client::new(service, "default")
}

/// Polls `check` every 20 ms until it holds; fails after `timeout`.
async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A peer's `Ready` condition status ("True", "False"), if it has one.
fn ready(peer: &PinnedPeer) -> Option<String> {
    peer.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// Versions of peers as recorded: (name, Ready).
type Recorded = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Every version of every PinnedPeer the API stores from now on: (name, Ready), in order.
fn record_ready(client: &Client, stop: Arc<AtomicBool>) -> Recorded {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let mut events = watcher(
        Api::<PinnedPeer>::all(client.clone()),
        watcher::Config::default(),
    )
    .boxed();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(50), events.next()).await
            else {
                continue;
            };
            if let Ok(watcher::Event::Apply(peer) | watcher::Event::InitApply(peer)) = event
                && let Ok(mut seen) = seen.lock()
            {
                seen.push((peer.metadata.name.clone().unwrap_or_default(), ready(&peer)));
            }
        }
    });
    out
}

/// The distinct values a peer's `Ready` took, in order (repeats folded).
fn transitions(seen: &[(String, Option<String>)], peer: &str) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = Vec::new();
    for (_, ready) in seen.iter().filter(|(name, _)| name == peer) {
        if out.last() != Some(ready) {
            out.push(ready.clone());
        }
    }
    out
}

#[tokio::test]
async fn a_slow_and_refusing_api_is_retried_with_backoff_and_statuses_never_flap() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    let delay = Arc::new(AtomicU64::new(0));
    let metrics = Arc::new(Metrics::new());
    let controller = Controller::new(
        slow_client(&server, delay.clone()),
        ControllerSettings::default(),
        metrics.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = LoopSettings {
        debounce: Duration::from_millis(20),
        max_backoff: Duration::from_secs(1),
        ..Default::default()
    };
    let running = tokio::spawn(wgpin_operator::controller::run(
        controller,
        settings,
        Default::default(),
        now,
        async {
            let _ = stopped.await;
        },
    ));
    let peers: Api<PinnedPeer> = Api::all(client.clone());
    let is_ready = |name: &'static str, wanted: &'static str| {
        let peers = peers.clone();
        async move {
            peers
                .get(name)
                .await
                .is_ok_and(|p| ready(&p).as_deref() == Some(wanted))
        }
    };
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    until("the node states", Duration::from_secs(10), || {
        let states = states.clone();
        async move { states.get("gw-a").await.is_ok() && states.get("gw-b").await.is_ok() }
    })
    .await;
    for node in ["gw-a", "gw-b"] {
        agent_reports_peers_at(&client, node, None, &[("alice", 1), ("bob", 1)]).await;
    }
    until("both peers ready", Duration::from_secs(10), || async {
        is_ready("alice", "True").await && is_ready("bob", "True").await
    })
    .await;

    // From here on: every stored version of the peers, a slow API, and refusals.
    let stop_recording = Arc::new(AtomicBool::new(false));
    let seen = record_ready(&client, stop_recording.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.clear_writes();
    let errors_before = metrics
        .passes
        .get_or_create(&PassLabels {
            result: PassResult::Error,
        })
        .get();
    delay.store(100, Ordering::Relaxed);
    let refusals = [
        ("pinnednodestates/gw-a", 500),
        ("pinnednodestates/gw-a", 500),
        ("pinnednodestates/gw-b", 409),
        ("pinnedpeers/bob/status", 409),
        ("pinnedpeers/bob/status", 409),
        ("pinnedpeers/bob/status", 500),
    ];
    for (path, status) in refusals {
        server.fail_next(Failure {
            method: Some(http::Method::PATCH),
            path_contains: path.to_string(),
            status,
        });
    }
    let started = Instant::now();
    // bob's pin changes (generation 2): his nodes' states change, his status goes to
    // Reconciling until the agents report generation 2. alice's enforcement does not change.
    repin(&client, "bob", &["192.0.2.0/24"]).await;
    until(
        "bob's new pin on both nodes",
        Duration::from_secs(30),
        || {
            let states = states.clone();
            async move {
                let mut both = true;
                for node in ["gw-a", "gw-b"] {
                    both &= states.get(node).await.is_ok_and(|s| {
                        s.spec.interfaces[0]
                            .peers
                            .iter()
                            .any(|p| p.name == "bob" && p.sources == ["192.0.2.0/24"])
                    });
                }
                both
            }
        },
    )
    .await;
    until("bob reconciling", Duration::from_secs(30), || {
        is_ready("bob", "False")
    })
    .await;
    for node in ["gw-a", "gw-b"] {
        agent_reports_peers_at(&client, node, None, &[("alice", 1), ("bob", 2)]).await;
    }
    until("bob ready again", Duration::from_secs(30), || {
        is_ready("bob", "True")
    })
    .await;
    let finished = started.elapsed();
    delay.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_recording.store(true, Ordering::Relaxed);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("stops")
        .expect("no panic");

    let failed_passes = metrics
        .passes
        .get_or_create(&PassLabels {
            result: PassResult::Error,
        })
        .get()
        - errors_before;
    println!(
        "{} refusals at 100 ms a request: {failed_passes} failed passes, finished after {finished:?}",
        refusals.len()
    );
    assert_eq!(
        failed_passes,
        refusals.len() as u64,
        "one failed pass per refusal, nothing else failed"
    );
    // The wait after a failure is 1 s here (the backoff's floor and, in this test, its ceiling).
    assert!(
        finished >= Duration::from_secs(refusals.len() as u64 - 1),
        "the passes were retried without backing off: all done in {finished:?}"
    );
    for reason in [ErrorReason::NodeState, ErrorReason::PeerStatus] {
        assert_eq!(
            metrics.errors.get_or_create(&ErrorLabels { reason }).get(),
            3,
            "{reason:?}"
        );
    }
    let seen = seen.lock().expect("recording").clone();
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        transitions(&seen, "alice"),
        [some("True")],
        "alice's enforcement never changed"
    );
    assert_eq!(
        transitions(&seen, "bob"),
        [some("True"), some("False"), some("True")],
        "bob: one change, one way and back"
    );
    let alice_writes: Vec<_> = server
        .writes()
        .into_iter()
        .filter(|w| w.name == "alice" && w.subresource.as_deref() == Some("status"))
        .collect();
    assert!(
        alice_writes.is_empty(),
        "alice's status was rewritten: {alice_writes:?}"
    );
    let final_states: BTreeMap<String, usize> = server
        .writes()
        .into_iter()
        .filter(|w| w.resource.plural == "pinnednodestates" && w.subresource.is_none())
        .fold(BTreeMap::new(), |mut count, w| {
            *count.entry(w.name).or_default() += 1;
            count
        });
    assert_eq!(
        final_states,
        [("gw-a".to_string(), 1), ("gw-b".to_string(), 1)].into(),
        "each node state written once, when it was accepted"
    );
}

/// A steady stream of changes the pass has nothing to do for (an agent reporting every 10 ms)
/// does not hold passes back: a change made meanwhile reaches the node states within a
/// second. (The loop used to wait for a quiet debounce interval, which never came.)
#[tokio::test]
async fn a_steady_stream_of_reports_does_not_hold_back_a_pass() {
    let server = FakeApiServer::new();
    let client = server.client();
    setup(&client).await;
    let metrics = Arc::new(Metrics::new());
    let controller = Controller::new(client.clone(), ControllerSettings::default(), metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(wgpin_operator::controller::run(
        controller,
        LoopSettings::default(),
        Default::default(),
        now,
        async {
            let _ = stopped.await;
        },
    ));
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    until("the node states", Duration::from_secs(10), || {
        let states = states.clone();
        async move { states.get("gw-a").await.is_ok() }
    })
    .await;
    let reporting = Arc::new(AtomicBool::new(true));
    let reporter = {
        let (client, reporting) = (client.clone(), reporting.clone());
        tokio::spawn(async move {
            let states: Api<PinnedNodeState> = Api::all(client);
            let mut bytes = 0u64;
            while reporting.load(Ordering::Relaxed) {
                // Traffic counters move; nothing the operator rolls up changes.
                bytes += 1;
                let report = json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedNodeState", "status": {
                    "interfaces": [{"name": "gateway", "mode": "Dedicated", "peers": [
                        {"name": "alice", "state": "Enforced", "observedGeneration": 1, "rxBytes": bytes}]}]}});
                states
                    .patch_status(
                        "gw-a",
                        &PatchParams::apply("wgpin-agent"),
                        &Patch::Apply(&report),
                    )
                    .await
                    .expect("agent report");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    repin(&client, "bob", &["192.0.2.0/24"]).await;
    until("bob's new pin", Duration::from_secs(5), || {
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
    let applied = started.elapsed();
    println!("under a report every 10 ms, a change applied {applied:?} after it was made");
    assert!(
        applied < Duration::from_secs(1),
        "a pass was held back {applied:?}"
    );
    reporting.store(false, Ordering::Relaxed);
    let _ = reporter.await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
}
