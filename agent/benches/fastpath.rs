//! Benchmark of the fast path: figures, not a test. Nothing here asserts a timing; it prints
//! what it measured, side by side, with the ratios the targets are stated in.
//!
//! A. Per-packet cost of the loaded programs with `BPF_PROG_TEST_RUN` (`FastPath::test_run`):
//!    1, 100 and 10,000 pinned prefixes on one port, IPv4 and IPv6, allowed, dropped and
//!    unmanaged frames, XDP and TC; then, with repeat = 1 per call, what a drop costs when
//!    every packet comes from a new source (a rate-limit entry and a violation event each).
//! I. Identity mode's extra cost per packet (`BPF_PROG_TEST_RUN`, side by side in one run):
//!    one port shared by 100 peers, each with its own /32, as Shared and as Identity; a data
//!    message of a known session, an initiation, a data message of an unknown session; and the
//!    egress check on a handshake response and on a data message.
//! B. Real packets on one veth pair between two namespaces, one generator (trafgen) for
//!    every variant: no filter, our XDP program, our TC program, and the same allowlist in
//!    nftables (netdev ingress, and inet input); plus the generator alone (server end down) to
//!    calibrate. Spoofed floods (one source, and a new random source per packet), an allowed
//!    flood and a flood to an unmanaged port. Drops are counted by each filter's own counters,
//!    deliveries by the server namespace's UDP counters, and the CPU time the packets cost by
//!    the generator's and the softirq threads' run time: the receive path runs on the sender's
//!    CPU, so CPU ns per packet minus the generator's own is the receive side's cost, whatever
//!    else the machine is doing.
//!
//! Run it as root with `sudo bash scripts/bench-fastpath.sh` (it installs trafgen and nft).
//! Knobs (environment): `WGPIN_BENCH_SECS` measured seconds per run (2), `WGPIN_BENCH_ROUNDS`
//! rounds over every variant, reported as medians (3), `WGPIN_BENCH_REPEAT` test-run
//! repetitions per sample (1000000), `WGPIN_BENCH_SENDERS` trafgen processes (1; the receive
//! cost estimate needs 1), `WGPIN_BENCH_PARTS` any of `a`, `i`, `b` (aib), `WGPIN_BENCH_FILTERS` a
//! comma list of `ceiling,none,xdp,tc,nft-netdev,nft-inet` (all), `WGPIN_BENCH_DRAIN=1` to
//! drain violation events during the runs as the agent would, `WGPIN_BENCH_ID` the suffix of
//! every name this creates (the process id), so that a wrapper can clean up after a kill;
//! `WGPIN_BENCH_DEBUG=1` prints each run's raw counters.
//!
//! Addresses: traffic only ever goes to 192.0.2.1 / fd00:2::1 inside a namespace this creates;
//! sources are 192.0.2.2 (pinned), 203.0.113.7 and fd00:bad::/64 (spoofed). The filler pins
//! come from 198.18.0.0/15 (RFC 2544's benchmarking range) and fd00:18::/64; they are map keys
//! and `BPF_PROG_TEST_RUN` frames only, never sent.

// The test hosts' helpers (commands, network namespaces), shared with the tests.
#[path = "../tests/support/mod.rs"]
mod support;
use support::{add_addresses, add_namespaces, delete_namespaces, in_netns, run};

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wgpin_agent::fastpath::{BpfPaths, FastPath, FastPathState, Hook, HookChoice, PinKey};
use wgpin_common::{
    AllowEntry, PortEntry,
    craft::{Frame, Ip},
};

const PORT: u16 = 40001;
const UNMANAGED_PORT: u16 = 40009;
const SOURCE_PORT: u16 = 5000;
const PORT_SLOT: u32 = 0;
const SIZES: [usize; 3] = [1, 100, 10_000];
/// Part B holds the largest set.
const B_PINS: usize = 10_000;
/// UDP payload of every frame (74-byte IPv4 and 94-byte IPv6 frames).
const PAYLOAD: usize = 32;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_SHOT: u32 = 2;
/// TC_ACT_UNSPEC (-1): the TC program's "pass".
const TC_NEXT: u32 = u32::MAX;

const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const SPOOF_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
const SPOOF_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xbad, 0, 0, 0, 0, 0, 0);
/// The MAC addresses `Frame` writes (destination, source): the veth ends get them.
const SERVER_MAC: &str = "02:00:00:00:00:01";
const CLIENT_MAC: &str = "02:00:00:00:00:02";

// ---------------------------------------------------------------------------------------------
// Small helpers (some copied from agent/tests/support/mod.rs: benches cannot import tests).

struct Settings {
    secs: f64,
    rounds: usize,
    drain: bool,
    repeat: u32,
    senders: u32,
    filters: Vec<Filter>,
    part_a: bool,
    part_i: bool,
    part_b: bool,
    id: String,
}

impl Settings {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let secs = var("WGPIN_BENCH_SECS")
            .map(|v| {
                v.parse::<f64>()
                    .expect("WGPIN_BENCH_SECS is a number of seconds")
            })
            .unwrap_or(2.0)
            .clamp(0.5, 60.0);
        let rounds = var("WGPIN_BENCH_ROUNDS")
            .map(|v| v.parse::<usize>().expect("WGPIN_BENCH_ROUNDS is a count"))
            .unwrap_or(3)
            .clamp(1, 20);
        let filters = var("WGPIN_BENCH_FILTERS").map_or(Filter::ALL.to_vec(), |v| {
            Filter::ALL
                .into_iter()
                .filter(|f| v.split(',').any(|name| name.trim() == f.key()))
                .collect()
        });
        let repeat = var("WGPIN_BENCH_REPEAT")
            .map(|v| v.parse::<u32>().expect("WGPIN_BENCH_REPEAT is a count"))
            .unwrap_or(1_000_000)
            .max(1);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let senders = var("WGPIN_BENCH_SENDERS")
            .map(|v| v.parse::<u32>().expect("WGPIN_BENCH_SENDERS is a count"))
            .unwrap_or(1)
            .clamp(1, cpus);
        let parts = var("WGPIN_BENCH_PARTS").unwrap_or_else(|| "aib".into());
        let id = var("WGPIN_BENCH_ID").unwrap_or_else(|| std::process::id().to_string());
        assert!(
            id.len() <= 8 && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "WGPIN_BENCH_ID must be at most 8 letters or digits (interface names are short)"
        );
        Self {
            secs,
            rounds,
            drain: var("WGPIN_BENCH_DRAIN").is_some_and(|v| v != "0"),
            repeat,
            senders,
            filters,
            part_a: parts.contains('a'),
            part_i: parts.contains('i'),
            part_b: parts.contains('b'),
            id,
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The bench's own bpffs root, removed at the end even when the bench panics.
struct BenchRoot(PathBuf);

impl Drop for BenchRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// The pins: dense /32s and /128s, so a lookup walks the deepest paths the trie has.

fn filler_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 2 * i as u32)
}

