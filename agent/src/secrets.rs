//! Preshared keys, from wherever each mode keeps them. The data plane plans through
//! [`SecretSource`] and never talks to the API server itself.
//!
//! - Standalone mode reads files laid out like a mounted Secret,
//!   `<dir>/<namespace>/<name>/<key>` ([`SecretsDir`]).
//! - In-cluster mode reads the Secrets from the API server ([`SecretCache`], filled by
//!   [`fetch_loop`]). The agent reads exactly the Secrets its own node's `PinnedNodeState`
//!   names, one `get` each and never a list or a watch: RBAC grants `get` alone, in the
//!   namespaces chosen for preshared keys, and no node learns the keys of peers it does not
//!   serve.
//!   - A Secret is read as soon as a state names it (that state's reconcile waits up to
//!     [`FIRST_READ_WAIT`] for the answer rather than report the peer not enforced), then again
//!     every refresh interval ([`DEFAULT_REFRESH`]).
//!   - While the API server does not answer (an outage, a timeout, a server error), the key
//!     read last stays in use. It is also kept on disk next to the node's private keys
//!     ([`PRESHARED_KEYS_FILE`], mode 0600 in a 0700 directory), so an agent restarted during
//!     an outage keeps it too, as it keeps its node's state.
//!   - A Secret that is gone, a key missing from it, a value that is not `wg genpsk` output,
//!     and RBAC refusing the read are answers, not outages: the peer is not enforced (it leaves
//!     WireGuard, like any peer the node cannot enforce), and its status says what to fix.
//!
//! No message here ever quotes a Secret's value.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use wgpin_crds::{
    PinnedNodeStateSpec, SecretKeySelector,
    k8s_openapi::{ByteString, api::core::v1::Secret},
    kube::{self, Api, Client},
};
use zeroize::Zeroize as _;

use crate::{
    metrics::Metrics,
    wireguard::{SecretKey, keys::private_dir},
};

/// How often in-cluster mode reads the Secrets again, by default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// How long the reconcile of a state waits for the first read of a Secret it names.
pub const FIRST_READ_WAIT: Duration = Duration::from_secs(5);
/// How long one read may take before it counts as no answer (kube's client retries a 503
/// with a backoff meanwhile).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Secrets read at once.
const PARALLEL_READS: usize = 8;
/// The file under `<state-dir>/keys/` that keeps the preshared keys read last.
pub const PRESHARED_KEYS_FILE: &str = "preshared-keys.json";

/// Where the data plane gets preshared keys.
pub trait SecretSource: Send + Sync {
    /// The preshared key `reference` names, or why there is none: a message for the peer's
    /// status that says what to fix.
    fn preshared_key(&self, reference: &SecretKeySelector) -> Result<SecretKey, String>;
}

/// Standalone mode's stand-in for Secrets: `<dir>/<namespace>/<name>/<key>`, as a Secret
/// mounted in a pod lays out its keys. Without a directory there is no preshared key.
#[derive(Clone, Debug, Default)]
pub struct SecretsDir {
    dir: Option<PathBuf>,
}

impl SecretsDir {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }
}

impl SecretSource for SecretsDir {
    fn preshared_key(&self, reference: &SecretKeySelector) -> Result<SecretKey, String> {
        let Some(dir) = &self.dir else {
            return Err(format!(
                "preshared key Secret {}/{} is not available: standalone mode reads Secrets from --secrets-dir",
                reference.namespace, reference.name
            ));
        };
        let path = dir
            .join(&reference.namespace)
            .join(&reference.name)
            .join(&reference.key);
        let mut text = std::fs::read_to_string(&path)
            .map_err(|e| format!("preshared key {}: {e}", path.display()))?;
        let key = SecretKey::from_base64(&text);
        text.zeroize();
        key.ok_or_else(|| {
            format!(
                "{} does not hold a preshared key (`wg genpsk` output)",
                path.display()
            )
        })
    }
}

