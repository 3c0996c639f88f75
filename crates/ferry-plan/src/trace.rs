//! A packet tracer over a planned [`Ruleset`]: which chains a new connection walks through and
//! where it ends up, with the exact probability of each outcome (every `numgen random` match
//! splits the walk in two).
//!
//! It models what the kernel does with ferry's table for the first packet of a connection:
//! the prerouting (or output, for the node's own traffic) hook's chains in priority order, then
//! postrouting with the translated destination.

use std::net::IpAddr;

use ferry_model::Protocol;

use crate::ir::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    /// Sent by the node itself (output hook) rather than arriving (prerouting).
    pub local_origin: bool,
    /// The interface it arrived on, when known (pods' veths, a bridge): what `iifname` matches
    /// see. Unknown (None) matches no name; the node's own packets have none.
    pub iif: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Translated to this endpoint; `masquerade` says whether the source is rewritten.
    Dnat {
        addr: IpAddr,
        port: u16,
        masquerade: bool,
    },
    /// Left alone (not a service address); `masquerade` as above.
    Untouched {
        masquerade: bool,
    },
    Rejected {
        tcp_reset: bool,
    },
    Dropped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub probability: f64,
    pub fate: Fate,
    /// Chains entered, in order.
    pub path: Vec<String>,
    /// Decisions on the way worth telling (client affinity, source ranges), in order.
    pub notes: Vec<String>,
    /// The rules that matched on the way, as `CHAIN: RULE` (nft syntax), in order.
    pub rules: Vec<String>,
}

#[derive(Debug, Clone)]
struct State {
    prob: f64,
    daddr: IpAddr,
    dport: u16,
    mark: u32,
    dnat: bool,
    path: Vec<String>,
    notes: Vec<String>,
    rules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum End {
    /// Fell off the end of the chain, or a non-terminal statement: go on.
    Continue,
    /// `return`, or a `goto`'d chain fell through: this chain is done, its caller goes on.
    Finished,
    Accept,
    Drop,
    Reject {
        tcp_reset: bool,
    },
    Masquerade,
}

struct Tracer<'a> {
    /// Every table, in the order netfilter runs base chains of equal priority (ferry's are
    /// created in this order); `rs` is the one whose chain runs now.
    tables: &'a [Ruleset],
    rs: &'a Ruleset,
    pkt: &'a Packet,
    depth: usize,
    remembered: Option<(IpAddr, u16)>,
}

/// Traces a new connection through `rs`. Outcomes with the same fate are merged; the path is
/// the first one seen for that fate. Probabilities sum to 1. Client affinity maps are taken
/// as empty: the client is new (see [`trace_remembering`]).
pub fn trace(rs: &Ruleset, pkt: &Packet) -> Vec<Outcome> {
    trace_remembering(rs, pkt, None)
}

/// Like [`trace`], for a client that ClientIP affinity remembers on `remembered` (its last
/// endpoint, within the timeout): an affinity map holds it when that endpoint is one the map's
/// chain may choose now (a map belongs to one set of endpoints: see the planner).
pub fn trace_remembering(
    rs: &Ruleset,
    pkt: &Packet,
    remembered: Option<(IpAddr, u16)>,
) -> Vec<Outcome> {
    trace_tables_remembering(std::slice::from_ref(rs), pkt, remembered)
}

/// Traces a new connection through several tables at once (a sharded layout, see
/// `plan::plan_sharded`): every hook runs the base chains of all tables in priority order, and
/// once one NAT chain has translated the destination the later NAT chains of that hook are
/// skipped (netfilter binds a connection's NAT once).
pub fn trace_tables(tables: &[Ruleset], pkt: &Packet) -> Vec<Outcome> {
    trace_tables_remembering(tables, pkt, None)
}

