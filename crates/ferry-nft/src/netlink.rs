//! ferry's table read straight from the kernel over nf_tables netlink, without libnftables.
//!
//! Reading the table back through libnftables means asking it for `nft -j list table` and
//! parsing the JSON: at 10,000 services that is a ~100 MB text and a tree several times its
//! size, built only to pick out chain names, each chain's first comment and rule count, and the
//! maps' keys and verdicts. Here the same facts come from four kinds of netlink dumps (chains,
//! rules, sets, each set's elements), decoded one message at a time into [`LiveState`]: nothing
//! larger than one datagram is held besides the result.
//!
//! Why not a crate: `rustables` (GPL-3.0, while ferry is Apache-2.0) does not decode sets' data
//! types, verdict-map elements or interval dumps; `nftnl` binds libnftnl's C library, which is
//! the dependency this module removes. The socket itself is `netlink-sys`'s. The decoder is
//! pure (byte slices in, typed values out, garbage an error or skipped, never a panic) and the
//! socket edge is [`read_live`]: one consistent snapshot, checked by the ruleset's generation
//! before and after (a commit in between, or a dump the kernel marks interrupted, reads again).
//!
//! Equal by construction to the JSON reader it replaces: `tests/kernel.rs` loads tables
//! (ferry's own and foreign additions) and compares the two readers' [`LiveState`]s.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_plan::diff::{fingerprint_of_comment, LiveChain, LiveSet, LiveState};
use ferry_plan::ir::{BaseChain, ChainType, Hook, Verdict, TABLE};

use crate::NftError;

// ---- constants (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h) ----

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

const NFTA_TABLE_NAME: u16 = 1;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_USERDATA: u16 = 7;
/// libnftnl's rule userdata TLV carrying the comment.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_OBJECT: u32 = 0x40;
/// The data type of a verdict map (`NFT_DATA_VERDICT`).
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NFTA_GEN_ID: u16 = 1;

// nft's datatype numbers (src/datatype.h), as they appear in NFTA_SET_KEY_TYPE: six bits each,
// the first field of a concatenation in the highest bits.
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

// ---- netlink framing (pure) ----

/// One netlink message: its type, flags, sequence number and payload after the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages of one datagram; stops at the first one whose length is impossible.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            buf = &[];
            return None;
        }
        let m = Message {
            kind: u16::from_ne_bytes(buf[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(buf[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some(m)
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes in `buf` as (type without the nested/byte-order bits, payload); stops at the
/// first malformed one.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            buf = &[];
            return None;
        }
        let value = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some((kind, value))
    })
}

/// The attributes of an nf_tables message (after its 4-byte `nfgenmsg`).
fn nft_attrs(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    attrs(payload.get(4..).unwrap_or(&[]))
}

fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated (or not) string attribute.
fn string(v: &[u8]) -> Option<&str> {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    std::str::from_utf8(&v[..end]).ok()
}

/// An nf_tables request: header, `nfgenmsg` for the inet family, attributes.
pub(crate) fn request(kind: u16, flags: u16, seq: u32, attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN];
    m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    for (k, v) in attributes {
        let len = 4 + v.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&k.to_ne_bytes());
        m.extend_from_slice(v);
        m.resize(align4(m.len()), 0);
    }
    let total = m.len() as u32;
    m[0..4].copy_from_slice(&total.to_ne_bytes());
    m[4..6].copy_from_slice(&(NFNL_SUBSYS_NFTABLES << 8 | kind).to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// A string attribute's value: the bytes and a terminating NUL.
fn cstr_value(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

// ---- nf_tables objects (pure) ----

/// A chain of ferry's table: its name and what [`LiveState`] keeps of it.
pub(crate) fn decode_chain(payload: &[u8], want: &str) -> Option<(String, Option<BaseChain>)> {
    let mut table = None;
    let mut name = None;
    let mut hook = None;
    let mut type_ = None;
    for (k, v) in nft_attrs(payload) {
        match k {
            NFTA_CHAIN_TABLE => table = string(v),
            NFTA_CHAIN_NAME => name = string(v),
            NFTA_CHAIN_HOOK => {
                hook = Some((
                    attr(v, NFTA_HOOK_HOOKNUM).and_then(be32),
                    attr(v, NFTA_HOOK_PRIORITY).and_then(be32),
                ))
            }
            NFTA_CHAIN_TYPE => type_ = string(v),
            _ => {}
        }
    }
    if table != Some(want) {
        return None;
    }
    let base = match (type_, hook) {
        (Some(t), Some((Some(num), Some(prio)))) => {
            // NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING. A hook ferry never
            // uses reads as a regular chain (as the JSON reader does): not ferry's, replaced.
            let hook = match num {
                0 => Some(Hook::Prerouting),
                3 => Some(Hook::Output),
                4 => Some(Hook::Postrouting),
                _ => None,
            };
            hook.map(|hook| BaseChain {
                type_: if t == "nat" {
                    ChainType::Nat
                } else {
                    ChainType::Filter
                },
                hook,
                priority: prio as i32,
            })
        }
        _ => None,
    };
    Some((name?.to_string(), base))
}

/// A rule of ferry's table: its chain and its comment.
pub(crate) fn decode_rule<'a>(payload: &'a [u8], want: &str) -> Option<(&'a str, Option<&'a str>)> {
    let mut table = None;
    let mut chain = None;
    let mut comment = None;
    for (k, v) in nft_attrs(payload) {
        match k {
            NFTA_RULE_TABLE => table = string(v),
            NFTA_RULE_CHAIN => chain = string(v),
            NFTA_RULE_USERDATA => comment = udata_comment(v),
            _ => {}
        }
    }
    (table == Some(want)).then_some(())?;
    Some((chain?, comment))
}

/// The comment in libnftnl's rule userdata (TLVs of a type byte, a length byte, the value).
fn udata_comment(mut v: &[u8]) -> Option<&str> {
    while v.len() >= 2 {
        let (kind, len) = (v[0], v[1] as usize);
        let value = v.get(2..2 + len)?;
        if kind == NFTNL_UDATA_RULE_COMMENT {
            return string(value);
        }
        v = &v[2 + len..];
    }
    None
}

/// One field of a set's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Ipv4,
    Ipv6,
    Proto,
    Port,
    /// A bare 32-bit integer (a `numgen` draw), in the host's byte order.
    Integer,
    /// A type ferry never uses: the set's signature then differs from any planned one.
    Other(u32),
}

