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
/// The modulus in an endpoint map's `typeof` (see [`Set::typeof_text`]): a description of the
/// draw's type only, whatever the rules draw with.
pub const TYPEOF_DRAWS: u32 = 65536;

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
    /// A draw of `numgen random mod N` (a 32-bit integer): which of a service's N endpoints.
    Draw,
}

impl KeyType {
    pub fn nft(self) -> &'static str {
        match self {
            KeyType::Ipv4Addr => "ipv4_addr",
            KeyType::Ipv6Addr => "ipv6_addr",
            KeyType::InetProto => "inet_proto",
            KeyType::InetService => "inet_service",
            KeyType::Draw => "integer",
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
    /// The value of a `numgen random mod N` draw.
    Draw(u32),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Ip(ip) => write!(f, "{ip}"),
            Value::Range(a, b) if a == b => write!(f, "{a}"),
            Value::Range(a, b) => write!(f, "{a}-{b}"),
            Value::Proto(p) => f.write_str(p.as_nft()),
            Value::Port(p) => write!(f, "{p}"),
            Value::Draw(d) => write!(f, "{d}"),
        }
    }
}

/// Renders a key the way `nft -j` reports it joined with " . ", so keys read back from the
/// kernel compare equal to planned ones.
pub fn key_text(key: &[Value]) -> String {
    let mut out = String::with_capacity(8 + 12 * key.len());
    for (i, v) in key.iter().enumerate() {
        if i > 0 {
            out.push_str(" . ");
        }
        let _ = write!(out, "{v}");
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(Key),
    Goto(Key),
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

/// What a set element holds besides its key. The key is kept once, as the text that indexes
/// [`Set::elements`] (what the kernel's listing shows); [`Set::values`] gives it typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// What a map's element maps its key to; None for a set's member.
    pub data: Option<ElementData>,
    /// Shown in `nft list` to say what the element is for (no spare capacity).
    pub comment: Box<str>,
}

/// What a map's element holds: one of the two in 24 bytes (100,000 endpoint elements at
/// 10,000 services).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElementData {
    /// Of a verdict map.
    Verdict(Verdict),
    /// Of an endpoint map: the address and port a draw DNATs to.
    To(IpAddr, u16),
}

impl Element {
    /// An element with neither verdict nor comment (a plain set's member), shared: a set of
    /// 100,000 such members costs its keys and nothing more.
    pub fn bare() -> std::sync::Arc<Element> {
        static BARE: std::sync::OnceLock<std::sync::Arc<Element>> = std::sync::OnceLock::new();
        BARE.get_or_init(|| {
            std::sync::Arc::new(Element {
                data: None,
                comment: Box::default(),
            })
        })
        .clone()
    }

    /// The shared bare element when there is nothing to hold, else a new one.
    pub fn shared(verdict: Option<Verdict>, comment: String) -> std::sync::Arc<Element> {
        if verdict.is_none() && comment.is_empty() {
            Element::bare()
        } else {
            std::sync::Arc::new(Element {
                data: verdict.map(ElementData::Verdict),
                comment: comment.into_boxed_str(),
            })
        }
    }

    /// An element of an endpoint map (see [`Set::endpoints`]): the endpoint a draw DNATs to.
    pub fn endpoint(addr: IpAddr, port: u16) -> std::sync::Arc<Element> {
        std::sync::Arc::new(Element {
            data: Some(ElementData::To(addr, port)),
            comment: Box::default(),
        })
    }

    /// Whether the kernel would hold the same for both: verdict and data (comments are not
    /// read back).
    pub fn same_value(&self, o: &Element) -> bool {
        self.data == o.data
    }

    /// The verdict of a verdict map's element.
    pub fn verdict(&self) -> Option<&Verdict> {
        match &self.data {
            Some(ElementData::Verdict(v)) => Some(v),
            _ => None,
        }
    }

    /// The endpoint of an endpoint map's element.
    pub fn to(&self) -> Option<(IpAddr, u16)> {
        match self.data {
            Some(ElementData::To(a, p)) => Some((a, p)),
            _ => None,
        }
    }
}

/// An element's key text (see [`key_text`]), shared.
pub type Key = std::sync::Arc<str>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key: Vec<KeyType>,
    /// A verdict map when true, a plain set otherwise.
    pub is_vmap: bool,
    /// An interval set (elements are address ranges): `flags interval`.
    pub interval: bool,
    /// A map to typed data rather than verdicts (`type KEY : DATA`); empty for sets and
    /// verdict maps.
    pub data: Vec<KeyType>,
    /// Written by packets (`flags dynamic,timeout`, elements added by `update` statements with
    /// their own timeout): ferry never plans, adds or deletes its elements, and the differ
    /// leaves whatever the kernel holds in it alone.
    pub dynamic: bool,
    /// The transport protocol whose port the key holds (an endpoint map, see
    /// [`Set::endpoints`]): its `typeof` says `tcp dport`, not `th dport`.
    pub proto: Option<Protocol>,
    pub comment: String,
    /// By key text; keys and elements are shared with the planner's per-service fragments and
    /// with the dataplane's view of the kernel (each is kept once, however many hold it).
    pub elements: BTreeMap<Key, std::sync::Arc<Element>>,
}

