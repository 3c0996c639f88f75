//! [`Responder`]: answers ARP and neighbour solicitations for a set of owned addresses on one
//! interface, from userspace, and announces addresses as they become owned.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::packet::{
    announce, solicited_node, Frame, MacAddr, Payload, ETHERTYPE_ARP, ETHERTYPE_IPV6,
};
use crate::socket::{poll, GroupSocket, PacketSocket, PacketType, Waker};
use crate::L2Error;

/// Longest frame read; NS/NA and ARP are far shorter, longer frames are ignored.
const RECV_BUFFER: usize = 2048;
/// Frames read from one socket before the loop looks at the other and at the schedule.
const BATCH: usize = 64;

/// How a [`Responder`] announces and polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// When to send a gratuitous ARP / unsolicited NA for an address, as offsets from the
    /// moment it becomes owned. Empty: never announce.
    pub announce_at: Vec<Duration>,
    /// Longest single wait of the thread (it is also woken at once by `set_owned` and stop).
    pub poll_interval: Duration,
}

impl Config {
    /// `count` announcements `gap` apart starting at once, then one at each of `repeats`
    /// (offsets from the moment the address becomes owned).
    pub fn burst(count: usize, gap: Duration, repeats: &[Duration]) -> Config {
        let mut announce_at: Vec<Duration> = (0..count).map(|i| gap * i as u32).collect();
        announce_at.extend_from_slice(repeats);
        announce_at.sort();
        Config {
            announce_at,
            poll_interval: Duration::from_millis(100),
        }
    }
}

impl Default for Config {
    /// 3 announcements 50 ms apart, then at 1 s and 2 s.
    fn default() -> Config {
        Config::burst(
            3,
            Duration::from_millis(50),
            &[Duration::from_secs(1), Duration::from_secs(2)],
        )
    }
}

/// What a responder has seen and done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames read (ARP and IPv6 EtherTypes only: the sockets receive nothing else).
    pub frames: u64,
    /// ARP requests and neighbour solicitations, for any address.
    pub requests: u64,
    /// Of those, the ones for an owned address addressed to this host: each is answered.
    pub requests_owned: u64,
    /// ARP replies and neighbour advertisements sent in answer.
    pub replies: u64,
    /// Gratuitous ARPs and unsolicited NAs sent.
    pub announcements: u64,
    /// Frames that claim to be ARP or NDP but are broken (truncated, malformed, bad checksum).
    pub garbage: u64,
    /// Other frames: IPv6 that is not NS/NA, ARP replies, frames sent by this MAC, frames
    /// unicast to other hosts.
    pub ignored: u64,
    /// Frames in which another MAC claims an owned address (ARP sender or NA target): two
    /// hosts answer for one address.
    pub conflicts: u64,
    /// Requests for an owned address left unanswered because the ownership lease had expired
    /// (the owner stopped renewing it: see [`Responder::set_owned_until`]).
    pub unleased: u64,
    /// Failed sends, receives and group joins (the latest is in [`Responder::last_error`]).
    pub errors: u64,
}

#[derive(Default)]
struct AtomicCounters {
    frames: AtomicU64,
    requests: AtomicU64,
    requests_owned: AtomicU64,
    replies: AtomicU64,
    announcements: AtomicU64,
    garbage: AtomicU64,
    ignored: AtomicU64,
    conflicts: AtomicU64,
    unleased: AtomicU64,
    errors: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            frames: get(&self.frames),
            requests: get(&self.requests),
            requests_owned: get(&self.requests_owned),
            replies: get(&self.replies),
            announcements: get(&self.announcements),
            garbage: get(&self.garbage),
            ignored: get(&self.ignored),
            conflicts: get(&self.conflicts),
            unleased: get(&self.unleased),
            errors: get(&self.errors),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Owned addresses and pending announcements. Each time an address becomes owned it gets a
/// new generation; a scheduled announcement is sent only while its generation is current, so
/// removing an address (or removing and re-adding it) cancels what was scheduled before.
///
/// Ownership is a lease: nothing is answered or announced at or after `valid_until` until the
/// owner renews it, so an owner that stops renewing (stuck, cut off, gone) falls silent by
/// itself.
#[derive(Default)]
struct State {
    owned: BTreeMap<IpAddr, u64>,
    /// None: owned until further notice.
    valid_until: Option<Instant>,
    schedule: BinaryHeap<Reverse<(Instant, IpAddr, u64)>>,
    next_generation: u64,
    groups: BTreeSet<Ipv6Addr>,
}

/// What one owned-address check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    Owned,
    /// Owned, but the lease has run out.
    Expired,
    NotOwned,
}

