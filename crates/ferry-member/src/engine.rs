//! The membership state machine, without I/O: SWIM (via `foca`) plus the bits around it that
//! ferry needs. Time is passed in and datagrams go in and out as byte slices, so it runs the
//! same in the UDP thread of [`crate::Membership`] and in deterministic simulations.
//!
//! Around foca it adds:
//! - an envelope (`fry` + a kind byte) so stray datagrams on the port are dropped cheaply and
//!   counted, never fed to the decoder of another protocol version;
//! - a timer wheel (deadlines computed from the `now` passed in; foca only says "after");
//! - joining: while it knows no live member, it announces itself to the seeds every
//!   `rejoin_period`; when every member it knew is gone (it was cut off), it starts over with a
//!   fresh foca and a renewed identity (boot id + 1), so that stale "down" records on either side
//!   do not slow the heal down;
//! - heartbeats: a tiny datagram to every live member every `heartbeat_period`, so that each
//!   node knows when it last heard from each peer ([`Engine::heard_within`], the quorum lease).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::{Duration, Instant};

use foca::{
    AccumulatingRuntime, Foca, Identity, NoCustomBroadcast, OwnedNotification, PeriodicParams,
    PostcardCodec, State, Timer,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::MemberConfig;

/// First bytes of every datagram: `fry` and a kind.
const MAGIC: &[u8; 3] = b"fry";
const KIND_SWIM: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
/// Size of the envelope in front of a SWIM payload.
pub const ENVELOPE_LEN: usize = MAGIC.len() + 1;
/// Largest datagram sent or accepted (envelope included): below a 1500-byte Ethernet MTU.
pub const MAX_DATAGRAM: usize = 1400;

/// A member's identity on the wire: its name, the address it listens on, and a boot id that
/// grows with every (re)start, so that a restarted agent replaces its previous incarnation at
/// once instead of waiting for it to be forgotten.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct NodeId {
    pub name: String,
    pub addr: SocketAddr,
    pub boot: u64,
}

impl Identity for NodeId {
    /// Members are keyed by address: a seed is known by its address only (see
    /// [`Engine::new`]), and foca accepts an announce sent to any identity with its address.
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            name: self.name.clone(),
            addr: self.addr,
            boot: self.boot.checked_add(1)?,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.boot > adversary.boot
    }
}

/// What a node knows of a live peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    /// Suspect: a probe failed; it is declared down unless it refutes in time.
    pub suspect: bool,
    /// When a datagram (SWIM or heartbeat) from it last arrived.
    pub last_heard: Option<Instant>,
}

/// Counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// Datagrams without our envelope (stray traffic, garbage): dropped.
    pub garbage: u64,
    /// Datagrams with our envelope that foca refused (undecodable, too big, from ourselves).
    pub rejected: u64,
    pub heartbeats_in: u64,
    /// Errors foca returned from timers or announces (logged as counts only).
    pub internal_errors: u64,
    /// Times this node started over after losing every member.
    pub restarts: u64,
    /// Times foca renewed our identity after the cluster declared us down.
    pub renewals: u64,
    /// Datagrams the socket failed to send (set by [`crate::Membership`]).
    pub send_errors: u64,
}

type Swim = Foca<NodeId, PostcardCodec, StdRng, NoCustomBroadcast>;

struct Scheduled {
    at: Instant,
    seq: u64,
    timer: Timer<NodeId>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One member's SWIM state machine plus its timers and outgoing datagrams.
pub struct Engine {
    swim: Swim,
    runtime: AccumulatingRuntime<NodeId>,
    swim_config: foca::Config,
    rng: StdRng,
    timers: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    heard: HashMap<SocketAddr, Instant>,
    seeds: Vec<SocketAddr>,
    heartbeat_period: Option<Duration>,
    next_heartbeat: Instant,
    rejoin_period: Duration,
    next_rejoin: Instant,
    restart_pending: bool,
    gossip_now: bool,
    left: bool,
    changed: bool,
    stats: Stats,
}

/// The foca configuration for a [`MemberConfig`].
pub(crate) fn swim_config(cfg: &MemberConfig) -> foca::Config {
    let nz = |n: usize| NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN);
    let mut c = foca::Config::simple();
    c.probe_period = cfg.probe_period;
    c.probe_rtt = cfg.probe_rtt;
    c.num_indirect_probes = nz(cfg.num_indirect_probes);
    c.max_transmissions = NonZeroU8::new(8).unwrap_or(NonZeroU8::MIN);
    c.suspect_to_down_after = cfg.suspect_to_down_after;
    c.remove_down_after = Some(cfg.remove_down_after);
    c.max_packet_size = nz(MAX_DATAGRAM - ENVELOPE_LEN);
    c.notify_down_members = true;
    c.periodic_announce = Some(PeriodicParams {
        frequency: cfg.announce_period,
        num_members: nz(1),
    });
    c.periodic_announce_to_down_members = Some(PeriodicParams {
        frequency: cfg.announce_down_period,
        num_members: nz(2),
    });
    c.periodic_gossip = Some(PeriodicParams {
        frequency: cfg.gossip_period,
        num_members: nz(cfg.gossip_fanout),
    });
    c
}

