//! A typed model of the one nftables table ferry owns, and its rendering to `nft` syntax.
//!
//! The planner builds a [`Ruleset`]; the tracer walks it; the differ compares it with what the
//! kernel has; the dataplane sends the rendered commands. Only the constructs ferry uses exist
//! here, so every one of them can be rendered, traced and diffed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ferry_model::cidr::Cidr;
use ferry_model::Protocol;

pub const TABLE: &str = "ferry";
pub const FAMILY: &str = "inet";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    /// `ip` or `ip6`: the payload protocol in nft syntax.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    pub fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
    pub fn addr_type(self) -> KeyType {
        match self {
            Family::V4 => KeyType::Ipv4Addr,
            Family::V6 => KeyType::Ipv6Addr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
}

impl KeyType {
    pub fn nft(self) -> &'static str {
        match self {
            KeyType::Ipv4Addr => "ipv4_addr",
            KeyType::Ipv6Addr => "ipv6_addr",
            KeyType::InetProto => "inet_proto",
            KeyType::InetService => "inet_service",
        }
    }
}

/// One component of an element key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Ip(IpAddr),
    /// An inclusive address range (interval sets only).
    Range(IpAddr, IpAddr),
    Proto(Protocol),
    Port(u16),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Ip(ip) => write!(f, "{ip}"),
            Value::Range(a, b) if a == b => write!(f, "{a}"),
            Value::Range(a, b) => write!(f, "{a}-{b}"),
            Value::Proto(p) => f.write_str(p.as_nft()),
            Value::Port(p) => write!(f, "{p}"),
        }
    }
}