impl Field {
    fn of(t: u32) -> Field {
        match t {
            TYPE_IPADDR => Field::Ipv4,
            TYPE_IP6ADDR => Field::Ipv6,
            TYPE_INET_PROTOCOL => Field::Proto,
            TYPE_INET_SERVICE => Field::Port,
            TYPE_INTEGER => Field::Integer,
            t => Field::Other(t),
        }
    }
    fn name(self) -> String {
        match self {
            Field::Ipv4 => "ipv4_addr".into(),
            Field::Ipv6 => "ipv6_addr".into(),
            Field::Proto => "inet_proto".into(),
            Field::Port => "inet_service".into(),
            Field::Integer => "integer".into(),
            Field::Other(t) => format!("type#{t}"),
        }
    }
    /// Bytes the field's value takes.
    fn width(self) -> Option<usize> {
        match self {
            Field::Ipv4 => Some(4),
            Field::Ipv6 => Some(16),
            Field::Proto => Some(1),
            Field::Port => Some(2),
            Field::Integer => Some(4),
            Field::Other(_) => None,
        }
    }
}

/// A set's definition: what its elements' bytes mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetDef {
    pub name: String,
    pub fields: Vec<Field>,
    pub interval: bool,
    /// Some(empty) for a verdict map, Some(fields) for a map to data, None for a set.
    pub data: Option<Vec<Field>>,
}

impl SetDef {
    /// As [`ferry_plan::ir::Set::signature`] and the JSON reader spell it.
    pub fn signature(&self) -> String {
        let key = self
            .fields
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(" . ");
        let names = |fields: &[Field]| {
            fields
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(" . ")
        };
        match &self.data {
            None => key,
            Some(d) if d.is_empty() => format!("{key} : verdict"),
            Some(d) => format!("{key} : {}", names(d)),
        }
    }
}

/// The fields of a key or data type: nft's datatype numbers, six bits each in a
/// concatenation, the first field in the highest bits.
fn fields_of(mut t: u32) -> Vec<Field> {
    if t < 64 || t == NFT_DATA_VERDICT || t == u32::MAX {
        return vec![Field::of(t)];
    }
    let mut fields = Vec::new();
    while t != 0 {
        fields.push(Field::of(t & 0x3f));
        t >>= 6;
    }
    fields.reverse();
    fields
}

/// A named set or map of ferry's table (anonymous sets are part of their rules, as in
/// `nft list table`).
pub(crate) fn decode_set(payload: &[u8], want: &str) -> Option<SetDef> {
    let mut table = None;
    let mut name = None;
    let mut flags = 0;
    let mut key_type = None;
    let mut data_type = None;
    for (k, v) in nft_attrs(payload) {
        match k {
            NFTA_SET_TABLE => table = string(v),
            NFTA_SET_NAME => name = string(v),
            NFTA_SET_FLAGS => flags = be32(v).unwrap_or(0),
            NFTA_SET_KEY_TYPE => key_type = be32(v),
            NFTA_SET_DATA_TYPE => data_type = be32(v),
            _ => {}
        }
    }
    if table != Some(want) || flags & NFT_SET_ANONYMOUS != 0 {
        return None;
    }
    let fields = fields_of(key_type.unwrap_or(0));
    let data = if flags & NFT_SET_OBJECT != 0 {
        Some(vec![Field::Other(u32::MAX)])
    } else if flags & NFT_SET_MAP != 0 {
        match data_type {
            Some(NFT_DATA_VERDICT) => None,
            other => Some(fields_of(other.unwrap_or(u32::MAX))),
        }
        .or(Some(Vec::new()))
    } else {
        None
    };
    Some(SetDef {
        name: name?.to_string(),
        fields,
        interval: flags & NFT_SET_INTERVAL != 0,
        data,
    })
}