impl Set {
    pub fn new(name: &str, key: &[KeyType], is_vmap: bool, comment: &str) -> Set {
        Set {
            name: name.into(),
            key: key.to_vec(),
            is_vmap,
            interval: false,
            data: Vec::new(),
            dynamic: false,
            proto: None,
            comment: comment.into(),
            elements: BTreeMap::new(),
        }
    }
    /// A map from `key` to `data` whose elements packets write (see [`Set::dynamic`]).
    pub fn dynamic_map(name: &str, key: &[KeyType], data: &[KeyType], comment: &str) -> Set {
        Set {
            data: data.to_vec(),
            dynamic: true,
            ..Set::new(name, key, false, comment)
        }
    }
    /// A map from a service's frontend and a draw to one of its endpoints (`address . port`):
    /// what `Action::DnatDraw` looks up, one per transport protocol. Keyed `daddr . dport .
    /// draw` (cluster, external and load-balancer addresses), or `dport . draw` with
    /// `nodeport`. One map per protocol, its port typed as that protocol's (`tcp dport`):
    /// with `meta l4proto . th dport` in its `typeof`, nft 1.0.6 can no longer add a rule
    /// using the map once it exists ("conflicting protocols specified: tcp vs. th").
    pub fn endpoints(
        name: &str,
        family: Family,
        proto: Protocol,
        nodeport: bool,
        comment: &str,
    ) -> Set {
        let a = family.addr_type();
        let (s, d) = (KeyType::InetService, KeyType::Draw);
        let key: &[KeyType] = if nodeport { &[s, d] } else { &[a, s, d] };
        Set {
            data: vec![a, s],
            proto: Some(proto),
            ..Set::new(name, key, false, comment)
        }
    }
    /// Whether it is a map (to verdicts or data) rather than a set.
    pub fn is_map(&self) -> bool {
        self.is_vmap || !self.data.is_empty()
    }
    /// A set of address ranges.
    pub fn ranges(name: &str, key: KeyType, comment: &str) -> Set {
        Set {
            interval: true,
            ..Set::new(name, &[key], false, comment)
        }
    }
    pub fn insert(&mut self, key: Vec<Value>, verdict: Option<Verdict>, comment: String) {
        self.elements
            .insert(key_text(&key).into(), Element::shared(verdict, comment));
    }

    /// An element's key, typed: the key text (as [`key_text`] writes it and the kernel's
    /// listing shows it) read by the set's key types. None when it does not fit them.
    pub fn values(&self, key: &str) -> Option<Vec<Value>> {
        let parts: Vec<&str> = key.split(" . ").collect();
        if parts.len() != self.key.len() {
            return None;
        }
        self.key
            .iter()
            .zip(parts)
            .map(|(t, p)| match t {
                KeyType::Ipv4Addr | KeyType::Ipv6Addr => {
                    let ip = |s: &str| {
                        s.parse::<IpAddr>()
                            .ok()
                            .filter(|ip| ip.is_ipv4() == (*t == KeyType::Ipv4Addr))
                    };
                    match p.split_once('-') {
                        Some((a, b)) if self.interval => Some(Value::Range(ip(a)?, ip(b)?)),
                        Some(_) => None,
                        None => ip(p).map(Value::Ip),
                    }
                }
                KeyType::InetProto => [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                    .into_iter()
                    .find(|x| x.as_nft() == p)
                    .map(Value::Proto),
                KeyType::InetService => p.parse().ok().map(Value::Port),
                KeyType::Draw => p.parse().ok().map(Value::Draw),
            })
            .collect()
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
        } else if !self.data.is_empty() {
            let data = self
                .data
                .iter()
                .map(|k| k.nft())
                .collect::<Vec<_>>()
                .join(" . ");
            format!("{key} : {data}")
        } else {
            key
        }
    }

    /// The key and data as `typeof` expressions, for sets whose key has a type nft cannot
    /// name by itself (a draw is a bare integer): `ip daddr . meta l4proto . th dport .
    /// numgen random mod 65536 : ip daddr . th dport`. The modulus is only a type's
    /// description (the rules draw with their own); None for other sets.
    pub fn typeof_text(&self) -> Option<String> {
        if !self.key.contains(&KeyType::Draw) {
            return None;
        }
        let proto = self.proto?.as_nft();
        let family = |t: KeyType| {
            if t == KeyType::Ipv6Addr {
                "ip6"
            } else {
                "ip"
            }
        };
        let expr = |t: &KeyType| match t {
            KeyType::Ipv4Addr | KeyType::Ipv6Addr => format!("{} daddr", family(*t)),
            KeyType::InetProto => "meta l4proto".to_string(),
            KeyType::InetService => format!("{proto} dport"),
            KeyType::Draw => format!("numgen random mod {TYPEOF_DRAWS}"),
        };
        let join = |ts: &[KeyType]| ts.iter().map(expr).collect::<Vec<_>>().join(" . ");
        Some(format!("{} : {}", join(&self.key), join(&self.data)))
    }

