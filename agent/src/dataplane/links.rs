//! Link settings of WireGuard devices through rtnetlink: MTU, up, addresses, routes to peers.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
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

/// Brings a device to the wanted MTU, up, with exactly `addresses` and a route to each of
/// `routes`. Returns how many changes it made.
pub async fn configure(
    handle: &Handle,
    name: &str,
    mtu: Option<u16>,
    addresses: &[IpNet],
    routes: &[IpNet],
) -> Result<usize, String> {
    let Some(index) = index(handle, name).await? else {
        return Err(format!("link {name} does not exist"));
    };
    let mut changes = 0;
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
    for route in routes {
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
