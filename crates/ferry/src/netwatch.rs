//! What wakes the agent besides its own timers: manifest files changing (inotify, through the
//! `notify` crate), the host's interfaces and addresses changing (an rtnetlink multicast
//! subscription), and the nftables ruleset changed by another process (the nf_tables netlink
//! multicast group: a firewall reload, `nft flush ruleset`, a hand edit of ferry's table).
//! They only send a wake-up; the sync reads what it needs.
//!
//! Being in that group has a price: while any socket is a member, the kernel builds a
//! notification for every object of every transaction (a rule, an element, a chain), filtered
//! or not, which costs a cold load of 10,000 services about half again its kernel time. So
//! the sync thread leaves the group around large writes ([`QuietWrites`]) and, once back, tells
//! from the ruleset's generation whether anyone else committed meanwhile.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
/// `NFT_MSG_GETGEN`: asks for the ruleset's generation (answered by a NEWGEN message).
const NFT_GETGEN: u16 = (10 << 8) | 16;
/// `NFTA_GEN_ID`: the generation, which every committed transaction bumps by one.
const NFTA_GEN_ID: u16 = 1;
/// `NFTA_GEN_PROC_PID` and `NFTA_GEN_PROC_NAME`: the task that committed it (the kernel's
/// own view: the thread's ID in the initial PID namespace, and the thread's name).
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;

/// The name of the thread that commits ferry's transactions. The kernel reports commits with
/// the committing thread's ID as the initial PID namespace sees it, which is neither the
/// agent's PID nor, inside a container, any ID the agent can see: the thread's name is what
/// tells the agent's own commits apart (a second agent in the namespace is refused anyway).
pub const SYNC_THREAD: &str = "ferry-sync";

