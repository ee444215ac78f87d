//! Who holds a UDP port: when WireGuard cannot listen on its port, the error names the port
//! and the processes whose sockets are bound to it, in the agent's network namespace.

use std::collections::BTreeSet;

/// Adds the port and its holders to `error` when it says an address is in use: "…; UDP port
/// 51820 is held by pid 812 (dnsmasq)". Other errors are returned as they are.
pub fn explain_listen_error(error: String, port: u16) -> String {
    if !error.contains("Address already in use") {
        return error;
    }
    let holders = udp_port_holders(port);
    let who = if holders.is_empty() {
        "no process holds it now (a kernel socket, such as another WireGuard device, or one \
         closed since)"
            .to_string()
    } else {
        format!("it is held by {}", holders.join(", "))
    };
    format!(
        "{error}; cannot listen on UDP port {port}: {who}; free the port or choose another listenPort"
    )
}

/// "pid N (command)" for every process with a UDP socket bound to `port` in the calling
/// thread's network namespace. Best effort: what cannot be read is left out.
pub fn udp_port_holders(port: u16) -> Vec<String> {
    let inodes = socket_inodes(port);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut holders = BTreeSet::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for process in processes.flatten() {
        let name = process.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            let command = std::fs::read_to_string(process.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            holders.insert(format!("pid {pid} ({command})"));
        }
    }
    holders.into_iter().collect()
}

/// The inodes of the UDP sockets bound to `port` (IPv4 and IPv6) in the calling thread's
/// network namespace; 0 (a socket no file holds) is left out.
fn socket_inodes(port: u16) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(bound_to(&text, port));
    }
    inodes
}

/// The inodes of the sockets in a `/proc/net/udp{,6}` table whose local port is `port`.
fn bound_to(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            (u16::from_str_radix(local_port, 16).ok()? == port && inode != 0).then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_the_sockets_on_the_port() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
             1: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
             2: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 17 2 0000000000000000 0\n\
             3: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0\n";
        assert_eq!(bound_to(table, 51820), [4242]);
        assert_eq!(bound_to(table, 53), [17]);
        assert!(bound_to(table, 51821).is_empty());
    }

    #[test]
    fn only_an_address_in_use_is_explained() {
        assert_eq!(
            explain_listen_error("errno=-22 (Invalid argument)".into(), 51820),
            "errno=-22 (Invalid argument)"
        );
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = socket.local_addr().expect("address").port();
        let explained = explain_listen_error("Address already in use (os error 98)".into(), port);
        assert!(
            explained.contains(&format!("cannot listen on UDP port {port}"))
                && explained.contains(&format!("pid {}", std::process::id())),
            "{explained}"
        );
    }
}
