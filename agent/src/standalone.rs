//! Standalone mode: the operator and the agent in one process, without Kubernetes.
//!
//! Reads `PinnedInterface` and `PinnedPeer` manifests from a directory (the same objects a user
//! would `kubectl apply`), renders this node's state with the operator's render, enforces it,
//! re-reads the directory when it changes, and reports through logs and metrics. An invalid
//! object is reported with its file and field and left out; every valid one stays enforced.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant, SystemTime},
};

use wgpin_crds::{EnforcementState, PinnedNodeStateSpec};
use wgpin_operator::{NodeInfo, PortAssignments, render};

use crate::{
    dataplane::{DataPlane, DataPlaneConfig, NodeCapabilities},
    fastpath::Violation,
    manifests,
    metrics::{self, Metrics, ModeLabels, PeerLabels},
};

/// How standalone mode runs.
#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    pub dir: PathBuf,
    pub node: NodeInfo,
    pub dataplane: DataPlaneConfig,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often the fast path is verified and endpoints are checked.
    pub guard_interval: Duration,
    /// How often the directory is checked for changes.
    pub reload_interval: Duration,
    /// How often the whole state is re-applied even without a change, to repair drift (a peer
    /// added or changed by hand with `wg set`). A re-apply without drift writes nothing.
    pub resync_interval: Duration,
    /// Most violation log lines per second; the rest are summed up.
    pub violation_logs_per_second: u32,
}

