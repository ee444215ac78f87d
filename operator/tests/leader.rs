//! Leader election against the in-memory API server, on tokio's paused clock: time moves only
//! when every task waits, so durations are exact and the tests take milliseconds of real time.
//!
//! Every test records each candidate's published leadership and checks, at each moment a
//! candidate becomes leader, that no other candidate is leader.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Barrier, oneshot},
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};
use wgpin_crds::{
    k8s_openapi::{
        api::coordination::v1::{Lease, LeaseSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    },
    kube::{self, Api, api::PostParams},
};
use wgpin_operator::leader::{Error, LeaderElector, Leadership, Settings, Timing};
use wgpin_test_apiserver::{Failure, FakeApiServer, resource_of};

const NAMESPACE: &str = "wgpin-system";
const LEASE: &str = "wgpin-operator";

const LEASE_DURATION: Duration = Duration::from_secs(1);
const RENEW_DEADLINE: Duration = Duration::from_millis(600);
const RETRY: Duration = Duration::from_millis(100);
/// A standby waits up to 20% longer than the retry period.
const RETRY_JITTERED: Duration = Duration::from_millis(120);

fn timing() -> Timing {
    Timing {
        lease_duration: LEASE_DURATION,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY,
    }
}

/// Leadership changes of all candidates, and any moment two were leader at once.
#[derive(Clone, Default)]
struct Monitor(Arc<Mutex<MonitorState>>);

#[derive(Default)]
struct MonitorState {
    candidates: Vec<(String, Leadership)>,
    changes: Vec<(Instant, String, bool)>,
    overlaps: Vec<String>,
}

impl Monitor {
    fn lock(&self) -> std::sync::MutexGuard<'_, MonitorState> {
        self.0.lock().expect("monitor")
    }

    fn add(&self, id: &str, leadership: Leadership) {
        self.lock()
            .candidates
            .push((id.to_string(), leadership.clone()));
        let monitor = self.clone();
        let id = id.to_string();
        let mut receiver = leadership.receiver();
        tokio::spawn(async move {
            let mut last = false;
            loop {
                let closed = receiver.changed().await.is_err();
                let leader = *receiver.borrow_and_update();
                if leader != last {
                    last = leader;
                    let mut state = monitor.lock();
                    state.changes.push((Instant::now(), id.clone(), leader));
                    if leader {
                        let others: Vec<String> = state
                            .candidates
                            .iter()
                            .filter(|(other, l)| *other != id && l.is_leader())
                            .map(|(other, _)| other.clone())
                            .collect();
                        if !others.is_empty() {
                            state
                                .overlaps
                                .push(format!("{id} became leader while {others:?} were"));
                        }
                    }
                }
                if closed {
                    break;
                }
            }
        });
    }

    /// When `id` became leader (`true`) or stopped (`false`).
    fn times(&self, id: &str, leader: bool) -> Vec<Instant> {
        self.lock()
            .changes
            .iter()
            .filter(|(_, who, l)| who == id && *l == leader)
            .map(|(at, _, _)| *at)
            .collect()
    }

    fn assert_never_two_leaders(&self) {
        let state = self.lock();
        assert!(state.overlaps.is_empty(), "{:?}", state.overlaps);
    }
}

