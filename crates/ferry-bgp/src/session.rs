//! One BGP session (RFC 4271 §8), sans-IO: [`Session::handle`] takes an [`Event`] and the
//! time, [`Session::poll_action`] hands out what to do ([`Action`]), [`Session::poll_timeout`]
//! says when to call again with [`Event::Tick`]. No sockets, no clock: the TCP edge
//! (`crate::speaker`) and the tests (`tests/harness.rs`: two sessions back to back with
//! simulated time) drive it.
//!
//! The session keeps its Adj-RIB-Out: [`Session::set_routes`] gives the routes wanted, the
//! session sends the fewest UPDATEs that get the peer there (withdraw what left, announce what
//! is new or changed), everything plus End-of-RIB when the session comes up. Routes received
//! are kept (Adj-RIB-In) with RFC 7606 applied, and kept as stale across a peer's restart when
//! both ends have the graceful restart capability (RFC 4724), until the peer's End-of-RIB or the
//! restart time.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::packet::{
    self, Attributes, Capability, CeaseSubcode, Codec, ErrorKind, Family, FsmSubcode,
    GracefulRestart, Handling, LargeCommunity, Message, MpReach, Notification, Open, OpenSubcode,
    Origin, RouteRefresh, Segment, SegmentKind, Update,
};

/// How a session is set up. [`Config::new`] has the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub local_asn: u32,
    pub peer_asn: u32,
    pub router_id: Ipv4Addr,
    /// The hold time proposed, seconds (0: none, else at least 3). Default 90 (MetalLB's).
    pub hold_time: u16,
    /// Seconds between KEEPALIVEs; default a third of the negotiated hold time.
    pub keepalive: Option<u16>,
    /// Wait between connection attempts (and before reconnecting after a session ends).
    pub connect_retry: Duration,
    /// Only wait for the peer to connect (no [`Action::Connect`]).
    pub passive: bool,
    /// The families offered (multiprotocol capabilities). Default IPv4 and IPv6 unicast.
    pub families: Vec<Family>,
    /// Graceful restart (RFC 4724): the restart time offered, seconds; `None`: no capability.
    /// Default 120.
    pub graceful_restart: Option<u16>,
    /// Set the Restart State (R) bit: this speaker has just restarted.
    pub restarted: bool,
    /// The IPv4 next hop for routes without one; default the session's local address.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// The IPv6 next hop for routes without one; default the session's local address when it
    /// is IPv6. IPv6 routes with no next hop are not announced.
    pub next_hop_v6: Option<Ipv6Addr>,
    /// Keep the routes the peer sends (the Adj-RIB-In, see [`Session::received`]). Off by
    /// default: ferry announces and needs nothing back, and a router may send a full table.
    pub keep_received: bool,
}

impl Config {
    pub fn new(local_asn: u32, peer_asn: u32, router_id: Ipv4Addr) -> Self {
        Config {
            local_asn,
            peer_asn,
            router_id,
            hold_time: 90,
            keepalive: None,
            connect_retry: Duration::from_secs(5),
            passive: false,
            families: Family::ALL.to_vec(),
            graceful_restart: Some(120),
            restarted: false,
            next_hop_v4: None,
            next_hop_v6: None,
            keep_received: false,
        }
    }

    /// What is wrong with this configuration, if anything, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.hold_time == 1 || self.hold_time == 2 {
            return Err(format!(
                "holdTime {} s: must be 0 or at least 3 (RFC 4271 §4.2)",
                self.hold_time
            ));
        }
        if let Some(k) = self.keepalive {
            if self.hold_time > 0 && k > self.hold_time / 3 {
                return Err(format!(
                    "keepaliveTime {k} s: more than a third of holdTime {} s",
                    self.hold_time
                ));
            }
        }
        if self.router_id.is_unspecified() {
            return Err("routerID 0.0.0.0: must be a non-zero address".into());
        }
        if self.local_asn == 0 || self.peer_asn == 0 {
            return Err(format!(
                "myASN {} / peerASN {}: AS 0 is reserved (RFC 7607)",
                self.local_asn, self.peer_asn
            ));
        }
        if self.graceful_restart.is_some_and(|t| t > 0x0fff) {
            return Err(format!(
                "graceful restart time {} s: at most 4095",
                self.graceful_restart.unwrap_or_default()
            ));
        }
        if self.families.is_empty() {
            return Err("no address family".into());
        }
        Ok(())
    }

    pub fn is_ibgp(&self) -> bool {
        self.local_asn == self.peer_asn
    }
}