/// [`trace_tables`] for a client remembered on an endpoint (see [`trace_remembering`]).
pub fn trace_tables_remembering(
    tables: &[Ruleset],
    pkt: &Packet,
    remembered: Option<(IpAddr, u16)>,
) -> Vec<Outcome> {
    let Some(rs) = tables.first() else {
        return vec![Outcome {
            probability: 1.0,
            fate: Fate::Untouched { masquerade: false },
            path: vec![],
            notes: vec![],
            rules: vec![],
        }];
    };
    let mut t = Tracer {
        tables,
        rs,
        pkt,
        depth: 0,
        remembered,
    };
    let first = if pkt.local_origin {
        Hook::Output
    } else {
        Hook::Prerouting
    };
    let start = State {
        prob: 1.0,
        daddr: pkt.daddr,
        dport: pkt.dport,
        mark: 0,
        dnat: false,
        path: vec![],
        notes: vec![],
        rules: vec![],
    };
    let mut done: Vec<Outcome> = Vec::new();
    for (st, end) in t.run_hook(first, start) {
        match end {
            End::Drop => push(&mut done, st, Fate::Dropped),
            End::Reject { tcp_reset } => push(&mut done, st, Fate::Rejected { tcp_reset }),
            _ => {
                for (st2, end2) in t.run_hook(Hook::Postrouting, st) {
                    let masquerade = end2 == End::Masquerade;
                    let fate = match end2 {
                        End::Drop => Fate::Dropped,
                        End::Reject { tcp_reset } => Fate::Rejected { tcp_reset },
                        _ if st2.dnat => Fate::Dnat {
                            addr: st2.daddr,
                            port: st2.dport,
                            masquerade,
                        },
                        _ => Fate::Untouched { masquerade },
                    };
                    push(&mut done, st2, fate);
                }
            }
        }
    }
    done
}

fn push(done: &mut Vec<Outcome>, st: State, fate: Fate) {
    if let Some(o) = done.iter_mut().find(|o| o.fate == fate) {
        o.probability += st.prob;
    } else {
        done.push(Outcome {
            probability: st.prob,
            fate,
            path: st.path,
            notes: st.notes,
            rules: st.rules,
        });
    }
}

