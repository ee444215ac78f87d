//! CRD generation. The YAML under `charts/wgpin/crds/` is produced from the Rust types by the
//! `crdgen` binary and never edited by hand; `crds/tests/crd_drift.rs` fails when it drifts.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{PinnedInterface, PinnedNodeState, PinnedPeer};

/// Directory, relative to the repository root, that holds the generated CRDs.
pub const CHART_CRD_DIR: &str = "charts/wgpin/crds";

const HEADER: &str = "# Generated from the Rust types in crds/ by `cargo run -p wgpin-crds --bin crdgen`.\n\
                      # Do not edit: change the types and regenerate.\n";

/// Every CRD of the API.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        PinnedInterface::crd(),
        PinnedPeer::crd(),
        PinnedNodeState::crd(),
    ]
}

/// File name of a CRD inside [`CHART_CRD_DIR`]: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML document for one CRD, with the do-not-edit header.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!("{HEADER}{}", serde_saphyr::to_string(crd)?))
}

/// Every generated file as (file name, contents).
pub fn generated_files() -> Result<Vec<(String, String)>, serde_saphyr::SerializeError> {
    all()
        .iter()
        .map(|crd| Ok((file_name(crd), to_yaml(crd)?)))
        .collect()
}

/// The `openAPIV3Schema` of a CRD's first (only) version as JSON, for [`crate::admission`].
pub fn schema_of(crd: &CustomResourceDefinition) -> Option<serde_json::Value> {
    let schema = crd
        .spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?;
    serde_json::to_value(schema).ok()
}
