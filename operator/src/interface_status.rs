//! `PinnedInterface.status`: how many nodes run the interface, how many peers it carries, and
//! whether the operator could render it. Pure. Enforcement itself is reported per peer (each
//! `PinnedPeer`'s status), so `Ready` here means "rendered onto its nodes".

use wgpin_crds::{
    InterfaceStatus, PinnedInterface, PinnedInterfaceStatus,
    conditions::{READY, RECONCILING, STALLED, condition, set_condition},
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    kube::ResourceExt,
};

use crate::{ProblemReason, Rendered};

/// Condition: the node selector selects at least one node.
pub const NODES_SELECTED: &str = "NodesSelected";
/// Condition: every node that reported runs the mode asked for (`Auto`: the strongest the node
/// supports); `False` names the nodes where `Identity` fell back to `Shared`, and why.
pub const MODE_AS_REQUESTED: &str = "ModeAsRequested";
/// Nodes named in the `ModeAsRequested` message, at most.
const FALLBACK_NODES_SHOWN: usize = 5;

/// The status of `interface` after `rendered`, with what the nodes' agents `reported` for it
/// (node name, the interface's status on that node); transition times carry over from
/// `previous`.
pub fn interface_status<'a>(
    interface: &PinnedInterface,
    rendered: &Rendered,
    reported: impl IntoIterator<Item = (&'a str, &'a InterfaceStatus)>,
    previous: Option<&PinnedInterfaceStatus>,
    now: Time,
) -> PinnedInterfaceStatus {
    let name = interface.name_any();
    let generation = interface.metadata.generation;
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let entries: Vec<_> = rendered
        .nodes
        .values()
        .flat_map(|node| node.interfaces.iter().filter(|i| i.name == name))
        .collect();
    let peers: std::collections::BTreeSet<&str> = entries
        .iter()
        .flat_map(|i| i.peers.iter().map(|p| p.name.as_str()))
        .collect();
    status.selected_nodes = Some(u32::try_from(entries.len()).unwrap_or(u32::MAX));
    status.modes.clear();
    let mut fallbacks: Vec<String> = Vec::new();
    for (node, reported) in reported {
        if reported.name != name {
            continue;
        }
        if let Some(mode) = reported.mode {
            *status.modes.entry(format!("{mode:?}")).or_default() += 1;
        }
        if let Some(why) = &reported.mode_fallback {
            fallbacks.push(format!("{node}: {why}"));
        }
    }
    status.peers = Some(u32::try_from(peers.len()).unwrap_or(u32::MAX));
    let problem = rendered
        .problems
        .iter()
        .find(|p| p.kind == "PinnedInterface" && p.name == name);

    let mut conditions = std::mem::take(&mut status.conditions);
    let mut set = |type_: &str, value: bool, reason: &str, message: String| {
        set_condition(
            &mut conditions,
            condition(
                type_,
                if value { "True" } else { "False" },
                reason,
                message,
                generation,
                now.clone(),
            ),
        );
    };
    match problem {
        Some(problem) => {
            let reason = problem.reason.as_str();
            set(READY, false, reason, problem.message.clone());
            // Nothing changes until the user does: an invalid spec, or no node selected.
            set(STALLED, true, reason, problem.message.clone());
            set(RECONCILING, false, reason, String::new());
            let selected = problem.reason != ProblemReason::NoNodeSelected && !entries.is_empty();
            set(NODES_SELECTED, selected, reason, problem.message.clone());
        }
        None => {
            let message = format!(
                "rendered on {} node(s) with {} peer(s); each PinnedPeer's status says whether it is enforced",
                entries.len(),
                peers.len()
            );
            set(READY, true, "Rendered", message);
            set(STALLED, false, "Rendered", String::new());
            set(RECONCILING, false, "Rendered", String::new());
            set(
                NODES_SELECTED,
                true,
                "Selected",
                format!("{} node(s)", entries.len()),
            );
        }
    }
    let fallback_message = if fallbacks.is_empty() {
        String::new()
    } else {
        let more = fallbacks.len().saturating_sub(FALLBACK_NODES_SHOWN);
        let mut message = format!(
            "{} node(s) cannot run the mode asked for: {}",
            fallbacks.len(),
            fallbacks[..fallbacks.len().min(FALLBACK_NODES_SHOWN)].join("; ")
        );
        if more > 0 {
            message.push_str(&format!("; and {more} more (see their PinnedNodeStates)"));
        }
        message
    };
    set_condition(
        &mut conditions,
        condition(
            MODE_AS_REQUESTED,
            if fallbacks.is_empty() {
                "True"
            } else {
                "False"
            },
            if fallbacks.is_empty() {
                "AsRequested"
            } else {
                "ModeFallback"
            },
            fallback_message,
            generation,
            now,
        ),
    );
    status.conditions = conditions;
    status
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{
        k8s_openapi::jiff::Timestamp,
        node_state::{PinnedNodeStateSpec, RenderedInterface},
    };

    use wgpin_crds::ResolvedMode;

    use super::*;
    use crate::Problem;

    fn interface(name: &str) -> PinnedInterface {
        let mut interface: PinnedInterface = serde_json::from_value(serde_json::json!({
            "apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedInterface",
            "metadata": {"name": name, "generation": 3},
            "spec": {"nodeSelector": {}, "interfaceName": "wg0", "listenPort": 51820}
        }))
        .expect("fixture");
        interface.metadata.generation = Some(3);
        interface
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + second).expect("time"))
    }

    fn rendered_on(nodes: &[&str], peers: &[&str]) -> Rendered {
        let mut rendered = Rendered::default();
        for node in nodes {
            let mut entry: RenderedInterface = serde_json::from_value(serde_json::json!({
                "name": "gateway", "interfaceName": "wg0", "mode": "Shared", "listenPort": 51820,
                "peers": peers.iter().map(|p| serde_json::json!({
                    "name": p, "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
                    "allowedIPs": [], "sources": []})).collect::<Vec<_>>()
            }))
            .expect("rendered interface");
            entry.name = "gateway".into();
            rendered.nodes.insert(
                node.to_string(),
                PinnedNodeStateSpec {
                    node_name: node.to_string(),
                    interfaces: vec![entry],
                },
            );
        }
        rendered
    }

    fn condition<'a>(status: &'a PinnedInterfaceStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn a_rendered_interface_counts_its_nodes_and_peers_and_is_ready() {
        let status = interface_status(
            &interface("gateway"),
            &rendered_on(&["gw-a", "gw-b"], &["alice", "bob"]),
            [],
            None,
            at(0),
        );
        assert_eq!((status.selected_nodes, status.peers), (Some(2), Some(2)));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(condition(&status, READY), ("True", "Rendered"));
        assert_eq!(condition(&status, STALLED).0, "False");
        assert_eq!(condition(&status, NODES_SELECTED), ("True", "Selected"));
        // Unchanged inputs later: the same status, nothing to write.
        let again = interface_status(
            &interface("gateway"),
            &rendered_on(&["gw-a", "gw-b"], &["alice", "bob"]),
            [],
            Some(&status),
            at(60),
        );
        assert_eq!(again, status);
    }

    fn reported(name: &str, mode: ResolvedMode, fallback: Option<&str>) -> InterfaceStatus {
        InterfaceStatus {
            name: name.into(),
            mode_fallback: fallback.map(str::to_string),
            mode: Some(mode),
            backend: None,
            fast_path: None,
            public_key: None,
            peers: vec![],
        }
    }

    #[test]
    fn nodes_report_their_modes_and_a_fallback_names_the_nodes_and_why() {
        let nodes: Vec<String> = (0..8).map(|i| format!("gw-{i}")).collect();
        let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let rendered = rendered_on(&names, &["alice"]);
        let identity = reported("gateway", ResolvedMode::Identity, None);
        let fallback = reported(
            "gateway",
            ResolvedMode::Shared,
            Some("Identity cannot run on this node (no module BTF); running Shared"),
        );
        let other_interface = reported("other", ResolvedMode::Shared, Some("ignored"));
        let mut reports = vec![
            ("gw-0", &identity),
            ("gw-1", &identity),
            ("gw-0", &other_interface),
        ];
        reports.extend(names[2..].iter().map(|n| (*n, &fallback)));
        let status = interface_status(&interface("gateway"), &rendered, reports, None, at(0));
        assert_eq!(
            status.modes,
            [("Identity".to_string(), 2), ("Shared".to_string(), 6)].into()
        );
        assert_eq!(
            condition(&status, READY),
            ("True", "Rendered"),
            "rendered all the same"
        );
        assert_eq!(
            condition(&status, MODE_AS_REQUESTED),
            ("False", "ModeFallback")
        );
        let message = &status
            .conditions
            .iter()
            .find(|c| c.type_ == MODE_AS_REQUESTED)
            .expect("condition")
            .message;
        assert!(
            message.starts_with("6 node(s) cannot run the mode asked for: gw-2: Identity cannot run on this node (no module BTF)")
                && message.ends_with("; and 1 more (see their PinnedNodeStates)")
                && !message.contains("ignored"),
            "{message}"
        );
        // Every node as asked: True.
        let status = interface_status(
            &interface("gateway"),
            &rendered,
            names.iter().map(|n| (*n, &identity)),
            Some(&status),
            at(1),
        );
        assert_eq!(
            condition(&status, MODE_AS_REQUESTED),
            ("True", "AsRequested")
        );
        assert_eq!(status.modes, [("Identity".to_string(), 8)].into());
    }

    #[test]
    fn no_node_selected_and_an_invalid_spec_stall_it_with_the_reason() {
        for (reason, nodes_selected) in [
            (ProblemReason::NoNodeSelected, "False"),
            (ProblemReason::InvalidSpec, "False"),
        ] {
            let mut rendered = Rendered::default();
            rendered.problems.push(Problem {
                kind: "PinnedInterface",
                name: "gateway".into(),
                reason,
                message: "why".into(),
            });
            let status = interface_status(&interface("gateway"), &rendered, [], None, at(0));
            assert_eq!(condition(&status, READY), ("False", reason.as_str()));
            assert_eq!(condition(&status, STALLED), ("True", reason.as_str()));
            assert_eq!(condition(&status, NODES_SELECTED).0, nodes_selected);
            assert_eq!((status.selected_nodes, status.peers), (Some(0), Some(0)));
        }
    }
}
