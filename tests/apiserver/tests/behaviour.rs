//! The in-memory API server behaves like the real one where controllers depend on it.

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use wgpin_crds::{PinnedPeer, PinnedPeerSpec, PinnedPeerStatus};
use wgpin_test_apiserver::{Failure, FakeApiServer, resource_of};

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()},
        "data": {"key": "value"},
    }))
    .expect("config map")
}

fn peer(name: &str) -> PinnedPeer {
    PinnedPeer::new(
        name,
        PinnedPeerSpec {
            interface: "gateway".into(),
            node_selector: None,
            public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
            allowed_ips: vec!["198.51.100.2/32".into()],
            sources: vec!["203.0.113.0/24".into()],
            allow_any_source: false,
            endpoint: None,
            persistent_keepalive_seconds: None,
            preshared_key_secret_ref: None,
        },
    )
}

#[tokio::test]
async fn crud_selectors_and_conflicts() {
    let server = FakeApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let created = api
        .create(&PostParams::default(), &config_map("a", &[("app", "x")]))
        .await
        .expect("create");
    api.create(&PostParams::default(), &config_map("b", &[("app", "y")]))
        .await
        .expect("create");
    let duplicate = api
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .expect_err("exists");
    assert!(
        matches!(duplicate, kube::Error::Api(ref s) if s.code == 409),
        "{duplicate:?}"
    );

    let selected = api
        .list(&ListParams::default().labels("app=x"))
        .await
        .expect("list");
    assert_eq!(selected.items.len(), 1);
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .expect("list");
    assert_eq!(by_name.items[0].metadata.name.as_deref(), Some("b"));

    // A replace with the version read earlier works once; the second one is stale.
    let mut changed = created.clone();
    changed.data = Some([("key".to_string(), "new".to_string())].into());
    api.replace("a", &PostParams::default(), &changed)
        .await
        .expect("replace");
    let stale = api
        .replace("a", &PostParams::default(), &changed)
        .await
        .expect_err("stale");
    assert!(
        matches!(stale, kube::Error::Api(ref s) if s.code == 409),
        "{stale:?}"
    );

    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"other": "1"}})),
    )
    .await
    .expect("merge");
    let a = api.get("a").await.expect("get");
    assert_eq!(a.data.as_ref().map(|d| d.len()), Some(2));

    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let missing = api.get("a").await.expect_err("gone");
    assert!(
        matches!(missing, kube::Error::Api(ref s) if s.code == 404),
        "{missing:?}"
    );
}

#[tokio::test]
async fn status_is_a_subresource_and_generation_follows_the_spec() {
    let server = FakeApiServer::new();
    let api: Api<PinnedPeer> = Api::all(server.client());
    let params = PatchParams::apply("test-operator");
    api.patch("laptop", &params, &Patch::Apply(peer("laptop")))
        .await
        .expect("apply creates");
    let first = api.get("laptop").await.expect("get");
    assert_eq!(first.metadata.generation, Some(1));

    let status = json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "status": PinnedPeerStatus { key_prefix: Some("xTIBA5rb…".into()), ..Default::default() }});
    api.patch_status("laptop", &params, &Patch::Apply(&status))
        .await
        .expect("status");
    let with_status = api.get("laptop").await.expect("get");
    assert_eq!(
        with_status.metadata.generation,
        Some(1),
        "a status write is no spec change"
    );
    assert_eq!(
        with_status
            .status
            .as_ref()
            .and_then(|s| s.key_prefix.clone())
            .as_deref(),
        Some("xTIBA5rb…")
    );

    let mut changed = peer("laptop");
    changed.spec.sources = vec!["203.0.113.0/25".into()];
    changed.status = Some(PinnedPeerStatus::default());
    api.patch("laptop", &params, &Patch::Apply(&changed))
        .await
        .expect("apply again");
    let after = api.get("laptop").await.expect("get");
    assert_eq!(after.metadata.generation, Some(2));
    assert!(
        after.status.is_some_and(|s| s.key_prefix.is_some()),
        "the main resource cannot write the status"
    );

    let before = server.revision();
    api.patch("laptop", &params, &Patch::Apply(&changed))
        .await
        .expect("same apply");
    assert_eq!(
        server.revision(),
        before,
        "a no-op write makes no new version"
    );

    let missing_manager = api
        .patch("laptop", &PatchParams::default(), &Patch::Apply(&changed))
        .await;
    assert!(missing_manager.is_err(), "apply needs a field manager");
    let writes = server.writes();
    assert!(
        writes
            .iter()
            .all(|w| w.resource == resource_of::<PinnedPeer>())
    );
}

#[tokio::test]
async fn finalizers_hold_a_deleted_object_until_they_are_gone() {
    let server = FakeApiServer::new();
    let api: Api<PinnedPeer> = Api::all(server.client());
    let mut object = peer("held");
    object.metadata.finalizers = Some(vec!["wgpin.io/cleanup".into()]);
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
    api.delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let held = api.get("held").await.expect("still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release");
    assert!(
        api.get("held").await.is_err(),
        "gone with its last finalizer"
    );
}

#[tokio::test]
async fn watches_deliver_events_in_order_and_expire_with_410() {
    let server = FakeApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    // The watcher runs on its own, as a controller's would; it starts with an empty list.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let watching = watcher(api.clone(), watcher::Config::default()).applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(watching);
        while let Ok(Some(object)) = watching.try_next().await {
            let _ = seen_tx.send((
                object.metadata.name.unwrap_or_default(),
                object.data.map(|d| d.len()).unwrap_or(0),
            ));
        }
    });
    while server.watchers() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    api.create(&PostParams::default(), &config_map("one", &[]))
        .await
        .expect("create");
    api.create(&PostParams::default(), &config_map("two", &[]))
        .await
        .expect("create");
    api.patch(
        "one",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .expect("patch");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
            .await
            .expect("in time");
        seen.push(next.expect("watcher alive"));
    }
    assert_eq!(
        seen,
        [
            ("one".to_string(), 1),
            ("two".to_string(), 1),
            ("one".to_string(), 2)
        ]
    );

    // A watch from a version the server no longer keeps gets 410 Gone.
    server.compact();
    let mut old = api
        .watch(&WatchParams::default(), "1")
        .await
        .expect("watch opens")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .expect("in time")
    {
        Some(Ok(WatchEvent::Error(error))) => assert_eq!(error.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn injected_failures_reach_the_client_once() {
    let server = FakeApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    server.fail_next(Failure {
        method: None,
        path_contains: "configmaps".into(),
        status: 500,
    });
    let failed = api
        .list(&ListParams::default())
        .await
        .expect_err("injected");
    assert!(
        matches!(failed, kube::Error::Api(ref s) if s.code == 500),
        "{failed:?}"
    );
    api.list(&ListParams::default()).await.expect("only once");
}

#[tokio::test]
async fn an_outage_refuses_every_request_and_ends_open_watches_until_it_is_over() {
    let server = FakeApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    api.create(&PostParams::default(), &config_map("one", &[]))
        .await
        .expect("create");
    let mut watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .expect("watch opens")
        .boxed();
    // The initial ADDED arrives, then the outage ends the stream.
    assert!(matches!(watch.next().await, Some(Ok(WatchEvent::Added(_)))));
    server.set_unavailable(true);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = watch.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch ends when the outage starts");
    match api.get("one").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 503),
        other => panic!("expected 503, got {other:?}"),
    }
    server.set_unavailable(false);
    assert_eq!(
        api.get("one").await.expect("back").data.map(|d| d.len()),
        Some(1)
    );
}
