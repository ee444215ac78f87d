//! The `wgpin-operator` binary as a process, against the in-memory API server over HTTP on
//! loopback: it renders, serves its probes and metrics, and stops cleanly on SIGTERM.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use wgpin_crds::{
    PinnedNodeState,
    access::{self, Call, Scope},
    kube::{
        Api,
        api::{Patch, PatchParams},
    },
};
use wgpin_test_apiserver::{FakeApiServer, kubeconfig, serve_http};

mod support;
use support::{create, eventually, repin, setup, wait_for_pin};

fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    Some(attempt().unwrap_or_else(|e| format!("GET {address}{path} failed: {e}")))
}

/// An operator process against `api`, with its log in a file (a pipe nobody reads would block
/// it once full). Its probes listen on a port it picks itself, read back from its log: ports
/// picked for it in advance could be taken by then.
pub struct Operator {
    child: Child,
    log: std::path::PathBuf,
}

impl Operator {
    pub fn start(dir: &std::path::Path, api: SocketAddr, name: &str) -> Self {
        let config = dir.join("kubeconfig");
        std::fs::write(&config, kubeconfig(api)).expect("kubeconfig");
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_wgpin-operator"))
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .env("KUBECONFIG", &config)
            .env("RUST_LOG", "info,wgpin_operator=debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start wgpin-operator");
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the probes listen, once the operator has said so (within 10 s).
    pub async fn probes(&self) -> SocketAddr {
        for _ in 0..500 {
            let address = self.log().lines().find_map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).ok()?;
                (entry["fields"]["message"] == "serving /metrics, /healthz and /readyz")
                    .then(|| entry["fields"]["address"].as_str()?.parse().ok())
                    .flatten()
            });
            if let Some(address) = address {
                return address;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the operator never said where its probes are; log:\n{}",
            self.log()
        );
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The in-memory API server on a loopback port, with the small cluster of the fixtures.
async fn api_server(
    name: &str,
) -> (
    FakeApiServer,
    SocketAddr,
    tokio::task::JoinHandle<()>,
    std::path::PathBuf,
) {
    let server = FakeApiServer::new();
    setup(&server.client()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = listener.local_addr().expect("address");
    let serving = tokio::spawn(serve_http(server.clone(), listener));
    let dir = std::env::temp_dir().join(format!("wgpin-operator-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    (server, api, serving, dir)
}

async fn get(address: SocketAddr, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || http_get(address, path))
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reconciles_serves_probes_and_stops_on_sigterm() {
    let (server, api, serving, dir) = api_server("binary").await;
    let client = server.client();
    let mut operator = Operator::start(&dir, api, "operator");
    let probes = operator.probes().await;

    let states: Api<PinnedNodeState> = Api::all(client.clone());
    eventually("both gateways' states", || {
        let states = states.clone();
        async move { states.get("gw-a").await.is_ok() && states.get("gw-b").await.is_ok() }
    })
    .await;
    eventually("ready", || async move {
        get(probes, "/readyz").await.starts_with("HTTP/1.1 200")
    })
    .await;
    let metrics = get(probes, "/metrics").await;
    assert!(
        metrics.contains(r#"wgpin_operator_writes_total{kind="NodeStateApply"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"wgpin_operator_objects{kind="PinnedPeer",state="Reconciling"} 2"#),
        "no agent reported, so both peers are still reconciling: {metrics}"
    );
    assert_eq!(metric(&metrics, "wgpin_operator_leader"), Some(1.0));

    // Every kind of write: a conflicting copy of a key (an Event), a node leaving the
    // selector (a state deleted), a peer deleted (its finalizer released).
    create::<wgpin_crds::PinnedPeer>(
        &client,
        serde_json::json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "metadata": {"name": "copycat"},
               "spec": {"interface": "gateway", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
                        "allowedIPs": ["198.51.100.99/32"], "sources": ["192.0.2.0/24"]}}),
    )
    .await;
    Api::<wgpin_crds::k8s_openapi::api::core::v1::Node>::all(client.clone())
        .patch(
            "gw-b",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"wgpin.io/gateway": null}}})),
        )
        .await
        .expect("relabel");
    Api::<wgpin_crds::PinnedPeer>::all(client.clone())
        .delete("bob", &Default::default())
        .await
        .expect("delete bob");
    // The Event goes out at the end of a pass: wait for it too, not only for the writes before.
    eventually(
        "gw-b's state gone, bob released, the copy announced",
        || {
            let states = states.clone();
            let client = client.clone();
            async move {
                let events: Api<wgpin_crds::k8s_openapi::api::events::v1::Event> =
                    Api::namespaced(client.clone(), "default");
                states.get("gw-b").await.is_err()
                    && Api::<wgpin_crds::PinnedPeer>::all(client)
                        .get("bob")
                        .await
                        .is_err()
                    && events
                        .list(&Default::default())
                        .await
                        .is_ok_and(|list| !list.items.is_empty())
            }
        },
    )
    .await;

    // SIGTERM, as the kubelet sends it: a clean exit well within the grace period.
    operator.terminate();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = operator.child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = operator.log();
    assert!(exit.success(), "exit {exit:?}; log:\n{log}");
    assert!(log.contains("\"stopping\""), "{log}");
    assert!(log.contains("released the lease"), "{log}");

    // Every call the process made is allowed by the access list the chart's RBAC is checked
    // against, and everything on that list was used.
    let requests = server.requests();
    let calls: Vec<Call<'_>> = requests
        .iter()
        .filter(|r| r.over_http)
        .map(|r| Call {
            verb: r.verb,
            group: &r.resource.group,
            resource: r.rbac_resource(),
            scope: match (r.namespace.as_deref(), r.resource.plural.as_str()) {
                (None, _) => Scope::Cluster,
                (Some(_), "leases") => Scope::ReleaseNamespace,
                (Some(_), _) => Scope::EventNamespace,
            },
            name: r.name.as_deref(),
        })
        .collect();
    let problems = access::audit(access::OPERATOR, &calls, "wgpin-operator");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    serving.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_crds_the_binary_says_how_to_install_them() {
    let (server, api, serving, dir) = api_server("nocrd").await;
    // The API answers 404 for PinnedPeers: nothing installed.
    server.fail_next(wgpin_test_apiserver::Failure {
        method: None,
        path_contains: "pinnedpeers".to_string(),
        status: 404,
    });
    let mut operator = Operator::start(&dir, api, "operator");
    let exit = tokio::task::spawn_blocking(move || {
        let exit = operator.child.wait();
        (exit, operator.log())
    })
    .await
    .expect("join");
    let (exit, log) = (exit.0.expect("exit"), exit.1);
    assert!(!exit.success());
    assert!(log.contains("are the CRDs installed?"), "{log}");
    serving.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value of an unlabelled metric, such as `wgpin_operator_leader`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

async fn scrape(address: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || http_get(address, "/metrics"))
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_writes_and_the_other_takes_over_when_it_stops() {
    let (server, api, serving, dir) = api_server("pair").await;
    let client = server.client();
    let mut replicas = [
        Operator::start(&dir, api, "first"),
        Operator::start(&dir, api, "second"),
    ];
    let probes = [replicas[0].probes().await, replicas[1].probes().await];

    let states: Api<PinnedNodeState> = Api::all(client.clone());
    eventually("the leader's first pass", || {
        let states = states.clone();
        async move { states.get("gw-a").await.is_ok() && states.get("gw-b").await.is_ok() }
    })
    .await;
    // Give the standby every chance to misbehave, then look at both.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leaders: Vec<f64> = futures_leaders(&probes).await;
    assert_eq!(
        leaders.iter().filter(|l| **l == 1.0).count(),
        1,
        "exactly one leader: {leaders:?}"
    );
    let leader = leaders.iter().position(|l| *l == 1.0).expect("a leader");
    let standby = 1 - leader;
    let standby_metrics = scrape(probes[standby]).await;
    assert!(
        !standby_metrics.contains("wgpin_operator_writes_total{"),
        "the standby wrote: {standby_metrics}"
    );
    assert!(
        get(probes[standby], "/readyz")
            .await
            .starts_with("HTTP/1.1 200"),
        "a standby is ready; its log:\n{}",
        replicas[standby].log()
    );

    // The leader stops (a rolling update): it releases the lease, the standby takes over and
    // follows the next change.
    replicas[leader].terminate();
    let _ = replicas[leader].child.wait();
    repin(&client, "bob", &["192.0.2.9/32"]).await;
    wait_for_pin(&client, "gw-a", "bob", &["192.0.2.9/32"]).await;
    let text = scrape(probes[standby]).await;
    assert_eq!(
        metric(&text, "wgpin_operator_leader"),
        Some(1.0),
        "the new leader's metrics: {text}; log:\n{}",
        replicas[standby].log()
    );
    serving.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn futures_leaders(probes: &[SocketAddr]) -> Vec<f64> {
    let mut leaders = Vec::new();
    for address in probes {
        leaders.push(metric(&scrape(*address).await, "wgpin_operator_leader").unwrap_or(-1.0));
    }
    leaders
}