/// One committed transaction: the generation it made, and who committed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub gen: u32,
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
/// own blocks on the netlink socket; it ends when the receiver is gone. The handle returned
/// lets the sync thread step out of the notifications around large writes ([`QuietWrites`]).
pub fn watch_nftables(tx: UnboundedSender<Wake>) -> std::io::Result<QuietWrites> {
    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    use std::os::fd::{AsRawFd, BorrowedFd};
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    only_newgen(&sock)?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    // Every commit up to this generation either reaches this socket or is over before the
    // sync thread first reads the kernel (which it does before its first write).
    let accounted = generation().ok();
    // SAFETY: the socket's descriptor is open (it is `sock`'s) for the duration of the call.
    let member = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) }.try_clone_to_owned()?;
    let seen = Arc::new(Mutex::new(VecDeque::with_capacity(SEEN)));
    let seen_by_thread = Arc::clone(&seen);
    let me = std::process::id();
    std::thread::Builder::new()
        .name("ferry-nft-events".into())
        .spawn(move || {
            let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
            loop {
                buf.clear();
                match sock.recv(&mut buf, 0) {
                    Ok(_) => {
                        let commits = commits(&buf);
                        let foreign = commits.iter().any(|c| !c.is_own(me));
                        if foreign && tx.send(Wake::Kernel).is_err() {
                            return;
                        }
                        // Only once the wake-up is sent does a generation count as seen.
                        note_seen(&seen_by_thread, commits.iter().map(|c| c.gen));
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
    Ok(QuietWrites {
        state: Arc::new(Mutex::new(Quiet {
            member,
            seen,
            accounted,
            open: None,
            commits: 0,
            pause: std::env::var("FERRY_TEST_QUIET_PAUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
        })),
    })
}

/// How many of the last generations notified the watcher remembers (for [`QuietWrites`]).
const SEEN: usize = 64;

fn note_seen(seen: &Mutex<VecDeque<u32>>, gens: impl Iterator<Item = u32>) {
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    for g in gens {
        if seen.len() == SEEN {
            seen.pop_front();
        }
        seen.push_back(g);
    }
}

/// A transaction that weighs at least this many operations (see
/// [`ferry_nft::tables::weight`]), or the second of one apply, is written out of the
/// notification group. A change of an endpoint or a service is far lighter and stays as it
/// was: in the group, not one system call more. (A cold load is cut into transactions of
/// [`ferry_nft::tables::MAX_OPS`], 2,000.)
pub const QUIET_WEIGHT: usize = 1000;

/// Large writes out of the nftables notification group, without missing a foreign change.
///
/// The sync thread's backend is wrapped ([`QuietWrites::backend`]); before a large transaction
/// it reads the ruleset's generation `before`, leaves the group, counts the transactions it
/// commits, and after the apply ([`QuietWrites::close`]) re-joins, then reads the generation
/// `after`. Each committed transaction bumps the generation by one (a refused one, or one that
/// changes nothing, does not: measured on 6.18), so `after - before` other than the commits
/// counted means someone else committed while the agent was out (or up to the moment it read
/// `after`): the sync treats it as a foreign change notification. Re-joining before reading
/// `after` leaves no gap: a commit after the re-join is notified or counted. One commit can be
/// under way while `before` is read (the generation is bumped before its notification goes
/// out): `before` must be a generation whose notification the watcher has seen, or one the
/// sync thread has accounted for already ([`verdict`]); otherwise it counts as foreign too.
pub struct QuietWrites {
    state: Arc<Mutex<Quiet>>,
}

struct Quiet {
    /// A descriptor of the watcher's socket: membership is the socket's, whichever holds it.
    member: std::os::fd::OwnedFd,
    /// The last generations whose notification the watcher has handled.
    seen: Arc<Mutex<VecDeque<u32>>>,
    /// A generation up to which every commit was the sync thread's own or notified.
    accounted: Option<u32>,
    /// Out of the group since the generation `before`.
    open: Option<Window>,
    /// Transactions committed (or tried) since the last close.
    commits: u32,
    /// Tests only (`FERRY_TEST_QUIET_PAUSE_MS`): how long to stay out after writing, so
    /// that a test can change the ruleset meanwhile.
    pause: Option<std::time::Duration>,
}

/// A write out of the notification group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The generation read before leaving.
    pub before: u32,
    /// The sync thread's transactions committed since.
    pub own: u32,
    /// A transaction failed: whether the kernel committed any of it is not known.
    pub failed: bool,
}

impl QuietWrites {
    /// `inner` with large transactions written out of the notification group.
    pub fn backend<B: ferry_nft::Backend>(&self, inner: B) -> QuietBackend<B> {
        QuietBackend {
            inner,
            state: Arc::clone(&self.state),
        }
    }

    /// Ends the apply: back in the group if it left, and whether a foreign change may have
    /// gone unnotified meanwhile (then, why): the caller treats that as a notification.
    /// Without a write out of the group it does nothing (not one system call).
    pub fn close(&self) -> Option<String> {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.commits = 0;
        let w = q.open.take()?;
        if let Some(pause) = q.pause {
            log!(
                "(test) out of nftables' notifications since generation {}: pausing {} ms",
                w.before,
                pause.as_millis()
            );
            std::thread::sleep(pause);
        }
        if let Err(e) = membership(&q.member, libc::NETLINK_ADD_MEMBERSHIP) {
            // The watcher is deaf until a later close succeeds; the periodic resync stays.
            q.open = Some(Window { failed: true, ..w });
            return Some(format!("cannot re-join nftables' notifications ({e})"));
        }
        let after = match generation() {
            Ok(g) => g,
            Err(e) => return Some(format!("cannot read the ruleset's generation ({e})")),
        };
        let before_known = {
            let seen = q.seen.lock().unwrap_or_else(|e| e.into_inner());
            q.accounted == Some(w.before) || seen.contains(&w.before)
        };
        match verdict(w, after, before_known) {
            Verdict::Clean => {
                q.accounted = Some(after);
                None
            }
            Verdict::Foreign(why) => Some(why),
        }
    }
}

impl Quiet {
    /// Before a transaction of `weight` operations: out of the group if it is large (or the
    /// second of this apply) and not out already.
    fn before_commit(&mut self, weight: usize) {
        self.commits = self.commits.saturating_add(1);
        if self.open.is_some() || !goes_quiet(weight, self.commits) {
            return;
        }
        // Without a generation to compare with, or out of the group, it stays as it was.
        let Ok(before) = generation() else { return };
        if membership(&self.member, libc::NETLINK_DROP_MEMBERSHIP).is_ok() {
            self.open = Some(Window {
                before,
                own: 0,
                failed: false,
            });
        }
    }

    fn after_commit(&mut self, ok: bool) {
        if let Some(w) = &mut self.open {
            match ok {
                true => w.own = w.own.saturating_add(1),
                false => w.failed = true,
            }
        }
    }
}

/// Pure: whether the `nth` transaction of an apply (from 1), weighing `weight` operations, is
/// written out of the notification group.
fn goes_quiet(weight: usize, nth: u32) -> bool {
    weight >= QUIET_WEIGHT || nth >= 2
}

/// What the generations say of a write out of the notification group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every commit meanwhile was the agent's own.
    Clean,
    /// Someone else may have committed unnotified: why.
    Foreign(String),
}

/// Pure: `w` and the generation read after re-joining; `before_known`: whether the commit
/// that made `w.before` was notified or already accounted for (it may have been under way when
/// the agent left, its notification lost). (A generation that cannot be read is foreign too:
/// [`QuietWrites::close`].)
pub fn verdict(w: Window, after: u32, before_known: bool) -> Verdict {
    if w.failed {
        return Verdict::Foreign(format!(
            "a transaction failed out of the notifications (generation {} to {after})",
            w.before
        ));
    }
    let commits = commits_between(w.before, after);
    if commits != w.own {
        return Verdict::Foreign(format!(
            "generation {} to {after}: {commits} commits, {} of them ferry's",
            w.before, w.own
        ));
    }
    if !before_known {
        return Verdict::Foreign(format!(
            "the commit of generation {} may have gone unnotified",
            w.before
        ));
    }
    Verdict::Clean
}

/// How many commits took the generation from `before` to `after` (the kernel skips 0 when
/// it wraps around).
pub fn commits_between(before: u32, after: u32) -> u32 {
    let d = after.wrapping_sub(before);
    if after < before {
        d.wrapping_sub(1)
    } else {
        d
    }
}

/// A backend whose large transactions go out of the notification group (see
/// [`QuietWrites`]); everything else passes through.
pub struct QuietBackend<B> {
    inner: B,
    state: Arc<Mutex<Quiet>>,
}

/// The operations of a transaction, as `ferry_nft::tables` weighs them.
fn steps_weight(steps: &[ferry_nft::backend::Step<'_>]) -> usize {
    use ferry_nft::backend::Step;
    use ferry_nft::tables::{weight, TableChange};
    steps
        .iter()
        .map(|s| match *s {
            Step::CreateTable(_) | Step::DeleteTable(_) => 1,
            Step::Ops { rs, ops, live } => {
                let t = TableChange {
                    rs,
                    create: false,
                    ops: Vec::new(),
                    live,
                };
                ops.iter().map(|o| weight(o, &t)).sum()
            }
        })
        .sum()
}

impl<B: ferry_nft::Backend> ferry_nft::Backend for QuietBackend<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn table_names(&mut self) -> Result<Vec<String>, ferry_nft::NftError> {
        self.inner.table_names()
    }
    fn read_table(&mut self, table: &str) -> Result<ferry_plan::LiveState, ferry_nft::NftError> {
        self.inner.read_table(table)
    }
    fn commit(
        &mut self,
        steps: &[ferry_nft::backend::Step<'_>],
    ) -> Result<std::time::Duration, ferry_nft::NftError> {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.before_commit(steps_weight(steps));
        let r = self.inner.commit(steps);
        q.after_commit(r.is_ok());
        r
    }
    fn take_refusal(&mut self) -> Option<String> {
        self.inner.take_refusal()
    }
    fn release_cache(&mut self) {
        self.inner.release_cache()
    }
    fn nft(&mut self) -> Option<&mut ferry_nft::Nft> {
        self.inner.nft()
    }
    fn spoil_netlink_batches(&mut self) {
        self.inner.spoil_netlink_batches()
    }
}

/// `setsockopt(SOL_NETLINK, opt, NFNLGRP_NFTABLES)`: joins or leaves the group.
fn membership(fd: &impl std::os::fd::AsRawFd, opt: libc::c_int) -> std::io::Result<()> {
    let group = NFNLGRP_NFTABLES;
    // SAFETY: setsockopt with an open descriptor and a u32 that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            opt,
            (&group as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The ruleset's generation now (`NFT_MSG_GETGEN` on a socket of its own, waiting at most a
/// second for the answer).
pub fn generation() -> std::io::Result<u32> {
    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    use std::os::fd::AsRawFd;
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with an open descriptor and a timeval that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.send(&getgen_request(1), 0)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    sock.recv(&mut buf, 0)?;
    gen_of_answer(&buf)
}

/// The GETGEN request: a netlink header, then nfgenmsg (family, version, resource: all 0).
fn getgen_request(seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&20u32.to_ne_bytes());
    m.extend_from_slice(&NFT_GETGEN.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0; 4]);
    m
}

/// Pure: the generation in the answer to a GETGEN, or the kernel's error.
fn gen_of_answer(datagram: &[u8]) -> std::io::Result<u32> {
    if let Some(c) = commits(datagram).first() {
        return Ok(c.gen);
    }
    let code = (datagram.len() >= 20
        && u16::from_ne_bytes([datagram[4], datagram[5]]) == libc::NLMSG_ERROR as u16)
        .then(|| i32::from_ne_bytes([datagram[16], datagram[17], datagram[18], datagram[19]]))
        .filter(|c| *c < 0);
    Err(match code {
        Some(c) => std::io::Error::from_raw_os_error(-c),
        None => std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no generation in the answer",
        ),
    })
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
                gen: 0,
                pid: 0,
                name: String::new(),
            };
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if atype == NFTA_GEN_ID && alen >= 8 {
                    commit.gen = u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]);
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
    fn newgen_notifications_carry_the_generation() {
        let c = commits(&newgen(4242)).remove(0);
        assert_eq!((c.gen, c.pid), (77, 4242));
        // The answer to GETGEN is the same message.
        assert_eq!(gen_of_answer(&newgen(1)).unwrap(), 77);
        // An error answer: the kernel's errno.
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert_eq!(
            gen_of_answer(&err).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(gen_of_answer(&[]).is_err() && gen_of_answer(&[0xff; 40]).is_err());
        // The request: header (length, type GETGEN, NLM_F_REQUEST, seq, pid), nfgenmsg.
        let r = getgen_request(9);
        assert_eq!(r.len(), 20);
        assert_eq!(u32::from_ne_bytes([r[0], r[1], r[2], r[3]]), 20);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), (10 << 8) | 16);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), 1);
        assert_eq!(u32::from_ne_bytes([r[8], r[9], r[10], r[11]]), 9);
    }

    #[test]
    fn only_large_or_cut_writes_leave_the_notifications() {
        // The usual change: one light transaction, in the group as before.
        assert!(!goes_quiet(3, 1));
        assert!(!goes_quiet(QUIET_WEIGHT - 1, 1));
        // A heavy transaction, or the second of one apply (a load cut into several).
        assert!(goes_quiet(QUIET_WEIGHT, 1));
        assert!(goes_quiet(2000, 1));
        assert!(goes_quiet(1, 2));
    }

    #[test]
    fn the_generation_tells_whether_someone_else_committed_meanwhile() {
        let w = |before, own| Window {
            before,
            own,
            failed: false,
        };
        // Every commit meanwhile was ours: clean (and nothing at all: clean too).
        assert_eq!(verdict(w(10, 125), 135, true), Verdict::Clean);
        assert_eq!(verdict(w(10, 0), 10, true), Verdict::Clean);
        // One more commit than ours: someone else's, unnotified.
        let v = verdict(w(10, 125), 136, true);
        assert!(
            matches!(&v, Verdict::Foreign(why) if why.contains("126 commits, 125 of them ferry's")),
            "{v:?}"
        );
        // Fewer than ours (one of ours changed nothing, or the generation was reset by a new
        // namespace...): not what was expected, so looked at.
        assert!(matches!(
            verdict(w(10, 125), 134, true),
            Verdict::Foreign(_)
        ));
        assert!(matches!(verdict(w(10, 2), 5, true), Verdict::Foreign(_)));
        // A failed transaction: whatever the count says.
        let failed = Window {
            failed: true,
            ..w(10, 3)
        };
        assert!(matches!(verdict(failed, 13, true), Verdict::Foreign(_)));
        // The commit that made `before` may have been under way (its notification lost).
        assert!(matches!(verdict(w(10, 3), 13, false), Verdict::Foreign(_)));
        // Across the wrap-around (the kernel skips generation 0).
        assert_eq!(commits_between(u32::MAX - 1, 2), 3);
        assert_eq!(commits_between(u32::MAX, 1), 1);
        assert_eq!(verdict(w(u32::MAX - 1, 3), 2, true), Verdict::Clean);
        assert_eq!(commits_between(5, 5), 0);
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