fn filler_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0)) + 2 * i as u128)
}

fn next_v4(addr: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr) + 1)
}

fn next_v6(addr: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(addr) + 1)
}

/// Port 40001 managed (shared mode), with `v4` and `v6` pinned as host prefixes, each with a
/// peer slot of its own (so an allowed packet updates port and peer counters).
fn pin_state(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> FastPathState {
    let mut state = FastPathState::default();
    state.ports.insert(PORT, PortEntry::shared(PORT_SLOT));
    let prefixes = v4
        .iter()
        .map(|a| IpNet::V4(Ipv4Net::from(*a)))
        .chain(v6.iter().map(|a| IpNet::V6(Ipv6Net::from(*a))));
    for (i, prefix) in prefixes.enumerate() {
        state.pins.insert(
            PinKey { port: PORT, prefix },
            AllowEntry {
                peer_slot: (i % 60_000) as u32,
            },
        );
    }
    state
}

fn pins(n: usize) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    (
        (0..n).map(filler_v4).collect(),
        (0..n).map(filler_v6).collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Part I: identity mode against shared mode, BPF_PROG_TEST_RUN.

const IDENTITY_PEERS: u32 = 100;

/// Port `PORT` shared by `IDENTITY_PEERS` peers, peer `i` pinned to `filler_v4(i)`/32, as
/// Shared or as Identity (then with each peer's own pin and identity, and one session each).
fn identity_state(identity: bool) -> FastPathState {
    use wgpin_agent::fastpath::state::{PeerIdentity, PeerPinKey};
    let mut state = FastPathState::default();
    let entry = if identity {
        PortEntry::identity(PORT_SLOT)
    } else {
        PortEntry::shared(PORT_SLOT)
    };
    state.ports.insert(PORT, entry);
    for i in 0..IDENTITY_PEERS {
        let prefix = IpNet::V4(Ipv4Net::from(filler_v4(i as usize)));
        state
            .pins
            .insert(PinKey { port: PORT, prefix }, AllowEntry { peer_slot: i });
        if identity {
            state.peer_pins.insert(PeerPinKey {
                peer_slot: i,
                prefix,
            });
            let mut public_key = [0u8; 32];
            public_key[..4].copy_from_slice(&i.to_be_bytes());
            state.identities.insert(
                PeerIdentity {
                    port: PORT,
                    public_key,
                },
                i,
            );
        }
    }
    state
}

/// The session index of peer `i` in part I.
fn session_index(i: u32) -> u32 {
    0x5e55_0000 + i
}

fn part_i(fast_path: &mut FastPath, settings: &Settings) -> String {
    let peer = IDENTITY_PEERS / 2;
    let source = filler_v4(peer as usize);
    let to_gateway = |message: u8, index: u32| {
        Frame::udp(
            Ip::V4(source.octets(), SERVER_V4.octets()),
            SOURCE_PORT,
            PORT,
        )
        .wireguard(message, index, 0)
        .bytes()
    };
    let from_gateway = |message: u8, index: u32| {
        Frame::udp(
            Ip::V4(SERVER_V4.octets(), source.octets()),
            PORT,
            SOURCE_PORT,
        )
        .wireguard(message, index, 7)
        .bytes()
    };
    let known = session_index(peer);
    let unknown = session_index(IDENTITY_PEERS + 1);
    // (label, hook, frame, expected verdict)
    let cases: Vec<(&str, Hook, Vec<u8>, u32)> = vec![
        (
            "XDP, data of a known session",
            Hook::Xdp,
            to_gateway(4, known),
            XDP_PASS,
        ),
        (
            "XDP, handshake initiation",
            Hook::Xdp,
            to_gateway(1, 0),
            XDP_PASS,
        ),
        (
            "XDP, data of an unknown session",
            Hook::Xdp,
            to_gateway(4, unknown),
            XDP_PASS,
        ),
        (
            "TC ingress, data of a known session",
            Hook::Tc,
            to_gateway(4, known),
            TC_NEXT,
        ),
        (
            "TC egress, handshake response",
            Hook::Egress,
            from_gateway(2, known),
            TC_NEXT,
        ),
        (
            "TC egress, data message",
            Hook::Egress,
            from_gateway(4, known),
            TC_NEXT,
        ),
    ];
    let mut ns: Vec<[f64; 2]> = vec![[0.0; 2]; cases.len()];
    let mut wrong = Vec::new();
    for (column, identity) in [false, true].into_iter().enumerate() {
        fast_path
            .apply(&identity_state(identity))
            .expect("the identity state is written");
        if identity {
            for i in 0..IDENTITY_PEERS {
                fast_path
                    .record_session(PORT, session_index(i), i)
                    .expect("a session");
            }
        }
        for (row, (label, hook, frame, expected)) in cases.iter().enumerate() {
            let (verdict, _) = fast_path.test_run(*hook, frame, 1000).expect("test run");
            if verdict != *expected {
                wrong.push(format!(
                    "{label} ({}): verdict {verdict}",
                    if identity { "identity" } else { "shared" }
                ));
            }
            let samples = (0..SAMPLES)
                .map(|_| {
                    let (_, mean) = fast_path
                        .test_run(*hook, frame, settings.repeat)
                        .expect("test run");
                    mean.as_secs_f64() * 1e9
                })
                .collect();
            ns[row][column] = median(samples);
        }
    }
    fast_path
        .apply(&FastPathState::default())
        .expect("the identity state is removed");
    let mut out = format!(
        "I. Identity mode: ns per packet (BPF_PROG_TEST_RUN, median of {SAMPLES} × {} runs), one port, {IDENTITY_PEERS} peers with a /32 each\n\n\
         | packet | Shared | Identity | Identity / Shared |\n|---|---|---|---|\n",
        settings.repeat
    );
    for ((label, ..), [shared, identity]) in cases.iter().zip(&ns) {
        let _ = writeln!(
            out,
            "| {label} | {shared:.1} | {identity:.1} | {:.2}× |",
            identity / shared
        );
    }
    if !wrong.is_empty() {
        let _ = writeln!(out, "\nWRONG VERDICTS: {}", wrong.join("; "));
    }
    assert!(wrong.is_empty(), "{out}");
    out
}

// ---------------------------------------------------------------------------------------------
// Part A: BPF_PROG_TEST_RUN.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Allowed,
    Dropped,
    Unmanaged,
    NotIp,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed (pinned source)",
            Self::Dropped => "dropped (unpinned source)",
            Self::Unmanaged => "unmanaged port (no lookup)",
            Self::NotIp => "ARP (floor: entry, parse)",
        }
    }

    fn expected(self, hook: Hook) -> u32 {
        match (self, hook) {
            (Self::Dropped, Hook::Xdp) => XDP_DROP,
            (Self::Dropped, Hook::Tc | Hook::Egress) => TC_SHOT,
            (_, Hook::Xdp) => XDP_PASS,
            (_, Hook::Tc | Hook::Egress) => TC_NEXT,
        }
    }
}

