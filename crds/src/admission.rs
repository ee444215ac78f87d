//! What the API server would say about an object, without an API server.
//!
//! Checks an object (as JSON) against the generated CRD schema: types, required fields,
//! unknown fields (as `kubectl`'s default strict field validation does), patterns, lengths,
//! bounds, enums, `x-kubernetes-list-type` uniqueness, and every CEL rule through kube's CEL
//! interpreter. The standalone agent uses it on the YAML files it reads; the tests use it to
//! prove that the CRD's rules and the Rust rules in [`crate::validate`] agree.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::cel::Validator;
use serde_json::Value;

use crate::{crd, validate::FieldError};

/// The schemas of every wgpin kind, ready to check objects.
pub struct Admission {
    schemas: BTreeMap<String, Value>,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new()
    }
}

impl Admission {
    /// Loads the schemas generated from the Rust types.
    pub fn new() -> Self {
        let schemas = crd::all()
            .iter()
            .filter_map(|c| Some((c.spec.names.kind.clone(), crd::schema_of(c)?)))
            .collect();
        Self { schemas }
    }

    /// The kinds this admission knows.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.schemas.keys().map(String::as_str)
    }

    /// Checks one object as `kubectl apply` would have the API server check it on create.
    pub fn check(&self, object: &Value) -> Result<(), Vec<FieldError>> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let expected_api_version = format!("{}/{}", crate::API_GROUP, crate::API_VERSION);
        let Some(schema) = self
            .schemas
            .get(kind)
            .filter(|_| api_version == expected_api_version)
        else {
            let kinds: Vec<&str> = self.kinds().collect();
            return Err(vec![FieldError::new(
                "kind",
                format!(
                    "{api_version}/{kind} is not a wgpin object; expected apiVersion {expected_api_version} and a kind among {}",
                    kinds.join(", ")
                ),
            )]);
        };

        let mut errors = Vec::new();
        check_metadata(object.get("metadata"), &mut errors);
        let mut root = schema.clone();
        // The root's metadata schema is `type: object`; its fields are the API server's own.
        if let Some(properties) = root.get_mut("properties").and_then(Value::as_object_mut) {
            properties.remove("metadata");
        }
        let mut without_metadata = object.clone();
        if let Some(map) = without_metadata.as_object_mut() {
            map.remove("metadata");
            map.remove("apiVersion");
            map.remove("kind");
        }
        check_structure(&root, &without_metadata, "", &mut errors);
        if errors.is_empty() {
            // CEL rules see only structurally valid data, as on the API server.
            if let Err(cel_errors) = Validator::new().validate(schema, object, None) {
                errors.extend(cel_errors.into_vec().into_iter().map(|e| {
                    let message = if e.message.is_empty() {
                        format!("failed rule: {}", e.rule)
                    } else {
                        e.message
                    };
                    FieldError::new(e.field_path, message)
                }));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// What the API server keeps of an object that passed [`Admission::check`]: every null value
/// in an object dropped, as the API server prunes nulls of fields that are not nullable (none
/// of wgpin's are); a null for a field the schema does not know was refused by the check. The
/// Rust types then decode what is left: `addresses:` left empty in YAML (a null) means no
/// addresses, as it does to `kubectl apply`, rather than a type error (found by fuzzing).
pub fn prune_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(prune_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(prune_nulls),
        _ => {}
    }
}

fn check_metadata(metadata: Option<&Value>, errors: &mut Vec<FieldError>) {
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    match name {
        None => errors.push(FieldError::new(
            "metadata.name",
            "Required value: every object needs a name",
        )),
        Some(name) => {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                });
            if !valid {
                errors.push(FieldError::new(
                    "metadata.name",
                    format!("{name:?} is not a valid name: lower-case letters, digits, '-' and '.', at most 253 characters"),
                ));
            }
        }
    }
    if metadata.and_then(|m| m.get("namespace")).is_some() {
        errors.push(FieldError::new(
            "metadata.namespace",
            "wgpin objects are cluster-scoped; remove the namespace",
        ));
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Walks `value` along `schema`, collecting what a structural-schema API server would reject.
fn check_structure(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let at = |p: &str| {
        if p.is_empty() {
            "<root>".to_string()
        } else {
            p.to_string()
        }
    };
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        && schema.get("properties").is_none()
    {
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !matches!(type_name(value), "integer" | "string") {
            errors.push(FieldError::new(
                at(path),
                format!(
                    "Invalid value: must be an integer or a string, not {}",
                    type_name(value)
                ),
            ));
        }
        return;
    }
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == expected || (expected == "number" && actual == "integer");
        if !ok {
            errors.push(FieldError::new(
                at(path),
                format!("Invalid value: must be of type {expected}, not {actual}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let options: Vec<String> = allowed
            .iter()
            .filter(|v| !v.is_null())
            .map(Value::to_string)
            .collect();
        errors.push(FieldError::new(
            at(path),
            format!(
                "Unsupported value: {value}; supported values: {}",
                options.join(", ")
            ),
        ));
    }
    match value {
        Value::Object(map) => check_object(schema, map, path, errors),
        Value::Array(items) => check_array(schema, items, path, errors),
        Value::String(s) => check_string(schema, s, &at(path), errors),
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                errors.push(FieldError::new(
                    at(path),
                    format!("Invalid value: {n}: should be greater than or equal to {min}"),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                errors.push(FieldError::new(
                    at(path),
                    format!("Invalid value: {n}: should be less than or equal to {max}"),
                ));
            }
        }
        _ => {}
    }
}

fn check_object(
    schema: &Value,
    map: &serde_json::Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            // A null is pruned by the API server, so it counts as missing.
            if map.get(field).is_none_or(Value::is_null) {
                errors.push(FieldError::new(join(path, field), "Required value"));
            }
        }
    }
    for (field, value) in map {
        let field_path = join(path, field);
        match (
            properties.and_then(|p| p.get(field)),
            schema.get("additionalProperties"),
        ) {
            // A null for a known field is dropped by the API server: the field is absent. An
            // unknown one is pruned and reported whatever its value, null too (found by
            // fuzzing: the Rust decoding named it, this check did not); a null map value is
            // checked against the map's value type.
            (Some(_), _) if value.is_null() => {}
            (Some(field_schema), _) => check_structure(field_schema, value, &field_path, errors),
            (None, Some(additional)) if additional.is_object() => {
                check_structure(additional, value, &field_path, errors)
            }
            (None, Some(Value::Bool(true))) => {}
            _ => {
                let known: Vec<&str> = properties
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                errors.push(FieldError::new(
                    field_path,
                    format!(
                        "unknown field \"{field}\"; known fields here: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
    }
}

fn check_array(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && items.len() as u64 > max
    {
        errors.push(FieldError::new(
            at,
            format!("Too many: {}: must have at most {max} items", items.len()),
        ));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        errors.push(FieldError::new(
            at,
            format!("Too few: {}: must have at least {min} items", items.len()),
        ));
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            let mut seen = BTreeSet::new();
            for (i, item) in items.iter().enumerate() {
                if !seen.insert(item.to_string()) {
                    errors.push(FieldError::new(
                        format!("{path}[{i}]"),
                        format!("Duplicate value: {item}"),
                    ));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = BTreeSet::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<String> = keys
                    .iter()
                    .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
                    .collect();
                if !seen.insert(key.clone()) {
                    errors.push(FieldError::new(
                        format!("{path}[{i}]"),
                        format!("Duplicate value: {}", key.join(",")),
                    ));
                }
            }
        }
        _ => {}
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            check_structure(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
}

fn check_string(schema: &Value, s: &str, path: &str, errors: &mut Vec<FieldError>) {
    let chars = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        errors.push(FieldError::new(
            path,
            format!("Too long: may not be more than {max} characters"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        errors.push(FieldError::new(
            path,
            format!("Invalid value: should be at least {min} characters long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(pattern) {
            Ok(re) if re.is_match(s) => {}
            Ok(_) => errors.push(FieldError::new(
                path,
                format!("Invalid value: {s:?}: should match '{pattern}'"),
            )),
            Err(e) => errors.push(FieldError::new(
                path,
                format!("schema pattern {pattern:?} does not compile: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn peer(spec: Value) -> Value {
        json!({"apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "metadata": {"name": "p"}, "spec": spec})
    }

    fn fields(result: Result<(), Vec<FieldError>>) -> Vec<String> {
        result
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn unknown_kind_and_fields_are_named() {
        let admission = Admission::new();
        let wrong = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        assert_eq!(fields(admission.check(&wrong)), ["kind"]);
        let typo = peer(json!({
            "interface": "wg", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            "allowedIPs": [], "sources": ["192.0.2.0/24"], "source": ["x"]
        }));
        assert_eq!(fields(admission.check(&typo)), ["spec.source"]);
        // A misspelt field set to null is unknown too, as the Rust decoding says.
        let null_typo = peer(json!({
            "interface": "wg", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            "allowedIPs": [], "sources": ["192.0.2.0/24"], "source": null, "endpoint": null
        }));
        assert_eq!(fields(admission.check(&null_typo)), ["spec.source"]);
        let decoded = crate::validate::decode::<crate::PinnedPeer>(&null_typo);
        let named: Vec<String> = decoded
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(named, ["spec.source"]);
    }

    /// A null for a known field is no value (the API server prunes it), then the Rust types
    /// decode the pruned object; a null for a required one is missing.
    #[test]
    fn nulls_are_absent_fields() {
        let admission = Admission::new();
        let mut interface = json!({
            "apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedInterface", "metadata": {"name": "i"},
            "spec": {"nodeSelector": {"matchLabels": null}, "interfaceName": "wgpin0",
                     "listenPort": 51820, "addresses": null, "mtu": null},
        });
        assert_eq!(fields(admission.check(&interface)), Vec::<String>::new());
        assert!(crate::validate::decode::<crate::PinnedInterface>(&interface).is_err());
        prune_nulls(&mut interface);
        let decoded = crate::validate::decode::<crate::PinnedInterface>(&interface);
        let spec = decoded.expect("decodes once pruned").spec;
        assert!(spec.addresses.is_empty() && spec.mtu.is_none());
        assert!(spec.validate().is_ok());
        let required = peer(json!({
            "interface": "wg", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
            "allowedIPs": [], "sources": null
        }));
        assert_eq!(fields(admission.check(&required)), ["spec.sources"]);
    }

    #[test]
    fn types_bounds_and_required_fields() {
        let admission = Admission::new();
        let bad = peer(json!({
            "interface": "wg", "allowedIPs": "198.51.100.2/32", "sources": ["192.0.2.0/24"],
            "persistentKeepaliveSeconds": 70000
        }));
        let mut got = fields(admission.check(&bad));
        got.sort();
        assert_eq!(
            got,
            [
                "spec.allowedIPs",
                "spec.persistentKeepaliveSeconds",
                "spec.publicKey"
            ]
        );
    }
}
