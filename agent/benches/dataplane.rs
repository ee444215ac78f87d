//! Data-plane benchmark (prints figures; asserts nothing about time).
//!
//! In a network namespace with the real fast path and one wireguard-go device in Shared mode:
//! - programming 1,000 peers (pins and WireGuard) from empty;
//! - a steady-state reconcile of the same 1,000 peers (must write nothing);
//! - the agent's resident memory with 1,000 peers;
//! - Shared-mode detection: time from a peer's endpoint leaving its pin to its eviction, with
//!   the guard polling at the agent's default interval.
//!
//! Run as root: `cargo bench -p wgpin-agent --bench dataplane` (scripts/bench-dataplane.sh).

use std::{
    fs::File,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
// The test hosts' helpers, shared with the tests.
#[path = "../tests/support/mod.rs"]
mod support;
use support::run;
use wgpin_agent::{
    dataplane::{DataPlane, DataPlaneConfig, NodeCapabilities},
    fastpath::{BpfPaths, HookChoice},
    wireguard::{Backend, DeviceConfig, PeerChange, SecretKey, Uapi},
};
use wgpin_crds::{PinMode, PinnedNodeStateSpec, RenderedInterface, RenderedPeer};

const PEERS: usize = 1_000;
const GUARD_INTERVAL: Duration = Duration::from_millis(200);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn v6(prefix: u16, n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, prefix, 0, 0, 0, 0, (n >> 16) as u16, n as u16)
}

