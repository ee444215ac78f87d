//! The enforcement loop's body, shared by standalone and in-cluster mode: guard the fast path,
//! report violations, reconcile when the desired state changed (or to repair drift), and keep
//! metrics and readiness current. Where the desired state comes from (a directory, or the
//! node's `PinnedNodeState`) and where the status goes is the caller's business.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use wgpin_crds::{
    EnforcementState, InterfaceStatus, PinnedNodeStateSpec, ViolationSummary,
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
};

use crate::{
    dataplane::{DataPlane, DataPlaneConfig, Eviction, Writes},
    fastpath::Violation,
    metrics::{Metrics, ModeLabels, PeerLabels},
    secrets::SecretSource,
};

/// How the loop paces itself.
#[derive(Clone, Debug)]
pub struct EnforcerSettings {
    /// How often the whole state is re-applied even without a change, to repair drift (a peer
    /// added or changed by hand with `wg set`). A re-apply without drift writes nothing.
    pub resync_interval: Duration,
    /// Most violation log lines per second; the rest are summed up.
    pub violation_logs_per_second: u32,
}

impl Default for EnforcerSettings {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(10),
            violation_logs_per_second: 20,
        }
    }
}

/// Violations per peer since the agent started: what `PinnedNodeState.status` reports. The
/// operator turns these cumulative counts into increments (a restart resets them, which it
/// handles), so the agent keeps no history on disk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViolationTally {
    peers: BTreeMap<String, ViolationSummary>,
}

impl ViolationTally {
    /// Counts `count` violations of `peer` from `source` (`address:port`) at `at`.
    pub fn record(&mut self, peer: &str, source: String, count: u64, at: Timestamp) {
        let entry = self.peers.entry(peer.to_string()).or_default();
        entry.count += count;
        entry.last_source = Some(source);
        entry.last_time = Some(Time(at));
    }

    pub fn get(&self, peer: &str) -> Option<&ViolationSummary> {
        self.peers.get(peer)
    }

    /// Forgets peers no longer enforced here.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.peers.retain(|peer, _| keep(peer));
    }
}

/// What one tick did.
#[derive(Clone, Debug, Default)]
pub struct Tick {
    /// The fast path failed verification and every peer was withdrawn: the problems.
    pub withdrawn: Option<Vec<String>>,
    /// The fast path was verified again after a withdrawal.
    pub recovered: bool,
    pub evictions: Vec<Eviction>,
    /// A reconcile ran and succeeded, with what it wrote.
    pub applied: Option<Writes>,
    /// A reconcile ran and failed.
    pub failed: Option<String>,
}

/// The data plane and the loop's memory between ticks.
pub struct Enforcer {
    dataplane: DataPlane,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    settings: EnforcerSettings,
    tally: ViolationTally,
    /// The desired state changed (or the fast path recovered) since the last good reconcile.
    dirty: bool,
    log_budget: (Instant, u32, u64),
    /// The interfaces as the last tick read them: one read of every device per tick, shared by
    /// the metrics and the status (a read asks each WireGuard device for its peers).
    interfaces: Vec<InterfaceStatus>,
    // After a failed reconcile, wait 1 s, 2 s, 4 s … up to 30 s before the next try.
    backoff: Duration,
    retry_at: Instant,
    last_apply: Instant,
    /// No reconcile before this (the guard still runs): see [`Enforcer::hold_until`].
    hold: Option<Instant>,
}