/// A route to announce: a prefix with its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub prefix: IpNet,
    /// `None`: the session's own next hop ([`Config::next_hop_v4`], `next_hop_v6`, else the
    /// local address of the connection).
    pub next_hop: Option<IpAddr>,
    /// LOCAL_PREF, sent to internal peers only (RFC 4271 §5.1.5); default 100 there.
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<LargeCommunity>,
}

impl Route {
    pub fn new(prefix: IpNet) -> Self {
        Route {
            prefix,
            next_hop: None,
            local_pref: None,
            med: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
        }
    }
}

/// RFC 4271 §8.2.2 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What happens to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Start (automatic start: reconnect after failures until [`Event::Stop`]).
    Start,
    /// Stop: Cease (administrative shutdown) if a session is up, and stay idle.
    Stop,
    /// A TCP connection to the peer is up (ours or one the peer opened), from `local`.
    TcpConnected { local: IpAddr },
    /// The connection attempt failed or the connection was lost.
    TcpFailed,
    /// Bytes read from the connection.
    Bytes(&'a [u8]),
    /// Time passed (see [`Session::poll_timeout`]).
    Tick,
}

/// Why an established session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    Stopped,
    HoldTimerExpired,
    ConnectionLost,
    NotificationReceived(Notification),
    NotificationSent(Notification),
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::Stopped => write!(f, "stopped"),
            DownReason::HoldTimerExpired => write!(f, "hold timer expired"),
            DownReason::ConnectionLost => write!(f, "connection lost"),
            DownReason::NotificationReceived(n) => write!(f, "NOTIFICATION received: {n}"),
            DownReason::NotificationSent(n) => write!(f, "NOTIFICATION sent: {n}"),
        }
    }
}

/// What the I/O edge is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer (dropping any attempt under way).
    Connect,
    /// Write these bytes to the connection.
    Send(Vec<u8>),
    /// Close the connection (after writing what was sent before).
    Close,
    /// The session is established.
    Established,
    /// The established session ended.
    Down(DownReason),
}

/// A route received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub attributes: Attributes,
    /// Kept over the peer's restart (RFC 4724), not refreshed yet.
    pub stale: bool,
}

/// Counters, for logs and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub updates_sent: u64,
    pub prefixes_announced: u64,
    pub prefixes_withdrawn: u64,
    pub updates_received: u64,
    /// UPDATEs whose routes were treated as withdrawn (RFC 7606).
    pub treated_as_withdraw: u64,
}

/// One BGP session. See the module docs.
pub struct Session {
    cfg: Config,
    state: State,
    started: bool,
    connect_retry_at: Option<Instant>,
    hold_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    stale_until: Option<Instant>,
    hold: Duration,
    keepalive_every: Duration,
    codec: Codec,
    peer: Option<Open>,
    families: Vec<Family>,
    local: Option<IpAddr>,
    buf: Vec<u8>,
    actions: VecDeque<Action>,
    desired: BTreeMap<IpNet, Route>,
    /// The Adj-RIB-Out: what the peer has from us on this session.
    sent: BTreeMap<IpNet, Attributes>,
    received: BTreeMap<IpNet, Received>,
    counters: Counters,
}

/// The hold time while waiting for the peer's OPEN (RFC 4271 §8.2.2: "large", 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);

