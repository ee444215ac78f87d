//! 10,000 PinnedPeers across 100 nodes: the `wgpin-operator` binary against the in-memory API
//! server over HTTP on loopback. Prints figures; asserts nothing about time (machines are noisy).
//!
//! The cluster: 50 PinnedInterfaces, each on a pair of gateway nodes (half Dedicated, half
//! Shared), 200 peers on each. Measured: start → every PinnedNodeState written; start → every
//! PinnedPeer status written; the operator's memory; then, five times, one PinnedPeer change →
//! its two nodes' states updated, and every API write that change caused.
//!
//! Run with `scripts/bench-operator.sh` (release build).

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};
use wgpin_crds::{
    PinnedInterface, PinnedNodeState, PinnedPeer,
    k8s_openapi::api::core::v1::Node,
    kube::{
        Api, Client,
        api::{Patch, PatchParams},
    },
};
use wgpin_test_apiserver::{FakeApiServer, kubeconfig, resource_of, serve_http};

#[path = "../tests/support/mod.rs"]
mod support;
use support::create;

const NODES: usize = 100;
const INTERFACES: usize = NODES / 2;
const PEERS: usize = 10_000;
const PEERS_PER_INTERFACE: usize = PEERS / INTERFACES;

fn key(i: usize) -> String {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    bytes[31] = 0x42;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn populate(client: &Client) {
    for n in 0..NODES {
        create::<Node>(client, json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{n:03}"), "labels": {"wgpin.io/pair": format!("p{}", n / 2)}}}))
        .await;
    }
    for i in 0..INTERFACES {
        let port = 20_000 + i * 250;
        let mode = if i % 2 == 0 { "Dedicated" } else { "Shared" };
        create::<PinnedInterface>(
            client,
            json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedInterface",
            "metadata": {"name": format!("gw-{i:02}")},
            "spec": {"nodeSelector": {"matchLabels": {"wgpin.io/pair": format!("p{i}")}},
                     "interfaceName": format!("wgp{i}"), "mode": mode,
                     "listenPort": port, "listenPortEnd": port + 249}}),
        )
        .await;
    }
    for p in 0..PEERS {
        create::<PinnedPeer>(client, json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer",
            "metadata": {"name": format!("peer-{p:05}")},
            "spec": {"interface": format!("gw-{:02}", p % INTERFACES), "publicKey": key(p),
                     "allowedIPs": [format!("fd00::{:x}/128", p + 1)], "sources": ["203.0.113.0/24"]}}))
        .await;
    }
}

/// Resident and peak resident memory of `pid`, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How many peers each node's state holds.
fn peers_on_nodes(server: &FakeApiServer) -> Vec<usize> {
    let resource = resource_of::<PinnedNodeState>();
    (0..NODES)
        .map(|n| {
            server
                .get(&resource, None, &format!("node-{n:03}"))
                .and_then(|state| {
                    Some(
                        state
                            .pointer("/spec/interfaces")?
                            .as_array()?
                            .iter()
                            .filter_map(|i| Some(i.get("peers")?.as_array()?.len()))
                            .sum(),
                    )
                })
                .unwrap_or(0)
        })
        .collect()
}

fn peer_statuses(server: &FakeApiServer) -> usize {
    let resource = resource_of::<PinnedPeer>();
    (0..PEERS)
        .filter(|p| {
            server
                .get(&resource, None, &format!("peer-{p:05}"))
                .is_some_and(|peer| peer.pointer("/status/observedGeneration").is_some())
        })
        .count()
}

fn start_operator(api: SocketAddr, dir: &std::path::Path) -> Child {
    let config = dir.join("kubeconfig");
    std::fs::write(&config, kubeconfig(api)).expect("kubeconfig");
    Command::new(env!("CARGO_BIN_EXE_wgpin-operator"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", &config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start wgpin-operator")
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = FakeApiServer::new();
    let client = server.client();
    let setup = Instant::now();
    populate(&client).await;
    println!(
        "cluster: {NODES} nodes, {INTERFACES} interfaces on node pairs, {PEERS} peers ({PEERS_PER_INTERFACE} per interface); created in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = listener.local_addr().expect("address");
    tokio::spawn(serve_http(server.clone(), listener));
    let dir = std::env::temp_dir().join(format!("wgpin-bench-operator-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    server.clear_writes();
    let started = Instant::now();
    let mut operator = start_operator(api, &dir);
    let pid = operator.id();
    wait_for("every node state", Duration::from_secs(600), || {
        peers_on_nodes(&server)
            .iter()
            .all(|n| *n == PEERS_PER_INTERFACE)
    })
    .await;
    let states_done = started.elapsed();
    wait_for("every peer status", Duration::from_secs(600), || {
        peer_statuses(&server) == PEERS
    })
    .await;
    let statuses_done = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let startup_writes = server.writes().len();
    let (rss, peak) = memory_mib(pid);
    println!(
        "start → all {NODES} PinnedNodeStates written: {:.2} s; → all {PEERS} PinnedPeer statuses: {:.2} s; {startup_writes} writes",
        states_done.as_secs_f64(),
        statuses_done.as_secs_f64()
    );
    println!("operator memory after start: RSS {rss:.1} MiB, peak {peak:.1} MiB");

    let peers: Api<PinnedPeer> = Api::all(client.clone());
    let mut latencies = Vec::new();
    for round in 0..5usize {
        let p = 37 + round * 1999;
        let name = format!("peer-{p:05}");
        let interface = p % INTERFACES;
        let nodes = [2 * interface, 2 * interface + 1].map(|n| format!("node-{n:03}"));
        let source = format!("198.51.100.{}/32", round + 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.clear_writes();
        peers
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"sources": [source]}})),
            )
            .await
            .expect("change");
        let resource = resource_of::<PinnedNodeState>();
        let latency = wait_for("the change on both nodes", Duration::from_secs(60), || {
            nodes.iter().all(|node| {
                server.get(&resource, None, node).is_some_and(|state| {
                    state
                        .pointer("/spec/interfaces/0/peers")
                        .and_then(Value::as_array)
                        .is_some_and(|peers| {
                            peers.iter().any(|peer| {
                                peer["name"] == name.as_str()
                                    && peer["sources"][0] == source.as_str()
                            })
                        })
                })
            })
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writes: Vec<String> = server
            .writes()
            .into_iter()
            .skip(1) // the change itself
            .map(|w| {
                format!(
                    "{} {}/{}{}",
                    w.method,
                    w.resource.plural,
                    w.name,
                    w.subresource.map(|s| format!("/{s}")).unwrap_or_default()
                )
            })
            .collect();
        let shown = if writes.len() <= 8 {
            writes.join(", ")
        } else {
            format!("{}, … ({} more)", writes[..8].join(", "), writes.len() - 8)
        };
        println!(
            "change {} of {name}: on both nodes after {:.0} ms; {} writes: {shown}",
            round + 1,
            latency.as_secs_f64() * 1000.0,
            writes.len(),
        );
        latencies.push(latency);
    }
    latencies.sort();
    let (rss, peak) = memory_mib(pid);
    println!(
        "one change → its nodes' states: median {:.0} ms, worst {:.0} ms (target < 1000 ms)",
        latencies[2].as_secs_f64() * 1000.0,
        latencies[4].as_secs_f64() * 1000.0
    );
    println!("operator memory at the end: RSS {rss:.1} MiB, peak {peak:.1} MiB (target < 150 MiB)");
    let _ = operator.kill();
    let _ = operator.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
