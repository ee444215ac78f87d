//! A spoofed flood at a shared WireGuard port while the pinned peer works, and roams inside its
//! pin: the pass/fail half of `agent/benches/flood.rs` (which measures), with a shorter flood.
//! The real `wgpin-agent standalone` binary, wireguard-go on both sides, trafgen for the flood
//! (`agent/tests/support/flood.rs` has the scenario). Needs root; installs trafgen if missing.

#[path = "support/flood.rs"]
mod flood;
mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use flood::{
    LAPTOP_PORT, LAPTOP_ROAMED_V4, Options, SPOOFED_PREFIXES, Scenario, sum_of, violation_lines,
};
use support::{require_root, unique_id, wait_for};

/// The longest trafgen may flood; it is stopped once the echoes are done (about 5 s).
const FLOOD_SECS: f64 = 30.0;
/// Echoes through the tunnel during the flood: one every 10 ms for 4 s.
const PING_INTERVAL: Duration = Duration::from_millis(10);
const PINGS: usize = 400;
/// The agent's violation log budget (`EnforcerSettings::violation_logs_per_second`, which
/// the binary sets to 20) plus the summary line each one-second window may add.
const LOG_LINES_PER_WINDOW: usize = 20 + 1;
/// Violations per CPU per second that may become events (the fast path's default budget).
const EVENT_BUDGET: u64 = wgpin_common::DEFAULT_EVENTS_PER_CPU_PER_SECOND;

