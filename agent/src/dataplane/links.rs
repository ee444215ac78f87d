//! Link settings of WireGuard devices through rtnetlink: MTU, up, addresses, routes to peers.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Opens an rtnetlink connection in the current thread's network namespace. The connection
/// task runs on the current tokio runtime.
pub fn connect() -> Result<Handle, String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("rtnetlink: {e}"))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The index of `name`, or `None` when there is no such link.
pub async fn index(handle: &Handle, name: &str) -> Result<Option<u32>, String> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        // ENODEV: no such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(e) => Err(format!("looking up link {name}: {e}")),
    }
}

/// Brings a device to the wanted MTU, up, with exactly `addresses` and exactly one static route
/// to each of `routes`. Reads first and writes only what differs; returns how many changes it
/// made.
pub async fn configure(
    handle: &Handle,
    name: &str,
    mtu: Option<u16>,
    addresses: &[IpNet],
    routes: &[IpNet],
) -> Result<usize, String> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let current = match links.try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => return Err(format!("link {name} does not exist")),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => {
            return Err(format!("link {name} does not exist"));
        }
        Err(e) => return Err(format!("looking up link {name}: {e}")),
    };
    let index = current.header.index;
    let mut changes = 0;
    // Written only when it differs: a reconcile without change makes no rtnetlink write either.
    let is_up = current.header.flags.contains(LinkFlags::Up);
    let current_mtu = current.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    });
    let wrong_mtu = mtu.is_some_and(|mtu| current_mtu != Some(u32::from(mtu)));
    if !is_up || wrong_mtu {
        let mut link = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            link = link.mtu(u32::from(mtu));
        }
        handle
            .link()
            .set(link.build())
            .execute()
            .await
            .map_err(|e| format!("setting {name} up: {e}"))?;
        changes += 1;
    }

    let mut present = Vec::new();
    let mut existing = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(message) = existing
        .try_next()
        .await
        .map_err(|e| format!("reading addresses of {name}: {e}"))?
    {
        let prefix = message.header.prefix_len;
        let address = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(address) = address.and_then(|ip| IpNet::new(ip, prefix).ok()) {
            if addresses.contains(&address) {
                present.push(address);
            } else if !matches!(address.addr(), IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
            {
                handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .map_err(|e| format!("removing {address} from {name}: {e}"))?;
                changes += 1;
            }
        }
    }
    for address in addresses.iter().filter(|a| !present.contains(a)) {
        handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(|e| format!("adding {address} to {name}: {e}"))?;
        changes += 1;
    }
    // Routes: the static routes on this link are ours; add the missing, remove the stale (a
    // peer's allowed IPs that left).
    let mut routed: Vec<(IpNet, RouteMessage)> = Vec::new();
    for dump in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut existing = handle.route().get(dump).execute();
        while let Some(message) = existing
            .try_next()
            .await
            .map_err(|e| format!("reading routes of {name}: {e}"))?
        {
            let on_link = message
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(oif) if *oif == index));
            if !on_link || message.header.protocol != RouteProtocol::Static {
                continue;
            }
            let length = message.header.destination_prefix_length;
            let destination = message.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                    IpNet::new(IpAddr::V4(*ip), length).ok()
                }
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                    IpNet::new(IpAddr::V6(*ip), length).ok()
                }
                _ => None,
            });
            if let Some(destination) = destination {
                routed.push((destination, message));
            }
        }
    }
    for (destination, message) in &routed {
        if !routes.contains(destination) {
            handle
                .route()
                .del(message.clone())
                .execute()
                .await
                .map_err(|e| format!("removing the route to {destination} from {name}: {e}"))?;
            changes += 1;
        }
    }
    for route in routes
        .iter()
        .filter(|r| !routed.iter().any(|(d, _)| d == *r))
    {
        let message = match route {
            IpNet::V4(net) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .output_interface(index)
                .build(),
            IpNet::V6(net) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .output_interface(index)
                .build(),
        };
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| format!("routing {route} to {name}: {e}"))?;
        changes += 1;
    }
    Ok(changes)
}

/// Deletes a link if it exists.
pub async fn delete(handle: &Handle, name: &str) -> Result<bool, String> {
    match index(handle, name).await? {
        Some(index) => {
            handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| format!("deleting {name}: {e}"))?;
            Ok(true)
        }
        None => Ok(false),
    }
}
