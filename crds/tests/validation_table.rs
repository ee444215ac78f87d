//! Runs every case of `fixtures/validation.yaml` through both validators: the CRD schema with
//! its CEL rules (what the API server enforces) and the Rust validation (what the operator and
//! the standalone agent enforce). A rule changed on one side only fails here.

use serde::Deserialize;
use serde_json::Value;
use wgpin_crds::{
    PinnedInterface, PinnedPeer,
    admission::Admission,
    validate::{FieldError, decode},
};
use wgpin_test_apiserver::merge;

#[derive(Deserialize)]
struct Table {
    bases: serde_json::Map<String, Value>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    expect: Expect,
    #[serde(default)]
    field: Option<String>,
    spec: Value,
}

#[derive(Deserialize, Debug, PartialEq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Accept,
    Reject,
}

/// The Rust side: decode into the typed object, then validate its spec.
fn rust_verdict(object: &Value) -> Result<(), Vec<FieldError>> {
    match object["kind"].as_str() {
        Some("PinnedPeer") => {
            let peer: PinnedPeer = decode(object)?;
            peer.spec.validate().map(drop)
        }
        Some("PinnedInterface") => {
            let interface: PinnedInterface = decode(object)?;
            interface.spec.validate().map(drop)
        }
        other => panic!("no Rust validation for kind {other:?}"),
    }
}

fn names(field: &str, errors: &[FieldError]) -> bool {
    errors.iter().any(|e| {
        e.field == field
            || e.field.starts_with(&format!("{field}."))
            || e.field.starts_with(&format!("{field}["))
    })
}

#[test]
fn schema_cel_and_rust_agree_on_every_case() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/validation.yaml"
    ))
    .expect("fixture table readable");
    let table: Table = serde_saphyr::from_str(&text).expect("fixture table parses");
    let admission = Admission::new();
    let mut failures = Vec::new();
    let (mut accepted, mut rejected) = (0, 0);

    for case in &table.cases {
        let mut spec = table
            .bases
            .get(&case.kind)
            .cloned()
            .unwrap_or_else(|| panic!("no base for {}", case.kind));
        merge(&mut spec, &case.spec);
        let object = serde_json::json!({
            "apiVersion": "wgpin.io/v1alpha1",
            "kind": case.kind,
            "metadata": {"name": "case"},
            "spec": spec,
        });

        let by_schema = admission.check(&object).err().unwrap_or_default();
        let by_rust = rust_verdict(&object).err().unwrap_or_default();

        // Shown with --nocapture: the messages users would read.
        println!("{} ({:?})", case.name, case.expect);
        for (side, errors) in [("schema+CEL", &by_schema), ("Rust", &by_rust)] {
            for error in errors.iter() {
                println!("    {side:>10}: {error}");
            }
            let verdict = if errors.is_empty() {
                Expect::Accept
            } else {
                Expect::Reject
            };
            if verdict != case.expect {
                failures.push(format!(
                    "{:?} [{side}]: expected {:?}, got {verdict:?}: {errors:?}",
                    case.name, case.expect
                ));
            } else if let Some(field) = &case.field
                && !names(field, errors)
            {
                failures.push(format!(
                    "{:?} [{side}]: rejected, but not at {field}: {errors:?}",
                    case.name
                ));
            }
        }
        match case.expect {
            Expect::Accept => accepted += 1,
            Expect::Reject => rejected += 1,
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        accepted >= 5 && rejected >= 30,
        "the table lost cases: {accepted} accept, {rejected} reject"
    );
}