impl State {
    fn leased(&self, now: Instant) -> bool {
        self.valid_until.is_none_or(|t| now < t)
    }

    fn ownership(&self, ip: IpAddr, now: Instant) -> Ownership {
        match (self.owned.contains_key(&ip), self.leased(now)) {
            (false, _) => Ownership::NotOwned,
            (true, true) => Ownership::Owned,
            (true, false) => Ownership::Expired,
        }
    }

    fn schedule(&mut self, ip: IpAddr, generation: u64, now: Instant, offsets: &[Duration]) {
        for offset in offsets {
            self.schedule.push(Reverse((now + *offset, ip, generation)));
        }
    }

    /// Pops the announcements due at `now` that are still current; returns them and when the
    /// next one is due.
    fn due(&mut self, now: Instant) -> (Vec<IpAddr>, Option<Instant>) {
        let mut due = Vec::new();
        while let Some(Reverse((at, ip, generation))) = self.schedule.peek().copied() {
            if at > now {
                return (due, Some(at));
            }
            self.schedule.pop();
            if self.owned.get(&ip) == Some(&generation) && self.leased(now) && !due.contains(&ip) {
                due.push(ip);
            }
        }
        (due, None)
    }
}

struct Shared {
    mac: MacAddr,
    config: Config,
    state: Mutex<State>,
    stop: AtomicBool,
    counters: AtomicCounters,
    last_error: Mutex<Option<String>>,
    waker: Waker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave State inconsistent in a way that matters
    // more than stopping to answer: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn error(&self, what: &str, err: &dyn std::fmt::Display) {
        bump(&self.counters.errors);
        *lock(&self.last_error) = Some(format!("{what}: {err}"));
    }
}

/// Answers "who has X?" (ARP requests, neighbour solicitations: multicast, unicast NUD probes
/// and DAD probes) on one interface for the addresses it owns, with the interface's MAC, from
/// a background thread; announces addresses (gratuitous ARP, unsolicited NA) when they become
/// owned. Never answers for other addresses, never answers its own frames, and adds no
/// address to any interface: the kernel does not know about the owned addresses.
///
/// Stopping (`stop` or drop) joins the thread; it notices within microseconds.
pub struct Responder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    groups: Option<GroupSocket>,
    ifname: String,
    ifindex: u32,
}

impl Responder {
    /// Starts answering on `ifname` in the calling thread's network namespace with the
    /// default [`Config`]. It owns nothing until [`Responder::set_owned`].
    pub fn start(ifname: &str) -> Result<Responder, L2Error> {
        Responder::start_with(ifname, Config::default())
    }

    /// Like [`Responder::start`], with `config`.
    pub fn start_with(ifname: &str, config: Config) -> Result<Responder, L2Error> {
        let arp = PacketSocket::open(ifname, ETHERTYPE_ARP)?;
        let ipv6 = PacketSocket::open(ifname, ETHERTYPE_IPV6)?;
        ipv6.accept_all_multicast()?;
        // Without IPv6 on the host there is nothing to join; IPv4 still works.
        let ifindex = arp.ifindex();
        let groups = GroupSocket::open(ifindex).ok();
        let shared = Arc::new(Shared {
            mac: arp.mac(),
            config,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            counters: AtomicCounters::default(),
            last_error: Mutex::new(None),
            waker: Waker::new()?,
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("ferry-l2 {ifname}"))
            .spawn(move || run(&worker, &arp, &ipv6))
            .map_err(|e| L2Error::Io {
                what: "spawn responder thread".into(),
                source: e,
            })?;
        Ok(Responder {
            shared,
            thread: Some(thread),
            groups,
            ifname: ifname.to_string(),
            ifindex,
        })
    }

    /// Replaces the set of addresses this responder answers for. Addresses that were not
    /// owned before are announced on [`Config::announce_at`]; addresses no longer owned stop
    /// being answered at once and their pending announcements are cancelled. Addresses no host
    /// can own (unspecified, multicast, broadcast, loopback) are skipped and counted as errors.
    pub fn set_owned(&self, ips: BTreeSet<IpAddr>) {
        self.set_owned_until(ips, None);
    }

    /// [`Responder::set_owned`] with a lease: the addresses are answered for and announced only
    /// before `valid_until` (None: no expiry). The thread checks the lease before every reply
    /// and announcement, so an owner that stops renewing it (with [`Responder::renew`] or
    /// another call here) stops being answered for at `valid_until` whatever it is doing.
    pub fn set_owned_until(&self, ips: BTreeSet<IpAddr>, valid_until: Option<Instant>) {
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        state.valid_until = valid_until;
        let mut owned = BTreeMap::new();
        for ip in ips {
            if !ownable(ip) {
                self.shared.error(
                    "set_owned",
                    &format!("{ip} is not an address a host can own"),
                );
                continue;
            }
            let generation = match state.owned.get(&ip) {
                Some(&generation) => generation,
                None => {
                    state.next_generation += 1;
                    let generation = state.next_generation;
                    state.schedule(ip, generation, now, &self.shared.config.announce_at);
                    generation
                }
            };
            owned.insert(ip, generation);
        }
        state.owned = owned;
        let State {
            owned, schedule, ..
        } = &mut *state;
        schedule.retain(|Reverse((_, ip, generation))| owned.get(ip) == Some(generation));
        self.update_groups(&mut state);
        drop(state);
        self.shared.waker.wake();
    }

    /// Joins the solicited-node groups of the owned IPv6 addresses and leaves the others.
    fn update_groups(&self, state: &mut State) {
        let Some(groups) = &self.groups else { return };
        let wanted: BTreeSet<Ipv6Addr> = state
            .owned
            .keys()
            .filter_map(|ip| match ip {
                IpAddr::V6(ip) => Some(solicited_node(*ip)),
                IpAddr::V4(_) => None,
            })
            .collect();
        for group in state.groups.difference(&wanted) {
            if let Err(e) = groups.leave(*group) {
                self.shared.error(&format!("leave {group}"), &e);
            }
        }
        let mut joined = BTreeSet::new();
        for group in wanted {
            if state.groups.contains(&group) {
                joined.insert(group);
                continue;
            }
            match groups.join(group) {
                Ok(()) => {
                    joined.insert(group);
                }
                // This socket is a member already: what we wanted.
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                    joined.insert(group);
                }
                Err(e) => self.shared.error(&format!("join {group}"), &e),
            }
        }
        state.groups = joined;
    }

