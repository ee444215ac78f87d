//! Benchmark of a spoofed flood at a shared WireGuard port while the pinned peer works:
//! figures, not a test. Nothing here asserts a timing; `agent/tests/flood.rs` asserts the
//! properties (nothing let through, nothing lost, bounded logs and metrics).
//!
//! The scenario (`agent/tests/support/flood.rs`): the real `wgpin-agent standalone` in a
//! gateway namespace, one Shared-mode interface on port 51820 run by wireguard-go, the peer
//! "laptop" pinned to 192.0.2.0/29 with its own wireguard-go in a second namespace, and trafgen
//! in a third sending WireGuard handshake initiations to the gateway's port from a random
//! source every packet (203.0.113.0/24 and fd00:bad::/64, in turn).
//!
//! Phases, side by side in one run, repeated for each round: no flood, then a flood from each
//! number of trafgen processes asked for (1, and one per CPU, by default). In each, after a
//! second of warm-up, the laptop pings the gateway through the tunnel (100 echoes a second)
//! for the measured window; the counters are read at the window's ends, and again before and
//! after the phase when nothing is in flight, for the exact accounting:
//!
//! - the flood offered (the flood veth's tx) and dropped (the fast path's port counter);
//! - the tunnel's loss and round trips, and their ratios to the quiet phase;
//! - what reached UDP in the gateway's namespace against what the fast path allowed, and
//!   against what the laptop sent (the only UDP in that namespace is WireGuard's: the probes
//!   are ICMP), and the sockets' RcvbufErrors;
//! - the agent's CPU (utime + stime) and memory (VmRSS, VmHWM), the gateway wireguard-go's CPU;
//! - the fast path's violation events: sent, rate-limited, lost, and what the agent's metrics
//!   say about them; its violation log lines a second; the number of series in /metrics.
//!
//! Run it as root with `sudo bash scripts/bench-flood.sh`. Knobs (environment):
//! `WGPIN_BENCH_SECS` measured seconds per phase (10), `WGPIN_BENCH_ROUNDS` (2),
//! `WGPIN_BENCH_SENDERS` a comma list of trafgen process counts (`1,<CPUs>`),
//! `WGPIN_BENCH_PING_MS` ms between echoes (10), `WGPIN_BENCH_GUARD_MS` the agent's guard
//! interval (200, its default), `WGPIN_BENCH_ID` the suffix of every name this creates (the
//! process id), so that a wrapper can clean up after a kill.

// The test hosts' helpers (commands, network namespaces) and the scenario, shared with the
// tests.
#[path = "../tests/support/flood.rs"]
mod flood;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{fmt::Write as _, time::Duration};

use flood::{Options, Pings, SPOOFED_PREFIXES, Scenario, Snapshot, sum_of, violation_lines};

struct Settings {
    secs: f64,
    rounds: usize,
    senders: Vec<u32>,
    ping: Duration,
    guard_ms: u64,
    id: String,
}

impl Settings {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let senders = var("WGPIN_BENCH_SENDERS").map_or_else(
            || {
                let mut list = vec![1, cpus];
                list.dedup();
                list
            },
            |v| {
                v.split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<u32>()
                            .expect("WGPIN_BENCH_SENDERS is a comma list of counts")
                            .clamp(1, cpus)
                    })
                    .collect()
            },
        );
        let id = var("WGPIN_BENCH_ID").unwrap_or_else(|| std::process::id().to_string());
        Self {
            secs: var("WGPIN_BENCH_SECS")
                .map(|v| v.parse::<f64>().expect("WGPIN_BENCH_SECS is seconds"))
                .unwrap_or(10.0)
                .clamp(1.0, 120.0),
            rounds: var("WGPIN_BENCH_ROUNDS")
                .map(|v| v.parse::<usize>().expect("WGPIN_BENCH_ROUNDS is a count"))
                .unwrap_or(2)
                .clamp(1, 20),
            senders,
            ping: Duration::from_millis(
                var("WGPIN_BENCH_PING_MS")
                    .map(|v| v.parse::<u64>().expect("WGPIN_BENCH_PING_MS is ms"))
                    .unwrap_or(10)
                    .clamp(1, 1000),
            ),
            guard_ms: var("WGPIN_BENCH_GUARD_MS")
                .map(|v| v.parse::<u64>().expect("WGPIN_BENCH_GUARD_MS is ms"))
                .unwrap_or(200)
                .max(10),
            id,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Quiet,
    /// trafgen runs, but the gateway's end of its link is down: the flood's veth drops every
    /// packet as it is sent. The generator's own CPU cost, which on one host the gateway and
    /// the laptop share, without a packet reaching the gateway.
    Generator(u32),
    Flood(u32),
}

