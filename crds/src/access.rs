//! What the operator and the agent may do with the Kubernetes API: one list, in the code.
//!
//! The chart's RBAC rules must equal these lists (`charts/wgpin/tests/check_rendered.py`
//! compares the rendered Roles with `charts/wgpin/tests/access.json`, which `crdgen` writes from
//! here), and the tests check that every call the binaries make against the in-memory API
//! server is allowed here, and that everything allowed here is used. So neither the chart nor
//! the code can drift alone.

use serde::Serialize;

/// Where a rule applies, which decides the Role that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// Cluster-scoped resources: a ClusterRole.
    Cluster,
    /// The namespace the component runs in (the operator's Lease): a Role there.
    ReleaseNamespace,
    /// The namespace Events are written to (`--event-namespace`): a Role there.
    EventNamespace,
    /// The namespaces chosen to hold preshared-key Secrets (the chart's
    /// `agent.presharedKeySecretNamespaces`): a Role in each, none by default.
    SecretNamespaces,
}

/// One RBAC rule: verbs on one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Access {
    pub group: &'static str,
    /// `resource` or `resource/subresource`.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Verbs the API server checks without the client sending them: a server-side apply that
    /// creates its object is also authorized as a `create`.
    pub implied_verbs: &'static [&'static str],
    pub scope: Scope,
    /// Limited to this object; [`LEASE_NAME`] stands for the configured Lease name.
    pub resource_name: Option<&'static str>,
    /// Why the component needs it.
    pub why: &'static str,
}

/// Placeholder for the leader-election Lease's name, which is configurable.
pub const LEASE_NAME: &str = "{leaseName}";

const WGPIN: &str = "wgpin.io";