    /// Extends (or shortens) the ownership lease of the owned addresses.
    pub fn renew(&self, valid_until: Option<Instant>) {
        lock(&self.shared.state).valid_until = valid_until;
        self.shared.waker.wake();
    }

    /// Announces every owned address again on [`Config::announce_at`] (e.g. after the link
    /// came back up).
    pub fn reannounce(&self) {
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        let owned: Vec<(IpAddr, u64)> = state.owned.iter().map(|(ip, g)| (*ip, *g)).collect();
        for (ip, generation) in owned {
            state.schedule(ip, generation, now, &self.shared.config.announce_at);
        }
        drop(state);
        self.shared.waker.wake();
    }

    /// The addresses answered for.
    pub fn owned(&self) -> BTreeSet<IpAddr> {
        lock(&self.shared.state).owned.keys().copied().collect()
    }

    /// The MAC answers carry (the interface's, read at start).
    pub fn mac(&self) -> MacAddr {
        self.shared.mac
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }

    /// The latest failure (send, receive, group join), if any.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.last_error).clone()
    }

    /// Stops answering and joins the thread (dropping does the same).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.waker.wake();
        if let Some(thread) = self.thread.take() {
            // The loop does not panic; if it did, there is nothing left to stop.
            let _ = thread.join();
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("ifname", &self.ifname)
            .field("mac", &self.shared.mac)
            .field("owned", &self.owned())
            .finish_non_exhaustive()
    }
}

fn ownable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback()),
    }
}

/// What to do with one received frame.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Garbage,
    Ignored,
    /// A solicitation not for us (address not owned, or unicast to another MAC).
    NotOurs {
        conflict: bool,
    },
    /// A solicitation to answer with this frame.
    Answer {
        reply: Frame,
        conflict: bool,
    },
    /// A solicitation for an owned address whose lease has expired: not answered.
    Unleased,
    /// Any other ARP/NDP frame.
    Seen {
        conflict: bool,
    },
}

/// The pure part of the responder: what one frame calls for.
fn decide(
    bytes: &[u8],
    packet_type: PacketType,
    our_mac: MacAddr,
    ownership: impl Fn(IpAddr) -> Ownership,
) -> Outcome {
    if matches!(packet_type, PacketType::OtherHost | PacketType::Outgoing) {
        return Outcome::Ignored;
    }
    let frame = match Frame::parse(bytes) {
        Ok(frame) => frame,
        Err(e) if e.is_garbage() => return Outcome::Garbage,
        Err(_) => return Outcome::Ignored,
    };
    if frame.src == our_mac {
        return Outcome::Ignored;
    }
    let conflict = frame
        .claim()
        .is_some_and(|(ip, mac)| mac != our_mac && ownership(ip) == Ownership::Owned);
    match frame.solicitation() {
        Some(s) if s.addressed_to(our_mac) => match ownership(s.target()) {
            Ownership::Owned => Outcome::Answer {
                reply: s.reply(our_mac),
                conflict,
            },
            Ownership::Expired => Outcome::Unleased,
            Ownership::NotOwned => Outcome::NotOurs { conflict },
        },
        Some(_) => Outcome::NotOurs { conflict },
        None => Outcome::Seen { conflict },
    }
}

