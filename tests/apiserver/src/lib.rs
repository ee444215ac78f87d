//! An in-memory Kubernetes API server behind `kube::Client`, for tests that cannot have a real
//! one (no kube-apiserver or envtest binaries on our machines).
//!
//! It serves the subset of the REST API that wgpin's operator and agent use, for any resource,
//! core or custom, namespaced or cluster-scoped:
//!
//! - get, list (label and field selectors), watch (from a resourceVersion, with bookmarks,
//!   initial events, `timeoutSeconds`, and `410 Gone` for a version older than the kept history);
//! - create (also with `generateName`), replace (`409 Conflict` on a stale `resourceVersion`),
//!   merge patch and server-side apply (as a merge of the applied object; field ownership is not
//!   tracked), on the object or its `status` subresource (writes to one never change the other);
//! - delete with finalizers: `deletionTimestamp` is set, and the object goes when its last
//!   finalizer is removed;
//! - `metadata.generation` moves on spec changes only, `resourceVersion` on every write;
//! - injected failures ([`FakeApiServer::fail_next`]) and outages
//!   ([`FakeApiServer::set_unavailable`]) for error-path tests.
//!
//! Every write is recorded ([`FakeApiServer::writes`]) so tests can assert what was written, and
//! how often.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use serde_json::{Value, json};

mod over_http;
pub use over_http::{kubeconfig, serve_http};

/// Watch events older than this many writes are forgotten; a watch from before them gets 410.
const HISTORY: usize = 10_000;

/// A resource type: API group ("" for core), version and plural.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub plural: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ObjectKey {
    namespace: Option<String>,
    name: String,
}

#[derive(Clone, Debug)]
struct Event {
    revision: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

/// One write the server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub method: String,
    pub resource: Resource,
    pub namespace: Option<String>,
    pub name: String,
    pub subresource: Option<String>,
}

/// One request as RBAC sees it: a verb on a resource (and subresource), in a namespace, by
/// name when it names one. `over_http` tells a process's requests (through [`serve_http`])
/// from this process's own (through [`FakeApiServer::client`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub verb: &'static str,
    pub resource: Resource,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub over_http: bool,
}

impl ApiCall {
    /// The resource as an RBAC rule names it: `plural` or `plural/subresource`.
    pub fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource.plural),
            None => self.resource.plural.clone(),
        }
    }
}

/// The header [`serve_http`] adds, so that requests from processes can be told apart.
pub(crate) const OVER_HTTP_HEADER: &str = "x-wgpin-test-over-http";

/// A failure to inject: the next request matching `method` (and `path_contains`) gets `status`.
#[derive(Clone, Debug)]
pub struct Failure {
    pub method: Option<Method>,
    pub path_contains: String,
    pub status: u16,
}

#[derive(Default)]
struct State {
    revision: u64,
    uid: u64,
    objects: BTreeMap<Resource, BTreeMap<ObjectKey, Value>>,
    history: VecDeque<Event>,
    /// Events at or below this revision have been dropped from the history.
    compacted: u64,
    writes: Vec<Write>,
    requests: Vec<ApiCall>,
    failures: VecDeque<Failure>,
    /// Names handed out for `generateName` so far.
    generated: u64,
    /// An outage: every request gets 503 and open watches end.
    unavailable: bool,
}

/// The server. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::broadcast::Sender<u64>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// RFC 7386 JSON merge patch: what `PATCH` with `application/merge-patch+json` does, and what
/// this server uses for server-side apply. Public for tests that build objects from a base and
/// a change.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Everything but metadata and status: what `generation` follows.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(key)?, decode(value)?))
        })
        .collect()
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
fn labels_match(selector: &str, object: &Value) -> bool {
    let labels = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object);
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((key, value)) = term.split_once("!=") {
            label(key) != Some(value)
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(key) == Some(value)
        } else if let Some(key) = term.strip_prefix('!') {
            label(key).is_none()
        } else {
            label(term).is_some()
        }
    })
}

/// `metadata.name=x`, `metadata.namespace=y`, comma-separated.
fn fields_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (path, value, equal) = match term.split_once("!=") {
            Some((path, value)) => (path, value, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((path, value)) => (path, value, true),
                None => return false,
            },
        };
        let pointer = format!("/{}", path.replace('.', "/"));
        let actual = object.pointer(&pointer).and_then(Value::as_str);
        (actual == Some(value)) == equal
    })
}

