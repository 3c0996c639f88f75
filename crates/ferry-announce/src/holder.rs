//! When a node may start answering for an address it won, and when it must stop (pure, time
//! passed in): the hold-down after (re)gaining a majority, the hand-over to a node that has just
//! come back, and the ownership lease the responder checks before every answer.
//!
//! The election ([`crate::decide`]) says who *should* answer now. Views differ for a moment
//! between nodes, so a [`Holder`] adds the timing that keeps two nodes from answering at once:
//!
//! - **Hold-down.** A node that has just (re)gained a majority waits [`Timing::hold_down`] before
//!   taking over an address it does not hold: the current holder needs that long to hear of it
//!   and let go.
//! - **Hand-over.** A holder whose address is now won by a node that has only just come back
//!   keeps it for [`Timing::hand_over`] (shorter than the hold-down), so that somebody answers
//!   in the meantime, and lets go before the newcomer starts.
//! - **Lease.** Every step yields `valid_until`: the moment this node's majority lapses if it
//!   hears nothing more ([`ferry_member::quorum_lease`]), capped at [`Timing::max_lease`]. The
//!   responder answers only before it, so a node that is cut off, stalled or gone falls silent
//!   by itself, whatever its other threads are doing, before the others can declare it dead.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferry_member::QuorumLease;

use crate::decide::L2Decision;

/// The hold-down, hand-over and lease cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub hold_down: Duration,
    pub hand_over: Duration,
    /// Longest lease given to the responder, even when this node alone is a majority: a holder
    /// whose control thread stops renewing falls silent after this long.
    pub max_lease: Duration,
}

impl Default for Timing {
    /// 1 s hold-down, 600 ms hand-over, 1 s lease cap.
    fn default() -> Timing {
        Timing {
            hold_down: Duration::from_millis(1000),
            hand_over: Duration::from_millis(600),
            max_lease: Duration::from_millis(1000),
        }
    }
}

/// What a step changed, for the log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Announce {
        iface: String,
        ip: IpAddr,
    },
    Withdraw {
        iface: String,
        ip: IpAddr,
    },
    /// This node now hears (true) or no longer hears (false) a majority.
    Quorum(bool),
    /// Addresses won on the default interface, but no interface holds the node's address.
    NoInterface(BTreeSet<IpAddr>),
}

/// The outcome of one [`Holder::step`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Interface -> addresses to answer for (the responders' new state).
    pub owned: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The lease to give the responders with them (None when nothing is owned).
    pub valid_until: Option<Instant>,
    pub events: Vec<Event>,
}

/// One node's announcement state across election results.
#[derive(Debug, Clone)]
pub struct Holder {
    me: String,
    timing: Timing,
    owned: BTreeMap<String, BTreeSet<IpAddr>>,
    quorum: Option<bool>,
    /// Since when this node has had a majority.
    quorum_since: Option<Instant>,
    /// Since when each node has been alive in this node's view.
    alive_since: BTreeMap<String, Instant>,
}

impl Holder {
    pub fn new(me: impl Into<String>, timing: Timing) -> Holder {
        Holder {
            me: me.into(),
            timing,
            owned: BTreeMap::new(),
            quorum: None,
            quorum_since: None,
            alive_since: BTreeMap::new(),
        }
    }

    /// Interface -> the addresses this node answers for.
    pub fn owned(&self) -> &BTreeMap<String, BTreeSet<IpAddr>> {
        &self.owned
    }

    /// Whether this node heard a majority at the last step.
    pub fn quorum(&self) -> bool {
        self.quorum == Some(true)
    }

