//! UPDATE (RFC 4271 §4.3) with the path attributes a speaker of host routes sends and meets:
//! ORIGIN, AS_PATH (two- or four-octet, RFC 6793), NEXT_HOP, MULTI_EXIT_DISC, LOCAL_PREF,
//! ATOMIC_AGGREGATE, AGGREGATOR, COMMUNITIES (RFC 1997), MP_REACH_NLRI / MP_UNREACH_NLRI
//! (RFC 4760, IPv6 with an optional link-local next hop per RFC 2545), LARGE_COMMUNITY
//! (RFC 8092); any other optional attribute is carried as [`RawAttribute`]. End-of-RIB markers
//! (RFC 4724 §2). Errors are handled as RFC 7606 says: see [`decode`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{encode as encode_message, Codec, DecodeError, ErrorKind, Family, Message, Reader};
use super::{UpdateSubcode, AS_TRANS, MAX_LEN};

/// Attribute type codes.
pub mod attr {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const MP_REACH_NLRI: u8 = 14;
    pub const MP_UNREACH_NLRI: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const LARGE_COMMUNITIES: u8 = 32;
}

const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const EXTENDED: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    Igp,
    Egp,
    Incomplete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SegmentKind {
    Set,
    Sequence,
    ConfedSequence,
    ConfedSet,
}

impl SegmentKind {
    fn code(self) -> u8 {
        match self {
            SegmentKind::Set => 1,
            SegmentKind::Sequence => 2,
            SegmentKind::ConfedSequence => 3,
            SegmentKind::ConfedSet => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => SegmentKind::Set,
            2 => SegmentKind::Sequence,
            3 => SegmentKind::ConfedSequence,
            4 => SegmentKind::ConfedSet,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Segment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

pub type AsPath = Vec<Segment>;

/// A large community (RFC 8092): global administrator and two local data parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    pub global: u32,
    pub local1: u32,
    pub local2: u32,
}

impl std::fmt::Display for LargeCommunity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.global, self.local1, self.local2)
    }
}

/// MP_REACH_NLRI for a family this speaker knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MpReach {
    pub family: Family,
    pub next_hop: IpAddr,
    /// The second, link-local, IPv6 next hop (RFC 2545 §3).
    pub link_local: Option<Ipv6Addr>,
    pub nlri: Vec<IpNet>,
}

/// MP_UNREACH_NLRI for a family this speaker knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<IpNet>,
}

/// An optional attribute this speaker does not interpret (or one for a family it does not
/// know), kept as received. `flags` never has the extended-length bit: encoding sets it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttribute {
    pub flags: u8,
    pub type_code: u8,
    pub value: Vec<u8>,
}

/// The path attributes of an UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Attributes {
    pub origin: Option<Origin>,
    pub as_path: Option<AsPath>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<(u32, Ipv4Addr)>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<LargeCommunity>,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    pub other: Vec<RawAttribute>,
}

impl Attributes {
    fn is_empty(&self) -> bool {
        *self == Attributes::default()
    }
}

/// What RFC 7606 says to do with a malformed attribute that does not reset the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Handling {
    /// The attribute was dropped (it is absent from [`Update::attributes`]); the rest stands.
    AttributeDiscard,
    /// Every route the UPDATE announces is to be taken as withdrawn (RFC 7606 §2).
    TreatAsWithdraw,
}

/// One malformation found in an UPDATE that was still decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    pub type_code: u8,
    pub handling: Handling,
    pub what: String,
}

/// An UPDATE message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub withdrawn: Vec<Ipv4Net>,
    pub attributes: Attributes,
    pub nlri: Vec<Ipv4Net>,
    /// Malformations handled per RFC 7606 (empty for a well-formed UPDATE; never encoded).
    pub problems: Vec<Problem>,
}

impl Update {
    /// The End-of-RIB marker of `family` (RFC 4724 §2): an empty UPDATE for IPv4 unicast, an
    /// empty MP_UNREACH_NLRI for the others.
    pub fn end_of_rib(family: Family) -> Update {
        match family {
            Family::Ipv4Unicast => Update::default(),
            _ => Update {
                attributes: Attributes {
                    mp_unreach: Some(MpUnreach {
                        family,
                        withdrawn: Vec::new(),
                    }),
                    ..Attributes::default()
                },
                ..Update::default()
            },
        }
    }