/// One element as the kernel dumps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawElement {
    pub key: Vec<u8>,
    /// The last key of a range (sets of concatenated ranges); single-field interval sets mark
    /// the key after a range with `end` instead.
    pub key_end: Option<Vec<u8>>,
    pub end: bool,
    pub verdict: Option<Verdict>,
    /// The data of a map to values (an endpoint: address . port), as the kernel holds it.
    pub data: Option<Vec<u8>>,
}

/// The set a NEWSETELEM message is about, and its elements.
pub(crate) fn decode_elements<'a>(
    payload: &'a [u8],
    want: &str,
) -> Option<(&'a str, Vec<RawElement>)> {
    let mut table = None;
    let mut set = None;
    let mut out = Vec::new();
    for (k, v) in nft_attrs(payload) {
        match k {
            NFTA_SET_ELEM_LIST_TABLE => table = string(v),
            NFTA_SET_ELEM_LIST_SET => set = string(v),
            NFTA_SET_ELEM_LIST_ELEMENTS => {
                out.extend(attrs(v).filter_map(|(_, e)| decode_element(e)));
            }
            _ => {}
        }
    }
    (table == Some(want)).then_some(())?;
    Some((set?, out))
}

fn decode_element(e: &[u8]) -> Option<RawElement> {
    let mut el = RawElement {
        key: Vec::new(),
        key_end: None,
        end: false,
        verdict: None,
        data: None,
    };
    for (k, v) in attrs(e) {
        match k {
            NFTA_SET_ELEM_KEY => el.key = attr(v, NFTA_DATA_VALUE)?.to_vec(),
            NFTA_SET_ELEM_KEY_END => el.key_end = Some(attr(v, NFTA_DATA_VALUE)?.to_vec()),
            NFTA_SET_ELEM_FLAGS => {
                el.end = be32(v).is_some_and(|f| f & NFT_SET_ELEM_INTERVAL_END != 0)
            }
            NFTA_SET_ELEM_DATA => {
                el.verdict = attr(v, NFTA_DATA_VERDICT).and_then(verdict);
                el.data = attr(v, NFTA_DATA_VALUE).map(<[u8]>::to_vec);
            }
            _ => {}
        }
    }
    Some(el)
}

fn verdict(v: &[u8]) -> Option<Verdict> {
    let code = be32(attr(v, NFTA_VERDICT_CODE)?)? as i32;
    let chain = || {
        attr(v, NFTA_VERDICT_CHAIN)
            .and_then(string)
            .map(str::to_string)
    };
    match code {
        1 => Some(Verdict::Accept),
        0 => Some(Verdict::Drop),
        -5 => Some(Verdict::Return),
        -3 => chain().map(|c| Verdict::Jump(c.into())),
        -4 => chain().map(|c| Verdict::Goto(c.into())),
        _ => None,
    }
}

/// A key's text as ferry writes keys (`10.96.0.10 . tcp . 80`); None when a field cannot be
/// read (the element is then left out, as the JSON reader does).
fn key_text(fields: &[Field], bytes: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut at = 0;
    for (i, f) in fields.iter().enumerate() {
        let w = f.width()?;
        let v = bytes.get(at..at + w)?;
        if i > 0 {
            out.push_str(" . ");
        }
        match f {
            Field::Ipv4 | Field::Ipv6 => out.push_str(&ip(v)?.to_string()),
            Field::Proto => match v[0] {
                6 => out.push_str("tcp"),
                17 => out.push_str("udp"),
                132 => out.push_str("sctp"),
                n => out.push_str(&n.to_string()),
            },
            Field::Port => out.push_str(&u16::from_be_bytes([v[0], v[1]]).to_string()),
            Field::Integer => {
                out.push_str(&u32::from_ne_bytes([v[0], v[1], v[2], v[3]]).to_string())
            }
            Field::Other(_) => return None,
        }
        // Fields of a concatenation sit in 4-byte registers.
        at += align4(w);
    }
    Some(out)
}

fn ip(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?))),
        _ => None,
    }
}

