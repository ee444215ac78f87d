//! Faults, one test each, each saying what holds through it: the agent killed in the middle of a
//! big change or in a loop, a reboot (bpffs and devices gone), the fast path tampered with, and
//! WireGuard or its interface changed by hand. The real `wgpin-agent standalone` runs in a
//! gateway namespace where the fault is about the process, the data plane in this process where
//! its journal tells the order. Detection and repair times are printed. Needs root.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use support::{
    GatewayCleanup, Lan, StandaloneAgent,
    cluster::{http_get_in, metric_value},
    in_netns, peer_device, run, unique_id, wait_for, wait_for_device,
};
use wgpin_agent::{
    dataplane::{DataPlane, DataPlaneConfig, Effect, NodeCapabilities},
    fastpath::{BpfPaths, FastPath, HookChoice, Op, PinKey},
    wireguard::{Backend, DeviceConfig, PeerChange, PeerConfig, SecretKey, Uapi},
};
use wgpin_common::{AllowEntry, AllowV6, PortEntry, PortKey, maps};
use wgpin_crds::{PinMode, PinnedNodeStateSpec, RenderedInterface, RenderedPeer, WireGuardKey};

/// The port every interface of these tests listens on.
const PORT: u16 = 51820;
/// Where the agents serve metrics, inside the gateway namespace.
const METRICS: &str = "127.0.0.1:9477";

/// A gateway namespace on a LAN (client and attacker namespaces), a manifests directory, state
/// and bpffs roots of its own; the agent's wireguard-go processes and pins go on drop, then the
/// namespaces.
struct Node {
    _cleanup: GatewayCleanup,
    lan: Lan,
    work: tempfile::TempDir,
    id: String,
    device: String,
    bpffs: PathBuf,
}

impl Node {
    fn new(tag: &str) -> Self {
        let lan = Lan::new();
        let id = unique_id();
        let device = format!("wg{tag}{id}");
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/wgpin-faults-{id}"));
        let work = tempfile::tempdir().expect("work dir");
        std::fs::create_dir_all(work.path().join("manifests")).expect("manifests dir");
        Self {
            _cleanup: GatewayCleanup {
                device: device.clone(),
                bpffs: bpffs.clone(),
            },
            lan,
            work,
            id,
            device,
            bpffs,
        }
    }

    fn dir(&self) -> PathBuf {
        self.work.path().join("manifests")
    }

    fn state(&self) -> PathBuf {
        self.work.path().join("state")
    }

    fn paths(&self) -> BpfPaths {
        BpfPaths::new(&self.bpffs)
    }

    /// Replaces the manifests with one Shared interface on [`PORT`] (MTU 1420) and `peers`.
    fn write_manifests(&self, peers: &[Peer]) {
        self.write_manifests_for(&self.device, peers);
    }

    /// The same with another name for the WireGuard device.
    fn write_manifests_for(&self, device: &str, peers: &[Peer]) {
        let mut yaml = format!(
            "apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: gateway}}\n\
             spec: {{nodeSelector: {{}}, mode: Shared, interfaceName: {device}, listenPort: {PORT}, \
             addresses: [198.51.100.1/24], mtu: 1420}}\n"
        );
        for peer in peers {
            yaml.push_str(&format!(
                "---\napiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: {}}}\n\
                 spec: {{interface: gateway, publicKey: \"{}\", allowedIPs: [{}], sources: [{}]}}\n",
                peer.name, peer.key, peer.allowed_ip, peer.source
            ));
        }
        // Written aside and renamed: the agent never reads half a file.
        let file = self.dir().join("gateway.yaml");
        let temporary = self.work.path().join("gateway.yaml.new");
        std::fs::write(&temporary, yaml).expect("manifests");
        std::fs::rename(&temporary, &file).expect("manifests in place");
    }

    fn start_agent(&self, extra: &[&str]) -> StandaloneAgent {
        let log = self.work.path().join("agent.log");
        let common = ["--backend", "userspace", "--metrics-addr", METRICS];
        let args: Vec<&str> = common.iter().chain(extra).copied().collect();
        StandaloneAgent::start(
            &self.lan,
            (&self.dir(), &self.state(), &self.bpffs),
            &log,
            &args,
        )
    }

    /// wireguard-go processes serving the device.
    fn wireguard_go_pids(&self) -> Vec<u32> {
        wireguard_go_pids(&self.device)
    }

