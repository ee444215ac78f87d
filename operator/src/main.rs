//! `wgpin-operator`: renders PinnedInterface and PinnedPeer objects into one PinnedNodeState per
//! node and rolls the agents' reports up into PinnedPeer.status.
//!
//! One replica for now: leader election (for two or more) comes with the rest of the operator
//! work. Logs as text, or JSON with `--log-format json`.

use std::process::ExitCode;

use wgpin_crds::{
    PinnedPeer,
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{Api, Client, api::ListParams},
};
use wgpin_operator::controller::{LoopSettings, run};

fn main() -> ExitCode {
    let json = std::env::args()
        .skip(1)
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init();
    }
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
    runtime.block_on(async {
        let client = match Client::try_default().await {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(
                    "cannot reach the Kubernetes API: {e} (in a pod it uses the service account; elsewhere KUBECONFIG)"
                );
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = Api::<PinnedPeer>::all(client.clone()).list(&ListParams::default().limit(1)).await {
            tracing::error!(
                "cannot list PinnedPeers ({e}); are the CRDs installed? kubectl apply -f charts/wgpin/crds/ (or install the chart)"
            );
            return ExitCode::FAILURE;
        }
        let now = || Time(Timestamp::now());
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("stopping");
        };
        tracing::info!("wgpin-operator running");
        run(client, LoopSettings::default(), now, shutdown).await;
        ExitCode::SUCCESS
    })
}