/// An endpoint map element's data (`address . port`, each in its 4-byte words); None for any
/// other shape.
fn endpoint_of(fields: &[Field], bytes: &[u8]) -> Option<(IpAddr, u16)> {
    let [a @ (Field::Ipv4 | Field::Ipv6), Field::Port] = fields else {
        return None;
    };
    let w = a.width()?;
    let addr = ip(bytes.get(..w)?)?;
    let port = bytes.get(w..w + 2)?;
    Some((addr, u16::from_be_bytes([port[0], port[1]])))
}

/// What the differ compares of an element read back: its verdict, or its endpoint.
fn element_of(def: &SetDef, e: &RawElement) -> std::sync::Arc<ferry_plan::ir::Element> {
    let to = match (&def.data, &e.data) {
        (Some(fields), Some(bytes)) => endpoint_of(fields, bytes),
        _ => None,
    };
    match to {
        Some(to) => LiveSet::endpoint_element(to),
        None => LiveSet::element(e.verdict.clone()),
    }
}

/// The elements of a set, keyed as ferry writes keys. Interval sets come back as the kernel
/// stores them (a start element, and an end-marked element holding the address after the
/// range, or none when the range runs to the last address) and are paired up into "a-b" (or
/// "a" for one address).
pub(crate) fn assemble(
    def: &SetDef,
    raw: Vec<RawElement>,
) -> BTreeMap<ferry_plan::ir::Key, std::sync::Arc<ferry_plan::ir::Element>> {
    let mut out = BTreeMap::new();
    if !def.interval || def.fields.len() != 1 {
        for e in raw {
            let text = match &e.key_end {
                Some(end) if *end != e.key => key_text(&def.fields, &e.key)
                    .zip(key_text(&def.fields, end))
                    .map(|(a, b)| format!("{a}-{b}")),
                _ => key_text(&def.fields, &e.key),
            };
            if let Some(t) = text {
                out.insert(t.into(), element_of(def, &e));
            }
        }
        return out;
    }
    let mut raw = raw;
    // By key; at equal keys the end of one range before the start of the next.
    raw.sort_by(|a, b| a.key.cmp(&b.key).then(b.end.cmp(&a.end)));
    let mut it = raw.into_iter().peekable();
    while let Some(e) = it.next() {
        if e.end {
            // An end with no start: the marker nft puts at 0 before a first range.
            continue;
        }
        let last = match it.peek() {
            Some(next) if next.end => {
                let next = it.next().map(|n| n.key).unwrap_or_default();
                minus_one(&next)
            }
            _ => Some(vec![0xff; e.key.len()]),
        };
        let Some(last) = last.filter(|l| *l >= e.key) else {
            continue;
        };
        let text = if last == e.key {
            key_text(&def.fields, &e.key)
        } else {
            key_text(&def.fields, &e.key)
                .zip(key_text(&def.fields, &last))
                .map(|(a, b)| format!("{a}-{b}"))
        };
        if let Some(t) = text {
            out.insert(t.into(), element_of(def, &e));
        }
    }
    out
}

/// The big-endian number one less than `v`; None for zero.
fn minus_one(v: &[u8]) -> Option<Vec<u8>> {
    let mut out = v.to_vec();
    for b in out.iter_mut().rev() {
        if *b > 0 {
            *b -= 1;
            return Some(out);
        }
        *b = 0xff;
    }
    None
}

// ---- the socket edge ----