/// One key of one Secret, as a `presharedKeySecretRef` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Reference {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl From<&SecretKeySelector> for Reference {
    fn from(selector: &SecretKeySelector) -> Self {
        Self {
            namespace: selector.namespace.clone(),
            name: selector.name.clone(),
            key: selector.key.clone(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} key {:?}", self.namespace, self.name, self.key)
    }
}

/// Every Secret key `spec` names: what this node's agent may read, and all it reads.
pub fn references(spec: &PinnedNodeStateSpec) -> BTreeSet<Reference> {
    spec.interfaces
        .iter()
        .flat_map(|i| &i.peers)
        .filter_map(|p| p.preshared_key_secret_ref.as_ref())
        .map(Reference::from)
        .collect()
}

/// What one read said about one reference.
#[derive(Debug)]
pub enum Outcome {
    Key(SecretKey),
    /// The API server answered, and there is no key to use: why, and what to fix.
    Refused(String),
    /// No answer (an outage, a timeout, a server error): the key read before stays in use.
    Unavailable(String),
}

/// The preshared key in a Secret's `data`. The message names the keys there are, never a
/// value.
pub fn key_in_data(
    reference: &Reference,
    data: Option<&BTreeMap<String, ByteString>>,
) -> Result<SecretKey, String> {
    let Reference {
        namespace,
        name,
        key,
    } = reference;
    let Some(value) = data.and_then(|d| d.get(key)) else {
        let keys: Vec<&str> = data
            .map(|d| d.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let has = if keys.is_empty() {
            "it has no data".to_string()
        } else {
            format!("it has {}", keys.join(", "))
        };
        return Err(format!(
            "preshared key Secret {namespace}/{name} has no key {key:?} ({has}): add it, or name the right key in the PinnedPeer's presharedKeySecretRef.key"
        ));
    };
    std::str::from_utf8(&value.0)
        .ok()
        .and_then(SecretKey::from_base64)
        .ok_or_else(|| {
            format!(
                "preshared key Secret {namespace}/{name} key {key:?} does not hold a preshared key: it must be `wg genpsk` output (32 bytes in base64, 44 characters), and it holds {} bytes of something else",
                value.0.len()
            )
        })
}

/// What a failed read means for `reference`: a missing Secret and a refusal are answers that
/// say what to fix; anything else is no answer.
pub fn read_failure(reference: &Reference, error: &kube::Error) -> Outcome {
    let Reference {
        namespace,
        name,
        key,
    } = reference;
    match error {
        kube::Error::Api(status) if status.code == 404 => Outcome::Refused(format!(
            "preshared key Secret {namespace}/{name} does not exist: create it in namespace {namespace} with the key {key:?} holding `wg genpsk` output (kubectl -n {namespace} create secret generic {name} --from-file={key}=FILE)"
        )),
        kube::Error::Api(status) if status.code == 403 => Outcome::Refused(format!(
            "the agent may not read preshared key Secret {namespace}/{name} ({}): grant its ServiceAccount `get` on secrets in namespace {namespace} with a Role and RoleBinding there; with the Helm chart, add {namespace} to agent.presharedKeySecretNamespaces, which creates the Role <release>-wgpin-agent-secrets in it",
            if status.message.is_empty() {
                "forbidden"
            } else {
                status.message.as_str()
            }
        )),
        kube::Error::Api(status) => Outcome::Unavailable(format!(
            "preshared key Secret {namespace}/{name} cannot be read: the API server answered {} {}: {}",
            status.code, status.reason, status.message
        )),
        other => Outcome::Unavailable(format!(
            "preshared key Secret {namespace}/{name} cannot be read: {other}"
        )),
    }
}

/// Reads each Secret that `due` names, once (a few at a time), and says what each reference
/// got, in the order of `due`.
pub async fn read_all(client: &Client, due: &BTreeSet<Reference>) -> Vec<(Reference, Outcome)> {
    use futures::StreamExt as _;
    let mut secrets: BTreeMap<(String, String), Vec<Reference>> = BTreeMap::new();
    for reference in due {
        secrets
            .entry((reference.namespace.clone(), reference.name.clone()))
            .or_default()
            .push(reference.clone());
    }
    let mut outcomes: Vec<(Reference, Outcome)> = futures::stream::iter(
        secrets
            .into_iter()
            .map(|((namespace, name), wanted)| read_one(client.clone(), namespace, name, wanted)),
    )
    .buffer_unordered(PARALLEL_READS)
    .flat_map(futures::stream::iter)
    .collect()
    .await;
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    outcomes
}

/// Reads one Secret, for the references to its keys in `wanted`.
async fn read_one(
    client: Client,
    namespace: String,
    name: String,
    wanted: Vec<Reference>,
) -> Vec<(Reference, Outcome)> {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    match tokio::time::timeout(READ_TIMEOUT, api.get(&name)).await {
        Ok(Ok(secret)) => {
            let mut data = secret.data;
            let outcomes = wanted
                .into_iter()
                .map(|reference| {
                    let outcome = match key_in_data(&reference, data.as_ref()) {
                        Ok(key) => Outcome::Key(key),
                        Err(why) => Outcome::Refused(why),
                    };
                    (reference, outcome)
                })
                .collect();
            for value in data.iter_mut().flat_map(|d| d.values_mut()) {
                value.0.zeroize();
            }
            outcomes
        }
        Ok(Err(error)) => wanted
            .into_iter()
            .map(|r| {
                let outcome = read_failure(&r, &error);
                (r, outcome)
            })
            .collect(),
        Err(_) => wanted
            .into_iter()
            .map(|r| {
                let why = format!(
                    "preshared key Secret {namespace}/{name} cannot be read: no answer from the API server within {} s",
                    READ_TIMEOUT.as_secs()
                );
                (r, Outcome::Unavailable(why))
            })
            .collect(),
    }
}

/// A preshared key as [`PRESHARED_KEYS_FILE`] keeps it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kept {
    #[serde(flatten)]
    reference: Reference,
    preshared_key: String,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.preshared_key.zeroize();
    }
}