    /// Applies an election result computed at `now` from the `alive` view and the `lease`.
    /// `default_iface` is the interface of the node's address (for addresses whose
    /// advertisement names no interface).
    pub fn step(
        &mut self,
        now: Instant,
        d: &L2Decision,
        alive: &BTreeSet<String>,
        lease: QuorumLease,
        default_iface: Option<&str>,
    ) -> Step {
        let mut events = Vec::new();
        // Quorum needs both the view the election used and a lease still running now.
        let quorum = d.quorum && lease != QuorumLease::Lost;
        match (quorum, self.quorum_since) {
            (true, None) => self.quorum_since = Some(now),
            (false, Some(_)) => self.quorum_since = None,
            _ => {}
        }
        if self.quorum != Some(quorum) {
            self.quorum = Some(quorum);
            events.push(Event::Quorum(quorum));
        }
        self.alive_since.retain(|n, _| alive.contains(n));
        for n in alive {
            self.alive_since.entry(n.clone()).or_insert(now);
        }
        let settled = self
            .quorum_since
            .is_some_and(|t| now >= t + self.timing.hold_down);

        let mut want: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        if quorum {
            for (iface, ips) in &d.owned {
                let name = if iface.is_empty() {
                    match default_iface {
                        Some(n) => n.to_string(),
                        None => {
                            events.push(Event::NoInterface(ips.clone()));
                            continue;
                        }
                    }
                } else {
                    iface.clone()
                };
                let held = self.owned.get(&name);
                want.entry(name.clone()).or_default().extend(
                    ips.iter()
                        .copied()
                        .filter(|ip| settled || held.is_some_and(|h| h.contains(ip))),
                );
            }
            // Hand-over: an address whose new winner has only just come back stays here until
            // shortly before that node's hold-down ends, so that somebody always answers.
            for (iface, held) in &self.owned {
                for ip in held {
                    if self.newcomer_wins(now, d, *ip) {
                        want.entry(iface.clone()).or_default().insert(*ip);
                    }
                }
            }
        }
        want.retain(|_, ips| !ips.is_empty());

        let ifaces: BTreeSet<&String> = want.keys().chain(self.owned.keys()).collect();
        for iface in ifaces {
            let new = want.get(iface);
            let old = self.owned.get(iface);
            for ip in new.into_iter().flatten() {
                if !old.is_some_and(|o| o.contains(ip)) {
                    events.push(Event::Announce {
                        iface: iface.clone(),
                        ip: *ip,
                    });
                }
            }
            for ip in old.into_iter().flatten() {
                if !new.is_some_and(|n| n.contains(ip)) {
                    events.push(Event::Withdraw {
                        iface: iface.clone(),
                        ip: *ip,
                    });
                }
            }
        }
        self.owned = want;
        let valid_until = (!self.owned.is_empty())
            .then(|| {
                let cap = now + self.timing.max_lease;
                match lease {
                    QuorumLease::Until(t) => Some(t.min(cap)),
                    QuorumLease::Unbounded => Some(cap),
                    QuorumLease::Lost => None,
                }
            })
            .flatten();
        Step {
            owned: self.owned.clone(),
            valid_until,
            events,
        }
    }

    /// Whether `ip`'s winner is another node that came alive less than the hand-over ago.
    fn newcomer_wins(&self, now: Instant, d: &L2Decision, ip: IpAddr) -> bool {
        match d.winners.get(&ip) {
            Some(Some(w)) if *w != self.me => self
                .alive_since
                .get(w)
                .is_some_and(|t| now < *t + self.timing.hand_over),
            _ => false,
        }
    }

