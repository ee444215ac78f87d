//! `wgpin-agent`: the node agent's command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use wgpin_agent::{
    cluster,
    dataplane::DataPlaneConfig,
    enforcer::EnforcerSettings,
    fastpath::{BpfPaths, HookChoice, loader::DEFAULT_BPFFS_ROOT},
    manifests, standalone,
    wireguard::{Backend, Uapi},
};
use wgpin_crds::PinnedNodeState;
use wgpin_operator::{NodeInfo, PortAssignments, render};

#[derive(Parser)]
#[command(name = "wgpin-agent", version, about = "wgpin node agent")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendChoice {
    Auto,
    Kernel,
    Userspace,
}

#[derive(Clone, Copy, ValueEnum)]
enum Hook {
    /// Native XDP, TC when XDP cannot attach or is owned by another program.
    Auto,
    Xdp,
    Tc,
}

/// The manifests and the node they are read for.
#[derive(clap::Args)]
struct ManifestArgs {
    /// Directory with PinnedInterface and PinnedPeer manifests (read recursively).
    #[arg(long)]
    dir: PathBuf,
    /// This node's name.
    #[arg(long, default_value = "localhost")]
    node: String,
    /// A label of this node, for the interfaces' and peers' node selectors (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

impl ManifestArgs {
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            name: self.node.clone(),
            labels: self.labels.iter().cloned().collect(),
        }
    }
}

/// How this node enforces: where, with which WireGuard, and how often it checks.
#[derive(clap::Args)]
struct EnforceArgs {
    /// An interface WireGuard's packets arrive on; the fast path attaches there (repeatable).
    #[arg(long = "underlay", required = true)]
    underlay: Vec<String>,
    /// The fast-path hook.
    #[arg(long, value_enum, default_value_t = Hook::Auto)]
    hook: Hook,
    /// Node keys and the agent's bookkeeping.
    #[arg(long, default_value = "/var/lib/wgpin")]
    state_dir: PathBuf,
    /// Where the fast path's programs, links and maps are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// Which WireGuard: the kernel's, a userspace implementation, or the kernel's when it has
    /// one.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// The userspace WireGuard to run for each device.
    #[arg(long, default_value = "wireguard-go")]
    wireguard_go: PathBuf,
    /// Preshared keys: <dir>/<namespace>/<name>/<key>, like mounted Secrets (standalone mode;
    /// in a cluster the agent reads the Secrets its node's state names).
    #[arg(long)]
    secrets_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Milliseconds between fast-path verifications and endpoint checks.
    #[arg(long, default_value_t = 200)]
    guard_interval_ms: u64,
    /// Milliseconds between re-applications of the whole state (drift repair).
    #[arg(long, default_value_t = 10_000)]
    resync_interval_ms: u64,
}

impl EnforceArgs {
    fn dataplane(&self) -> DataPlaneConfig {
        DataPlaneConfig {
            state_dir: self.state_dir.clone(),
            bpffs: BpfPaths::new(self.bpffs_root.clone()),
            underlay: self.underlay.clone(),
            hook: match self.hook {
                Hook::Auto => HookChoice::Auto,
                Hook::Xdp => HookChoice::Xdp,
                Hook::Tc => HookChoice::Tc,
            },
            backend: std::sync::Arc::new(match self.backend {
                BackendChoice::Auto => Backend::detect(Uapi::default(), self.wireguard_go.clone()),
                BackendChoice::Kernel => Backend::kernel(),
                BackendChoice::Userspace => {
                    Backend::userspace(Uapi::default(), self.wireguard_go.clone())
                }
            }),
            secrets_dir: self.secrets_dir.clone(),
        }
    }

