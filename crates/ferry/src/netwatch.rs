//! What wakes the agent besides its own timers: manifest files changing (inotify, through the
//! `notify` crate) and the host's interfaces and addresses changing (an rtnetlink multicast
//! subscription). Both only send a wake-up; the sync reads what it needs.

use std::net::IpAddr;
use std::path::Path;

use futures::StreamExt;
use tokio::sync::mpsc::UnboundedSender;

/// Why the agent woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Manifests,
    Addresses,
}

/// Watches `dir` recursively; every change sends [`Wake::Manifests`]. The watcher lives as long
/// as the returned value. Falls back to polling (every second) where inotify is not available
/// (a file system without it, or the watch limit reached).
pub fn watch_manifests(
    dir: &Path,
    tx: UnboundedSender<Wake>,
) -> notify::Result<Box<dyn notify::Watcher + Send>> {
    use notify::{RecursiveMode, Watcher};
    let handler = move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            Ok(ev) => !matches!(ev.kind, notify::EventKind::Access(_)),
            // A watch error (queue overflow, say): re-read everything to be safe.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(Wake::Manifests);
        }
    };
    match notify::RecommendedWatcher::new(handler.clone(), notify::Config::default()) {
        Ok(mut w) => match w.watch(dir, RecursiveMode::Recursive) {
            Ok(()) => return Ok(Box::new(w)),
            Err(e) => log!(
                "warning: cannot watch {} with inotify ({e}): polling it every second",
                dir.display()
            ),
        },
        Err(e) => log!(
            "warning: inotify unavailable ({e}): polling {} every second",
            dir.display()
        ),
    }
    let cfg = notify::Config::default().with_poll_interval(std::time::Duration::from_secs(1));
    let mut w = notify::PollWatcher::new(handler, cfg)?;
    w.watch(dir, RecursiveMode::Recursive)?;
    Ok(Box::new(w))
}

/// Subscribes to link and address changes of this network namespace; every change sends
/// [`Wake::Addresses`]. Runs until the receiver is gone.
pub fn watch_addresses(tx: UnboundedSender<Wake>) -> std::io::Result<()> {
    use rtnetlink::constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK};
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection()?;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(
        0,
        RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
    ))?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            if tx.send(Wake::Addresses).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// (interface name, address) for every address of this network namespace.
pub fn interface_addresses() -> Vec<(String, IpAddr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| {
            let sa = ifa.address?;
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            Some((ifa.interface_name, ip))
        })
        .collect()
}

/// The host's own unicast addresses among `all` (the fallback when there is no Node object).
pub fn host_addresses(all: &[(String, IpAddr)]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = all
        .iter()
        .map(|(_, ip)| *ip)
        .filter(|ip| match ip {
            IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
            IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The interface that holds `ip` among `all`.
pub fn interface_of(all: &[(String, IpAddr)], ip: IpAddr) -> Option<String> {
    all.iter().find(|(_, a)| *a == ip).map(|(n, _)| n.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_skip_loopback_and_link_local() {
        let all: Vec<(String, IpAddr)> = vec![
            ("lo".into(), "127.0.0.1".parse().unwrap()),
            ("lo".into(), "::1".parse().unwrap()),
            ("eth0".into(), "192.168.2.11".parse().unwrap()),
            ("eth0".into(), "fe80::1".parse().unwrap()),
            ("eth0".into(), "169.254.0.9".parse().unwrap()),
            ("eth1".into(), "fd00::11".parse().unwrap()),
            ("eth1".into(), "192.168.2.11".parse().unwrap()),
        ];
        let got = host_addresses(&all);
        assert_eq!(
            got,
            vec![
                "192.168.2.11".parse::<IpAddr>().unwrap(),
                "fd00::11".parse().unwrap()
            ]
        );
        assert_eq!(
            interface_of(&all, "fd00::11".parse().unwrap()).as_deref(),
            Some("eth1")
        );
        assert_eq!(interface_of(&all, "10.0.0.1".parse().unwrap()), None);
        // This namespace has at least loopback.
        assert!(interface_addresses().iter().any(|(n, _)| n == "lo"));
    }
}
