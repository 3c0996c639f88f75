//! Membership over UDP: one background thread owns the socket and an [`Engine`], and publishes
//! who is alive.
//!
//! The thread sleeps on the socket until a datagram arrives or the engine's next timer is due
//! (at most [`TICK`]), passes `Instant::now()` to the engine, and sends what it produced. All
//! protocol logic is in [`crate::engine`]; this file is only the edge. Nothing a peer sends can
//! make it panic: malformed datagrams are counted in [`Stats`] and dropped.
//!
//! The socket is created in [`Membership::start`], on the calling thread, so a caller that has
//! entered a network namespace gets a socket in that namespace (the thread may run anywhere).

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::{Engine, NodeId, Peer, Stats, MAX_DATAGRAM};

/// The default UDP port (memberlist's).
pub const DEFAULT_PORT: u16 = 7946;

/// Longest the thread sleeps before checking whether it should stop.
pub const TICK: Duration = Duration::from_millis(20);

/// How a node takes part in the cluster. [`MemberConfig::new`] gives LAN timings that detect a
/// dead node in about 250-500 ms (median about 340 ms measured on loopback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberConfig {
    /// The Kubernetes node name (unique in the cluster).
    pub node_name: String,
    /// The address the socket binds to (the node's LAN address; port 0 picks one).
    pub bind: SocketAddr,
    /// The address peers send to, when it differs from `bind` (needed when binding 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Where to announce ourselves while we know no live member: typically every node's
    /// address. Our own address may be in the list.
    pub seeds: Vec<SocketAddr>,
    /// One peer is probed per period.
    pub probe_period: Duration,
    /// How long a direct probe waits for its ack before asking others to probe indirectly.
    pub probe_rtt: Duration,
    pub num_indirect_probes: usize,
    /// How long a suspect may refute before it is declared down.
    pub suspect_to_down_after: Duration,
    /// Pending updates are gossiped to `gossip_fanout` peers every `gossip_period`.
    pub gossip_period: Duration,
    pub gossip_fanout: usize,
    /// A heartbeat to every live peer each period: what [`Membership::heard_within`] measures.
    /// None: only SWIM traffic counts (too sparse for the quorum lease in larger clusters).
    pub heartbeat_period: Option<Duration>,
    /// Ask a live peer for its member list every period (discovery).
    pub announce_period: Duration,
    /// Announce to members we consider down every period, so that partitions heal.
    pub announce_down_period: Duration,
    /// While we know no live member, announce to the seeds every period.
    pub rejoin_period: Duration,
    /// Forget a down member's identity after this long.
    pub remove_down_after: Duration,
    /// Identity generation; by default nanoseconds since the epoch at start, so that a restarted
    /// agent supersedes its previous run. Must grow across restarts.
    pub boot_id: Option<u64>,
    /// Seed for foca's randomness (probe order, gossip targets); random by default.
    pub rng_seed: Option<u64>,
}

impl MemberConfig {
    /// LAN defaults: probe every 100 ms (ack within 40 ms), declare a suspect down after
    /// 150 ms, heartbeats every 40 ms.
    pub fn new(node_name: impl Into<String>, bind: SocketAddr) -> Self {
        MemberConfig {
            node_name: node_name.into(),
            bind,
            advertise: None,
            seeds: Vec::new(),
            probe_period: Duration::from_millis(100),
            probe_rtt: Duration::from_millis(40),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_millis(150),
            gossip_period: Duration::from_millis(50),
            gossip_fanout: 3,
            heartbeat_period: Some(Duration::from_millis(40)),
            announce_period: Duration::from_secs(1),
            announce_down_period: Duration::from_millis(500),
            rejoin_period: Duration::from_millis(250),
            remove_down_after: Duration::from_secs(3600),
            boot_id: None,
            rng_seed: None,
        }
    }