/// The parts of a request path.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some(namespace.to_string()), rest)
        }
        rest => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Target {
        resource: Resource {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
        },
        namespace,
        name,
        subresource,
    })
}

/// Five characters from the API server's alphabet for generated names (no vowels, no
/// look-alikes), for the `n`th generated name.
fn generated_suffix(mut n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let base = ALPHABET.len() as u64;
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % base) as usize];
            n /= base;
            char::from(c)
        })
        .collect()
}

fn api_version(resource: &Resource) -> String {
    if resource.group.is_empty() {
        resource.version.clone()
    } else {
        format!("{}/{}", resource.group, resource.version)
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl State {
    fn record(&mut self, resource: &Resource, kind: &'static str, object: &Value) {
        self.history.push_back(Event {
            revision: self.revision,
            resource: resource.clone(),
            kind,
            object: object.clone(),
        });
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.revision;
            }
        }
    }

    fn stamp(&mut self, object: &mut Value) {
        self.revision += 1;
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert(
                "resourceVersion".into(),
                Value::String(self.revision.to_string()),
            );
        }
    }

    /// Stores `object` as the new version of `key`, or removes it when it is being deleted and
    /// has no finalizers left. Returns what is stored (or was, when removed).
    fn store(
        &mut self,
        resource: &Resource,
        key: ObjectKey,
        mut object: Value,
        created: bool,
    ) -> Value {
        self.stamp(&mut object);
        let finalizers_left = object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let deleting = object.pointer("/metadata/deletionTimestamp").is_some();
        let collection = self.objects.entry(resource.clone()).or_default();
        if deleting && !finalizers_left {
            collection.remove(&key);
            self.record(resource, "DELETED", &object);
        } else {
            collection.insert(key, object.clone());
            self.record(
                resource,
                if created { "ADDED" } else { "MODIFIED" },
                &object,
            );
        }
        object
    }
}

impl FakeApiServer {
    pub fn new() -> Self {
        let (changed, _) = tokio::sync::broadcast::channel(1024);
        Self {
            state: Arc::new(Mutex::new(State::default())),
            changed,
        }
    }

    /// A client talking to this server, with `default` as its default namespace.
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Every write accepted so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// Every request served so far, reads included, in order (for RBAC checks).
    pub fn requests(&self) -> Vec<ApiCall> {
        self.lock().requests.clone()
    }

    /// Forgets the recorded writes.
    pub fn clear_writes(&self) {
        self.lock().writes.clear();
    }

    /// The current resourceVersion of the whole store.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// How many watches are open: tests wait for a controller's watch before they write.
    pub fn watchers(&self) -> usize {
        self.changed.receiver_count()
    }