/// A netlink socket speaking nf_tables, in the calling thread's network namespace.
struct Socket {
    /// The table read.
    table: String,
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    fn open() -> Result<Socket, NftError> {
        let unavailable =
            |e: std::io::Error| NftError::Unavailable(format!("nf_tables netlink: {e}"));
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)
            .map_err(unavailable)?;
        sock.bind_auto().map_err(unavailable)?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(unavailable)?;
        Ok(Socket {
            table: TABLE.to_string(),
            sock,
            seq: 0,
            // Dump datagrams are at most 32 KiB; room to spare.
            buf: Vec::with_capacity(256 * 1024),
        })
    }

    /// Sends a request and hands each reply message of its kind to `f`; true when the kernel
    /// marked the dump interrupted (the ruleset changed while it ran).
    fn call(
        &mut self,
        kind: u16,
        dump: bool,
        attributes: &[(u16, &[u8])],
        reply: u16,
        mut f: impl FnMut(&[u8]),
    ) -> Result<bool, NftError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = request(kind, if dump { NLM_F_DUMP } else { 0 }, seq, attributes);
        self.sock
            .send(&msg, 0)
            .map_err(|e| NftError::Failed(format!("netlink send: {e}")))?;
        let want = NFNL_SUBSYS_NFTABLES << 8 | reply;
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let n = self
                .sock
                .recv(&mut self.buf, libc::MSG_TRUNC)
                .map_err(|e| NftError::Failed(format!("netlink receive: {e}")))?;
            if n > self.buf.len() {
                return Err(NftError::Output(format!(
                    "netlink datagram of {n} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            for m in messages(&self.buf) {
                if m.seq != seq {
                    continue;
                }
                interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                match m.kind {
                    NLMSG_DONE => return Ok(interrupted),
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_ne_bytes)
                            .unwrap_or(-libc::EPROTO);
                        if code == 0 {
                            return Ok(interrupted);
                        }
                        return Err(NftError::Failed(
                            std::io::Error::from_raw_os_error(-code).to_string(),
                        ));
                    }
                    k if k == want => {
                        f(m.payload);
                        if !dump {
                            return Ok(interrupted);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn generation(&mut self) -> Result<u32, NftError> {
        let mut id = None;
        self.call(NFT_MSG_GETGEN, false, &[], NFT_MSG_NEWGEN, |p| {
            id = nft_attrs(p)
                .find(|(k, _)| *k == NFTA_GEN_ID)
                .and_then(|(_, v)| be32(v));
        })?;
        id.ok_or_else(|| NftError::Output("no generation in NEWGEN".into()))
    }

    /// ferry's table, or None when there is none; the flag says a dump was interrupted.
    fn table(&mut self) -> Result<(Option<LiveState>, bool), NftError> {
        let name = cstr_value(&self.table);
        let table_name = self.table.clone();
        let found = self.call(
            NFT_MSG_GETTABLE,
            false,
            &[(NFTA_TABLE_NAME, &name)],
            NFT_MSG_NEWTABLE,
            |_| {},
        );
        match found {
            Ok(_) => {}
            Err(NftError::Failed(m)) if m.contains("No such file or directory") => {
                return Ok((None, false))
            }
            Err(e) => return Err(e),
        }
        let mut live = LiveState {
            table: true,
            ..LiveState::default()
        };
        let mut intr = self.call(
            NFT_MSG_GETCHAIN,
            true,
            &[(NFTA_CHAIN_TABLE, &name)],
            NFT_MSG_NEWCHAIN,
            |p| {
                if let Some((chain, base)) = decode_chain(p, &table_name) {
                    live.chains.insert(
                        chain.into(),
                        LiveChain {
                            base,
                            fingerprint: None,
                            rules: 0,
                        },
                    );
                }
            },
        )?;
        // Rules come chain by chain, in order: the first rule of a chain has its fingerprint.
        intr |= self.call(
            NFT_MSG_GETRULE,
            true,
            &[(NFTA_RULE_TABLE, &name)],
            NFT_MSG_NEWRULE,
            |p| {
                let Some((chain, comment)) = decode_rule(p, &table_name) else {
                    return;
                };
                if let Some(c) = live.chains.get_mut(chain) {
                    c.rules += 1;
                    if c.rules == 1 {
                        c.fingerprint = comment.and_then(fingerprint_of_comment);
                    }
                }
            },
        )?;
        let (defs, i) = self.sets()?;
        intr |= i;
        for def in defs {
            let (raw, i) = self.elements(&def.name)?;
            intr |= i;
            let elements = assemble(&def, raw);
            live.sets.insert(
                def.name.clone(),
                LiveSet {
                    signature: def.signature(),
                    elements,
                },
            );
        }
        Ok((Some(live), intr))
    }

    /// The named sets of ferry's table; the flag says the dump was interrupted.
    fn sets(&mut self) -> Result<(Vec<SetDef>, bool), NftError> {
        let name = cstr_value(&self.table);
        let table_name = self.table.clone();
        let mut defs = Vec::new();
        let intr = self.call(
            NFT_MSG_GETSET,
            true,
            &[(NFTA_SET_TABLE, &name)],
            NFT_MSG_NEWSET,
            |p| defs.extend(decode_set(p, &table_name)),
        )?;
        Ok((defs, intr))
    }

    /// The elements of one set of ferry's table, as the kernel dumps them.
    fn elements(&mut self, set: &str) -> Result<(Vec<RawElement>, bool), NftError> {
        let (table, set_attr) = (cstr_value(&self.table), cstr_value(set));
        let table_name = self.table.clone();
        let mut raw = Vec::new();
        let intr = self.call(
            NFT_MSG_GETSETELEM,
            true,
            &[
                (NFTA_SET_ELEM_LIST_TABLE, &table),
                (NFTA_SET_ELEM_LIST_SET, &set_attr),
            ],
            NFT_MSG_NEWSETELEM,
            |p| {
                if let Some((s, els)) = decode_elements(p, &table_name) {
                    if s == set {
                        raw.extend(els);
                    }
                }
            },
        )?;
        Ok((raw, intr))
    }
}

/// Reads ferry's table from the kernel of the calling thread's network namespace (an empty
/// state when there is none), as one consistent snapshot.
pub fn read_live() -> Result<LiveState, NftError> {
    read_live_table(TABLE)
}

/// [`read_live`] of the table `table` (a shard of a sharded layout).
pub fn read_live_table(table: &str) -> Result<LiveState, NftError> {
    let mut s = Socket::open()?;
    s.table = table.to_string();
    for _ in 0..16 {
        let before = s.generation()?;
        let (live, interrupted) = s.table()?;
        if !interrupted && s.generation()? == before {
            return Ok(live.unwrap_or_default());
        }
    }
    Err(NftError::Output(
        "the ruleset kept changing while it was being read (16 tries)".into(),
    ))
}

/// Sends a batch built by [`crate::encode`] as one transaction; Ok once the kernel committed
/// it, else the kernel's error with the message it refused.
pub fn send_batch(batch: &[u8]) -> Result<(), NftError> {
    let netns = netns_id();
    let cached = BATCH_SOCKET.with(|c| c.borrow_mut().take());
    let mut s = match cached {
        Some((ns, s)) if netns.is_some() && ns == netns => s,
        _ => Socket::open()?,
    };
    let result = send_on(&mut s, batch);
    // Kept for the next batch only after a clean exchange (nothing left unread).
    if result.is_ok() {
        BATCH_SOCKET.with(|c| *c.borrow_mut() = Some((netns, s)));
    }
    result
}

thread_local! {
    /// This thread's batch socket, kept open between batches with the network namespace it was
    /// opened in (a thread that moves to another namespace gets a new one). Closing an
    /// nf_tables socket after a batch that deleted rules waits for the kernel's deferred
    /// cleanup: 18-59 ms measured at 64 shard tables, against ~0.5 ms for the batch itself.
    static BATCH_SOCKET: std::cell::RefCell<Option<(Option<NetnsId>, Socket)>> =
        const { std::cell::RefCell::new(None) };
}

/// A network namespace: the device and inode of its nsfs file.
type NetnsId = (u64, u64);

/// The calling thread's network namespace, if readable.
fn netns_id() -> Option<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// [`send_batch`] on an open socket.
fn send_on(s: &mut Socket, batch: &[u8]) -> Result<(), NftError> {
    use std::os::fd::AsRawFd;
    // The whole batch is one datagram: the send buffer must hold it (SO_SNDBUFFORCE needs
    // CAP_NET_ADMIN, which writing nftables needs anyway).
    let size = libc::c_int::try_from(batch.len() + 65536).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on the socket's own descriptor with a c_int value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(NftError::Failed(format!(
            "cannot size the netlink send buffer for a batch of {} bytes: {}",
            batch.len(),
            std::io::Error::last_os_error()
        )));
    }
    let batch_msgs = messages(batch).count() as u32;
    s.seq = batch_msgs + 1;
    s.sock.send(batch, 0).map_err(|e| {
        NftError::Failed(format!("netlink send of a {} byte batch: {e}", batch.len()))
    })?;
    // The kernel handles the batch while we send it: its errors are queued before the answer to
    // a request sent after it.
    s.seq += 1;
    let probe = s.seq;
    s.sock
        .send(&request(NFT_MSG_GETGEN, 0, probe, &[]), 0)
        .map_err(|e| NftError::Failed(format!("netlink send: {e}")))?;
    let mut first_error: Option<(i32, u32)> = None;
    loop {
        s.buf.clear();
        s.sock
            .recv(&mut s.buf, 0)
            .map_err(|e| NftError::Failed(format!("netlink receive: {e}")))?;
        for m in messages(&s.buf) {
            if m.kind == NLMSG_ERROR {
                let code = m
                    .payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .unwrap_or(-libc::EPROTO);
                let seq = m
                    .payload
                    .get(12..16)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                    .unwrap_or(0);
                if code != 0 && first_error.is_none() {
                    first_error = Some((code, seq));
                }
                if m.seq == probe {
                    break;
                }
            }
            if m.seq == probe && m.kind != NLMSG_ERROR {
                return match first_error {
                    None => Ok(()),
                    Some((code, seq)) => Err(refused(batch, code, seq)),
                };
            }
        }
    }
}