    fn guard_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.guard_interval_ms.max(10))
    }

    fn enforcer(&self) -> EnforcerSettings {
        EnforcerSettings {
            resync_interval: std::time::Duration::from_millis(self.resync_interval_ms.max(100)),
            violation_logs_per_second: 20,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate the manifests in a directory and print the PinnedNodeState this node would
    /// enforce, without changing anything. Exits 1 when an object is invalid or left out.
    Render {
        #[command(flatten)]
        manifests: ManifestArgs,
    },
    /// Enforce the manifests in a directory on this host, without Kubernetes: the fast path on
    /// the underlay interfaces, then WireGuard. Re-reads the directory when it changes.
    /// Stopping leaves enforcement in place; the next start adopts it.
    Standalone {
        #[command(flatten)]
        manifests: ManifestArgs,
        #[command(flatten)]
        enforce: EnforceArgs,
    },
    /// Enforce this node's PinnedNodeState from the cluster and report its status, Events and
    /// metrics back. Keeps enforcing the last state it received while the API server is away,
    /// also across restarts. Stopping leaves enforcement in place; the next start adopts it.
    Cluster {
        /// This node's name (the downward API's spec.nodeName).
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// The namespace of the Events the agent writes about PinnedPeers.
        #[arg(long, default_value = "default")]
        event_namespace: String,
        /// Milliseconds between reads of the preshared-key Secrets this node's state names (a
        /// Secret it newly names is read at once).
        #[arg(long, default_value_t = wgpin_agent::secrets::DEFAULT_REFRESH.as_millis() as u64)]
        secret_refresh_interval_ms: u64,
        #[command(flatten)]
        enforce: EnforceArgs,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE, for example wgpin.io/gateway=true"))?;
    if key.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((key.to_string(), value.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    wgpin_operator::process::init_logging(matches!(cli.log_format, LogFormat::Json));
    match cli.command {
        Command::Render { manifests } => render_command(&manifests),
        Command::Standalone { manifests, enforce } => {
            let enforcer = enforce.enforcer();
            let config = standalone::StandaloneConfig {
                node: manifests.node_info(),
                dir: manifests.dir,
                dataplane: enforce.dataplane(),
                metrics_addr: enforce.metrics_addr,
                guard_interval: enforce.guard_interval(),
                reload_interval: std::time::Duration::from_secs(1),
                resync_interval: enforcer.resync_interval,
                violation_logs_per_second: enforcer.violation_logs_per_second,
            };
            run_until_stopped(|shutdown| standalone::run(config, shutdown))
        }
        Command::Cluster {
            node,
            event_namespace,
            secret_refresh_interval_ms,
            enforce,
        } => {
            let config = cluster::ClusterConfig {
                node,
                dataplane: enforce.dataplane(),
                enforcer: enforce.enforcer(),
                status: cluster::StatusSettings::default(),
                metrics_addr: enforce.metrics_addr,
                guard_interval: enforce.guard_interval(),
                event_namespace,
                secret_refresh: std::time::Duration::from_millis(
                    secret_refresh_interval_ms.max(100),
                ),
            };
            run_until_stopped(|shutdown| async move {
                let client = wgpin_crds::kube::Client::try_default().await.map_err(|e| {
                    format!(
                        "cannot reach the Kubernetes API: {e} (in a pod it uses the service account; elsewhere KUBECONFIG)"
                    )
                })?;
                cluster::run(client, config, shutdown).await
            })
        }
    }
}

/// Runs `command` on a single-threaded runtime until it ends or SIGTERM/Ctrl-C arrive.
fn run_until_stopped<F, Fut>(command: F) -> ExitCode
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = Box::pin(wgpin_operator::process::termination());
    match runtime.block_on(command(shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn render_command(args: &ManifestArgs) -> ExitCode {
    let (dir, node) = (&args.dir, &args.node);
    let (objects, errors) = match manifests::load_dir(dir) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for error in &errors {
        eprintln!("error: {error}");
    }
    let rendered = render(
        &objects.interfaces,
        &objects.peers,
        &[args.node_info()],
        &PortAssignments::new(),
    );
    for problem in &rendered.problems {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "read {} PinnedInterface(s) and {} PinnedPeer(s) from {}; {} invalid, {} left out",
        objects.interfaces.len(),
        objects.peers.len(),
        dir.display(),
        errors.len(),
        rendered.problems.len()
    );
    match rendered.nodes.get(node) {
        Some(spec) => {
            let state = PinnedNodeState::new(node, spec.clone());
            match serde_saphyr::to_string(&state) {
                Ok(yaml) => print!("{yaml}"),
                Err(e) => {
                    eprintln!("error: cannot print the rendered state: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => eprintln!("node {node:?} runs no interface: no PinnedInterface selects its labels"),
    }
    if errors.is_empty() && rendered.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
