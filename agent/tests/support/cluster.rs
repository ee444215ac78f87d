//! The whole loop on one machine: the in-memory API server reachable from a gateway network
//! namespace, the operator's loop in this process, and `wgpin-agent cluster` in the gateway
//! namespace. Shared by the loop test and the convergence benchmark.

use std::{
    io::{Read as _, Write as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use serde_json::Value;
use wgpin_crds::{
    PinnedInterface, PinnedPeer,
    k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::{
        Api, Client,
        api::{Patch, PatchParams},
    },
};
use wgpin_operator::{
    controller::{Controller, ControllerSettings, LoopSettings},
    metrics::Metrics,
};
use wgpin_test_apiserver::{FakeApiServer, kubeconfig, serve_http};

use super::{GatewayCleanup, Lan, in_netns, unique_id};

/// `wgpin-agent cluster` in the gateway namespace, its log in a file.
pub struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

pub struct AgentPaths {
    pub kubeconfig: PathBuf,
    pub state: PathBuf,
    pub bpffs: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(lan: &Lan, paths: &AgentPaths) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .expect("log file");
        // nsenter keeps the mount namespace (and the bpffs on /sys/fs/bpf) that
        // `ip netns exec` would replace.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lan.gateway_ns))
            .arg(env!("CARGO_BIN_EXE_wgpin-agent"))
            .args(["--log-format", "json", "cluster", "--node", "gateway"])
            .args(["--underlay", &lan.gateway_if_client])
            .args(["--underlay", &lan.gateway_if_attacker])
            .arg("--state-dir")
            .arg(&paths.state)
            .arg("--bpffs-root")
            .arg(&paths.bpffs)
            .args([
                "--guard-interval-ms",
                "100",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env("KUBECONFIG", &paths.kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("agent starts");
        Self {
            child,
            log: paths.log.clone(),
        }
    }

    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last address the agent said it serves metrics on.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.log().lines().rev().find_map(|line| {
            let entry: Value = serde_json::from_str(line).ok()?;
            (entry["fields"]["message"] == "serving /metrics, /healthz and /readyz")
                .then(|| entry["fields"]["address"].as_str()?.parse().ok())
                .flatten()
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// `kubectl apply -f` of a YAML stream: server-side apply of each document.
pub async fn kubectl_apply(client: &Client, yaml: &str) {
    let documents: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("YAML");
    let params = PatchParams::apply("kubectl").force();
    for document in documents {
        let name = document["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let result = match document["kind"].as_str() {
            Some("Node") => Api::<Node>::all(client.clone())
                .patch(&name, &params, &Patch::Apply(&document))
                .await
                .map(|_| ()),
            Some("PinnedInterface") => Api::<PinnedInterface>::all(client.clone())
                .patch(&name, &params, &Patch::Apply(&document))
                .await
                .map(|_| ()),
            Some("PinnedPeer") => Api::<PinnedPeer>::all(client.clone())
                .patch(&name, &params, &Patch::Apply(&document))
                .await
                .map(|_| ()),
            other => panic!("no kind {other:?} in this test"),
        };
        result.unwrap_or_else(|e| panic!("apply {name}: {e}"));
    }
}

/// GET `path` from a server in `ns`, in one write (the probe servers read a whole request).
pub fn http_get_in(ns: &str, address: std::net::SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    in_netns(ns, move || {
        let attempt = || -> std::io::Result<String> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        };
        attempt().unwrap_or_default()
    })
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// A LAN, the API server on the gateway's loopback, the operator running; agents started on
/// demand. Everything goes on drop (start agents after this, so they are dropped first).
pub struct Loop {
    pub runtime: tokio::runtime::Runtime,
    pub server: FakeApiServer,
    pub client: Client,
    pub paths: AgentPaths,
    /// The gateway interface's name (`<device>-<n>` for a dedicated port's device).
    pub device: String,
    pub id: String,
    stop_operator: Option<tokio::sync::oneshot::Sender<()>>,
    _work: tempfile::TempDir,
    _cleanup: GatewayCleanup,
    pub lan: Lan,
}

impl Loop {
    pub fn start() -> Self {
        let lan = Lan::new();
        let id = unique_id();
        let device = format!("wgk{id}");
        let work = tempfile::tempdir().expect("work dir");
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/wgpin-cl-{id}"));
        let cleanup = GatewayCleanup {
            device: device.clone(),
            bpffs: bpffs.clone(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = FakeApiServer::new();
        let client = runtime.block_on(async { server.client() });
        let listener = in_netns(&lan.gateway_ns, || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            listener
        });
        let api_address = listener.local_addr().expect("address");
        runtime.spawn({
            let server = server.clone();
            async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                serve_http(server, listener).await;
            }
        });
        let config = work.path().join("kubeconfig");
        std::fs::write(&config, kubeconfig(api_address)).expect("kubeconfig");
        let (stop_operator, operator_stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(wgpin_operator::controller::run(
            Controller::new(
                client.clone(),
                ControllerSettings::default(),
                Arc::new(Metrics::new()),
            ),
            LoopSettings {
                debounce: Duration::from_millis(50),
                ..LoopSettings::default()
            },
            Arc::new(AtomicBool::new(false)),
            || Time(Timestamp::now()),
            async {
                let _ = operator_stopped.await;
            },
        ));
        let paths = AgentPaths {
            kubeconfig: config,
            state: work.path().join("state"),
            bpffs,
            log: work.path().join("agent.log"),
        };
        Self {
            runtime,
            server,
            client,
            paths,
            device,
            id,
            stop_operator: Some(stop_operator),
            _work: work,
            _cleanup: cleanup,
            lan,
        }
    }

    pub fn agent(&self) -> Agent {
        Agent::start(&self.lan, &self.paths)
    }

    pub fn apply(&self, yaml: &str) {
        self.runtime.block_on(kubectl_apply(&self.client, yaml));
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_operator.take() {
            let _ = stop.send(());
        }
    }
}