struct Candidate {
    leadership: Leadership,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl Candidate {
    fn start(client: kube::Client, id: &str, monitor: &Monitor) -> Self {
        let settings = Settings {
            timing: timing(),
            ..Settings::new(NAMESPACE, LEASE, id)
        };
        let (elector, leadership) = LeaderElector::new(client, settings).expect("settings");
        monitor.add(id, leadership.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(elector.run(async move {
            let _ = stopped.await;
        }));
        Self {
            leadership,
            stop: Some(stop),
            task,
        }
    }

    fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// Waits (at most `within`) until this candidate leads; returns when.
    async fn leads_within(&self, within: Duration) -> Instant {
        let mut leadership = self.leadership.clone();
        assert!(
            timeout(within, leadership.acquired())
                .await
                .expect("not leader in time"),
            "the elector stopped"
        );
        Instant::now()
    }

    /// Waits (at most `within`) until this candidate stops leading; returns when.
    async fn steps_down_within(&self, within: Duration) -> Instant {
        let mut leadership = self.leadership.clone();
        timeout(within, leadership.lost())
            .await
            .expect("still leader");
        Instant::now()
    }

    /// Shuts down gracefully and returns what `run` returned.
    async fn stop(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("run returns after shutdown")
            .expect("run does not panic")
    }
}

fn lease_spec(server: &FakeApiServer) -> LeaseSpec {
    let object = server
        .get(&resource_of::<Lease>(), Some(NAMESPACE), LEASE)
        .expect("the lease exists");
    let lease: Lease = serde_json::from_value(object).expect("a lease");
    lease.spec.expect("a spec")
}

fn lease_writes(server: &FakeApiServer) -> usize {
    server
        .writes()
        .iter()
        .filter(|w| w.resource == resource_of::<Lease>() && w.name == LEASE)
        .count()
}

/// A client whose requests fail (as a broken connection would) while `broken` is set.
fn partitionable_client(server: &FakeApiServer, broken: Arc<AtomicBool>) -> kube::Client {
    let inner = server.client();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        let broken = broken.clone();
        async move {
            if broken.load(Ordering::SeqCst) {
                return Err(kube::Error::Service("network partition".into()));
            }
            inner.send(request).await
        }
    });
    kube::Client::new(service, NAMESPACE)
}

/// A client whose first read waits at `gate` after the answer came, so that candidates sharing
/// the gate all read the same version before any of them writes; counts `409`s.
fn gated_client(
    server: &FakeApiServer,
    gate: Arc<Barrier>,
    conflicts: Arc<AtomicUsize>,
) -> kube::Client {
    let inner = server.client();
    let first = Arc::new(AtomicBool::new(true));
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        let gate = gate.clone();
        let conflicts = conflicts.clone();
        let first = first.clone();
        async move {
            let read = request.method() == http::Method::GET;
            let response = inner.send(request).await?;
            if read && first.swap(false, Ordering::SeqCst) {
                gate.wait().await;
            }
            if response.status() == http::StatusCode::CONFLICT {
                conflicts.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, kube::Error>(response)
        }
    });
    kube::Client::new(service, NAMESPACE)
}