    /// The family this UPDATE is the End-of-RIB marker of, if it is one.
    pub fn is_end_of_rib(&self) -> Option<Family> {
        if !self.withdrawn.is_empty() || !self.nlri.is_empty() {
            return None;
        }
        if self.attributes.is_empty() {
            return Some(Family::Ipv4Unicast);
        }
        let only_unreach = Attributes {
            mp_unreach: self.attributes.mp_unreach.clone(),
            ..Attributes::default()
        };
        match &self.attributes.mp_unreach {
            Some(u) if u.withdrawn.is_empty() && only_unreach == self.attributes => Some(u.family),
            _ => None,
        }
    }

    /// The strongest handling among [`Update::problems`].
    pub fn handling(&self) -> Option<Handling> {
        self.problems.iter().map(|p| p.handling).max()
    }

    /// Every prefix announced (the NLRI field and MP_REACH_NLRI).
    pub fn announced(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.nlri.iter().map(|n| IpNet::V4(*n)).collect();
        if let Some(m) = &self.attributes.mp_reach {
            out.extend(m.nlri.iter().copied());
        }
        out
    }

    /// Every prefix withdrawn (the withdrawn routes field and MP_UNREACH_NLRI).
    pub fn withdrawn_all(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self.withdrawn.iter().map(|n| IpNet::V4(*n)).collect();
        if let Some(m) = &self.attributes.mp_unreach {
            out.extend(m.withdrawn.iter().copied());
        }
        out
    }
}

fn reset(sub: UpdateSubcode, data: Vec<u8>, what: impl Into<String>) -> DecodeError {
    DecodeError::new(ErrorKind::Update(sub), data, what)
}

/// The flags an attribute must have (optional and transitive bits only).
fn expected_flags(ty: u8) -> Option<u8> {
    Some(match ty {
        attr::ORIGIN | attr::AS_PATH | attr::NEXT_HOP | attr::LOCAL_PREF => TRANSITIVE,
        attr::ATOMIC_AGGREGATE => TRANSITIVE,
        attr::MED | attr::MP_REACH_NLRI | attr::MP_UNREACH_NLRI => OPTIONAL,
        attr::AGGREGATOR | attr::COMMUNITIES | attr::LARGE_COMMUNITIES => OPTIONAL | TRANSITIVE,
        _ => return None,
    })
}

/// RFC 7606 §7 (and RFC 8092 §6): what a malformed known attribute costs. `None`: the session
/// (MP_REACH_NLRI / MP_UNREACH_NLRI: the NLRI cannot be trusted to be found, §7.11).
fn handling_of(ty: u8) -> Option<Handling> {
    match ty {
        attr::ATOMIC_AGGREGATE | attr::AGGREGATOR => Some(Handling::AttributeDiscard),
        attr::MP_REACH_NLRI | attr::MP_UNREACH_NLRI => None,
        _ => Some(Handling::TreatAsWithdraw),
    }
}

