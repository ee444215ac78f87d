//! `wgpin-operator`: renders PinnedInterface and PinnedPeer objects into one PinnedNodeState per
//! node and rolls the agents' reports up into PinnedPeer.status.
//!
//! Serves `/metrics`, `/healthz` and `/readyz`; logs as text, or JSON with `--log-format json`;
//! stops on SIGTERM or Ctrl-C.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, ValueEnum};
use futures::FutureExt as _;
use wgpin_crds::{
    PinnedPeer,
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{Api, Client, api::ListParams},
};
use wgpin_operator::{
    controller::{Controller, ControllerSettings, LoopSettings, run},
    events::EventSettings,
    http::{Probes, serve},
    leader,
    metrics::Metrics,
    process,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Reconciles PinnedPeers and PinnedInterfaces into per-node PinnedNodeStates.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// How long a deleted PinnedPeer waits for agents to confirm its removal, in seconds.
    #[arg(long, default_value_t = 300)]
    cleanup_grace_seconds: u64,
    /// A pass at least this often even when no watch reported a change, in seconds.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// The namespace of the leader-election Lease [default: the client's namespace: the pod's
    /// own in a cluster].
    #[arg(long)]
    lease_namespace: Option<String>,
    /// The name of the leader-election Lease.
    #[arg(long, default_value = "wgpin-operator")]
    lease_name: String,
    /// The namespace Events go to (PinnedPeers are cluster-scoped; kubectl looks in "default").
    #[arg(long, default_value = wgpin_operator::events::DEFAULT_EVENT_NAMESPACE)]
    event_namespace: String,
}

/// Resolves on SIGTERM or Ctrl-C, and says so.
async fn termination() {
    process::termination().await;
    tracing::info!("stopping");
}

fn main() -> ExitCode {
    let args = Args::parse();
    process::init_logging(matches!(args.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(operate(args))
}

async fn operate(args: Args) -> ExitCode {
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(
                "cannot reach the Kubernetes API: {e} (in a pod it uses the service account; elsewhere KUBECONFIG)"
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = Api::<PinnedPeer>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
    {
        tracing::error!(
            "cannot list PinnedPeers ({e}); are the CRDs installed? kubectl apply -f charts/wgpin/crds/ (or install the chart)"
        );
        return ExitCode::FAILURE;
    }

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(
                "cannot listen on {} ({e}); pick another --metrics-addr",
                args.metrics_addr
            );
            return ExitCode::FAILURE;
        }
    };
    let probes = Probes {
        metrics: {
            let metrics = metrics.clone();
            Arc::new(move || metrics.encode())
        },
        readiness: {
            let ready = ready.clone();
            Arc::new(move || {
                if ready.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("leader: the first reconcile pass has not completed".to_string())
                }
            })
        },
    };
    match listener.local_addr() {
        Ok(address) => tracing::info!(%address, "serving /metrics, /healthz and /readyz"),
        Err(e) => {
            tracing::warn!("serving /metrics, /healthz and /readyz at an unknown address: {e}")
        }
    }
    tokio::spawn(serve(listener, probes));

    // Leader election: every replica serves probes; only the lease holder runs passes. A
    // fresh controller per term: its memos and Event baseline start from what it sees.
    let identity = leader::default_identity();
    let namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let (elector, mut leadership) = match leader::LeaderElector::new(
        client.clone(),
        leader::Settings::new(namespace, args.lease_name.clone(), identity.clone()),
    ) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = termination().shared();
    let election = tokio::spawn(elector.run(shutdown.clone()));
    // A standby is ready (it is healthy and can take over); a leader once its first pass is done.
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "wgpin-operator running");
    while leadership.acquired().await {
        metrics.leader.set(1);
        ready.store(false, Ordering::Relaxed);
        let controller = Controller::new(
            client.clone(),
            ControllerSettings {
                cleanup_grace: Duration::from_secs(args.cleanup_grace_seconds),
                events: EventSettings {
                    namespace: args.event_namespace.clone(),
                    ..EventSettings::new(identity.clone())
                },
            },
            metrics.clone(),
        );
        let settings = LoopSettings {
            resync: Duration::from_secs(args.resync_seconds),
            ..LoopSettings::default()
        };
        let now = || Time(Timestamp::now());
        // Dropping the loop when leadership goes also drops a pass in flight: no write after.
        let mut lost = leadership.clone();
        tokio::select! {
            () = run(controller, settings, ready.clone(), now, std::future::pending()) => {}
            () = lost.lost() => {}
        }
        metrics.leader.set(0);
        ready.store(true, Ordering::Relaxed);
    }
    match election.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("leader election: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("leader election stopped: {e}");
            ExitCode::FAILURE
        }
    }
}