/// The frame of `kind` for a set of `n` pins: the allowed source is the middle pin, the
/// dropped one its unpinned neighbour (same trie path, one bit apart).
fn frame_a(v6: bool, kind: Kind, n: usize) -> Vec<u8> {
    if kind == Kind::NotIp {
        return Frame::arp().bytes();
    }
    let ip = if v6 {
        let pinned = filler_v6(n / 2);
        let src = if kind == Kind::Allowed {
            pinned
        } else {
            next_v6(pinned)
        };
        Ip::V6(src.octets(), SERVER_V6.octets())
    } else {
        let pinned = filler_v4(n / 2);
        let src = if kind == Kind::Allowed {
            pinned
        } else {
            next_v4(pinned)
        };
        Ip::V4(src.octets(), SERVER_V4.octets())
    };
    let port = if kind == Kind::Unmanaged {
        UNMANAGED_PORT
    } else {
        PORT
    };
    Frame::udp(ip, SOURCE_PORT, port).payload(PAYLOAD).bytes()
}

struct RowA {
    hook: Hook,
    v6: bool,
    kind: Kind,
    /// Mean ns per run for each of SIZES.
    ns: Vec<f64>,
    wrong_verdicts: Vec<String>,
}

const SAMPLES: usize = 5;
/// Traffic before the measured window of each run.
const WARM_UP_MS: u64 = 500;

fn part_a(fast_path: &mut FastPath, settings: &Settings) -> (Vec<RowA>, String) {
    let mut rows: Vec<RowA> = Vec::new();
    for hook in [Hook::Xdp, Hook::Tc] {
        for v6 in [false, true] {
            for kind in [Kind::Allowed, Kind::Dropped, Kind::Unmanaged, Kind::NotIp] {
                if v6 && kind == Kind::NotIp {
                    continue;
                }
                rows.push(RowA {
                    hook,
                    v6,
                    kind,
                    ns: Vec::new(),
                    wrong_verdicts: Vec::new(),
                });
            }
        }
    }
    for n in SIZES {
        let (v4, v6) = pins(n);
        fast_path
            .apply(&pin_state(&v4, &v6))
            .expect("the pins are written");
        for row in &mut rows {
            let frame = frame_a(row.v6, row.kind, n);
            // A warm-up run (caches, the rate-limit entry of the dropped source), then samples.
            let (verdict, _) = fast_path
                .test_run(row.hook, &frame, 1000)
                .expect("test run");
            if verdict != row.kind.expected(row.hook) {
                row.wrong_verdicts.push(format!(
                    "{n} pins: verdict {verdict}, expected {}",
                    row.kind.expected(row.hook)
                ));
            }
            let samples = (0..SAMPLES)
                .map(|_| {
                    let (_, mean) = fast_path
                        .test_run(row.hook, &frame, settings.repeat)
                        .expect("test run");
                    mean.as_secs_f64() * 1e9
                })
                .collect();
            row.ns.push(median(samples));
        }
        let _ = fast_path.drain_violations();
    }
    let novelty = source_novelty(fast_path);
    (rows, novelty)
}

/// One `BPF_PROG_TEST_RUN` per packet (repeat = 1), 10,000 pins: allowed, dropped from one
/// source (rate-limited: no event) and dropped from a new source each time (a new rate-limit
/// entry and a violation event; the ring buffer is drained every 256 calls, before it fills).
fn source_novelty(fast_path: &mut FastPath) -> String {
    const CALLS: usize = 5_000;
    let n = SIZES[SIZES.len() - 1];
    let (v4, v6) = pins(n);
    fast_path
        .apply(&pin_state(&v4, &v6))
        .expect("the pins are written");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nA2. One BPF_PROG_TEST_RUN per packet (repeat = 1, mean of {CALLS} calls; includes the kernel's timer read), {n} IPv4 pins"
    );
    let _ = writeln!(
        out,
        "{:<5} {:>10} {:>18} {:>22} {:>9}",
        "hook", "allowed", "dropped, 1 source", "dropped, new sources", "new/1"
    );
    for (h, hook) in [Hook::Xdp, Hook::Tc].into_iter().enumerate() {
        let mean_of = |fast_path: &mut FastPath, frame_of: &dyn Fn(usize) -> Vec<u8>| -> f64 {
            let mut total = 0.0;
            for i in 0..CALLS {
                let frame = frame_of(i);
                let (_, took) = fast_path.test_run(hook, &frame, 1).expect("test run");
                total += took.as_secs_f64() * 1e9;
                if i % 256 == 255 {
                    let _ = fast_path.drain_violations();
                }
            }
            let _ = fast_path.drain_violations();
            total / CALLS as f64
        };
        let allowed_frame = frame_a(false, Kind::Allowed, n);
        let dropped_frame = frame_a(false, Kind::Dropped, n);
        let allowed = mean_of(fast_path, &|_| allowed_frame.clone());
        let one = mean_of(fast_path, &|_| dropped_frame.clone());
        // Odd neighbours of the pins (unpinned, as deep in the trie as the one source), a
        // different one for every call and for each hook.
        let before = fast_path.global_counters().expect("global counters");
        let new = mean_of(fast_path, &|i| {
            let src = next_v4(filler_v4((h * CALLS + i) % n));
            Frame::udp(Ip::V4(src.octets(), SERVER_V4.octets()), SOURCE_PORT, PORT)
                .payload(PAYLOAD)
                .bytes()
        });
        let after = fast_path.global_counters().expect("global counters");
        let _ = writeln!(
            out,
            "{:<5} {:>8.1}ns {:>16.1}ns {:>20.1}ns {:>8.2}×   (events sent {}, lost {})",
            hook.to_string(),
            allowed,
            one,
            new,
            new / one,
            after.events_sent - before.events_sent,
            after.events_lost - before.events_lost,
        );
    }
    out
}