impl Phase {
    fn label(self) -> String {
        let senders = |n: u32| {
            if n == 1 {
                "1 sender".to_string()
            } else {
                format!("{n} senders")
            }
        };
        match self {
            Self::Quiet => "no flood".into(),
            Self::Generator(n) => format!("generator alone, {}", senders(n)),
            Self::Flood(n) => format!("flood, {}", senders(n)),
        }
    }
}

/// One phase's figures, added up over the rounds.
#[derive(Default)]
struct Figures {
    rounds: usize,
    window_secs: f64,
    pings: Pings,
    flood_sent: u64,
    fast_path_dropped: u64,
    dropped_before_hook: u64,
    events_sent: u64,
    events_rate_limited: u64,
    events_lost: u64,
    agent_ticks: u64,
    wireguard_ticks: u64,
    machine_busy: u64,
    machine_softirq: u64,
    machine_total: u64,
    agent_rss_kib: u64,
    /// VmHWM at the end of this phase in the first round (the high-water mark only grows).
    agent_hwm_kib: u64,
    log_lines: usize,
    log_summaries: usize,
    log_most_in_a_second: usize,
    // Exact accounting, between quiet moments before and after the phase.
    laptop_sent: u64,
    laptop_allowed: u64,
    port_allowed: u64,
    delivered: u64,
    rcvbuf_errors: u64,
    port_dropped: u64,
    violations: u64,
    agent_events: f64,
    metrics_rate_limited: f64,
    metrics_lost: f64,
    laptop_wg_rx_bytes: u64,
    series: usize,
}