    /// The definition, without elements (what `add set`/`add map` takes).
    pub fn render_def(&self) -> String {
        let kind = if self.is_map() { "map" } else { "set" };
        let ty = match self.typeof_text() {
            Some(t) => format!("typeof {t}"),
            None => format!("type {}", self.signature()),
        };
        let flags = if self.interval {
            " flags interval;"
        } else if self.dynamic {
            " flags dynamic,timeout;"
        } else {
            ""
        };
        format!(
            "add {kind} {FAMILY} {TABLE} {} {{ {ty};{flags} comment {}; }}",
            self.name,
            quote(&self.comment)
        )
    }
}

impl Element {
    /// `KEY comment "..." : VERDICT` as it goes inside `{ }` of add/delete element.
    pub fn render(&self, key: &str) -> String {
        let mut s = key.to_string();
        if !self.comment.is_empty() {
            let _ = write!(s, " comment {}", quote(&self.comment));
        }
        match &self.data {
            Some(ElementData::Verdict(v)) => {
                let _ = write!(s, " : {}", v.render());
            }
            Some(ElementData::To(addr, port)) => {
                let _ = write!(s, " : {addr} . {port}");
            }
            None => {}
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
    DaddrInSet(Family, Key),
    /// `ip daddr . meta l4proto . th dport != @set`
    ServiceTupleNotIn(Family, Key),
    /// `ip saddr . ip daddr @set`
    AddrPairInSet(Family, Key),
    /// `numgen random mod M == V`: true with probability 1/M.
    Random { modulus: u32, value: u32 },
    /// `meta mark & M == M`
    MarkHas(u32),
    /// `meta mark & M == 0`
    MarkLacks(u32),
    /// `ip saddr != { 10.0.0.0/8, 192.168.2.200/32 }`: the source is in none of these
    /// prefixes (all of one family, at least one).
    SaddrNotInAny(Box<[Cidr]>),
    /// `ip saddr 10.42.0.0/16`
    SaddrIn(Cidr),
    /// `ip daddr 10.43.0.0/16`
    DaddrIn(Cidr),
    /// `iifname "cni0"` (`iifname "veth*"` with `prefix`; `!=` with `negate`): the interface
    /// the packet arrived on.
    IifName {
        name: Key,
        prefix: bool,
        negate: bool,
    },
    /// `fib saddr type local`: the source is one of this host's own addresses.
    FibSaddrLocal,
    /// `ip daddr != @set`
    DaddrNotInSet(Family, Key),
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Verdict(Verdict),
    /// `ip daddr . meta l4proto . th dport vmap @map`
    ServiceTupleVmap(Family, Key),
    /// `meta l4proto . th dport vmap @map`
    ProtoPortVmap(Key),
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
    /// `dnat ip to ip saddr map @map` (the map holds address . port), or `dnat ip to ip saddr
    /// map @map : PORT` (it holds addresses, all endpoints listen on PORT): to the endpoint the
    /// dynamic map remembers for this client; when it remembers none, the rule does not match.
    DnatRemembered {
        family: Family,
        map: Key,
        port: Option<u16>,
    },
    /// `meta l4proto { tcp, udp, sctp } ct original ip daddr . meta l4proto . ct original
    /// proto-dst vmap @map`: dispatch on the address, protocol and port the connection was
    /// first sent to (before DNAT).
    OriginalTupleVmap(Family, Key),
    /// `dnat ip to ip daddr . tcp dport . numgen random mod N map @map` (with `nodeport`,
    /// `tcp dport . numgen random mod N`): one of N endpoints at random, each with
    /// probability 1/N, from a map of [`Set::endpoints`] (of `proto`); when the map has no
    /// element for the key (another frontend's chain), the rule does not match. Planned
    /// after a `meta l4proto` match of `proto`.
    DnatDraw {
        family: Family,
        proto: Protocol,
        map: Key,
        modulus: u32,
        nodeport: bool,
    },
    /// `update @map { ip saddr timeout Ns : ip daddr . th dport }` (or `: ip daddr` when
    /// `with_port` is false): remember (or refresh) this client's endpoint, the DNATed
    /// destination, for `timeout` seconds.
    Remember {
        family: Family,
        map: Key,
        timeout: u32,
        with_port: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Inline up to two (a masquerade check's, a draw's protocol): ~20,000 service chain
    /// rules at 10,000 services then cost no allocation of their own.
    pub matches: smallvec::SmallVec<[Match; 2]>,
    pub action: Action,
    /// Boxed (no spare capacity): 8 bytes less on each rule.
    pub comment: Option<Box<str>>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            // Collected, not adopted: a Vec grown by push keeps spare room on the heap.
            matches: matches.into_iter().collect(),
            action,
            comment: None,
        }
    }
    pub fn with_comment(mut self, c: impl Into<String>) -> Rule {
        self.comment = Some(c.into().into_boxed_str());
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
        Match::SaddrIn(c) => format!("{} saddr {c}", Family::of(c.network()).nft()),
        Match::DaddrIn(c) => format!("{} daddr {c}", Family::of(c.network()).nft()),
        Match::IifName {
            name,
            prefix,
            negate,
        } => format!(
            "iifname {}\"{name}{}\"",
            if *negate { "!= " } else { "" },
            if *prefix { "*" } else { "" }
        ),
        Match::FibSaddrLocal => "fib saddr type local".into(),
        Match::DaddrNotInSet(f, s) => format!("{} daddr != @{s}", f.nft()),
        Match::SaddrNotInAny(cs) => {
            let fam = cs
                .first()
                .map(|c| Family::of(c.network()))
                .unwrap_or(Family::V4);
            match &cs[..] {
                [one] => format!("{} saddr != {one}", fam.nft()),
                _ => format!(
                    "{} saddr != {{ {} }}",
                    fam.nft(),
                    cs.iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
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
        Action::DnatRemembered { family, map, port } => match port {
            None => format!("dnat {0} to {0} saddr map @{map}", family.nft()),
            Some(p) => format!("dnat {0} to {0} saddr map @{map} : {p}", family.nft()),
        },
        Action::DnatDraw {
            family,
            proto,
            map,
            modulus,
            nodeport,
        } => format!(
            "dnat {0} to {1}{2} dport . numgen random mod {modulus} map @{map}",
            family.nft(),
            if *nodeport {
                String::new()
            } else {
                format!("{} daddr . ", family.nft())
            },
            proto.as_nft()
        ),
        Action::OriginalTupleVmap(f, m) => format!(
            "meta l4proto {{ tcp, udp, sctp }} ct original {} daddr . meta l4proto . ct original proto-dst vmap @{m}",
            f.nft()
        ),
        Action::Remember {
            family,
            map,
            timeout,
            with_port,
        } => format!(
            "update @{map} {{ {0} saddr timeout {timeout}s : {0} daddr{1} }}",
            family.nft(),
            if *with_port { " . th dport" } else { "" }
        ),
    }
}

#[derive(Debug, Clone)]
pub struct Chain {
    /// Shared with the planned table's key and the view of the kernel (one copy per chain).
    pub name: Key,
    pub base: Option<BaseChain>,
    /// What the chain is for, shown in `nft list`.
    pub comment: String,
    pub rules: Vec<Rule>,
    /// The fingerprint, computed once (change rules only through [`Chain::push`]).
    fp: std::sync::OnceLock<Fingerprint>,
}

/// A chain's fingerprint (see [`Chain::fingerprint`]): 64 bits, written as 16 hex digits in
/// the comment of the chain's first rule. Kept as a number (8 bytes, not a 40-byte string) in
/// the plan and in the view of the kernel, for each of ~20,000 chains at 10,000 services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// The fingerprint written as `text` (16 hex digits, as [`Fingerprint`]'s `Display` writes
    /// it); None for anything else.
    pub fn parse(text: &str) -> Option<Fingerprint> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Fingerprint)
    }
}

impl Fingerprint {
    /// The comment of a chain's first rule as written to the kernel: the rule's own (cut at 100
    /// characters) followed by "[fp]", which [`crate::diff::fingerprint_of_comment`] reads back.
    pub fn in_comment(self, comment: Option<&str>) -> String {
        match comment {
            Some(c) => format!("{} [{self}]", c.chars().take(100).collect::<String>()),
            None => format!("[{self}]"),
        }
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
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
    pub fn new(name: impl Into<Key>, comment: impl Into<String>) -> Chain {
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

    /// A fingerprint of the definition and rules: FNV-1a 64 of the chain's [`Encode`] bytes, in
    /// hex. It is kept in the comment of the chain's first rule (a chain's own comment cannot be
    /// changed in place), so an agent that restarts, or one of another build, can tell which
    /// chains are already as planned. It changes only when the chain's base, comment or rules do.
    pub fn fingerprint(&self) -> Fingerprint {
        *self.fp.get_or_init(|| self.compute_fingerprint())
    }

    fn compute_fingerprint(&self) -> Fingerprint {
        use std::hash::Hasher;
        // Hashing the typed rules' encoding (not their rendering) keeps this cheap at 100,000
        // rules; the encoding is explicit, so the value only changes when the chain does.
        let mut bytes = Vec::with_capacity(64 + 48 * self.rules.len());
        self.encode(&mut bytes);
        let mut h = fnv::FnvHasher::default();
        h.write(&bytes);
        Fingerprint(h.finish())
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
                r.comment = Some(fp.in_comment(r.comment.as_deref()).into_boxed_str());
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
    /// The table's name: None is [`TABLE`] (the one-table layout); shards of a sharded layout
    /// name theirs (see `plan::plan_sharded`).
    pub table: Option<Key>,
    pub sets: BTreeMap<String, Set>,
    /// Shared, so that an incremental plan reuses unchanged chains without copying them.
    pub chains: BTreeMap<Key, std::sync::Arc<Chain>>,
}

impl Ruleset {
    /// The table's name in the kernel.
    pub fn table_name(&self) -> &str {
        self.table.as_deref().unwrap_or(TABLE)
    }
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
        let table = self.table_name();
        let mut out = format!("add table {FAMILY} {table} {{ comment \"managed by ferry\"; }}\n");
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
            render_elements(
                &mut out,
                "add",
                &s.name,
                s.elements.iter().map(|(k, e)| (&**k, &**e)),
            );
        }
        out
    }
}

/// `add element inet ferry SET { e1, e2, ... }` in batches.
pub fn render_elements<'a>(
    out: &mut String,
    verb: &str,
    set: &str,
    elements: impl Iterator<Item = (&'a str, &'a Element)>,
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
    for (k, e) in elements {
        // Deleting takes the key alone.
        batch.push(if verb == "delete" {
            k.to_string()
        } else {
            e.render(k)
        });
        if batch.len() >= 1000 {
            flush(out, &mut batch);
        }
    }
    flush(out, &mut batch);
}

// ---------------------------------------------------------------------------------------------
// The byte encoding of the rule IR (what chain fingerprints hash).

/// An explicit, stable byte encoding of the rule IR: what [`Chain::fingerprint`] hashes, so the
/// fingerprints kept in the kernel do not depend on the compiler (std's derived `Hash` may change
/// between Rust versions) and change only when a chain does.
///
/// The encoding is prefix-free, so distinct values never encode alike, alone or in a sequence:
/// - integers: fixed width, little-endian (`u8`, `u16`, `u32`, `i32`);
/// - strings: byte length as `u32`, then the UTF-8 bytes;
/// - `Option`: `0`, or `1` then the value; lists: the count as `u32`, then the items;
/// - IP addresses: `4` then 4 bytes, or `6` then 16 bytes; CIDRs: the network address, then the
///   prefix length as `u8`; protocols: their IANA number as `u8` (tcp 6, udp 17, sctp 132);
///   families: `4` or `6`;
/// - enums: a tag byte fixed per variant (see each `encode`), then the fields in order.
///
/// A chain is the bytes `FCH1` (format version 1), its base (`Option` of type, hook,
/// priority), its comment and its rules; its name is not part of it. Changing any of this
/// changes every fingerprint (agents then rewrite every chain once): bump the version when
/// you do, and update the golden test.
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names and comments are far below 4 GiB; saturate rather than wrap, to stay total.
    put_u32(out, u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(s.as_bytes());
}

fn put_list<T: Encode>(out: &mut Vec<u8>, items: &[T]) {
    put_u32(out, u32::try_from(items.len()).unwrap_or(u32::MAX));
    for i in items {
        i.encode(out);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode(out);
            }
        }
    }
}

