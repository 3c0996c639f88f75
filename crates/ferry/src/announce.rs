//! The layer-2 edge: a thread of its own that runs membership, the election and the
//! hold-down/hand-over timing ([`ferry_announce`]) and tells the raw-socket responders
//! ([`ferry_l2::Responder`]) what to answer, and until when.
//!
//! Nothing here waits for the dataplane: the sync loop only *sends* this thread the latest
//! inputs ([`L2Config`]: Node objects, pools, addresses in use, the node's address and
//! interface) and reads back its [`L2Status`]. The thread wakes on membership changes, new
//! inputs, its own deadlines, and shortly before the responders' ownership lease runs out,
//! to renew it from what membership last heard. If the thread or membership
//! ever stalls, the lease runs out and the responders fall silent by themselves: a node never
//! keeps answering after the others may have taken over. It does no file I/O and writes no
//! log line itself (lines are queued for the log writer thread).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_announce::{decide, Event, Holder, L2Input, LbAddress, Timing};
use ferry_member::{quorum_lease, MemberConfig, Membership};
use ferry_model::pools::PoolConfig;
use ferry_model::Node;

/// How long before the responders' lease runs out the thread renews it, for the short
/// leases of a multi-node cluster (the last heartbeats + ~80 ms; heartbeats come every
/// 20 ms, so each renewal moves it on by 50-80 ms and the thread wakes ~20 times a second).
const RENEW_AHEAD: Duration = Duration::from_millis(30);

/// The same for the long lease of a node that is a majority by itself (capped at 1 s).
const RENEW_AHEAD_LONG: Duration = Duration::from_millis(250);

/// How often a gossiping node that owns nothing re-reads its views.
const QUORUM_POLL: Duration = Duration::from_millis(100);

/// The shortest sleep (a lease already about to run out is renewed at once, not in a loop).
const MIN_SLEEP: Duration = Duration::from_millis(5);

/// The longest the thread goes without a full step.
const IDLE_STEP: Duration = Duration::from_secs(1);

/// What the election reads from the model; sent by the sync loop after every sync.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct L2Config {
    pub nodes: Vec<Node>,
    pub pools: PoolConfig,
    pub addresses: Vec<LbAddress>,
    /// The node's address for gossip (IPv4 preferred).
    pub my_ip: Option<IpAddr>,
    /// The interface holding the node's address (default announcing interface).
    pub default_iface: Option<String>,
    /// Addresses this node must never answer for, with why: its own addresses, its gateways,
    /// every node's address. A pool that covers them (a typo, a pool over the LAN) must not
    /// make this node claim its router or a neighbour.
    pub never_announce: BTreeMap<IpAddr, String>,
}

/// What the thread did last, for the status file, metrics and logs.
#[derive(Debug, Clone, Default)]
pub struct L2Status {
    pub owned: BTreeSet<IpAddr>,
    pub quorum: bool,
    pub alive: BTreeSet<String>,
    /// Addresses newly taken over since start.
    pub takeovers: u64,
    pub responders: BTreeMap<String, ferry_l2::Counters>,
    pub member_stats: Option<ferry_member::Stats>,
    /// Nodes in the cluster (Node objects; 1 without any).
    pub cluster_size: usize,
    /// When the thread last stepped (it steps at least every second).
    pub last_step: Option<Instant>,
}

enum Msg {
    Config(Box<L2Config>),
    Membership,
    Stop,
}

/// Handle on the layer-2 thread.
pub struct Announcer {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<L2Status>>,
}