/// The kernel's error for the batch message with sequence number `seq`, naming that message.
fn refused(batch: &[u8], code: i32, seq: u32) -> NftError {
    let err = std::io::Error::from_raw_os_error(-code);
    let what = messages(batch)
        .find(|m| m.seq == seq)
        .map(|m| {
            let kind = match m.kind & 0xff {
                0 => "table",
                2 => "table deletion",
                3 => "chain",
                6 => "rule",
                9 => "set",
                12 => "set elements",
                _ => "message",
            };
            let names: Vec<&str> = nft_attrs(m.payload)
                .filter(|(k, _)| (1..=3).contains(k))
                .filter_map(|(_, v)| string(v))
                .filter(|s| !s.is_empty() && s.is_ascii())
                .collect();
            format!("{kind} {}", names.join(" "))
        })
        .unwrap_or_else(|| format!("message {seq}"));
    NftError::Failed(format!("the kernel refused the {what}: {err}"))
}

/// Set name -> (key bytes, marks a range's end) of each element.
pub type RawElements = BTreeMap<String, Vec<(Vec<u8>, bool)>>;

/// Every element of every set of ferry's table as the kernel holds it (interval sets' start
/// and end elements apart, unpaired ones included), sorted: what a listing, which pairs them
/// up, cannot show.
pub fn raw_elements() -> Result<RawElements, NftError> {
    let mut s = Socket::open()?;
    let mut out = BTreeMap::new();
    for def in s.sets()?.0 {
        let mut raw: Vec<(Vec<u8>, bool)> = s
            .elements(&def.name)?
            .0
            .into_iter()
            .map(|e| (e.key, e.end))
            .collect();
        raw.sort();
        out.insert(def.name, raw);
    }
    Ok(out)
}