impl Engine {
    /// A member named `cfg.node_name`, reachable at `addr` (the address peers send to), with
    /// boot id `boot`. It announces itself to the seeds right away (see [`Engine::drain_outbox`]).
    pub fn new(
        cfg: &MemberConfig,
        addr: SocketAddr,
        boot: u64,
        rng_seed: u64,
        now: Instant,
    ) -> Self {
        let swim_config = swim_config(cfg);
        let mut rng = StdRng::seed_from_u64(rng_seed);
        let id = NodeId {
            name: cfg.node_name.clone(),
            addr,
            boot,
        };
        let swim = Foca::new(
            id,
            swim_config.clone(),
            StdRng::seed_from_u64(rng.next_u64()),
            PostcardCodec,
        );
        let mut engine = Engine {
            swim,
            runtime: AccumulatingRuntime::new(),
            swim_config,
            rng,
            timers: BinaryHeap::new(),
            next_seq: 0,
            outbox: Vec::new(),
            heard: HashMap::new(),
            seeds: cfg.seeds.clone(),
            heartbeat_period: cfg.heartbeat_period,
            next_heartbeat: now,
            rejoin_period: cfg.rejoin_period,
            next_rejoin: now,
            restart_pending: false,
            gossip_now: false,
            left: false,
            changed: true,
            stats: Stats::default(),
        };
        engine.handle_timers(now);
        engine
    }

    /// Our current identity.
    pub fn identity(&self) -> &NodeId {
        self.swim.identity()
    }

    /// Replaces the seed addresses (our own address is skipped when announcing).
    pub fn set_seeds(&mut self, seeds: Vec<SocketAddr>) {
        self.seeds = seeds;
    }