fn run(shared: &Shared, arp: &PacketSocket, ipv6: &PacketSocket) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let interval = shared.config.poll_interval;
    while !shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let (due, next) = lock(&shared.state).due(now);
        for ip in due {
            let socket = match ip {
                IpAddr::V4(_) => arp,
                IpAddr::V6(_) => ipv6,
            };
            match socket.send(&announce(shared.mac, ip).to_bytes()) {
                Ok(()) => bump(&shared.counters.announcements),
                Err(e) => shared.error(&format!("announce {ip}"), &e),
            }
        }
        let timeout = next.map_or(interval, |at| {
            at.saturating_duration_since(now).min(interval)
        });
        let mut fds =
            [arp.as_raw_fd(), ipv6.as_raw_fd(), shared.waker.fd()].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        if let Err(e) = poll(&mut fds, timeout) {
            shared.error("poll", &e);
            std::thread::sleep(interval);
            continue;
        }
        let [arp_ready, ipv6_ready, woken] = fds.map(|p| p.revents != 0);
        if woken {
            shared.waker.drain();
        }
        if arp_ready {
            drain(shared, arp, arp, ipv6, &mut buf);
        }
        if ipv6_ready {
            drain(shared, ipv6, arp, ipv6, &mut buf);
        }
    }
}