    /// The timings the agent ships for a LAN, for sub-second failover: a dead node is
    /// suspected after a missed 25 ms ack (probes every 60 ms) and declared down 100 ms later;
    /// gossip every 30 ms; heartbeats every 20 ms keep the quorum lease (81 ms, against an
    /// earliest takeover of 135 ms) well fed.
    pub fn with_lan_timings(mut self) -> MemberConfig {
        self.probe_period = Duration::from_millis(60);
        self.probe_rtt = Duration::from_millis(25);
        self.suspect_to_down_after = Duration::from_millis(100);
        self.gossip_period = Duration::from_millis(30);
        self.heartbeat_period = Some(Duration::from_millis(20));
        self
    }

    /// The earliest another node can declare this one down after it was cut off: its last
    /// successful probe may have started just before the cut (`probe_period - probe_rtt`), then
    /// the suspicion runs its course.
    pub fn min_takeover(&self) -> Duration {
        self.probe_period.saturating_sub(self.probe_rtt) + self.suspect_to_down_after
    }

    /// How recently a majority must have been heard from for this node to keep announcing:
    /// 3/5 of [`MemberConfig::min_takeover`] (126 ms with the defaults, against 210 ms), leaving
    /// the rest as margin for the agent to withdraw its announcements.
    pub fn quorum_lease(&self) -> Duration {
        self.min_takeover() * 3 / 5
    }

    /// Checks the values that would make foca or the lease misbehave.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return bad(format!("node name {:?}: 1 to 253 bytes", self.node_name));
        }
        let positive = [
            ("probe_period", self.probe_period),
            ("probe_rtt", self.probe_rtt),
            ("suspect_to_down_after", self.suspect_to_down_after),
            ("gossip_period", self.gossip_period),
            ("announce_period", self.announce_period),
            ("announce_down_period", self.announce_down_period),
            ("rejoin_period", self.rejoin_period),
            ("remove_down_after", self.remove_down_after),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return bad(format!("{name} must not be zero"));
            }
        }
        if self.probe_rtt >= self.probe_period {
            return bad("probe_rtt must be shorter than probe_period".into());
        }
        if let Some(h) = self.heartbeat_period {
            if h.is_zero() || h * 2 > self.quorum_lease() {
                return bad(format!(
                    "heartbeat_period {h:?} must be at most half the quorum lease {:?}",
                    self.quorum_lease()
                ));
            }
        }
        if self.advertise.is_none() && self.bind.ip().is_unspecified() {
            return bad(format!("bind {} is unspecified: set advertise", self.bind));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("membership config: {0}")]
    Config(String),
    #[error("bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("membership socket: {0}")]
    Io(#[from] io::Error),
}

const RUN: u8 = 0;
const LEAVE: u8 = 1;
const HALT: u8 = 2;

struct Inner {
    published: Mutex<Published>,
    changed: Condvar,
    stop: AtomicU8,
}

