//! Two sessions back to back through in-memory byte pipes, with simulated time (no sockets,
//! no sleeping): `a` is ferry's side (AS 64601, active), `b` the router's (AS 64600, passive).
//! Bytes are delivered in 7-byte pieces so that message reassembly is exercised.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ferry_bgp::packet::{
    self, CeaseSubcode, Codec, ErrorKind, Message, OpenSubcode, UpdateSubcode,
};
use ferry_bgp::{Action, Config, DownReason, Event, Family, LargeCommunity, Route, Session, State};

const A_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2));
const B_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 2);

fn a_config() -> Config {
    let mut c = Config::new(64601, 64600, Ipv4Addr::new(10, 96, 0, 2));
    c.hold_time = 9;
    c.next_hop_v6 = Some(A_V6);
    c
}

fn b_config() -> Config {
    let mut c = Config::new(64600, 64601, Ipv4Addr::new(10, 96, 0, 1));
    c.passive = true;
    c.keep_received = true;
    c.hold_time = 90;
    c
}

struct Pair {
    a: Session,
    b: Session,
    now: Instant,
    connected: bool,
    /// Drop what `a` sends (a silent peer).
    a_silent: bool,
    to_b: Vec<u8>,
    to_a: Vec<u8>,
    /// Messages each side received, decoded, and the actions other than Send each emitted.
    b_got: Vec<Message>,
    a_got: Vec<Message>,
    a_events: Vec<Action>,
    b_events: Vec<Action>,
}

fn decode_all(buf: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some((m, n))) = packet::decode(
        &buf[at..],
        Codec {
            four_octet_as: true,
        },
    ) {
        out.push(m);
        at += n;
    }
    out
}

impl Pair {
    fn new(a: Config, b: Config) -> Self {
        let mut p = Pair {
            a: Session::new(a),
            b: Session::new(b),
            now: Instant::now(),
            connected: false,
            a_silent: false,
            to_b: Vec::new(),
            to_a: Vec::new(),
            b_got: Vec::new(),
            a_got: Vec::new(),
            a_events: Vec::new(),
            b_events: Vec::new(),
        };
        let now = p.now;
        p.b.handle(now, Event::Start);
        p.a.handle(now, Event::Start);
        p.run();
        p
    }

    fn deliver(&mut self) {
        let now = self.now;
        let to_b = std::mem::take(&mut self.to_b);
        self.b_got.extend(decode_all(&to_b));
        for piece in to_b.chunks(7) {
            self.b.handle(now, Event::Bytes(piece));
        }
        let to_a = std::mem::take(&mut self.to_a);
        self.a_got.extend(decode_all(&to_a));
        for piece in to_a.chunks(7) {
            self.a.handle(now, Event::Bytes(piece));
        }
    }

    fn run(&mut self) {
        let now = self.now;
        for _ in 0..10_000 {
            let mut busy = false;
            while let Some(act) = self.a.poll_action() {
                busy = true;
                match act {
                    Action::Connect => {
                        if !self.connected && matches!(self.b.state(), State::Active) {
                            self.connected = true;
                            self.a.handle(now, Event::TcpConnected { local: A_ADDR });
                            self.b.handle(now, Event::TcpConnected { local: B_ADDR });
                        } else {
                            self.a.handle(now, Event::TcpFailed);
                        }
                    }
                    Action::Send(b) => {
                        if self.connected && !self.a_silent {
                            self.to_b.extend(b)
                        }
                    }
                    Action::Close => self.close(),
                    other => self.a_events.push(other),
                }
            }
            while let Some(act) = self.b.poll_action() {
                busy = true;
                match act {
                    Action::Send(b) => {
                        if self.connected {
                            self.to_a.extend(b)
                        }
                    }
                    Action::Close => self.close(),
                    Action::Connect => panic!("b is passive"),
                    other => self.b_events.push(other),
                }
            }
            if !self.to_a.is_empty() || !self.to_b.is_empty() {
                busy = true;
                self.deliver();
            }
            if !busy {
                return;
            }
        }
        panic!("the sessions do not settle");
    }

    /// Either side closed: what was written arrives first, then the other side sees the
    /// connection go.
    fn close(&mut self) {
        if !self.connected {
            return;
        }
        self.deliver();
        self.connected = false;
        let now = self.now;
        self.a.handle(now, Event::TcpFailed);
        self.b.handle(now, Event::TcpFailed);
    }

