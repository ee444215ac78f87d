//! `PinnedInterface.status`: how many nodes run the interface, how many peers it carries, and
//! whether the operator could render it. Pure. Enforcement itself is reported per peer (each
//! `PinnedPeer`'s status), so `Ready` here means "rendered onto its nodes".

use wgpin_crds::{
    PinnedInterface, PinnedInterfaceStatus,
    conditions::{READY, RECONCILING, STALLED, condition, set_condition},
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    kube::ResourceExt,
};

use crate::{ProblemReason, Rendered};

/// Condition: the node selector selects at least one node.
pub const NODES_SELECTED: &str = "NodesSelected";

/// The status of `interface` after `rendered`; transition times carry over from `previous`.
pub fn interface_status(
    interface: &PinnedInterface,
    rendered: &Rendered,
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
    status.conditions = conditions;
    status
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{
        k8s_openapi::jiff::Timestamp,
        node_state::{PinnedNodeStateSpec, RenderedInterface},
    };

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
            Some(&status),
            at(60),
        );
        assert_eq!(again, status);
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
            let status = interface_status(&interface("gateway"), &rendered, None, at(0));
            assert_eq!(condition(&status, READY), ("False", reason.as_str()));
            assert_eq!(condition(&status, STALLED), ("True", reason.as_str()));
            assert_eq!(condition(&status, NODES_SELECTED).0, nodes_selected);
            assert_eq!((status.selected_nodes, status.peers), (Some(0), Some(0)));
        }
    }
}