    /// Names of the links in the gateway namespace.
    fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect()
    }

    /// `ip -n <gateway> ARGS`, its output; empty when it fails (a device that is gone).
    fn ip(&self, args: &[&str]) -> String {
        Command::new("ip")
            .args(["-n", &self.lan.gateway_ns])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The static routes on the device (the agent's: one per allowed IP).
    fn routes(&self) -> BTreeSet<IpNet> {
        let mut routes = BTreeSet::new();
        for family in ["-4", "-6"] {
            let out = self.ip(&[
                family,
                "route",
                "show",
                "dev",
                &self.device,
                "proto",
                "static",
            ]);
            for destination in out.lines().filter_map(|l| l.split_whitespace().next()) {
                let prefix = if destination.contains('/') {
                    destination.parse()
                } else {
                    let address: std::net::IpAddr = destination.parse().expect("address");
                    Ok(IpNet::from(address))
                };
                routes.insert(prefix.expect("a route"));
            }
        }
        routes
    }

    /// Names of the files under one of the bpffs root's directories.
    fn pins(&self, dir: &str) -> BTreeSet<String> {
        std::fs::read_dir(self.bpffs.join(dir))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ids of the programs attached by tcx to the ingress of each underlay interface.
    fn tcx_ingress(&self) -> BTreeMap<String, Vec<u32>> {
        let interfaces = [
            self.lan.gateway_if_client.clone(),
            self.lan.gateway_if_attacker.clone(),
        ];
        in_netns(&self.lan.gateway_ns, move || {
            interfaces
                .into_iter()
                .map(|interface| {
                    let programs = aya::programs::SchedClassifier::query_tcx(
                        &interface,
                        aya::programs::tc::TcAttachType::Ingress,
                    )
                    .map(|(_, programs)| programs.iter().map(|p| p.id()).collect())
                    .unwrap_or_default();
                    (interface, programs)
                })
                .collect()
        })
    }

    /// Packets the fast path allowed and dropped on [`PORT`], summed over CPUs, from the
    /// pinned maps.
    fn port_counters(&self) -> (u64, u64) {
        let paths = self.paths();
        let open = |name: &str| {
            aya::maps::MapData::from_pin(paths.map(name))
                .and_then(aya::maps::Map::from_map_data)
                .expect("a pinned map")
        };
        let ports: aya::maps::HashMap<_, PortKey, PortEntry> =
            open(maps::PORTS).try_into().expect("the ports map");
        let slot = ports
            .get(&PortKey::new(PORT), 0)
            .expect("the port is managed")
            .port_slot;
        let counters: aya::maps::PerCpuArray<_, wgpin_common::Counters> =
            open(maps::PORT_COUNTERS).try_into().expect("the counters");
        let mut total = wgpin_common::Counters::default();
        for value in counters.get(&slot, 0).expect("the port's counters").iter() {
            total.add(value);
        }
        (total.allowed_packets, total.dropped_packets)
    }
}

/// wireguard-go processes serving `device`.
fn wireguard_go_pids(device: &str) -> Vec<u32> {
    let output = Command::new("pgrep")
        .args(["-f", &format!("^wireguard-go {device}$")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A peer as the manifests declare it.
#[derive(Clone, Debug)]
struct Peer {
    name: String,
    key: WireGuardKey,
    allowed_ip: IpNet,
    source: IpNet,
}

/// A small pseudo-random sequence (xorshift), seeded from the clock and printed, so a failing
/// run can be told apart from the next.
struct Random(u64);

impl Random {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        println!("random seed {seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The pins `peers` give on [`PORT`].
fn pins_of(peers: &[Peer]) -> BTreeSet<PinKey> {
    peers
        .iter()
        .map(|p| PinKey {
            port: PORT,
            prefix: p.source,
        })
        .collect()
}

/// The peers a device has, with their allowed IPs.
fn live_peers(device: &str) -> Option<BTreeMap<WireGuardKey, BTreeSet<IpNet>>> {
    Uapi::default().get(device).ok().map(|d| {
        d.peers
            .into_iter()
            .map(|(key, peer)| (key, peer.allowed_ips.into_iter().collect()))
            .collect()
    })
}

/// Whether the node holds exactly `peers`: in WireGuard with their allowed IPs, in the fast
/// path with their pins on a managed port and no other pin.
fn holds_exactly(node: &Node, peers: &[Peer]) -> Result<(), String> {
    let wanted: BTreeMap<WireGuardKey, BTreeSet<IpNet>> = peers
        .iter()
        .map(|p| (p.key, [p.allowed_ip].into()))
        .collect();
    let live = live_peers(&node.device).ok_or("no device")?;
    if live != wanted {
        let extra = live.keys().filter(|k| !wanted.contains_key(k)).count();
        let missing = wanted.keys().filter(|k| !live.contains_key(k)).count();
        return Err(format!(
            "WireGuard has {} peers ({extra} unwanted, {missing} missing, or allowed IPs differ)",
            live.len()
        ));
    }
    let pinned = FastPath::read_pinned(&node.paths()).map_err(|e| e.to_string())?;
    let pins: BTreeSet<PinKey> = pinned.pins.keys().copied().collect();
    if pins != pins_of(peers) {
        return Err(format!(
            "the fast path has {} pins, {} wanted",
            pins.len(),
            peers.len()
        ));
    }
    if pinned.ports.keys().copied().collect::<Vec<_>>() != [PORT] {
        return Err(format!("managed ports {:?}", pinned.ports.keys()));
    }
    let routes = node.routes();
    let wanted: BTreeSet<IpNet> = peers.iter().map(|p| p.allowed_ip).collect();
    if routes != wanted {
        return Err(format!(
            "{} routes on the device, {} wanted",
            routes.len(),
            wanted.len()
        ));
    }
    Ok(())
}

/// Peers `prefix-<i>` for each `i` of `range`, each with a key, a tunnel address
/// (`fd00:6::<i+1>`) and a host pin (`fd00:<source_net>::<i+1>`) of its own: IPv6, so that
/// hundreds fit in documentation space.
fn peers(prefix: &str, range: std::ops::Range<u32>, source_net: u16) -> Vec<Peer> {
    range
        .map(|i| Peer {
            name: format!("{prefix}-{i}"),
            key: SecretKey::generate().expect("key").public_key(),
            allowed_ip: format!("fd00:6::{:x}/128", i + 1).parse().expect("net"),
            source: format!("fd00:{source_net:x}::{:x}/128", i + 1)
                .parse()
                .expect("net"),
        })
        .collect()
}

/// Point lookups in the pinned maps. A lookup sees an entry that is there; an iteration may
/// not (an entry put behind it and another deleted ahead of it, while it runs, are both missed).
struct PinnedMaps {
    ports: aya::maps::HashMap<aya::maps::MapData, PortKey, PortEntry>,
    hosts_v6: aya::maps::HashMap<aya::maps::MapData, AllowV6, AllowEntry>,
}

impl PinnedMaps {
    fn open(paths: &BpfPaths) -> Option<Self> {
        let open = |name: &str| {
            aya::maps::MapData::from_pin(paths.map(name))
                .and_then(aya::maps::Map::from_map_data)
                .ok()
        };
        Some(Self {
            ports: open(maps::PORTS)?.try_into().ok()?,
            hosts_v6: open(maps::HOSTS_V6)?.try_into().ok()?,
        })
    }

    fn managed(&self, port: u16) -> bool {
        self.ports.get(&PortKey::new(port), 0).is_ok()
    }

    /// Whether the host pin `source` (an IPv6 /128) is in place on `port`.
    fn pinned(&self, port: u16, source: &IpNet) -> bool {
        let std::net::IpAddr::V6(address) = source.addr() else {
            return false;
        };
        let key = AllowV6 {
            port_be: port.to_be_bytes(),
            addr: address.octets(),
        };
        self.hosts_v6.get(&key, 0).is_ok()
    }
}

/// Samples, until stopped, every peer live in WireGuard against the pins in the fast path: a
/// peer live before and after the lookups must have had one of its pins (any pin it is declared
/// with in either state) in place, on a managed port. A re-pinned peer's pins are looked up
/// first, second, first again: the agent puts the new one before it deletes the old, so in
/// either direction one of the lookups finds one unless, at some moment, neither was there.
/// Returns the violations and the number of samples.
fn watch_pin_before_peer(
    device: String,
    paths: BpfPaths,
    allowed: BTreeMap<WireGuardKey, Vec<IpNet>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, usize)> {
    std::thread::spawn(move || {
        let uapi = Uapi::default();
        let live = |uapi: &Uapi| -> Option<BTreeSet<WireGuardKey>> {
            uapi.get(&device)
                .ok()
                .map(|d| d.peers.into_keys().collect())
        };
        let (mut violations, mut samples) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            let (Some(maps), Some(before)) = (PinnedMaps::open(&paths), live(&uapi)) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let mut unpinned = Vec::new();
            let mut managed = true;
            for key in &before {
                managed &= maps.managed(PORT);
                let sources = allowed.get(key).map(Vec::as_slice).unwrap_or_default();
                let found = match sources {
                    [only] => maps.pinned(PORT, only),
                    [first, second, ..] => {
                        maps.pinned(PORT, first)
                            || maps.pinned(PORT, second)
                            || maps.pinned(PORT, first)
                    }
                    [] => false,
                };
                if !found {
                    unpinned.push(*key);
                }
            }
            let Some(after) = live(&uapi) else {
                continue;
            };
            samples += 1;
            for key in unpinned.iter().filter(|k| after.contains(k)) {
                violations.push(format!(
                    "peer {} live without its pin (port managed: {managed})",
                    key.to_base64()
                ));
            }
            if !managed && !after.is_empty() {
                violations.push(format!(
                    "{} peers live while port {PORT} is not managed",
                    after.len()
                ));
            }
        }
        (violations, samples)
    })
}

/// A big change (500 peers: half of them replaced, a quarter re-pinned), and `kill -9` at a
/// random point while the agent applies it, several rounds. Throughout, no peer is ever live
/// in WireGuard without its pin on a managed port in the fast path; after each restart the
/// node holds exactly the desired state (peers, allowed IPs, pins, ports, routes).
#[test]
fn kill_9_in_the_middle_of_a_big_change_never_leaves_a_peer_without_its_pin() {
    const ROUNDS: usize = 4;
    let node = Node::new("k");
    let mut random = Random::new();
    // A: peers 0..500. B: 250..500 of them (250..375 with the same pin, 375..500 re-pinned)
    // and 250 new ones.
    let a = peers("p", 0..500, 0x5);
    let mut b: Vec<Peer> = a[250..].to_vec();
    for (i, peer) in b[125..].iter_mut().enumerate() {
        peer.source = format!("fd00:7::{:x}/128", i + 1).parse().expect("net");
    }
    b.extend(peers("q", 500..750, 0x5));
    let mut allowed: BTreeMap<WireGuardKey, Vec<IpNet>> = BTreeMap::new();
    for peer in a.iter().chain(&b) {
        let sources = allowed.entry(peer.key).or_default();
        if !sources.contains(&peer.source) {
            sources.push(peer.source);
        }
    }

    node.write_manifests(&a);
    let started = Instant::now();
    let mut agent = node.start_agent(&["--resync-interval-ms", "300"]);
    wait_for("the first state", Duration::from_secs(30), || {
        holds_exactly(&node, &a).is_ok()
    });
    println!(
        "500 peers from nothing, start included: {:?}",
        started.elapsed()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = watch_pin_before_peer(
        node.device.clone(),
        node.paths(),
        allowed.clone(),
        stop.clone(),
    );
    // The change begins when WireGuard loses its first peer (the agent reads the directory
    // once a second). The first round measures how long applying takes; each later one kills
    // the agent at a random point of that time.
    let change = |to: &[Peer]| -> Instant {
        let keys = || live_peers(&node.device).map(|p| p.into_keys().collect::<BTreeSet<_>>());
        let before = keys();
        node.write_manifests(to);
        wait_for("the change to begin", Duration::from_secs(20), || {
            keys() != before
        });
        Instant::now()
    };
    let began = change(&b);
    wait_for("the change to be applied", Duration::from_secs(30), || {
        holds_exactly(&node, &b).is_ok()
    });
    let applying = began.elapsed();
    println!("applying the change took {applying:?} (from its first WireGuard write)");
    let mut mid_apply = 0;
    for round in 1..=ROUNDS {
        let (from, to) = if round % 2 == 1 { (&b, &a) } else { (&a, &b) };
        let began = change(to);
        let at = Duration::from_millis(random.below(applying.as_millis() as u64));
        std::thread::sleep(at.saturating_sub(began.elapsed()));
        agent.kill_9();
        let killed_at = began.elapsed();
        let partial = holds_exactly(&node, to).is_err() && holds_exactly(&node, from).is_err();
        mid_apply += usize::from(partial);
        let restarted = Instant::now();
        agent = node.start_agent(&["--resync-interval-ms", "300"]);
        wait_for(
            "exactly the desired state after the restart",
            Duration::from_secs(30),
            || holds_exactly(&node, to).is_ok(),
        );
        println!(
            "round {round}: killed {killed_at:?} into the change ({}); the restarted agent converged in {:?}",
            if partial { "half applied" } else { "applied" },
            restarted.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (violations, samples) = sampler.join().expect("sampler");
    println!("{mid_apply} of {ROUNDS} kills left the change half applied; {samples} samples");
    assert!(samples > 50, "too few samples: {samples}");
    assert!(
        violations.is_empty(),
        "{} violations, the first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert_eq!(node.wireguard_go_pids().len(), 1, "one wireguard-go");
    agent.kill_9();
}

/// The laptop of the tests with one peer: its tunnel address 198.51.100.2, pinned to the
/// client's 192.0.2.2.
fn laptop(key: &SecretKey) -> Peer {
    Peer {
        name: "laptop".into(),
        key: key.public_key(),
        allowed_ip: "198.51.100.2/32".parse().expect("net"),
        source: "192.0.2.2/32".parse().expect("net"),
    }
}

/// What came out of the gateway's tunnel on 198.51.100.1:7000: the laptop's sequence numbers
/// (4-byte datagrams) and the number of the attacker's (8-byte) ones.
struct Tunnel {
    reader: std::thread::JoinHandle<(BTreeSet<u32>, usize)>,
    senders: Vec<std::thread::JoinHandle<()>>,
}

const ATTACKER_MARK: &[u8; 8] = b"attacker";

impl Tunnel {
    /// Streams `count` datagrams from the laptop (one every 10 ms) and, meanwhile, the attacker's
    /// through its own tunnel (one every 20 ms), both to the gateway's tunnel address.
    fn stream(lan: &Lan, count: u32) -> Self {
        let receiver = in_netns(&lan.gateway_ns, || {
            UdpSocket::bind("198.51.100.1:7000").expect("bind in the tunnel")
        });
        receiver
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        // Read while the stream flows, so the socket buffer never overflows.
        let reader = std::thread::spawn(move || {
            let (mut seen, mut attacker) = (BTreeSet::new(), 0);
            let mut buffer = [0u8; 64];
            while let Ok((len, _)) = receiver.recv_from(&mut buffer) {
                match &buffer[..len] {
                    [a, b, c, d] => {
                        seen.insert(u32::from_be_bytes([*a, *b, *c, *d]));
                    }
                    data if data == ATTACKER_MARK => attacker += 1,
                    _ => {}
                }
            }
            (seen, attacker)
        });
        let (client_ns, attacker_ns) = (lan.client_ns.clone(), lan.attacker_ns.clone());
        let laptop = std::thread::spawn(move || {
            in_netns(&client_ns, move || {
                let socket = UdpSocket::bind("198.51.100.2:0").expect("bind");
                for sequence in 0..count {
                    let _ = socket.send_to(&sequence.to_be_bytes(), "198.51.100.1:7000");
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        });
        let attacker = std::thread::spawn(move || {
            in_netns(&attacker_ns, move || {
                let socket = UdpSocket::bind("198.51.100.2:0").expect("bind");
                for _ in 0..count / 2 {
                    let _ = socket.send_to(ATTACKER_MARK, "198.51.100.1:7000");
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        Self {
            reader,
            senders: vec![laptop, attacker],
        }
    }

    /// Waits for the streams to end: (the laptop's sequence numbers, the attacker's count).
    fn finish(self) -> (BTreeSet<u32>, usize) {
        for sender in self.senders {
            sender.join().expect("sender");
        }
        self.reader.join().expect("reader")
    }
}

/// The fast path and WireGuard of a settled node are its own and exactly one of each: the
/// pinned objects, one program on each underlay's hook, one wireguard-go, one device, and no
/// program that uses the maps beyond the pinned ones and the one in the links.
fn assert_nothing_duplicated_or_leaked(node: &Node) {
    assert_eq!(
        node.pins("links"),
        [
            format!("tc-{}", node.lan.gateway_if_attacker),
            format!("tc-{}", node.lan.gateway_if_client),
        ]
        .into(),
        "one pinned link per underlay interface"
    );
    assert_eq!(
        node.pins("maps"),
        maps::ALL.iter().map(|m| m.to_string()).collect(),
        "each map pinned once"
    );
    assert_eq!(
        node.pins("progs"),
        [
            wgpin_common::programs::XDP,
            wgpin_common::programs::TC,
            wgpin_common::programs::TC_EGRESS
        ]
        .iter()
        .map(|p| p.to_string())
        .collect(),
        "each program pinned once"
    );
    let hooks = node.tcx_ingress();
    assert!(
        hooks.values().all(|programs| programs.len() == 1),
        "one program on each underlay's TC ingress: {hooks:?}"
    );
    let links = node.links();
    assert_eq!(
        links
            .iter()
            .filter(|l| l.starts_with("wg"))
            .collect::<Vec<_>>(),
        [&node.device],
        "one WireGuard device: {links:?}"
    );
    assert_eq!(node.wireguard_go_pids().len(), 1, "one wireguard-go");
    // The programs pinned under progs/ and the one in the links use the maps; those of killed
    // agents went with them (the kernel frees them shortly after the last reference).
    let ports = aya::maps::MapInfo::from_pin(node.paths().map(maps::PORTS))
        .expect("the ports map")
        .id();
    let users = || {
        aya::programs::loaded_programs()
            .flatten()
            .filter(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.contains(&ports))
            })
            .count()
    };
    wait_for(
        "the programs of killed agents to be freed",
        Duration::from_secs(10),
        || users() <= 4,
    );
}

/// The agent killed about every second, ten times, while the laptop streams through its tunnel
/// and an attacker with the laptop's key sends from an unpinned address: not one of the
/// laptop's datagrams is lost, none of the attacker's arrives, the laptop's endpoint never
/// moves, and once an agent is left running the node holds exactly its state with nothing
/// duplicated or leaked.
#[test]
fn a_crash_loop_never_lapses_enforcement_and_leaks_nothing() {
    const KILLS: usize = 10;
    let node = Node::new("c");
    let mut random = Random::new();
    let laptop_key = SecretKey::generate().expect("key");
    let peers = [laptop(&laptop_key)];
    node.write_manifests(&peers);
    let mut agent = node.start_agent(&[]);
    let gateway_key = wait_for_device(&node.device, 1, Duration::from_secs(20));
    let _laptop = peer_device(
        &node.lan.client_ns,
        &format!("wgl{}", node.id),
        &laptop_key,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    let attacker_device = format!("wga{}", node.id);
    let _attacker = peer_device(
        &node.lan.attacker_ns,
        &attacker_device,
        &laptop_key,
        &gateway_key,
        "192.0.2.129:51820",
        "198.51.100.2",
    );

    let tunnel = Tunnel::stream(&node.lan, 1200);
    let uapi = Uapi::default();
    let mut endpoints = BTreeSet::new();
    for _ in 0..KILLS {
        let until = Instant::now() + Duration::from_millis(500 + random.below(1000));
        while Instant::now() < until {
            if let Ok(device) = uapi.get(&node.device) {
                endpoints.extend(device.peers.values().filter_map(|p| p.endpoint));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.kill_9();
        agent = node.start_agent(&[]);
    }
    let (seen, attacker) = tunnel.finish();
    // The first datagram may be spent on the handshake; everything after it must arrive.
    let missing: Vec<u32> = (1..1200).filter(|s| !seen.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "the laptop lost {} datagrams across {KILLS} kills: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(attacker, 0, "the attacker got through");
    let expected: SocketAddr = "192.0.2.2:40000".parse().expect("endpoint");
    assert_eq!(
        endpoints,
        [expected].into(),
        "the laptop's endpoint never moved"
    );
    let attacker_view = uapi.get(&attacker_device).expect("attacker device");
    assert!(
        attacker_view
            .peers
            .values()
            .all(|p| p.last_handshake.is_none()),
        "the attacker never completed a handshake"
    );
    let (allowed, dropped) = node.port_counters();
    println!("the fast path allowed {allowed} and dropped {dropped} packets on the port");
    assert!(
        dropped > 0,
        "the attacker's handshakes reached the fast path"
    );

    wait_for("the last agent to settle", Duration::from_secs(20), || {
        http_get_in(
            &node.lan.gateway_ns,
            METRICS.parse().expect("address"),
            "/readyz",
        )
        .starts_with("HTTP/1.1 200")
    });
    holds_exactly(&node, &peers).expect("exactly the desired state");
    assert_nothing_duplicated_or_leaked(&node);
    let log = agent.log();
    assert_eq!(
        log.matches("serving /metrics").count(),
        KILLS + 1,
        "every agent started"
    );
    assert!(
        !log.contains("ERROR"),
        "{}",
        log.lines()
            .filter(|l| l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    agent.kill_9();
}

/// Work for the data plane's thread.
type Job = Box<dyn FnOnce(&mut DataPlane, &tokio::runtime::Runtime) + Send>;

/// The agent's data plane in this process, on a thread inside the gateway namespace: for faults
/// whose order only the journal tells. Dropped, it removes what it created; [`stop`] leaves
/// everything in place, as a process that dies would.
///
/// [`stop`]: InProcessAgent::stop
struct InProcessAgent {
    jobs: std::sync::mpsc::Sender<Job>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessAgent {
    /// Opens the data plane (loading or adopting the fast path and attaching it) and runs
    /// `first` on it before anything else can: what a starting agent does first.
    fn start<T: Send + 'static>(
        node: &Node,
        first: impl FnOnce(&mut DataPlane, &tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> (Self, T) {
        let config = DataPlaneConfig {
            state_dir: node.state(),
            bpffs: node.paths(),
            underlay: vec![
                node.lan.gateway_if_client.clone(),
                node.lan.gateway_if_attacker.clone(),
            ],
            hook: HookChoice::Auto,
            backend: Arc::new(Backend::userspace(Uapi::default(), "wireguard-go")),
            secrets_dir: None,
        };
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let (done, first_result) = std::sync::mpsc::channel();
        let ns = node.lan.gateway_ns.clone();
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let mut dataplane = runtime
                    .block_on(async { DataPlane::new(config) })
                    .expect("the data plane starts");
                let _ = done.send(first(&mut dataplane, &runtime));
                while let Ok(job) = inbox.recv() {
                    job(&mut dataplane, &runtime);
                }
            })
        });
        let result = first_result
            .recv_timeout(Duration::from_secs(60))
            .expect("the data plane started");
        (
            Self {
                jobs,
                thread: Some(thread),
            },
            result,
        )
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DataPlane, &tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs
            .send(Box::new(move |dataplane, runtime| {
                let _ = tx.send(f(dataplane, runtime));
            }))
            .expect("the data plane's thread");
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the job finished")
    }

    /// Ends the thread and leaves the fast path, the devices and the state as they are.
    fn stop(mut self) {
        let (closed, _) = std::sync::mpsc::channel();
        self.jobs = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        // Remove every device (and with it its wireguard-go) before the namespace goes.
        let _ = self.jobs.send(Box::new(|dataplane, runtime| {
            let _ = runtime.block_on(dataplane.reconcile(
                &PinnedNodeStateSpec::default(),
                &NodeCapabilities::default(),
            ));
        }));
        let (closed, _) = std::sync::mpsc::channel();
        self.jobs = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The node's state with `peers` on one Shared interface, as the operator renders it.
fn spec(node: &Node, peers: &[Peer]) -> PinnedNodeStateSpec {
    PinnedNodeStateSpec {
        node_name: "gateway".into(),
        interfaces: vec![RenderedInterface {
            name: "gateway".into(),
            mode: PinMode::Shared,
            interface_name: node.device.clone(),
            listen_port: PORT,
            listen_port_end: None,
            addresses: vec!["198.51.100.1/24".into()],
            mtu: Some(1420),
            peers: peers
                .iter()
                .map(|peer| RenderedPeer {
                    name: peer.name.clone(),
                    generation: Some(1),
                    public_key: peer.key.to_base64(),
                    allowed_ips: vec![peer.allowed_ip.to_string()],
                    sources: vec![peer.source.to_string()],
                    endpoint: None,
                    persistent_keepalive_seconds: None,
                    preshared_key_secret_ref: None,
                    dedicated_port: None,
                })
                .collect(),
        }],
    }
}

/// Makes the WireGuard `device` (a peer's, configured by [`peer_device`]) forget its session
/// with the gateway (at `gateway`), so that its next packet starts a handshake at once.
fn forget_session(device: &str, gateway_key: &str, endpoint: &str) {
    let gateway: WireGuardKey = gateway_key.parse().expect("gateway key");
    Uapi::default()
        .set(
            device,
            &DeviceConfig::default(),
            &[
                PeerChange::Remove(gateway),
                PeerChange::add(&PeerConfig {
                    public_key: gateway,
                    preshared_key: None,
                    endpoint: Some(endpoint.parse().expect("endpoint")),
                    persistent_keepalive: None,
                    allowed_ips: ["198.51.100.1/32".parse().expect("net")].into(),
                }),
            ],
        )
        .expect("session forgotten");
}

/// A reboot: the agent stops, bpffs loses the pins (the links detach) and the WireGuard device
/// and its process are gone; the state directory stays. An attacker holding the laptop's key
/// starts a handshake every few milliseconds throughout. The starting agent attaches and
/// verifies the fast path before anything else, writes every pin and the managed port before
/// it creates the device, and the device before its peers (the journal); not one of the
/// attacker's handshakes is answered, and the laptop reconnects to the same key.
#[test]
fn after_a_reboot_the_agent_enforces_before_it_adds_a_peer() {
    let node = Node::new("r");
    let laptop_key = SecretKey::generate().expect("key");
    let peers = [laptop(&laptop_key)];
    let (agent, ()) = InProcessAgent::start(&node, |_, _| ());
    let spec = spec(&node, &peers);
    let first = spec.clone();
    agent.run(move |dataplane, runtime| {
        runtime
            .block_on(dataplane.reconcile(&first, &NodeCapabilities::default()))
            .expect("reconcile")
    });
    let gateway_key = wait_for_device(&node.device, 1, Duration::from_secs(20));
    let laptop_device = format!("wgl{}", node.id);
    let _laptop = peer_device(
        &node.lan.client_ns,
        &laptop_device,
        &laptop_key,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    assert!(support::tunnel_datagrams(&node.lan, &node.lan.client_ns, "198.51.100.2") > 0);
    let attacker_device = format!("wga{}", node.id);
    let _attacker = peer_device(
        &node.lan.attacker_ns,
        &attacker_device,
        &laptop_key,
        &gateway_key,
        "192.0.2.129:51820",
        "198.51.100.2",
    );

    // The reboot.
    agent.stop();
    std::fs::remove_dir_all(&node.bpffs).expect("bpffs loses the pins");
    run(
        "ip",
        &["-n", &node.lan.gateway_ns, "link", "del", &node.device],
    );
    for pid in node.wireguard_go_pids() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", node.device));
    wait_for("the old wireguard-go to go", Duration::from_secs(5), || {
        node.wireguard_go_pids().is_empty()
    });
    assert!(
        node.tcx_ingress().values().all(Vec::is_empty),
        "the fast path went with its pins"
    );

    // The attacker tries all along: a handshake every few milliseconds, and data through it.
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = in_netns(&node.lan.gateway_ns, || {
        UdpSocket::bind("0.0.0.0:7000").expect("bind")
    });
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let attacks = {
        let (stop, ns, device, gateway_key) = (
            stop.clone(),
            node.lan.attacker_ns.clone(),
            attacker_device.clone(),
            gateway_key.clone(),
        );
        std::thread::spawn(move || {
            in_netns(&ns, move || {
                let socket = UdpSocket::bind("198.51.100.2:0").expect("bind");
                let mut attempts = 0;
                while !stop.load(Ordering::Relaxed) {
                    forget_session(&device, &gateway_key, "192.0.2.129:51820");
                    let _ = socket.send_to(ATTACKER_MARK, "198.51.100.1:7000");
                    attempts += 1;
                    // Time for the handshake to go out before the session is forgotten again.
                    std::thread::sleep(Duration::from_millis(20));
                }
                attempts
            })
        })
    };
    let endpoints = {
        let (stop, device) = (stop.clone(), node.device.clone());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(state) = Uapi::default().get(&device) {
                    for peer in state.peers.values() {
                        seen.extend(peer.endpoint);
                        if peer.last_handshake.is_some() {
                            seen.insert(SocketAddr::from(([0, 0, 0, 0], 0)));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // The start.
    let started = Instant::now();
    let (agent, verified_at_start) =
        InProcessAgent::start(&node, |dataplane, _| dataplane.fast_path().verify());
    let attached = started.elapsed();
    let again = spec.clone();
    agent.run(move |dataplane, runtime| {
        runtime
            .block_on(dataplane.reconcile(&again, &NodeCapabilities::default()))
            .expect("reconcile")
    });
    let enforcing = started.elapsed();
    let journal = agent.run(|dataplane, _| dataplane.journal().to_vec());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let attempts = attacks.join().expect("attacker");
    let endpoints = endpoints.join().expect("sampler");
    let mut from_attacker = 0;
    let mut buffer = [0u8; 64];
    while let Ok((len, _)) = receiver.recv_from(&mut buffer) {
        from_attacker += usize::from(&buffer[..len] == ATTACKER_MARK);
    }
    drop(receiver);
    println!(
        "after the reboot: fast path attached and verified {attached:?}, state enforced {enforcing:?} into the start; {attempts} handshakes from the attacker meanwhile"
    );

    assert!(
        verified_at_start.is_ok(),
        "the fast path is attached and verified before anything else: {verified_at_start:?}"
    );
    let position = |what: &dyn Fn(&Effect) -> bool| {
        journal
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("not in the journal: {journal:#?}"))
    };
    let laptop_pin = |op: &Op| matches!(op, Op::PutPin(key, _) if key.port == PORT && key.prefix == peers[0].source);
    let pin = position(&|e| matches!(e, Effect::FastPath(op) if laptop_pin(op)));
    let port = position(&|e| matches!(e, Effect::FastPath(Op::PutPort(p, _)) if *p == PORT));
    let device = position(&|e| matches!(e, Effect::DeviceCreated(d) if *d == node.device));
    let peer = position(
        &|e| matches!(e, Effect::PeersWritten { peers: written, .. } if written.contains(&peers[0].key)),
    );
    let last_fast_path = journal
        .iter()
        .rposition(|e| matches!(e, Effect::FastPath(_)))
        .expect("fast-path writes");
    assert!(
        pin < port && port < device && last_fast_path < device && device < peer,
        "pin, port, every fast-path write, then the device, then the peer: {journal:#?}"
    );
    assert!(attempts > 20, "the attacker tried only {attempts} times");
    assert_eq!(from_attacker, 0, "a datagram of the attacker came through");
    assert!(
        endpoints.is_empty(),
        "the gateway took a handshake or an endpoint in the window: {endpoints:?}"
    );
    let (_, dropped) = node.port_counters();
    assert!(
        dropped > 0,
        "the attacker's handshakes reached the new fast path"
    );

    // The laptop reconnects to the same key (the state directory kept it).
    assert_eq!(
        wait_for_device(&node.device, 1, Duration::from_secs(5)),
        gateway_key
    );
    forget_session(&laptop_device, &gateway_key, "192.0.2.1:51820");
    assert!(support::tunnel_datagrams(&node.lan, &node.lan.client_ns, "198.51.100.2") > 0);
    drop(agent);
}

/// A program of another loader (its own maps, so it manages no port: it passes everything),
/// put into the agent's link on `interface` in place of the agent's program, as an intruder
/// with the link's pin could: held until dropped, then gone with its bpffs root.
struct Intruder {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Intruder {
    /// Returns when the program was replaced, too.
    fn replace_program(node: &Node, interface: &str) -> (Self, Instant) {
        let root = PathBuf::from(format!("{}-intruder", node.bpffs.display()));
        let ours = node
            .paths()
            .link(wgpin_agent::fastpath::Hook::Tc, interface);
        let theirs = BpfPaths::new(&root).link(wgpin_agent::fastpath::Hook::Tc, interface);
        let ns = node.lan.gateway_ns.clone();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (ready, replaced) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || {
                // The intruder's loader adopts the agent's link through a pin of its own, then
                // forces its own program into it (bpf_link_update).
                std::fs::create_dir_all(theirs.parent().expect("links dir")).expect("root");
                let link = aya::programs::links::PinnedLink::from_pin(&ours).expect("the link");
                aya::programs::links::FdLink::from(link)
                    .pin(&theirs)
                    .expect("pinned again");
                let mut intruder = FastPath::open(BpfPaths::new(&root)).expect("another loader");
                intruder.replace_programs().expect("program replaced");
                ready.send(Instant::now()).expect("replaced");
                let _ = released.recv();
                drop(intruder);
                let _ = std::fs::remove_dir_all(&root);
            })
        });
        let at = replaced
            .recv_timeout(Duration::from_secs(30))
            .expect("the intruder's program in place");
        let intruder = Self {
            release: Some(release),
            thread: Some(thread),
        };
        (intruder, at)
    }
}

impl Drop for Intruder {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The fast path tampered with while the agent runs and the laptop is connected: its link
/// detached (the link and its pin stay), every pinned map deleted, its program replaced by
/// another one inside its link. Each is detected within a second (every peer withdrawn from
/// WireGuard), reported (a log line naming the problem, `wgpin_withdrawals_total` up by one,
/// `wgpin_fastpath_verified` 0), and repaired: the peers come back once the fast path is
/// verified again, and the laptop reconnects.
#[test]
fn a_tampered_fast_path_is_withdrawn_within_a_second_reported_and_restored() {
    let node = Node::new("t");
    let laptop_key = SecretKey::generate().expect("key");
    node.write_manifests(&[laptop(&laptop_key)]);
    let agent = node.start_agent(&["--guard-interval-ms", "200"]);
    let gateway_key = wait_for_device(&node.device, 1, Duration::from_secs(20));
    let laptop_device = format!("wgl{}", node.id);
    let _laptop = peer_device(
        &node.lan.client_ns,
        &laptop_device,
        &laptop_key,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    assert!(support::tunnel_datagrams(&node.lan, &node.lan.client_ns, "198.51.100.2") > 0);
    let metrics = METRICS.parse::<SocketAddr>().expect("address");
    let metric = |name: &str| {
        metric_value(
            &http_get_in(&node.lan.gateway_ns, metrics, "/metrics"),
            name,
        )
    };
    wait_for("verified", Duration::from_secs(10), || {
        metric("wgpin_fastpath_verified") == Some(1.0)
    });

    let link = node
        .paths()
        .link(wgpin_agent::fastpath::Hook::Tc, &node.lan.gateway_if_client);
    // Each fault returns when it was in place, and the intruder when there is one.
    type Fault<'a> = Box<dyn Fn() -> (Instant, Option<Intruder>) + 'a>;
    let faults: [(&str, &str, Fault<'_>); 3] = [
        (
            "link detached",
            "is no longer attached to the interface",
            Box::new(|| {
                run(
                    "bpftool",
                    &["link", "detach", "pinned", &link.display().to_string()],
                );
                (Instant::now(), None)
            }),
        ),
        (
            "pinned maps deleted",
            "is no longer pinned",
            Box::new(|| {
                for map in maps::ALL {
                    std::fs::remove_file(node.paths().map(map)).expect("map unpinned");
                }
                (Instant::now(), None)
            }),
        ),
        (
            "program replaced",
            "the attached program does not use map",
            Box::new(|| {
                let (intruder, at) = Intruder::replace_program(&node, &node.lan.gateway_if_client);
                (at, Some(intruder))
            }),
        ),
    ];
    for (fault, problem, make) in faults {
        let withdrawals = metric("wgpin_withdrawals_total").unwrap_or(0.0);
        // The verified gauge is 0 for about one guard interval: watch it meanwhile.
        let stop = Arc::new(AtomicBool::new(false));
        let unverified = {
            let (stop, ns) = (stop.clone(), node.lan.gateway_ns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let text = http_get_in(&ns, metrics, "/metrics");
                    if metric_value(&text, "wgpin_fastpath_verified") == Some(0.0) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                false
            })
        };
        let (started, intruder) = make();
        wait_for(
            &format!("the peers withdrawn ({fault})"),
            Duration::from_secs(5),
            || live_peers(&node.device).is_some_and(|p| p.is_empty()),
        );
        let detected = started.elapsed();
        wait_for(
            &format!("the peers restored ({fault})"),
            Duration::from_secs(10),
            || live_peers(&node.device).is_some_and(|p| p.len() == 1),
        );
        let restored = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let saw_unverified = unverified.join().expect("metrics watcher");
        println!("{fault}: withdrawn after {detected:?}, restored after {restored:?}");
        assert!(
            detected < Duration::from_secs(1),
            "{fault}: detected after {detected:?}"
        );
        let log = agent.log();
        assert!(
            log.lines()
                .any(|l| l.contains("fast path lost") && l.contains(problem)),
            "{fault}: no log line says {problem:?}:\n{log}"
        );
        assert_eq!(
            metric("wgpin_withdrawals_total"),
            Some(withdrawals + 1.0),
            "{fault}: one withdrawal counted"
        );
        assert!(saw_unverified, "{fault}: wgpin_fastpath_verified never 0");
        wait_for(
            &format!("verified again ({fault})"),
            Duration::from_secs(5),
            || metric("wgpin_fastpath_verified") == Some(1.0),
        );
        holds_exactly(&node, &[laptop(&laptop_key)]).expect("the state is back");
        println!(
            "{fault}: programs on the TC ingress hooks now: {:?}",
            node.tcx_ingress()
        );
        forget_session(&laptop_device, &gateway_key, "192.0.2.1:51820");
        assert!(
            support::tunnel_datagrams(&node.lan, &node.lan.client_ns, "198.51.100.2") > 0,
            "{fault}: the laptop reconnects"
        );
        drop(intruder);
    }
    drop(agent);
}

/// Whether the device is as the manifests declare it: up, MTU 1420, 198.51.100.1/24, listening
/// on [`PORT`], with exactly `peers` (and their pins and routes).
fn as_declared(node: &Node, peers: &[Peer]) -> Result<(), String> {
    let link = node.ip(&["-o", "link", "show", "dev", &node.device]);
    if !link.contains(",UP") || !link.contains(" mtu 1420 ") {
        return Err(format!("link: {link}"));
    }
    let addresses = node.ip(&["-o", "addr", "show", "dev", &node.device]);
    if !addresses.contains(" 198.51.100.1/24 ") {
        return Err(format!("addresses: {addresses}"));
    }
    let port = Uapi::default()
        .get(&node.device)
        .map_err(|e| e.to_string())?
        .listen_port;
    if port != Some(PORT) {
        return Err(format!("listen port {port:?}"));
    }
    holds_exactly(node, peers)
}

/// WireGuard and its interface changed by hand while the agent runs (resync every 500 ms):
/// the device deleted, its address removed, its MTU changed, a peer added, a peer's allowed IPs
/// changed, the listen port changed. Each is repaired at the next resync, and said so; the
/// laptop's tunnel works afterwards.
#[test]
fn changes_by_hand_are_repaired_at_the_next_resync() {
    let node = Node::new("d");
    let laptop_key = SecretKey::generate().expect("key");
    let peers = [laptop(&laptop_key)];
    node.write_manifests(&peers);
    let agent = node.start_agent(&["--resync-interval-ms", "500"]);
    wait_for("the declared device", Duration::from_secs(20), || {
        as_declared(&node, &peers).is_ok()
    });
    let gateway_key = wait_for_device(&node.device, 1, Duration::from_secs(1));
    let laptop_device = format!("wgl{}", node.id);
    let _laptop = peer_device(
        &node.lan.client_ns,
        &laptop_device,
        &laptop_key,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );

    let ns = node.lan.gateway_ns.clone();
    let device = node.device.clone();
    let stranger = SecretKey::generate().expect("key").public_key().to_base64();
    let laptop_public = laptop_key.public_key().to_base64();
    let changes: [(&str, Vec<&str>); 6] = [
        (
            "the device deleted (ip link del)",
            vec!["ip", "-n", &ns, "link", "del", &device],
        ),
        (
            "its address removed (ip addr del)",
            vec![
                "ip",
                "-n",
                &ns,
                "addr",
                "del",
                "198.51.100.1/24",
                "dev",
                &device,
            ],
        ),
        (
            "its MTU changed (ip link set mtu)",
            vec!["ip", "-n", &ns, "link", "set", &device, "mtu", "1300"],
        ),
        (
            "a peer added (wg set)",
            vec![
                "wg",
                "set",
                &device,
                "peer",
                &stranger,
                "allowed-ips",
                "198.51.100.99/32",
            ],
        ),
        (
            "a peer's allowed IPs changed (wg set)",
            vec![
                "wg",
                "set",
                &device,
                "peer",
                &laptop_public,
                "allowed-ips",
                "198.51.100.77/32",
            ],
        ),
        (
            "the listen port changed (wg set)",
            vec!["wg", "set", &device, "listen-port", "51999"],
        ),
    ];
    for (change, command) in changes {
        let reports = agent.log().matches("drift repaired").count();
        run(command[0], &command[1..]);
        let started = Instant::now();
        // (The agent may repair it before the first look: the report below says it did.)
        wait_for(
            &format!("{change} to be repaired"),
            Duration::from_secs(10),
            || as_declared(&node, &peers).is_ok(),
        );
        let repaired = started.elapsed();
        println!("{change}: repaired after {repaired:?}");
        wait_for(
            &format!("{change} to be reported"),
            Duration::from_secs(5),
            || agent.log().matches("drift repaired").count() > reports,
        );
        forget_session(&laptop_device, &gateway_key, "192.0.2.1:51820");
        assert!(
            support::tunnel_datagrams(&node.lan, &node.lan.client_ns, "198.51.100.2") > 0,
            "{change}: the laptop's tunnel works again"
        );
    }
    assert_eq!(node.wireguard_go_pids().len(), 1, "one wireguard-go");
    drop(agent);
}

/// Another process holds the WireGuard port when the agent creates the device: the agent says
/// which port and who holds it, keeps the peers out, retries, and brings the device up once the
/// port is free.
#[test]
fn a_taken_port_is_reported_with_its_owner_and_used_once_free() {
    let node = Node::new("p");
    let laptop_key = SecretKey::generate().expect("key");
    let peers = [laptop(&laptop_key)];
    node.write_manifests(&peers);
    let squatter = in_netns(&node.lan.gateway_ns, || {
        UdpSocket::bind(("0.0.0.0", PORT)).expect("the port taken")
    });
    let agent = node.start_agent(&[]);
    let owner = format!("pid {}", std::process::id());
    wait_for(
        "the report of the taken port",
        Duration::from_secs(20),
        || {
            agent
                .log()
                .lines()
                .any(|l| l.contains("reconcile failed") && l.contains(&PORT.to_string()))
        },
    );
    let log = agent.log();
    let report = log
        .lines()
        .find(|l| l.contains("reconcile failed") && l.contains(&PORT.to_string()))
        .expect("the report");
    println!("the agent says: {report}");
    assert!(
        report.contains(&owner),
        "the report names the owner ({owner}): {report}"
    );
    assert!(
        live_peers(&node.device).is_none_or(|p| p.is_empty()),
        "no peer goes live on a device without its port"
    );

    drop(squatter);
    let freed = Instant::now();
    wait_for("the device on its port", Duration::from_secs(40), || {
        as_declared(&node, &peers).is_ok()
    });
    println!("the port was used {:?} after it was freed", freed.elapsed());
    drop(agent);
}

/// The interface renamed, and the agent killed while it creates the new device (the device is
/// up, the agent has not yet written it down): then renamed back before the agent restarts.
/// The restarted agent knows the half-made device as its own and deletes it, so the port it
/// holds is free and the old device comes back; nothing is left behind.
#[test]
fn a_device_being_created_when_the_agent_dies_is_not_left_behind() {
    let node = Node::new("n");
    let laptop_key = SecretKey::generate().expect("key");
    let peers = [laptop(&laptop_key)];
    node.write_manifests(&peers);
    let mut agent = node.start_agent(&["--resync-interval-ms", "500"]);
    wait_for("the device", Duration::from_secs(20), || {
        as_declared(&node, &peers).is_ok()
    });
    agent.kill_9();

    // A wireguard-go that brings the device up, then keeps the agent waiting.
    let renamed = format!("{}n", node.device);
    let marker = node.work.path().join("created");
    let wrapper = node.work.path().join("slow-wireguard-go");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nwireguard-go \"$@\" || exit $?\necho $$ > {}\nexec sleep 30\n",
            marker.display()
        ),
    )
    .expect("wrapper");
    run("chmod", &["755", &wrapper.display().to_string()]);
    node.write_manifests_for(&renamed, &peers);
    agent = node.start_agent(&["--wireguard-go", &wrapper.display().to_string()]);
    wait_for(
        "the renamed device to be created",
        Duration::from_secs(20),
        || marker.exists() && !wireguard_go_pids(&renamed).is_empty(),
    );
    agent.kill_9();
    if let Some(pid) = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    node.write_manifests(&peers);
    let restarted = Instant::now();
    let agent = node.start_agent(&["--resync-interval-ms", "500"]);
    wait_for("the device back", Duration::from_secs(20), || {
        as_declared(&node, &peers).is_ok()
    });
    println!("back after {:?}", restarted.elapsed());
    wait_for("the half-made device gone", Duration::from_secs(5), || {
        wireguard_go_pids(&renamed).is_empty() && !node.links().contains(&renamed)
    });
    assert_nothing_duplicated_or_leaked(&node);
    drop(agent);
}