    /// Feeds one datagram received from `from`. Anything malformed is counted and dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.stats.datagrams_in += 1;
        if self.left {
            return;
        }
        if data.len() > MAX_DATAGRAM {
            self.stats.rejected += 1;
            return;
        }
        let (kind, payload) = match data {
            [a, b, c, kind, rest @ ..] if [*a, *b, *c] == *MAGIC => (*kind, rest),
            _ => {
                self.stats.garbage += 1;
                return;
            }
        };
        match kind {
            KIND_SWIM => match self.swim.handle_data(payload, &mut self.runtime) {
                Ok(()) => {
                    self.heard.insert(from, now);
                }
                Err(_) => self.stats.rejected += 1,
            },
            KIND_HEARTBEAT if payload.is_empty() => {
                // Only live members' heartbeats count (and only they take memory).
                if self.swim.iter_members().any(|m| m.id().addr == from) {
                    self.stats.heartbeats_in += 1;
                    self.heard.insert(from, now);
                }
            }
            _ => self.stats.garbage += 1,
        }
        self.after_swim(now);
    }

    /// Runs whatever is due at `now`: foca's timers, joining, heartbeats.
    pub fn handle_timers(&mut self, now: Instant) {
        if self.left {
            return;
        }
        // Bounded: a timer could (in theory) schedule another one with no delay.
        for _ in 0..10_000 {
            match self.timers.peek() {
                Some(Reverse(s)) if s.at <= now => {}
                _ => break,
            }
            let Some(Reverse(s)) = self.timers.pop() else {
                break;
            };
            if self.swim.handle_timer(s.timer, &mut self.runtime).is_err() {
                self.stats.internal_errors += 1;
            }
            self.after_swim(now);
        }
        if self.swim.num_members() == 0 && now >= self.next_rejoin {
            self.next_rejoin = now + self.rejoin_period;
            let own = self.identity().addr;
            let seeds: Vec<SocketAddr> = self.seeds.iter().copied().filter(|s| *s != own).collect();
            for seed in seeds {
                // The name is unknown; foca accepts an announce by address.
                let dst = NodeId {
                    name: String::new(),
                    addr: seed,
                    boot: 0,
                };
                if self.swim.announce(dst, &mut self.runtime).is_err() {
                    self.stats.internal_errors += 1;
                }
                self.after_swim(now);
            }
        }
        if let Some(period) = self.heartbeat_period {
            if now >= self.next_heartbeat {
                self.next_heartbeat = now + period;
                let peers: Vec<SocketAddr> =
                    self.swim.iter_members().map(|m| m.id().addr).collect();
                self.heard.retain(|a, _| peers.contains(a));
                for addr in peers {
                    let mut d = MAGIC.to_vec();
                    d.push(KIND_HEARTBEAT);
                    self.outbox.push((addr, d));
                }
            }
        }
    }

    /// When [`Engine::handle_timers`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.left {
            return None;
        }
        let mut next = self.timers.peek().map(|Reverse(s)| s.at);
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.swim.num_members() == 0 {
            consider(self.next_rejoin);
        }
        if self.heartbeat_period.is_some() && self.swim.num_members() > 0 {
            consider(self.next_heartbeat);
        }
        next
    }

    /// Datagrams to send: (destination, bytes).
    pub fn drain_outbox(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.stats.datagrams_out += self.outbox.len() as u64;
        std::mem::take(&mut self.outbox)
    }

    /// Leaves the cluster: tells a few members we are going (so they don't wait for the failure
    /// detector), then stops reacting to anything.
    pub fn leave(&mut self, now: Instant) {
        if self.left {
            return;
        }
        // Set first: leaving makes foca report itself defunct, which must not restart us.
        self.left = true;
        if self.swim.leave_cluster(&mut self.runtime).is_err() {
            self.stats.internal_errors += 1;
        }
        self.drain(now);
        self.timers.clear();
        self.changed = true;
    }

    /// Names of the members not declared down (alive or suspect), ourselves included. After
    /// [`Engine::leave`], empty.
    pub fn alive(&self) -> BTreeSet<String> {
        if self.left {
            return BTreeSet::new();
        }
        std::iter::once(self.identity().name.clone())
            .chain(self.swim.iter_members().map(|m| m.id().name.clone()))
            .collect()
    }

    /// The live peers (not ourselves).
    pub fn peers(&self) -> Vec<Peer> {
        if self.left {
            return Vec::new();
        }
        self.swim
            .iter_members()
            .map(|m| Peer {
                name: m.id().name.clone(),
                addr: m.id().addr,
                suspect: m.state() == State::Suspect,
                last_heard: self.heard.get(&m.id().addr).copied(),
            })
            .collect()
    }

    /// Ourselves plus the live peers heard from within `max_age` of `now`.
    pub fn heard_within(&self, now: Instant, max_age: Duration) -> BTreeSet<String> {
        if self.left {
            return BTreeSet::new();
        }
        let mut names = BTreeSet::from([self.identity().name.clone()]);
        for p in self.peers() {
            if p.last_heard
                .is_some_and(|t| now.saturating_duration_since(t) <= max_age)
            {
                names.insert(p.name);
            }
        }
        names
    }

    /// True once if the live set may have changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Starts over after losing every member: a fresh foca (no stale "down" records) with a
    /// renewed identity, announcing to the seeds.
    fn restart(&mut self, now: Instant) {
        self.restart_pending = false;
        let Some(id) = self.identity().renew() else {
            return;
        };
        self.swim = Foca::new(
            id,
            self.swim_config.clone(),
            StdRng::seed_from_u64(self.rng.next_u64()),
            PostcardCodec,
        );
        self.timers.clear();
        self.heard.clear();
        self.next_rejoin = now;
        self.stats.restarts += 1;
        self.changed = true;
    }

    /// After every call into foca: collect its output, and start over if it asked for it.
    fn after_swim(&mut self, now: Instant) {
        self.drain(now);
        if std::mem::take(&mut self.gossip_now) && !self.left {
            // Spread news of a death right away rather than at the next gossip tick: every
            // node should stop counting the dead one as soon as possible.
            if self.swim.gossip(&mut self.runtime).is_err() {
                self.stats.internal_errors += 1;
            }
            self.drain(now);
        }
        if self.restart_pending {
            self.restart(now);
        }
    }

    /// Moves what foca produced into our outbox, timers and flags.
    fn drain(&mut self, now: Instant) {
        while let Some((to, data)) = self.runtime.to_send() {
            let mut d = Vec::with_capacity(ENVELOPE_LEN + data.len());
            d.extend_from_slice(MAGIC);
            d.push(KIND_SWIM);
            d.extend_from_slice(&data);
            self.outbox.push((to.addr, d));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.next_seq += 1;
            self.timers.push(Reverse(Scheduled {
                at: now + after,
                seq: self.next_seq,
                timer,
            }));
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                OwnedNotification::MemberDown(_) => {
                    self.changed = true;
                    self.gossip_now = true;
                }
                OwnedNotification::MemberUp(_) | OwnedNotification::Rename(_, _) => {
                    self.changed = true;
                }
                OwnedNotification::Rejoin(_) => {
                    self.stats.renewals += 1;
                    self.changed = true;
                }
                // Every member we knew is gone, or we were declared down and could not renew:
                // start over (not after leaving: then we stay out).
                OwnedNotification::Idle | OwnedNotification::Defunct => {
                    if !self.left {
                        self.restart_pending = true;
                    }
                }
                OwnedNotification::Active => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic network of engines in virtual time.
    struct Sim {
        t0: Instant,
        now: Instant,
        nodes: Vec<Option<Engine>>,
        addrs: Vec<SocketAddr>,
        in_flight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
        /// Nodes cut off from everyone.
        isolated: BTreeSet<usize>,
        latency: Duration,
    }

    fn cfg(name: &str, seeds: &[SocketAddr]) -> MemberConfig {
        let mut c = MemberConfig::new(name, "127.0.0.1:7946".parse().expect("addr"));
        c.seeds = seeds.to_vec();
        c
    }

    impl Sim {
        fn new(n: usize, seed: u64) -> Sim {
            Sim::with_timings(n, seed, |c| c)
        }

        /// `n` nodes whose configurations go through `timings` (e.g. the agent's LAN timings).
        fn with_timings(n: usize, seed: u64, timings: fn(MemberConfig) -> MemberConfig) -> Sim {
            let t0 = Instant::now();
            let addrs: Vec<SocketAddr> = (0..n)
                .map(|i| format!("10.0.0.{}:7946", i + 1).parse().expect("addr"))
                .collect();
            let nodes = (0..n)
                .map(|i| {
                    let c = timings(cfg(&format!("node-{i}"), &addrs));
                    Some(Engine::new(&c, addrs[i], 1000, seed + i as u64, t0))
                })
                .collect();
            Sim {
                t0,
                now: t0,
                nodes,
                addrs,
                in_flight: Vec::new(),
                isolated: BTreeSet::new(),
                latency: Duration::from_micros(300),
            }
        }

        fn elapsed(&self) -> Duration {
            self.now - self.t0
        }

        fn index(&self, addr: SocketAddr) -> Option<usize> {
            self.addrs.iter().position(|a| *a == addr)
        }

        fn collect(&mut self) {
            for i in 0..self.nodes.len() {
                let out = match &mut self.nodes[i] {
                    Some(e) => e.drain_outbox(),
                    None => continue,
                };
                for (to, d) in out {
                    assert!(d.len() <= MAX_DATAGRAM);
                    self.in_flight
                        .push((self.now + self.latency, self.addrs[i], to, d));
                }
            }
        }

        /// Runs until `until` (virtual time since start).
        fn run_until(&mut self, until: Duration) {
            let end = self.t0 + until;
            loop {
                self.collect();
                let next_packet = self.in_flight.iter().map(|p| p.0).min();
                let next_timer = self
                    .nodes
                    .iter()
                    .flatten()
                    .filter_map(Engine::next_wakeup)
                    .min();
                let next = [next_packet, next_timer].into_iter().flatten().min();
                let Some(next) = next.filter(|t| *t <= end) else {
                    self.now = end;
                    return;
                };
                self.now = self.now.max(next);
                let now = self.now;
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
                    .into_iter()
                    .partition(|p| p.0 <= now);
                self.in_flight = later;
                for (_, from, to, d) in due {
                    let (Some(fi), Some(ti)) = (self.index(from), self.index(to)) else {
                        continue;
                    };
                    if self.isolated.contains(&fi) || self.isolated.contains(&ti) {
                        continue;
                    }
                    if let Some(e) = &mut self.nodes[ti] {
                        e.handle_datagram(now, from, &d);
                    }
                }
                for e in self.nodes.iter_mut().flatten() {
                    e.handle_timers(now);
                }
            }
        }

        /// Runs in small steps until `pred` holds for every running node; returns the time
        /// it took (virtual), or None after `limit`.
        fn run_until_all(
            &mut self,
            limit: Duration,
            pred: impl Fn(usize, &Engine, Instant) -> bool,
        ) -> Option<Duration> {
            let start = self.elapsed();
            while self.elapsed() < start + limit {
                let ok = self
                    .nodes
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.as_ref().is_none_or(|e| pred(i, e, self.now)));
                if ok {
                    return Some(self.elapsed() - start);
                }
                let step = self.elapsed() + Duration::from_millis(1);
                self.run_until(step);
            }
            None
        }
    }

    fn names(n: &[usize]) -> BTreeSet<String> {
        n.iter().map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn converges_detects_a_crash_and_a_restart() {
        let mut detect = Vec::new();
        for seed in 0..9u64 {
            let mut sim = Sim::new(3, seed * 100);
            let all = names(&[0, 1, 2]);
            let t = sim.run_until_all(Duration::from_secs(1), |_, e, _| e.alive() == all);
            assert!(t.is_some(), "seed {seed}: no convergence");
            // Crash node 2 (no leave), at a time that varies with the seed.
            sim.run_until(sim.elapsed() + Duration::from_millis(500 + seed * 29));
            sim.nodes[2] = None;
            let t = sim
                .run_until_all(Duration::from_secs(2), |_, e, _| {
                    e.alive() == names(&[0, 1])
                })
                .expect("crash detected");
            detect.push(t);
            // Restart it with a new boot id: it rejoins.
            let c = cfg("node-2", &sim.addrs);
            sim.nodes[2] = Some(Engine::new(&c, sim.addrs[2], 2000, seed, sim.now));
            sim.run_until_all(Duration::from_secs(1), |_, e, _| e.alive() == all)
                .expect("restart rejoins");
        }
        detect.sort();
        eprintln!(
            "simulated crash detection (3 nodes): {detect:?}, median {:?}",
            detect[detect.len() / 2]
        );
        assert!(detect[detect.len() / 2] < Duration::from_millis(500));
    }

    #[test]
    fn leave_is_seen_at_once() {
        let mut sim = Sim::new(3, 7);
        let all = names(&[0, 1, 2]);
        sim.run_until_all(Duration::from_secs(1), |_, e, _| e.alive() == all)
            .expect("converge");
        sim.run_until(sim.elapsed() + Duration::from_millis(300));
        let now = sim.now;
        if let Some(e) = &mut sim.nodes[2] {
            e.leave(now);
            assert!(e.alive().is_empty());
        }
        sim.collect();
        sim.nodes[2] = None;
        let t = sim
            .run_until_all(Duration::from_secs(1), |_, e, _| {
                e.alive() == names(&[0, 1])
            })
            .expect("leave seen");
        assert!(t < Duration::from_millis(50), "{t:?}");
    }

    #[test]
    fn partition_and_heal() {
        let mut sim = Sim::new(3, 42);
        let all = names(&[0, 1, 2]);
        sim.run_until_all(Duration::from_secs(1), |_, e, _| e.alive() == all)
            .expect("converge");
        sim.run_until(sim.elapsed() + Duration::from_millis(300));
        sim.isolated.insert(2);
        let t = sim
            .run_until_all(Duration::from_secs(2), |i, e, _| {
                if i == 2 {
                    e.alive() == names(&[2])
                } else {
                    e.alive() == names(&[0, 1])
                }
            })
            .expect("partition seen");
        eprintln!("simulated partition detected in {t:?}");
        // The lease view drops faster than the failure detector's.
        let lease = MemberConfig::new("x", "127.0.0.1:1".parse().expect("addr")).quorum_lease();
        sim.isolated.clear();
        let t = sim
            .run_until_all(Duration::from_secs(3), |_, e, now| {
                e.alive() == all && e.heard_within(now, lease).len() == 3
            })
            .expect("heal");
        eprintln!("simulated heal in {t:?}");
        for e in sim.nodes.iter().flatten() {
            assert_eq!(e.heard_within(sim.now, lease), all);
        }
    }

    /// The margin that prevents two holders, in virtual time with the agent's LAN timings
    /// (lease 81 ms, earliest takeover 135 ms) and with the library's defaults (126 / 210 ms):
    /// the cut-off node sees less than a majority in its lease view strictly before any other
    /// node declares it down, and both happen within tight bounds of the configured values.
    #[test]
    fn isolated_holder_loses_its_lease_before_the_majority_can_take_over() {
        let lan: fn(MemberConfig) -> MemberConfig = MemberConfig::with_lan_timings;
        let defaults: fn(MemberConfig) -> MemberConfig = |c| c;
        for (what, timings) in [("LAN (agent)", lan), ("defaults", defaults)] {
            let c = timings(MemberConfig::new("x", "127.0.0.1:1".parse().expect("addr")));
            let lease = c.quorum_lease();
            let heartbeat = c.heartbeat_period.expect("heartbeats");
            let step = Duration::from_millis(1);
            let (mut downs, mut takes) = (Vec::new(), Vec::new());
            for seed in 0..10u64 {
                let mut sim = Sim::with_timings(3, seed * 7 + 1, timings);
                let all = names(&[0, 1, 2]);
                sim.run_until_all(Duration::from_secs(1), |_, e, _| e.alive() == all)
                    .expect("converge");
                sim.run_until(sim.elapsed() + Duration::from_millis(100 + seed * 37));
                sim.isolated.insert(2);
                let cut = sim.now;
                let mut stepped_down: Option<Duration> = None;
                let mut taken_over: Option<Duration> = None;
                while taken_over.is_none() && sim.now < cut + Duration::from_secs(2) {
                    let until = sim.elapsed() + step;
                    sim.run_until(until);
                    let now = sim.now;
                    let c_view = sim.nodes[2].as_ref().expect("c").heard_within(now, lease);
                    if stepped_down.is_none() && !crate::has_quorum(c_view.len(), 3) {
                        stepped_down = Some(now - cut);
                    }
                    let down_somewhere = sim.nodes[..2]
                        .iter()
                        .flatten()
                        .any(|e| !e.alive().contains("node-2"));
                    if down_somewhere {
                        taken_over = Some(now - cut);
                    }
                }
                let t = taken_over.expect("taken over");
                let s = stepped_down.unwrap_or_else(|| {
                    panic!(
                        "{what}, seed {seed}: the majority declared node-2 down after {t:?}, \
                         while it still held its lease ({lease:?})"
                    )
                });
                eprintln!("{what}, seed {seed}: isolated node steps down after {s:?}, majority declares it down after {t:?}");
                assert!(
                    s < t,
                    "{what}, seed {seed}: step-down {s:?} not before takeover {t:?}"
                );
                // Virtual time, so tight: the last hearing was at most a heartbeat before the
                // cut, so the lease runs out between lease - heartbeat and lease (+ a step);
                assert!(
                    s + heartbeat + step >= lease && s <= lease + step,
                    "{what}, seed {seed}: step-down after {s:?}, lease {lease:?}, heartbeat \
                     {heartbeat:?}"
                );
                // nobody declares it down before the earliest takeover.
                assert!(
                    t >= c.min_takeover(),
                    "{what}, seed {seed}: taken over after {t:?}, before {:?}",
                    c.min_takeover()
                );
                downs.push(s);
                takes.push(t);
            }
            eprintln!("{what}: step-downs {downs:?}, takeovers {takes:?}");
        }
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let c = cfg("node-0", &[]);
        let now = Instant::now();
        let from: SocketAddr = "10.0.0.9:1".parse().expect("addr");
        let mut e = Engine::new(&c, "10.0.0.1:7946".parse().expect("addr"), 1, 1, now);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let mut d: Vec<u8> = (0..len % 1500)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if len % 2 == 0 && d.len() >= 4 {
                d[..3].copy_from_slice(MAGIC);
                d[3] = KIND_SWIM;
            }
            e.handle_datagram(now, from, &d);
            e.handle_timers(now);
        }
        e.handle_datagram(now, from, &[b'f', b'r', b'y', KIND_HEARTBEAT]);
        e.handle_datagram(now, from, &[b'f', b'r', b'y', 99]);
        let s = e.stats();
        assert_eq!(s.datagrams_in, 2002);
        assert!(s.garbage > 900, "{s:?}");
        assert!(s.rejected > 900, "{s:?}");
        assert_eq!(s.heartbeats_in, 0, "a stranger's heartbeat does not count");
        assert_eq!(e.alive(), names(&[0]));
    }
}