    /// Starts or ends an outage: while it lasts every request gets `503 Service Unavailable`
    /// and every open watch ends, as when the API server is down or cut off.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
        self.notify();
    }

    /// Makes the next matching request fail with `status`.
    pub fn fail_next(&self, failure: Failure) {
        self.lock().failures.push_back(failure);
    }

    /// Drops the watch history up to now: a watch from an older version gets 410 Gone.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted = state.revision;
        state.history.clear();
    }

    /// Every object stored (status included), with its resource: for tests that search them
    /// all.
    pub fn objects(&self) -> Vec<(Resource, Value)> {
        self.lock()
            .objects
            .iter()
            .flat_map(|(resource, collection)| {
                collection
                    .values()
                    .map(move |object| (resource.clone(), object.clone()))
            })
            .collect()
    }

    /// An object, as stored.
    pub fn get(&self, resource: &Resource, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = ObjectKey {
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        };
        self.lock()
            .objects
            .get(resource)
            .and_then(|c| c.get(&key))
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
        };
        let path = parts.uri.path().to_string();
        {
            let mut state = self.lock();
            if state.unavailable {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the API server is unavailable (an outage the test made)",
                );
            }
            let hit = state.failures.iter().position(|f| {
                f.method.as_ref().is_none_or(|m| *m == parts.method)
                    && path.contains(&f.path_contains)
            });
            if let Some(index) = hit
                && let Some(failure) = state.failures.remove(index)
            {
                let code = StatusCode::from_u16(failure.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return status(
                    code,
                    "InjectedFailure",
                    format!("injected failure on {path}"),
                );
            }
        }
        let Some(target) = parse_path(&path) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no route for {path}"),
            );
        };
        let params = query(&parts.uri);
        let verb = match (&parts.method, &target.name) {
            (&Method::GET, None)
                if params.get("watch").is_some_and(|w| w == "true" || w == "1") =>
            {
                "watch"
            }
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        self.lock().requests.push(ApiCall {
            verb,
            resource: target.resource.clone(),
            subresource: target.subresource.clone(),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            over_http: parts.headers.contains_key(OVER_HTTP_HEADER),
        });
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        match (&parts.method, &target.name) {
            (&Method::GET, None)
                if params.get("watch").is_some_and(|w| w == "true" || w == "1") =>
            {
                self.watch(target, params)
            }
            (&Method::GET, None) => self.list(&target, &params),
            (&Method::GET, Some(name)) => {
                match self.get(&target.resource, target.namespace.as_deref(), name) {
                    Some(object) => respond(StatusCode::OK, &object),
                    None => status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{} {name:?} not found", target.resource.plural),
                    ),
                }
            }
            (&Method::POST, None) => self.create(&target, &body),
            (&Method::PUT, Some(name)) => self.replace(&target, name.clone(), &body),
            (&Method::PATCH, Some(name)) => {
                self.patch(&target, name.clone(), &body, &content_type, &params)
            }
            (&Method::DELETE, Some(name)) => self.delete(&target, name.clone()),
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{} {path}", parts.method),
            ),
        }
    }

    fn list(&self, target: &Target, params: &BTreeMap<String, String>) -> Response<Body> {
        let state = self.lock();
        let items: Vec<Value> = state
            .objects
            .get(&target.resource)
            .map(|collection| {
                collection
                    .iter()
                    .filter(|(key, _)| {
                        target.namespace.is_none() || key.namespace == target.namespace
                    })
                    .map(|(_, object)| object.clone())
                    .filter(|o| {
                        params
                            .get("labelSelector")
                            .is_none_or(|s| labels_match(s, o))
                    })
                    .filter(|o| {
                        params
                            .get("fieldSelector")
                            .is_none_or(|s| fields_match(s, o))
                    })
                    .collect()
            })
            .unwrap_or_default();
        respond(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version(&target.resource), "kind": "List",
                "metadata": {"resourceVersion": state.revision.to_string()},
                "items": items,
            }),
        )
    }

    fn write(&self, method: &str, target: &Target, name: &str) {
        let write = Write {
            method: method.to_string(),
            resource: target.resource.clone(),
            namespace: target.namespace.clone(),
            name: name.to_string(),
            subresource: target.subresource.clone(),
        };
        self.lock().writes.push(write);
    }

    fn notify(&self) {
        let revision = self.lock().revision;
        let _ = self.changed.send(revision);
    }

    fn create(&self, target: &Target, body: &[u8]) -> Response<Body> {
        let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
        };
        let name = match object.pointer("/metadata/name").and_then(Value::as_str) {
            Some(name) => name.to_string(),
            // `generateName`: the prefix (cut to 58 characters, as the API server does) and
            // five characters, here from a counter so that tests see the same names each run.
            None => match object
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
            {
                Some(prefix) => {
                    let prefix: String = prefix.chars().take(58).collect();
                    let name = {
                        let mut state = self.lock();
                        state.generated += 1;
                        format!("{prefix}{}", generated_suffix(state.generated))
                    };
                    object["metadata"]["name"] = Value::String(name.clone());
                    name
                }
                None => {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value",
                    );
                }
            },
        };
        let key = ObjectKey {
            namespace: target.namespace.clone(),
            name: name.clone(),
        };
        let response = {
            let mut state = self.lock();
            if state
                .objects
                .get(&target.resource)
                .is_some_and(|c| c.contains_key(&key))
            {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} {name:?} already exists", target.resource.plural),
                );
            }
            state.uid += 1;
            let uid = format!("00000000-0000-0000-0000-{:012}", state.uid);
            if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.insert("uid".into(), Value::String(uid));
                metadata.insert("creationTimestamp".into(), Value::String(now()));
                metadata.insert("generation".into(), json!(1));
                if let Some(namespace) = &target.namespace {
                    metadata.insert("namespace".into(), Value::String(namespace.clone()));
                }
            }
            let stored = state.store(&target.resource, key, object, true);
            respond(StatusCode::CREATED, &stored)
        };
        self.write("create", target, &name);
        self.notify();
        response
    }

    /// Applies `change` to the stored object (or to nothing, when `create` allows it) under the
    /// rules of the object or its status subresource.
    fn update(
        &self,
        target: &Target,
        name: String,
        create: bool,
        change: impl FnOnce(Option<&Value>) -> Value,
    ) -> Response<Body> {
        let key = ObjectKey {
            namespace: target.namespace.clone(),
            name: name.clone(),
        };
        let response = {
            let mut state = self.lock();
            let existing = state
                .objects
                .get(&target.resource)
                .and_then(|c| c.get(&key))
                .cloned();
            if existing.is_none() && !create {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name:?} not found", target.resource.plural),
                );
            }
            let mut updated = change(existing.as_ref());
            let Some(existing) = existing else {
                drop(state);
                let body = updated.to_string();
                return self.create(target, body.as_bytes());
            };
            if let Some(version) = updated
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                && Some(version)
                    != existing
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
            {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("the object has been modified; resourceVersion {version} is stale"),
                );
            }
            // One side of the object at a time: the status subresource writes only the status,
            // the object itself everything but the status.
            let mut merged = existing.clone();
            if target.subresource.as_deref() == Some("status") {
                match updated.get("status") {
                    Some(status) => merged["status"] = status.clone(),
                    None => {
                        if let Some(map) = merged.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            } else {
                if let Some(status) = existing.get("status") {
                    updated["status"] = status.clone();
                } else if let Some(map) = updated.as_object_mut() {
                    map.remove("status");
                }
                // The server owns these.
                for field in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                    "namespace",
                ] {
                    match existing.pointer(&format!("/metadata/{field}")) {
                        Some(value) => updated["metadata"][field] = value.clone(),
                        None => {
                            if let Some(metadata) =
                                updated.get_mut("metadata").and_then(Value::as_object_mut)
                            {
                                metadata.remove(field);
                            }
                        }
                    }
                }
                if spec_part(&updated) != spec_part(&existing) {
                    let generation = existing
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(1);
                    updated["metadata"]["generation"] = json!(generation + 1);
                }
                merged = updated;
            }
            if merged == existing {
                // No change, no new version (as the API server does for no-op writes).
                return respond(StatusCode::OK, &existing);
            }
            let stored = state.store(&target.resource, key, merged, false);
            respond(StatusCode::OK, &stored)
        };
        if response.status() == StatusCode::OK {
            self.write("update", target, &name);
            self.notify();
        }
        response
    }

    fn replace(&self, target: &Target, name: String, body: &[u8]) -> Response<Body> {
        let Ok(object) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
        };
        self.update(target, name, false, |_| object)
    }

    fn patch(
        &self,
        target: &Target,
        name: String,
        body: &[u8],
        content_type: &str,
        params: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let patch: Value = match serde_json::from_slice(body) {
            Ok(patch) => patch,
            Err(_) => match std::str::from_utf8(body)
                .ok()
                .and_then(|t| serde_saphyr::from_str(t).ok())
            {
                Some(patch) => patch,
                None => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "patch is neither JSON nor YAML",
                    );
                }
            },
        };
        let apply = content_type.starts_with("application/apply-patch");
        if apply && params.get("fieldManager").is_none_or(String::is_empty) {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "fieldManager is required for apply",
            );
        }
        if !apply && !content_type.starts_with("application/merge-patch") {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("{content_type} is not served by the test API server; use merge or apply"),
            );
        }
        // Server-side apply creates what does not exist; a merge patch does not.
        self.update(target, name, apply, move |existing| {
            let mut object = existing.cloned().unwrap_or_else(|| json!({}));
            merge(&mut object, &patch);
            object
        })
    }

    fn delete(&self, target: &Target, name: String) -> Response<Body> {
        let key = ObjectKey {
            namespace: target.namespace.clone(),
            name: name.clone(),
        };
        let response = {
            let mut state = self.lock();
            let Some(mut object) = state
                .objects
                .get(&target.resource)
                .and_then(|c| c.get(&key))
                .cloned()
            else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name:?} not found", target.resource.plural),
                );
            };
            if object.pointer("/metadata/deletionTimestamp").is_none() {
                object["metadata"]["deletionTimestamp"] = Value::String(now());
            }
            let stored = state.store(&target.resource, key, object, false);
            respond(StatusCode::OK, &stored)
        };
        self.write("delete", target, &name);
        self.notify();
        response
    }

    fn watch(&self, target: Target, params: BTreeMap<String, String>) -> Response<Body> {
        let changes = self.changed.subscribe();
        let (start, initial, gone, kind) = {
            let state = self.lock();
            let requested: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let matches = |object: &Value| {
                params
                    .get("labelSelector")
                    .is_none_or(|s| labels_match(s, object))
                    && params
                        .get("fieldSelector")
                        .is_none_or(|s| fields_match(s, object))
            };
            let initial: Vec<Value> =
                if requested == 0 || params.get("sendInitialEvents").is_some_and(|v| v == "true") {
                    state
                        .objects
                        .get(&target.resource)
                        .map(|c| {
                            c.iter()
                                .filter(|(key, _)| {
                                    target.namespace.is_none() || key.namespace == target.namespace
                                })
                                .map(|(_, o)| o.clone())
                                .filter(|o| matches(o))
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
            let start = if requested == 0 {
                state.revision
            } else {
                requested
            };
            let kind = state
                .objects
                .get(&target.resource)
                .and_then(|c| c.values().next())
                .and_then(|o| o.get("kind"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            (
                start,
                initial,
                requested != 0 && requested < state.compacted,
                kind,
            )
        };
        let bookmarks = params
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let send_initial_end = params.get("sendInitialEvents").is_some_and(|v| v == "true");
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(300));
        let line = |kind: &str, object: &Value| {
            Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
        };

        let mut first: Vec<Bytes> = Vec::new();
        if gone {
            first.push(line(
                "ERROR",
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                        "message": format!("too old resource version: {start}"), "code": 410}),
            ));
        } else {
            first.extend(initial.iter().map(|o| line("ADDED", o)));
            if bookmarks || send_initial_end {
                let mut bookmark = json!({
                    "apiVersion": api_version(&target.resource), "kind": kind,
                    "metadata": {"resourceVersion": start.to_string()},
                });
                if send_initial_end {
                    bookmark["metadata"]["annotations"] =
                        json!({"k8s.io/initial-events-end": "true"});
                }
                first.push(line("BOOKMARK", &bookmark));
            }
        }
        let server = self.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let resource = target.resource;
        let namespace = target.namespace;
        let later = futures::stream::unfold(
            (start, gone, changes),
            move |(mut seen, gone, mut changes)| {
                let server = server.clone();
                let resource = resource.clone();
                let namespace = namespace.clone();
                let params = params.clone();
                async move {
                    if gone {
                        return None;
                    }
                    loop {
                        let pending: Vec<Event> = {
                            let state = server.lock();
                            if state.unavailable {
                                return None;
                            }
                            state
                                .history
                                .iter()
                                .filter(|e| e.revision > seen && e.resource == resource)
                                .cloned()
                                .collect()
                        };
                        let mut out = Vec::new();
                        for event in pending {
                            seen = event.revision;
                            let in_namespace = namespace.is_none()
                                || event
                                    .object
                                    .pointer("/metadata/namespace")
                                    .and_then(Value::as_str)
                                    == namespace.as_deref();
                            let selected = params
                                .get("labelSelector")
                                .is_none_or(|s| labels_match(s, &event.object))
                                && params
                                    .get("fieldSelector")
                                    .is_none_or(|s| fields_match(s, &event.object));
                            if in_namespace && selected {
                                out.extend_from_slice(&line(event.kind, &event.object));
                            }
                        }
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), (seen, false, changes)));
                        }
                        match tokio::time::timeout_at(deadline, changes.recv()).await {
                            Ok(Ok(_))
                            | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                                continue;
                            }
                            _ => return None,
                        }
                    }
                }
            },
        );
        let stream = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>)).chain(later);
        let body = BodyExt::boxed(StreamBody::new(
            stream.map(|chunk| chunk.map(http_body::Frame::data)),
        ));
        let mut response = Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The resource of a kube type, for [`FakeApiServer::get`] and [`Write`] comparisons.
pub fn resource_of<K: kube::Resource<DynamicType = ()>>() -> Resource {
    Resource {
        group: K::group(&()).to_string(),
        version: K::version(&()).to_string(),
        plural: K::plural(&()).to_string(),
    }
}