/// Decodes an UPDATE body. Per RFC 7606:
/// - the withdrawn routes or attributes length overrunning the message, an NLRI field that
///   does not parse, a malformed or repeated MP_REACH_NLRI / MP_UNREACH_NLRI, an attribute
///   overrunning the attributes when an MP attribute was met, or an unrecognized well-known
///   attribute: [`DecodeError`] (session reset);
/// - ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF, COMMUNITIES, LARGE_COMMUNITY malformed (length,
///   flags, value), an attribute overrunning the attributes field, a missing mandatory
///   attribute: [`Handling::TreatAsWithdraw`];
/// - ATOMIC_AGGREGATE or AGGREGATOR malformed: [`Handling::AttributeDiscard`];
/// - a repeated attribute (other than MP ones): all but the first are discarded (§3 g).
pub(super) fn decode(body: &[u8], codec: Codec) -> Result<Update, DecodeError> {
    let mut r = Reader::new(body);
    let list = |what: &str| reset(UpdateSubcode::MalformedAttributeList, Vec::new(), what);
    let wlen = r.u16().ok_or_else(|| list("no withdrawn routes length"))?;
    let wbytes = r
        .take(usize::from(wlen))
        .ok_or_else(|| list("withdrawn routes length overruns the UPDATE"))?;
    let alen = r
        .u16()
        .ok_or_else(|| list("no total path attribute length"))?;
    let abytes = r
        .take(usize::from(alen))
        .ok_or_else(|| list("total path attribute length overruns the UPDATE"))?;
    let nbytes = r.rest();
    let net = |what: &str| reset(UpdateSubcode::InvalidNetworkField, Vec::new(), what);
    let withdrawn = v4_prefixes(wbytes).ok_or_else(|| net("withdrawn routes do not parse"))?;
    let nlri = v4_prefixes(nbytes).ok_or_else(|| net("NLRI do not parse"))?;
    let mut problems = Vec::new();
    let a = attributes(abytes, codec, &mut problems)?;
    let reaches = !nlri.is_empty() || a.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
    if reaches {
        // RFC 7606 §3 d: a missing well-known mandatory attribute is treat-as-withdraw.
        let mut missing = |ty: u8, name: &str| {
            problems.push(Problem {
                type_code: ty,
                handling: Handling::TreatAsWithdraw,
                what: format!("missing {name}"),
            })
        };
        if a.origin.is_none() {
            missing(attr::ORIGIN, "ORIGIN");
        }
        if a.as_path.is_none() {
            missing(attr::AS_PATH, "AS_PATH");
        }
        if !nlri.is_empty() && a.next_hop.is_none() {
            missing(attr::NEXT_HOP, "NEXT_HOP");
        }
    }
    Ok(Update {
        withdrawn,
        attributes: a,
        nlri,
        problems,
    })
}