impl Enforcer {
    /// Opens the data plane (adopting what a previous agent left in place).
    pub fn new(
        config: DataPlaneConfig,
        settings: EnforcerSettings,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, String> {
        let dataplane = DataPlane::new(config).map_err(|e| e.to_string())?;
        Ok(Self {
            dataplane,
            metrics,
            ready,
            settings,
            tally: ViolationTally::default(),
            dirty: true,
            log_budget: (Instant::now(), 0, 0),
            interfaces: Vec::new(),
            backoff: Duration::ZERO,
            retry_at: Instant::now(),
            last_apply: Instant::now(),
            hold: None,
        })
    }

    /// The desired state changed: the next tick reconciles.
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// Whether the last desired state is applied and the fast path verified.
    pub fn converged(&self) -> bool {
        !self.dirty && !self.dataplane.is_withdrawn()
    }

    pub fn dataplane(&self) -> &DataPlane {
        &self.dataplane
    }

    /// Where preshared keys come from (see [`DataPlane::set_secret_source`]).
    pub fn set_secret_source(&mut self, source: Arc<dyn SecretSource>) {
        self.dataplane.set_secret_source(source);
    }

    /// Holds reconciles back until `until` (`None` releases them); every tick still guards the
    /// fast path and the endpoints. In-cluster mode waits so for the first read of the Secrets
    /// a new state names, rather than report its peers not enforced for the moment a read
    /// takes.
    pub fn hold_until(&mut self, until: Option<Instant>) {
        self.hold = until;
    }

    /// One round: guard, violations, reconcile if due, metrics and readiness.
    pub async fn tick(&mut self, spec: &PinnedNodeStateSpec) -> Tick {
        let mut tick = Tick::default();
        let guard = self.dataplane.guard();
        if let Some(problems) = &guard.withdrawn {
            self.metrics.withdrawals.inc();
            tracing::error!(
                ?problems,
                "fast path lost: every peer withdrawn from WireGuard until it is verified again"
            );
        }
        if guard.recovered {
            tracing::info!("fast path verified again: restoring peers");
            self.dirty = true;
        }
        let now = Timestamp::now();
        for eviction in &guard.evictions {
            self.metrics
                .evictions
                .get_or_create(&PeerLabels {
                    interface: eviction.interface.clone(),
                    peer: eviction.peer.clone(),
                })
                .inc();
            self.tally
                .record(&eviction.peer, eviction.endpoint.to_string(), 1, now);
            if eviction.session_kept {
                tracing::warn!(
                    interface = %eviction.interface, peer = %eviction.peer, endpoint = %eviction.endpoint,
                    "source violation: a handshake with the peer's key came from outside its pin; no session was made (identity mode), endpoint put back"
                );
            } else {
                tracing::warn!(
                    interface = %eviction.interface, peer = %eviction.peer, endpoint = %eviction.endpoint,
                    "source violation: the peer's endpoint left its pin; session evicted"
                );
            }
        }
        self.report_violations(now);
        tick.withdrawn = guard.withdrawn;
        tick.recovered = guard.recovered;
        tick.evictions = guard.evictions;

        let resync = !self.dirty && self.last_apply.elapsed() >= self.settings.resync_interval;
        let held = self.hold.is_some_and(|until| Instant::now() < until);
        if (self.dirty || resync) && !held && Instant::now() >= self.retry_at {
            let started = Instant::now();
            self.last_apply = started;
            let capabilities = self.dataplane.probe_capabilities().await;
            match self.dataplane.reconcile(spec, &capabilities).await {
                Ok(writes) => {
                    self.dirty = false;
                    self.backoff = Duration::ZERO;
                    if resync && writes != Writes::default() {
                        tracing::warn!(
                            ?writes,
                            "configuration drift repaired: WireGuard or the fast path had been changed by hand"
                        );
                    }
                    self.metrics
                        .reconcile_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let enforced: std::collections::BTreeSet<String> = spec
                        .interfaces
                        .iter()
                        .flat_map(|i| i.peers.iter().map(|p| p.name.clone()))
                        .collect();
                    self.tally.retain(|peer| enforced.contains(peer));
                    tick.applied = Some(writes);
                }
                Err(e) => {
                    self.metrics.reconcile_errors.inc();
                    self.backoff =
                        (self.backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    self.retry_at = Instant::now() + self.backoff;
                    tracing::error!(retry_in = ?self.backoff, "reconcile failed: {e}");
                    tick.failed = Some(e.to_string());
                }
            }
        }
        self.ready.store(self.converged(), Ordering::Relaxed);
        self.interfaces = self.dataplane.status(SystemTime::now());
        if let Some(writes) = tick.applied.filter(|w| *w != Writes::default()) {
            self.log_enforcement(&writes);
        }
        self.update_metrics();
        tick
    }

    /// Every interface's status as the last tick read it, with each peer's violations and the
    /// generation of the `PinnedPeer` it was rendered from (from `spec`, the state enforced).
    pub fn status(&self, spec: &PinnedNodeStateSpec) -> Vec<InterfaceStatus> {
        let generations: BTreeMap<&str, Option<i64>> = spec
            .interfaces
            .iter()
            .flat_map(|i| i.peers.iter().map(|p| (p.name.as_str(), p.generation)))
            .collect();
        let mut interfaces = self.interfaces.clone();
        for interface in &mut interfaces {
            for peer in &mut interface.peers {
                peer.observed_generation = generations.get(peer.name.as_str()).copied().flatten();
                peer.violations = self.tally.get(&peer.name).cloned();
            }
        }
        interfaces
    }

    /// Logs what is enforced after a reconcile that changed something, from this tick's read.
    fn log_enforcement(&self, writes: &Writes) {
        for interface in &self.interfaces {
            let enforced: Vec<&str> = interface
                .peers
                .iter()
                .filter(|p| p.state == EnforcementState::Enforced)
                .map(|p| p.name.as_str())
                .collect();
            tracing::info!(
                interface = %interface.name, mode = ?interface.mode, fast_path = ?interface.fast_path,
                public_key = ?interface.public_key, ?enforced, ?writes, "enforcing"
            );
            for peer in interface
                .peers
                .iter()
                .filter(|p| p.state == EnforcementState::Failed)
            {
                tracing::error!(interface = %interface.name, peer = %peer.name, reason = ?peer.message, "peer not enforced");
            }
        }
    }

    /// Names of what the fast path counts: peer slot → (interface, peer), port → interface.
    fn slot_names(&self) -> (BTreeMap<u32, (String, String)>, BTreeMap<u16, String>) {
        let mut peers = BTreeMap::new();
        let mut ports = BTreeMap::new();
        for device in &self.dataplane.plan().devices {
            ports.insert(device.listen_port, device.interface.clone());
            for peer in &device.peers {
                if let Some(slot) = self.dataplane.slots().peers.get(&peer.name) {
                    peers.insert(*slot, (device.interface.clone(), peer.name.clone()));
                }
            }
        }
        (peers, ports)
    }

    /// Counts and logs violation events, at most `violation_logs_per_second` lines a second;
    /// the rest are counted in a summary line, so a spoofed flood cannot fill the logs.
    fn report_violations(&mut self, now: Timestamp) {
        let events: Vec<Violation> = self.dataplane.fast_path_mut().drain_violations();
        if events.is_empty() {
            return;
        }
        let (peers, ports) = self.slot_names();
        let per_second = self.settings.violation_logs_per_second;
        for event in events {
            let (interface, peer) = peers.get(&event.peer_slot).cloned().unwrap_or_else(|| {
                (
                    ports.get(&event.port).cloned().unwrap_or_default(),
                    String::new(),
                )
            });
            self.metrics
                .violation_events
                .get_or_create(&PeerLabels {
                    interface: interface.clone(),
                    peer: peer.clone(),
                })
                .inc();
            // A shared port's drop names no peer: it counts in the metrics only.
            if !peer.is_empty() {
                let source = std::net::SocketAddr::new(event.source, event.source_port);
                self.tally
                    .record(&peer, source.to_string(), 1 + event.suppressed, now);
            }
            let budget = &mut self.log_budget;
            if budget.0.elapsed() >= Duration::from_secs(1) {
                if budget.2 > 0 {
                    tracing::warn!(
                        suppressed = budget.2,
                        "more source violations in the last second (not logged one by one)"
                    );
                }
                *budget = (Instant::now(), 0, 0);
            }
            if budget.1 < per_second {
                budget.1 += 1;
                let what = match event.kind {
                    wgpin_common::VIOLATION_SESSION => {
                        "source violation: a packet of the peer's session from outside its pin, dropped (identity mode)"
                    }
                    wgpin_common::VIOLATION_HANDSHAKE_OUT => {
                        "source violation: a handshake with the peer's key from outside its pin; WireGuard's answer dropped, no session (identity mode)"
                    }
                    _ => "source violation: packet for a pinned port from outside the pin, dropped",
                };
                tracing::warn!(
                    %interface, peer = %peer, source = %event.source, source_port = event.source_port, port = event.port,
                    folded = event.suppressed,
                    "{what}"
                );
            } else {
                budget.2 += 1;
            }
        }
    }

    fn update_metrics(&self) {
        let fast_path = self.dataplane.fast_path();
        let (peers, _) = self.slot_names();
        // Each peer's counters, read once: its own series, and its share of its port's.
        let mut by_slot = BTreeMap::new();
        for (slot, (interface, peer)) in &peers {
            if let Ok(counters) = fast_path.peer_counters(*slot) {
                self.metrics.observe_counters(interface, peer, &counters);
                by_slot.insert(*slot, counters);
            }
        }
        // A shared port's packets that name no peer (drops from unknown sources, passes by a
        // prefix several peers share): the port's counts less its peers', as `peer=""`.
        let slots = self.dataplane.slots();
        for device in &self.dataplane.plan().devices {
            if device.mode == wgpin_crds::ResolvedMode::Dedicated {
                continue;
            }
            let Some(Ok(port)) = slots
                .ports
                .get(&device.listen_port)
                .map(|slot| fast_path.port_counters(*slot))
            else {
                continue;
            };
            let rest = device
                .peers
                .iter()
                .filter_map(|peer| by_slot.get(slots.peers.get(&peer.name)?))
                .fold(port, |rest, counted| rest.saturating_sub(counted));
            self.metrics.observe_counters(&device.interface, "", &rest);
        }
        if let Ok(global) = fast_path.global_counters() {
            self.metrics
                .observe_events(global.events_rate_limited, global.events_lost);
        }
        self.metrics
            .identity_available
            .set(i64::from(fast_path.identity_enabled()));
        if let Ok(identity) = fast_path.identity_counters() {
            self.metrics.observe_identity(&identity);
        }
        for interface in &self.interfaces {
            if let Some(mode) = interface.mode {
                self.metrics
                    .mode
                    .get_or_create(&ModeLabels {
                        interface: interface.name.clone(),
                        mode: format!("{mode:?}"),
                    })
                    .set(1);
            }
            for peer in &interface.peers {
                let enforced = i64::from(peer.state == EnforcementState::Enforced);
                self.metrics
                    .peer_enforced
                    .get_or_create(&PeerLabels {
                        interface: interface.name.clone(),
                        peer: peer.name.clone(),
                    })
                    .set(enforced);
            }
        }
        self.metrics
            .fast_path_verified
            .set(i64::from(!self.dataplane.is_withdrawn()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_per_peer_keeps_the_latest_source_and_forgets_departed_peers() {
        let mut tally = ViolationTally::default();
        let t = |s| Timestamp::from_second(s).expect("time");
        tally.record("laptop", "192.0.2.66:4000".into(), 1, t(10));
        tally.record("laptop", "192.0.2.67:4001".into(), 5, t(11));
        tally.record("phone", "203.0.113.9:1".into(), 2, t(12));
        let laptop = tally.get("laptop").expect("laptop");
        assert_eq!(laptop.count, 6);
        assert_eq!(laptop.last_source.as_deref(), Some("192.0.2.67:4001"));
        assert_eq!(laptop.last_time, Some(Time(t(11))));
        tally.retain(|peer| peer == "phone");
        assert!(tally.get("laptop").is_none());
        assert_eq!(tally.get("phone").map(|p| p.count), Some(2));
    }
}