    /// The next moment a step may change something without any new input: the end of the
    /// hold-down, or of a hand-over. (Lease renewals are the caller's cadence.)
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let hold = self
            .quorum_since
            .map(|t| t + self.timing.hold_down)
            .filter(|t| *t > now);
        let hand = self
            .alive_since
            .values()
            .map(|t| *t + self.timing.hand_over)
            .filter(|t| *t > now)
            .min();
        hold.into_iter().chain(hand).min()
    }

    /// Withdraws everything (agent shutdown).
    pub fn withdraw_all(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        for (iface, ips) in std::mem::take(&mut self.owned) {
            for ip in ips {
                events.push(Event::Withdraw {
                    iface: iface.clone(),
                    ip,
                });
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IP: &str = "192.168.2.200";

    fn ip() -> IpAddr {
        IP.parse().unwrap()
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The election's answer for one address on the default interface.
    fn decision(me: &str, winner: Option<&str>, quorum: bool) -> L2Decision {
        let mut d = L2Decision {
            quorum,
            ..L2Decision::default()
        };
        d.winners.insert(ip(), winner.map(str::to_string));
        if quorum && winner == Some(me) {
            d.owned.entry(String::new()).or_default().insert(ip());
        }
        d
    }

    fn owns(s: &Step) -> bool {
        s.owned.values().any(|ips| ips.contains(&ip()))
    }

    #[test]
    fn a_node_that_just_gained_a_majority_waits_the_hold_down() {
        let t0 = Instant::now();
        let mut h = Holder::new("a", Timing::default());
        let alive = set(&["a", "b"]);
        let lease = |t: u64| QuorumLease::Until(at(t0, t + 80));
        let s = h.step(
            t0,
            &decision("a", Some("a"), true),
            &alive,
            lease(0),
            Some("eth0"),
        );
        assert!(!owns(&s));
        assert_eq!(s.events, vec![Event::Quorum(true)]);
        assert_eq!(
            h.poll_timeout(t0),
            Some(at(t0, 600)),
            "hand-over of b first"
        );
        let s = h.step(
            at(t0, 999),
            &decision("a", Some("a"), true),
            &alive,
            lease(999),
            Some("eth0"),
        );
        assert!(!owns(&s));
        let s = h.step(
            at(t0, 1000),
            &decision("a", Some("a"), true),
            &alive,
            lease(1000),
            Some("eth0"),
        );
        assert!(owns(&s));
        assert_eq!(s.valid_until, Some(at(t0, 1080)));
        assert_eq!(
            s.events,
            vec![Event::Announce {
                iface: "eth0".into(),
                ip: ip()
            }]
        );
    }

    #[test]
    fn the_lease_bounds_answers_and_a_lost_lease_withdraws_at_once() {
        let t0 = Instant::now();
        let mut h = Holder::new("a", Timing::default());
        let alive = set(&["a"]);
        h.step(
            t0,
            &decision("a", Some("a"), true),
            &alive,
            QuorumLease::Unbounded,
            Some("eth0"),
        );
        let s = h.step(
            at(t0, 1000),
            &decision("a", Some("a"), true),
            &alive,
            QuorumLease::Unbounded,
            Some("eth0"),
        );
        assert!(owns(&s));
        assert_eq!(s.valid_until, Some(at(t0, 2000)), "capped at max_lease");
        // The election still says "a" (an older view), but the lease is gone: withdraw.
        let s = h.step(
            at(t0, 1020),
            &decision("a", Some("a"), true),
            &alive,
            QuorumLease::Lost,
            Some("eth0"),
        );
        assert!(!owns(&s));
        assert_eq!(s.valid_until, None);
        assert!(s.events.contains(&Event::Quorum(false)));
        // Regaining it means a new hold-down.
        let s = h.step(
            at(t0, 1040),
            &decision("a", Some("a"), true),
            &alive,
            QuorumLease::Unbounded,
            Some("eth0"),
        );
        assert!(!owns(&s));
        let s = h.step(
            at(t0, 2040),
            &decision("a", Some("a"), true),
            &alive,
            QuorumLease::Unbounded,
            Some("eth0"),
        );
        assert!(owns(&s));
    }

    #[test]
    fn no_interface_is_reported_and_named_interfaces_are_used() {
        let t0 = Instant::now();
        let mut h = Holder::new("a", Timing::default());
        let alive = set(&["a"]);
        let mut d = decision("a", Some("a"), true);
        h.step(t0, &d, &alive, QuorumLease::Unbounded, None);
        let s = h.step(at(t0, 1000), &d, &alive, QuorumLease::Unbounded, None);
        assert!(!owns(&s));
        assert!(matches!(s.events[0], Event::NoInterface(_)));
        d.owned.clear();
        d.owned.entry("lan1".into()).or_default().insert(ip());
        let s = h.step(at(t0, 1001), &d, &alive, QuorumLease::Unbounded, None);
        assert_eq!(s.owned.keys().collect::<Vec<_>>(), vec!["lan1"]);
    }

    /// Two holders on one timeline: `a` holds the address; `b` comes back at `back` and wins
    /// it; `a` hears of `b` `delay` later. Returns, per millisecond, who answers.
    fn hand_over_timeline(delay: u64, renew: u64) -> Vec<(u64, bool, bool)> {
        let t0 = Instant::now();
        let timing = Timing::default();
        let mut a = Holder::new("a", timing);
        let mut b = Holder::new("b", timing);
        let both = set(&["a", "b", "c"]);
        let without_b = set(&["a", "c"]);
        let back = 2000u64;
        let mut out = Vec::new();
        let mut a_owns = false;
        let mut b_owns = false;
        for ms in 0..4000u64 {
            let now = at(t0, ms);
            let lease = QuorumLease::Until(at(t0, ms + 80));
            if ms % renew == 0 {
                // a's view: b alive from back + delay.
                let a_sees_b = ms >= back + delay;
                let alive_a = if a_sees_b { &both } else { &without_b };
                let winner = if a_sees_b { "b" } else { "a" };
                a_owns = owns(&a.step(
                    now,
                    &decision("a", Some(winner), true),
                    alive_a,
                    lease,
                    Some("eth0"),
                ));
                if ms >= back {
                    // b is back and sees everyone at once.
                    b_owns = owns(&b.step(
                        now,
                        &decision("b", Some("b"), true),
                        &both,
                        lease,
                        Some("eth0"),
                    ));
                }
            }
            out.push((ms, a_owns, b_owns));
        }
        out
    }

    #[test]
    fn hand_over_never_has_two_answering_and_leaves_a_short_gap() {
        let timeline = hand_over_timeline(50, 20);
        assert!(timeline.iter().all(|(_, a, b)| !(*a && *b)));
        let a_last = timeline
            .iter()
            .filter(|(_, a, _)| *a)
            .map(|x| x.0)
            .max()
            .unwrap();
        let b_first = timeline.iter().find(|(_, _, b)| *b).map(|x| x.0).unwrap();
        // a lets go 600 ms after it saw b (at 2050), b starts at 3000.
        assert!((2640..=2670).contains(&a_last), "{a_last}");
        assert_eq!(b_first, 3000);
    }

    proptest! {
        /// Whatever the delay before the holder hears of the newcomer and the step cadence, as
        /// long as both together stay under the hold-down minus the hand-over (400 ms; gossip
        /// takes tens of ms and the agent steps every 20 ms), the two never answer at once.
        #[test]
        fn hand_over_is_exclusive(delay in 0u64..300, renew in 1u64..40) {
            let timeline = hand_over_timeline(delay, renew);
            prop_assert!(timeline.iter().all(|(_, a, b)| !(*a && *b)));
            // And b answers within the hold-down after its first step (steps are `renew` apart).
            prop_assert!(timeline.iter().any(|(ms, _, b)| *b && *ms <= 3000 + 2 * renew));
        }
    }
}