fn attributes(
    bytes: &[u8],
    codec: Codec,
    problems: &mut Vec<Problem>,
) -> Result<Attributes, DecodeError> {
    let mut a = Attributes::default();
    let mut seen = [false; 256];
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        let start = bytes.len() - r.len();
        let head = (r.u8(), r.u8());
        let (Some(flags), Some(ty)) = head else {
            return overrun(problems, &seen, a, bytes, start);
        };
        let len = if flags & EXTENDED != 0 {
            r.u16().map(usize::from)
        } else {
            r.u8().map(usize::from)
        };
        let Some(value) = len.and_then(|l| r.take(l)) else {
            return overrun(problems, &seen, a, bytes, start);
        };
        let whole = &bytes[start..bytes.len() - r.len()];
        if seen[usize::from(ty)] {
            if ty == attr::MP_REACH_NLRI || ty == attr::MP_UNREACH_NLRI {
                return Err(reset(
                    UpdateSubcode::MalformedAttributeList,
                    Vec::new(),
                    format!("attribute {ty} repeated"),
                ));
            }
            problems.push(Problem {
                type_code: ty,
                handling: Handling::AttributeDiscard,
                what: format!("attribute {ty} repeated: all but the first discarded"),
            });
            continue;
        }
        seen[usize::from(ty)] = true;
        let mut bad = |what: String| -> Result<(), DecodeError> {
            match handling_of(ty) {
                Some(handling) => {
                    problems.push(Problem {
                        type_code: ty,
                        handling,
                        what,
                    });
                    Ok(())
                }
                None => Err(reset(
                    UpdateSubcode::OptionalAttributeError,
                    whole.to_vec(),
                    what,
                )),
            }
        };
        if let Some(want) = expected_flags(ty) {
            if flags & (OPTIONAL | TRANSITIVE) != want {
                bad(format!("attribute {ty}: flags {flags:#04x}"))?;
                continue;
            }
        }
        let n = value.len();
        match ty {
            attr::ORIGIN => match value {
                [0] => a.origin = Some(Origin::Igp),
                [1] => a.origin = Some(Origin::Egp),
                [2] => a.origin = Some(Origin::Incomplete),
                _ => bad(format!("ORIGIN {value:?}"))?,
            },
            attr::AS_PATH => match as_path(value, if codec.four_octet_as { 4 } else { 2 }) {
                Some(p) => a.as_path = Some(p),
                None => bad("AS_PATH segments do not parse".into())?,
            },
            attr::NEXT_HOP => match <[u8; 4]>::try_from(value) {
                Ok(b) => a.next_hop = Some(Ipv4Addr::from(b)),
                Err(_) => bad(format!("NEXT_HOP length {n}"))?,
            },
            attr::MED => match <[u8; 4]>::try_from(value) {
                Ok(b) => a.med = Some(u32::from_be_bytes(b)),
                Err(_) => bad(format!("MULTI_EXIT_DISC length {n}"))?,
            },
            attr::LOCAL_PREF => match <[u8; 4]>::try_from(value) {
                Ok(b) => a.local_pref = Some(u32::from_be_bytes(b)),
                Err(_) => bad(format!("LOCAL_PREF length {n}"))?,
            },
            attr::ATOMIC_AGGREGATE => {
                if n == 0 {
                    a.atomic_aggregate = true;
                } else {
                    bad(format!("ATOMIC_AGGREGATE length {n}"))?;
                }
            }
            attr::AGGREGATOR => {
                let size = if codec.four_octet_as { 8 } else { 6 };
                if n == size {
                    let (asn, ip) = value.split_at(size - 4);
                    let asn = asn.iter().fold(0u32, |x, b| (x << 8) | u32::from(*b));
                    let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
                    a.aggregator = Some((asn, ip));
                } else {
                    bad(format!("AGGREGATOR length {n}"))?;
                }
            }
            attr::COMMUNITIES => {
                if n == 0 || !n.is_multiple_of(4) {
                    bad(format!("COMMUNITIES length {n}"))?;
                } else {
                    a.communities = value
                        .chunks_exact(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                }
            }
            attr::LARGE_COMMUNITIES => {
                if n == 0 || !n.is_multiple_of(12) {
                    bad(format!("LARGE_COMMUNITY length {n}"))?;
                } else {
                    a.large_communities = value
                        .chunks_exact(12)
                        .map(|c| LargeCommunity {
                            global: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                            local1: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                            local2: u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
                        })
                        .collect();
                }
            }
            attr::MP_REACH_NLRI => match mp_reach(value) {
                Ok(Some(m)) => a.mp_reach = Some(m),
                Ok(None) => a.other.push(raw(flags, ty, value)),
                Err(what) => bad(what)?,
            },
            attr::MP_UNREACH_NLRI => match mp_unreach(value) {
                Ok(Some(m)) => a.mp_unreach = Some(m),
                Ok(None) => a.other.push(raw(flags, ty, value)),
                Err(what) => bad(what)?,
            },
            _ if flags & OPTIONAL == 0 => {
                return Err(reset(
                    UpdateSubcode::UnrecognizedWellKnownAttribute,
                    whole.to_vec(),
                    format!("unrecognized well-known attribute {ty}"),
                ));
            }
            _ => a.other.push(raw(flags, ty, value)),
        }
    }
    Ok(a)
}

fn raw(flags: u8, ty: u8, value: &[u8]) -> RawAttribute {
    RawAttribute {
        flags: flags & !EXTENDED,
        type_code: ty,
        value: value.to_vec(),
    }
}

/// An attribute overruns the attributes field (RFC 7606 §4): treat-as-withdraw, unless an MP
/// attribute was met (then the NLRI may be in what cannot be parsed: session reset).
fn overrun(
    problems: &mut Vec<Problem>,
    seen: &[bool; 256],
    a: Attributes,
    bytes: &[u8],
    start: usize,
) -> Result<Attributes, DecodeError> {
    let ty = bytes.get(start + 1).copied().unwrap_or(0);
    if seen[usize::from(attr::MP_REACH_NLRI)]
        || seen[usize::from(attr::MP_UNREACH_NLRI)]
        || ty == attr::MP_REACH_NLRI
        || ty == attr::MP_UNREACH_NLRI
    {
        return Err(reset(
            UpdateSubcode::MalformedAttributeList,
            Vec::new(),
            "attribute overruns the path attributes (MP_REACH_NLRI/MP_UNREACH_NLRI present)",
        ));
    }
    problems.push(Problem {
        type_code: ty,
        handling: Handling::TreatAsWithdraw,
        what: format!("attribute {ty} overruns the path attributes"),
    });
    Ok(a)
}