fn spec(device: &str, keys: &[SecretKey]) -> PinnedNodeStateSpec {
    PinnedNodeStateSpec {
        node_name: "bench".into(),
        interfaces: vec![RenderedInterface {
            name: "bench".into(),
            mode: PinMode::Shared,
            interface_name: device.into(),
            listen_port: 51820,
            listen_port_end: None,
            addresses: vec!["fd00:1000::1/64".into()],
            mtu: None,
            peers: keys
                .iter()
                .enumerate()
                .map(|(n, key)| RenderedPeer {
                    name: format!("peer-{n:04}"),
                    generation: Some(1),
                    public_key: key.public_key().to_base64(),
                    allowed_ips: vec![format!("{}/128", v6(0x1000, n + 2))],
                    sources: vec![format!("{}/128", v6(0x2000, n + 2))],
                    endpoint: None,
                    persistent_keepalive_seconds: None,
                    preshared_key_secret_ref: None,
                    dedicated_port: None,
                })
                .collect(),
        }],
    }
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: sudo scripts/bench-dataplane.sh"
    );
    let id = std::process::id();
    let ns = format!("wgpin-bench-dp-{id}");
    let (underlay, peer_end, device) = (
        format!("bd{}u", id % 10000),
        format!("bd{}p", id % 10000),
        format!("wgbd{}", id % 10000),
    );
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/wgpin-bench-dp-{id}"));
    let state = std::env::temp_dir().join(format!("wgpin-bench-dp-{id}"));
    run("ip", &["netns", "add", &ns]);
    run(
        "ip",
        &[
            "-n", &ns, "link", "add", &underlay, "type", "veth", "peer", "name", &peer_end,
        ],
    );
    run("ip", &["-n", &ns, "link", "set", &underlay, "up"]);
    run("ip", &["-n", &ns, "link", "set", &peer_end, "up"]);

    let keys: Vec<SecretKey> = (0..PEERS)
        .map(|_| SecretKey::generate().expect("key"))
        .collect();
    let (ns_inner, underlay_inner, device_inner, bpffs_inner, state_inner) = (
        ns.clone(),
        underlay.clone(),
        device.clone(),
        bpffs.clone(),
        state.clone(),
    );
    let figures = std::thread::spawn(move || {
        let file = File::open(format!("/run/netns/{ns_inner}")).expect("netns");
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config = DataPlaneConfig {
            state_dir: state_inner,
            bpffs: BpfPaths::new(&bpffs_inner),
            underlay: vec![underlay_inner],
            hook: HookChoice::Auto,
            backend: Arc::new(Backend::userspace(Uapi::default(), "wireguard-go")),
            secrets_dir: None,
        };
        let _entered = rt.enter();
        let mut dataplane = DataPlane::new(config).expect("data plane");
        let spec = spec(&device_inner, &keys);
        let capabilities = NodeCapabilities::default();
        let rss_before = rss_kib();
        let hook = dataplane
            .attachments()
            .iter()
            .map(|a| format!("{} ({})", a.hook, a.reason))
            .collect::<Vec<_>>()
            .join(", ");

        let started = Instant::now();
        let writes = rt
            .block_on(dataplane.reconcile(&spec, &capabilities))
            .expect("first reconcile");
        let from_empty = started.elapsed();

        let mut steady = Vec::new();
        for _ in 0..20 {
            let started = Instant::now();
            let writes = rt
                .block_on(dataplane.reconcile(&spec, &capabilities))
                .expect("steady reconcile");
            steady.push(started.elapsed());
            assert_eq!(
                writes,
                Default::default(),
                "a steady reconcile must write nothing"
            );
        }
        steady.sort();
        let rss_after = rss_kib();

        // Detection: move one peer's endpoint outside its pin, as a hijack would.
        let uapi = Uapi::default();
        let mut detections = Vec::new();
        for (trial, key) in keys.iter().take(10).enumerate() {
            let victim = key.public_key();
            uapi.set(
                &device_inner,
                &DeviceConfig::default(),
                &[PeerChange::Upsert {
                    public_key: victim,
                    update_only: true,
                    preshared_key: None,
                    endpoint: Some((IpAddr::V6(v6(0x3000, trial + 2)), 40000).into()),
                    persistent_keepalive: None,
                    allowed_ips: None,
                }],
            )
            .expect("hijack simulated");
            let moved = Instant::now();
            // The guard runs on its own schedule; start at a random phase of the interval.
            std::thread::sleep(GUARD_INTERVAL.mul_f64(f64::from(trial as u32) / 10.0));
            loop {
                if !dataplane.guard().evictions.is_empty() {
                    detections.push(moved.elapsed());
                    break;
                }
                assert!(moved.elapsed() < Duration::from_secs(5), "no eviction");
                std::thread::sleep(GUARD_INTERVAL);
            }
        }
        detections.sort();
        // Leave nothing behind: devices go with an empty spec.
        rt.block_on(dataplane.reconcile(&PinnedNodeStateSpec::default(), &capabilities))
            .expect("cleanup reconcile");
        (
            writes, from_empty, steady, rss_before, rss_after, detections, hook,
        )
    })
    .join();
    let _ = Command::new("pkill")
        .args(["-f", &format!("^wireguard-go {device}")])
        .status();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = std::fs::remove_dir_all(&bpffs);
    let _ = std::fs::remove_dir_all(&state);
    let (writes, from_empty, steady, rss_before, rss_after, detections, hook) =
        figures.expect("benchmark thread");

    let median = |v: &[Duration]| v[v.len() / 2];
    println!("data plane, {PEERS} peers, Shared mode, wireguard-go, fast path {hook}");
    println!(
        "{:<48} {:>12} {:>12} {:>8}",
        "measure", "measured", "target", "ratio"
    );
    let row = |name: &str, measured: f64, target: f64, unit: &str| {
        println!(
            "{name:<48} {:>9.1} {unit:<2} {:>9.1} {unit:<2} {:>7.2}x",
            measured,
            target,
            measured / target
        );
    };
    row(
        "program 1,000 peers from empty",
        from_empty.as_secs_f64() * 1e3,
        1000.0,
        "ms",
    );
    row(
        "steady reconcile of 1,000 unchanged (median)",
        median(&steady).as_secs_f64() * 1e3,
        50.0,
        "ms",
    );
    row(
        "steady reconcile (worst of 20)",
        steady[steady.len() - 1].as_secs_f64() * 1e3,
        50.0,
        "ms",
    );
    row(
        "agent RSS with 1,000 peers",
        rss_after as f64 / 1024.0,
        40.0,
        "MiB",
    );
    row(
        "shared-mode detection (median of 10)",
        median(&detections).as_secs_f64() * 1e3,
        1000.0,
        "ms",
    );
    row(
        "shared-mode detection (worst of 10)",
        detections[detections.len() - 1].as_secs_f64() * 1e3,
        1000.0,
        "ms",
    );
    println!(
        "writes from empty: {writes:?}; RSS before the first reconcile: {:.1} MiB",
        rss_before as f64 / 1024.0
    );
}