    /// Lets `d` of simulated time pass, ticking both sessions at each deadline.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    self.a.handle(now, Event::Tick);
                    self.b.handle(now, Event::Tick);
                    self.run();
                }
                _ => break,
            }
        }
        self.now = end;
    }

    /// `a` dies (SIGKILL): nothing more from it, the connection drops; a new `a` with `cfg`.
    fn kill_a(&mut self, cfg: Option<Config>) {
        let now = self.now;
        self.to_b.clear();
        if self.connected {
            self.connected = false;
            self.b.handle(now, Event::TcpFailed);
        }
        self.run();
        // The dead process: a session that never starts.
        self.a = Session::new(a_config());
        if let Some(cfg) = cfg {
            self.a = Session::new(cfg);
            self.a.handle(now, Event::Start);
            self.run();
            // b takes connections again after its connect retry time (5 s).
            self.advance(Duration::from_secs(6));
        }
    }
}

fn route(p: &str) -> Route {
    Route::new(p.parse().unwrap())
}

fn established(p: &Pair) -> bool {
    p.a.state() == State::Established && p.b.state() == State::Established
}

fn prefixes(s: &Session) -> Vec<String> {
    s.received().keys().map(|p| p.to_string()).collect()
}

fn eors(msgs: &[Message]) -> Vec<Family> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Update(u) => u.is_end_of_rib(),
            _ => None,
        })
        .collect()
}

fn updates(msgs: &[Message]) -> usize {
    msgs.iter()
        .filter(|m| matches!(m, Message::Update(_)))
        .count()
}

#[test]
fn establishes_and_negotiates() {
    let p = Pair::new(a_config(), b_config());
    assert!(established(&p));
    assert_eq!(p.a_events, vec![Action::Established]);
    assert_eq!(p.b_events, vec![Action::Established]);
    // Hold time: the smaller of 9 and 90.
    assert_eq!(p.a.hold_time(), Duration::from_secs(9));
    assert_eq!(p.b.hold_time(), Duration::from_secs(9));
    assert_eq!(p.a.families(), &[Family::Ipv4Unicast, Family::Ipv6Unicast]);
    let open = p.b.peer_open().unwrap();
    assert_eq!(open.asn(), 64601);
    let gr = open.graceful_restart().unwrap();
    assert_eq!(gr.restart_time, 120);
    assert!(gr.families.iter().all(|(_, fwd)| *fwd));
    // End-of-RIB for both families, even with nothing to announce.
    assert_eq!(
        eors(&p.b_got),
        vec![Family::Ipv4Unicast, Family::Ipv6Unicast]
    );
}

#[test]
fn keepalives_keep_it_up() {
    let mut p = Pair::new(a_config(), b_config());
    p.advance(Duration::from_secs(60));
    assert!(established(&p));
    let ka = p
        .b_got
        .iter()
        .filter(|m| matches!(m, Message::Keepalive))
        .count();
    // Every 3 s (9 / 3) for 60 s, and the one of the OPEN exchange.
    assert!((20..=22).contains(&ka), "{ka} keepalives");
}