fn as_path(mut v: &[u8], size: usize) -> Option<AsPath> {
    let mut out = Vec::new();
    while let [kind, count, rest @ ..] = v {
        let kind = SegmentKind::from_code(*kind)?;
        let count = usize::from(*count);
        if count == 0 || rest.len() < count * size {
            return None;
        }
        let (asns, tail) = rest.split_at(count * size);
        out.push(Segment {
            kind,
            asns: asns
                .chunks_exact(size)
                .map(|c| c.iter().fold(0u32, |x, b| (x << 8) | u32::from(*b)))
                .collect(),
        });
        v = tail;
    }
    v.is_empty().then_some(out)
}

fn prefix_bytes(bits: u8) -> usize {
    usize::from(bits).div_ceil(8)
}

/// Prefixes as in the NLRI field: length in bits, then the fewest octets. Bits past the length
/// are cleared.
fn prefixes(v: &[u8], family: Family) -> Option<Vec<IpNet>> {
    let mut r = Reader::new(v);
    let mut out = Vec::new();
    while let Some(bits) = r.u8() {
        let bytes = r.take(prefix_bytes(bits))?;
        let net = match family {
            Family::Ipv4Unicast => {
                let mut a = [0u8; 4];
                a.get_mut(..bytes.len())?.copy_from_slice(bytes);
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), bits).ok()?.trunc())
            }
            Family::Ipv6Unicast => {
                let mut a = [0u8; 16];
                a.get_mut(..bytes.len())?.copy_from_slice(bytes);
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), bits).ok()?.trunc())
            }
        };
        out.push(net);
    }
    Some(out)
}

fn v4_prefixes(v: &[u8]) -> Option<Vec<Ipv4Net>> {
    prefixes(v, Family::Ipv4Unicast).map(|p| {
        p.into_iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect()
    })
}

fn mp_reach(v: &[u8]) -> Result<Option<MpReach>, String> {
    let mut r = Reader::new(v);
    let short = || "MP_REACH_NLRI is too short".to_string();
    let afi = r.u16().ok_or_else(short)?;
    let safi = r.u8().ok_or_else(short)?;
    let Some(family) = Family::from_afi_safi(afi, safi) else {
        return Ok(None);
    };
    let nh_len = usize::from(r.u8().ok_or_else(short)?);
    let nh = r.take(nh_len).ok_or_else(short)?;
    let _reserved = r.u8().ok_or_else(short)?;
    let (next_hop, link_local) = match (family, nh.len()) {
        (Family::Ipv4Unicast, 4) => (IpAddr::from([nh[0], nh[1], nh[2], nh[3]]), None),
        (Family::Ipv6Unicast, 16 | 32) => {
            let mut g = [0u8; 16];
            g.copy_from_slice(&nh[..16]);
            let ll = (nh.len() == 32).then(|| {
                let mut l = [0u8; 16];
                l.copy_from_slice(&nh[16..]);
                Ipv6Addr::from(l)
            });
            (IpAddr::from(g), ll)
        }
        (f, n) => return Err(format!("MP_REACH_NLRI {f} next hop length {n}")),
    };
    let nlri = prefixes(r.rest(), family).ok_or("MP_REACH_NLRI prefixes do not parse")?;
    Ok(Some(MpReach {
        family,
        next_hop,
        link_local,
        nlri,
    }))
}

fn mp_unreach(v: &[u8]) -> Result<Option<MpUnreach>, String> {
    let mut r = Reader::new(v);
    let short = || "MP_UNREACH_NLRI is too short".to_string();
    let afi = r.u16().ok_or_else(short)?;
    let safi = r.u8().ok_or_else(short)?;
    let Some(family) = Family::from_afi_safi(afi, safi) else {
        return Ok(None);
    };
    let withdrawn = prefixes(r.rest(), family).ok_or("MP_UNREACH_NLRI prefixes do not parse")?;
    Ok(Some(MpUnreach { family, withdrawn }))
}

