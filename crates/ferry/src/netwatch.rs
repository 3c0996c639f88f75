//! What wakes the agent besides its own timers: manifest files changing (inotify, through the
//! `notify` crate), the host's interfaces and addresses changing (an rtnetlink multicast
//! subscription), and the nftables ruleset changed by another process (the nf_tables netlink
//! multicast group: a firewall reload, `nft flush ruleset`, a hand edit of ferry's table).
//! They only send a wake-up; the sync reads what it needs.

use std::net::IpAddr;
use std::path::Path;

use futures::StreamExt;
use tokio::sync::mpsc::UnboundedSender;

/// Why the agent woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Manifests,
    Addresses,
    /// Another process committed an nftables transaction in this network namespace.
    Kernel,
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

/// Subscribes to link, address and route changes of this network namespace; every change sends
/// [`Wake::Addresses`]. Runs until the receiver is gone.
pub fn watch_addresses(tx: UnboundedSender<Wake>) -> std::io::Result<()> {
    use rtnetlink::constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    };
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection()?;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(
        0,
        RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE,
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

/// `NFNLGRP_NFTABLES`: the multicast group of nf_tables' change notifications.
const NFNLGRP_NFTABLES: u32 = 7;
/// Message type of the notification that ends every committed transaction:
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN` (10 and 15).
const NFT_NEWGEN: u16 = (10 << 8) | 15;
/// `NFTA_GEN_PROC_PID` and `NFTA_GEN_PROC_NAME`: the task that committed it (the kernel's
/// own view: the thread's ID in the initial PID namespace, and the thread's name).
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;

/// The name of the thread that commits ferry's transactions. The kernel reports commits with
/// the committing thread's ID as the initial PID namespace sees it, which is neither the
/// agent's PID nor, inside a container, any ID the agent can see: the thread's name is what
/// tells the agent's own commits apart (a second agent in the namespace is refused anyway).
pub const SYNC_THREAD: &str = "ferry-sync";

/// One committed transaction: who committed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub pid: u32,
    pub name: String,
}

impl Commit {
    /// Whether the agent itself committed it (its sync thread, or its PID where the two PID
    /// namespaces are the same).
    pub fn is_own(&self, my_pid: u32) -> bool {
        self.pid == my_pid || self.name == SYNC_THREAD
    }
}

/// Watches this namespace's nftables ruleset: every transaction committed by another process
/// sends [`Wake::Kernel`] (ferry's own commits, by its [`SYNC_THREAD`], are ignored). A thread of its
/// own blocks on the netlink socket; it ends when the receiver is gone.
pub fn watch_nftables(tx: UnboundedSender<Wake>) -> std::io::Result<()> {
    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    only_newgen(&sock)?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    let me = std::process::id();
    std::thread::Builder::new()
        .name("ferry-nft-events".into())
        .spawn(move || {
            let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
            loop {
                buf.clear();
                match sock.recv(&mut buf, 0) {
                    Ok(_) => {
                        let foreign = commits(&buf).iter().any(|c| !c.is_own(me));
                        if foreign && tx.send(Wake::Kernel).is_err() {
                            return;
                        }
                    }
                    // ENOBUFS: notifications were lost; something changed, so look.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        if tx.send(Wake::Kernel).is_err() {
                            return;
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                }
            }
        })?;
    Ok(())
}

/// Lets the kernel queue only NEWGEN notifications on `sock` (a classic BPF filter on the
/// message type): a transaction sends one notification per object it touches, and a cold load
/// of thousands of services would otherwise overflow the socket (and wake this thread for
/// each), when one per transaction says all the agent needs.
fn only_newgen(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    // `ldh` reads in network byte order; nlmsg_type is in host order.
    let want = u32::from(u16::from_be_bytes(NFT_NEWGEN.to_ne_bytes()));
    let code = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let mut prog = [
        // A = nlmsg_type (offset 4 of the netlink header)
        code((libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16, 0, 0, 4),
        // A == NEWGEN ? next : skip one
        code(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            0,
            1,
            want,
        ),
        code((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0xffff_ffff),
        code((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: setsockopt with a valid fd and a sock_fprog pointing at `prog`, which outlives
    // the call (the kernel copies the program).
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The commits announced by the NEWGEN notifications in a netlink datagram (pure; garbage and
/// truncated messages are skipped).
pub fn commits(datagram: &[u8]) -> Vec<Commit> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            break;
        }
        if kind == NFT_NEWGEN {
            // nfgenmsg (4 bytes), then attributes: length, type, value, padded to 4.
            let mut attrs = rest.get(20..len).unwrap_or_default();
            let mut commit = Commit {
                pid: 0,
                name: String::new(),
            };
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if atype == NFTA_GEN_PROC_PID && alen >= 8 {
                    commit.pid = u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
                }
                if atype == NFTA_GEN_PROC_NAME {
                    let v = &attrs[4..alen];
                    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                    commit.name = String::from_utf8_lossy(&v[..end]).into_owned();
                }
                attrs = attrs.get(alen.next_multiple_of(4)..).unwrap_or_default();
            }
            out.push(commit);
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

/// What the agent knows of this network namespace's own addressing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNet {
    /// (interface, address) for every address.
    pub addrs: Vec<(String, IpAddr)>,
    /// The next hops of its routes (its gateways).
    pub gateways: Vec<IpAddr>,
}

/// Reads [`HostNet`] now.
pub fn host_net() -> HostNet {
    let mut gateways = gateways_v4(&std::fs::read_to_string("/proc/net/route").unwrap_or_default());
    gateways.extend(gateways_v6(
        &std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
    ));
    gateways.sort();
    gateways.dedup();
    HostNet {
        addrs: interface_addresses(),
        gateways,
    }
}

/// Gateways in `/proc/net/route` (third column, little-endian hex; 0 means none).
fn gateways_v4(table: &str) -> Vec<IpAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|g| u32::from_str_radix(g, 16).ok())
        .filter(|g| *g != 0)
        .map(|g| IpAddr::from(g.to_le_bytes()))
        .collect()
}

/// Next hops in `/proc/net/ipv6_route` (fifth column, 32 hex digits; all zero means none).
fn gateways_v6(table: &str) -> Vec<IpAddr> {
    table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter_map(|g| u128::from_str_radix(g, 16).ok())
        .filter(|g| *g != 0)
        .map(|g| IpAddr::from(std::net::Ipv6Addr::from(g)))
        .collect()
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

    /// A NEWGEN notification as the kernel sends it (gen id, pid, process name).
    fn newgen(pid: u32) -> Vec<u8> {
        newgen_by(pid, b"nft\0")
    }

    /// `name` as the kernel puts it: NUL-terminated, the attribute padded to 4 bytes.
    fn newgen_by(pid: u32, name: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        for (t, v) in [
            (1u16, 77u32.to_be_bytes().to_vec()),
            (2, pid.to_be_bytes().to_vec()),
            (3, name.to_vec()),
        ] {
            attrs.extend_from_slice(&(4 + v.len() as u16).to_ne_bytes());
            attrs.extend_from_slice(&t.to_ne_bytes());
            attrs.extend_from_slice(&v);
            attrs.resize(attrs.len().next_multiple_of(4), 0);
        }
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&NFT_NEWGEN.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn gateways_from_the_kernels_route_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n\
                  eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(
            gateways_v4(v4),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
                  fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n";
        assert_eq!(gateways_v6(v6), vec!["fd00::1".parse::<IpAddr>().unwrap()]);
        assert!(gateways_v4("garbage").is_empty() && gateways_v6("x y z").is_empty());
    }

    #[test]
    fn commit_pids_reads_newgen_notifications_and_skips_the_rest() {
        let mut d = newgen(4242);
        // Another message type (a NEWRULE notification), then a second NEWGEN.
        let mut other = newgen(1);
        other[4..6].copy_from_slice(&((10u16 << 8) | 6).to_ne_bytes());
        d.extend_from_slice(&other);
        d.extend_from_slice(&newgen(7));
        let pids: Vec<u32> = commits(&d).iter().map(|c| c.pid).collect();
        assert_eq!(pids, vec![4242, 7]);
        assert!(commits(&d).iter().all(|c| c.name == "nft"));
        // Truncated or garbage: whatever can be read, never a panic.
        for cut in 0..d.len() {
            let _ = commits(&d[..cut]);
        }
        assert!(commits(&[0xff; 40]).is_empty());
    }

    #[test]
    fn own_commits_are_told_apart_by_thread_name_or_pid() {
        let me = 100;
        let c = |d: Vec<u8>| commits(&d).remove(0);
        // nft run by someone else: foreign.
        assert!(!c(newgen(4242)).is_own(me));
        // The agent's PID (the nft-command fallback never commits as the agent itself, but a
        // single-threaded commit would).
        assert!(c(newgen(me)).is_own(me));
        // The sync thread, whatever ID the kernel gives it (a thread ID, another namespace's).
        let commit = c(newgen_by(98765, b"ferry-sync\0"));
        assert_eq!(commit.name, SYNC_THREAD);
        assert!(commit.is_own(me));
        // Another thread of a process of the same name is not the sync thread.
        assert!(!c(newgen_by(98765, b"ferry\0")).is_own(me));
    }

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
