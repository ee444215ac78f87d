//! wgpin objects from a directory of YAML files, checked as the API server would check them.
//!
//! This is how the agent runs without a cluster (standalone mode): the same `PinnedInterface`
//! and `PinnedPeer` manifests a user would `kubectl apply`, read from files. Without an API server
//! to refuse bad objects, every object goes through the CRD schema and CEL rules
//! ([`Admission`]) and then the Rust validation the operator uses, and every problem is reported
//! with its file, object and field.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use serde_json::Value;
use wgpin_crds::{
    PinnedInterface, PinnedPeer,
    admission::{Admission, prune_nulls},
    kube::ResourceExt,
    validate::{FieldError, decode},
};

/// The objects read from a directory.
#[derive(Debug, Default)]
pub struct Manifests {
    pub interfaces: Vec<PinnedInterface>,
    pub peers: Vec<PinnedPeer>,
}

/// A problem with one document of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `Kind/name` when the document got that far.
    pub object: Option<String>,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        f.write_str(":")?;
        for error in &self.errors {
            write!(f, "\n  - {error}")?;
        }
        Ok(())
    }
}

/// Reading a directory failed as a whole (it is missing, or a file cannot be read).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} holds no .yaml or .yml file; point --dir at the directory with the PinnedInterface and PinnedPeer manifests"
    )]
    Empty(PathBuf),
}

/// Reads every `.yaml`/`.yml` file under `dir` (recursively, in path order). Valid objects are
/// returned; every invalid document is reported and left out, as the API server would refuse it.
pub fn load_dir(dir: &Path) -> Result<(Manifests, Vec<ManifestError>), LoadError> {
    let files = yaml_files(dir)?;
    if files.is_empty() {
        return Err(LoadError::Empty(dir.to_path_buf()));
    }
    let admission = Admission::new();
    let mut manifests = Manifests::default();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Io {
            path: file.clone(),
            source,
        })?;
        let documents: Vec<Value> = match serde_saphyr::from_multiple(&text) {
            Ok(documents) => documents,
            Err(e) => {
                errors.push(ManifestError {
                    file: file.clone(),
                    document: 1,
                    object: None,
                    errors: vec![FieldError::new("<yaml>", e.to_string())],
                });
                continue;
            }
        };
        for (index, document) in documents.into_iter().enumerate() {
            if document.is_null() {
                continue;
            }
            let mut fail = |object: Option<String>, field_errors: Vec<FieldError>| {
                errors.push(ManifestError {
                    file: file.clone(),
                    document: index + 1,
                    object,
                    errors: field_errors,
                })
            };
            let kind = document
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let name = document
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let label = Some(format!("{kind}/{name}"));
            if let Err(field_errors) = admission.check(&document) {
                fail(label, field_errors);
                continue;
            }
            // What the API server would store: nulls pruned.
            let mut document = document;
            prune_nulls(&mut document);
            if !seen.insert((kind.clone(), name.clone())) {
                fail(
                    label,
                    vec![FieldError::new(
                        "metadata.name",
                        format!(
                            "another {kind} named {name:?} was read before; names are unique per kind"
                        ),
                    )],
                );
                continue;
            }
            let decoded = match kind.as_str() {
                "PinnedInterface" => decode::<PinnedInterface>(&document).map(|object| {
                    manifests.interfaces.push(object);
                }),
                "PinnedPeer" => decode::<PinnedPeer>(&document).map(|object| {
                    manifests.peers.push(object);
                }),
                // PinnedNodeState is rendered, never read from files.
                _ => Err(vec![FieldError::new(
                    "kind",
                    format!(
                        "{kind} is written by wgpin, not read from manifests; give PinnedInterface and PinnedPeer objects"
                    ),
                )]),
            };
            if let Err(field_errors) = decoded {
                fail(label, field_errors);
            }
        }
    }
    manifests.interfaces.sort_by_key(ResourceExt::name_any);
    manifests.peers.sort_by_key(ResourceExt::name_any);
    Ok((manifests, errors))
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(std::fs::DirEntry::path);
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            files.extend(yaml_files(&path)?);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write fixture");
    }

    const INTERFACE: &str = "apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {name: gateway}\nspec: {nodeSelector: {}, interfaceName: wgpin0, listenPort: 51820}\n";

    #[test]
    fn reports_each_bad_document_with_file_object_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "interface.yaml", INTERFACE);
        write(
            dir.path(),
            "peers.yaml",
            "apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {name: good}\n\
             spec: {interface: gateway, publicKey: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=, allowedIPs: [198.51.100.2/32], sources: [203.0.113.0/24]}\n\
             ---\n\
             apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {name: open}\n\
             spec: {interface: gateway, publicKey: TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=, allowedIPs: [198.51.100.3/32], sources: [0.0.0.0/0]}\n\
             ---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stray}\n",
        );
        write(dir.path(), "notes.txt", "not yaml, not read");
        let (manifests, errors) = load_dir(dir.path()).expect("directory loads");
        assert_eq!(manifests.interfaces.len(), 1);
        let peers: Vec<String> = manifests.peers.iter().map(ResourceExt::name_any).collect();
        assert_eq!(peers, ["good"]);

        assert_eq!(errors.len(), 2, "{errors:#?}");
        let open = errors[0].to_string();
        assert!(
            open.contains("peers.yaml (document 2) PinnedPeer/open"),
            "{open}"
        );
        assert!(
            open.contains("spec.sources: sources contains a catch-all prefix"),
            "{open}"
        );
        assert!(
            errors[1].to_string().contains("document 3"),
            "{}",
            errors[1]
        );
        assert_eq!(errors[1].errors[0].field, "kind");
    }

    #[test]
    fn duplicate_names_and_broken_yaml_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.yaml", INTERFACE);
        write(dir.path(), "b.yaml", INTERFACE);
        write(dir.path(), "c.yml", "kind: [unclosed\n");
        let (manifests, errors) = load_dir(dir.path()).expect("directory loads");
        assert_eq!(manifests.interfaces.len(), 1, "the first one read wins");
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].to_string().contains("b.yaml"), "{}", errors[0]);
        assert_eq!(errors[0].errors[0].field, "metadata.name");
        assert_eq!(errors[1].errors[0].field, "<yaml>");
    }

    /// A field left empty in YAML is a null: no value, as `kubectl apply` takes it (found by
    /// fuzzing: the interface was refused with "invalid type: null, expected a sequence").
    #[test]
    fn an_empty_field_is_no_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "interface.yaml",
            "apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {name: gateway}\n\
             spec:\n  nodeSelector: {}\n  interfaceName: wgpin0\n  listenPort: 51820\n  addresses:\n  mtu:\n",
        );
        let (manifests, errors) = load_dir(dir.path()).expect("directory loads");
        assert!(errors.is_empty(), "{errors:#?}");
        assert!(manifests.interfaces[0].spec.addresses.is_empty());
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load_dir(dir.path()), Err(LoadError::Empty(_))));
        assert!(matches!(
            load_dir(&dir.path().join("missing")),
            Err(LoadError::Io { .. })
        ));
    }
}