// ---- encoding ----

fn put_prefix(out: &mut Vec<u8>, net: &IpNet) {
    let bits = net.prefix_len();
    out.push(bits);
    let n = prefix_bytes(bits);
    match net.addr() {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
    }
}

fn put_attr(out: &mut Vec<u8>, flags: u8, ty: u8, value: &[u8]) {
    if let Ok(len) = u8::try_from(value.len()) {
        out.extend_from_slice(&[flags & !EXTENDED, ty, len]);
    } else {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&[flags | EXTENDED, ty]);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(value);
}

fn put_path(path: &AsPath, four: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for s in path {
        // A segment holds at most 255 AS numbers: longer ones are split.
        for chunk in s.asns.chunks(255) {
            v.push(s.kind.code());
            v.push(chunk.len() as u8);
            for a in chunk {
                if four {
                    v.extend_from_slice(&a.to_be_bytes());
                } else {
                    v.extend_from_slice(&u16::try_from(*a).unwrap_or(AS_TRANS).to_be_bytes());
                }
            }
        }
    }
    v
}

fn encode_attributes(a: &Attributes, codec: Codec, out: &mut Vec<u8>) {
    let four = codec.four_octet_as;
    if let Some(o) = a.origin {
        let v = match o {
            Origin::Igp => 0,
            Origin::Egp => 1,
            Origin::Incomplete => 2,
        };
        put_attr(out, TRANSITIVE, attr::ORIGIN, &[v]);
    }
    let mut as4 = None;
    if let Some(p) = &a.as_path {
        put_attr(out, TRANSITIVE, attr::AS_PATH, &put_path(p, four));
        if !four && p.iter().any(|s| s.asns.iter().any(|&x| x > 0xffff)) {
            // RFC 6793 §4.2.2: the real path rides along in AS4_PATH.
            as4 = Some(put_path(p, true));
        }
    }
    if let Some(nh) = a.next_hop {
        put_attr(out, TRANSITIVE, attr::NEXT_HOP, &nh.octets());
    }
    if let Some(m) = a.med {
        put_attr(out, OPTIONAL, attr::MED, &m.to_be_bytes());
    }
    if let Some(l) = a.local_pref {
        put_attr(out, TRANSITIVE, attr::LOCAL_PREF, &l.to_be_bytes());
    }
    if a.atomic_aggregate {
        put_attr(out, TRANSITIVE, attr::ATOMIC_AGGREGATE, &[]);
    }
    if let Some((asn, ip)) = a.aggregator {
        let mut v = Vec::new();
        if four {
            v.extend_from_slice(&asn.to_be_bytes());
        } else {
            v.extend_from_slice(&u16::try_from(asn).unwrap_or(AS_TRANS).to_be_bytes());
        }
        v.extend_from_slice(&ip.octets());
        put_attr(out, OPTIONAL | TRANSITIVE, attr::AGGREGATOR, &v);
    }
    if !a.communities.is_empty() {
        let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
        put_attr(out, OPTIONAL | TRANSITIVE, attr::COMMUNITIES, &v);
    }
    if let Some(m) = &a.mp_reach {
        let (afi, safi) = m.family.afi_safi();
        let mut v = afi.to_be_bytes().to_vec();
        v.push(safi);
        let mut nh = match m.next_hop {
            IpAddr::V4(x) => x.octets().to_vec(),
            IpAddr::V6(x) => x.octets().to_vec(),
        };
        if let Some(ll) = m.link_local {
            nh.extend_from_slice(&ll.octets());
        }
        v.push(nh.len() as u8);
        v.extend_from_slice(&nh);
        v.push(0);
        for n in &m.nlri {
            put_prefix(&mut v, n);
        }
        put_attr(out, OPTIONAL, attr::MP_REACH_NLRI, &v);
    }
    if let Some(m) = &a.mp_unreach {
        let (afi, safi) = m.family.afi_safi();
        let mut v = afi.to_be_bytes().to_vec();
        v.push(safi);
        for n in &m.withdrawn {
            put_prefix(&mut v, n);
        }
        put_attr(out, OPTIONAL, attr::MP_UNREACH_NLRI, &v);
    }
    if let Some(v) = as4 {
        put_attr(out, OPTIONAL | TRANSITIVE, attr::AS4_PATH, &v);
    }
    if !a.large_communities.is_empty() {
        let v: Vec<u8> = a
            .large_communities
            .iter()
            .flat_map(|c| {
                let mut b = c.global.to_be_bytes().to_vec();
                b.extend_from_slice(&c.local1.to_be_bytes());
                b.extend_from_slice(&c.local2.to_be_bytes());
                b
            })
            .collect();
        put_attr(out, OPTIONAL | TRANSITIVE, attr::LARGE_COMMUNITIES, &v);
    }
    for o in &a.other {
        put_attr(out, o.flags, o.type_code, &o.value);
    }
}

