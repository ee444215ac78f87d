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
use wgpin_agent::wireguard::SecretKey;
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
        Self::start_with(lan, paths, &[], "info")
    }

    /// With `extra` arguments of `wgpin-agent cluster` and `rust_log` as its RUST_LOG.
    pub fn start_with(lan: &Lan, paths: &AgentPaths, extra: &[&str], rust_log: &str) -> Self {
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
            .args(extra)
            .env("KUBECONFIG", &paths.kubeconfig)
            .env("RUST_LOG", rust_log)
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

    /// An agent with `extra` arguments and `rust_log` as its RUST_LOG.
    pub fn agent_with(&self, extra: &[&str], rust_log: &str) -> Agent {
        Agent::start_with(&self.lan, &self.paths, extra, rust_log)
    }

    /// Fails when a key shows up where it must not: the node's private keys under the state
    /// directory (their modes checked on the way) and `more`, in every encoding, searched in
    /// the agent's log (all its runs), this process's logs (the operator's), every API object
    /// but Secrets (statuses and Events included) and the agent's metrics.
    pub fn assert_no_key_leaks(
        &self,
        agent: &Agent,
        logs: &CapturedLogs,
        more: Vec<(String, SecretKey)>,
    ) {
        let mut keys = node_keys(&self.paths.state);
        keys.extend(more);
        let metrics = agent
            .metrics_address()
            .map(|address| http_get_in(&self.lan.gateway_ns, address, "/metrics"))
            .unwrap_or_default();
        assert!(metrics.contains("wgpin_"), "no metrics scraped: {metrics}");
        let process_logs = logs.text();
        assert!(
            process_logs.contains("wgpin_operator"),
            "the operator's logs were not captured"
        );
        assert_no_key_leaks(
            &keys,
            &[
                ("the agent's log", agent.log()),
                ("the operator's logs", process_logs),
                ("the API's objects", self.api_objects_but_secrets()),
                ("the agent's metrics", metrics),
            ],
        );
    }

    /// Every object the API server holds except Secrets (which hold preshared keys on purpose),
    /// statuses and Events included, as JSON text.
    pub fn api_objects_but_secrets(&self) -> String {
        let objects: Vec<Value> = self
            .server
            .objects()
            .into_iter()
            .filter(|(resource, _)| !(resource.group.is_empty() && resource.plural == "secrets"))
            .map(|(_, object)| object)
            .collect();
        assert!(
            objects.iter().any(|o| o["kind"] == "Event"),
            "the API holds Events to search"
        );
        serde_json::to_string(&objects).expect("json")
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

/// What this process logs from the first call on, the in-process operator's logs included (the
/// agent logs to its own file). Installs the process's global subscriber once; later calls share
/// it.
pub fn capture_logs() -> CapturedLogs {
    static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs(Arc::new(std::sync::Mutex::new(Vec::new())));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,hyper=info,hyper_util=info,tower=info,h2=info",
            ))
            .with_writer(move || sink.clone())
            .try_init();
        logs
    })
    .clone()
}

/// The logs [`capture_logs`] collects.
#[derive(Clone)]
pub struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The ways a key could be written out: base64 (the padding cut off, so a key without it is
/// found too), URL-safe base64, hex in either case (WireGuard's UAPI), and the bytes as Rust's
/// Debug prints them (decimal, and hex with `{:x?}`).
pub fn key_encodings(key: &SecretKey) -> Vec<(&'static str, String)> {
    use base64::{
        Engine as _,
        engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    };
    let bytes = key.as_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        ("base64", STANDARD.encode(bytes)[..43].to_string()),
        ("base64url", URL_SAFE_NO_PAD.encode(bytes)),
        ("hex", hex.clone()),
        ("HEX", hex.to_uppercase()),
        ("bytes", format!("{bytes:?}")),
        ("bytes in hex", format!("{bytes:x?}")),
    ]
}

/// Fails naming each key (by what it is, never its value), encoding and place where a key
/// shows up. Every place must hold something, so that an empty scrape cannot pass for a clean
/// one.
pub fn assert_no_key_leaks(keys: &[(String, SecretKey)], places: &[(&str, String)]) {
    assert!(!keys.is_empty(), "no keys to look for");
    for (place, text) in places {
        assert!(!text.trim().is_empty(), "nothing captured from {place}");
    }
    let mut found = Vec::new();
    for (what, key) in keys {
        for (encoding, written) in key_encodings(key) {
            for (place, text) in places {
                if text.contains(&written) {
                    found.push(format!("{what}, in {encoding}, is in {place}"));
                }
            }
        }
    }
    assert!(found.is_empty(), "keys leaked:\n{}", found.join("\n"));
}

/// The node's private keys (`<state>/keys/*.key`), after checking that every file under
/// `<state>/keys` (the kept preshared keys too) is mode 0600 and the directory 0700.
pub fn node_keys(state: &std::path::Path) -> Vec<(String, SecretKey)> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = state.join("keys");
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the node's keys") {
        let path = entry.expect("entry").path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        if path.extension().is_some_and(|e| e == "key") {
            let text = std::fs::read_to_string(&path).expect("key");
            keys.push((
                format!("node private key {}", path.display()),
                SecretKey::from_base64(&text).expect("a key"),
            ));
        }
    }
    assert!(!keys.is_empty(), "no key under {}", dir.display());
    keys
}