impl Session {
    pub fn new(cfg: Config) -> Self {
        Session {
            cfg,
            state: State::Idle,
            started: false,
            connect_retry_at: None,
            hold_at: None,
            keepalive_at: None,
            stale_until: None,
            hold: Duration::ZERO,
            keepalive_every: Duration::ZERO,
            codec: Codec::default(),
            peer: None,
            families: Vec::new(),
            local: None,
            buf: Vec::new(),
            actions: VecDeque::new(),
            desired: BTreeMap::new(),
            sent: BTreeMap::new(),
            received: BTreeMap::new(),
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn state(&self) -> State {
        self.state
    }
    /// The peer's OPEN, while a session is up.
    pub fn peer_open(&self) -> Option<&Open> {
        self.peer.as_ref()
    }
    /// The families both ends agreed on (while a session is up).
    pub fn families(&self) -> &[Family] {
        &self.families
    }
    /// The negotiated hold time.
    pub fn hold_time(&self) -> Duration {
        self.hold
    }
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// Routes received from the peer (the Adj-RIB-In).
    pub fn received(&self) -> &BTreeMap<IpNet, Received> {
        &self.received
    }
    /// What the peer has from us: the Adj-RIB-Out with the attributes sent.
    pub fn advertised(&self) -> &BTreeMap<IpNet, Attributes> {
        &self.sent
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to [`Event::Tick`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.connect_retry_at,
            self.hold_at,
            self.keepalive_at,
            self.stale_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The routes to announce from now on. While established, sends the difference.
    pub fn set_routes(&mut self, routes: impl IntoIterator<Item = Route>) {
        self.desired = routes.into_iter().map(|r| (r.prefix, r)).collect();
        if self.state == State::Established {
            self.sync();
        }
    }

    pub fn handle(&mut self, now: Instant, event: Event<'_>) {
        match event {
            Event::Start => {
                if !self.started {
                    self.started = true;
                    if self.state == State::Idle {
                        self.connect(now);
                    }
                }
            }
            Event::Stop => {
                self.started = false;
                match self.state {
                    State::OpenSent | State::OpenConfirm | State::Established => {
                        let n = Notification::new(ErrorKind::Cease(
                            CeaseSubcode::AdministrativeShutdown,
                        ));
                        self.send(&Message::Notification(n));
                        self.down(now, DownReason::Stopped);
                    }
                    State::Connect | State::Active => {
                        self.actions.push_back(Action::Close);
                        self.state = State::Idle;
                    }
                    State::Idle => {}
                }
                self.connect_retry_at = None;
            }
            Event::TcpConnected { local } => match self.state {
                State::Idle if !self.started => self.actions.push_back(Action::Close),
                State::Idle | State::Connect | State::Active => {
                    self.local = Some(local);
                    self.connect_retry_at = None;
                    self.buf.clear();
                    self.send_open();
                    self.hold_at = Some(now + OPEN_HOLD);
                    self.state = State::OpenSent;
                }
                // One connection at a time: the edge does not hand a second one in.
                _ => {}
            },
            Event::TcpFailed => match self.state {
                State::Connect => self.state = State::Active,
                State::OpenSent | State::OpenConfirm | State::Established => {
                    self.down(now, DownReason::ConnectionLost)
                }
                State::Idle | State::Active => {}
            },
            Event::Bytes(b) => {
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    self.buf.extend_from_slice(b);
                    self.read(now);
                }
            }
            Event::Tick => self.tick(now),
        }
    }

    fn connect(&mut self, now: Instant) {
        self.connect_retry_at = Some(now + self.cfg.connect_retry);
        if self.cfg.passive {
            self.state = State::Active;
        } else {
            self.state = State::Connect;
            self.actions.push_back(Action::Connect);
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.stale_until.is_some_and(|t| t <= now) {
            self.stale_until = None;
            self.received.retain(|_, r| !r.stale);
        }
        if self.hold_at.is_some_and(|t| t <= now) {
            let n = Notification::new(ErrorKind::HoldTimerExpired);
            self.send(&Message::Notification(n));
            self.down(now, DownReason::HoldTimerExpired);
            return;
        }
        if let Some(t) = self.keepalive_at {
            if t <= now {
                self.send(&Message::Keepalive);
                self.keepalive_at = Some(now + self.keepalive_every);
            }
        }
        if self.connect_retry_at.is_some_and(|t| t <= now) {
            match self.state {
                State::Idle if self.started => self.connect(now),
                State::Connect | State::Active => {
                    if !self.cfg.passive {
                        self.actions.push_back(Action::Close);
                    }
                    self.connect(now);
                }
                _ => self.connect_retry_at = None,
            }
        }
    }

    fn send(&mut self, m: &Message) {
        self.actions
            .push_back(Action::Send(packet::encode(m, self.codec)));
    }

    fn send_open(&mut self) {
        let mut caps: Vec<Capability> = self
            .cfg
            .families
            .iter()
            .map(|f| Capability::Multiprotocol(*f))
            .collect();
        caps.push(Capability::RouteRefresh);
        if let Some(t) = self.cfg.graceful_restart {
            caps.push(Capability::GracefulRestart(GracefulRestart {
                restart_state: self.cfg.restarted,
                notification: false,
                restart_time: t.min(0x0fff),
                // F: the forwarding state (the node's dataplane) outlives the speaker.
                families: self.cfg.families.iter().map(|f| (*f, true)).collect(),
            }));
        }
        let open = Open::new(
            self.cfg.local_asn,
            self.cfg.hold_time,
            self.cfg.router_id,
            caps,
        );
        self.send(&Message::Open(open));
    }

    /// Sends `n` and ends the session.
    fn fail(&mut self, now: Instant, n: Notification) {
        self.send(&Message::Notification(n.clone()));
        self.down(now, DownReason::NotificationSent(n));
    }

    fn down(&mut self, now: Instant, reason: DownReason) {
        self.actions.push_back(Action::Close);
        let was_up = self.state == State::Established;
        // RFC 4724 §4.2: keep the peer's routes as stale when the connection just went away
        // and both ends said they do graceful restart; a NOTIFICATION ends them.
        let keep = was_up
            && reason == DownReason::ConnectionLost
            && self.cfg.graceful_restart.is_some()
            && self
                .peer
                .as_ref()
                .and_then(|p| p.graceful_restart())
                .is_some();
        if keep {
            let t = self
                .peer
                .as_ref()
                .and_then(|p| p.graceful_restart())
                .map_or(0, |g| g.restart_time);
            for r in self.received.values_mut() {
                r.stale = true;
            }
            self.stale_until = Some(now + Duration::from_secs(u64::from(t)));
        } else {
            self.received.clear();
            self.stale_until = None;
        }
        if was_up {
            self.actions.push_back(Action::Down(reason));
        }
        self.state = State::Idle;
        self.sent.clear();
        self.buf.clear();
        self.peer = None;
        self.families.clear();
        self.codec = Codec::default();
        self.hold_at = None;
        self.keepalive_at = None;
        self.connect_retry_at = self.started.then(|| now + self.cfg.connect_retry);
    }

    fn read(&mut self, now: Instant) {
        let mut at = 0;
        loop {
            match packet::decode(&self.buf[at..], self.codec) {
                Ok(Some((m, n))) => {
                    at += n;
                    self.message(now, m);
                    if !matches!(
                        self.state,
                        State::OpenSent | State::OpenConfirm | State::Established
                    ) {
                        // The session ended on this message: the rest is moot.
                        self.buf.clear();
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.fail(now, e.notification());
                    self.buf.clear();
                    return;
                }
            }
        }
        self.buf.drain(..at);
    }

    fn message(&mut self, now: Instant, m: Message) {
        if let Message::Notification(n) = m {
            self.down(now, DownReason::NotificationReceived(n));
            return;
        }
        match (self.state, m) {
            (State::OpenSent, Message::Open(o)) => self.open(now, o),
            (State::OpenConfirm, Message::Keepalive) => {
                self.state = State::Established;
                self.hold_at = (!self.hold.is_zero()).then(|| now + self.hold);
                self.actions.push_back(Action::Established);
                self.sync();
                for f in self.families.clone() {
                    self.send(&Message::Update(Update::end_of_rib(f)));
                }
            }
            (State::Established, Message::Keepalive) => self.heard(now),
            (State::Established, Message::Update(u)) => {
                self.heard(now);
                self.update(u);
            }
            (State::Established, Message::RouteRefresh(r)) => {
                self.heard(now);
                self.refresh(r);
            }
            (state, _) => {
                let sub = match state {
                    State::OpenSent => FsmSubcode::UnexpectedInOpenSent,
                    State::OpenConfirm => FsmSubcode::UnexpectedInOpenConfirm,
                    _ => FsmSubcode::UnexpectedInEstablished,
                };
                self.fail(now, Notification::new(ErrorKind::Fsm(sub)));
            }
        }
    }

    fn heard(&mut self, now: Instant) {
        if !self.hold.is_zero() {
            self.hold_at = Some(now + self.hold);
        }
    }

    fn open(&mut self, now: Instant, o: Open) {
        if o.asn() != self.cfg.peer_asn {
            let data = o.my_as.to_be_bytes().to_vec();
            let n = Notification {
                error: ErrorKind::Open(OpenSubcode::BadPeerAs),
                data,
            };
            return self.fail(now, n);
        }
        if o.router_id == self.cfg.router_id && self.cfg.is_ibgp() {
            let n = Notification::new(ErrorKind::Open(OpenSubcode::BadBgpIdentifier));
            return self.fail(now, n);
        }
        let hold = self.cfg.hold_time.min(o.hold_time);
        self.hold = Duration::from_secs(u64::from(hold));
        let ka = match self.cfg.keepalive {
            Some(k) if k > 0 => u64::from(k).min(u64::from(hold / 3).max(1)),
            _ => u64::from(hold / 3).max(1),
        };
        self.keepalive_every = Duration::from_secs(ka);
        self.codec = Codec {
            four_octet_as: o.four_octet_as(),
        };
        let theirs = o.families();
        self.families = self
            .cfg
            .families
            .iter()
            .copied()
            .filter(|f| theirs.contains(f))
            .collect();
        self.peer = Some(o);
        self.send(&Message::Keepalive);
        if hold == 0 {
            self.hold_at = None;
            self.keepalive_at = None;
        } else {
            self.hold_at = Some(now + self.hold);
            self.keepalive_at = Some(now + self.keepalive_every);
        }
        self.state = State::OpenConfirm;
    }

    fn update(&mut self, u: Update) {
        self.counters.updates_received += 1;
        if let Some(f) = u.is_end_of_rib() {
            // RFC 4724 §4.2: routes still stale after the End-of-RIB are gone.
            self.received
                .retain(|p, r| !(r.stale && Family::of(p) == f));
            if self.received.values().all(|r| !r.stale) {
                self.stale_until = None;
            }
            return;
        }
        for p in u.withdrawn_all() {
            self.received.remove(&p);
        }
        let announced = u.announced();
        if u.handling() == Some(Handling::TreatAsWithdraw) {
            self.counters.treated_as_withdraw += 1;
            for p in announced {
                self.received.remove(&p);
            }
            return;
        }
        if !self.cfg.keep_received {
            return;
        }
        let mut attrs = u.attributes;
        attrs.mp_unreach = None;
        if let Some(m) = &mut attrs.mp_reach {
            m.nlri.clear();
        }
        for p in announced {
            let fam = Family::of(&p);
            if self.families.contains(&fam) {
                self.received.insert(
                    p,
                    Received {
                        attributes: attrs.clone(),
                        stale: false,
                    },
                );
            }
        }
    }

    fn refresh(&mut self, r: RouteRefresh) {
        let Some(f) = Family::from_afi_safi(r.afi, r.safi) else {
            return;
        };
        if !self.families.contains(&f) {
            return;
        }
        let again: Vec<(IpNet, Attributes)> = self
            .sent
            .iter()
            .filter(|(p, _)| Family::of(p) == f)
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        self.announce(f, again);
    }

    /// The attributes `r` is sent with on this session, or `None` when it cannot be (no next
    /// hop of its family, or a family not negotiated).
    fn attributes(&self, r: &Route) -> Option<Attributes> {
        let fam = Family::of(&r.prefix);
        if !self.families.contains(&fam) {
            return None;
        }
        let ibgp = self.cfg.is_ibgp();
        let mut a = Attributes {
            origin: Some(Origin::Igp),
            as_path: Some(if ibgp {
                Vec::new()
            } else {
                vec![Segment {
                    kind: SegmentKind::Sequence,
                    asns: vec![self.cfg.local_asn],
                }]
            }),
            med: r.med,
            local_pref: ibgp.then_some(r.local_pref.unwrap_or(100)),
            communities: r.communities.clone(),
            large_communities: r.large_communities.clone(),
            ..Attributes::default()
        };
        a.communities.sort_unstable();
        a.communities.dedup();
        a.large_communities.sort_unstable();
        a.large_communities.dedup();
        match fam {
            Family::Ipv4Unicast => {
                let nh = match r.next_hop {
                    Some(IpAddr::V4(n)) => n,
                    _ => match (self.cfg.next_hop_v4, self.local) {
                        (Some(n), _) | (None, Some(IpAddr::V4(n))) => n,
                        _ => return None,
                    },
                };
                a.next_hop = Some(nh);
            }
            Family::Ipv6Unicast => {
                let nh = match r.next_hop {
                    Some(IpAddr::V6(n)) => n,
                    _ => match (self.cfg.next_hop_v6, self.local) {
                        (Some(n), _) | (None, Some(IpAddr::V6(n))) => n,
                        _ => return None,
                    },
                };
                a.mp_reach = Some(MpReach {
                    family: fam,
                    next_hop: IpAddr::V6(nh),
                    link_local: None,
                    nlri: Vec::new(),
                });
            }
        }
        Some(a)
    }

    /// Sends what brings the peer from [`Session::sent`] to [`Session::desired`].
    fn sync(&mut self) {
        let want: BTreeMap<IpNet, Attributes> = self
            .desired
            .values()
            .filter_map(|r| self.attributes(r).map(|a| (r.prefix, a)))
            .collect();
        let gone: Vec<IpNet> = self
            .sent
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for f in Family::ALL {
            let w: Vec<IpNet> = gone
                .iter()
                .filter(|p| Family::of(p) == f)
                .copied()
                .collect();
            if !w.is_empty() {
                for m in packet::pack(f, None, &w, self.codec) {
                    self.counters.updates_sent += 1;
                    self.actions.push_back(Action::Send(m));
                }
                self.counters.prefixes_withdrawn += w.len() as u64;
            }
        }
        for p in &gone {
            self.sent.remove(p);
        }
        for f in Family::ALL {
            let changed: Vec<(IpNet, Attributes)> = want
                .iter()
                .filter(|(p, a)| Family::of(p) == f && self.sent.get(p) != Some(a))
                .map(|(p, a)| (*p, a.clone()))
                .collect();
            self.announce(f, changed);
        }
    }

    /// Announces `routes` (all of family `f`), grouped by attributes, and records them sent.
    fn announce(&mut self, f: Family, routes: Vec<(IpNet, Attributes)>) {
        let mut groups: HashMap<Attributes, Vec<IpNet>> = HashMap::new();
        let mut order: Vec<Attributes> = Vec::new();
        for (p, a) in routes {
            self.sent.insert(p, a.clone());
            let g = groups.entry(a.clone()).or_default();
            if g.is_empty() {
                order.push(a);
            }
            g.push(p);
        }
        for a in order {
            let prefixes = &groups[&a];
            for m in packet::pack(f, Some(&a), prefixes, self.codec) {
                self.counters.updates_sent += 1;
                self.actions.push_back(Action::Send(m));
            }
            self.counters.prefixes_announced += prefixes.len() as u64;
        }
    }

    /// Prefixes this session will not announce (no next hop of their family, or their family
    /// was not negotiated), while established.
    pub fn unannounceable(&self) -> BTreeSet<IpNet> {
        if self.state != State::Established {
            return BTreeSet::new();
        }
        self.desired
            .values()
            .filter(|r| self.attributes(r).is_none())
            .map(|r| r.prefix)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field() {
        let ok = Config::new(64601, 64600, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.hold_time = 2;
        assert!(c.validate().unwrap_err().starts_with("holdTime 2 s"));
        let mut c = ok.clone();
        c.hold_time = 9;
        c.keepalive = Some(5);
        assert!(c.validate().unwrap_err().starts_with("keepaliveTime 5 s"));
        let mut c = ok.clone();
        c.router_id = Ipv4Addr::UNSPECIFIED;
        assert!(c.validate().unwrap_err().starts_with("routerID"));
        let mut c = ok.clone();
        c.peer_asn = 0;
        assert!(c.validate().unwrap_err().contains("peerASN 0"));
        let mut c = ok;
        c.graceful_restart = Some(5000);
        assert!(c.validate().unwrap_err().contains("at most 4095"));
    }
}