#[test]
fn routes_flow_with_attributes_and_minimal_updates() {
    let mut p = Pair::new(a_config(), b_config());
    let mut r1 = route("10.96.200.1/32");
    r1.communities = vec![0xfde8_0001];
    r1.large_communities = vec![LargeCommunity {
        global: 64601,
        local1: 1,
        local2: 2,
    }];
    r1.local_pref = Some(300);
    let r2 = route("fd00:96:200::1/128");
    let r3 = route("10.96.200.3/32");
    p.a.set_routes([r1.clone(), r2.clone(), r3.clone()]);
    p.run();
    assert_eq!(
        prefixes(&p.b),
        ["10.96.200.1/32", "10.96.200.3/32", "fd00:96:200::1/128"]
    );
    let got = &p.b.received()[&r1.prefix].attributes;
    assert_eq!(got.next_hop, Some(Ipv4Addr::new(10, 96, 0, 2)));
    assert_eq!(got.communities, vec![0xfde8_0001]);
    assert_eq!(got.large_communities, r1.large_communities);
    // eBGP: no LOCAL_PREF (RFC 4271 §5.1.5), our AS in the path.
    assert_eq!(got.local_pref, None);
    assert_eq!(got.as_path.as_ref().unwrap()[0].asns, vec![64601]);
    let v6 = &p.b.received()[&r2.prefix].attributes;
    assert_eq!(v6.mp_reach.as_ref().unwrap().next_hop, IpAddr::V6(A_V6));

    // Change r1's communities, drop r2, keep r3: one UPDATE withdraws r2 (IPv6), one
    // re-announces r1, nothing about r3.
    let before = updates(&p.b_got);
    let mut r1b = r1.clone();
    r1b.communities = vec![0xfde8_0002];
    p.a.set_routes([r1b.clone(), r3.clone()]);
    p.run();
    assert_eq!(updates(&p.b_got) - before, 2);
    assert_eq!(prefixes(&p.b), ["10.96.200.1/32", "10.96.200.3/32"]);
    assert_eq!(
        p.b.received()[&r1.prefix].attributes.communities,
        vec![0xfde8_0002]
    );
    // The same set again: nothing sent.
    let before = updates(&p.b_got);
    p.a.set_routes([r3.clone(), r1b.clone()]);
    p.run();
    assert_eq!(updates(&p.b_got), before);
}

#[test]
fn initial_table_then_end_of_rib() {
    let mut p = Pair::new(a_config(), b_config());
    p.a.handle(p.now, Event::Stop);
    p.run();
    let routes: Vec<Route> = (1..=2000u32)
        .map(|i| Route::new(IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i)).into()))
        .collect();
    p.a.set_routes(routes);
    p.b_got.clear();
    let now = p.now;
    p.a.handle(now, Event::Start);
    p.run();
    p.advance(Duration::from_secs(6));
    assert!(established(&p));
    assert_eq!(p.b.received().len(), 2000);
    // All routes in full UPDATEs (about 800 /32s fit in 4096 bytes), then End-of-RIB.
    let n = updates(&p.b_got);
    assert!((3..=6).contains(&n), "{n} UPDATEs");
    let last: Vec<Family> = eors(&p.b_got);
    assert_eq!(last, vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert!(matches!(p.b_got.last(), Some(Message::Update(u)) if u.is_end_of_rib().is_some()));
}

#[test]
fn hold_timer_expires_on_silence_and_the_session_comes_back() {
    let mut p = Pair::new(a_config(), b_config());
    p.a.set_routes([route("10.96.200.1/32")]);
    p.run();
    p.a_silent = true;
    p.advance(Duration::from_secs(8));
    assert!(established(&p), "still up before the hold time");
    p.advance(Duration::from_secs(2));
    assert_eq!(
        p.b_events.last(),
        Some(&Action::Down(DownReason::HoldTimerExpired))
    );
    // a got b's NOTIFICATION (Hold Timer Expired).
    match p.a_events.last() {
        Some(Action::Down(DownReason::NotificationReceived(n))) => {
            assert_eq!(n.error, ErrorKind::HoldTimerExpired)
        }
        e => panic!("{e:?}"),
    }
    // A NOTIFICATION ends graceful restart: the route is gone at once.
    assert!(p.b.received().is_empty());
    // a reconnects after the connect retry time and re-announces.
    p.a_silent = false;
    p.advance(Duration::from_secs(6));
    assert!(established(&p));
    assert_eq!(prefixes(&p.b), ["10.96.200.1/32"]);
}

#[test]
fn stop_sends_cease_and_withdraws() {
    let mut p = Pair::new(a_config(), b_config());
    p.a.set_routes([route("10.96.200.1/32")]);
    p.run();
    assert_eq!(p.b.received().len(), 1);
    let now = p.now;
    p.a.handle(now, Event::Stop);
    p.run();
    match p.b_events.last() {
        Some(Action::Down(DownReason::NotificationReceived(n))) => assert_eq!(
            n.error,
            ErrorKind::Cease(CeaseSubcode::AdministrativeShutdown)
        ),
        e => panic!("{e:?}"),
    }
    assert!(p.b.received().is_empty());
    assert_eq!(p.a_events.last(), Some(&Action::Down(DownReason::Stopped)));
    // Stopped stays stopped.
    p.advance(Duration::from_secs(60));
    assert_eq!(p.a.state(), State::Idle);
    assert_eq!(p.b.state(), State::Active);
}