fn print_part_a(rows: &[RowA], settings: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A. Per-packet program cost, BPF_PROG_TEST_RUN: mean ns per run, median of {SAMPLES} samples of {} runs",
        settings.repeat
    );
    let _ = writeln!(
        out,
        "   N dense host pins per family on port {PORT} (IPv4 /32 in 198.18.0.0/15, IPv6 /128 in fd00:18::/64);"
    );
    let _ = writeln!(
        out,
        "   allowed = the middle pin, dropped = its unpinned neighbour; frames {} B (IPv4), {} B (IPv6)",
        14 + 20 + 8 + PAYLOAD,
        14 + 40 + 8 + PAYLOAD
    );
    let mut header = format!("{:<5} {:<6} {:<27}", "hook", "family", "frame");
    for n in SIZES {
        let _ = write!(header, " {:>9}", format!("N={n}"));
    }
    let _ = write!(header, " {:>9} {:>8}", "max/N=1", "≤100ns");
    let _ = writeln!(out, "{header}");
    for row in rows {
        let mut line = format!(
            "{:<5} {:<6} {:<27}",
            row.hook.to_string(),
            match (row.kind, row.v6) {
                (Kind::NotIp, _) => "-",
                (_, true) => "IPv6",
                (_, false) => "IPv4",
            },
            row.kind.label()
        );
        for ns in &row.ns {
            let _ = write!(line, " {:>7.1}ns", ns);
        }
        let max = row.ns.iter().copied().fold(0.0, f64::max);
        let first = row.ns.first().copied().unwrap_or(f64::NAN);
        let _ = write!(
            line,
            " {:>8.2}× {:>8}",
            max / first,
            if max <= 100.0 { "yes" } else { "NO" }
        );
        let _ = writeln!(out, "{line}");
        for wrong in &row.wrong_verdicts {
            let _ = writeln!(out, "      !! wrong verdict: {wrong}");
        }
    }
    let all: Vec<f64> = rows.iter().flat_map(|r| r.ns.iter().copied()).collect();
    let worst = all.iter().copied().fold(0.0, f64::max);
    let flat = rows
        .iter()
        .filter(|r| matches!(r.kind, Kind::Allowed | Kind::Dropped))
        .map(|r| {
            let max = r.ns.iter().copied().fold(0.0, f64::max);
            let min = r.ns.iter().copied().fold(f64::INFINITY, f64::min);
            max / min
        })
        .fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "   worst mean {worst:.1} ns (target ≤ 100 ns: {}); largest spread across N for a lookup row {flat:.2}× (target: flat)",
        if worst <= 100.0 { "met" } else { "MISSED" }
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Part B: real packets on a veth pair.

/// A server and a client namespace joined by a veth pair; deleted on drop.
struct Net {
    server_ns: String,
    client_ns: String,
    server_if: String,
    client_if: String,
}

impl Net {
    fn new(id: &str) -> Self {
        let net = Self {
            server_ns: format!("wgpb-{id}-s"),
            client_ns: format!("wgpb-{id}-c"),
            server_if: format!("wpb{id}s"),
            client_if: format!("wpb{id}c"),
        };
        add_namespaces(&[&net.server_ns, &net.client_ns]);
        run(
            "ip",
            &[
                "-n",
                &net.server_ns,
                "link",
                "add",
                &net.server_if,
                "address",
                SERVER_MAC,
                "type",
                "veth",
                "peer",
                "name",
                &net.client_if,
                "address",
                CLIENT_MAC,
                "netns",
                &net.client_ns,
            ],
        );
        for (ns, dev, v4, v6) in [
            (&net.server_ns, &net.server_if, SERVER_V4, SERVER_V6),
            (&net.client_ns, &net.client_if, CLIENT_V4, CLIENT_V6),
        ] {
            add_addresses(ns, dev, &[format!("{v4}/24"), format!("{v6}/64")]);
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        // The ceiling runs take the server end down: keep its IPv6 address meanwhile.
        in_netns(&net.server_ns, || {
            std::fs::write("/proc/sys/net/ipv6/conf/all/keep_addr_on_down", "1")
                .expect("set keep_addr_on_down");
        });
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the peer (and nft tables).
        delete_namespaces(&[&self.server_ns, &self.client_ns]);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    /// No receiver at all: the server end is down, so the client's veth drops every packet at
    /// once. What the generator costs alone, per traffic.
    Ceiling,
    None,
    Xdp,
    Tc,
    NftNetdev,
    NftInet,
}

impl Filter {
    const ALL: [Self; 6] = [
        Self::Ceiling,
        Self::None,
        Self::Xdp,
        Self::Tc,
        Self::NftNetdev,
        Self::NftInet,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Ceiling => "generator alone",
            Self::None => "no filter",
            Self::Xdp => "wgpin XDP",
            Self::Tc => "wgpin TC (tcx)",
            Self::NftNetdev => "nft netdev ingress",
            Self::NftInet => "nft inet input",
        }
    }

    /// The name `WGPIN_BENCH_FILTERS` uses.
    fn key(self) -> &'static str {
        match self {
            Self::Ceiling => "ceiling",
            Self::None => "none",
            Self::Xdp => "xdp",
            Self::Tc => "tc",
            Self::NftNetdev => "nft-netdev",
            Self::NftInet => "nft-inet",
        }
    }