fn measure(scenario: &Scenario, phase: Phase, settings: &Settings, figures: &mut Figures) {
    const WARM_UP: Duration = Duration::from_secs(1);
    // Whatever the previous phase left (events, a full backlog) settles first.
    std::thread::sleep(Duration::from_millis(1000));
    let metrics_before = scenario.metrics();
    let quiet_before = scenario.quiet_snapshot();
    let count = (settings.secs / settings.ping.as_secs_f64()).round() as usize;
    // Warm-up, the window, the last echoes' second, and a margin.
    let flood_secs = WARM_UP.as_secs_f64() + settings.secs + 2.0;
    let flood = match phase {
        Phase::Quiet => None,
        Phase::Generator(senders) => {
            scenario.flood_link(false);
            Some(scenario.flood(senders, flood_secs))
        }
        Phase::Flood(senders) => Some(scenario.flood(senders, flood_secs)),
    };
    std::thread::sleep(WARM_UP);
    let log_start = scenario.log_len();
    let start = scenario.snapshot();
    let pings = scenario.ping(settings.ping, count);
    let end = scenario.snapshot();
    let log = scenario.log_since(log_start);
    if let Some(flood) = flood
        && let Err(e) = flood.wait()
    {
        eprintln!("  {e}");
    }
    if matches!(phase, Phase::Generator(_)) {
        scenario.flood_link(true);
    }
    std::thread::sleep(Duration::from_millis(2 * settings.guard_ms + 300));
    let quiet_after = scenario.quiet_snapshot();
    let metrics_after = scenario.metrics();

    let secs = end.at.duration_since(start.at).as_secs_f64();
    let (lines, summaries, most) = violation_lines(&log);
    figures.rounds += 1;
    figures.window_secs += secs;
    figures.pings.merge(pings);
    figures.flood_sent += end.flood_sent - start.flood_sent;
    figures.fast_path_dropped += end.port.dropped_packets - start.port.dropped_packets;
    figures.dropped_before_hook += end.gateway_flood_rx_dropped - start.gateway_flood_rx_dropped;
    figures.events_sent += end.global.events_sent - start.global.events_sent;
    figures.events_rate_limited +=
        end.global.events_rate_limited - start.global.events_rate_limited;
    figures.events_lost += end.global.events_lost - start.global.events_lost;
    figures.agent_ticks += end.agent_cpu_ticks - start.agent_cpu_ticks;
    figures.wireguard_ticks += end
        .wireguard_cpu_ticks
        .saturating_sub(start.wireguard_cpu_ticks);
    figures.machine_busy += end.machine_busy_ticks - start.machine_busy_ticks;
    figures.machine_softirq += end.machine_softirq_ticks - start.machine_softirq_ticks;
    figures.machine_total += end.machine_ticks - start.machine_ticks;
    figures.agent_rss_kib = figures.agent_rss_kib.max(end.agent_rss_kib);
    if figures.agent_hwm_kib == 0 {
        figures.agent_hwm_kib = quiet_after.agent_hwm_kib;
    }
    figures.log_lines += lines;
    figures.log_summaries += summaries;
    figures.log_most_in_a_second = figures.log_most_in_a_second.max(most);

    let (a, b) = (&quiet_before, &quiet_after);
    figures.laptop_sent += b.laptop_udp_out - a.laptop_udp_out;
    figures.laptop_allowed += b.laptop.allowed_packets - a.laptop.allowed_packets;
    figures.port_allowed += b.port.allowed_packets - a.port.allowed_packets;
    figures.delivered += b.udp_delivered - a.udp_delivered;
    figures.rcvbuf_errors += b.udp_rcvbuf_errors - a.udp_rcvbuf_errors;
    figures.port_dropped += b.port.dropped_packets - a.port.dropped_packets;
    figures.violations +=
        (b.global.events_sent + b.global.events_rate_limited + b.global.events_lost)
            - (a.global.events_sent + a.global.events_rate_limited + a.global.events_lost);
    let delta = |name: &str| sum_of(&metrics_after, name) - sum_of(&metrics_before, name);
    figures.agent_events += delta("wgpin_violation_events_total");
    figures.metrics_rate_limited += delta("wgpin_fastpath_events_rate_limited_total");
    figures.metrics_lost += delta("wgpin_fastpath_events_lost_total");
    figures.laptop_wg_rx_bytes += b.laptop_wg_rx_bytes.saturating_sub(a.laptop_wg_rx_bytes);
    figures.series = figures.series.max(metrics_after.len());
}

fn kpps(count: u64, secs: f64) -> String {
    format!("{:.0}", count as f64 / secs / 1e3)
}

fn per_second(count: u64, secs: f64) -> String {
    format!("{:.0}", count as f64 / secs)
}