impl Tracer<'_> {
    /// Runs every base chain of `hook` in priority order. A chain that accepts (or NATs) passes
    /// the packet to the next base chain, as netfilter does.
    fn run_hook(&mut self, hook: Hook, st: State) -> Vec<(State, End)> {
        let tables = self.tables;
        let mut chains: Vec<(&Ruleset, &Chain)> = tables
            .iter()
            .flat_map(|rs| rs.chains.values().map(move |c| (rs, &**c)))
            .filter(|(_, c)| c.base.is_some_and(|b| b.hook == hook))
            .collect();
        // Stable: equal priorities keep the tables' order.
        chains.sort_by_key(|(_, c)| c.base.map(|b| b.priority));
        let mut live = vec![(st, End::Continue)];
        for (rs, c) in chains {
            let nat = c.base.is_some_and(|b| b.type_ == ChainType::Nat);
            let mut next = Vec::new();
            for (st, end) in live {
                match end {
                    End::Drop | End::Reject { .. } => next.push((st, end)),
                    End::Masquerade => next.push((st, End::Masquerade)),
                    // The connection's destination NAT is bound: later NAT chains of the
                    // hook do not see it.
                    _ if nat && st.dnat && hook != Hook::Postrouting => next.push((st, end)),
                    End::Continue | End::Finished | End::Accept => {
                        self.rs = rs;
                        for (st2, e2) in self.run_chain(&c.name, st) {
                            let e2 = if matches!(e2, End::Continue | End::Finished) {
                                End::Accept
                            } else {
                                e2
                            };
                            next.push((st2, e2));
                        }
                    }
                }
            }
            live = next;
        }
        live
    }

    fn run_chain(&mut self, name: &str, mut st: State) -> Vec<(State, End)> {
        let Some(chain) = self.rs.chains.get(name) else {
            // The kernel refuses a ruleset that names a missing chain; report loudly.
            panic!("trace: chain {name} does not exist");
        };
        self.depth += 1;
        assert!(self.depth < 64, "trace: chain loop at {name}");
        // Several tables (a sharded layout) have chains of the same names: "table:chain".
        st.path.push(if self.tables.len() > 1 {
            format!("{}:{name}", self.rs.table_name())
        } else {
            name.to_string()
        });
        let out = self
            .run_rules(name, &chain.rules, st)
            .into_iter()
            .map(|(s, e)| {
                if e == End::Finished {
                    (s, End::Continue)
                } else {
                    (s, e)
                }
            })
            .collect();
        self.depth -= 1;
        out
    }

    fn run_rules(&mut self, chain: &str, rules: &[Rule], st: State) -> Vec<(State, End)> {
        let Some((rule, rest)) = rules.split_first() else {
            return vec![(st, End::Continue)];
        };
        let mut out = Vec::new();
        // Split by the rule's matches: (probability factor, matched?).
        for (factor, matched) in self.matches(&rule.matches, &st) {
            let mut s = st.clone();
            s.prob *= factor;
            if s.prob == 0.0 {
                continue;
            }
            for m in &rule.matches {
                if let Match::SaddrNotInAny(cs) = m {
                    let list = cs.iter().map(|c| c.to_string()).collect::<Vec<_>>();
                    s.notes.push(format!(
                        "source {} is {} the allowed source ranges ({})",
                        self.pkt.saddr,
                        if matched { "outside" } else { "inside" },
                        list.join(", ")
                    ));
                }
            }
            if !matched {
                out.extend(self.run_rules(chain, rest, s));
                continue;
            }
            s.rules.push(format!("{chain}: {}", rule.render()));
            for (s2, end) in self.act(&rule.action, s) {
                match end {
                    // `jump` came back, a map missed, or a non-terminal statement: go on.
                    End::Continue => out.extend(self.run_rules(chain, rest, s2)),
                    e => out.push((s2, e)),
                }
            }
        }
        out
    }

    fn matches(&self, ms: &[Match], st: &State) -> Vec<(f64, bool)> {
        let mut p_all = 1.0;
        for m in ms {
            let p = self.match_prob(m, st);
            p_all *= p;
            if p_all == 0.0 {
                break;
            }
        }
        let mut v = Vec::new();
        if p_all > 0.0 {
            v.push((p_all, true));
        }
        if p_all < 1.0 {
            v.push((1.0 - p_all, false));
        }
        v
    }

    /// Probability that `m` holds (0 or 1 except for random matches).
    fn match_prob(&self, m: &Match, st: &State) -> f64 {
        let p = self.pkt;
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        match m {
            Match::CtStateNew => 1.0,
            Match::CtStatusDnat => b(st.dnat),
            Match::L4Proto(pr) => b(*pr == p.proto),
            Match::SaddrNotIn(c) => b(p.saddr.is_ipv4() == c.is_ipv4() && !c.contains(p.saddr)),
            Match::DaddrInSet(f, s) => {
                b(Family::of(st.daddr) == *f && self.in_set(s, &[Value::Ip(st.daddr)]))
            }
            Match::ServiceTupleNotIn(f, s) => {
                b(Family::of(st.daddr) == *f && !self.in_set(s, &self.tuple(st)))
            }
            Match::AddrPairInSet(f, s) => b(Family::of(st.daddr) == *f
                && self.in_set(s, &[Value::Ip(p.saddr), Value::Ip(st.daddr)])),
            Match::Random { modulus, value } => {
                if *value < *modulus {
                    1.0 / f64::from(*modulus)
                } else {
                    0.0
                }
            }
            Match::MarkHas(m) => b(st.mark & m == *m),
            Match::MarkLacks(m) => b(st.mark & m == 0),
            Match::SaddrNotInAny(cs) => b(!cs.iter().any(|c| c.contains(p.saddr))),
            Match::SaddrIn(c) => b(c.contains(p.saddr)),
            Match::DaddrIn(c) => b(c.contains(st.daddr)),
            Match::IifName {
                name,
                prefix,
                negate,
            } => {
                let iif = if p.local_origin {
                    None
                } else {
                    p.iif.as_deref()
                };
                let hit = iif.is_some_and(|i| {
                    if *prefix {
                        i.starts_with(&**name)
                    } else {
                        i == &**name
                    }
                });
                b(hit != *negate)
            }
            // The node's own addresses are the sources of what it sends itself.
            Match::FibSaddrLocal => b(p.local_origin),
            Match::DaddrNotInSet(f, s) => {
                b(Family::of(st.daddr) == *f && !self.in_set(s, &[Value::Ip(st.daddr)]))
            }
        }
    }

    fn tuple(&self, st: &State) -> Vec<Value> {
        vec![
            Value::Ip(st.daddr),
            Value::Proto(self.pkt.proto),
            Value::Port(st.dport),
        ]
    }

    fn in_set(&self, set: &str, key: &[Value]) -> bool {
        let s = &self.rs.sets[set];
        if s.interval {
            // Interval sets hold single-address keys matched against ranges.
            let [Value::Ip(ip)] = key else {
                return false;
            };
            return s.elements.keys().any(|k| match s.values(k).as_deref() {
                Some([Value::Range(a, b)]) => {
                    a.is_ipv4() == ip.is_ipv4()
                        && ferry_model::cidr::to_u128(*a) <= ferry_model::cidr::to_u128(*ip)
                        && ferry_model::cidr::to_u128(*ip) <= ferry_model::cidr::to_u128(*b)
                }
                Some([Value::Ip(x)]) => x == ip,
                _ => false,
            });
        }
        self.lookup(set, key).is_some()
    }

    fn lookup(&self, set: &str, key: &[Value]) -> Option<&Element> {
        let s = self
            .rs
            .sets
            .get(set)
            .unwrap_or_else(|| panic!("trace: set {set} does not exist"));
        s.elements.get(key_text(key).as_str()).map(|e| &**e)
    }

    fn act(&mut self, a: &Action, mut st: State) -> Vec<(State, End)> {
        match a {
            Action::Verdict(v) => self.verdict(v, st),
            Action::ServiceTupleVmap(f, map) => {
                if Family::of(st.daddr) != *f {
                    return vec![(st, End::Continue)];
                }
                let key = self.tuple(&st);
                match self.lookup(map, &key).and_then(|e| e.verdict().cloned()) {
                    Some(v) => self.verdict(&v, st),
                    None => vec![(st, End::Continue)],
                }
            }
            Action::ProtoPortVmap(map) => {
                let key = [Value::Proto(self.pkt.proto), Value::Port(st.dport)];
                match self.lookup(map, &key).and_then(|e| e.verdict().cloned()) {
                    Some(v) => self.verdict(&v, st),
                    None => vec![(st, End::Continue)],
                }
            }
            Action::SetMark(b) => {
                st.mark |= b;
                vec![(st, End::Continue)]
            }
            Action::ToggleMark(b) => {
                st.mark ^= b;
                vec![(st, End::Continue)]
            }
            Action::Dnat { addr, port } => {
                st.daddr = *addr;
                st.dport = *port;
                st.dnat = true;
                vec![(st, End::Accept)]
            }
            Action::Masquerade { .. } => vec![(st, End::Masquerade)],
            Action::RejectTcpReset => vec![(st, End::Reject { tcp_reset: true })],
            Action::RejectIcmpx => vec![(st, End::Reject { tcp_reset: false })],
            Action::DnatRemembered { family, map, port } => {
                let saddr = self.pkt.saddr;
                let fits = |e: &(IpAddr, u16)| port.is_none_or(|p| p == e.1);
                match self
                    .remembered
                    .filter(|e| fits(e) && self.may_remember(map, *e))
                {
                    Some((addr, port)) if Family::of(saddr) == *family => {
                        st.notes.push(format!(
                            "client affinity: {saddr} is remembered on {}, its endpoint again",
                            std::net::SocketAddr::new(addr, port)
                        ));
                        st.daddr = addr;
                        st.dport = port;
                        st.dnat = true;
                        vec![(st, End::Accept)]
                    }
                    _ => {
                        st.notes.push(format!(
                            "client affinity: nothing remembered for {saddr}: an endpoint at random"
                        ));
                        vec![(st, End::Continue)]
                    }
                }
            }
            Action::DnatDraw {
                family,
                proto,
                map,
                modulus,
                nodeport,
            } => {
                if Family::of(st.daddr) != *family || *modulus == 0 || *proto != self.pkt.proto {
                    return vec![(st, End::Continue)];
                }
                // Each draw with probability 1/N; a draw the map has no element for makes the
                // rule not match (the kernel's lookup breaks), and the chain goes on.
                let drawn = self.drawn(map, *nodeport, *modulus, st.daddr, st.dport);
                let mut out = Vec::new();
                let n = f64::from(*modulus);
                let mut misses = 0u32;
                for (k, to) in drawn.into_iter().enumerate() {
                    match to {
                        Some((addr, port)) => {
                            let mut s = st.clone();
                            s.prob /= n;
                            // Which element the draw found, on the rule that drew it.
                            if let Some(rule) = s.rules.last_mut() {
                                rule.push_str(&format!(" (draw {k}: {addr} . {port})"));
                            }
                            s.daddr = addr;
                            s.dport = port;
                            s.dnat = true;
                            out.push((s, End::Accept));
                        }
                        None => misses += 1,
                    }
                }
                if misses > 0 {
                    let mut s = st;
                    s.prob *= f64::from(misses) / n;
                    out.push((s, End::Continue));
                }
                out
            }
            Action::OriginalTupleVmap(f, map) => {
                if Family::of(self.pkt.daddr) != *f
                    || !matches!(
                        self.pkt.proto,
                        Protocol::Tcp | Protocol::Udp | Protocol::Sctp
                    )
                {
                    return vec![(st, End::Continue)];
                }
                let key = [
                    Value::Ip(self.pkt.daddr),
                    Value::Proto(self.pkt.proto),
                    Value::Port(self.pkt.dport),
                ];
                match self.lookup(map, &key).and_then(|e| e.verdict().cloned()) {
                    Some(v) => self.verdict(&v, st),
                    None => vec![(st, End::Continue)],
                }
            }
            Action::Remember { timeout, .. } => {
                st.notes.push(format!(
                    "client affinity: {} remembered on {} for {timeout} s after its last connection",
                    self.pkt.saddr,
                    std::net::SocketAddr::new(st.daddr, st.dport)
                ));
                vec![(st, End::Continue)]
            }
        }
    }

    /// The endpoint each draw 0..modulus of a [`Action::DnatDraw`] on `map` gives a packet to
    /// `daddr`:`dport` (None where the map has no element).
    fn drawn(
        &self,
        map: &str,
        nodeport: bool,
        modulus: u32,
        daddr: IpAddr,
        dport: u16,
    ) -> Vec<Option<(IpAddr, u16)>> {
        (0..modulus)
            .map(|k| {
                let key = if nodeport {
                    vec![Value::Port(dport), Value::Draw(k)]
                } else {
                    vec![Value::Ip(daddr), Value::Port(dport), Value::Draw(k)]
                };
                self.lookup(map, &key).and_then(|e| e.to())
            })
            .collect()
    }

    /// Whether the affinity map `map` can hold `ep`: the chain that reads the map may choose
    /// that endpoint for this packet (each map belongs to one list of endpoints).
    fn may_remember(&self, map: &str, ep: (IpAddr, u16)) -> bool {
        self.rs.chains.values().any(|c| {
            let reads = c
                .rules
                .iter()
                .any(|r| matches!(&r.action, Action::DnatRemembered { map: m, .. } if **m == *map));
            reads && self.may_choose(&c.rules, ep, true)
        })
    }

    /// Whether `rules` may DNAT this packet to `ep` themselves or through the draw chain they
    /// go to (`draws`; not through another service chain: a Local chain's short-circuit).
    fn may_choose(&self, rules: &[Rule], ep: (IpAddr, u16), draws: bool) -> bool {
        rules.iter().any(|r| match &r.action {
            Action::Dnat { addr, port } => (*addr, *port) == ep,
            Action::DnatDraw {
                map,
                modulus,
                nodeport,
                ..
            } => self
                .drawn(map, *nodeport, *modulus, self.pkt.daddr, self.pkt.dport)
                .contains(&Some(ep)),
            Action::Verdict(Verdict::Goto(c)) if draws => self.rs.chains.get(c).is_some_and(|c| {
                c.rules
                    .iter()
                    .all(|r| matches!(r.action, Action::DnatDraw { .. }))
                    && self.may_choose(&c.rules, ep, false)
            }),
            _ => false,
        })
    }

    fn verdict(&mut self, v: &Verdict, st: State) -> Vec<(State, End)> {
        match v {
            Verdict::Accept => vec![(st, End::Accept)],
            Verdict::Drop => vec![(st, End::Drop)],
            // Return ends this chain: the caller's rules go on.
            Verdict::Return => vec![(st, End::Finished)],
            // Jump: the callee's fall-through resumes here.
            Verdict::Jump(c) => self.run_chain(c, st),
            // Goto: the callee's fall-through ends this chain too.
            Verdict::Goto(c) => self
                .run_chain(c, st)
                .into_iter()
                .map(|(s, e)| {
                    if e == End::Continue {
                        (s, End::Finished)
                    } else {
                        (s, e)
                    }
                })
                .collect(),
        }
    }
}
