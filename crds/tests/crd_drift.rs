//! The CRDs in the chart are generated from the Rust types; this fails when they drift apart
//! (a type changed without `cargo run -p wgpin-crds --bin crdgen`, or a file edited by hand).

use std::{collections::BTreeSet, path::Path};

use wgpin_crds::crd;

#[test]
fn chart_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crd::CHART_CRD_DIR);
    let generated = crd::generated_files().expect("CRDs serialize");
    let mut problems = Vec::new();
    for (name, contents) in &generated {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(committed) if committed == *contents => {}
            Ok(_) => problems.push(format!("{name} differs from the Rust types")),
            Err(e) => problems.push(format!("{name} cannot be read: {e}")),
        }
    }
    let expected: BTreeSet<&str> = generated.iter().map(|(name, _)| name.as_str()).collect();
    for entry in std::fs::read_dir(&dir).expect("chart CRD directory exists") {
        let name = entry
            .expect("directory entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if !expected.contains(name.as_str()) {
            problems.push(format!("{name} is not generated from any type; remove it"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nrun `cargo run -p wgpin-crds --bin crdgen` and commit {}",
        problems.join("\n"),
        crd::CHART_CRD_DIR
    );
}

#[test]
fn crds_are_cluster_scoped_in_one_group_and_version() {
    for crd in crd::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.group, wgpin_crds::API_GROUP, "{name}");
        assert_eq!(crd.spec.scope, "Cluster", "{name}");
        let versions: Vec<_> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(versions, [wgpin_crds::API_VERSION], "{name}");
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name} has a status subresource"
        );
    }
}

#[test]
fn the_charts_access_list_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(wgpin_crds::access::CHART_ACCESS_FILE);
    let generated = wgpin_crds::access::generated_file().expect("serializes");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from wgpin_crds::access; run `cargo run -p wgpin-crds --bin crdgen` and commit it",
        path.display()
    );
}