pub(super) fn encode(u: &Update, codec: Codec, out: &mut Vec<u8>) {
    let mut w = Vec::new();
    for n in &u.withdrawn {
        put_prefix(&mut w, &IpNet::V4(*n));
    }
    out.extend_from_slice(&u16::try_from(w.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&w);
    let mut a = Vec::new();
    encode_attributes(&u.attributes, codec, &mut a);
    out.extend_from_slice(&u16::try_from(a.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&a);
    for n in &u.nlri {
        put_prefix(out, &IpNet::V4(*n));
    }
}

/// Encoded UPDATEs (each at most [`MAX_LEN`] bytes) that announce `prefixes` of `family` with
/// `attrs` (`Some`; for IPv6, `attrs.mp_reach` gives the next hop, its NLRI are replaced), or
/// withdraw them (`None`). Prefixes of the other family are skipped.
pub fn pack(
    family: Family,
    attrs: Option<&Attributes>,
    prefixes: &[IpNet],
    codec: Codec,
) -> Vec<Vec<u8>> {
    let mut base = Update::default();
    match (family, attrs) {
        (Family::Ipv4Unicast, Some(a)) => base.attributes = a.clone(),
        (Family::Ipv4Unicast, None) => {}
        (_, Some(a)) => {
            base.attributes = a.clone();
            match &mut base.attributes.mp_reach {
                Some(m) => m.nlri.clear(),
                None => return Vec::new(),
            }
        }
        (_, None) => {
            base.attributes.mp_unreach = Some(MpUnreach {
                family,
                withdrawn: Vec::new(),
            })
        }
    }
    // One byte more for an MP attribute's length turning extended.
    let budget = MAX_LEN - encode_message(&Message::Update(base.clone()), codec).len() - 1;
    let mut out = Vec::new();
    let mut chunk: Vec<IpNet> = Vec::new();
    let mut used = 0;
    let flush = |chunk: &mut Vec<IpNet>, out: &mut Vec<Vec<u8>>| {
        if chunk.is_empty() {
            return;
        }
        let mut u = base.clone();
        let c = std::mem::take(chunk);
        match (family, attrs.is_some()) {
            (Family::Ipv4Unicast, true) => u.nlri = c.iter().filter_map(v4).collect(),
            (Family::Ipv4Unicast, false) => u.withdrawn = c.iter().filter_map(v4).collect(),
            (_, true) => {
                if let Some(m) = &mut u.attributes.mp_reach {
                    m.nlri = c;
                }
            }
            (_, false) => {
                if let Some(m) = &mut u.attributes.mp_unreach {
                    m.withdrawn = c;
                }
            }
        }
        out.push(encode_message(&Message::Update(u), codec));
    };
    for p in prefixes.iter().filter(|p| Family::of(p) == family) {
        let size = 1 + prefix_bytes(p.prefix_len());
        if used + size > budget {
            flush(&mut chunk, &mut out);
            used = 0;
        }
        chunk.push(*p);
        used += size;
    }
    flush(&mut chunk, &mut out);
    out
}

fn v4(n: &IpNet) -> Option<Ipv4Net> {
    match n {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    }
}