fn report(results: &[(Phase, Figures)], settings: &Settings) -> String {
    let phases: Vec<(&Phase, &Figures)> = results.iter().map(|(p, f)| (p, f)).collect();
    let Some((_, quiet)) = phases.iter().find(|(p, _)| **p == Phase::Quiet) else {
        return "no quiet phase measured".into();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Flood at a shared WireGuard port, {} round(s) of {:.0} s per phase; the laptop pings the gateway through the tunnel every {} ms.\n",
        settings.rounds,
        settings.secs,
        settings.ping.as_millis()
    );
    let mut header = "| | ".to_string();
    let mut rule = "|---|".to_string();
    for (phase, _) in &phases {
        let _ = write!(header, "{} | ", phase.label());
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{}\n{rule}", header.trim_end());
    let row = |out: &mut String, label: &str, cell: &dyn Fn(&Figures) -> String| {
        let _ = write!(out, "| {label} |");
        for (_, figures) in &phases {
            let _ = write!(out, " {} |", cell(figures));
        }
        out.push('\n');
    };
    row(&mut out, "flood offered (kpps)", &|f| {
        kpps(f.flood_sent, f.window_secs)
    });
    row(&mut out, "dropped by the fast path (kpps)", &|f| {
        kpps(f.fast_path_dropped, f.window_secs)
    });
    row(
        &mut out,
        "dropped by the gateway's veth before the hook (kpps)",
        &|f| kpps(f.dropped_before_hook, f.window_secs),
    );
    row(&mut out, "flood packets that reached UDP", &|f| {
        format!("{}", f.delivered as i64 - f.port_allowed as i64)
    });
    row(&mut out, "tunnel: echoes answered", &|f| {
        format!(
            "{} / {} ({:.2} % lost)",
            f.pings.answered().len(),
            f.pings.sent.len(),
            f.pings.loss() * 100.0
        )
    });
    for (label, q) in [
        ("tunnel RTT p50 (ms)", 0.5),
        ("tunnel RTT p90 (ms)", 0.9),
        ("tunnel RTT p99 (ms)", 0.99),
        ("tunnel RTT max (ms)", 1.0),
    ] {
        row(&mut out, label, &|f| {
            let ms = f.pings.quantile_ms(q);
            let base = quiet.pings.quantile_ms(q);
            if std::ptr::eq(f, *quiet) {
                format!("{ms:.3}")
            } else {
                format!("{ms:.3} ({:.2}×)", ms / base)
            }
        });
    }
    row(&mut out, "agent CPU (% of one CPU)", &|f| {
        format!(
            "{:.1}",
            Snapshot::cpu_percent(f.agent_ticks, 0, f.window_secs)
        )
    });
    row(&mut out, "gateway wireguard-go CPU (% of one CPU)", &|f| {
        format!(
            "{:.1}",
            Snapshot::cpu_percent(f.wireguard_ticks, 0, f.window_secs)
        )
    });
    row(
        &mut out,
        "machine CPU busy, of it softirq (% of all CPUs)",
        &|f| {
            let share = |ticks: u64| ticks as f64 / f.machine_total.max(1) as f64 * 100.0;
            format!(
                "{:.0} ({:.0})",
                share(f.machine_busy),
                share(f.machine_softirq)
            )
        },
    );
    row(
        &mut out,
        "agent VmRSS, most at a window's end (MiB)",
        &|f| format!("{:.1}", f.agent_rss_kib as f64 / 1024.0),
    );
    row(
        &mut out,
        "agent VmHWM after the phase, round 1 (MiB)",
        &|f| format!("{:.1}", f.agent_hwm_kib as f64 / 1024.0),
    );
    row(&mut out, "violation events sent (/s)", &|f| {
        per_second(f.events_sent, f.window_secs)
    });
    row(&mut out, "violations rate-limited (/s)", &|f| {
        per_second(f.events_rate_limited, f.window_secs)
    });
    row(&mut out, "violation events lost (ring buffer full)", &|f| {
        f.events_lost.to_string()
    });
    row(
        &mut out,
        "violation log lines (/s, most in one second)",
        &|f| {
            format!(
                "{:.1} ({})",
                f.log_lines as f64 / f.window_secs,
                f.log_most_in_a_second
            )
        },
    );
    row(&mut out, "series in /metrics after the phase", &|f| {
        f.series.to_string()
    });

    let _ = writeln!(
        out,
        "\nThe tunnel under flood against the generator alone with as many senders (the same CPU taken by trafgen, no packet at the gateway): what the flood reaching the gateway adds.\n"
    );
    let _ = writeln!(
        out,
        "| senders | RTT p50 | p90 | p99 | max | echoes lost, generator alone / flood |\n|---|---:|---:|---:|---:|---:|"
    );
    for (phase, flood) in &phases {
        let Phase::Flood(n) = phase else {
            continue;
        };
        let Some((_, alone)) = phases.iter().find(|(p, _)| **p == Phase::Generator(*n)) else {
            continue;
        };
        let ratio = |q: f64| {
            format!(
                "{:.2}×",
                flood.pings.quantile_ms(q) / alone.pings.quantile_ms(q)
            )
        };
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} | {} | {:.2} % / {:.2} % |",
            ratio(0.5),
            ratio(0.9),
            ratio(0.99),
            ratio(1.0),
            alone.pings.loss() * 100.0,
            flood.pings.loss() * 100.0
        );
    }
    let _ = writeln!(
        out,
        "\nNothing let through: packets counted between quiet moments before and after each phase (all rounds).\n\
         delivered = datagrams UDP counted in the gateway's namespace (InDatagrams + NoPorts + InErrors, IPv4 + IPv6).\n"
    );
    let _ = writeln!(
        out,
        "| phase | flood packets dropped | laptop's datagrams sent | allowed for the laptop | allowed on the port | delivered | delivered − allowed for the laptop | RcvbufErrors | WireGuard rx bytes from the laptop |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (phase, f) in &phases {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            phase.label(),
            f.port_dropped,
            f.laptop_sent,
            f.laptop_allowed,
            f.port_allowed,
            f.delivered,
            f.delivered as i64 - f.laptop_allowed as i64,
            f.rcvbuf_errors,
            f.laptop_wg_rx_bytes
        );
    }
    let _ = writeln!(
        out,
        "\nNothing lost: every drop is a violation, and every violation an event, a rate-limited count or a lost event (kernel counters); the agent's metrics over the same span.\n"
    );
    let _ = writeln!(
        out,
        "| phase | dropped | sent + rate-limited + lost | events the agent read (metrics) | rate-limited (metrics) | lost (metrics) |\n|---|---:|---:|---:|---:|---:|"
    );
    for (phase, f) in &phases {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
            phase.label(),
            f.port_dropped,
            f.violations,
            f.agent_events,
            f.metrics_rate_limited,
            f.metrics_lost
        );
    }
    out
}

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
    format!(
        "machine: {cpu}, {cpus} CPUs, Linux {kernel}, load average {}",
        load()
    )
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    support::require_root();
    flood::ensure_trafgen();
    let settings = Settings::from_env();
    eprintln!("{}", machine());
    let mut phases = vec![Phase::Quiet];
    for &n in &settings.senders {
        phases.extend([Phase::Generator(n), Phase::Flood(n)]);
    }
    eprintln!("starting the agent, the laptop and its tunnel…");
    let scenario = Scenario::start(
        &settings.id,
        Options {
            guard_interval_ms: settings.guard_ms,
            resync_interval_ms: 10_000,
        },
    );
    scenario.prime();
    let series_before = scenario.metrics();
    let mut results: Vec<(Phase, Figures)> =
        phases.iter().map(|p| (*p, Figures::default())).collect();
    for round in 0..settings.rounds {
        for (phase, figures) in &mut results {
            let phase = *phase;
            eprintln!(
                "  round {}/{}: {} ({:.0} s)…",
                round + 1,
                settings.rounds,
                phase.label(),
                settings.secs
            );
            measure(&scenario, phase, &settings, figures);
        }
    }
    let series_after = scenario.metrics();
    let mut text = vec![machine(), report(&results, &settings)];
    let before: Vec<&String> = series_before.keys().collect();
    let after: Vec<&String> = series_after.keys().collect();
    let spoofed = after
        .iter()
        .filter(|s| SPOOFED_PREFIXES.iter().any(|p| s.contains(p)))
        .count();
    text.push(format!(
        "Metrics cardinality: {} series before the first flood, {} after the last ({}); series naming a spoofed source: {spoofed}.",
        before.len(),
        after.len(),
        if before == after {
            "the same series"
        } else {
            "DIFFERENT series"
        }
    ));
    let log = scenario.log();
    let (lines, summaries, most) = violation_lines(&log);
    text.push(format!(
        "Agent log over the whole run: {lines} violation lines ({summaries} of them per-second summaries), at most {most} in one second; {} lines in all, {} bytes.",
        log.lines().count(),
        log.len()
    ));
    text.push(format!("load average at the end: {}", load()));
    drop(scenario);
    println!("\n{}", text.join("\n\n"));
}
