//! `wgpin-operator`: renders PinnedInterface and PinnedPeer objects into one PinnedNodeState per
//! node and rolls the agents' reports up into PinnedPeer.status.
//!
//! Serves `/metrics`, `/healthz` and `/readyz`; logs as text, or JSON with `--log-format json`;
//! stops on SIGTERM or Ctrl-C.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use wgpin_crds::{
    PinnedPeer,
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{Api, Client, api::ListParams},
};
use wgpin_operator::{
    controller::{Controller, ControllerSettings, LoopSettings, run},
    http::{Probes, serve},
    metrics::Metrics,
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
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("stopping");
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
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
                if ready.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("the first reconcile pass has not completed".to_string())
                }
            })
        },
    };
    tokio::spawn(serve(listener, probes));

    let controller = Controller::new(
        client,
        ControllerSettings {
            cleanup_grace: Duration::from_secs(args.cleanup_grace_seconds),
        },
        metrics.clone(),
    );
    let settings = LoopSettings {
        resync: Duration::from_secs(args.resync_seconds),
        ..LoopSettings::default()
    };
    let now = || Time(Timestamp::now());
    tracing::info!(metrics = %args.metrics_addr, "wgpin-operator running");
    run(controller, settings, ready, now, termination()).await;
    ExitCode::SUCCESS
}