#[test]
fn graceful_restart_keeps_routes_until_end_of_rib() {
    let mut p = Pair::new(a_config(), b_config());
    p.a.set_routes([route("10.96.200.1/32"), route("10.96.200.2/32")]);
    p.run();
    // SIGKILL: the connection drops without a NOTIFICATION; b keeps the routes, stale.
    p.kill_a(None);
    assert_eq!(
        p.b_events.last(),
        Some(&Action::Down(DownReason::ConnectionLost))
    );
    assert_eq!(p.b.received().len(), 2);
    assert!(p.b.received().values().all(|r| r.stale));
    p.advance(Duration::from_secs(30));
    assert_eq!(p.b.received().len(), 2, "kept within the restart time");
    // The new a announces one of the two: after its End-of-RIB the other goes.
    let mut cfg = a_config();
    cfg.restarted = true;
    p.kill_a(Some(cfg));
    assert_eq!(
        p.b.peer_open()
            .unwrap()
            .graceful_restart()
            .map(|g| g.restart_state),
        Some(true)
    );
    assert!(established(&p));
    // The new a had no routes when it came up: its End-of-RIB flushed the stale ones.
    assert!(p.b.received().is_empty());
    p.a.set_routes([route("10.96.200.1/32")]);
    p.run();
    assert_eq!(prefixes(&p.b), ["10.96.200.1/32"]);
    assert!(p.b.received().values().all(|r| !r.stale));
}

#[test]
fn graceful_restart_reannounced_before_end_of_rib() {
    let mut p = Pair::new(a_config(), b_config());
    p.a.set_routes([route("10.96.200.1/32"), route("10.96.200.2/32")]);
    p.run();
    p.kill_a(None);
    // The agent's new speaker knows its routes before the session is up (the usual case).
    let mut cfg = a_config();
    cfg.restarted = true;
    let mut a = Session::new(cfg);
    a.set_routes([route("10.96.200.1/32")]);
    p.a = a;
    let now = p.now;
    p.a.handle(now, Event::Start);
    p.run();
    assert!(p.b.received().values().all(|r| r.stale));
    p.advance(Duration::from_secs(6));
    assert!(established(&p));
    assert_eq!(prefixes(&p.b), ["10.96.200.1/32"]);
    assert!(p.b.received().values().all(|r| !r.stale));
}

#[test]
fn graceful_restart_gives_up_after_the_restart_time() {
    let mut cfg = a_config();
    cfg.graceful_restart = Some(20);
    let mut p = Pair::new(cfg, b_config());
    p.a.set_routes([route("10.96.200.1/32")]);
    p.run();
    p.kill_a(None);
    p.advance(Duration::from_secs(19));
    assert_eq!(p.b.received().len(), 1);
    p.advance(Duration::from_secs(2));
    assert!(p.b.received().is_empty());
}

#[test]
fn no_graceful_restart_without_the_capability() {
    let mut cfg = a_config();
    cfg.graceful_restart = None;
    let mut p = Pair::new(cfg, b_config());
    p.a.set_routes([route("10.96.200.1/32")]);
    p.run();
    p.kill_a(None);
    assert!(p.b.received().is_empty());
}