struct Published {
    alive: BTreeSet<String>,
    peers: Vec<Peer>,
    identity: NodeId,
    generation: u64,
    stats: Stats,
    subscribers: Vec<Sender<BTreeSet<String>>>,
    new_seeds: Option<Vec<SocketAddr>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Published> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running member of the cluster. Dropping it leaves the cluster (see [`Membership::stop`]).
pub struct Membership {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    name: String,
    local_addr: SocketAddr,
    lease: Duration,
}

impl Membership {
    /// Binds the socket (on the calling thread, in its network namespace) and starts the
    /// member's thread, which announces itself to the seeds.
    pub fn start(cfg: MemberConfig) -> Result<Membership, Error> {
        cfg.validate()?;
        let socket = UdpSocket::bind(cfg.bind).map_err(|source| Error::Bind {
            addr: cfg.bind,
            source,
        })?;
        let local_addr = socket.local_addr()?;
        let mut advertise = cfg.advertise.unwrap_or(local_addr);
        if advertise.port() == 0 {
            advertise.set_port(local_addr.port());
        }
        let boot = cfg.boot_id.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
        });
        let seed = cfg.rng_seed.unwrap_or_else(rand::random);
        let engine = Engine::new(&cfg, advertise, boot, seed, Instant::now());
        let inner = Arc::new(Inner {
            published: Mutex::new(Published {
                alive: engine.alive(),
                peers: Vec::new(),
                identity: engine.identity().clone(),
                generation: 0,
                stats: engine.stats(),
                subscribers: Vec::new(),
                new_seeds: None,
            }),
            changed: Condvar::new(),
            stop: AtomicU8::new(RUN),
        });
        let thread = std::thread::Builder::new()
            .name(format!("member-{}", cfg.node_name))
            .spawn({
                let inner = Arc::clone(&inner);
                move || run(socket, engine, &inner)
            })?;
        Ok(Membership {
            inner,
            thread: Some(thread),
            name: cfg.node_name.clone(),
            local_addr,
            lease: cfg.quorum_lease(),
        })
    }

    /// Our node name.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Our current identity (the boot id grows when we rejoin after being declared down).
    pub fn identity(&self) -> NodeId {
        self.inner.lock().identity.clone()
    }

    /// Names of the nodes not declared down (alive or suspect), ourselves included.
    pub fn alive(&self) -> BTreeSet<String> {
        self.inner.lock().alive.clone()
    }

    /// Live peers (not ourselves), with their state and when we last heard from them.
    pub fn peers(&self) -> Vec<Peer> {
        self.inner.lock().peers.clone()
    }

    /// Ourselves plus the live peers heard from within `max_age`: the view to count for the
    /// quorum of a node that is announcing (see [`crate::quorum`]).
    pub fn heard_within(&self, max_age: Duration) -> BTreeSet<String> {
        let now = Instant::now();
        let p = self.inner.lock();
        let mut names = BTreeSet::from([self.name.clone()]);
        for peer in &p.peers {
            if peer
                .last_heard
                .is_some_and(|t| now.saturating_duration_since(t) <= max_age)
            {
                names.insert(peer.name.clone());
            }
        }
        names
    }

    /// The configured [`MemberConfig::quorum_lease`].
    pub fn quorum_lease(&self) -> Duration {
        self.lease
    }

    /// When each live peer was last heard from (peers never heard from are left out).
    pub fn last_heard(&self) -> std::collections::BTreeMap<String, Instant> {
        let p = self.inner.lock();
        p.peers
            .iter()
            .filter_map(|peer| peer.last_heard.map(|t| (peer.name.clone(), t)))
            .collect()
    }

    /// [`Membership::heard_within`] the configured [`MemberConfig::quorum_lease`].
    pub fn lease_view(&self) -> BTreeSet<String> {
        self.heard_within(self.lease)
    }

    /// Increases every time the alive set changes.
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    pub fn stats(&self) -> Stats {
        self.inner.lock().stats
    }

    /// A channel that receives the alive set now and after every change.
    pub fn subscribe(&self) -> Receiver<BTreeSet<String>> {
        let (tx, rx) = mpsc::channel();
        let mut p = self.inner.lock();
        // A fresh channel cannot be disconnected.
        let _ = tx.send(p.alive.clone());
        p.subscribers.push(tx);
        rx
    }

    /// Waits up to `timeout` for the alive set to satisfy `pred`; returns it, or None on time-out.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&BTreeSet<String>) -> bool,
    ) -> Option<BTreeSet<String>> {
        let deadline = Instant::now() + timeout;
        let mut p = self.inner.lock();
        loop {
            if pred(&p.alive) {
                return Some(p.alive.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            p = self
                .inner
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Replaces the seed addresses (e.g. when Node objects change).
    pub fn set_seeds(&self, seeds: Vec<SocketAddr>) {
        self.inner.lock().new_seeds = Some(seeds);
    }

    /// Leaves the cluster (peers see us gone at once) and stops the thread.
    pub fn stop(mut self) {
        self.shutdown(LEAVE);
    }

    /// Stops without a word to the peers, as a crash would: they notice through the failure
    /// detector. For tests and for an agent that knows its network is unusable.
    pub fn halt(mut self) {
        self.shutdown(HALT);
    }

    fn shutdown(&mut self, how: u8) {
        self.inner.stop.store(how, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The thread does not panic on its own; if it did, there is nothing left to stop.
            let _ = t.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.shutdown(LEAVE);
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("name", &self.name)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// The member's thread.
fn run(socket: UdpSocket, mut engine: Engine, inner: &Inner) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut send_errors = 0u64;
    loop {
        match inner.stop.load(Ordering::SeqCst) {
            RUN => {}
            LEAVE => {
                engine.leave(Instant::now());
                flush(&socket, &mut engine, &mut send_errors);
                break;
            }
            _ => break,
        }
        let now = Instant::now();
        let wake = engine
            .next_wakeup()
            .map_or(now + TICK, |w| w.min(now + TICK));
        let timeout = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        if socket.set_read_timeout(Some(timeout)).is_err() {
            std::thread::sleep(timeout);
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => engine.handle_datagram(Instant::now(), from, &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // E.g. ICMP errors reported on the socket: nothing to do but not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
        engine.handle_timers(Instant::now());
        flush(&socket, &mut engine, &mut send_errors);
        publish(inner, &mut engine, send_errors);
    }
    let mut p = inner.lock();
    p.alive = BTreeSet::new();
    p.peers.clear();
    p.generation += 1;
    p.subscribers.clear();
    inner.changed.notify_all();
}

fn flush(socket: &UdpSocket, engine: &mut Engine, send_errors: &mut u64) {
    for (to, data) in engine.drain_outbox() {
        if socket.send_to(&data, to).is_err() {
            *send_errors += 1;
        }
    }
}

fn publish(inner: &Inner, engine: &mut Engine, send_errors: u64) {
    let changed = engine.take_changed();
    let mut p = inner.lock();
    if let Some(seeds) = p.new_seeds.take() {
        engine.set_seeds(seeds);
    }
    p.peers = engine.peers();
    p.stats = engine.stats();
    p.stats.send_errors = send_errors;
    if changed {
        p.identity = engine.identity().clone();
        let alive = engine.alive();
        if alive != p.alive {
            p.alive = alive.clone();
            p.generation += 1;
            p.subscribers.retain(|s| s.send(alive.clone()).is_ok());
            inner.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MemberConfig {
        MemberConfig::new("node-a", "127.0.0.1:0".parse().expect("addr"))
    }

    #[test]
    fn membership_can_be_shared_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<Membership>();
    }

    #[test]
    fn defaults_are_valid_and_leave_a_margin() {
        let c = cfg();
        c.validate().expect("defaults");
        assert_eq!(c.min_takeover(), Duration::from_millis(210));
        assert_eq!(c.quorum_lease(), Duration::from_millis(126));
        let c = cfg().with_lan_timings();
        c.validate().expect("LAN timings");
        assert_eq!(c.min_takeover(), Duration::from_millis(135));
        assert_eq!(c.quorum_lease(), Duration::from_millis(81));
    }

    #[test]
    fn invalid_configs_are_refused() {
        let mut c = cfg();
        c.node_name.clear();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.probe_rtt = c.probe_period;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.heartbeat_period = Some(Duration::from_millis(100));
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.bind = "0.0.0.0:7946".parse().expect("addr");
        assert!(matches!(
            Membership::start(c.clone()),
            Err(Error::Config(_))
        ));
        c.advertise = Some("127.0.0.1:7946".parse().expect("addr"));
        c.validate().expect("advertised");
        let mut c = cfg();
        c.suspect_to_down_after = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_lone_member_sees_itself_and_stops() {
        let m = Membership::start(cfg()).expect("start");
        assert_eq!(m.alive(), BTreeSet::from(["node-a".to_string()]));
        assert_eq!(m.lease_view(), m.alive());
        assert!(m.peers().is_empty());
        assert!(m.local_addr().port() != 0);
        m.stop();
    }
}