impl Announcer {
    /// Starts the thread; it announces nothing until it gets an [`L2Config`]. `changed` is
    /// called (from the thread: it must not block) whenever the owned addresses change.
    pub fn start(
        me: &str,
        port: u16,
        changed: impl Fn() + Send + 'static,
    ) -> std::io::Result<Announcer> {
        let (tx, rx) = channel();
        let status = Arc::new(Mutex::new(L2Status::default()));
        let mut t = L2Thread {
            me: me.to_string(),
            port,
            tx: tx.clone(),
            holder: Holder::new(me, Timing::default()),
            cfg: None,
            membership: None,
            responders: BTreeMap::new(),
            status: Arc::clone(&status),
            changed: Box::new(changed),
            applied: BTreeMap::new(),
            seen: None,
            last_full: None,
            valid_until: None,
            deadline: None,
            refused: BTreeSet::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ferry-l2-control".into())
            .spawn(move || t.run(rx))?;
        Ok(Announcer {
            tx,
            thread: Some(thread),
            status,
        })
    }

    /// Replaces the election's inputs (never blocks).
    pub fn update(&self, cfg: L2Config) {
        let _ = self.tx.send(Msg::Config(Box::new(cfg)));
    }

    pub fn status(&self) -> L2Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Withdraws everything, leaves the membership and joins the thread.
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct L2Thread {
    me: String,
    port: u16,
    tx: Sender<Msg>,
    holder: Holder,
    cfg: Option<L2Config>,
    membership: Option<(IpAddr, Membership)>,
    responders: BTreeMap<String, ferry_l2::Responder>,
    status: Arc<Mutex<L2Status>>,
    changed: Box<dyn Fn() + Send>,
    /// What each responder was last given.
    applied: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The views (alive, heard within the lease) of the last full step, and when it ran.
    seen: Option<(BTreeSet<String>, BTreeSet<String>)>,
    last_full: Option<Instant>,
    /// The lease the responders hold.
    valid_until: Option<Instant>,
    /// The holder's next deadline as of the last full step.
    deadline: Option<Instant>,
    /// Addresses won but refused (reported once each).
    refused: BTreeSet<IpAddr>,
}

impl L2Thread {
    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let now = Instant::now();
            let wake = self.next_wake(now);
            let first = rx.recv_timeout(wake.saturating_duration_since(now));
            let mut msgs: Vec<Msg> = Vec::new();
            match first {
                Ok(m) => msgs.push(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            msgs.extend(rx.try_iter());
            let mut stop = false;
            let mut full = false;
            for m in msgs {
                match m {
                    Msg::Config(c) => {
                        self.ensure_membership(c.my_ip, &c.nodes);
                        self.cfg = Some(*c);
                        full = true;
                    }
                    Msg::Membership => full = true,
                    Msg::Stop => stop = true,
                }
            }
            if stop {
                break;
            }
            let now = Instant::now();
            // The holder's deadlines (end of a hold-down or hand-over) need a full step.
            full |= self.deadline.is_some_and(|t| now >= t)
                || self.last_full.is_none_or(|t| now >= t + IDLE_STEP);
            self.step(now, full);
        }
        self.stop();
    }

    /// When to step next without new input: at least once a second (liveness), at the
    /// holder's deadlines, shortly before the responders' lease runs out while owning
    /// (membership heartbeats move it on), and every [`QUORUM_POLL`] while gossiping (to see
    /// the majority come back).
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + IDLE_STEP;
        if let Some(t) = self.deadline {
            wake = wake.min(t.max(now));
        }
        if self.membership.is_some() {
            wake = wake.min(now + QUORUM_POLL);
        }
        if let Some(t) = self.valid_until {
            let ahead = if t > now + Duration::from_millis(500) {
                RENEW_AHEAD_LONG
            } else {
                RENEW_AHEAD
            };
            let at = t.checked_sub(ahead).unwrap_or(t);
            wake = wake.min(at.max(now + MIN_SLEEP));
        }
        wake
    }

    /// One election and hand-over step, and the responders updated; or, when nothing the
    /// election reads has changed (`full` false and the same views), only the lease renewed.
    fn step(&mut self, now: Instant, full: bool) {
        let Some(cfg) = &self.cfg else { return };
        let cluster: BTreeSet<String> = if cfg.nodes.is_empty() {
            // With no Node objects at all (a single machine), this node is the cluster.
            [self.me.clone()].into()
        } else {
            cfg.nodes.iter().map(|n| n.meta.name.clone()).collect()
        };
        let (mut alive, heard, lease_len) = match &self.membership {
            Some((_, m)) => (m.alive(), m.last_heard(), m.quorum_lease()),
            None => (BTreeSet::new(), BTreeMap::new(), Duration::ZERO),
        };
        alive.insert(self.me.clone());
        // One reading of the last-heard times gives both the view the election counts and
        // the deadline the responders enforce.
        let lease = quorum_lease(&self.me, &heard, &cluster, lease_len, now);
        let mut lease_view: BTreeSet<String> = heard
            .iter()
            .filter(|(_, t)| **t + lease_len > now)
            .map(|(n, _)| n.clone())
            .collect();
        lease_view.insert(self.me.clone());
        let views = (alive, lease_view);
        if !full && self.seen.as_ref() == Some(&views) {
            // Same views, same decision: only move the lease on.
            let until = self.holder.valid_until(now, lease);
            if until != self.valid_until {
                for r in self.responders.values() {
                    r.renew(until);
                }
                self.valid_until = until;
            }
            return;
        }
        let (alive, lease_view) = views;
        let d = decide(&L2Input {
            me: &self.me,
            nodes: &cfg.nodes,
            alive: &alive,
            lease: &lease_view,
            pools: &cfg.pools,
            addresses: &cfg.addresses,
        });
        // Never claim this node's own addresses, its gateways or another node's address.
        let mut d = d;
        let mut refused = BTreeSet::new();
        for ips in d.owned.values_mut() {
            ips.retain(|ip| match cfg.never_announce.get(ip) {
                Some(why) => {
                    refused.insert((*ip, why.clone()));
                    false
                }
                None => true,
            });
        }
        d.owned.retain(|_, ips| !ips.is_empty());
        for (ip, why) in &refused {
            if self.refused.insert(*ip) {
                log!("error: not announcing {ip}: it is {why}; remove it from its address pool");
            }
        }
        self.refused
            .retain(|ip| refused.iter().any(|(r, _)| r == ip));
        let default_iface = cfg.default_iface.clone();
        if !cfg.addresses.is_empty() {
            // Ready before this node wins anything: a takeover is then one set_owned.
            if let Some(i) = &default_iface {
                self.ensure_responder(i);
            }
        }
        let step = self
            .holder
            .step(now, &d, &alive, lease, default_iface.as_deref());
        let mut takeovers = 0;
        for e in &step.events {
            match e {
                Event::Announce { iface, ip } => {
                    takeovers += 1;
                    log!("announcing {ip} on {iface}");
                }
                Event::Withdraw { iface, ip } => log!("withdrawing {ip} from {iface}"),
                Event::Quorum(true) => log!("membership: this node hears a majority of the cluster"),
                Event::Quorum(false) => log!(
                    "membership: this node does not hear a majority of the cluster: it announces nothing"
                ),
                Event::NoInterface(ips) => {
                    log!("error: no interface holds this node's address; cannot announce {ips:?}")
                }
            }
        }
        self.apply(&step.owned, step.valid_until);
        self.valid_until = step.valid_until;
        self.last_full = Some(now);
        self.deadline = self.holder.poll_timeout(now);
        self.seen = Some((alive.clone(), lease_view));
        let owned: BTreeSet<IpAddr> = step.owned.values().flatten().copied().collect();
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let changed = st.owned != owned;
        st.owned = owned;
        st.quorum = self.holder.quorum();
        st.alive = alive;
        st.takeovers += takeovers;
        st.responders = self
            .responders
            .iter()
            .map(|(i, r)| (i.clone(), r.counters()))
            .collect();
        st.member_stats = self.membership.as_ref().map(|(_, m)| m.stats());
        st.cluster_size = cluster.len();
        st.last_step = Some(now);
        drop(st);
        if changed {
            (self.changed)();
        }
    }

    /// Responders answer for exactly `owned`, until `valid_until`. A responder, once started,
    /// stays (answering for nothing when it owns nothing): a takeover then costs no socket or
    /// thread start.
    fn apply(&mut self, owned: &BTreeMap<String, BTreeSet<IpAddr>>, valid_until: Option<Instant>) {
        let ifaces: BTreeSet<String> = owned.keys().chain(self.applied.keys()).cloned().collect();
        for iface in ifaces {
            let new = owned.get(&iface).cloned().unwrap_or_default();
            if !new.is_empty() {
                self.ensure_responder(&iface);
            }
            let Some(r) = self.responders.get(&iface) else {
                self.applied.remove(&iface);
                continue;
            };
            if self.applied.get(&iface) == Some(&new) {
                r.renew(valid_until);
            } else {
                r.set_owned_until(new.clone(), valid_until);
                self.applied.insert(iface.clone(), new);
            }
        }
    }

    /// Starts a responder on `iface` unless one runs there.
    fn ensure_responder(&mut self, iface: &str) {
        if self.responders.contains_key(iface) {
            return;
        }
        match ferry_l2::Responder::start(iface) {
            Ok(r) => {
                self.responders.insert(iface.to_string(), r);
            }
            Err(e) => log!("error: cannot answer ARP/NDP on {iface}: {e}"),
        }
    }

    /// Starts (or restarts, when this node's address changed) the membership layer, seeded
    /// with the other nodes' addresses.
    fn ensure_membership(&mut self, my_ip: Option<IpAddr>, nodes: &[Node]) {
        let Some(ip) = my_ip else { return };
        let seeds: Vec<SocketAddr> = nodes
            .iter()
            .filter(|n| n.meta.name != self.me)
            .filter_map(|n| {
                n.internal_ips()
                    .into_iter()
                    .find(|a| a.is_ipv4() == ip.is_ipv4())
            })
            .map(|a| SocketAddr::new(a, self.port))
            .collect();
        if let Some((bound, m)) = &self.membership {
            if *bound == ip {
                m.set_seeds(seeds);
                return;
            }
        }
        if let Some((_, m)) = self.membership.take() {
            m.stop();
        }
        // LAN timings for sub-second failover (lease 81 ms, earliest takeover 135 ms); the
        // membership tests run with the same values.
        let mut cfg =
            MemberConfig::new(self.me.clone(), SocketAddr::new(ip, self.port)).with_lan_timings();
        cfg.seeds = seeds;
        match Membership::start(cfg) {
            Ok(m) => {
                log!("membership: gossiping on {ip}:{} (SWIM)", self.port);
                // Membership changes wake this thread at once.
                let events = m.subscribe();
                let tx = self.tx.clone();
                let _ = std::thread::Builder::new()
                    .name("ferry-l2-events".into())
                    .spawn(move || {
                        for _ in events {
                            if tx.send(Msg::Membership).is_err() {
                                break;
                            }
                        }
                    });
                self.membership = Some((ip, m));
            }
            Err(e) => log!("error: membership on {ip}:{}: {e}", self.port),
        }
    }

    /// Stops answering (agent shutdown): the other nodes take over when they see this one leave.
    fn stop(&mut self) {
        for e in self.holder.withdraw_all() {
            if let Event::Withdraw { iface, ip } = e {
                log!("withdrawing {ip} from {iface}");
            }
        }
        for (_, r) in std::mem::take(&mut self.responders) {
            r.set_owned(BTreeSet::new());
            r.stop();
        }
        if let Some((_, m)) = self.membership.take() {
            m.stop();
        }
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .owned
            .clear();
    }
}

/// Writes `announcements/<node>.json`: what this node announces (see
/// [`ferry_announce::claims`]).
pub fn write_status(path: &std::path::Path, node: &str, owned: &BTreeSet<IpAddr>) {
    ferry_announce::claims::write(path, node, owned);
}

/// Which nodes announce which addresses (see [`ferry_announce::claims`]).
pub fn read_announcers(dir: &std::path::Path) -> BTreeMap<IpAddr, Vec<String>> {
    ferry_announce::claims::read(dir)
}
