//! One BFD session (RFC 5880 section 6), sans-IO: packets and the time go in
//! ([`Session::handle_packet`], [`Session::handle_timeout`]), packets to send and state
//! changes come out ([`Session::poll_output`]), and [`Session::poll_timeout`] says when to
//! call again. Asynchronous mode only; no echo, no demand mode, no authentication.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::packet::{Diag, Packet, State};

/// While a session is not Up, packets go at most once a second (RFC 5880 6.8.3).
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// A session's timers, as a BFDProfile gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Desired Min TX Interval (once Up).
    pub desired_min_tx: Duration,
    /// Required Min RX Interval.
    pub required_min_rx: Duration,
    /// Detect Mult.
    pub detect_mult: u8,
    /// Passive: send nothing until the peer has sent something (RFC 5880 6.1).
    pub passive: bool,
}

impl Default for Config {
    /// MetalLB's BFDProfile defaults: 300 ms both ways, multiplier 3.
    fn default() -> Self {
        Config {
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            detect_mult: 3,
            passive: false,
        }
    }
}

/// What the session wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this packet to the peer.
    Send(Packet),
    /// The session state changed (with the local diagnostic: why it went Down).
    State(State, Diag),
}

/// One BFD session.
#[derive(Debug)]
pub struct Session {
    config: Config,
    state: State,
    diag: Diag,
    local_disc: u32,
    remote_disc: u32,
    remote_state: State,
    remote_detect_mult: u8,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    /// The intervals in use (what packets advertise comes from `config`, or 1 s while not
    /// Up); they take the configured values when a Poll Sequence ends.
    active_tx: Duration,
    active_rx: Duration,
    /// A Poll Sequence is running (packets carry P until a packet with F comes).
    polling: bool,
    /// A packet with F is owed (the peer polled).
    final_owed: bool,
    next_tx: Option<Instant>,
    detect_at: Option<Instant>,
    out: VecDeque<Output>,
    rng: u64,
}