impl Encode for String {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, self);
    }
}

impl Encode for Box<str> {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, self);
    }
}

impl Encode for IpAddr {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
    }
}

impl Encode for Cidr {
    fn encode(&self, out: &mut Vec<u8>) {
        self.network().encode(out);
        out.push(self.prefix_len());
    }
}

impl Encode for Protocol {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        });
    }
}

impl Encode for Family {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(match self {
            Family::V4 => 4,
            Family::V6 => 6,
        });
    }
}

impl Encode for Verdict {
    /// accept 1, drop 2, return 3, jump 4 (chain), goto 5 (chain).
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Verdict::Accept => out.push(1),
            Verdict::Drop => out.push(2),
            Verdict::Return => out.push(3),
            Verdict::Jump(c) => {
                out.push(4);
                put_str(out, c);
            }
            Verdict::Goto(c) => {
                out.push(5);
                put_str(out, c);
            }
        }
    }
}

impl Encode for Match {
    /// ct state new 1, ct status dnat 2, l4proto 3, saddr not in 4, daddr in set 5, service
    /// tuple not in 6, address pair in set 7, random 8 (modulus, value), mark has 9, mark
    /// lacks 10, saddr in none of 11 (a list of CIDRs), saddr in 12, daddr in 13, iifname 14
    /// (name, prefix 0/1, negate 0/1), fib saddr type local 15, daddr not in set 16.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Match::CtStateNew => out.push(1),
            Match::CtStatusDnat => out.push(2),
            Match::L4Proto(p) => {
                out.push(3);
                p.encode(out);
            }
            Match::SaddrNotIn(c) => {
                out.push(4);
                c.encode(out);
            }
            Match::DaddrInSet(f, s) => {
                out.push(5);
                f.encode(out);
                put_str(out, s);
            }
            Match::ServiceTupleNotIn(f, s) => {
                out.push(6);
                f.encode(out);
                put_str(out, s);
            }
            Match::AddrPairInSet(f, s) => {
                out.push(7);
                f.encode(out);
                put_str(out, s);
            }
            Match::Random { modulus, value } => {
                out.push(8);
                put_u32(out, *modulus);
                put_u32(out, *value);
            }
            Match::MarkHas(m) => {
                out.push(9);
                put_u32(out, *m);
            }
            Match::MarkLacks(m) => {
                out.push(10);
                put_u32(out, *m);
            }
            Match::SaddrNotInAny(cs) => {
                out.push(11);
                put_list(out, cs);
            }
            Match::SaddrIn(c) => {
                out.push(12);
                c.encode(out);
            }
            Match::DaddrIn(c) => {
                out.push(13);
                c.encode(out);
            }
            Match::IifName {
                name,
                prefix,
                negate,
            } => {
                out.push(14);
                put_str(out, name);
                out.push(u8::from(*prefix));
                out.push(u8::from(*negate));
            }
            Match::FibSaddrLocal => out.push(15),
            Match::DaddrNotInSet(f, s) => {
                out.push(16);
                f.encode(out);
                put_str(out, s);
            }
        }
    }
}