/// Size and modification time of every manifest: a change in any means re-read.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                stack.push(path);
            } else {
                out.push((path, metadata.len(), metadata.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// Reads the manifests and renders this node's state; logs every problem with its place.
pub fn render_node(
    dir: &Path,
    node: &NodeInfo,
    ports: &PortAssignments,
) -> Result<(PinnedNodeStateSpec, PortAssignments), String> {
    let (objects, errors) = manifests::load_dir(dir).map_err(|e| e.to_string())?;
    for error in &errors {
        tracing::error!(target: "wgpin::manifests", "{error}");
    }
    let rendered = render(
        &objects.interfaces,
        &objects.peers,
        std::slice::from_ref(node),
        ports,
    );
    for problem in &rendered.problems {
        tracing::error!(target: "wgpin::manifests", kind = problem.kind, name = %problem.name, reason = problem.reason.as_str(), "{}", problem.message);
    }
    let spec = rendered
        .nodes
        .get(&node.name)
        .cloned()
        .unwrap_or_else(|| PinnedNodeStateSpec {
            node_name: node.name.clone(),
            interfaces: Vec::new(),
        });
    Ok((spec, rendered.ports))
}

/// Names of what the fast path counts: peer slot → (interface, peer), port → interface.
fn slot_names(dataplane: &DataPlane) -> (BTreeMap<u32, (String, String)>, BTreeMap<u16, String>) {
    let mut peers = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for device in &dataplane.plan().devices {
        ports.insert(device.listen_port, device.interface.clone());
        for peer in &device.peers {
            if let Some(slot) = dataplane.slots().peers.get(&peer.name) {
                peers.insert(*slot, (device.interface.clone(), peer.name.clone()));
            }
        }
    }
    (peers, ports)
}

fn update_metrics(dataplane: &DataPlane, metrics: &Metrics, now: SystemTime) {
    let (peers, _) = slot_names(dataplane);
    for (slot, (interface, peer)) in &peers {
        if let Ok(counters) = dataplane.fast_path().peer_counters(*slot) {
            metrics.observe_counters(interface, peer, &counters);
        }
    }
    if let Ok(global) = dataplane.fast_path().global_counters() {
        metrics.observe_events(global.events_rate_limited, global.events_lost);
    }
    for interface in dataplane.status(now) {
        if let Some(mode) = interface.mode {
            metrics
                .mode
                .get_or_create(&ModeLabels {
                    interface: interface.name.clone(),
                    mode: format!("{mode:?}"),
                })
                .set(1);
        }
        for peer in interface.peers {
            let enforced = i64::from(peer.state == EnforcementState::Enforced);
            metrics
                .peer_enforced
                .get_or_create(&PeerLabels {
                    interface: interface.name.clone(),
                    peer: peer.name,
                })
                .set(enforced);
        }
    }
    metrics
        .fast_path_verified
        .set(i64::from(!dataplane.is_withdrawn()));
}

/// Runs until `shutdown` resolves. Enforcement stays in place when it returns: pins, programs
/// and WireGuard devices outlive the agent, and the next start adopts them.
pub async fn run(
    config: StandaloneConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mut dataplane = DataPlane::new(config.dataplane.clone()).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(metrics::serve(listener, metrics.clone(), ready.clone()));
    }
    let ports_path = config.dataplane.state_dir.join("ports.json");
    let mut ports: PortAssignments = std::fs::read(&ports_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<((String, String), u16)>>(&bytes).ok())
        .map(|list| list.into_iter().collect())
        .unwrap_or_default();
    let capabilities = NodeCapabilities::default();
    let mut seen = None;
    let mut dirty = true;
    let mut last_reload = Instant::now() - config.reload_interval;
    let mut spec = PinnedNodeStateSpec::default();
    let mut log_budget = (Instant::now(), 0u32, 0u64);
    // After a failed reconcile, wait 1 s, 2 s, 4 s … up to 30 s before the next try.
    let mut backoff = Duration::ZERO;
    let mut retry_at = Instant::now();
    let mut last_apply = Instant::now();
    let mut ticker = tokio::time::interval(config.guard_interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => break,
        }
        let guard = dataplane.guard();
        if let Some(problems) = &guard.withdrawn {
            metrics.withdrawals.inc();
            tracing::error!(
                ?problems,
                "fast path lost: every peer withdrawn from WireGuard until it is verified again"
            );
        }
        if guard.recovered {
            tracing::info!("fast path verified again: restoring peers");
            dirty = true;
        }
        for eviction in &guard.evictions {
            metrics
                .evictions
                .get_or_create(&PeerLabels {
                    interface: eviction.interface.clone(),
                    peer: eviction.peer.clone(),
                })
                .inc();
            tracing::warn!(
                interface = %eviction.interface, peer = %eviction.peer, endpoint = %eviction.endpoint,
                "source violation: the peer's endpoint left its pin; session evicted"
            );
        }
        report_violations(
            &mut dataplane,
            &metrics,
            &mut log_budget,
            config.violation_logs_per_second,
        );

        if last_reload.elapsed() >= config.reload_interval {
            last_reload = Instant::now();
            let current = fingerprint(&config.dir);
            if seen.as_ref() != Some(&current) {
                match render_node(&config.dir, &config.node, &ports) {
                    Ok((new_spec, new_ports)) => {
                        spec = new_spec;
                        if new_ports != ports {
                            ports = new_ports;
                            let list: Vec<_> = ports.iter().collect();
                            if let Ok(bytes) = serde_json::to_vec(&list) {
                                let _ = std::fs::write(&ports_path, bytes);
                            }
                        }
                        dirty = true;
                    }
                    Err(e) => {
                        tracing::error!(dir = %config.dir.display(), "cannot read manifests: {e}")
                    }
                }
                seen = Some(current);
            }
        }
        let resync = !dirty && last_apply.elapsed() >= config.resync_interval;
        if (dirty || resync) && Instant::now() >= retry_at {
            let started = Instant::now();
            last_apply = started;
            match dataplane.reconcile(&spec, &capabilities).await {
                Ok(writes) => {
                    dirty = false;
                    backoff = Duration::ZERO;
                    if resync && writes != Default::default() {
                        tracing::warn!(
                            ?writes,
                            "configuration drift repaired: WireGuard or the fast path had been changed by hand"
                        );
                    }
                    metrics
                        .reconcile_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if writes != Default::default() {
                        for interface in dataplane.status(SystemTime::now()) {
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
                }
                Err(e) => {
                    metrics.reconcile_errors.inc();
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
                    retry_at = Instant::now() + backoff;
                    tracing::error!(retry_in = ?backoff, "reconcile failed: {e}");
                }
            }
        }
        ready.store(
            !dataplane.is_withdrawn() && !dirty,
            std::sync::atomic::Ordering::Relaxed,
        );
        update_metrics(&dataplane, &metrics, SystemTime::now());
    }
    tracing::info!("stopping; enforcement stays in place for the next agent to adopt");
    Ok(())
}

/// Logs violation events, at most `per_second` lines a second; the rest are counted in a
/// summary line, so a spoofed flood cannot fill the logs.
fn report_violations(
    dataplane: &mut DataPlane,
    metrics: &Metrics,
    budget: &mut (Instant, u32, u64),
    per_second: u32,
) {
    let events: Vec<Violation> = dataplane.fast_path_mut().drain_violations();
    if events.is_empty() {
        return;
    }
    let (peers, ports) = slot_names(dataplane);
    for event in events {
        let (interface, peer) = peers.get(&event.peer_slot).cloned().unwrap_or_else(|| {
            (
                ports.get(&event.port).cloned().unwrap_or_default(),
                String::new(),
            )
        });
        metrics
            .violation_events
            .get_or_create(&PeerLabels {
                interface: interface.clone(),
                peer: peer.clone(),
            })
            .inc();
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
            tracing::warn!(
                %interface, peer = %peer, source = %event.source, source_port = event.source_port, port = event.port,
                folded = event.suppressed,
                "source violation: packet for a pinned port from outside the pin, dropped"
            );
        } else {
            budget.2 += 1;
        }
    }
}