impl Session {
    /// A session in state Down. `local_disc` must be non-zero and unique among the local
    /// sessions; it also seeds the transmit jitter.
    pub fn new(config: Config, local_disc: u32, now: Instant) -> Session {
        let mut s = Session {
            config,
            state: State::Down,
            diag: Diag::None,
            local_disc: local_disc.max(1),
            remote_disc: 0,
            remote_state: State::Down,
            remote_detect_mult: 0,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            active_tx: SLOW_TX,
            active_rx: config.required_min_rx,
            polling: false,
            final_owed: false,
            next_tx: None,
            detect_at: None,
            out: VecDeque::new(),
            rng: u64::from(local_disc.max(1)) | 0x9e37_79b9_0000_0000,
        };
        if !config.passive {
            s.next_tx = Some(now);
        }
        s
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn diag(&self) -> Diag {
        self.diag
    }

    pub fn local_disc(&self) -> u32 {
        self.local_disc
    }

    pub fn remote_disc(&self) -> u32 {
        self.remote_disc
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// The detection time in use: the remote Detect Mult × the agreed interval (the larger of
    /// our Required Min RX and the remote's Desired Min TX), RFC 5880 6.8.4.
    pub fn detection_time(&self) -> Duration {
        self.active_rx.max(self.remote_desired_tx) * u32::from(self.remote_detect_mult.max(1))
    }

    /// The interval between our packets (before jitter): the larger of our Desired Min TX
    /// and the remote's Required Min RX.
    pub fn tx_interval(&self) -> Duration {
        self.active_tx.max(self.remote_min_rx)
    }

    /// The Desired Min TX we advertise: at least 1 s while not Up.
    fn advertised_tx(&self) -> Duration {
        if self.state == State::Up {
            self.config.desired_min_tx
        } else {
            self.config.desired_min_tx.max(SLOW_TX)
        }
    }

    /// New timers (a BFDProfile changed): takes effect through a Poll Sequence when Up.
    pub fn set_config(&mut self, config: Config, now: Instant) {
        let old = self.advertised_tx();
        let old_rx = self.config.required_min_rx;
        self.config = config;
        if self.state == State::Up
            && (old != self.advertised_tx() || old_rx != config.required_min_rx)
        {
            self.start_poll(now);
        } else if self.state != State::Up {
            self.active_rx = config.required_min_rx;
            self.active_tx = self.advertised_tx();
        }
    }

    /// Administratively down (RFC 5880 6.8.16) or back (to Down).
    pub fn set_admin_down(&mut self, down: bool, now: Instant) {
        if down && self.state != State::AdminDown {
            self.set_state(State::AdminDown, Diag::AdministrativelyDown);
            self.detect_at = None;
            self.next_tx = Some(now);
        } else if !down && self.state == State::AdminDown {
            self.set_state(State::Down, Diag::None);
        }
    }

    fn start_poll(&mut self, now: Instant) {
        self.polling = true;
        // A faster rate may start at once; a slower one waits for the Final (6.8.3).
        self.active_tx = self.active_tx.min(self.advertised_tx());
        self.next_tx = Some(now);
    }

    fn set_state(&mut self, state: State, diag: Diag) {
        if self.state == state {
            return;
        }
        let was_up = self.state == State::Up;
        self.state = state;
        self.diag = diag;
        if state == State::Up {
            // 1 s while not Up; the configured rate now, announced by a Poll Sequence.
            self.polling = true;
            self.active_tx = self.advertised_tx();
            self.active_rx = self.config.required_min_rx;
        } else if was_up {
            self.active_tx = self.advertised_tx();
            self.polling = false;
        }
        self.out.push_back(Output::State(state, diag));
    }

    /// A packet the edge received for this session (already decoded, so checked; the edge
    /// matched Your Discriminator, or the source address when it is 0).
    pub fn handle_packet(&mut self, p: &Packet, now: Instant) {
        self.remote_disc = p.my_disc;
        self.remote_state = p.state;
        self.remote_detect_mult = p.detect_mult;
        self.remote_min_rx = p.required_min_rx();
        self.remote_desired_tx = p.desired_min_tx();
        if p.fin && self.polling {
            self.polling = false;
            self.active_tx = self.advertised_tx();
            self.active_rx = self.config.required_min_rx;
        }
        if self.state == State::AdminDown {
            return;
        }
        let before = self.state;
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.set_state(State::Down, Diag::NeighborSignaledSessionDown);
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => self.set_state(State::Init, Diag::None),
                (State::Down, State::Init) => self.set_state(State::Up, Diag::None),
                (State::Init, State::Init | State::Up) => self.set_state(State::Up, Diag::None),
                (State::Up, State::Down) => {
                    self.set_state(State::Down, Diag::NeighborSignaledSessionDown)
                }
                _ => {}
            }
        }
        if p.poll {
            self.final_owed = true;
        }
        let became_up = before != State::Up && self.state == State::Up;
        // A passive session starts sending once the peer is heard; a zero Required Min RX
        // stops us (6.8.7).
        if self.remote_min_rx.is_zero() {
            self.next_tx = None;
        } else if self.next_tx.is_none() || self.final_owed || became_up {
            // Reaching Up starts the Poll Sequence to the fast rate at once.
            self.next_tx = Some(if self.final_owed || became_up {
                now
            } else {
                now + self.jittered()
            });
        } else if let Some(t) = self.next_tx {
            // The peer may have lowered what it accepts: never wait longer than one interval.
            self.next_tx = Some(t.min(now + self.tx_interval()));
        }
        // Init/Up: the session goes Down if nothing more comes within the detection time;
        // Down: a silent peer's discriminator is forgotten then.
        self.detect_at = Some(now + self.detection_time());
    }