#[tokio::test(start_paused = true)]
async fn two_candidates_one_leader_at_a_time() {
    let server = FakeApiServer::new();
    let monitor = Monitor::default();
    let mut a = Candidate::start(server.client(), "a", &monitor);
    a.leads_within(Duration::from_secs(1)).await;
    let mut b = Candidate::start(server.client(), "b", &monitor);

    let writes = lease_writes(&server);
    // Half a retry period off the leader's rhythm, so that nothing else happens as b stops.
    sleep(Duration::from_millis(5_050)).await;
    assert!(a.is_leader());
    assert!(!b.is_leader());
    // The leader renews once per retry period, no more; the standby never writes.
    let renewals = lease_writes(&server) - writes;
    assert!((49..=52).contains(&renewals), "{renewals} renewals in 5 s");
    let spec = lease_spec(&server);
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert_eq!(spec.lease_transitions, Some(0));
    assert_eq!(spec.lease_duration_seconds, Some(1));
    assert!(spec.acquire_time.is_some() && spec.renew_time >= spec.acquire_time);

    // A standby that stops leaves the lease alone.
    let writes = lease_writes(&server);
    b.stop().await.expect("b stops");
    assert_eq!(lease_writes(&server), writes);
    assert_eq!(
        lease_spec(&server).holder_identity.as_deref(),
        Some("a"),
        "a standby's shutdown does not touch the lease"
    );
    a.stop().await.expect("a stops");
    assert!(!a.is_leader());
    assert_eq!(lease_spec(&server).holder_identity, None, "released");

    monitor.assert_never_two_leaders();
    assert_eq!(monitor.times("a", true).len(), 1, "a led without a break");
    assert!(monitor.times("b", true).is_empty());
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_hands_over_within_a_retry_period() {
    let server = FakeApiServer::new();
    let monitor = Monitor::default();
    let mut a = Candidate::start(server.client(), "a", &monitor);
    a.leads_within(Duration::from_secs(1)).await;
    let b = Candidate::start(server.client(), "b", &monitor);
    sleep(Duration::from_secs(2)).await;
    assert!(!b.is_leader());

    let stopped = Instant::now();
    a.stop().await.expect("a stops");
    assert!(!a.is_leader());
    let took_over = b.leads_within(LEASE_DURATION).await;
    assert!(
        took_over - stopped <= RETRY_JITTERED,
        "b waited {:?} after a's release",
        took_over - stopped
    );
    let spec = lease_spec(&server);
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    monitor.assert_never_two_leaders();
    assert!(monitor.times("a", false)[0] <= monitor.times("b", true)[0]);
}

#[tokio::test(start_paused = true)]
async fn an_aborted_leader_is_replaced_only_after_the_lease_duration() {
    let server = FakeApiServer::new();
    let monitor = Monitor::default();
    let a = Candidate::start(server.client(), "a", &monitor);
    a.leads_within(Duration::from_secs(1)).await;
    let b = Candidate::start(server.client(), "b", &monitor);
    sleep(Duration::from_secs(2)).await;

    let aborted = Instant::now();
    a.task.abort();
    assert!(a.task.await.expect_err("aborted").is_cancelled());
    // Whoever acts on a's leadership is told to stop, though a could not say so itself.
    assert!(!a.leadership.is_leader());
    assert_eq!(lease_spec(&server).holder_identity.as_deref(), Some("a"));

    let took_over = b.leads_within(Duration::from_secs(3)).await;
    let waited = took_over - aborted;
    // a last renewed at most one retry period before it was aborted; b saw that renewal
    // within one (jittered) retry period, then waited the lease duration, then up to one more
    // retry period.
    assert!(
        waited >= LEASE_DURATION - RETRY,
        "b took over {waited:?} after a died"
    );
    assert!(
        waited <= LEASE_DURATION + 2 * RETRY_JITTERED,
        "b took over {waited:?} after a died"
    );
    let spec = lease_spec(&server);
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    monitor.assert_never_two_leaders();
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_api_calls_fail_steps_down_by_the_renew_deadline_and_comes_back() {
    let server = FakeApiServer::new();
    let monitor = Monitor::default();
    let a = Candidate::start(server.client(), "a", &monitor);
    a.leads_within(Duration::from_secs(1)).await;
    sleep(Duration::from_secs(1)).await;

    let failing = Instant::now();
    for _ in 0..15 {
        server.fail_next(Failure {
            method: None,
            path_contains: format!("/leases/{LEASE}"),
            status: 500,
        });
    }
    let stepped_down = a.steps_down_within(Duration::from_secs(2)).await;
    let held = stepped_down - failing;
    // Leadership lasts the renew deadline from the last successful renewal, which was at most
    // one retry period before the failures began.
    assert!(
        held >= RENEW_DEADLINE - RETRY && held <= RENEW_DEADLINE,
        "stepped down {held:?} after the failures began"
    );

    // Once the API answers again, the holder renews and leads again.
    a.leads_within(Duration::from_secs(5)).await;
    let spec = lease_spec(&server);
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert_eq!(spec.lease_transitions, Some(0));
    assert_eq!(monitor.times("a", true).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_leader_stops_before_the_standby_takes_over() {
    let server = FakeApiServer::new();
    let monitor = Monitor::default();
    let broken = Arc::new(AtomicBool::new(false));
    let a = Candidate::start(partitionable_client(&server, broken.clone()), "a", &monitor);
    a.leads_within(Duration::from_secs(1)).await;
    let b = Candidate::start(server.client(), "b", &monitor);
    sleep(Duration::from_secs(2)).await;

    let partitioned = Instant::now();
    broken.store(true, Ordering::SeqCst);
    let stepped_down = a.steps_down_within(Duration::from_secs(2)).await;
    let took_over = b.leads_within(Duration::from_secs(3)).await;
    assert!(stepped_down - partitioned <= RENEW_DEADLINE);
    assert!(took_over - partitioned >= LEASE_DURATION - RETRY);
    // The margin between them is what makes two replicas safe.
    assert!(
        took_over - stepped_down >= LEASE_DURATION - RENEW_DEADLINE - RETRY,
        "a stepped down {:?} before b took over",
        took_over - stepped_down
    );
    monitor.assert_never_two_leaders();

    // Healed, the old leader stands by: the lease is b's now.
    broken.store(false, Ordering::SeqCst);
    sleep(Duration::from_secs(3)).await;
    assert!(!a.is_leader());
    assert!(b.is_leader());
    let spec = lease_spec(&server);
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    monitor.assert_never_two_leaders();
}

/// Two candidates read the same version of the lease and both write: the API server takes one
/// write and answers the other with 409.
async fn race(existing: Option<LeaseSpec>) -> (FakeApiServer, Monitor, usize) {
    let server = FakeApiServer::new();
    if let Some(spec) = existing {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        Api::<Lease>::namespaced(server.client(), NAMESPACE)
            .create(&PostParams::default(), &lease)
            .await
            .expect("create the lease");
    }
    let monitor = Monitor::default();
    let gate = Arc::new(Barrier::new(2));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let a = Candidate::start(
        gated_client(&server, gate.clone(), conflicts.clone()),
        "a",
        &monitor,
    );
    let b = Candidate::start(
        gated_client(&server, gate, conflicts.clone()),
        "b",
        &monitor,
    );
    sleep(Duration::from_secs(3)).await;
    assert!(
        a.is_leader() != b.is_leader(),
        "a leader: {}, b leader: {}",
        a.is_leader(),
        b.is_leader()
    );
    monitor.assert_never_two_leaders();
    let leaders = monitor.times("a", true).len() + monitor.times("b", true).len();
    assert_eq!(leaders, 1, "one candidate became leader, once");
    (server, monitor, conflicts.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn a_race_to_create_the_lease_leaves_one_leader() {
    let (server, _, conflicts) = race(None).await;
    assert_eq!(conflicts, 1, "the second create got 409 AlreadyExists");
    assert_eq!(lease_spec(&server).lease_transitions, Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_race_to_take_over_a_released_lease_leaves_one_leader() {
    let released = LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        lease_transitions: Some(4),
        ..LeaseSpec::default()
    };
    let (server, _, conflicts) = race(Some(released)).await;
    assert_eq!(conflicts, 1, "the second replace got 409 Conflict");
    assert_eq!(lease_spec(&server).lease_transitions, Some(5));
}

#[tokio::test(start_paused = true)]
async fn missing_rbac_stops_the_elector_with_the_fix() {
    let server = FakeApiServer::new();
    server.fail_next(Failure {
        method: Some(http::Method::GET),
        path_contains: "/leases/".into(),
        status: 403,
    });
    let mut a = Candidate::start(server.client(), "a", &Monitor::default());
    let error = timeout(Duration::from_secs(5), &mut a.task)
        .await
        .expect("run returns")
        .expect("no panic")
        .expect_err("forbidden");
    assert!(matches!(error, Error::Forbidden { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("get, create and update on leases")
            && message.contains("coordination.k8s.io")
            && message.contains(&format!("namespace {NAMESPACE}")),
        "{message}"
    );
    assert!(!a.is_leader());
}