/// The operator's rules.
pub const OPERATOR: &[Access] = &[
    Access {
        group: WGPIN,
        resource: "pinnedinterfaces",
        verbs: &["list", "watch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "render input, read through a watch cache",
    },
    Access {
        group: WGPIN,
        resource: "pinnedpeers",
        verbs: &["list", "watch", "patch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "render input; patch adds and releases the wgpin.io/node-cleanup finalizer",
    },
    Access {
        group: WGPIN,
        resource: "pinnedinterfaces/status",
        verbs: &["patch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "nodes and peers per interface, and whether it could be rendered, by server-side apply",
    },
    Access {
        group: WGPIN,
        resource: "pinnedpeers/status",
        verbs: &["patch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "the rolled-up status, by server-side apply",
    },
    Access {
        group: WGPIN,
        resource: "pinnednodestates",
        verbs: &["list", "watch", "patch", "delete"],
        implied_verbs: &["create"],
        scope: Scope::Cluster,
        resource_name: None,
        why: "each node's state, by server-side apply (which creates it the first time); deleted when the node runs nothing",
    },
    Access {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "node names and labels for the node selectors (metadata only)",
    },
    Access {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create"],
        implied_verbs: &[],
        scope: Scope::ReleaseNamespace,
        resource_name: None,
        why: "the first replica creates the leader-election Lease (a create cannot be limited to a name)",
    },
    Access {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "update"],
        implied_verbs: &[],
        scope: Scope::ReleaseNamespace,
        resource_name: Some(LEASE_NAME),
        why: "read, renew and take over the leader-election Lease",
    },
    Access {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
        implied_verbs: &[],
        scope: Scope::EventNamespace,
        resource_name: None,
        why: "Events on PinnedPeers: violations, invalid specs",
    },
];

/// The agent's rules.
pub const AGENT: &[Access] = &[
    Access {
        group: WGPIN,
        resource: "pinnednodestates",
        verbs: &["list", "watch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "its own node's state (a field selector on the name: RBAC cannot narrow it further)",
    },
    Access {
        group: WGPIN,
        resource: "pinnednodestates/status",
        verbs: &["patch"],
        implied_verbs: &[],
        scope: Scope::Cluster,
        resource_name: None,
        why: "what the node enforces, by server-side apply",
    },
    Access {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
        implied_verbs: &[],
        scope: Scope::EventNamespace,
        resource_name: None,
        why: "Events on PinnedPeers for fail-closed actions",
    },
    Access {
        group: "",
        resource: "secrets",
        verbs: &["get"],
        implied_verbs: &[],
        scope: Scope::SecretNamespaces,
        resource_name: None,
        why: "preshared keys: only the Secrets its own node's state names, each read by name (never listed or watched), in the namespaces chosen for them (none by default)",
    },
];

/// Where [`generated_file`] goes, from the repository root.
pub const CHART_ACCESS_FILE: &str = "charts/wgpin/tests/access.json";

/// Both lists as the chart test reads them.
pub fn generated_file() -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string_pretty(&serde_json::json!({
        "operator": OPERATOR,
        "agent": AGENT,
    }))?;
    text.push('\n');
    Ok(text)
}

/// One API call, as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub scope: Scope,
    pub name: Option<&'a str>,
}

/// The rule in `rules` that allows `call`, if any; `lease` is the configured Lease name.
pub fn allowing<'r>(rules: &'r [Access], call: &Call<'_>, lease: &str) -> Option<&'r Access> {
    rules.iter().find(|rule| {
        rule.group == call.group
            && rule.resource == call.resource
            && rule.scope == call.scope
            && rule.verbs.contains(&call.verb)
            && match rule.resource_name {
                None => true,
                Some(LEASE_NAME) => call.name == Some(lease),
                Some(name) => call.name == Some(name),
            }
    })
}

/// Checks `calls` against `rules`: every call allowed, every verb of every rule used (implied
/// verbs excepted). The problems, in words.
pub fn audit(rules: &[Access], calls: &[Call<'_>], lease: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut used: std::collections::BTreeSet<(usize, &str)> = std::collections::BTreeSet::new();
    for call in calls {
        match allowing(rules, call, lease) {
            Some(rule) => {
                let index = rules
                    .iter()
                    .position(|r| std::ptr::eq(r, rule))
                    .unwrap_or(0);
                used.insert((
                    index,
                    rule.verbs
                        .iter()
                        .copied()
                        .find(|v| *v == call.verb)
                        .unwrap_or(""),
                ));
            }
            None => problems.push(format!("not allowed by the access list: {call:?}")),
        }
    }
    for (index, rule) in rules.iter().enumerate() {
        for verb in rule.verbs {
            if !used.contains(&(index, *verb)) {
                problems.push(format!(
                    "allowed but never used (least privilege: remove it, or test the call): {verb} {}/{} ({:?})",
                    rule.group, rule.resource, rule.scope
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &str,
        scope: Scope,
        name: Option<&'a str>,
    ) -> Call<'a> {
        Call {
            verb,
            group,
            resource: resource.to_string(),
            scope,
            name,
        }
    }

    #[test]
    fn the_lease_is_allowed_by_its_configured_name_only() {
        let get = |name| {
            call(
                "get",
                "coordination.k8s.io",
                "leases",
                Scope::ReleaseNamespace,
                Some(name),
            )
        };
        assert!(allowing(OPERATOR, &get("wgpin-operator"), "wgpin-operator").is_some());
        assert!(allowing(OPERATOR, &get("someone-else"), "wgpin-operator").is_none());
        let create = call(
            "create",
            "coordination.k8s.io",
            "leases",
            Scope::ReleaseNamespace,
            None,
        );
        assert!(allowing(OPERATOR, &create, "wgpin-operator").is_some());
    }

    #[test]
    fn the_audit_names_calls_not_allowed_and_rules_not_used() {
        let calls = [
            call("list", WGPIN, "pinnednodestates", Scope::Cluster, None),
            call("watch", WGPIN, "pinnednodestates", Scope::Cluster, None),
            call(
                "patch",
                WGPIN,
                "pinnednodestates/status",
                Scope::Cluster,
                Some("gw"),
            ),
            call("get", WGPIN, "pinnedpeers", Scope::Cluster, Some("laptop")),
        ];
        let problems = audit(AGENT, &calls, "");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("not allowed") && problems[0].contains("pinnedpeers"));
        assert!(problems[1].contains("never used") && problems[1].contains("events"));
        assert!(problems[2].contains("never used") && problems[2].contains("secrets"));
    }

    #[test]
    fn secrets_are_read_by_name_by_the_agent_only_and_only_where_chosen() {
        let secret = |verb, scope| call(verb, "", "secrets", scope, Some("laptop-psk"));
        assert!(allowing(AGENT, &secret("get", Scope::SecretNamespaces), "").is_some());
        for verb in ["list", "watch", "create", "update", "patch", "delete"] {
            assert!(
                allowing(AGENT, &secret(verb, Scope::SecretNamespaces), "").is_none(),
                "{verb}"
            );
        }
        for scope in [
            Scope::Cluster,
            Scope::ReleaseNamespace,
            Scope::EventNamespace,
        ] {
            assert!(
                allowing(AGENT, &secret("get", scope), "").is_none(),
                "{scope:?}"
            );
        }
        assert!(
            OPERATOR.iter().all(|rule| rule.resource != "secrets"),
            "the operator never reads a Secret"
        );
    }

    #[test]
    fn the_agent_cannot_write_specs_or_touch_peers() {
        for (verb, resource) in [
            ("patch", "pinnednodestates"),
            ("update", "pinnednodestates"),
            ("list", "pinnedpeers"),
            ("patch", "pinnedpeers/status"),
        ] {
            assert!(
                allowing(
                    AGENT,
                    &call(verb, WGPIN, resource, Scope::Cluster, None),
                    ""
                )
                .is_none(),
                "{verb} {resource}"
            );
        }
    }
}