#[test]
fn a_spoofed_flood_reaches_no_socket_while_the_pinned_laptop_works_and_roams_inside_its_pin() {
    require_root();
    flood::ensure_trafgen();
    let scenario = Scenario::start(
        &unique_id(),
        Options {
            guard_interval_ms: 100,
            resync_interval_ms: 10_000,
        },
    );
    // One violation before the flood, so that the series it creates are counted before too.
    scenario.prime();
    let series_before = scenario.metrics();
    std::thread::sleep(Duration::from_millis(300));
    let before = scenario.quiet_snapshot();
    let log_start = scenario.log_len();

    let flood = scenario.flood(1, FLOOD_SECS);
    wait_for(
        "the flood to reach the gateway",
        Duration::from_secs(10),
        || scenario.snapshot().port.dropped_packets > before.port.dropped_packets + 1000,
    );
    let flood_running = scenario.snapshot();
    let pinger = scenario.ping_in_background(PING_INTERVAL, PINGS);
    // Half-way through the echoes, the laptop moves to another address inside its pin.
    std::thread::sleep(PING_INTERVAL * (PINGS as u32 / 2));
    let moved_at = Instant::now();
    scenario.roam();
    let pings = pinger.join().expect("the pinger");
    let flood_still_running = scenario.snapshot();
    flood.stop();
    // Two guard ticks and then some: the agent has drained and counted everything.
    std::thread::sleep(Duration::from_millis(500));
    let after = scenario.quiet_snapshot();
    // Every count below is over this span (the flood and the quiet moments around it).
    let span = after.at.duration_since(before.at).as_secs_f64();
    let series_after = scenario.metrics();
    let log = scenario.log_since(log_start);
    let whole_log = scenario.log();
    let context = || {
        format!(
            "before {before:#?}\nafter {after:#?}\npings: {} sent, {} answered\nagent log:\n{}",
            pings.sent.len(),
            pings.answered().len(),
            whole_log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    // There was a flood, while the echoes ran, and the fast path dropped it.
    let dropped = after.port.dropped_packets - before.port.dropped_packets;
    let flood_sent = after.flood_sent - before.flood_sent;
    assert!(
        flood_still_running.flood_sent > flood_running.flood_sent
            && flood_still_running.port.dropped_packets > flood_running.port.dropped_packets,
        "trafgen stopped before the echoes did: the tunnel was not measured under flood\n{}",
        context()
    );
    assert!(
        dropped >= 10_000,
        "the fast path dropped only {dropped} packets of a {flood_sent}-packet flood\n{}",
        context()
    );

    // The laptop's tunnel carried traffic during the flood, before and after it moved.
    let settle = Duration::from_millis(500);
    let first = pings.sent.first().copied().unwrap_or(moved_at);
    let (sent_before_move, answered_before_move) = pings.between(first, moved_at);
    let (sent_after_move, answered_after_move) =
        pings.between(moved_at + settle, moved_at + Duration::from_secs(3600));
    assert!(
        answered_before_move * 2 >= sent_before_move && sent_before_move > 0,
        "under flood, before the move, {answered_before_move} of {sent_before_move} echoes came back through the tunnel\n{}",
        context()
    );
    assert!(
        answered_after_move * 2 >= sent_after_move && sent_after_move > 0,
        "under flood, after the laptop moved inside its pin, {answered_after_move} of {sent_after_move} echoes came back\n{}",
        context()
    );

    // Roaming inside the pin: WireGuard follows the laptop, the agent neither evicts nor
    // reports it (an eviction would remove and re-add the peer: its byte count would restart).
    let roamed: SocketAddr = format!("{LAPTOP_ROAMED_V4}:{LAPTOP_PORT}")
        .parse()
        .expect("address");
    wait_for(
        "the gateway's WireGuard to see the laptop at its new address",
        Duration::from_secs(5),
        || scenario.snapshot().laptop_endpoint == Some(roamed),
    );
    assert!(
        after.laptop_wg_rx_bytes > before.laptop_wg_rx_bytes,
        "the laptop's peer on the gateway counts fewer bytes than before ({} then {}): it was removed and re-added\n{}",
        before.laptop_wg_rx_bytes,
        after.laptop_wg_rx_bytes,
        context()
    );
    for forbidden in ["peer=laptop", "evicted"] {
        assert!(
            !whole_log.contains(forbidden),
            "the agent reported the roaming laptop ({forbidden:?} in its log)\n{}",
            context()
        );
    }
    for (series, value) in &series_after {
        let about_laptop = series.contains("peer=\"laptop\"");
        let is_report = series.starts_with("wgpin_evictions_total")
            || series.starts_with("wgpin_violation_events_total");
        assert!(
            !(about_laptop && is_report && *value > 0.0),
            "{series} {value}: the roaming laptop was counted as a violation\n{}",
            context()
        );
        assert!(
            !(series.starts_with("wgpin_fastpath_packets_total")
                && about_laptop
                && series.contains("verdict=\"dropped\"")
                && *value > 0.0),
            "{series} {value}: packets of the laptop were dropped\n{}",
            context()
        );
    }

    // Nothing let through: every datagram that reached UDP in the gateway's namespace (where
    // WireGuard's socket is the only UDP socket: the echoes are ICMP) was one the fast path
    // allowed, and every packet it allowed came from the laptop's pin. So none of the flood's
    // packets reached WireGuard, and no socket buffer overflowed.
    let delivered = after.udp_delivered - before.udp_delivered;
    let allowed = after.port.allowed_packets - before.port.allowed_packets;
    let allowed_laptop = after.laptop.allowed_packets - before.laptop.allowed_packets;
    assert!(
        allowed_laptop > 0 && delivered == allowed && allowed == allowed_laptop,
        "reached UDP {delivered}, allowed on the port {allowed}, allowed for the laptop {allowed_laptop}: \
         {} datagrams reached UDP that were not the laptop's\n{}",
        delivered as i64 - allowed_laptop as i64,
        context()
    );
    // The same without the fast path's word for it: the laptop's namespace sent at least as
    // many datagrams (only its wireguard-go sends UDP) as the gateway's UDP received.
    let laptop_sent = after.laptop_udp_out - before.laptop_udp_out;
    assert!(
        delivered <= laptop_sent,
        "the gateway's UDP received {delivered} datagrams, the laptop sent {laptop_sent}\n{}",
        context()
    );
    assert_eq!(
        after.udp_rcvbuf_errors,
        before.udp_rcvbuf_errors,
        "a socket buffer in the gateway's namespace overflowed\n{}",
        context()
    );

    // Nothing lost: every dropped packet is a violation the fast path accounted for (an event,
    // a rate-limited count, or a lost event), no event was lost, and the agent read every
    // event and exports the kernel's counts.
    let (sent, rate_limited, lost) = (
        after.global.events_sent - before.global.events_sent,
        after.global.events_rate_limited - before.global.events_rate_limited,
        after.global.events_lost - before.global.events_lost,
    );
    assert_eq!(
        sent + rate_limited + lost,
        dropped,
        "violations accounted (events {sent}, rate-limited {rate_limited}, lost {lost}) against packets dropped\n{}",
        context()
    );
    assert_eq!(lost, 0, "violation events lost\n{}", context());
    assert!(
        rate_limited > 0,
        "the flood was not rate-limited\n{}",
        context()
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let budget = EVENT_BUDGET * cpus * (span.ceil() as u64 + 1);
    assert!(
        sent <= budget,
        "{sent} violation events in {span:.1} s: more than the budget of {EVENT_BUDGET} per CPU per second ({budget})\n{}",
        context()
    );
    let delta = |name: &str| sum_of(&series_after, name) - sum_of(&series_before, name);
    assert_eq!(
        delta("wgpin_violation_events_total"),
        sent as f64,
        "the agent read a different number of events than the fast path sent\n{}",
        context()
    );
    assert_eq!(
        delta("wgpin_fastpath_events_rate_limited_total"),
        rate_limited as f64,
        "the agent's rate-limited metric against the kernel's counter\n{}",
        context()
    );
    assert_eq!(
        delta("wgpin_fastpath_events_lost_total"),
        0.0,
        "the agent's lost metric\n{}",
        context()
    );
    // A shared port's drops name no peer: the agent exports them as `peer=""`.
    assert_eq!(
        delta(r#"wgpin_fastpath_packets_total{interface="gateway",peer="",verdict="dropped"}"#),
        dropped as f64,
        "the unattributed drops in /metrics against the fast path's\n{}",
        context()
    );

    // Logs and metrics stay bounded.
    let (lines, summaries, most) = violation_lines(&log);
    let windows = span.ceil() as usize + 2;
    assert!(
        lines > 0 && summaries > 0,
        "the flood was not reported in the log ({lines} lines, {summaries} summaries)\n{}",
        context()
    );
    assert!(
        lines <= LOG_LINES_PER_WINDOW * windows && most <= 2 * LOG_LINES_PER_WINDOW,
        "{lines} violation log lines over {span:.1} s, {most} in one second: more than {LOG_LINES_PER_WINDOW} a second\n{}",
        context()
    );
    let keys = |series: &std::collections::BTreeMap<String, f64>| -> Vec<String> {
        series.keys().cloned().collect()
    };
    assert_eq!(
        keys(&series_after),
        keys(&series_before),
        "the flood changed the set of series in /metrics"
    );
    let spoofed: Vec<&String> = series_after
        .keys()
        .filter(|s| SPOOFED_PREFIXES.iter().any(|p| s.contains(p)))
        .collect();
    assert!(
        spoofed.is_empty(),
        "metric labels name spoofed sources: {spoofed:?}"
    );
    eprintln!(
        "flood: {flood_sent} packets sent, {dropped} dropped, {delivered} datagrams reached UDP (all {allowed_laptop} the laptop's, which sent {laptop_sent}); \
         events {sent} sent, {rate_limited} rate-limited, {lost} lost; {lines} violation log lines ({summaries} summaries, at most {most} in a second); \
         echoes {}/{} answered in all, {}/{} before the move, {}/{} from 0.5 s after it; {} series in /metrics before and after",
        pings.answered().len(),
        pings.sent.len(),
        answered_before_move,
        sent_before_move,
        answered_after_move,
        sent_after_move,
        series_after.len()
    );
}