/// In-cluster mode's preshared keys: what the last read of each Secret key the node's state
/// names gave. Cheap to clone; clones share the keys.
#[derive(Clone, Default)]
pub struct SecretCache {
    entries: Arc<Mutex<BTreeMap<Reference, Result<SecretKey, String>>>>,
    /// Where the keys read are kept across restarts; none keeps them in memory only.
    file: Option<PathBuf>,
}

impl fmt::Debug for SecretCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretCache")
            .field("references", &self.lock().keys().collect::<Vec<_>>())
            .field("file", &self.file)
            .finish()
    }
}

impl SecretCache {
    /// The keys kept in `file` by an earlier run, kept there from now on. A file others could
    /// read, or one that cannot be parsed, is ignored (and replaced at the next read).
    pub fn load(file: PathBuf) -> Self {
        let mut entries = BTreeMap::new();
        match std::fs::metadata(&file) {
            Ok(metadata) if metadata.permissions().mode() & 0o077 != 0 => tracing::warn!(
                "ignoring {}: others may read it (mode {:o}); preshared keys are kept at 0600",
                file.display(),
                metadata.permissions().mode() & 0o777
            ),
            Ok(_) => match std::fs::read(&file) {
                Ok(mut bytes) => {
                    match serde_json::from_slice::<Vec<Kept>>(&bytes) {
                        Ok(kept) => {
                            for entry in kept {
                                if let Some(key) = SecretKey::from_base64(&entry.preshared_key) {
                                    entries.insert(entry.reference.clone(), Ok(key));
                                }
                            }
                        }
                        Err(e) => tracing::warn!("ignoring {}: {e}", file.display()),
                    }
                    bytes.zeroize();
                }
                Err(e) => tracing::warn!("ignoring {}: {e}", file.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("ignoring {}: {e}", file.display()),
        }
        if !entries.is_empty() {
            tracing::info!(
                count = entries.len(),
                "using the preshared keys read before this start until the Secrets are read again"
            );
        }
        Self {
            entries: Arc::new(Mutex::new(entries)),
            file: Some(file),
        }
    }

    /// A cache that keeps nothing on disk.
    pub fn in_memory() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Reference, Result<SecretKey, String>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether every reference in `wanted` has been read (with a key or a reason).
    pub fn covers(&self, wanted: &BTreeSet<Reference>) -> bool {
        let entries = self.lock();
        wanted.iter().all(|r| entries.contains_key(r))
    }

    /// The references in `wanted` never read.
    pub fn unread(&self, wanted: &BTreeSet<Reference>) -> BTreeSet<Reference> {
        let entries = self.lock();
        wanted
            .iter()
            .filter(|r| !entries.contains_key(*r))
            .cloned()
            .collect()
    }

    /// Takes in what a read gave, forgets the references no longer `wanted`, and keeps the keys
    /// on disk. Returns whether any peer's key or reason changed.
    pub fn apply(&self, wanted: &BTreeSet<Reference>, outcomes: Vec<(Reference, Outcome)>) -> bool {
        let mut entries = self.lock();
        let count = entries.len();
        entries.retain(|r, _| wanted.contains(r));
        let mut changed = entries.len() != count;
        for (reference, outcome) in outcomes {
            if !wanted.contains(&reference) {
                continue;
            }
            let previous = entries.get(&reference);
            let next = match outcome {
                Outcome::Key(key) => {
                    if previous.is_none_or(|p| p.as_ref() != Ok(&key)) {
                        tracing::info!(secret = %reference, "preshared key read");
                    }
                    Ok(key)
                }
                Outcome::Refused(why) => {
                    if previous.is_none_or(|p| p.as_ref().err() != Some(&why)) {
                        tracing::warn!(secret = %reference, "{why}");
                    }
                    Err(why)
                }
                // No answer: the last one stands (a key stays in use, a reason stays given).
                Outcome::Unavailable(why) => match previous {
                    Some(Ok(_)) => {
                        tracing::warn!(secret = %reference, "{why}; keeping the preshared key read before");
                        continue;
                    }
                    Some(Err(_)) => continue,
                    None => {
                        tracing::warn!(secret = %reference, "{why}");
                        Err(why)
                    }
                },
            };
            if previous != Some(&next) {
                changed = true;
                entries.insert(reference, next);
            }
        }
        if changed {
            self.save(&entries);
        }
        changed
    }

    /// Writes the keys read to the file (atomically, mode 0600), or removes it when there are
    /// none. A failure is logged: the keys stay in use in memory.
    fn save(&self, entries: &BTreeMap<Reference, Result<SecretKey, String>>) {
        let Some(file) = &self.file else {
            return;
        };
        let kept: Vec<Kept> = entries
            .iter()
            .filter_map(|(reference, value)| {
                Some(Kept {
                    reference: reference.clone(),
                    preshared_key: STANDARD.encode(value.as_ref().ok()?.as_bytes()),
                })
            })
            .collect();
        let result = if kept.is_empty() {
            match std::fs::remove_file(file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            write_private(file, &kept)
        };
        if let Err(e) = result {
            tracing::error!(
                "cannot keep the preshared keys in {}: {e}; they stay in use until the agent stops",
                file.display()
            );
        }
    }
}

/// Writes `kept` to `file` through a temporary file created with mode 0600, in a directory
/// only root can enter.
fn write_private(file: &Path, kept: &[Kept]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        private_dir(dir)?;
    }
    let temporary = file.with_extension("json.tmp");
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut bytes = serde_json::to_vec(kept).map_err(std::io::Error::other)?;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
    bytes.zeroize();
    written?;
    std::fs::rename(&temporary, file)
}

impl SecretSource for SecretCache {
    fn preshared_key(&self, reference: &SecretKeySelector) -> Result<SecretKey, String> {
        match self.lock().get(&Reference::from(reference)) {
            Some(value) => value.clone(),
            None => Err(format!(
                "preshared key Secret {}/{} has not been read yet",
                reference.namespace, reference.name
            )),
        }
    }
}

/// Reads the Secrets `wanted` names into `cache`: the ones never read as soon as they are
/// wanted, all of them every `refresh`. Bumps `read` when a key or a reason changed. Returns
/// when `wanted`'s sender is gone.
pub async fn fetch_loop(
    client: Client,
    cache: SecretCache,
    mut wanted: tokio::sync::watch::Receiver<BTreeSet<Reference>>,
    read: tokio::sync::watch::Sender<u64>,
    refresh: Duration,
    metrics: Arc<Metrics>,
) {
    let mut last_full: Option<Instant> = None;
    loop {
        let references = wanted.borrow_and_update().clone();
        let due = if last_full.is_none_or(|at| at.elapsed() >= refresh) {
            last_full = Some(Instant::now());
            references.clone()
        } else {
            cache.unread(&references)
        };
        let outcomes = read_all(&client, &due).await;
        let unanswered = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Unavailable(_)))
            .count();
        metrics.api_errors.inc_by(unanswered as u64);
        if cache.apply(&references, outcomes) {
            read.send_modify(|n| *n = n.wrapping_add(1));
        }
        let next = last_full.map_or(refresh, |at| refresh.saturating_sub(at.elapsed()));
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() {
                return;
            },
            () = tokio::time::sleep(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{
        k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta},
        kube::api::PostParams,
    };
    use wgpin_test_apiserver::{Failure, FakeApiServer};

    use super::*;

    fn reference(namespace: &str, name: &str, key: &str) -> Reference {
        Reference {
            namespace: namespace.into(),
            name: name.into(),
            key: key.into(),
        }
    }

    fn secret(namespace: &str, name: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn psk() -> (SecretKey, String) {
        let key = SecretKey::generate().expect("random");
        let text = format!("{}\n", STANDARD.encode(key.as_bytes()));
        (key, text)
    }

    fn message(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Refused(why) | Outcome::Unavailable(why) => why,
            Outcome::Key(_) => "a key",
        }
    }

    #[test]
    fn a_key_is_wg_genpsk_output_and_no_message_quotes_a_value() {
        let r = reference("vpn", "laptop-psk", "presharedKey");
        let (key, text) = psk();
        let data: BTreeMap<String, ByteString> = [
            ("presharedKey".to_string(), ByteString(text.into_bytes())),
            ("other".to_string(), ByteString(b"x".to_vec())),
        ]
        .into();
        assert_eq!(key_in_data(&r, Some(&data)), Ok(key));

        let missing = key_in_data(&reference("vpn", "laptop-psk", "psk"), Some(&data))
            .expect_err("no such key");
        assert!(
            missing.contains("no key \"psk\"")
                && missing.contains("it has other, presharedKey")
                && missing.contains("presharedKeySecretRef.key"),
            "{missing}"
        );
        let empty = key_in_data(&r, None).expect_err("no data");
        assert!(empty.contains("it has no data"), "{empty}");

        let secret_value = "hunter2-is-not-a-key";
        let bad: BTreeMap<String, ByteString> = [(
            "presharedKey".to_string(),
            ByteString(secret_value.as_bytes().to_vec()),
        )]
        .into();
        let malformed = key_in_data(&r, Some(&bad)).expect_err("not a key");
        assert!(
            malformed.contains("`wg genpsk` output") && malformed.contains("20 bytes"),
            "{malformed}"
        );
        assert!(!malformed.contains(secret_value), "{malformed}");
        // 32 raw bytes are not base64 text.
        let raw: BTreeMap<String, ByteString> =
            [("presharedKey".to_string(), ByteString(vec![7; 32]))].into();
        assert!(key_in_data(&r, Some(&raw)).is_err());
    }

    #[test]
    fn a_missing_secret_and_a_refusal_say_what_to_fix_anything_else_is_no_answer() {
        let r = reference("vpn", "laptop-psk", "presharedKey");
        let api = |code: u16, reason: &str, message: &str| {
            kube::Error::Api(
                kube::core::Status::failure(message, reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        let missing = read_failure(
            &r,
            &api(404, "NotFound", "secrets \"laptop-psk\" not found"),
        );
        assert!(matches!(missing, Outcome::Refused(_)));
        assert!(
            message(&missing).contains("vpn/laptop-psk does not exist")
                && message(&missing).contains("create secret generic laptop-psk"),
            "{}",
            message(&missing)
        );
        let forbidden = read_failure(
            &r,
            &api(
                403,
                "Forbidden",
                "secrets \"laptop-psk\" is forbidden: User \"system:serviceaccount:wgpin-system:wgpin-agent\" cannot get resource \"secrets\" in the namespace \"vpn\"",
            ),
        );
        assert!(matches!(forbidden, Outcome::Refused(_)));
        for part in [
            "may not read preshared key Secret vpn/laptop-psk",
            "system:serviceaccount:wgpin-system:wgpin-agent",
            "`get` on secrets in namespace vpn",
            "agent.presharedKeySecretNamespaces",
            "wgpin-agent-secrets",
        ] {
            assert!(
                message(&forbidden).contains(part),
                "{}",
                message(&forbidden)
            );
        }
        for code in [401, 429, 500, 503] {
            let outcome = read_failure(&r, &api(code, "ServiceUnavailable", "down"));
            assert!(matches!(outcome, Outcome::Unavailable(_)), "{code}");
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn reads_exactly_the_secrets_named_by_get_and_keeps_keys_through_an_outage() {
        let rt = runtime();
        let server = FakeApiServer::new();
        let client = rt.block_on(async { server.client() });
        let (laptop, laptop_text) = psk();
        let (phone, phone_text) = psk();
        rt.block_on(async {
            for (namespace, object) in [
                (
                    "vpn",
                    secret(
                        "vpn",
                        "keys",
                        &[
                            ("laptop", laptop_text.as_bytes()),
                            ("phone", phone_text.as_bytes()),
                        ],
                    ),
                ),
                (
                    "vpn",
                    secret("vpn", "not-named", &[("laptop", laptop_text.as_bytes())]),
                ),
                ("vpn", secret("vpn", "bad", &[("presharedKey", b"nope")])),
            ] {
                Api::<Secret>::namespaced(client.clone(), namespace)
                    .create(&PostParams::default(), &object)
                    .await
                    .expect("create");
            }
        });
        let wanted: BTreeSet<Reference> = [
            reference("vpn", "keys", "laptop"),
            reference("vpn", "keys", "phone"),
            reference("vpn", "gone", "presharedKey"),
            reference("vpn", "bad", "presharedKey"),
            reference("locked", "psk", "presharedKey"),
        ]
        .into();
        server.fail_next(Failure {
            method: None,
            path_contains: "/namespaces/locked/secrets/psk".into(),
            status: 403,
        });
        let cache = SecretCache::in_memory();
        let before = server.requests().len();
        let outcomes = rt.block_on(read_all(&client, &wanted));
        assert!(cache.apply(&wanted, outcomes));
        let selector = |r: &Reference| SecretKeySelector {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            key: r.key.clone(),
        };
        let resolve = |namespace: &str, name: &str, key: &str| {
            cache.preshared_key(&selector(&reference(namespace, name, key)))
        };
        assert_eq!(resolve("vpn", "keys", "laptop"), Ok(laptop.clone()));
        assert_eq!(resolve("vpn", "keys", "phone"), Ok(phone.clone()));
        assert!(
            resolve("vpn", "gone", "presharedKey").is_err_and(|e| e.contains("does not exist"))
        );
        assert!(resolve("vpn", "bad", "presharedKey").is_err_and(|e| e.contains("`wg genpsk`")));
        assert!(
            resolve("locked", "psk", "presharedKey")
                .is_err_and(|e| e.contains("agent.presharedKeySecretNamespaces"))
        );
        assert!(
            resolve("vpn", "not-named", "laptop").is_err_and(|e| e.contains("not been read yet"))
        );

        // One get per Secret named (two keys of one Secret: one read), nothing else. (The
        // refused read of locked/psk is answered before the server records requests.)
        let mut calls: Vec<(&str, Option<String>, Option<String>)> = server.requests()[before..]
            .iter()
            .map(|c| (c.verb, c.namespace.clone(), c.name.clone()))
            .collect();
        calls.sort();
        let expected: Vec<(&str, Option<String>, Option<String>)> =
            [("vpn", "bad"), ("vpn", "gone"), ("vpn", "keys")]
                .into_iter()
                .map(|(ns, name)| ("get", Some(ns.to_string()), Some(name.to_string())))
                .collect();
        assert_eq!(calls, expected);

        // The API server goes away: the keys read stay, the reasons stay, nothing changes.
        server.set_unavailable(true);
        let outcomes = rt.block_on(read_all(&client, &wanted));
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Unavailable(_)))
        );
        assert!(!cache.apply(&wanted, outcomes), "an outage changes nothing");
        assert_eq!(resolve("vpn", "keys", "laptop"), Ok(laptop.clone()));
        assert!(
            resolve("vpn", "gone", "presharedKey").is_err_and(|e| e.contains("does not exist"))
        );
        server.set_unavailable(false);

        // A reference no longer wanted is forgotten.
        let fewer: BTreeSet<Reference> = [reference("vpn", "keys", "laptop")].into();
        assert!(cache.apply(&fewer, Vec::new()));
        assert!(resolve("vpn", "keys", "phone").is_err_and(|e| e.contains("not been read yet")));
        assert!(cache.covers(&fewer));
        assert_eq!(cache.unread(&wanted).len(), 4);
    }

    #[test]
    fn a_secret_never_read_during_an_outage_says_so_and_a_deleted_one_is_dropped() {
        let cache = SecretCache::in_memory();
        let r = reference("vpn", "psk", "presharedKey");
        let wanted: BTreeSet<Reference> = [r.clone()].into();
        assert!(!cache.covers(&wanted));
        assert!(cache.apply(
            &wanted,
            vec![(r.clone(), Outcome::Unavailable("no answer".into()))]
        ));
        assert!(cache.covers(&wanted), "an answer of sorts: the peer waits");
        let (key, _) = psk();
        assert!(cache.apply(&wanted, vec![(r.clone(), Outcome::Key(key.clone()))]));
        assert!(!cache.apply(&wanted, vec![(r.clone(), Outcome::Key(key))]));
        assert!(cache.apply(&wanted, vec![(r.clone(), Outcome::Refused("gone".into()))]));
        let selector = SecretKeySelector {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            key: r.key.clone(),
        };
        assert_eq!(cache.preshared_key(&selector), Err("gone".to_string()));
    }

    #[test]
    fn keys_read_are_kept_at_0600_for_the_next_start_and_removed_when_no_longer_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys").join(PRESHARED_KEYS_FILE);
        let r = reference("vpn", "psk", "presharedKey");
        let wanted: BTreeSet<Reference> = [r.clone()].into();
        let (key, _) = psk();
        let cache = SecretCache::load(file.clone());
        assert!(!cache.covers(&wanted));
        cache.apply(&wanted, vec![(r.clone(), Outcome::Key(key.clone()))]);
        let mode = |path: &Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().expect("dir")), 0o700);

        let restarted = SecretCache::load(file.clone());
        assert!(restarted.covers(&wanted));
        let selector = SecretKeySelector {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            key: r.key.clone(),
        };
        assert_eq!(restarted.preshared_key(&selector), Ok(key));

        // Readable by others: not trusted.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(!SecretCache::load(file.clone()).covers(&wanted));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");

        restarted.apply(&BTreeSet::new(), Vec::new());
        assert!(!file.exists(), "no key named, none kept");
    }
}