    fn nft_table(self) -> Option<&'static str> {
        match self {
            Self::NftNetdev => Some("netdev wgpinbench"),
            Self::NftInet => Some("inet wgpinbench"),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Traffic {
    Spoofed4,
    SpoofedRandom6,
    Allowed4,
    Unmanaged4,
}

impl Traffic {
    const ALL: [Self; 4] = [
        Self::Spoofed4,
        Self::SpoofedRandom6,
        Self::Allowed4,
        Self::Unmanaged4,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Spoofed4 => "spoofed IPv4, one source",
            Self::SpoofedRandom6 => "spoofed IPv6, random sources",
            Self::Allowed4 => "allowed IPv4 (pinned source)",
            Self::Unmanaged4 => "IPv4 to an unmanaged port",
        }
    }

    /// The trafgen packet: the crafted frame's bytes, with the UDP checksum computed by
    /// trafgen and, for random sources, the low 64 bits of the source drawn per packet.
    fn trafgen_config(self) -> String {
        let (frame, csum_at, csum, random) = match self {
            Self::Spoofed4 | Self::Allowed4 | Self::Unmanaged4 => {
                let src = if self == Self::Spoofed4 {
                    SPOOF_V4
                } else {
                    CLIENT_V4
                };
                let port = if self == Self::Unmanaged4 {
                    UNMANAGED_PORT
                } else {
                    PORT
                };
                let frame = Frame::udp(Ip::V4(src.octets(), SERVER_V4.octets()), SOURCE_PORT, port)
                    .payload(PAYLOAD)
                    .bytes();
                (frame, 14 + 20 + 6, "csumudp(14, 34)", None)
            }
            Self::SpoofedRandom6 => {
                let frame = Frame::udp(
                    Ip::V6(SPOOF_V6.octets(), SERVER_V6.octets()),
                    SOURCE_PORT,
                    PORT,
                )
                .payload(PAYLOAD)
                .bytes();
                // Source address at 14 + 8; its interface identifier at 14 + 16.
                (frame, 14 + 40 + 6, "csumudp6(14, 54)", Some(14 + 16))
            }
        };
        let mut parts = Vec::new();
        let mut i = 0;
        while i < frame.len() {
            if Some(i) == random {
                parts.push("drnd(8)".to_string());
                i += 8;
            } else if i == csum_at {
                parts.push(csum.to_string());
                i += 2;
            } else {
                parts.push(format!("{:#04x}", frame[i]));
                i += 1;
            }
        }
        format!("{{ {} }}\n", parts.join(", "))
    }
}

/// Counters read at one instant.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    at: Option<Instant>,
    /// Client veth: packets handed to the pair, and refused by it.
    sent: u64,
    sent_dropped: u64,
    /// Server veth: packets received and dropped by the device (before any filter).
    received_dropped: u64,
    /// Server namespace: datagrams that reached UDP (queued, refused by the full socket
    /// buffer, or no socket), IPv4 and IPv6.
    to_udp: u64,
    fast_path_dropped: u64,
    nft_dropped: u64,
    events_sent: u64,
    events_rate_limited: u64,
    events_lost: u64,
    /// CPU time of the generator's processes and of the softirq threads, in ns.
    cpu_ns: Option<u64>,
}

/// Time `pid` has spent on a CPU, in ns (`/proc/<pid>/schedstat`); None once it is gone.
fn cpu_ns_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
}

/// Every process: (pid, parent pid, command name).
fn processes() -> Vec<(u32, u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat[open + 1..close].to_string();
            let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

/// `root` and its descendants (the generator: `timeout`, trafgen and its worker) and the
/// softirq threads. Their CPU time is every cycle the packets cost, sending and receiving
/// alike: softirqs run at the end of the sender's system call, or in those threads.
fn generator_pids(root: u32) -> Vec<u32> {
    let all = processes();
    let mut family = vec![root];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(all.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    family.extend(
        all.iter()
            .filter(|p| p.2.starts_with("ksoftirqd/"))
            .map(|p| p.0),
    );
    family
}

/// The CPU time of `pids`, or None when one of them is gone.
fn cpu_ns_sum(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| cpu_ns_of(pid)).sum()
}

/// `/proc/net/dev` fields of `dev`, in the calling thread's namespace.
fn dev_stats(dev: &str) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")
        .expect("read /proc/thread-self/net/dev");
    text.lines()
        .find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            (name.trim() == dev).then(|| {
                rest.split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect()
            })
        })
        .unwrap_or_else(|| panic!("{dev} missing from /proc/net/dev"))
}