    /// The clock moved on: detection, and packets due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.detect_at {
            if now >= at {
                self.detect_at = None;
                if matches!(self.state, State::Init | State::Up) {
                    self.set_state(State::Down, Diag::ControlDetectionTimeExpired);
                }
                self.remote_disc = 0;
                self.remote_state = State::Down;
                self.remote_min_rx = Duration::from_micros(1);
                self.remote_desired_tx = Duration::ZERO;
                self.remote_detect_mult = 0;
                if self.config.passive {
                    self.next_tx = None;
                }
            }
        }
        if let Some(at) = self.next_tx {
            if now >= at {
                let p = self.packet();
                self.final_owed = false;
                self.out.push_back(Output::Send(p));
                self.next_tx = Some(now + self.jittered());
            }
        }
    }

    /// The packet we would send now.
    pub fn packet(&self) -> Packet {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        Packet {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !self.final_owed,
            fin: self.final_owed,
            cpi: false,
            auth: false,
            demand: false,
            multipoint: false,
            detect_mult: self.config.detect_mult,
            my_disc: self.local_disc,
            your_disc: self.remote_disc,
            desired_min_tx: us(self.advertised_tx()),
            required_min_rx: us(self.config.required_min_rx),
            required_min_echo_rx: 0,
        }
    }

    /// The next instant [`Session::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_tx, self.detect_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The TX interval reduced by 0-25 % (10-25 % with Detect Mult 1), RFC
    /// 5880 6.8.7, from a xorshift generator seeded by the discriminator.
    fn jittered(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let i = self.tx_interval();
        let pct = if self.config.detect_mult == 1 {
            10 + self.rng % 16
        } else {
            self.rng % 26
        };
        i - i * (pct as u32) / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(ms: u64, mult: u8) -> Config {
        Config {
            desired_min_tx: MS * ms as u32,
            required_min_rx: MS * ms as u32,
            detect_mult: mult,
            passive: false,
        }
    }

    /// Two sessions and a link between them that can be cut, driven in steps of 1 ms of
    /// simulated time: each output packet arrives `delay` later.
    struct Link {
        a: Session,
        b: Session,
        now: Instant,
        up: bool,
        delay: Duration,
        /// (arrival, to b?, packet)
        flight: Vec<(Instant, bool, Packet)>,
        states: Vec<(Duration, bool, State)>,
        start: Instant,
    }

    impl Link {
        fn new(a: Config, b: Config) -> Link {
            let now = Instant::now();
            Link {
                a: Session::new(a, 11, now),
                b: Session::new(b, 22, now),
                now,
                up: true,
                delay: MS,
                flight: Vec::new(),
                states: Vec::new(),
                start: now,
            }
        }

        fn step(&mut self) {
            self.now += MS;
            let now = self.now;
            let (due, rest): (Vec<_>, Vec<_>) =
                self.flight.drain(..).partition(|(t, _, _)| *t <= now);
            self.flight = rest;
            for (_, to_b, p) in due {
                let p = Packet::decode(&p.encode()).expect("our packets decode");
                if to_b {
                    self.b.handle_packet(&p, now);
                } else {
                    self.a.handle_packet(&p, now);
                }
            }
            self.a.handle_timeout(now);
            self.b.handle_timeout(now);
            for (is_a, s) in [(true, &mut self.a), (false, &mut self.b)] {
                while let Some(o) = s.poll_output() {
                    match o {
                        Output::Send(p) if self.up => self.flight.push((now + self.delay, is_a, p)),
                        Output::Send(_) => {}
                        Output::State(st, _) => self.states.push((now - self.start, is_a, st)),
                    }
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.step();
            }
        }

        fn run_until(&mut self, limit: Duration, f: impl Fn(&Link) -> bool) -> Option<Duration> {
            let start = self.now;
            while self.now - start < limit {
                self.step();
                if f(self) {
                    return Some(self.now - start);
                }
            }
            None
        }
    }

    #[test]
    fn three_way_handshake_brings_both_up() {
        let mut l = Link::new(cfg(100, 3), cfg(100, 3));
        let t = l
            .run_until(MS * 5000, |l| {
                l.a.state() == State::Up && l.b.state() == State::Up
            })
            .expect("both Up");
        // Down -> Init on the first packets, Init -> Up on the next ones, 1 s (less jitter)
        // later: packets go slowly while not Up.
        assert!(t <= MS * 1010, "two slow exchanges: {t:?}");
        let a: Vec<State> = l.states.iter().filter(|s| s.1).map(|s| s.2).collect();
        assert_eq!(a, [State::Init, State::Up]);
        // The poll sequence to the fast rate ends; then packets go every 75-100 ms.
        l.run(MS * 3000);
        assert!(!l.a.polling && !l.b.polling);
        assert_eq!(l.a.tx_interval(), MS * 100);
        assert_eq!(l.a.detection_time(), MS * 300);
    }

    #[test]
    fn link_loss_is_detected_after_detect_mult_times_interval() {
        for (ms, mult) in [(100, 3), (300, 3), (50, 5), (10, 2)] {
            let mut l = Link::new(cfg(ms, mult), cfg(ms, mult));
            l.run(MS * 5000);
            assert_eq!((l.a.state(), l.b.state()), (State::Up, State::Up));
            l.up = false;
            let t = l
                .run_until(MS * 10_000, |l| {
                    l.a.state() == State::Down && l.b.state() == State::Down
                })
                .expect("Down");
            let d = MS * (ms * u64::from(mult)) as u32;
            assert!(t <= d + MS * 2, "{ms} ms x {mult}: {t:?}");
            // The last packet was up to one interval before the cut.
            assert!(t + MS * ms as u32 >= d, "{ms} ms x {mult}: {t:?} too early");
            assert_eq!(l.a.diag(), Diag::ControlDetectionTimeExpired);
            // And back when the link is.
            l.up = true;
            l.run_until(MS * 10_000, |l| {
                l.a.state() == State::Up && l.b.state() == State::Up
            })
            .expect("Up again");
        }
    }

    #[test]
    fn slow_until_up_and_the_agreed_interval_is_the_slower() {
        let mut a = Session::new(cfg(100, 3), 1, Instant::now());
        assert_eq!(a.packet().desired_min_tx, 1_000_000, "1 s while not Up");
        let mut l = Link::new(cfg(50, 3), cfg(200, 4));
        l.run(MS * 5000);
        assert_eq!(
            l.a.tx_interval(),
            MS * 200,
            "b wants at most one per 200 ms"
        );
        assert_eq!(l.a.detection_time(), MS * 800, "b's mult 4 x b's 200 ms TX");
        assert_eq!(
            l.b.detection_time(),
            MS * 600,
            "a's mult 3 x b's own 200 ms RX"
        );
        a.handle_timeout(Instant::now());
        assert!(matches!(a.poll_output(), Some(Output::Send(_))));
    }

    #[test]
    fn poll_sequence_changes_timers() {
        let mut l = Link::new(cfg(100, 3), cfg(100, 3));
        l.run(MS * 3000);
        let now = l.now;
        l.a.set_config(cfg(300, 3), now);
        assert!(l.a.polling);
        assert_eq!(l.a.tx_interval(), MS * 100, "slower only after the Final");
        l.run(MS * 1000);
        assert!(!l.a.polling, "Final received");
        assert_eq!(l.a.tx_interval(), MS * 300);
        assert_eq!(l.b.detection_time(), MS * 900);
        assert_eq!((l.a.state(), l.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn passive_waits_for_the_peer() {
        let mut p = cfg(100, 3);
        p.passive = true;
        let mut l = Link::new(p, p);
        l.run(MS * 5000);
        assert!(
            l.flight.is_empty() && l.states.is_empty(),
            "both passive: silence"
        );
        let mut l = Link::new(p, cfg(100, 3));
        l.run(MS * 3000);
        assert_eq!((l.a.state(), l.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn admin_down_and_neighbor_down() {
        let mut l = Link::new(cfg(100, 3), cfg(100, 3));
        l.run(MS * 3000);
        let now = l.now;
        l.a.set_admin_down(true, now);
        l.run(MS * 50);
        assert_eq!(l.b.state(), State::Down);
        assert_eq!(l.b.diag(), Diag::NeighborSignaledSessionDown);
        l.run(MS * 5000);
        assert_eq!((l.a.state(), l.b.state()), (State::AdminDown, State::Down));
        let now = l.now;
        l.a.set_admin_down(false, now);
        l.run(MS * 5000);
        assert_eq!((l.a.state(), l.b.state()), (State::Up, State::Up));
    }

    proptest! {
        /// Whatever a peer sends, the session never panics, always has a timeout, and sends
        /// no faster than the peer's Required Min RX allows (nor 1 s while not Up).
        #[test]
        fn any_peer(pkts in proptest::collection::vec(
            (1u32..3000, 0u8..4, any::<bool>(), any::<bool>(), 1u8..10, 1u32..5, 0u32..2_000_000, 0u32..2_000_000), 0..40)) {
            let start = Instant::now();
            let mut s = Session::new(cfg(100, 3), 5, start);
            let mut now = start;
            let mut last_tx: Option<Instant> = None;
            let mut exempt = false;
            for (gap, st, poll, fin, mult, disc, tx, rx) in pkts {
                let end = now + MS * gap;
                while now < end {
                    now = (now + MS).min(end);
                    s.handle_timeout(now);
                    while let Some(o) = s.poll_output() {
                        if o == Output::State(State::Up, Diag::None) {
                            exempt = true;
                        }
                        if let Output::Send(p) = o {
                            if let Some(l) = last_tx {
                                // Finals and the Poll that starts on reaching Up go at once.
                                if !p.fin && !exempt {
                                    let least = (s.tx_interval() * 3 / 4).min(MS * 750);
                                    prop_assert!(now - l + MS >= least.min(MS * 75), "{:?}", now - l);
                                }
                            }
                            last_tx = Some(now);
                            exempt = false;
                        }
                    }
                }
                let p = Packet { diag: Diag::None, state: match st { 0 => State::AdminDown, 1 => State::Down, 2 => State::Init, _ => State::Up },
                    poll, fin, cpi: false, auth: false, demand: false, multipoint: false,
                    detect_mult: mult, my_disc: disc, your_disc: 5, desired_min_tx: tx, required_min_rx: rx, required_min_echo_rx: 0 };
                s.handle_packet(&p, now);
                prop_assert!(s.poll_timeout().is_some() || rx == 0);
            }
        }
    }
}