/// Whether ferry's table exists.
pub fn table_exists() -> Result<bool, NftError> {
    let mut s = Socket::open()?;
    let name = cstr_value(&s.table);
    match s.call(
        NFT_MSG_GETTABLE,
        false,
        &[(NFTA_TABLE_NAME, &name)],
        NFT_MSG_NEWTABLE,
        |_| {},
    ) {
        Ok(_) => Ok(true),
        Err(NftError::Failed(m)) if m.contains("No such file or directory") => Ok(false),
        Err(e) => Err(e),
    }
}

/// The names of this network namespace's inet tables, ferry's and others'.
pub fn table_names() -> Result<Vec<String>, NftError> {
    let mut s = Socket::open()?;
    let mut names = Vec::new();
    s.call(NFT_MSG_GETTABLE, true, &[], NFT_MSG_NEWTABLE, |p| {
        if let Some(n) = nft_attrs(p)
            .find(|(k, _)| *k == NFTA_TABLE_NAME)
            .and_then(|(_, v)| string(v))
        {
            names.push(n.to_string());
        }
    })?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + body.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&(kind | 0x8000).to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    fn payload(attributes: &[(u16, &[u8])]) -> Vec<u8> {
        request(0, 0, 0, attributes)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn requests_frame_as_the_kernel_expects() {
        let m = request(
            NFT_MSG_GETSET,
            NLM_F_DUMP,
            7,
            &[(NFTA_SET_TABLE, b"ferry\0")],
        );
        // 16 header + 4 nfgenmsg + (4 + 6, padded to 12)
        assert_eq!(m.len(), 32);
        let parsed: Vec<_> = messages(&m).collect();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kind, (10 << 8) | 10);
        assert_eq!(parsed[0].flags, 0x301);
        assert_eq!(parsed[0].seq, 7);
        assert_eq!(
            nft_attrs(parsed[0].payload).collect::<Vec<_>>(),
            vec![(NFTA_SET_TABLE, &b"ferry\0"[..])]
        );
    }

    #[test]
    fn chains_read_with_their_hooks() {
        let mut hook = nest(NFTA_HOOK_HOOKNUM, &0u32.to_be_bytes());
        hook.extend(nest(NFTA_HOOK_PRIORITY, &(-110i32).to_be_bytes()));
        let p = payload(&[
            (NFTA_CHAIN_TABLE, b"ferry\0"),
            (NFTA_CHAIN_NAME, b"nat-prerouting\0"),
            (NFTA_CHAIN_HOOK, &hook),
            (NFTA_CHAIN_TYPE, b"nat\0"),
        ]);
        let (name, base) = decode_chain(&p, TABLE).expect("a chain");
        assert_eq!(name, "nat-prerouting");
        assert_eq!(
            base,
            Some(BaseChain {
                type_: ChainType::Nat,
                hook: Hook::Prerouting,
                priority: -110
            })
        );
        let other = payload(&[(NFTA_CHAIN_TABLE, b"filter\0"), (NFTA_CHAIN_NAME, b"x\0")]);
        assert_eq!(decode_chain(&other, TABLE), None);
        let regular = payload(&[(NFTA_CHAIN_TABLE, b"ferry\0"), (NFTA_CHAIN_NAME, b"svc\0")]);
        assert_eq!(decode_chain(&regular, TABLE), Some(("svc".into(), None)));
    }

    #[test]
    fn rule_comments_come_from_userdata() {
        let udata = [&[0u8, 9][..], b"web [ab]\0"].concat();
        let p = payload(&[
            (NFTA_RULE_TABLE, b"ferry\0"),
            (NFTA_RULE_CHAIN, b"svc\0"),
            (NFTA_RULE_USERDATA, &udata),
        ]);
        assert_eq!(decode_rule(&p, TABLE), Some(("svc", Some("web [ab]"))));
        // A truncated TLV is no comment, not a panic.
        let bad = payload(&[
            (NFTA_RULE_TABLE, b"ferry\0"),
            (NFTA_RULE_CHAIN, b"svc\0"),
            (NFTA_RULE_USERDATA, &[0, 200, 1]),
        ]);
        assert_eq!(decode_rule(&bad, TABLE), Some(("svc", None)));
    }

    fn def(fields: Vec<Field>, interval: bool, vmap: bool) -> SetDef {
        SetDef {
            name: "s".into(),
            fields,
            interval,
            data: vmap.then(Vec::new),
        }
    }

    #[test]
    fn concatenated_key_types_and_signatures() {
        let kt = (TYPE_IPADDR << 12) | (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;
        let p = payload(&[
            (NFTA_SET_TABLE, b"ferry\0"),
            (NFTA_SET_NAME, b"service-ips-v4\0"),
            (NFTA_SET_FLAGS, &(NFT_SET_MAP | 0x80).to_be_bytes()),
            (NFTA_SET_KEY_TYPE, &kt.to_be_bytes()),
            (NFTA_SET_DATA_TYPE, &NFT_DATA_VERDICT.to_be_bytes()),
        ]);
        let d = decode_set(&p, TABLE).expect("a set");
        assert_eq!(
            d.signature(),
            "ipv4_addr . inet_proto . inet_service : verdict"
        );
        let anon = payload(&[
            (NFTA_SET_TABLE, b"ferry\0"),
            (NFTA_SET_NAME, b"__set0\0"),
            (NFTA_SET_FLAGS, &(NFT_SET_ANONYMOUS).to_be_bytes()),
        ]);
        assert_eq!(decode_set(&anon, TABLE), None);
    }

    #[test]
    fn keys_render_as_ferry_writes_them() {
        let d = def(vec![Field::Ipv4, Field::Proto, Field::Port], false, true);
        let key = [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0];
        let code = nest(NFTA_VERDICT_CODE, &(-4i32).to_be_bytes());
        let chain = nest(NFTA_VERDICT_CHAIN, b"service-web\0");
        let v = verdict(&[code, chain].concat());
        let out = assemble(
            &d,
            vec![RawElement {
                key: key.to_vec(),
                key_end: None,
                end: false,
                verdict: v.clone(),
                data: None,
            }],
        );
        assert_eq!(
            out.into_iter()
                .map(|(k, e)| (k, e.verdict().cloned()))
                .collect::<Vec<_>>(),
            vec![(
                "10.96.0.10 . tcp . 80".into(),
                Some(Verdict::Goto("service-web".into()))
            )]
        );
        // A key too short for its fields is left out.
        let short = assemble(
            &d,
            vec![RawElement {
                key: key[..6].to_vec(),
                key_end: None,
                end: false,
                verdict: v,
                data: None,
            }],
        );
        assert!(short.is_empty());
    }

    fn el(key: &[u8], end: bool) -> RawElement {
        RawElement {
            key: key.to_vec(),
            key_end: None,
            end,
            verdict: None,
            data: None,
        }
    }

    #[test]
    fn intervals_pair_up_in_any_dump_order() {
        let d = def(vec![Field::Ipv4], true, false);
        let raw = vec![
            // the marker nft adds at 0
            el(&[0, 0, 0, 0], true),
            el(&[10, 0, 0, 0], false),
            el(&[10, 0, 1, 0], true),
            // adjacent to the first
            el(&[10, 0, 1, 0], false),
            el(&[10, 0, 1, 1], true),
            // to the end of the address space
            el(&[250, 0, 0, 0], false),
        ];
        let want = vec![
            "10.0.0.0-10.0.0.255".to_string(),
            "10.0.1.0".to_string(),
            "250.0.0.0-255.255.255.255".to_string(),
        ];
        let mut rev = raw.clone();
        rev.reverse();
        for r in [raw, rev] {
            let got: Vec<String> = assemble(&d, r).into_keys().map(|k| k.to_string()).collect();
            assert_eq!(got, want);
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            for m in messages(&buf) {
                let _ = decode_chain(m.payload, TABLE);
                let _ = decode_rule(m.payload, TABLE);
                let _ = decode_set(m.payload, TABLE);
                let _ = decode_elements(m.payload, TABLE);
            }
            let _ = decode_chain(&buf, TABLE);
            let _ = decode_rule(&buf, TABLE);
            if let Some(d) = decode_set(&buf, TABLE) {
                let _ = d.signature();
            }
            if let Some((_, els)) = decode_elements(&buf, TABLE) {
                let _ = assemble(&def(vec![Field::Ipv4], true, false), els.clone());
                let _ = assemble(&def(vec![Field::Ipv6, Field::Port], false, true), els);
            }
        }
    }
}