/// Sum of the named counters of a `/proc/net/snmp`-style table (`Udp:` header and value lines)
/// or of a `/proc/net/snmp6`-style list.
fn snmp_sum(snmp: &str, snmp6: &str) -> u64 {
    let mut sum = 0;
    let mut lines = snmp.lines();
    while let (Some(header), Some(values)) = (lines.next(), lines.next()) {
        if !header.starts_with("Udp:") || !values.starts_with("Udp:") {
            continue;
        }
        for (name, value) in header.split_whitespace().zip(values.split_whitespace()) {
            if matches!(name, "InDatagrams" | "NoPorts" | "InErrors") {
                sum += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    for line in snmp6.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(value)) = (words.next(), words.next())
            && matches!(name, "Udp6InDatagrams" | "Udp6NoPorts" | "Udp6InErrors")
        {
            sum += value.parse::<u64>().unwrap_or(0);
        }
    }
    sum
}

fn nft_counter_sum(ns: &str, table: &str) -> u64 {
    let mut args = vec!["netns", "exec", ns, "nft", "list", "table"];
    args.extend(table.split_whitespace());
    let out = run("ip", &args);
    out.split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

struct Bench<'a> {
    net: &'a Net,
    settings: &'a Settings,
    workdir: PathBuf,
}

impl Bench<'_> {
    fn snapshot(&self, fast_path: &FastPath, filter: Filter, generator: &[u32]) -> Snapshot {
        let server_if = self.net.server_if.clone();
        let client_if = self.net.client_if.clone();
        let (received_dropped, to_udp) = in_netns(&self.net.server_ns, move || {
            let dev = dev_stats(&server_if);
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
            let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").expect("snmp6");
            (dev[3], snmp_sum(&snmp, &snmp6))
        });
        let (sent, sent_dropped) = in_netns(&self.net.client_ns, move || {
            let dev = dev_stats(&client_if);
            (dev[9], dev[11])
        });
        let counters = fast_path.port_counters(PORT_SLOT).expect("port counters");
        let global = fast_path.global_counters().expect("global counters");
        let nft_dropped = filter
            .nft_table()
            .map_or(0, |table| nft_counter_sum(&self.net.server_ns, table));
        Snapshot {
            at: Some(Instant::now()),
            sent,
            sent_dropped,
            received_dropped,
            to_udp,
            fast_path_dropped: counters.dropped_packets,
            nft_dropped,
            events_sent: global.events_sent,
            events_rate_limited: global.events_rate_limited,
            events_lost: global.events_lost,
            cpu_ns: cpu_ns_sum(generator),
        }
    }

    /// The nftables equivalent of the allowlist: the same prefixes in interval sets, UDP to
    /// the managed port from any other source counted and dropped.
    fn nft_ruleset(&self, filter: Filter, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> String {
        let join = |items: Vec<String>| items.join(",\n    ");
        let v4: Vec<String> = v4.iter().map(|a| format!("{a}/32")).collect();
        let v6: Vec<String> = v6.iter().map(|a| format!("{a}/128")).collect();
        let (family, hook) = match filter {
            Filter::NftNetdev => (
                "netdev",
                format!(
                    "type filter hook ingress device \"{}\" priority -500; policy accept;",
                    self.net.server_if
                ),
            ),
            _ => (
                "inet",
                "type filter hook input priority filter; policy accept;".to_string(),
            ),
        };
        format!(
            "table {family} wgpinbench {{\n  set allow4 {{\n    type ipv4_addr; flags interval;\n    elements = {{ {} }}\n  }}\n  set allow6 {{\n    type ipv6_addr; flags interval;\n    elements = {{ {} }}\n  }}\n  chain guard {{\n    {hook}\n    udp dport {PORT} ip saddr != @allow4 counter drop\n    udp dport {PORT} ip6 saddr != @allow6 counter drop\n  }}\n}}\n",
            join(v4),
            join(v6)
        )
    }

    fn install(
        &self,
        mut fast_path: FastPath,
        filter: Filter,
        pins: &(Vec<Ipv4Addr>, Vec<Ipv6Addr>),
    ) -> (FastPath, String) {
        match filter {
            Filter::None => (fast_path, String::new()),
            Filter::Ceiling => {
                run(
                    "ip",
                    &[
                        "-n",
                        &self.net.server_ns,
                        "link",
                        "set",
                        &self.net.server_if,
                        "down",
                    ],
                );
                (fast_path, String::new())
            }
            Filter::Xdp | Filter::Tc => {
                let choice = if filter == Filter::Xdp {
                    HookChoice::Xdp
                } else {
                    HookChoice::Tc
                };
                let interface = self.net.server_if.clone();
                in_netns(&self.net.server_ns, move || {
                    let attachment = fast_path
                        .attach(&interface, choice)
                        .expect("the fast path attaches");
                    (fast_path, attachment.reason)
                })
            }
            Filter::NftNetdev | Filter::NftInet => {
                let path = self
                    .workdir
                    .join(format!("{}.nft", filter.label().replace(' ', "-")));
                std::fs::write(&path, self.nft_ruleset(filter, &pins.0, &pins.1))
                    .expect("write the nft ruleset");
                let path = path.to_string_lossy().into_owned();
                run(
                    "ip",
                    &["netns", "exec", &self.net.server_ns, "nft", "-f", &path],
                );
                (fast_path, String::new())
            }
        }
    }

    fn uninstall(&self, fast_path: &mut FastPath, filter: Filter) {
        match filter {
            Filter::None => {}
            Filter::Ceiling => {
                run(
                    "ip",
                    &[
                        "-n",
                        &self.net.server_ns,
                        "link",
                        "set",
                        &self.net.server_if,
                        "up",
                    ],
                );
            }
            Filter::Xdp | Filter::Tc => fast_path.detach(&self.net.server_if),
            Filter::NftNetdev | Filter::NftInet => {
                let mut args = vec![
                    "netns",
                    "exec",
                    self.net.server_ns.as_str(),
                    "nft",
                    "delete",
                    "table",
                ];
                let table = filter.nft_table().unwrap_or_default();
                args.extend(table.split_whitespace());
                run("ip", &args);
            }
        }
    }

    /// trafgen in the client namespace under `timeout`, so that it ends on its own even if
    /// this process dies.
    fn start_trafgen(&self, traffic: Traffic, lasts: f64) -> Child {
        let config = self.workdir.join(format!("traffic-{}.cfg", traffic as u8));
        std::fs::write(&config, traffic.trafgen_config()).expect("write the trafgen config");
        Command::new("timeout")
            .args(["-s", "INT", "-k", "3", &format!("{lasts:.1}")])
            .args(["ip", "netns", "exec", &self.net.client_ns, "trafgen"])
            .args(["-o", &self.net.client_if])
            .arg("-i")
            .arg(&config)
            .args(["-P", &self.settings.senders.to_string(), "-Q", "-C"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start trafgen (install netsniff-ng)")
    }

    /// Waits `time`, draining violation events meanwhile if asked to (as the agent would).
    fn wait(&self, fast_path: &mut FastPath, time: Duration) {
        if !self.settings.drain {
            std::thread::sleep(time);
            return;
        }
        let deadline = Instant::now() + time;
        while Instant::now() < deadline {
            let _ = fast_path.drain_violations();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn measure(
        &self,
        fast_path: &mut FastPath,
        filter: Filter,
        traffic: Traffic,
    ) -> Result<RowB, String> {
        const WARM_UP: Duration = Duration::from_millis(WARM_UP_MS);
        let lasts = WARM_UP.as_secs_f64() + self.settings.secs + 1.0;
        let child = self.start_trafgen(traffic, lasts);
        self.wait(fast_path, WARM_UP);
        let generator = generator_pids(child.id());
        let before = self.snapshot(fast_path, filter, &generator);
        self.wait(fast_path, Duration::from_secs_f64(self.settings.secs));
        let after = self.snapshot(fast_path, filter, &generator);
        if std::env::var_os("WGPIN_BENCH_DEBUG").is_some() {
            eprintln!(
                "    generator {generator:?}: cpu {:?} -> {:?} ns, sent {} -> {}",
                before.cpu_ns, after.cpu_ns, before.sent, after.sent
            );
        }
        let output = child
            .wait_with_output()
            .map_err(|e| format!("trafgen: {e}"))?;
        if after.sent + after.sent_dropped == before.sent + before.sent_dropped {
            return Err(format!(
                "trafgen sent nothing ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let elapsed = match (before.at, after.at) {
            (Some(b), Some(a)) => a.duration_since(b).as_secs_f64(),
            _ => self.settings.secs,
        };
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / elapsed;
        let dropped = match filter {
            Filter::None | Filter::Ceiling => None,
            Filter::Xdp | Filter::Tc => {
                Some(rate(after.fast_path_dropped, before.fast_path_dropped))
            }
            Filter::NftNetdev | Filter::NftInet => {
                Some(rate(after.nft_dropped, before.nft_dropped))
            }
        };
        let packets = (after.sent + after.sent_dropped) - (before.sent + before.sent_dropped);
        let (Some(cpu_before), Some(cpu_after)) = (before.cpu_ns, after.cpu_ns) else {
            return Err(format!(
                "a generator process ({generator:?}) ended during the measurement: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        };
        Ok(RowB {
            cpu_ns: cpu_after.saturating_sub(cpu_before) as f64 / packets as f64,
            sent: rate(
                after.sent + after.sent_dropped,
                before.sent + before.sent_dropped,
            ),
            refused: rate(
                after.sent_dropped + after.received_dropped,
                before.sent_dropped + before.received_dropped,
            ),
            dropped,
            to_udp: rate(after.to_udp, before.to_udp),
            events: (
                after.events_sent - before.events_sent,
                after.events_rate_limited - before.events_rate_limited,
                after.events_lost - before.events_lost,
            ),
        })
    }
}

struct RowB {
    /// CPU time per packet sent, generator and receiver together (they share its CPU).
    cpu_ns: f64,
    /// Packets per second the generator sent (handed to the veth pair, or refused by it).
    sent: f64,
    /// Refused by the veth pair itself (full queue), per second.
    refused: f64,
    /// Dropped by the filter (its own counter), per second.
    dropped: Option<f64>,
    /// Reached UDP in the server namespace, per second.
    to_udp: f64,
    /// Violation events over the run: sent, rate-limited, lost (ring buffer full).
    events: (u64, u64, u64),
}

type Results = BTreeMap<(Filter, Traffic), Vec<Result<RowB, String>>>;

fn part_b(fast_path: FastPath, settings: &Settings) -> (FastPath, Results, Vec<String>) {
    let mut notes = Vec::new();
    let net = Net::new(&settings.id);
    let workdir = std::env::temp_dir().join(format!("wgpin-bench-{}", settings.id));
    std::fs::create_dir_all(&workdir).expect("create the work directory");
    let bench = Bench {
        net: &net,
        settings,
        workdir: workdir.clone(),
    };
    // The pinned client address plus filler: B_PINS per family, as in part A's largest set.
    let (mut v4, mut v6) = pins(B_PINS - 1);
    v4.push(CLIENT_V4);
    v6.push(CLIENT_V6);
    let mut fast_path = fast_path;
    fast_path
        .apply(&pin_state(&v4, &v6))
        .expect("the pins are written");
    let pins = (v4, v6);
    // A socket on the managed port that nobody reads: datagrams reach UDP and stop there.
    let _sinks = in_netns(&net.server_ns, || {
        [PORT, UNMANAGED_PORT].map(|port| {
            UdpSocket::bind(SocketAddr::from(([0u16; 8], port))).expect("bind a sink socket")
        })
    });
    let mut results: Results = BTreeMap::new();
    let runs = settings.rounds * settings.filters.len() * Traffic::ALL.len();
    let mut done = 0;
    // Rounds over every variant, so that a slow spell of the machine hits all of them alike.
    for round in 0..settings.rounds {
        for &filter in &settings.filters {
            let (fp, reason) = bench.install(fast_path, filter, &pins);
            fast_path = fp;
            if round == 0 && !reason.is_empty() {
                notes.push(format!("{}: {reason}", filter.label()));
            }
            for traffic in Traffic::ALL {
                done += 1;
                eprintln!(
                    "  [{done}/{runs}] round {}: {} / {}",
                    round + 1,
                    filter.label(),
                    traffic.label()
                );
                let row = bench.measure(&mut fast_path, filter, traffic);
                let _ = fast_path.drain_violations();
                results.entry((filter, traffic)).or_default().push(row);
                std::thread::sleep(Duration::from_millis(200));
            }
            bench.uninstall(&mut fast_path, filter);
        }
    }
    let _ = std::fs::remove_dir_all(&workdir);
    drop(net);
    (fast_path, results, notes)
}

fn kpps(pps: f64) -> String {
    format!("{:.0}", pps / 1e3)
}

/// The median over rounds of one figure, with its spread ((max - min) / median).
fn across(rows: &[&RowB], figure: impl Fn(&RowB) -> f64) -> (f64, f64) {
    let values: Vec<f64> = rows.iter().map(|r| figure(r)).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    let mid = median(values);
    (mid, if mid > 0.0 { (max - min) / mid } else { 0.0 })
}

fn print_part_b(results: &Results, notes: &[String], settings: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "B. veth pair between two namespaces, trafgen ({} process{}, qdisc bypass); {} round{} of {:.0} s per variant after {WARM_UP_MS} ms of warm-up; medians",
        settings.senders,
        if settings.senders == 1 { "" } else { "es" },
        settings.rounds,
        if settings.rounds == 1 { "" } else { "s" },
        settings.secs
    );
    let _ = writeln!(
        out,
        "   {B_PINS} IPv4 + {B_PINS} IPv6 host pins on UDP port {PORT}, the same prefixes in the nft interval sets; frames {} B (IPv4) / {} B (IPv6);",
        14 + 20 + 8 + PAYLOAD,
        14 + 40 + 8 + PAYLOAD
    );
    let _ = writeln!(
        out,
        "   violation events {} during the runs.",
        if settings.drain {
            "drained every millisecond"
        } else {
            "not drained (the ring fills; later events count as lost)"
        }
    );
    let _ = writeln!(
        out,
        "   kpps (wall clock): sent by the generator; dropped by the filter (its own counter); reached UDP in the server namespace."
    );
    let _ = writeln!(
        out,
        "   CPU ns: CPU time per packet of the generator's processes and the softirq threads, sending and receiving together"
    );
    let _ = writeln!(
        out,
        "   (the receive path runs on the sender's CPU); rx ns = CPU ns - CPU ns of the generator alone (server end down)."
    );
    let _ = writeln!(
        out,
        "   ±: spread of CPU ns over the rounds, (max - min) / median. events: wgpin's violation events sent/rate-limited/lost."
    );
    let _ = writeln!(
        out,
        "{:<19} {:<29} {:>6} {:>7} {:>6} {:>7} {:>6} {:>4}  events",
        "filter", "traffic", "sent", "dropped", "to UDP", "CPU ns", "rx ns", "±"
    );
    let mut stats: BTreeMap<(Filter, Traffic), Stat> = BTreeMap::new();
    for (key, runs) in results {
        let ok: Vec<&RowB> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        let errors = runs
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect();
        stats.insert(*key, Stat::of(key.0, &ok, errors));
    }
    let stat = |filter: Filter, traffic: Traffic| -> Option<&Stat> {
        stats.get(&(filter, traffic)).filter(|s| s.ok)
    };
    // The receive side: what the packets cost beyond the generator's own work.
    let rx_ns = |filter: Filter, traffic: Traffic| -> Option<f64> {
        let alone = stat(Filter::Ceiling, traffic)?.cpu_ns;
        (filter != Filter::Ceiling).then_some(stat(filter, traffic)?.cpu_ns - alone)
    };
    for ((filter, traffic), st) in &stats {
        for e in &st.errors {
            let _ = writeln!(
                out,
                "{:<19} {:<29} FAILED: {e}",
                filter.label(),
                traffic.label()
            );
        }
        if !st.ok {
            continue;
        }
        let dash = || "-".to_string();
        let _ = writeln!(
            out,
            "{:<19} {:<29} {:>6} {:>7} {:>6} {:>7.0} {:>6} {:>3.0}%  {}",
            filter.label(),
            traffic.label(),
            kpps(st.sent),
            if matches!(filter, Filter::None | Filter::Ceiling) {
                dash()
            } else {
                kpps(st.dropped)
            },
            if *filter == Filter::Ceiling {
                dash()
            } else {
                kpps(st.to_udp)
            },
            st.cpu_ns,
            rx_ns(*filter, *traffic).map_or_else(dash, |ns| format!("{ns:.0}")),
            st.spread * 100.0,
            st.events
        );
        if st.refused >= 1000.0 && *filter != Filter::Ceiling {
            let _ = writeln!(
                out,
                "{:<49} (the veth pair itself refused {} kpps)",
                "",
                kpps(st.refused)
            );
        }
    }
    for note in notes {
        let _ = writeln!(out, "   attached: {note}");
    }
    let _ = writeln!(
        out,
        "\n   Drop rate of spoofed packets, ours / nftables: per CPU second (1/CPU ns; target ≥ 1.20× for XDP), receive side only (rx ns), wall clock"
    );
    for traffic in [Traffic::Spoofed4, Traffic::SpoofedRandom6] {
        for (ours, theirs) in [
            (Filter::Xdp, Filter::NftNetdev),
            (Filter::Xdp, Filter::NftInet),
            (Filter::Tc, Filter::NftNetdev),
            (Filter::Tc, Filter::NftInet),
        ] {
            let (Some(a), Some(b)) = (stat(ours, traffic), stat(theirs, traffic)) else {
                continue;
            };
            let per_cpu = b.cpu_ns / a.cpu_ns;
            let target = if ours == Filter::Xdp {
                if per_cpu >= 1.2 { " met   " } else { " MISSED" }
            } else {
                "       "
            };
            let rx = match (rx_ns(ours, traffic), rx_ns(theirs, traffic)) {
                (Some(x), Some(y)) if x > 0.0 => format!("{:.2}×", y / x),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "   {:<29} {:<14} / {:<18}  {per_cpu:>5.2}×{target}  rx {rx:>6}  wall {:>5.2}×",
                traffic.label(),
                ours.label(),
                theirs.label(),
                a.dropped / b.dropped,
            );
        }
    }
    let _ = writeln!(
        out,
        "\n   Delivered, filter / no filter: per CPU second (target ≥ 95 % for ours), extra receive cost, wall clock"
    );
    for traffic in [Traffic::Allowed4, Traffic::Unmanaged4] {
        let Some(base) = stat(Filter::None, traffic) else {
            continue;
        };
        for filter in [Filter::Xdp, Filter::Tc, Filter::NftNetdev, Filter::NftInet] {
            let Some(row) = stat(filter, traffic) else {
                continue;
            };
            let per_cpu = base.cpu_ns / row.cpu_ns * 100.0;
            let target =
                if traffic == Traffic::Allowed4 && matches!(filter, Filter::Xdp | Filter::Tc) {
                    if per_cpu >= 95.0 {
                        " met   "
                    } else {
                        " MISSED"
                    }
                } else {
                    "       "
                };
            let _ = writeln!(
                out,
                "   {:<29} {:<18} {per_cpu:>6.1} %{target}  {:>+5.0} ns  wall {:>5.1} %",
                traffic.label(),
                filter.label(),
                row.cpu_ns - base.cpu_ns,
                row.to_udp / base.to_udp * 100.0,
            );
        }
    }
    out
}

/// One variant's figures over the rounds: medians, and the spread of CPU ns.
struct Stat {
    /// False when every round failed.
    ok: bool,
    cpu_ns: f64,
    sent: f64,
    dropped: f64,
    to_udp: f64,
    refused: f64,
    spread: f64,
    events: String,
    errors: Vec<String>,
}

impl Stat {
    fn of(filter: Filter, ok: &[&RowB], errors: Vec<String>) -> Self {
        if ok.is_empty() {
            return Self {
                ok: false,
                cpu_ns: 0.0,
                sent: 0.0,
                dropped: 0.0,
                to_udp: 0.0,
                refused: 0.0,
                spread: 0.0,
                events: String::new(),
                errors,
            };
        }
        let (cpu_ns, spread) = across(ok, |r| r.cpu_ns);
        let events = if matches!(filter, Filter::Xdp | Filter::Tc) {
            let mean = |f: fn(&RowB) -> u64| ok.iter().map(|r| f(r)).sum::<u64>() / ok.len() as u64;
            format!(
                "{}/{}/{}",
                mean(|r| r.events.0),
                mean(|r| r.events.1),
                mean(|r| r.events.2)
            )
        } else {
            String::new()
        };
        Self {
            ok: true,
            cpu_ns,
            sent: across(ok, |r| r.sent).0,
            dropped: across(ok, |r| r.dropped.unwrap_or(0.0)).0,
            to_udp: across(ok, |r| r.to_udp).0,
            refused: across(ok, |r| r.refused).0,
            spread,
            events,
            errors,
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("machine: {cpu}, {cpus} CPUs, Linux {kernel}, load average {load}")
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    assert!(
        nix::unistd::geteuid().is_root(),
        "this benchmark loads eBPF programs and creates network namespaces: run it as root (sudo bash scripts/bench-fastpath.sh)"
    );
    let settings = Settings::from_env();
    if !wgpin_agent::fastpath::loader::is_bpffs(Path::new("/sys/fs/bpf")) {
        std::fs::create_dir_all("/sys/fs/bpf").expect("create /sys/fs/bpf");
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
    let root = BenchRoot(PathBuf::from(format!(
        "/sys/fs/bpf/wgpin-bench-{}",
        settings.id
    )));
    let mut report = vec![machine()];
    eprintln!("{}", report[0]);
    let mut fast_path = FastPath::open(BpfPaths::new(&root.0)).expect("the fast path loads");

    if settings.part_a {
        eprintln!("A. BPF_PROG_TEST_RUN…");
        let (rows, novelty) = part_a(&mut fast_path, &settings);
        report.push(print_part_a(&rows, &settings) + &novelty);
    }
    if settings.part_i {
        eprintln!("I. identity mode, BPF_PROG_TEST_RUN…");
        report.push(part_i(&mut fast_path, &settings));
    }
    if settings.part_b {
        let missing: Vec<&str> = ["trafgen", "nft", "timeout"]
            .into_iter()
            .filter(|p| !have(p))
            .collect();
        if missing.is_empty() {
            eprintln!(
                "B. veth pair, {} runs of {:.0} s…",
                settings.rounds * settings.filters.len() * Traffic::ALL.len(),
                settings.secs
            );
            let (fp, results, notes) = part_b(fast_path, &settings);
            fast_path = fp;
            report.push(print_part_b(&results, &notes, &settings));
        } else {
            report.push(format!(
                "B. skipped: {} not installed (scripts/bench-fastpath.sh installs nftables and netsniff-ng)",
                missing.join(", ")
            ));
        }
    }
    fast_path.remove_all().expect("remove the bench's pins");
    drop(root);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.push(format!(
        "load average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    println!("\n{}", report.join("\n\n"));
}