/// An UPDATE for 10.96.200.9/32 with the given attribute bytes.
fn raw_update(attrs: &[u8]) -> Vec<u8> {
    let nlri = [32u8, 10, 96, 200, 9];
    let mut b = vec![0xff; 16];
    b.extend_from_slice(&((23 + attrs.len() + nlri.len()) as u16).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(&nlri);
    b
}

#[test]
fn malformed_updates_per_rfc_7606() {
    let mut p = Pair::new(a_config(), b_config());
    let good = [
        0x40, 1, 1, 0, // ORIGIN IGP
        0x40, 2, 6, 2, 1, 0, 0, 0xfc, 0x59, // AS_PATH 64601
        0x40, 3, 4, 10, 96, 0, 2, // NEXT_HOP
    ];
    let now = p.now;
    p.b.handle(now, Event::Bytes(&raw_update(&good)));
    p.run();
    assert_eq!(prefixes(&p.b), ["10.96.200.9/32"]);
    // A bad ORIGIN value: treat-as-withdraw, the session stays.
    let mut bad = good;
    bad[3] = 7;
    p.b.handle(now, Event::Bytes(&raw_update(&bad)));
    p.run();
    assert!(p.b.received().is_empty());
    assert!(established(&p));
    assert_eq!(p.b.counters().treated_as_withdraw, 1);
    // A /40 in the NLRI cannot be parsed: session reset with an UPDATE error.
    let mut reset = raw_update(&good);
    let at = reset.len() - 5;
    reset[at] = 40;
    reset.push(0);
    let len = reset.len() as u16;
    reset[16..18].copy_from_slice(&len.to_be_bytes());
    p.b.handle(now, Event::Bytes(&reset));
    p.run();
    match p.b_events.last() {
        Some(Action::Down(DownReason::NotificationSent(n))) => assert_eq!(
            n.error,
            ErrorKind::Update(UpdateSubcode::InvalidNetworkField)
        ),
        e => panic!("{e:?}"),
    }
}

#[test]
fn wrong_peer_as_is_refused() {
    let mut b = b_config();
    b.peer_asn = 65999;
    let p = Pair::new(a_config(), b);
    assert!(!established(&p));
    let refused = p.a_got.iter().any(|m| {
        matches!(m, Message::Notification(n) if n.error == ErrorKind::Open(OpenSubcode::BadPeerAs))
    });
    assert!(refused, "{:?}", p.a_got);
}

#[test]
fn route_refresh_resends() {
    let mut p = Pair::new(a_config(), b_config());
    p.a.set_routes([route("10.96.200.1/32")]);
    p.run();
    let before = updates(&p.b_got);
    let rr = packet::encode(
        &Message::RouteRefresh(packet::RouteRefresh { afi: 1, safi: 1 }),
        Codec::default(),
    );
    let now = p.now;
    p.a.handle(now, Event::Bytes(&rr));
    p.run();
    assert_eq!(updates(&p.b_got), before + 1);
}

#[test]
fn received_routes_are_not_kept_unless_asked() {
    // b (the router side) announces to a, which by default keeps nothing.
    let mut p = Pair::new(a_config(), b_config());
    p.b.set_routes([route("10.96.0.0/24")]);
    p.run();
    assert!(p.a.received().is_empty());
    assert_eq!(
        p.a.counters().updates_received,
        3,
        "the route and two End-of-RIBs"
    );
    let mut a = a_config();
    a.keep_received = true;
    let mut p = Pair::new(a, b_config());
    p.b.set_routes([route("10.96.0.0/24")]);
    p.run();
    assert_eq!(prefixes(&p.a), ["10.96.0.0/24"]);
}

#[test]
fn hold_time_zero_means_no_keepalives() {
    let mut a = a_config();
    a.hold_time = 0;
    let mut p = Pair::new(a, b_config());
    assert!(established(&p));
    assert_eq!(p.b.hold_time(), Duration::ZERO);
    let before = p.b_got.len();
    p.advance(Duration::from_secs(1000));
    assert!(established(&p));
    assert_eq!(p.b_got.len(), before, "nothing sent in 1000 s");
    assert_eq!(p.a.poll_timeout(), None);
}

#[test]
fn ten_thousand_routes() {
    // The sans-IO cost of an initial table of 10,000 /32s and of withdrawing half of them
    // (printed; `cargo test --release` for the real figure).
    let mut p = Pair::new(a_config(), b_config());
    let routes: Vec<Route> = (0..10_000u32)
        .map(|i| Route::new(IpAddr::V4(Ipv4Addr::from(0x0a61_0000 + i)).into()))
        .collect();
    let start = Instant::now();
    p.a.set_routes(routes.clone());
    p.run();
    let took = start.elapsed();
    assert_eq!(p.b.received().len(), 10_000);
    let sent = p.a.counters();
    assert!(sent.updates_sent <= 15, "{sent:?}");
    let start = Instant::now();
    p.a.set_routes(routes[..5_000].to_vec());
    p.run();
    assert_eq!(p.b.received().len(), 5_000);
    println!(
        "10,000 routes announced in {took:?} ({} UPDATEs, both ends' codec and sessions), \
         5,000 withdrawn in {:?}",
        sent.updates_sent,
        start.elapsed()
    );
}
