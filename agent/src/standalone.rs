//! Standalone mode: the operator and the agent in one process, without Kubernetes.
//!
//! Reads `PinnedInterface` and `PinnedPeer` manifests from a directory (the same objects a user
//! would `kubectl apply`), renders this node's state with the operator's render, enforces it,
//! re-reads the directory when it changes, and reports through logs and metrics. An invalid
//! object is reported with its file and field and left out; every valid one stays enforced.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant, SystemTime},
};

use wgpin_crds::PinnedNodeStateSpec;
use wgpin_operator::{NodeInfo, PortAssignments, render};

use crate::{
    dataplane::DataPlaneConfig,
    enforcer::{Enforcer, EnforcerSettings},
    manifests,
    metrics::{self, Metrics},
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

/// Runs until `shutdown` resolves. Enforcement stays in place when it returns: pins, programs
/// and WireGuard devices outlive the agent, and the next start adopts them.
pub async fn run(
    config: StandaloneConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let mut enforcer = Enforcer::new(
        config.dataplane.clone(),
        EnforcerSettings {
            resync_interval: config.resync_interval,
            violation_logs_per_second: config.violation_logs_per_second,
        },
        metrics.clone(),
        ready.clone(),
    )?;
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
    let mut seen = None;
    let mut last_reload = Instant::now() - config.reload_interval;
    let mut spec = PinnedNodeStateSpec::default();
    let mut ticker = tokio::time::interval(config.guard_interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => break,
        }
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
                        enforcer.changed();
                    }
                    Err(e) => {
                        tracing::error!(dir = %config.dir.display(), "cannot read manifests: {e}")
                    }
                }
                seen = Some(current);
            }
        }
        enforcer.tick(&spec).await;
    }
    tracing::info!("stopping; enforcement stays in place for the next agent to adopt");
    Ok(())
}
