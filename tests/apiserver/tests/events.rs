//! Events (events.k8s.io/v1) as controllers write them: namespaced creates with
//! `generateName`, and the merge patch that moves an EventSeries on.

use k8s_openapi::{
    api::events::v1::Event,
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use wgpin_test_apiserver::{FakeApiServer, resource_of};

fn event(generate_name: &str, note: &str) -> Event {
    Event {
        metadata: ObjectMeta {
            generate_name: Some(generate_name.into()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(
            Timestamp::from_second(1_700_000_000).expect("timestamp"),
        )),
        reason: Some("SourceViolation".into()),
        action: Some("EnforcePin".into()),
        note: Some(note.into()),
        type_: Some("Warning".into()),
        reporting_controller: Some("wgpin.io/operator".into()),
        reporting_instance: Some("operator-0".into()),
        ..Event::default()
    }
}

#[tokio::test]
async fn generate_name_gives_distinct_names_in_the_namespace() {
    let server = FakeApiServer::new();
    let api: Api<Event> = Api::namespaced(server.client(), "wgpin-system");
    let first = api
        .create(&PostParams::default(), &event("alice.", "one"))
        .await
        .expect("create");
    let second = api
        .create(&PostParams::default(), &event("alice.", "two"))
        .await
        .expect("create");
    let first_name = first.metadata.name.clone().expect("a name");
    let second_name = second.metadata.name.clone().expect("a name");
    assert!(first_name.starts_with("alice.") && first_name.len() == "alice.".len() + 5);
    assert!(second_name.starts_with("alice."));
    assert_ne!(first_name, second_name);
    assert_eq!(first.metadata.namespace.as_deref(), Some("wgpin-system"));
    assert!(first.metadata.uid.is_some());

    // Stored under the generated name, in that namespace only.
    let stored = server
        .get(&resource_of::<Event>(), Some("wgpin-system"), &second_name)
        .expect("stored");
    assert_eq!(stored["note"], "two");
    assert_eq!(stored["metadata"]["generateName"], "alice.");
    assert!(
        server
            .get(&resource_of::<Event>(), Some("default"), &second_name)
            .is_none()
    );
    let listed = api.list(&ListParams::default()).await.expect("list");
    assert_eq!(listed.items.len(), 2);
    let writes = server.writes();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[0].method, "create");
    assert_eq!(writes[0].name, first_name);
    assert_eq!(writes[0].namespace.as_deref(), Some("wgpin-system"));

    // A long prefix is cut to 58 characters before the suffix, as the API server does.
    let long = format!("{}.", "p".repeat(100));
    let created = api
        .create(&PostParams::default(), &event(&long, "long"))
        .await
        .expect("create");
    let name = created.metadata.name.expect("a name");
    assert_eq!(name.len(), 63);
    assert!(name.starts_with(&"p".repeat(58)));
}

#[tokio::test]
async fn without_name_or_generate_name_a_create_is_refused() {
    let server = FakeApiServer::new();
    let api: Api<Event> = Api::namespaced(server.client(), "default");
    let mut nameless = event("x.", "none");
    nameless.metadata.generate_name = None;
    let error = api
        .create(&PostParams::default(), &nameless)
        .await
        .expect_err("refused");
    assert!(
        matches!(error, kube::Error::Api(ref s) if s.code == 422),
        "{error:?}"
    );
    assert!(server.writes().is_empty());
}

#[tokio::test]
async fn a_merge_patch_moves_an_event_series_on() {
    let server = FakeApiServer::new();
    let api: Api<Event> = Api::namespaced(server.client(), "default");
    let created = api
        .create(&PostParams::default(), &event("bob.", "once"))
        .await
        .expect("create");
    let name = created.metadata.name.expect("a name");
    let patch = json!({"series": {"count": 2, "lastObservedTime": "2023-11-14T22:14:00.000000Z"}});
    let patched = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    let series = patched.series.expect("series");
    assert_eq!(series.count, 2);
    assert_eq!(patched.note.as_deref(), Some("once"));
    assert_eq!(server.writes().len(), 2);
    assert_eq!(server.writes()[1].method, "update");
}
