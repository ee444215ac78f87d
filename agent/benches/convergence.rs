//! The whole loop's latency: the in-memory API server, the operator's loop and the
//! `wgpin-agent cluster` binary in a gateway namespace with wireguard-go and the real eBPF
//! programs (the loop test's harness). Prints figures; asserts nothing about time.
//!
//! - Convergence: 100 changes (50 new PinnedPeers, then 50 changes of their `sources`), each
//!   from `kubectl apply` to the PinnedPeer `Ready` at its new generation, which means the
//!   agent enforces it (pin verified, peer in WireGuard) and reported so.
//! - Detection: a packet from an unpinned address to each of five dedicated ports, to the
//!   `SourceViolation` condition on that PinnedPeer.
//!
//! Run as root with `scripts/bench-loop.sh`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{add_addresses, cluster::Loop, send_udp};
use wgpin_agent::wireguard::SecretKey;
use wgpin_crds::PinnedPeer;
use wgpin_test_apiserver::resource_of;

/// The peer's status as stored, straight from the server (no HTTP in the measurement).
fn peer(setup: &Loop, name: &str) -> Option<Value> {
    setup.server.get(&resource_of::<PinnedPeer>(), None, name)
}

fn condition_true(peer: &Value, type_: &str) -> bool {
    peer.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        })
}

/// Polls every 2 ms until `done`, for at most 30 s; the time it took.
fn time_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

fn peer_yaml(name: &str, interface: &str, key: &str, tunnel_ip: &str, sources: &str) -> String {
    format!(
        "apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: {name}}}\n\
         spec: {{interface: {interface}, publicKey: \"{key}\", allowedIPs: [{tunnel_ip}/32], sources: [{sources}]}}\n"
    )
}

fn main() {
    let setup = Loop::start();
    let device = setup.device.clone();
    setup.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: gateway, labels: {{wgpin.io/gateway: \"true\"}}}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: shared}}\n\
         spec: {{nodeSelector: {{matchLabels: {{wgpin.io/gateway: \"true\"}}}}, mode: Shared, interfaceName: {device},\n\
                 listenPort: 51820, addresses: [198.51.100.1/24]}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: dedicated}}\n\
         spec: {{nodeSelector: {{matchLabels: {{wgpin.io/gateway: \"true\"}}}}, mode: Dedicated, interfaceName: {device}d,\n\
                 listenPort: 51830, listenPortEnd: 51839, addresses: [203.0.113.1/24]}}\n"
    ));
    let agent = setup.agent();

    // Convergence.
    let keys: Vec<String> = (0..50)
        .map(|_| SecretKey::generate().expect("key").public_key().to_string())
        .collect();
    let mut samples = Vec::new();
    for change in 0..100usize {
        let i = change % 50;
        let name = format!("p{i:02}");
        let sources = if change < 50 {
            "192.0.2.2/32".to_string()
        } else {
            format!("192.0.2.2/32, 192.0.2.{}/32", 10 + i)
        };
        let tunnel_ip = format!("198.51.100.{}", 10 + i);
        let started = Instant::now();
        setup.apply(&peer_yaml(&name, "shared", &keys[i], &tunnel_ip, &sources));
        let generation = if change < 50 { 1 } else { 2 };
        time_until(&format!("{name} Ready at generation {generation}"), || {
            peer(&setup, &name).is_some_and(|p| {
                p.pointer("/status/observedGeneration") == Some(&Value::from(generation))
                    && condition_true(&p, "Ready")
            })
        });
        samples.push(started.elapsed());
    }
    let mut sorted = samples.clone();
    sorted.sort();
    println!(
        "convergence, kubectl apply → PinnedPeer Ready (enforced on the node), 100 changes: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < 1000 ms)",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.90),
        percentile(&sorted, 0.99),
        percentile(&sorted, 1.0),
    );
    let (new, changed) = samples.split_at(50);
    let median = |s: &[Duration]| {
        let mut s = s.to_vec();
        s.sort();
        percentile(&s, 0.5)
    };
    println!(
        "  new peers: median {:.0} ms; changed sources: median {:.0} ms",
        median(new),
        median(changed)
    );

    // Detection.
    for i in 0..5usize {
        let key = SecretKey::generate().expect("key").public_key().to_string();
        setup.apply(&peer_yaml(
            &format!("d{i}"),
            "dedicated",
            &key,
            &format!("203.0.113.{}", 10 + i),
            "192.0.2.2/32",
        ));
    }
    for i in 0..5usize {
        time_until("the dedicated peers Ready", || {
            peer(&setup, &format!("d{i}")).is_some_and(|p| condition_true(&p, "Ready"))
        });
    }
    // One source address per sample: the fast path reports a source at most once per interval
    // (its flood limit), so a second port probed from the same address would not be reported.
    let attacker_if = format!("{}p", setup.lan.gateway_if_attacker);
    let sources: Vec<String> = (0..5).map(|i| format!("192.0.2.{}", 140 + i)).collect();
    add_addresses(
        &setup.lan.attacker_ns,
        &attacker_if,
        &sources
            .iter()
            .map(|s| format!("{s}/25"))
            .collect::<Vec<_>>(),
    );
    let mut detections = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let name = format!("d{i}");
        let port = u16::try_from(51830 + i).expect("port");
        let started = Instant::now();
        send_udp(&setup.lan.attacker_ns, source, "192.0.2.129", port, 1, 148);
        time_until(&format!("SourceViolation on {name}"), || {
            peer(&setup, &name).is_some_and(|p| condition_true(&p, "SourceViolation"))
        });
        detections.push(started.elapsed());
    }
    let shown: Vec<String> = detections
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .collect();
    detections.sort();
    println!(
        "detection, packet from an unpinned address → SourceViolation on the PinnedPeer: {} ms; median {:.0} ms, max {:.0} ms (target < 2000 ms)",
        shown.join(", "),
        percentile(&detections, 0.5),
        percentile(&detections, 1.0),
    );
    drop(agent);
}