impl Encode for Action {
    /// verdict 1, service tuple vmap 2, proto/port vmap 3, set mark 4, toggle mark 5, dnat 6
    /// (address, port), masquerade 7 (fully random 0/1), reject tcp reset 8, reject icmpx 9,
    /// dnat to the remembered endpoint 10 (family, map, port as an `Option`), original tuple
    /// vmap 11 (family, map), remember 12 (family, map, timeout, with port 0/1), dnat to a
    /// drawn endpoint 13 (family, protocol, map, modulus, nodeport 0/1).
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Action::Verdict(v) => {
                out.push(1);
                v.encode(out);
            }
            Action::ServiceTupleVmap(f, m) => {
                out.push(2);
                f.encode(out);
                put_str(out, m);
            }
            Action::ProtoPortVmap(m) => {
                out.push(3);
                put_str(out, m);
            }
            Action::SetMark(b) => {
                out.push(4);
                put_u32(out, *b);
            }
            Action::ToggleMark(b) => {
                out.push(5);
                put_u32(out, *b);
            }
            Action::Dnat { addr, port } => {
                out.push(6);
                addr.encode(out);
                out.extend_from_slice(&port.to_le_bytes());
            }
            Action::Masquerade { fully_random } => {
                out.push(7);
                out.push(u8::from(*fully_random));
            }
            Action::RejectTcpReset => out.push(8),
            Action::RejectIcmpx => out.push(9),
            Action::DnatRemembered { family, map, port } => {
                out.push(10);
                family.encode(out);
                put_str(out, map);
                match port {
                    None => out.push(0),
                    Some(p) => {
                        out.push(1);
                        out.extend_from_slice(&p.to_le_bytes());
                    }
                }
            }
            Action::OriginalTupleVmap(f, m) => {
                out.push(11);
                f.encode(out);
                put_str(out, m);
            }
            Action::Remember {
                family,
                map,
                timeout,
                with_port,
            } => {
                out.push(12);
                family.encode(out);
                put_str(out, map);
                put_u32(out, *timeout);
                out.push(u8::from(*with_port));
            }
            Action::DnatDraw {
                family,
                proto,
                map,
                modulus,
                nodeport,
            } => {
                out.push(13);
                family.encode(out);
                proto.encode(out);
                put_str(out, map);
                put_u32(out, *modulus);
                out.push(u8::from(*nodeport));
            }
        }
    }
}

