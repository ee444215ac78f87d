//! What the fast path asks netlink about an interface: which XDP program, if any, is attached
//! (`IFLA_XDP_PROG_ID`; aya can attach but not tell, and the answer is how the loader detects
//! another owner of the hook and a detached program), and what kind of link it is.

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// What netlink says about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFacts {
    /// The XDP program attached, if any.
    pub xdp_program: Option<u32>,
    /// The link is a veth: native XDP there copies every packet into a new page first, which
    /// makes TC the faster hook (docs/benchmarks.md).
    pub veth: bool,
}

/// The ID of the XDP program attached to `interface` in this thread's network namespace.
pub fn xdp_program_id(interface: &str) -> Result<Option<u32>, String> {
    link_facts(interface).map(|facts| facts.xdp_program)
}

/// The facts about `interface` in this thread's network namespace.
pub fn link_facts(interface: &str) -> Result<LinkFacts, String> {
    let index = nix::net::if_::if_nametoindex(interface)
        .map_err(|e| format!("interface {interface:?} not found: {e}"))?;
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("netlink bind: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;

    let mut message = LinkMessage::default();
    message.header.index = index;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(message)),
    );
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer[..]);
    socket
        .send(&buffer, 0)
        .map_err(|e| format!("netlink send: {e}"))?;

    let mut reply = vec![0; 64 * 1024];
    let size = socket
        .recv(&mut &mut reply[..], 0)
        .map_err(|e| format!("netlink receive: {e}"))?;
    let message: NetlinkMessage<RouteNetlinkMessage> =
        NetlinkMessage::deserialize(&reply[..size]).map_err(|e| format!("netlink reply: {e}"))?;
    match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
            let mut facts = LinkFacts::default();
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::Xdp(xdp) => {
                        facts.xdp_program = xdp.iter().find_map(|x| match x {
                            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                            _ => None,
                        });
                    }
                    LinkAttribute::LinkInfo(infos) => {
                        facts.veth = infos
                            .iter()
                            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                    }
                    _ => {}
                }
            }
            Ok(facts)
        }
        NetlinkPayload::Error(error) => Err(format!("netlink error for {interface:?}: {error}")),
        other => Err(format!(
            "unexpected netlink reply for {interface:?}: {other:?}"
        )),
    }
}