/// Renders a key the way `nft -j` reports it joined with " . ", so keys read back from the
/// kernel compare equal to planned ones.
pub fn key_text(key: &[Value]) -> String {
    key.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(" . ")
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl Verdict {
    pub fn render(&self) -> String {
        match self {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Return => "return".into(),
            Verdict::Jump(c) => format!("jump {c}"),
            Verdict::Goto(c) => format!("goto {c}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<Value>,
    /// Some for verdict maps.
    pub verdict: Option<Verdict>,
    /// Shown in `nft list` to say what the element is for.
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key: Vec<KeyType>,
    /// A verdict map when true, a plain set otherwise.
    pub is_vmap: bool,
    /// An interval set (elements are address ranges): `flags interval`.
    pub interval: bool,
    pub comment: String,
    /// By key text.
    pub elements: BTreeMap<String, Element>,
}

impl Set {
    pub fn new(name: &str, key: &[KeyType], is_vmap: bool, comment: &str) -> Set {
        Set {
            name: name.into(),
            key: key.to_vec(),
            is_vmap,
            interval: false,
            comment: comment.into(),
            elements: BTreeMap::new(),
        }
    }
    /// A set of address ranges.
    pub fn ranges(name: &str, key: KeyType, comment: &str) -> Set {
        Set {
            interval: true,
            ..Set::new(name, &[key], false, comment)
        }
    }
    pub fn insert(&mut self, key: Vec<Value>, verdict: Option<Verdict>, comment: String) {
        self.elements.insert(
            key_text(&key),
            Element {
                key,
                verdict,
                comment,
            },
        );
    }
    /// "ipv4_addr . inet_proto . inet_service : verdict": compared with what the kernel has.
    pub fn signature(&self) -> String {
        let key = self
            .key
            .iter()
            .map(|k| k.nft())
            .collect::<Vec<_>>()
            .join(" . ");
        if self.is_vmap {
            format!("{key} : verdict")
        } else {
            key
        }
    }

    /// The definition, without elements (what `add set`/`add map` takes).
    pub fn render_def(&self) -> String {
        let kind = if self.is_vmap { "map" } else { "set" };
        let ty = self.signature();
        let flags = if self.interval {
            " flags interval;"
        } else {
            ""
        };
        format!(
            "add {kind} {FAMILY} {TABLE} {} {{ type {ty};{flags} comment {}; }}",
            self.name,
            quote(&self.comment)
        )
    }
}

impl Element {
    /// `KEY comment "..." : VERDICT` as it goes inside `{ }` of add/delete element.
    pub fn render(&self) -> String {
        let mut s = key_text(&self.key);
        if !self.comment.is_empty() {
            let _ = write!(s, " comment {}", quote(&self.comment));
        }
        if let Some(v) = &self.verdict {
            let _ = write!(s, " : {}", v.render());
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Prerouting,
    Output,
    Postrouting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub type_: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// A condition of a rule. All of a rule's matches must hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `ct state new`
    CtStateNew,
    /// `ct status dnat`
    CtStatusDnat,
    /// `meta l4proto tcp`
    L4Proto(Protocol),
    /// `ip saddr != 10.42.0.0/16`
    SaddrNotIn(Cidr),
    /// `ip daddr @set`
    DaddrInSet(Family, String),
    /// `ip daddr . meta l4proto . th dport != @set`
    ServiceTupleNotIn(Family, String),
    /// `ip saddr . ip daddr @set`
    AddrPairInSet(Family, String),
    /// `numgen random mod M == V`: true with probability 1/M.
    Random { modulus: u32, value: u32 },
    /// `meta mark & M == M`
    MarkHas(u32),
    /// `meta mark & M == 0`
    MarkLacks(u32),
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Verdict(Verdict),
    /// `ip daddr . meta l4proto . th dport vmap @map`
    ServiceTupleVmap(Family, String),
    /// `meta l4proto . th dport vmap @map`
    ProtoPortVmap(String),
    /// `meta mark set meta mark | BITS`
    SetMark(u32),
    /// `meta mark set meta mark ^ BITS` (clears bits known to be set)
    ToggleMark(u32),
    /// `dnat ip to ADDR:PORT`
    Dnat {
        addr: IpAddr,
        port: u16,
    },
    /// `masquerade [fully-random]`
    Masquerade {
        fully_random: bool,
    },
    /// `reject with tcp reset` (needs a tcp match)
    RejectTcpReset,
    /// `reject with icmpx port-unreachable`
    RejectIcmpx,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            matches,
            action,
            comment: None,
        }
    }
    pub fn with_comment(mut self, c: impl Into<String>) -> Rule {
        self.comment = Some(c.into());
        self
    }

    pub fn render(&self) -> String {
        let mut parts: Vec<String> = self.matches.iter().map(render_match).collect();
        parts.push(render_action(&self.action));
        if let Some(c) = &self.comment {
            parts.push(format!("comment {}", quote(c)));
        }
        parts.join(" ")
    }
}

fn render_match(m: &Match) -> String {
    match m {
        Match::CtStateNew => "ct state new".into(),
        Match::CtStatusDnat => "ct status dnat".into(),
        Match::L4Proto(p) => format!("meta l4proto {}", p.as_nft()),
        Match::SaddrNotIn(c) => format!("{} saddr != {c}", Family::of(c.network()).nft()),
        Match::DaddrInSet(f, s) => format!("{} daddr @{s}", f.nft()),
        Match::ServiceTupleNotIn(f, s) => {
            format!("{} daddr . meta l4proto . th dport != @{s}", f.nft())
        }
        Match::AddrPairInSet(f, s) => format!("{0} saddr . {0} daddr @{s}", f.nft()),
        Match::Random { modulus, value } => format!("numgen random mod {modulus} == {value}"),
        Match::MarkHas(m) => format!("meta mark & {m:#x} == {m:#x}"),
        Match::MarkLacks(m) => format!("meta mark & {m:#x} == 0"),
    }
}

fn render_action(a: &Action) -> String {
    match a {
        Action::Verdict(v) => v.render(),
        Action::ServiceTupleVmap(f, m) => {
            format!("{} daddr . meta l4proto . th dport vmap @{m}", f.nft())
        }
        Action::ProtoPortVmap(m) => format!("meta l4proto . th dport vmap @{m}"),
        Action::SetMark(b) => format!("meta mark set meta mark | {b:#x}"),
        Action::ToggleMark(b) => format!("meta mark set meta mark ^ {b:#x}"),
        Action::Dnat { addr, port } => match addr {
            IpAddr::V4(a) => format!("dnat ip to {a}:{port}"),
            IpAddr::V6(a) => format!("dnat ip6 to [{a}]:{port}"),
        },
        Action::Masquerade { fully_random } => {
            if *fully_random {
                "masquerade fully-random".into()
            } else {
                "masquerade".into()
            }
        }
        Action::RejectTcpReset => "reject with tcp reset".into(),
        Action::RejectIcmpx => "reject with icmpx port-unreachable".into(),
    }
}

#[derive(Debug, Clone)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    /// What the chain is for, shown in `nft list`.
    pub comment: String,
    pub rules: Vec<Rule>,
    /// The fingerprint, computed once (change rules only through [`Chain::push`]).
    fp: std::sync::OnceLock<String>,
}

impl PartialEq for Chain {
    fn eq(&self, o: &Chain) -> bool {
        self.name == o.name
            && self.base == o.base
            && self.comment == o.comment
            && self.rules == o.rules
    }
}

impl Eq for Chain {}

impl Chain {
    pub fn new(name: impl Into<String>, comment: impl Into<String>) -> Chain {
        Chain {
            name: name.into(),
            base: None,
            comment: comment.into(),
            rules: Vec::new(),
            fp: std::sync::OnceLock::new(),
        }
    }
    pub fn base(name: &str, type_: ChainType, hook: Hook, priority: i32, comment: &str) -> Chain {
        Chain {
            base: Some(BaseChain {
                type_,
                hook,
                priority,
            }),
            ..Chain::new(name, comment)
        }
    }
    pub fn push(&mut self, r: Rule) {
        self.fp.take();
        self.rules.push(r);
    }

    /// A fingerprint of the definition and rules. It is kept in the comment of the chain's
    /// first rule (a chain's own comment cannot be changed in place), so an agent that restarts
    /// can tell which chains are already as planned.
    pub fn fingerprint(&self) -> String {
        self.fp.get_or_init(|| self.compute_fingerprint()).clone()
    }

    fn compute_fingerprint(&self) -> String {
        use std::hash::{Hash, Hasher};
        // Hashing the typed rules (not their rendering) keeps this cheap at 100,000 rules.
        let mut h = Fnv::new();
        self.base.hash(&mut h);
        self.comment.hash(&mut h);
        self.rules.hash(&mut h);
        format!("{:016x}", h.finish())
    }

    fn render_spec(&self) -> String {
        let mut inner = String::new();
        if let Some(b) = &self.base {
            let t = match b.type_ {
                ChainType::Filter => "filter",
                ChainType::Nat => "nat",
            };
            let h = match b.hook {
                Hook::Prerouting => "prerouting",
                Hook::Output => "output",
                Hook::Postrouting => "postrouting",
            };
            let _ = write!(
                inner,
                "type {t} hook {h} priority {}; policy accept; ",
                b.priority
            );
        }
        let _ = write!(inner, "comment {};", quote(&self.comment));
        inner
    }

    /// `add chain inet ferry NAME { ... }` with the fingerprinted comment.
    pub fn render_add(&self) -> String {
        format!(
            "add chain {FAMILY} {TABLE} {} {{ {} }}",
            self.name,
            self.render_spec()
        )
    }

    /// `add rule` for each rule; the first carries the fingerprint as "[fp]" in its comment.
    pub fn render_rules(&self, out: &mut String) {
        let fp = self.fingerprint();
        for (i, r) in self.rules.iter().enumerate() {
            let line = if i == 0 {
                let mut r = r.clone();
                r.comment = Some(match &r.comment {
                    Some(c) => format!("{} [{fp}]", c.chars().take(100).collect::<String>()),
                    None => format!("[{fp}]"),
                });
                r.render()
            } else {
                r.render()
            };
            let _ = writeln!(out, "add rule {FAMILY} {TABLE} {} {line}", self.name);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub sets: BTreeMap<String, Set>,
    /// Shared, so that an incremental plan reuses unchanged chains without copying them.
    pub chains: BTreeMap<String, std::sync::Arc<Chain>>,
}

impl Ruleset {
    pub fn add_set(&mut self, s: Set) {
        self.sets.insert(s.name.clone(), s);
    }
    pub fn add_chain(&mut self, c: Chain) {
        self.chains.insert(c.name.clone(), std::sync::Arc::new(c));
    }
    pub fn set_mut(&mut self, name: &str) -> &mut Set {
        self.sets
            .get_mut(name)
            .unwrap_or_else(|| panic!("planner bug: no set {name}"))
    }

    /// The whole table as one `nft -f` script (for a cold start or for reading).
    pub fn render_full(&self) -> String {
        let mut out = format!("add table {FAMILY} {TABLE} {{ comment \"managed by ferry\"; }}\n");
        for s in self.sets.values() {
            out.push_str(&s.render_def());
            out.push('\n');
        }
        for c in self.chains.values() {
            out.push_str(&c.render_add());
            out.push('\n');
        }
        for c in self.chains.values() {
            c.render_rules(&mut out);
        }
        for s in self.sets.values() {
            render_elements(&mut out, "add", &s.name, s.elements.values());
        }
        out
    }
}

/// `add element inet ferry SET { e1, e2, ... }` in batches.
pub fn render_elements<'a>(
    out: &mut String,
    verb: &str,
    set: &str,
    elements: impl Iterator<Item = &'a Element>,
) {
    let mut batch: Vec<String> = Vec::new();
    let flush = |out: &mut String, batch: &mut Vec<String>| {
        if !batch.is_empty() {
            let _ = writeln!(
                out,
                "{verb} element {FAMILY} {TABLE} {set} {{ {} }}",
                batch.join(", ")
            );
            batch.clear();
        }
    };
    for e in elements {
        // Deleting takes the key alone.
        batch.push(if verb == "delete" {
            key_text(&e.key)
        } else {
            e.render()
        });
        if batch.len() >= 1000 {
            flush(out, &mut batch);
        }
    }
    flush(out, &mut batch);
}

/// FNV-1a as a [`std::hash::Hasher`]: stable for a given build, unlike std's seeded hasher.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

/// An nft double-quoted string (comments): quotes and backslashes are dropped, length capped.
pub fn quote(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .take(127)
        .collect();
    format!("\"{clean}\"")
}