/// Reads and handles up to [`BATCH`] frames from `from`.
fn drain(
    shared: &Shared,
    from: &PacketSocket,
    arp: &PacketSocket,
    ipv6: &PacketSocket,
    buf: &mut [u8],
) {
    let c = &shared.counters;
    for _ in 0..BATCH {
        let got = match from.recv(buf) {
            Ok(Some(got)) => got,
            Ok(None) => return,
            Err(e) => {
                // ENETDOWN after the link went down, and the like: the socket stays bound
                // and works again when the link comes back.
                shared.error("receive", &e);
                return;
            }
        };
        bump(&c.frames);
        if got.truncated {
            bump(&c.ignored);
            continue;
        }
        let bytes = buf.get(..got.len).unwrap_or_default();
        let outcome = {
            let state = lock(&shared.state);
            // The lease is read at the moment of the answer, not at the start of the batch.
            let now = Instant::now();
            decide(bytes, got.packet_type, shared.mac, |ip| {
                state.ownership(ip, now)
            })
        };
        let conflict = match outcome {
            Outcome::Garbage => {
                bump(&c.garbage);
                false
            }
            Outcome::Ignored => {
                bump(&c.ignored);
                false
            }
            Outcome::Seen { conflict } => conflict,
            Outcome::Unleased => {
                bump(&c.requests);
                bump(&c.unleased);
                false
            }
            Outcome::NotOurs { conflict } => {
                bump(&c.requests);
                conflict
            }
            Outcome::Answer { reply, conflict } => {
                bump(&c.requests);
                bump(&c.requests_owned);
                let socket = match reply.payload {
                    Payload::Arp(_) => arp,
                    Payload::Ndp(_) => ipv6,
                };
                match socket.send(&reply.to_bytes()) {
                    Ok(()) => bump(&c.replies),
                    Err(e) => shared.error("reply", &e),
                }
                conflict
            }
        };
        if conflict {
            bump(&c.conflicts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Arp, ArpOperation};
    use std::net::Ipv4Addr;

    const US: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
    const THEM: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);

    fn arp_request(src: MacAddr, dst: MacAddr, sender_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        Frame {
            dst,
            src,
            payload: Payload::Arp(Arp {
                operation: ArpOperation::Request,
                sender_mac: src,
                sender_ip: Ipv4Addr::from(sender_ip),
                target_mac: MacAddr::ZERO,
                target_ip: Ipv4Addr::from(target),
            }),
        }
        .to_bytes()
    }

    fn owns_200(ip: IpAddr) -> Ownership {
        if ip == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200)) {
            Ownership::Owned
        } else {
            Ownership::NotOwned
        }
    }

    #[test]
    fn an_expired_lease_is_not_answered_and_claims_no_conflict() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200));
        let t0 = Instant::now();
        let mut s = State::default();
        s.owned.insert(ip, 1);
        s.valid_until = Some(t0 + Duration::from_millis(80));
        assert_eq!(s.ownership(ip, t0), Ownership::Owned);
        assert_eq!(
            s.ownership(ip, t0 + Duration::from_millis(79)),
            Ownership::Owned
        );
        let expired = t0 + Duration::from_millis(80);
        assert_eq!(s.ownership(ip, expired), Ownership::Expired);
        assert_eq!(
            s.ownership(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 201)), expired),
            Ownership::NotOwned
        );
        let req = arp_request(THEM, MacAddr::BROADCAST, [10, 0, 0, 2], [10, 0, 0, 200]);
        assert_eq!(
            decide(&req, PacketType::Broadcast, US, |i| s.ownership(i, expired)),
            Outcome::Unleased
        );
        let theirs = announce(THEM, ip).to_bytes();
        assert_eq!(
            decide(&theirs, PacketType::Broadcast, US, |i| s
                .ownership(i, expired)),
            Outcome::Seen { conflict: false }
        );
        // Scheduled announcements do not go out past the lease either.
        s.schedule(ip, 1, t0, &[Duration::ZERO, Duration::from_millis(100)]);
        assert_eq!(s.due(t0).0, vec![ip]);
        assert!(s.due(t0 + Duration::from_millis(100)).0.is_empty());
        // Renewed: answered again.
        s.valid_until = None;
        assert_eq!(s.ownership(ip, expired), Ownership::Owned);
    }

    #[test]
    fn answers_only_owned_addresses_addressed_to_us() {
        let b = MacAddr::BROADCAST;
        let req = arp_request(THEM, b, [10, 0, 0, 2], [10, 0, 0, 200]);
        assert!(matches!(
            decide(&req, PacketType::Broadcast, US, owns_200),
            Outcome::Answer {
                conflict: false,
                ..
            }
        ));
        let other = arp_request(THEM, b, [10, 0, 0, 2], [10, 0, 0, 201]);
        assert_eq!(
            decide(&other, PacketType::Broadcast, US, owns_200),
            Outcome::NotOurs { conflict: false }
        );
        let elsewhere = arp_request(
            THEM,
            MacAddr([2, 0, 0, 0, 0, 0xc]),
            [10, 0, 0, 2],
            [10, 0, 0, 200],
        );
        assert_eq!(
            decide(&elsewhere, PacketType::Host, US, owns_200),
            Outcome::NotOurs { conflict: false }
        );
        assert_eq!(
            decide(&req, PacketType::OtherHost, US, owns_200),
            Outcome::Ignored
        );
    }

    #[test]
    fn ignores_its_own_frames_and_sees_conflicts() {
        let own = arp_request(US, MacAddr::BROADCAST, [10, 0, 0, 3], [10, 0, 0, 200]);
        assert_eq!(
            decide(&own, PacketType::Broadcast, US, owns_200),
            Outcome::Ignored
        );
        let ours = announce(US, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200))).to_bytes();
        assert_eq!(
            decide(&ours, PacketType::Broadcast, US, owns_200),
            Outcome::Ignored
        );
        let theirs = announce(THEM, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200))).to_bytes();
        assert_eq!(
            decide(&theirs, PacketType::Broadcast, US, owns_200),
            Outcome::Seen { conflict: true }
        );
        let mut short_arp = vec![0xff; 12];
        short_arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0]);
        assert_eq!(
            decide(&short_arp, PacketType::Broadcast, US, owns_200),
            Outcome::Garbage
        );
        short_arp[12] = 0x01;
        assert_eq!(
            decide(&short_arp, PacketType::Broadcast, US, owns_200),
            Outcome::Ignored,
            "not ARP or IPv6"
        );
    }

    #[test]
    fn schedule_cancels_on_removal_and_generations() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200));
        let t0 = Instant::now();
        let offsets =
            Config::burst(3, Duration::from_millis(50), &[Duration::from_secs(1)]).announce_at;
        assert_eq!(offsets.len(), 4);
        let mut s = State::default();
        s.owned.insert(ip, 1);
        s.schedule(ip, 1, t0, &offsets);
        let (due, next) = s.due(t0);
        assert_eq!(due, vec![ip]);
        assert_eq!(next, Some(t0 + Duration::from_millis(50)));
        // Re-owned with a new generation: the old entries no longer fire.
        s.owned.insert(ip, 2);
        let (due, _) = s.due(t0 + Duration::from_millis(120));
        assert!(due.is_empty());
        s.schedule(ip, 2, t0, &offsets);
        let (due, next) = s.due(t0 + Duration::from_millis(120));
        assert_eq!(due, vec![ip], "several due at once: sent once");
        assert_eq!(next, Some(t0 + Duration::from_secs(1)));
    }
}