impl Encode for Rule {
    /// The matches (a list), the action, the comment (an `Option`).
    fn encode(&self, out: &mut Vec<u8>) {
        put_list(out, &self.matches);
        self.action.encode(out);
        self.comment.encode(out);
    }
}

impl Encode for BaseChain {
    /// Type (filter 1, nat 2), hook (prerouting 1, output 2, postrouting 3), priority (`i32`).
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(match self.type_ {
            ChainType::Filter => 1,
            ChainType::Nat => 2,
        });
        out.push(match self.hook {
            Hook::Prerouting => 1,
            Hook::Output => 2,
            Hook::Postrouting => 3,
        });
        out.extend_from_slice(&self.priority.to_le_bytes());
    }
}

impl Encode for Chain {
    /// `FCH1`, the base, the comment and the rules (not the name).
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"FCH1");
        self.base.encode(out);
        put_str(out, &self.comment);
        put_list(out, &self.rules);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn golden_chain() -> Chain {
        let mut c = Chain::base(
            "nat-prerouting",
            ChainType::Nat,
            Hook::Prerouting,
            -100,
            "ferry: services",
        );
        c.push(Rule::new(
            vec![Match::DaddrInSet(Family::V4, "cluster-ips-v4".into())],
            Action::ServiceTupleVmap(Family::V4, "services-v4".into()),
        ));
        c.push(
            Rule::new(
                vec![
                    Match::L4Proto(Protocol::Tcp),
                    Match::SaddrNotIn("10.42.0.0/16".parse().expect("cidr")),
                    Match::Random {
                        modulus: 2,
                        value: 0,
                    },
                ],
                Action::Dnat {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 42, 1, 7)),
                    port: 8080,
                },
            )
            .with_comment("default/web"),
        );
        c.push(Rule::new(
            vec![Match::MarkLacks(0x4000)],
            Action::Verdict(Verdict::Jump("svc-default-web".into())),
        ));
        c
    }

    /// A cold table at 10,000 services holds ~110,000 rules (one per endpoint): their size is
    /// the plan's memory. Names are shared keys and lists boxed slices, so that a match stays
    /// within 24 bytes and an endpoint rule (two matches inline) within 104 (it was 128).
    #[test]
    fn rules_stay_small() {
        use std::mem::size_of;
        assert!(
            size_of::<Match>() <= 24,
            "Match: {} bytes",
            size_of::<Match>()
        );
        assert!(
            size_of::<Verdict>() <= 24,
            "Verdict: {} bytes",
            size_of::<Verdict>()
        );
        assert!(
            size_of::<Action>() <= 32,
            "Action: {} bytes",
            size_of::<Action>()
        );
        assert!(
            size_of::<Rule>() <= 104,
            "Rule: {} bytes",
            size_of::<Rule>()
        );
        assert!(
            size_of::<Element>() <= 48,
            "Element: {} bytes",
            size_of::<Element>()
        );
        assert_eq!(size_of::<Fingerprint>(), 8);
    }

    /// Pinned: the fingerprint of a fixed chain must not change with the compiler, the
    /// platform or unrelated code. If it changes on purpose, bump the `FCH` version.
    #[test]
    fn golden_fingerprint() {
        let c = golden_chain();
        // Cross-checked by hand-encoding the documented format in another language.
        assert_eq!(c.fingerprint().to_string(), "d0024c7f8e41e2a5");
        let mut bytes = Vec::new();
        Rule::new(
            vec![Match::L4Proto(Protocol::Udp)],
            Action::Dnat {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                port: 53,
            },
        )
        .encode(&mut bytes);
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 3, 17, 6, 4, 10, 0, 0, 1, 53, 0, 0],
            "one match (l4proto udp), dnat 10.0.0.1:53, no comment"
        );
    }

    #[test]
    fn fingerprint_follows_the_rules_only() {
        let a = golden_chain();
        // The name is not part of it; the comment, the base and every rule are.
        let mut renamed = golden_chain();
        renamed.name = "other".into();
        assert_eq!(renamed.fingerprint(), a.fingerprint());
        let mut b = golden_chain();
        b.comment.push('!');
        assert_ne!(b.fingerprint(), a.fingerprint());
        let mut b = golden_chain();
        b.push(Rule::new(vec![], Action::Verdict(Verdict::Return)));
        assert_ne!(b.fingerprint(), a.fingerprint());
        let mut b = Chain::base(
            "nat-prerouting",
            ChainType::Nat,
            Hook::Prerouting,
            -99,
            "ferry: services",
        );
        for r in &a.rules {
            b.push(r.clone());
        }
        assert_ne!(b.fingerprint(), a.fingerprint());
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9-]{0,6}"
    }

    fn family() -> impl Strategy<Value = Family> {
        prop_oneof![Just(Family::V4), Just(Family::V6)]
    }

    fn proto() -> impl Strategy<Value = Protocol> {
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ]
    }

    fn verdict() -> impl Strategy<Value = Verdict> {
        prop_oneof![
            Just(Verdict::Accept),
            Just(Verdict::Drop),
            Just(Verdict::Return),
            name().prop_map(|n| Verdict::Jump(n.into())),
            name().prop_map(|n| Verdict::Goto(n.into())),
        ]
    }

    fn small() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..4, Just(0x4000), any::<u32>()]
    }

    fn a_match() -> impl Strategy<Value = Match> {
        prop_oneof![
            Just(Match::CtStateNew),
            Just(Match::CtStatusDnat),
            proto().prop_map(Match::L4Proto),
            (ip(), 0u8..=128).prop_map(|(a, l)| {
                let l = if a.is_ipv4() { l.min(32) } else { l };
                Match::SaddrNotIn(Cidr::new(a, l).expect("valid prefix length"))
            }),
            (family(), name()).prop_map(|(f, s)| Match::DaddrInSet(f, s.into())),
            (family(), name()).prop_map(|(f, s)| Match::ServiceTupleNotIn(f, s.into())),
            (family(), name()).prop_map(|(f, s)| Match::AddrPairInSet(f, s.into())),
            (small(), small()).prop_map(|(modulus, value)| Match::Random { modulus, value }),
            small().prop_map(Match::MarkHas),
            small().prop_map(Match::MarkLacks),
            proptest::collection::vec(
                (ip(), 0u8..=32).prop_map(|(a, l)| Cidr::new(a, l).expect("valid prefix length")),
                1..3
            )
            .prop_map(|cs| Match::SaddrNotInAny(cs.into())),
            (ip(), 0u8..=32)
                .prop_map(|(a, l)| Match::SaddrIn(Cidr::new(a, l).expect("valid prefix length"))),
            (ip(), 0u8..=32)
                .prop_map(|(a, l)| Match::DaddrIn(Cidr::new(a, l).expect("valid prefix length"))),
            (name(), any::<bool>(), any::<bool>()).prop_map(|(name, prefix, negate)| {
                Match::IifName {
                    name: name.into(),
                    prefix,
                    negate,
                }
            }),
            Just(Match::FibSaddrLocal),
            (family(), name()).prop_map(|(f, s)| Match::DaddrNotInSet(f, s.into())),
        ]
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            verdict().prop_map(Action::Verdict),
            (family(), name()).prop_map(|(f, m)| Action::ServiceTupleVmap(f, m.into())),
            name().prop_map(|n| Action::ProtoPortVmap(n.into())),
            small().prop_map(Action::SetMark),
            small().prop_map(Action::ToggleMark),
            (ip(), prop_oneof![0u16..3, any::<u16>()])
                .prop_map(|(addr, port)| Action::Dnat { addr, port }),
            any::<bool>().prop_map(|fully_random| Action::Masquerade { fully_random }),
            Just(Action::RejectTcpReset),
            Just(Action::RejectIcmpx),
            (family(), name(), proptest::option::of(any::<u16>())).prop_map(
                |(family, map, port)| Action::DnatRemembered {
                    family,
                    map: map.into(),
                    port
                }
            ),
            (family(), name()).prop_map(|(f, m)| Action::OriginalTupleVmap(f, m.into())),
            (family(), name(), small(), any::<bool>()).prop_map(
                |(family, map, timeout, with_port)| Action::Remember {
                    family,
                    map: map.into(),
                    timeout,
                    with_port
                }
            ),
        ]
    }

    fn rule() -> impl Strategy<Value = Rule> {
        (
            proptest::collection::vec(a_match(), 0..3),
            action(),
            proptest::option::of(name()),
        )
            .prop_map(|(matches, action, comment)| Rule {
                matches: matches.into(),
                action,
                comment: comment.map(String::into_boxed_str),
            })
    }

    fn bytes<T: Encode>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        v.encode(&mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Equal rules encode alike; distinct rules never do.
        #[test]
        fn distinct_rules_distinct_encodings(a in rule(), b in rule()) {
            prop_assert_eq!(a == b, bytes(&a) == bytes(&b), "{:?} vs {:?}", a, b);
        }

        /// The same for whole chains: the encoding of a rule list is prefix-free, so no two
        /// different lists (split differently into rules) encode alike.
        #[test]
        fn distinct_chains_distinct_encodings(
            ra in proptest::collection::vec(rule(), 0..4),
            rb in proptest::collection::vec(rule(), 0..4),
            ca in name(),
            cb in name(),
        ) {
            let mut a = Chain::new("x", ca);
            for r in ra {
                a.push(r);
            }
            let mut b = Chain::new("x", cb);
            for r in rb {
                b.push(r);
            }
            prop_assert_eq!(a == b, bytes(&a) == bytes(&b));
        }
    }

    fn arb_value(t: KeyType, interval: bool) -> BoxedStrategy<Value> {
        let v4 = any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)));
        let v6 = any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)));
        match t {
            KeyType::Ipv4Addr if interval => (v4.clone(), v4)
                .prop_map(|(a, b)| Value::Range(a.min(b), a.max(b)))
                .boxed(),
            KeyType::Ipv6Addr if interval => (v6.clone(), v6)
                .prop_map(|(a, b)| Value::Range(a.min(b), a.max(b)))
                .boxed(),
            KeyType::Ipv4Addr => v4.prop_map(Value::Ip).boxed(),
            KeyType::Ipv6Addr => v6.prop_map(Value::Ip).boxed(),
            KeyType::InetProto => prop_oneof![
                Just(Value::Proto(Protocol::Tcp)),
                Just(Value::Proto(Protocol::Udp)),
                Just(Value::Proto(Protocol::Sctp))
            ]
            .boxed(),
            KeyType::InetService => any::<u16>().prop_map(Value::Port).boxed(),
            KeyType::Draw => any::<u32>().prop_map(Value::Draw).boxed(),
        }
    }

    proptest! {
        /// Keys are kept as text only: reading the text back by the set's types gives the key.
        #[test]
        fn key_text_reads_back_as_the_key(
            (types, interval, key) in prop_oneof![
                Just((vec![KeyType::Ipv4Addr, KeyType::InetProto, KeyType::InetService], false)),
                Just((vec![KeyType::Ipv6Addr, KeyType::InetProto, KeyType::InetService], false)),
                Just((vec![KeyType::Ipv4Addr, KeyType::Ipv4Addr], false)),
                Just((vec![KeyType::Ipv6Addr], false)),
                Just((vec![KeyType::Ipv4Addr], true)),
                Just((vec![KeyType::Ipv6Addr], true)),
                Just((vec![KeyType::InetProto, KeyType::InetService], false)),
                Just((vec![KeyType::Ipv4Addr, KeyType::InetProto, KeyType::InetService, KeyType::Draw], false)),
                Just((vec![KeyType::InetProto, KeyType::InetService, KeyType::Draw], false)),
            ]
            .prop_flat_map(|(types, interval)| {
                let vals: Vec<BoxedStrategy<Value>> =
                    types.iter().map(|t| arb_value(*t, interval)).collect();
                (Just(types), Just(interval), vals)
            })
        ) {
            let mut set = Set::new("s", &types, false, "");
            set.interval = interval;
            let text = key_text(&key);
            let back = set.values(&text);
            // A one-address range is written as the address: it reads back as that address.
            let want: Vec<Value> = key
                .iter()
                .map(|v| match v {
                    Value::Range(a, b) if a == b => Value::Ip(*a),
                    v => *v,
                })
                .collect();
            prop_assert_eq!(back, Some(want), "{}", text);
            // The wrong types never read it.
            let mut other = Set::new("o", &[KeyType::InetService], false, "");
            other.interval = interval;
            if types != [KeyType::InetService] {
                prop_assert_eq!(other.values(&text), None);
            }
        }
    }

    #[test]
    fn bare_elements_are_shared() {
        let mut s = Set::new("s", &[KeyType::Ipv4Addr], false, "");
        s.insert(
            vec![Value::Ip("10.0.0.1".parse().unwrap())],
            None,
            String::new(),
        );
        s.insert(
            vec![Value::Ip("10.0.0.2".parse().unwrap())],
            None,
            String::new(),
        );
        let a = s.elements["10.0.0.1"].clone();
        assert!(std::sync::Arc::ptr_eq(&a, &s.elements["10.0.0.2"]));
        s.insert(
            vec![Value::Ip("10.0.0.3".parse().unwrap())],
            None,
            "x".into(),
        );
        assert!(!std::sync::Arc::ptr_eq(&a, &s.elements["10.0.0.3"]));
    }
}
